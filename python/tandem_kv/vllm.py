"""`TandemConnector`: a vLLM v1 KV connector that moves KV blocks with Tandem's agent.

Load it with

    --kv-transfer-config '{"kv_connector": "TandemConnector",
                           "kv_connector_module_path": "tandem_kv.vllm",
                           "kv_role": "kv_producer" | "kv_consumer" | "kv_both"}'

It speaks the protocol vLLM's NixlConnector speaks, so pd-sidecar, llm-d's sidecar and vLLM's
toy proxy drive it unchanged: a prefill engine gets `kv_transfer_params: {"do_remote_decode":
true}`, finishes with one token and answers `kv_transfer_params` naming its blocks
(`remote_block_ids`, one list per KV-cache group), its engine, request id and agent
endpoint (`remote_host`, `remote_port`), its `tp_size`; the decode engine, given those
params with `do_remote_prefill: true`, pulls the blocks into its own before it computes
the last prompt token, and notifies the prefill engine (`"<request id>:<n>"`), which frees
them.

Where NixlConnector posts one descriptor per block and layer from Python, every worker here
hands the whole request's block ids to `libtandem_kv` (one call), which plans and moves them:
cuda-ipc between GPUs of one host, NIXL across hosts, TCP where neither is available.

Scheduler side (one per engine): `get_num_new_matched_tokens`, `update_state_after_alloc`,
`build_connector_meta`, `request_finished`. Worker side (one per TP rank, each with its own
agent on port `port + dp_index * tp_size + tp_rank`): `register_kv_caches`, `start_load_kv`,
`get_finished`, `get_block_ids_with_load_errors`. The per-layer hooks are no-ops: a request's
KV arrives whole before it is scheduled again, as with NixlConnector.

`kv_connector_extra_config` keys (environment variable in brackets):
  backend      auto | cuda-ipc | nixl | tcp                       [TANDEM_KV_BACKEND] auto
  host         address the agents bind and advertise              [TANDEM_KV_HOST]
               (else VLLM_NIXL_SIDE_CHANNEL_HOST, else 127.0.0.1)
  port         rank 0's agent port                                [TANDEM_KV_PORT] 5700
  hold_timeout_s      prefill blocks are freed after this long without a pull   480
  transfer_timeout_s  deadline of one pull                                        30
  finish_wait_us      how long get_finished waits, in the step that started them,  300
               for new pulls to land (spent stepping them on vLLM's thread: a
               small pull then finishes in the step it started, not one later)
  stats_file   append one JSON line per finished pull             [TANDEM_KV_STATS_FILE]

Pulls, failures and expired holds also go to vLLM's KV-connector stats (`stats.py`): its
`KV Transfer metrics` log line and the `vllm:tandem_kv_*` Prometheus series.

Prefill and decode TP sizes may differ when one divides the other, mapped as vLLM's
NixlConnector maps them: a decode rank of a larger TP reads its heads' slice of prefill rank
`rank * P // D`; a decode rank of a smaller TP reads prefill ranks `rank * P/D ..` whole, each
into its heads' slot of the local blocks (one pull per prefill rank; a rank holding only a
replica of a head already read is notified, not read). Notifications carry the decode TP size
(`<request>:<D>`), and a prefill rank frees its blocks after `D / P` of them when D > P, as
vLLM counts. Sizes that do not divide fail the request's load (vLLM recomputes it), with an
error naming both.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ._vllm_compat import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    tensor_parallel_rank,
)
from .stats import TandemKVConnectorStats, TandemPromMetrics

logger = logging.getLogger("tandem_kv.vllm")

_REMOTE_KEYS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port")
_FINISHED_OK = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")


@dataclass
class RecvRequest:
    """One pull a worker must start: the prefill's blocks into ours."""

    local_block_ids: list[int]
    remote_block_ids: list[int]
    remote_engine_id: str
    remote_request_id: str
    remote_host: str
    remote_port: int
    remote_tp_size: int
    # Why the pull cannot be made (then the worker reports it failed: vLLM recomputes).
    error: Optional[str] = None


@dataclass
class TandemConnectorMetadata(KVConnectorMetadata):
    reqs_to_recv: dict[str, RecvRequest] = field(default_factory=dict)
    # Prefill side: requests whose blocks wait for their puller, with the block ids.
    reqs_to_send: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class _Settings:
    engine_id: str
    backend: str
    host: str
    port: int
    hold_timeout_s: float
    transfer_timeout_s: float
    finish_wait_us: int
    stats_file: Optional[str]
    tp_size: int
    dp_index: int
    # The model's KV heads over all ranks (None: this rank's heads * tp_size).
    total_kv_heads: Optional[int] = None


