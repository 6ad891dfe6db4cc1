"""vLLM's connector base types, or stand-ins when vLLM is not installed.

With vLLM (0.26 and later) these are vLLM's own classes. Without it (CI runs the connector
against plain stand-ins of vLLM's inputs) the same names are defined here, with the
behaviour vLLM 0.26's `KVConnectorBase_V1` gives them: the constructor's arguments and
checks, the metadata binding, and the role.
"""

from __future__ import annotations

import enum

try:  # pragma: no cover - exercised on the GPU machine, where vLLM is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

    class KVConnectorRole(enum.Enum):  # type: ignore[no-redef]
        SCHEDULER = 0
        WORKER = 1

    class KVConnectorMetadata:  # type: ignore[no-redef]
        """Scheduler -> worker, once per step; must pickle."""

    class KVConnectorBase_V1:  # type: ignore[no-redef]
        def __init__(self, vllm_config, role, kv_cache_config):
            self._connector_metadata = None
            self._vllm_config = vllm_config
            if vllm_config.kv_transfer_config is None:
                raise ValueError("kv_transfer_config must be set for KVConnectorBase_V1")
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._kv_cache_config = kv_cache_config
            self._role = role

        @property
        def role(self):
            return self._role

        def bind_connector_metadata(self, connector_metadata) -> None:
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self) -> None:
            self._connector_metadata = None

        def _get_connector_metadata(self):
            assert self._connector_metadata is not None
            return self._connector_metadata

        def has_connector_metadata(self) -> bool:
            return self._connector_metadata is not None


try:  # pragma: no cover - with vLLM, its own stats and Prometheus base classes
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (  # type: ignore
        KVConnectorPromMetrics,
        KVConnectorStats,
    )
    from prometheus_client import Counter, Gauge, Histogram  # type: ignore
except ImportError:
    from dataclasses import dataclass, field
    from typing import Any

    try:  # the keys vLLM's metric_types dict uses
        from prometheus_client import Counter, Gauge, Histogram  # type: ignore
    except ImportError:
        class Gauge:  # type: ignore[no-redef]
            pass

        class Counter:  # type: ignore[no-redef]
            pass

        class Histogram:  # type: ignore[no-redef]
            pass

    @dataclass
    class KVConnectorStats:  # type: ignore[no-redef]
        """As vLLM 0.26's: a picklable `data` dict; subclasses aggregate and reduce it."""

        data: dict[str, Any] = field(default_factory=dict)

    class KVConnectorPromMetrics:  # type: ignore[no-redef]
        """As vLLM 0.26's: the metric classes to create, by kind, and the engines' labels."""

        def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._gauge_cls = metric_types[Gauge]
            self._counter_cls = metric_types[Counter]
            self._histogram_cls = metric_types[Histogram]
            self._labelnames = labelnames
            self.per_engine_labelvalues = per_engine_labelvalues


def tensor_parallel_rank(vllm_config) -> int:
    """This worker's TP rank: vLLM's parallel state when it is set up, else the config's."""
    if HAVE_VLLM:  # pragma: no cover
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            return int(get_tensor_model_parallel_rank())
        except Exception:
            pass
    return int(getattr(vllm_config.parallel_config, "rank", 0) or 0)
