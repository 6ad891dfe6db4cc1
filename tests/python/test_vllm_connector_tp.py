"""TandemConnector between a prefill engine and a decode engine of different TP sizes: every
rank a worker-side connector with its own agent (vLLM runs one per GPU), both engines stepped
in vLLM's order in this process. Each rank's cache holds only its shard of the KV heads, as
vLLM shards them; after the pulls every decode rank must hold exactly its heads of the
prompt's KV, and every prefill rank must have been told (vLLM's notification count) that it
may free its blocks."""

import os
import sys
import time

import pytest

from conftest import ROOT, TARGET

sys.path.insert(0, str(ROOT / "python"))
os.environ.setdefault("TANDEM_KV_LIB", str(TARGET / "libtandem_kv.so"))

from tandem_kv.vllm import _sources  # noqa: E402
from vllm_standins import (  # noqa: E402
    Engine, KVCacheBlock, KVCacheBlocks, Request, RequestStatus, free_ports, rank_engines,
)

LAYERS, BLOCK, HEAD_DIM, KV_HEADS = 2, 16, 8, 4
PROMPT = list(range(500, 500 + BLOCK * 3 + 5))  # three full blocks and a partial one


def head_bytes(layer: int, prompt_block: int, head: int) -> bytes:
    """One head's content of one block of the prompt (tokens x K|V), as the forward pass wrote it."""
    n = BLOCK * 2 * HEAD_DIM * 2
    return bytes((layer * 97 + prompt_block * 41 + head * 13 + i * 5) & 0xFF for i in range(n))


def heads_of(rank: int, tp: int) -> range:
    per = max(1, KV_HEADS // tp)
    first = rank * per if KV_HEADS >= tp else rank * KV_HEADS // tp
    return range(first, first + per)


def engines(name: str, role: str, tp: int, base: int) -> list[Engine]:
    return rank_engines(name, role, tp, base, KV_HEADS, layers=LAYERS, head_dim=HEAD_DIM)


@pytest.mark.parametrize("p_tp,d_tp", [(1, 2), (2, 1), (1, 4), (4, 2), (2, 4), (2, 8), (8, 2)])
def test_each_decode_rank_gets_its_heads_from_prefill_ranks_of_another_tp_size(p_tp, d_tp):
    prefill = engines("prefill-tp", "kv_producer", p_tp, free_ports(p_tp))
    decode = engines("decode-tp", "kv_consumer", d_tp, free_ports(d_tp))
    try:
        p_blocks, d_blocks = [7, 2, 11, 5], [3, 9, 4, 12]
        # Prefill: every rank computed its heads of the prompt; the scheduler (rank 0's, as in
        # vLLM, one scheduler per engine) finishes the request and names the blocks.
        params = None
        for rank, e in enumerate(prefill):
            req = Request("cmpl-p", PROMPT, kv_transfer_params={"do_remote_decode": True})
            e.scheduler.update_state_after_alloc(req, KVCacheBlocks(([KVCacheBlock(b) for b in p_blocks],)), 0)
            e.step()
            for layer, t in enumerate(e.caches.values()):
                for i, b in enumerate(p_blocks):
                    t.write_block(b, b"".join(head_bytes(layer, i, h) for h in heads_of(rank, p_tp)))
            req.num_computed_tokens, req.status = len(PROMPT), RequestStatus.FINISHED_LENGTH_CAPPED
            delay, params = e.scheduler.request_finished(req, [p_blocks])
            assert delay is True
            e.step()  # the worker now holds the blocks for the puller
        assert params["tp_size"] == p_tp
        # Decode: every rank's worker gets the same metadata from the one scheduler.
        for e in decode:
            req = Request("cmpl-d", PROMPT, kv_transfer_params=dict(params, do_remote_prefill=True))
            count, _ = e.scheduler.get_num_new_matched_tokens(req, 0)
            e.scheduler.update_state_after_alloc(req, KVCacheBlocks(([KVCacheBlock(b) for b in d_blocks],)), count)
        end = time.monotonic() + 30.0
        while not (all("cmpl-d" in e.finished_recving for e in decode)
                   and all("cmpl-p" in e.finished_sending for e in prefill)):
            assert time.monotonic() < end, (
                [e.finished_recving for e in decode], [e.finished_sending for e in prefill])
            for e in decode + prefill:
                e.step()
            time.sleep(0.005)
        for rank, e in enumerate(decode):
            assert e.load_errors == set(), rank
            for layer, t in enumerate(e.caches.values()):
                for i, b in enumerate(d_blocks):
                    want = b"".join(head_bytes(layer, i, h) for h in heads_of(rank, d_tp))
                    assert t.block(b) == want, (rank, layer, i)
                assert not any(t.block(0)), "a block nobody pulled into was written"
    finally:
        for e in decode + prefill:
            e.worker.shutdown()


def test_the_rank_mapping_is_vllms():
    # Decode TP larger: one prefill rank each, D/P decode ranks per prefill rank.
    assert [_sources(r, 4, 2, 8) for r in range(4)] == [([0], []), ([0], []), ([1], []), ([1], [])]
    # Decode TP smaller: P/D prefill ranks each.
    assert [_sources(r, 2, 4, 8) for r in range(2)] == [([0, 1], []), ([2, 3], [])]
    # Prefill ranks holding replicas of a head already read are only notified.
    assert _sources(0, 1, 4, 2) == ([0, 2], [1, 3])
    with pytest.raises(ValueError, match="not a multiple"):
        _sources(0, 3, 2, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        _sources(0, 2, 3, 6)