def _settings(vllm_config) -> _Settings:
    kv = vllm_config.kv_transfer_config
    extra = dict(getattr(kv, "kv_connector_extra_config", None) or {})

    def pick(key, env, default):
        if key in extra and extra[key] not in (None, ""):
            return extra[key]
        if env and os.environ.get(env):
            return os.environ[env]
        return default

    parallel = vllm_config.parallel_config
    host = pick("host", "TANDEM_KV_HOST", os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST") or "127.0.0.1")
    return _Settings(
        engine_id=str(kv.engine_id),
        backend=str(pick("backend", "TANDEM_KV_BACKEND", "auto")),
        host=str(host),
        port=int(pick("port", "TANDEM_KV_PORT", 5700)),
        hold_timeout_s=float(pick("hold_timeout_s", None, 480.0)),
        transfer_timeout_s=float(pick("transfer_timeout_s", None, 30.0)),
        finish_wait_us=max(0, int(pick("finish_wait_us", "TANDEM_KV_FINISH_WAIT_US", 300))),
        stats_file=pick("stats_file", "TANDEM_KV_STATS_FILE", None),
        tp_size=int(getattr(parallel, "tensor_parallel_size", 1) or 1),
        dp_index=int(getattr(parallel, "data_parallel_index", 0) or 0),
        total_kv_heads=_total_kv_heads(vllm_config),
    )


def _total_kv_heads(vllm_config) -> Optional[int]:
    model = getattr(vllm_config, "model_config", None)
    try:
        return int(model.get_total_num_kv_heads()) if model is not None else None
    except Exception:  # a model config without it: derive from the cache shape
        return None


def _flat_blocks(ids) -> list[int]:
    """vLLM 0.26 sends one list per KV-cache group; older vLLM one flat list."""
    ids = list(ids or [])
    if ids and isinstance(ids[0], (list, tuple)):
        if len(ids) != 1:
            raise ValueError(f"{len(ids)} KV-cache groups: TandemConnector moves one")
        ids = list(ids[0])
    return [int(b) for b in ids]


def _status_name(request) -> str:
    status = getattr(request, "status", None)
    return getattr(status, "name", str(status))


class TandemConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._cfg = _settings(vllm_config)
        if role == KVConnectorRole.SCHEDULER:
            self._sched: Optional[_Scheduler] = _Scheduler(self._cfg)
            self._worker: Optional[_Worker] = None
        else:
            self._sched = None
            self._worker = _Worker(self._cfg, tensor_parallel_rank(vllm_config))

    # ---- stats (vLLM's KV-connector stats pipeline: log line and Prometheus) ----
    def get_kv_connector_stats(self):
        return self._worker.take_stats() if self._worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: Optional[dict] = None):
        return TandemKVConnectorStats(data=data) if data is not None else TandemKVConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return TandemPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> Optional[str]:
        # Heads outermost inside a block: a block is one range per layer.
        return "HND"

    # ---- scheduler side ----
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> TandemConnectorMetadata:
        return self._sched.build_connector_meta()

    def request_finished(self, request, block_ids) -> tuple[bool, Optional[dict[str, Any]]]:
        return self._sched.request_finished(request, block_ids)

    # ---- worker side ----
    def register_kv_caches(self, kv_caches: dict) -> None:
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        self._worker.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set) -> tuple[Optional[set], Optional[set]]:
        return self._worker.get_finished()

    def get_block_ids_with_load_errors(self) -> set:
        return self._worker.take_load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()


