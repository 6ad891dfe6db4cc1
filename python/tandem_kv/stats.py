"""TandemConnector's transfer stats in vLLM's KV-connector stats pipeline.

Each step a worker has something to report, `get_kv_connector_stats` hands vLLM a
`TandemKVConnectorStats` (plain lists, so it pickles from worker to scheduler). vLLM
aggregates them over the TP workers, logs a `KV Transfer metrics: ...` line every logging
interval (`reduce`), and records them in Prometheus through `TandemPromMetrics`, named as
NixlConnector's with `tandem_kv` for `nixl` so that a dashboard switches by name:

  vllm:tandem_kv_xfer_time_seconds      histogram, a pull from start to landed (the agent's time)
  vllm:tandem_kv_post_time_seconds      histogram, of which planning and posting the copies
  vllm:tandem_kv_bytes_transferred      histogram, bytes per pull
  vllm:tandem_kv_num_descriptors        histogram, copies per pull (block units for a block list)
  vllm:tandem_kv_num_failed_transfers   counter, pulls that failed (the request was recomputed)
  vllm:tandem_kv_num_kv_expired_reqs    counter, prefill holds freed by the hold timeout
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ._vllm_compat import KVConnectorPromMetrics, KVConnectorStats

_LISTS = ("transfer_duration", "post_duration", "bytes_transferred", "num_descriptors")
_COUNTS = ("num_failed_transfers", "num_kv_expired_reqs")


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class TandemKVConnectorStats(KVConnectorStats):
    """One interval's pulls and failures, as lists vLLM can pickle and concatenate."""

    def __post_init__(self):
        if not self.data:
            self.reset()

    def reset(self):
        self.data: dict[str, list] = {k: [] for k in _LISTS + _COUNTS}

    def record_transfer(self, result) -> None:
        """A finished pull (`tandem_kv.agent.TransferResult`)."""
        self.data["transfer_duration"].append(result.elapsed_s)
        self.data["post_duration"].append(result.plan_s + result.submit_s)
        self.data["bytes_transferred"].append(result.bytes)
        self.data["num_descriptors"].append(result.descriptors)

    def record_failed_transfer(self) -> None:
        self.data["num_failed_transfers"].append(1)

    def record_kv_expired_req(self) -> None:
        self.data["num_kv_expired_reqs"].append(1)

    def clone_and_reset(self) -> "TandemKVConnectorStats":
        old = copy.copy(self)
        self.reset()
        return old

    @property
    def num_successful_transfers(self) -> int:
        return len(self.data["transfer_duration"])

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in _LISTS + _COUNTS)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if not other.is_empty():
            for k, v in other.data.items():
                self.data.setdefault(k, []).extend(v)
        return self

    def reduce(self) -> dict[str, int | float]:
        """The interval's summary for vLLM's log line."""
        xfer = [float(x) for x in self.data["transfer_duration"]]
        post = [float(x) for x in self.data["post_duration"]]
        mb = [b / 2**20 for b in self.data["bytes_transferred"]]
        descs = self.data["num_descriptors"]
        n = len(xfer)
        out: dict[str, int | float] = {
            "Num successful transfers": n,
            "Num failed transfers": sum(self.data["num_failed_transfers"]),
            "Num expired holds": sum(self.data["num_kv_expired_reqs"]),
        }
        if n == 0:
            return out
        seconds = sum(xfer)
        out.update({
            "Avg xfer time (ms)": round(seconds / n * 1e3, 3),
            "P90 xfer time (ms)": round(_percentile(xfer, 90) * 1e3, 3),
            "Avg post time (ms)": round(sum(post) / n * 1e3, 3),
            "Avg MB per transfer": round(sum(mb) / n, 3),
            "Throughput (MB/s)": round(sum(mb) / seconds, 3) if seconds > 0 else 0.0,
            "Avg number of descriptors": round(sum(descs) / n, 1),
        })
        return out


def _per_engine(metric, per_engine_labelvalues: dict[int, list[object]]) -> dict[int, Any]:
    """One labelled child of `metric` per engine index."""
    return {idx: metric.labels(*values) for idx, values in per_engine_labelvalues.items()}


class TandemPromMetrics(KVConnectorPromMetrics):
    """The Prometheus series of TandemKVConnectorStats, one child per engine."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        # Sub-millisecond buckets: a pull on one node lands in tens to hundreds of microseconds.
        seconds = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 5.0]

        def hist(name, doc, buckets):
            m = self._histogram_cls(name=name, documentation=doc, buckets=buckets,
                                    labelnames=labelnames)
            return _per_engine(m, per_engine_labelvalues)

        def counter(name, doc):
            m = self._counter_cls(name=name, documentation=doc, labelnames=labelnames)
            return _per_engine(m, per_engine_labelvalues)

        self._hists = {
            "transfer_duration": hist(
                "vllm:tandem_kv_xfer_time_seconds",
                "Histogram of KV pull time through TandemConnector (start to landed).", seconds),
            "post_duration": hist(
                "vllm:tandem_kv_post_time_seconds",
                "Histogram of the time TandemConnector pulls spent planning and posting copies.",
                seconds),
            "bytes_transferred": hist(
                "vllm:tandem_kv_bytes_transferred",
                "Histogram of bytes per TandemConnector KV pull.",
                [2 ** (10 + i) for i in range(1, 25, 2)]),
            "num_descriptors": hist(
                "vllm:tandem_kv_num_descriptors",
                "Histogram of copies per TandemConnector KV pull.",
                [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384, 65536]),
        }
        self._counters = {
            "num_failed_transfers": counter(
                "vllm:tandem_kv_num_failed_transfers",
                "Number of failed TandemConnector KV pulls (the requests were recomputed)."),
            "num_kv_expired_reqs": counter(
                "vllm:tandem_kv_num_kv_expired_reqs",
                "Number of requests whose held KV blocks expired unpulled "
                "(tracked on the prefill instance)."),
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        for key, per_engine in self._hists.items():
            for value in transfer_stats_data.get(key, ()):
                per_engine[engine_idx].observe(value)
        for key, per_engine in self._counters.items():
            for value in transfer_stats_data.get(key, ()):
                per_engine[engine_idx].inc(value)
