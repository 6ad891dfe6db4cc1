"""TandemConnector's stats through vLLM's KV-connector stats pipeline: what a worker hands vLLM
after a real pull (and a failed one), how vLLM aggregates TP workers' stats and logs them, and
the Prometheus series they become, exposed by the real prometheus_client."""

import os
import pickle
import sys
import time
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from conftest import ROOT, TARGET, free_port

sys.path.insert(0, str(ROOT / "python"))
os.environ.setdefault("TANDEM_KV_LIB", str(TARGET / "libtandem_kv.so"))

from tandem_kv.vllm import TandemConnector  # noqa: E402
from vllm_standins import (  # noqa: E402
    KVCacheBlock, KVCacheBlocks, Request, RequestStatus, free_ports, rank_engines,
)

PROMPT = list(range(100, 100 + 16 * 3))


def step_until(engines, done, timeout=30.0):
    end = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < end, "no outcome within the deadline"
        for e in engines:
            e.step()
        time.sleep(0.005)


def pulled_once():
    """A prefill and a decode engine (TP 1) after one real pull of three blocks."""
    prefill = rank_engines("stats-p", "kv_producer", 1, free_ports(1), 2)[0]
    decode = rank_engines("stats-d", "kv_consumer", 1, free_ports(1), 2)[0]
    req = Request("cmpl-s", PROMPT, kv_transfer_params={"do_remote_decode": True})
    prefill.scheduler.update_state_after_alloc(req, KVCacheBlocks(([KVCacheBlock(b) for b in (4, 5, 6)],)), 0)
    req.num_computed_tokens, req.status = len(PROMPT), RequestStatus.FINISHED_STOPPED
    _, params = prefill.scheduler.request_finished(req, [[4, 5, 6]])
    prefill.step()
    d = Request("cmpl-s-d", PROMPT, kv_transfer_params=dict(params, do_remote_prefill=True))
    count, _ = decode.scheduler.get_num_new_matched_tokens(d, 0)
    decode.scheduler.update_state_after_alloc(d, KVCacheBlocks(([KVCacheBlock(b) for b in (1, 2, 3)],)), count)
    step_until([decode, prefill], lambda: "cmpl-s-d" in decode.finished_recving
               and "cmpl-s" in prefill.finished_sending)
    return prefill, decode


def test_a_pull_is_reported_once_to_vllm_and_aggregates_over_workers():
    prefill, decode = pulled_once()
    try:
        block_bytes = sum(t.block_len for t in decode.caches.values())
        stats = decode.worker.get_kv_connector_stats()
        assert stats is not None and stats.num_successful_transfers == 1
        assert stats.data["bytes_transferred"] == [3 * block_bytes]
        assert 0 < stats.data["transfer_duration"][0] < 30
        assert stats.data["num_failed_transfers"] == []
        # Handed out once: the next step has nothing new.
        assert decode.worker.get_kv_connector_stats() is None
        # The scheduler side reports nothing of its own; the prefill worker moved nothing.
        assert decode.scheduler.get_kv_connector_stats() is None
        assert prefill.worker.get_kv_connector_stats() is None
        # From worker to scheduler the stats are pickled; vLLM rebuilds them from `data`
        # and folds TP workers' together.
        other = TandemConnector.build_kv_connector_stats(pickle.loads(pickle.dumps(stats)).data)
        both = TandemConnector.build_kv_connector_stats().aggregate(stats).aggregate(other)
        summary = both.reduce()
        assert summary["Num successful transfers"] == 2
        assert summary["Avg MB per transfer"] == round(3 * block_bytes / 2**20, 3)
        assert summary["Num failed transfers"] == 0
        assert summary["P90 xfer time (ms)"] > 0
    finally:
        decode.worker.shutdown()
        prefill.worker.shutdown()


def test_prometheus_series_as_vllm_registers_them():
    prefill, decode = pulled_once()
    try:
        stats = decode.worker.get_kv_connector_stats()
    finally:
        decode.worker.shutdown()
        prefill.worker.shutdown()
    # A failed pull (nobody at the prefill's address) is counted as such.
    gone = rank_engines("stats-x", "kv_consumer", 1, free_ports(1), 2, transfer_timeout_s=5)[0]
    params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[1, 2]],
              "remote_engine_id": "gone", "remote_request_id": "cmpl-gone",
              "remote_host": "127.0.0.1", "remote_port": free_port(), "tp_size": 1}
    req = Request("cmpl-x", PROMPT[:32], kv_transfer_params=params)
    count, _ = gone.scheduler.get_num_new_matched_tokens(req, 0)
    gone.scheduler.update_state_after_alloc(req, KVCacheBlocks(([KVCacheBlock(7), KVCacheBlock(8)],)), count)
    step_until([gone], lambda: "cmpl-x" in gone.finished_recving)
    failed = gone.worker.get_kv_connector_stats()
    gone.worker.shutdown()
    assert failed.data["num_failed_transfers"] == [1] and failed.num_successful_transfers == 0
    assert not failed.is_empty(), "an interval of only failures is still reported"

    # vLLM hands build_prom_metrics its metric classes; here prometheus_client's, bound to a
    # registry of this test's own.
    registry = CollectorRegistry()

    def bound(cls):
        return lambda **kw: cls(registry=registry, **kw)

    types = {Gauge: bound(Gauge), Counter: bound(Counter), Histogram: bound(Histogram)}
    cfg = SimpleNamespace(kv_transfer_config=SimpleNamespace())
    prom = TandemConnector.build_prom_metrics(cfg, types, ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe(stats.data, 0)
    prom.observe(failed.data, 0)
    text = generate_latest(registry).decode()
    labels = '{engine="0",model_name="m"}'
    assert f"vllm:tandem_kv_xfer_time_seconds_count{labels} 1.0" in text, text
    assert f"vllm:tandem_kv_bytes_transferred_sum{labels} {float(stats.data['bytes_transferred'][0])}" in text
    assert f"vllm:tandem_kv_num_failed_transfers_total{labels} 1.0" in text
    assert f"vllm:tandem_kv_num_kv_expired_reqs_total{labels} 0.0" in text
    assert 'vllm:tandem_kv_xfer_time_seconds_bucket{engine="0",le="0.0001",model_name="m"}' in text


def test_a_hold_nobody_pulled_is_counted_as_expired_on_the_prefill_side():
    prefill = rank_engines("stats-e", "kv_producer", 1, free_ports(1), 2, hold_timeout_s=0.2)[0]
    try:
        req = Request("cmpl-e", PROMPT, kv_transfer_params={"do_remote_decode": True})
        prefill.scheduler.update_state_after_alloc(req, KVCacheBlocks(([KVCacheBlock(9)],)), 0)
        req.num_computed_tokens, req.status = len(PROMPT), RequestStatus.FINISHED_STOPPED
        prefill.scheduler.request_finished(req, [[9]])
        step_until([prefill], lambda: "cmpl-e" in prefill.finished_sending)
        stats = prefill.worker.get_kv_connector_stats()
        assert stats.data["num_kv_expired_reqs"] == [1]
        assert stats.reduce()["Num expired holds"] == 1
    finally:
        prefill.worker.shutdown()