class _Scheduler:
    """What the scheduler process keeps between steps."""

    def __init__(self, cfg: _Settings):
        self.cfg = cfg
        self.need_recv: dict[str, tuple[dict, list[int]]] = {}
        self.need_send: dict[str, list[int]] = {}

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        params = request.kv_transfer_params
        if params and params.get("do_remote_prefill"):
            count = len(request.prompt_token_ids or []) - num_computed_tokens
            if count > 0:
                return count, True
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return
        if params.get("remote_block_ids") and all(k in params for k in _REMOTE_KEYS):
            # Newly allocated blocks only: prefix-cache hits are ours already. None at all
            # (a full hit) still notifies the prefill engine so that it frees its blocks.
            local = blocks.get_unhashed_block_ids() if num_external_tokens > 0 else []
            self.need_recv[request.request_id] = (dict(params), list(local))
        else:
            logger.warning("kv_transfer_params without the prefill's blocks or address: %s; "
                           "computing request %s locally", params, request.request_id)
        # One pull per request.
        params["do_remote_prefill"] = False

    def build_connector_meta(self) -> TandemConnectorMetadata:
        meta = TandemConnectorMetadata()
        for req_id, (params, local) in self.need_recv.items():
            error = None
            try:
                remote = _flat_blocks(params.get("remote_block_ids"))
            except ValueError as e:
                remote, error = [], str(e)
            if error is None and len(local) > len(remote):
                error = f"{len(local)} blocks to fill but the prefill names {len(remote)}"
            # The prefill may hold more blocks than we lack: ours are the last ones.
            remote = remote[len(remote) - len(local):] if local and error is None else []
            meta.reqs_to_recv[req_id] = RecvRequest(
                local_block_ids=list(local),
                remote_block_ids=remote,
                remote_engine_id=str(params["remote_engine_id"]),
                remote_request_id=str(params["remote_request_id"]),
                remote_host=str(params["remote_host"]),
                remote_port=int(params["remote_port"]),
                remote_tp_size=int(params.get("tp_size") or 1),
                error=error,
            )
        meta.reqs_to_send = dict(self.need_send)
        self.need_recv.clear()
        self.need_send.clear()
        return meta

    def request_finished(self, request, block_ids):
        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get("do_remote_prefill"):
            # Aborted before it was scheduled: notify the prefill engine all the same, so
            # that it frees the blocks it holds for us.
            if all(k in params for k in _REMOTE_KEYS):
                self.need_recv[request.request_id] = (dict(params), [])
            params["do_remote_prefill"] = False
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        if _status_name(request) not in _FINISHED_OK:
            return False, None
        blocks = _flat_blocks(block_ids)
        if blocks:
            self.need_send[request.request_id] = blocks
        return bool(blocks), {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [blocks],
            "remote_engine_id": self.cfg.engine_id,
            "remote_request_id": request.request_id,
            "remote_host": self.cfg.host,
            "remote_port": self.cfg.port + self.cfg.dp_index * self.cfg.tp_size,
            "tp_size": self.cfg.tp_size,
            "remote_num_tokens": int(getattr(request, "num_computed_tokens", 0)) if blocks else 0,
            "remote_blocks_expiry_time": None,
        }


def _layout_of(kv_caches: dict, tp_rank: int, tp_size: int,
               total_kv_heads: Optional[int] = None) -> tuple[dict, list[int]]:
    """The agent's layout and region bases for vLLM's per-layer caches: each logically
    `(num_blocks, kv_heads, block_size, 2 * head_dim)`, K and V of a token side by side in a
    head's content (vLLM 0.26; "packed"), HND in memory unless its strides say NHD. One region
    per layer, in the model's layer order."""
    seen: set[int] = set()
    bases: list[int] = []
    first = None
    for name, t in kv_caches.items():
        if isinstance(t, (list, tuple)):
            raise ValueError(f"layer {name}: a list of caches (Mamba) is not supported")
        ptr = int(t.data_ptr())
        if ptr in seen:
            continue
        seen.add(ptr)
        shape = tuple(int(d) for d in t.shape)
        if len(shape) != 4:
            raise ValueError(f"layer {name}: KV cache of shape {shape}; expected "
                             "(num_blocks, kv_heads, block_size, 2 * head_dim)")
        if first is None:
            first = (shape, t)
        elif shape != first[0]:
            raise ValueError(f"layer {name}: shape {shape} differs from {first[0]}")
        bases.append(ptr)
    if first is None:
        raise ValueError("no KV caches to register")
    (num_blocks, heads, block_size, twice_dim), t = first
    if twice_dim % 2:
        raise ValueError(f"last dimension {twice_dim} is not K and V of one head_dim")
    device = getattr(t, "device", None)
    on_gpu = getattr(device, "type", "cpu") == "cuda"
    mem = f"gpu:{device.index or 0}" if on_gpu else "host"
    elem = int(t.element_size())
    dtype = str(getattr(t, "dtype", "")).replace("torch.", "")
    if dtype not in ("bfloat16", "float16", "float32"):
        dtype = {1: "fp8", 2: "bf16", 4: "f32"}.get(elem, "")
    if not dtype:
        raise ValueError(f"element size {elem} is not a KV dtype the agent knows")
    # Heads outer (HND) unless the token dimension strides further (NHD).
    stride = t.stride() if hasattr(t, "stride") else None
    fmt = "nhd" if stride is not None and stride[2] > stride[1] else "hnd"
    layout = {
        "layers": len(bases),
        "kv_heads": int(total_kv_heads or heads * tp_size),
        "head_dim": twice_dim // 2,
        "dtype": dtype,
        "block_size": block_size,
        "num_blocks": num_blocks,
        "tp_rank": tp_rank,
        "tp_size": tp_size,
        "format": fmt,
        "regions": "packed",
        "mem": mem,
    }
    return layout, bases


