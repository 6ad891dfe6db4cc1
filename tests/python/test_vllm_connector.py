"""TandemConnector driven through vLLM 0.26's call sequence (tests/python/vllm_standins.py),
a prefill engine in one process and a decode engine in another, each with a scheduler-side
and a worker-side connector, moving real bytes between their host KV caches through
libtandem_kv. Then the failure paths: every one ends in vLLM's failed-load path (the request
is reported finished and its blocks invalid, so vLLM recomputes it), never in a hang."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import ROOT, TARGET, free_port

sys.path.insert(0, str(ROOT / "python"))
os.environ.setdefault("TANDEM_KV_LIB", str(TARGET / "libtandem_kv.so"))

from tandem_kv.vllm import TandemConnector  # noqa: E402
from tandem_kv._vllm_compat import KVConnectorRole  # noqa: E402
from vllm_standins import (  # noqa: E402
    KVCacheBlock, KVCacheBlocks, Request, RequestStatus, kv_bytes, kv_caches, rank_engines,
    vllm_config,
)

PROMPT = list(range(1000, 1000 + 16 * 5 + 7))  # 5 full blocks and a partial one
PREFILL_BLOCKS = [9, 4, 17, 2, 30, 11]

PREFILL = textwrap.dedent(
    """
    import json, sys, time
    sys.path[:0] = {paths!r}
    from tandem_kv.vllm import TandemConnector
    from tandem_kv._vllm_compat import KVConnectorRole
    from vllm_standins import *

    cfg = vllm_config("prefill-engine", "kv_producer", port={port})
    caches = kv_caches()
    engine = Engine(TandemConnector(cfg, KVConnectorRole.SCHEDULER, None),
                    TandemConnector(cfg, KVConnectorRole.WORKER, None), caches)
    engine.worker.register_kv_caches(caches)
    prompt, blocks = {prompt!r}, {blocks!r}
    req = Request("cmpl-prefill-1", prompt, kv_transfer_params={{"do_remote_decode": True}})
    assert engine.scheduler.get_num_new_matched_tokens(req, 0) == (0, False)
    engine.scheduler.update_state_after_alloc(req, KVCacheBlocks(([KVCacheBlock(b) for b in blocks],)), 0)
    engine.step()
    for layer, t in enumerate(caches.values()):  # the forward pass computes the prompt's KV
        for i, b in enumerate(blocks):
            t.write_block(b, kv_bytes(prompt, layer, i, t.block_len))
    req.num_computed_tokens = len(prompt)
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    delay, params = engine.scheduler.request_finished(req, [blocks])
    assert delay is True
    print(json.dumps(params), flush=True)
    deadline = time.monotonic() + 30
    while "cmpl-prefill-1" not in engine.finished_sending:
        assert time.monotonic() < deadline, "the decode side never released the blocks"
        engine.step()
        time.sleep(0.005)
    print("sent cmpl-prefill-1", flush=True)
    engine.worker.shutdown()
    """
)


def start_prefill(port):
    script = PREFILL.format(paths=[str(ROOT / "python"), str(ROOT / "tests/python")], port=port,
                            prompt=PROMPT, blocks=PREFILL_BLOCKS)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def decode_engine(port, **extra):
    # kv_caches()'s shape: 3 layers of 32 blocks, 2 KV heads.
    return rank_engines("decode-engine", "kv_consumer", 1, port, 2, layers=3, num_blocks=32, **extra)[0]


def schedule_remote_prefill(engine, params, local_blocks, cached=0, req_id="cmpl-decode-1"):
    """What vLLM's scheduler does with a request carrying the prefill's kv_transfer_params:
    ask how many tokens come from outside, allocate blocks, tell the connector."""
    req = Request(req_id, PROMPT, kv_transfer_params=dict(params, do_remote_prefill=True))
    count, load_async = engine.scheduler.get_num_new_matched_tokens(req, cached * 16)
    assert (count, load_async) == (len(PROMPT) - cached * 16, True)
    # Prefix-cache hits carry a hash; the newly allocated blocks do not.
    blocks = [KVCacheBlock(b, block_hash=b"h" if i < cached else None) for i, b in enumerate(local_blocks)]
    engine.scheduler.update_state_after_alloc(req, KVCacheBlocks((blocks,)), count)
    assert req.kv_transfer_params["do_remote_prefill"] is False, "one pull per request"
    return req


def step_until(engine, done, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "no outcome within the deadline"
        engine.step()
        time.sleep(0.005)


def test_prefill_and_decode_processes_move_a_prompts_kv_and_free_the_prefill_blocks():
    port_p, port_d = free_port(), free_port()
    prefill = start_prefill(port_p)
    try:
        params = json.loads(prefill.stdout.readline())
        # The shape pd-sidecar and vLLM's NixlConnector exchange.
        assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
        assert params["remote_block_ids"] == [PREFILL_BLOCKS]
        assert params["remote_engine_id"] == "prefill-engine"
        assert params["remote_request_id"] == "cmpl-prefill-1"
        assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1", port_p)
        assert params["tp_size"] == 1 and params["remote_num_tokens"] == len(PROMPT)

        engine = decode_engine(port_d)
        local = [3, 7, 8, 20, 21, 5]
        schedule_remote_prefill(engine, params, local)
        step_until(engine, lambda: "cmpl-decode-1" in engine.finished_recving)
        assert engine.load_errors == set()
        for layer, t in enumerate(engine.caches.values()):
            for i, b in enumerate(local):
                assert t.block(b) == kv_bytes(PROMPT, layer, i, t.block_len), (layer, i)
            assert not any(t.block(0)), "a block nobody pulled into was written"
        assert prefill.stdout.readline().strip() == "sent cmpl-prefill-1"
        assert prefill.wait(timeout=30) == 0
        # On the decode side the finished request frees its blocks at once.
        req = Request("cmpl-decode-1", PROMPT, kv_transfer_params=dict(params, do_remote_prefill=False),
                      status=RequestStatus.FINISHED_STOPPED)
        assert engine.scheduler.request_finished(req, [local]) == (False, None)
        engine.worker.shutdown()
    finally:
        prefill.kill()


def test_prefix_cache_hits_pull_only_the_missing_tail_and_a_full_hit_only_notifies():
    port_p, port_d = free_port(), free_port()
    prefill = start_prefill(port_p)
    try:
        params = json.loads(prefill.stdout.readline())
        engine = decode_engine(port_d)
        # The first two blocks are in the decode engine's prefix cache.
        local = [12, 13, 14, 15, 16, 17]
        schedule_remote_prefill(engine, params, local, cached=2)
        step_until(engine, lambda: "cmpl-decode-1" in engine.finished_recving)
        for layer, t in enumerate(engine.caches.values()):
            assert not any(t.block(12)) and not any(t.block(13)), "cache hits were overwritten"
            for i in range(2, 6):
                assert t.block(local[i]) == kv_bytes(PROMPT, layer, i, t.block_len)
        assert prefill.stdout.readline().strip() == "sent cmpl-prefill-1"
        engine.worker.shutdown()
    finally:
        prefill.kill()

    # Everything cached: no bytes move, the prefill engine is still told to free its blocks.
    prefill = start_prefill(port_p)
    try:
        params = json.loads(prefill.stdout.readline())
        engine = decode_engine(free_port())
        req = Request("cmpl-decode-2", PROMPT, kv_transfer_params=dict(params, do_remote_prefill=True))
        engine.scheduler.update_state_after_alloc(req, KVCacheBlocks(([KVCacheBlock(1, b"h")],)), 0)
        step_until(engine, lambda: "cmpl-decode-2" in engine.finished_recving)
        assert prefill.stdout.readline().strip() == "sent cmpl-prefill-1"
        engine.worker.shutdown()
    finally:
        prefill.kill()


def failed_pull(engine, params, local=(3, 4, 5, 6, 7, 8), req_id="cmpl-decode-x", timeout=30.0):
    started = time.monotonic()
    schedule_remote_prefill(engine, params, list(local), req_id=req_id)
    step_until(engine, lambda: req_id in engine.finished_recving, timeout=timeout)
    assert engine.load_errors == set(local), "vLLM must be told which blocks to recompute"
    engine.load_errors.clear()
    return time.monotonic() - started


PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [PREFILL_BLOCKS],
          "remote_engine_id": "gone", "remote_request_id": "cmpl-gone", "remote_host": "127.0.0.1",
          "tp_size": 1}


def test_a_prefill_that_is_gone_is_a_failed_load_not_a_hang():
    engine = decode_engine(free_port(), transfer_timeout_s=5)
    elapsed = failed_pull(engine, dict(PARAMS, remote_port=free_port()))
    assert elapsed < 15
    engine.worker.shutdown()


def test_a_prefill_that_accepts_and_never_answers_times_out():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        engine = decode_engine(free_port(), transfer_timeout_s=2)
        elapsed = failed_pull(engine, dict(PARAMS, remote_port=silent.getsockname()[1]))
        assert elapsed < 15
        engine.worker.shutdown()
    finally:
        stop.set()
        t.join()
        silent.close()


def test_bad_block_ids_and_unsupported_shapes_fail_the_load():
    port_p = free_port()
    prefill = start_prefill(port_p)
    try:
        params = json.loads(prefill.stdout.readline())
        engine = decode_engine(free_port())
        # The prefill engine's pool has 32 blocks: block 999 is no block of it.
        failed_pull(engine, dict(params, remote_block_ids=[[999, 1, 2, 3, 4, 5]]), req_id="bad-ids")
        # More blocks to fill than the prefill names.
        failed_pull(engine, dict(params, remote_block_ids=[[1, 2]]), req_id="too-few")
        # Two KV-cache groups (hybrid models): not moved by this connector.
        failed_pull(engine, dict(params, remote_block_ids=[[1], [2]]), req_id="two-groups")
        # The good request still goes through afterwards.
        schedule_remote_prefill(engine, params, [3, 7, 8, 20, 21, 5])
        step_until(engine, lambda: "cmpl-decode-1" in engine.finished_recving)
        assert engine.load_errors == set()
        assert prefill.stdout.readline().strip() == "sent cmpl-prefill-1"
        engine.worker.shutdown()
    finally:
        prefill.kill()


def test_one_prefill_rank_missing_fails_the_whole_load():
    # The prefill says TP 2; rank 0 answers and is pulled from, rank 1 is not there. The
    # request is recomputed whole (after rank 0's pull ended, so nothing writes into its
    # blocks while vLLM recomputes them).
    port_p = free_port()
    prefill = start_prefill(port_p)
    try:
        params = json.loads(prefill.stdout.readline())
        engine = decode_engine(free_port())
        failed_pull(engine, dict(params, tp_size=2), req_id="rank-gone")
        # Rank 0 was read, and told so.
        assert prefill.stdout.readline().strip() == "sent cmpl-prefill-1"
        engine.worker.shutdown()
    finally:
        prefill.kill()


def test_scheduler_side_answers_like_nixl_for_the_other_cases():
    cfg = vllm_config("e", "kv_both", port=free_port())
    sched = TandemConnector(cfg, KVConnectorRole.SCHEDULER, None)
    # No params, or a plain request: nothing external.
    assert sched.get_num_new_matched_tokens(Request("a", PROMPT), 0) == (0, False)
    assert sched.request_finished(Request("a", PROMPT), [[1]]) == (False, None)
    # An aborted prefill keeps nothing back.
    req = Request("p", PROMPT, kv_transfer_params={"do_remote_decode": True},
                  status=RequestStatus.FINISHED_ABORTED)
    assert sched.request_finished(req, [[1, 2]]) == (False, None)
    # A prefill without blocks has nothing to send.
    req.status = RequestStatus.FINISHED_STOPPED
    delay, params = sched.request_finished(req, [[]])
    assert delay is False and params["remote_block_ids"] == [[]] and params["remote_num_tokens"] == 0
    # A decode request aborted before it was scheduled still frees the prefill's blocks.
    req = Request("d", PROMPT, kv_transfer_params=dict(PARAMS, remote_port=1))
    assert sched.request_finished(req, [[]]) == (False, None)
    meta = sched.build_connector_meta(None)
    assert meta.reqs_to_recv["d"].local_block_ids == [] and meta.reqs_to_recv["d"].remote_port == 1
    assert TandemConnector.get_required_kvcache_layout(cfg) == "HND"


def test_register_refuses_what_it_cannot_move():
    cfg = vllm_config("e", "kv_both", port=free_port())
    worker = TandemConnector(cfg, KVConnectorRole.WORKER, None)
    caches = kv_caches(layers=2)
    odd = kv_caches(layers=1, num_blocks=8)
    with pytest.raises(ValueError, match="differs"):
        worker.register_kv_caches({**caches, "other": next(iter(odd.values()))})
    with pytest.raises(ValueError, match="no KV caches"):
        worker.register_kv_caches({})