def _heads_of(rank: int, tp_size: int, kv_heads: int) -> int:
    """The first KV head a rank holds, as vLLM shards them (replicas when heads < ranks)."""
    return rank * (kv_heads // tp_size) if kv_heads >= tp_size else rank * kv_heads // tp_size


def _sources(rank: int, local_tp: int, remote_tp: int, kv_heads: int) -> tuple[list[int], list[int]]:
    """The prefill ranks a decode rank reads, and those it only notifies (they hold a replica of
    a head it already reads): vLLM's NixlConnector mapping."""
    if local_tp >= remote_tp:
        if local_tp % remote_tp:
            raise ValueError(f"decode tp_size {local_tp} is not a multiple of prefill tp_size {remote_tp}")
        return [rank * remote_tp // local_tp], []
    if remote_tp % local_tp:
        raise ValueError(f"prefill tp_size {remote_tp} is not a multiple of decode tp_size {local_tp}")
    k = remote_tp // local_tp
    kv_heads = kv_heads if kv_heads > 0 else remote_tp  # unknown: assume no replicas
    read, skip, seen = [], [], set()
    for q in range(rank * k, (rank + 1) * k):
        head = _heads_of(q, remote_tp, kv_heads)
        (skip if head in seen else read).append(q)
        seen.add(head)
    return read, skip


@dataclass
class _Pull:
    """One request's pulls (one per prefill rank read) until all have ended."""

    handles: dict  # handle -> peer
    local: list[int]
    failed: bool = False


class _Worker:
    """One TP rank: its agent, the pulls it runs, the prefill blocks it holds."""

    def __init__(self, cfg: _Settings, tp_rank: int):
        self.cfg = cfg
        self.tp_rank = tp_rank
        self.agent = None
        self.pulls: dict[str, _Pull] = {}
        self.kv_heads = 0
        self.fresh: set[str] = set()  # pulls started since the last get_finished
        self.stats = TandemKVConnectorStats()
        self.done_recving: set[str] = set()
        self.load_errors: set[int] = set()

    @property
    def port(self) -> int:
        return self.cfg.port + self.cfg.dp_index * self.cfg.tp_size + self.tp_rank

    def register_kv_caches(self, kv_caches: dict) -> None:
        from .agent import Agent

        layout, bases = _layout_of(kv_caches, self.tp_rank, self.cfg.tp_size, self.cfg.total_kv_heads)
        self.kv_heads = layout["kv_heads"]
        self.agent = Agent(
            f"{self.cfg.engine_id}-tp{self.tp_rank}",
            backend=self.cfg.backend,
            listen_host=self.cfg.host,
            listen_port=self.port,
            hold_timeout_s=self.cfg.hold_timeout_s,
            transfer_timeout_s=self.cfg.transfer_timeout_s,
        )
        self.agent.register_memory(layout, bases)
        # The caches must outlive the agent: keep them referenced.
        self._caches = kv_caches
        logger.info("TandemConnector rank %d: %d layers x %d blocks registered, agent on %s:%d (%s)",
                    self.tp_rank, layout["layers"], layout["num_blocks"], self.cfg.host, self.port,
                    ",".join(self.agent.metadata()["backends"]))

    def start_load_kv(self, meta: TandemConnectorMetadata) -> None:
        for req_id, blocks in meta.reqs_to_send.items():
            self.agent.hold(req_id, blocks)
        for req_id, r in meta.reqs_to_recv.items():
            self._start_pull(req_id, r)

    def _start_pull(self, req_id: str, r: RecvRequest) -> None:
        if r.error:
            logger.error("request %s: %s; computing it locally", req_id, r.error)
            self._failed(req_id, r.local_block_ids)
            return
        try:
            read, skip = _sources(self.tp_rank, self.cfg.tp_size, r.remote_tp_size, self.kv_heads)
        except ValueError as e:
            logger.error("request %s: %s; computing it locally", req_id, e)
            self._failed(req_id, r.local_block_ids)
            return
        peer = lambda q: f"{r.remote_host}:{r.remote_port + q}"  # noqa: E731
        # vLLM's notification: the reading engine's TP size, from which each prefill rank
        # knows how many readers to wait for.
        message = f"{r.remote_request_id}:{self.cfg.tp_size}"
        pull = _Pull(handles={}, local=r.local_block_ids)
        for q in (read + skip) if not r.local_block_ids else skip:
            try:
                self.agent.notify(peer(q), message)
            except Exception as e:  # the prefill rank frees its blocks at its hold timeout
                logger.warning("request %s: notifying %s failed: %s", req_id, peer(q), e)
        if not r.local_block_ids:
            self.done_recving.add(req_id)
            return
        for q in read:
            try:
                handle = self.agent.start_transfer(
                    peer(q), r.local_block_ids, r.remote_block_ids, req_id,
                    notify=(r.remote_request_id, self.cfg.tp_size),
                    timeout_s=self.cfg.transfer_timeout_s,
                )
            except Exception as e:  # the request is recomputed, never lost
                logger.error("request %s: pull from %s failed to start: %s", req_id, peer(q), e)
                pull.failed = True
                self.stats.record_failed_transfer()
                continue
            pull.handles[handle] = peer(q)
        if not pull.handles:
            self._failed(req_id, r.local_block_ids)
            return
        self.pulls[req_id] = pull
        self.fresh.add(req_id)

    def _failed(self, req_id: str, local_blocks: list[int]) -> None:
        self.load_errors.update(local_blocks)
        self.done_recving.add(req_id)

    def get_finished(self) -> tuple[Optional[set], Optional[set]]:
        # Pulls started in this step get up to finish_wait_us, together, to land.
        deadline = time.monotonic() + self.cfg.finish_wait_us / 1e6
        fresh, self.fresh = self.fresh, set()
        for req_id, pull in list(self.pulls.items()):
            for handle, peer in list(pull.handles.items()):
                try:
                    left = deadline - time.monotonic() if req_id in fresh else 0.0
                    result = self.agent.wait(handle, left) if left > 0 else self.agent.poll(handle)
                except Exception as e:
                    logger.error("request %s: KV pull from %s failed: %s; computing it locally",
                                 req_id, peer, e)
                    del pull.handles[handle]
                    pull.failed = True
                    self.stats.record_failed_transfer()
                    continue
                if result is None:
                    continue
                del pull.handles[handle]
                self._record(req_id, len(pull.local), result)
            # A failed request is reported only once its other pulls stopped writing.
            if not pull.handles:
                del self.pulls[req_id]
                if pull.failed:
                    self._failed(req_id, pull.local)
                else:
                    self.done_recving.add(req_id)
        sending = set()
        if self.agent is not None:
            for r in self.agent.drain_released():
                if r["reason"] == "expired":
                    logger.warning("request %s: nobody pulled its KV within %.0f s; freed",
                                   r["request_id"], self.cfg.hold_timeout_s)
                    self.stats.record_kv_expired_req()
                sending.add(r["request_id"])
        recving, self.done_recving = self.done_recving, set()
        return (sending or None), (recving or None)

    def take_stats(self) -> Optional[TandemKVConnectorStats]:
        """This interval's stats for vLLM, None when there are none."""
        return None if self.stats.is_empty() else self.stats.clone_and_reset()

    def _record(self, req_id, blocks, result) -> None:
        self.stats.record_transfer(result)
        logger.debug("request %s: pulled %d blocks, %d bytes in %.3f ms (%.2f GB/s, %s)", req_id,
                     blocks, result.bytes, result.elapsed_s * 1e3, result.gbps, result.backend)
        if self.cfg.stats_file:
            line = json.dumps({"request_id": req_id, "rank": self.tp_rank, "blocks": blocks,
                               "bytes": result.bytes, "seconds": result.elapsed_s,
                               "gbps": result.gbps, "backend": result.backend,
                               "descriptors": result.descriptors, "plan_s": result.plan_s,
                               "submit_s": result.submit_s, "device_s": result.device_s})
            with open(self.cfg.stats_file, "a") as f:
                f.write(line + "\n")

    def take_load_errors(self) -> set:
        errors, self.load_errors = self.load_errors, set()
        return errors

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
