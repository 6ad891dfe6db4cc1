"""A typed wrapper over one libtandem_kv agent: register an engine's KV memory, pull or
push blocks to a peer agent, hold a finished prefill's blocks until its peers have them."""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from typing import Optional, Sequence

from . import _lib


class TandemKvError(RuntimeError):
    """A libtandem_kv call failed: `status` is the TandemKvStatus, the message its reason."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{_lib.STATUS_NAMES.get(status, status)}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class TransferResult:
    bytes: int
    descriptors: int
    elapsed_s: float
    backend: str
    plan_s: float = 0.0
    submit_s: float = 0.0
    # The GPU's own copy time (cuda-ipc); None when unknown.
    device_s: Optional[float] = None

    @property
    def gbps(self) -> float:
        return self.bytes / self.elapsed_s / 1e9 if self.elapsed_s > 0 else 0.0


def version() -> str:
    return _lib.lib().tandem_kv_version().decode()


def _check(status: int) -> int:
    if status < 0:
        msg = (_lib.lib().tandem_kv_last_error() or b"").decode(errors="replace")
        raise TandemKvError(status, msg)
    return status


def _u32s(values: Sequence[int]):
    arr = (ctypes.c_uint32 * len(values))(*values)
    return arr, len(values)


def _text(call) -> str:
    """Calls `call(buf, cap, len_out)` until the buffer is big enough."""
    need = ctypes.c_size_t(0)
    cap = 4096
    while True:
        buf = ctypes.create_string_buffer(cap)
        status = call(buf, cap, ctypes.byref(need))
        if status == _lib.BUFFER_TOO_SMALL and need.value > cap:
            cap = need.value
            continue
        _check(status)
        return buf.value.decode()


class Agent:
    """One engine rank's KV-transfer agent. Thread-safe; `close()` (or the context manager)
    must come last."""

    def __init__(
        self,
        engine_id: str,
        backend: str = "auto",
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        advertise_host: Optional[str] = None,
        hold_timeout_s: float = 480.0,
        transfer_timeout_s: float = 30.0,
        worker_threads: int = 2,
    ):
        self._lib = _lib.lib()
        config = {
            "engine_id": engine_id,
            "backend": backend,
            "listen_host": listen_host,
            "listen_port": listen_port,
            "hold_timeout_s": hold_timeout_s,
            "transfer_timeout_s": transfer_timeout_s,
            "worker_threads": worker_threads,
        }
        if advertise_host:
            config["advertise_host"] = advertise_host
        handle = ctypes.c_void_p()
        _check(self._lib.tandem_kv_agent_create(json.dumps(config).encode(), ctypes.byref(handle)))
        self._handle = handle

    def close(self) -> None:
        if self._handle:
            self._lib.tandem_kv_agent_destroy(self._handle)
            self._handle = ctypes.c_void_p()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _h(self) -> ctypes.c_void_p:
        if not self._handle:
            raise TandemKvError(_lib.STATE, "the agent is closed")
        return self._handle

    def register_memory(self, layout: dict, region_bases: Sequence[int]) -> None:
        """Starts the agent over the engine's KV memory: region r at `region_bases[r]`
        (layout keys: layers, kv_heads, head_dim, dtype, block_size, num_blocks, tp_rank,
        tp_size, format, regions, mem). The memory must outlive the agent."""
        bases = (ctypes.c_uint64 * len(region_bases))(*region_bases)
        _check(
            self._lib.tandem_kv_register_memory(
                self._h(), json.dumps(layout).encode(), bases, len(region_bases)
            )
        )

    def metadata(self) -> dict:
        h = self._h()
        return json.loads(_text(lambda b, c, n: self._lib.tandem_kv_metadata(h, b, c, n)))

    @property
    def endpoint(self) -> str:
        md = self.metadata()
        return f"{md['host']}:{md['port']}"

    def start_transfer(
        self,
        peer: str,
        local_blocks: Sequence[int],
        remote_blocks: Sequence[int],
        request_id: str,
        op: str = "read",
        notify: Optional[tuple[str, int]] = None,
        timeout_s: Optional[float] = None,
    ) -> int:
        """Starts moving `remote_blocks` of the peer at `peer` (host:port) into
        `local_blocks` (op "read") or the reverse ("write"); returns a handle. `notify`
        = (remote_request_id, tp_size) sends vLLM's notification when the bytes landed."""
        local, nl = _u32s(local_blocks)
        remote, nr = _u32s(remote_blocks)
        spec = _lib.TransferSpec(
            op=_lib.OP_READ if op == "read" else _lib.OP_WRITE,
            request_id=request_id.encode(),
            peer=peer.encode(),
            local_blocks=local,
            num_local_blocks=nl,
            remote_blocks=remote,
            num_remote_blocks=nr,
            notify_request_id=notify[0].encode() if notify else None,
            notify_tp_size=notify[1] if notify else 1,
            timeout_ms=int(timeout_s * 1000) if timeout_s else 0,
        )
        handle = ctypes.c_uint64(0)
        _check(self._lib.tandem_kv_transfer_start(self._h(), ctypes.byref(spec), ctypes.byref(handle)))
        return handle.value

    def _finish(self, status: int, res: _lib.TransferResult) -> Optional[TransferResult]:
        if _check(status) == _lib.PENDING:
            return None
        return TransferResult(
            bytes=res.bytes,
            descriptors=res.descriptors,
            elapsed_s=res.elapsed_ns / 1e9,
            backend=_lib.BACKENDS.get(res.backend, str(res.backend)),
            plan_s=res.plan_ns / 1e9,
            submit_s=res.submit_ns / 1e9,
            device_s=res.device_ns / 1e9 if res.device_ns else None,
        )

    def poll(self, handle: int) -> Optional[TransferResult]:
        """The result when finished (then the handle is gone), None while running; a failed
        transfer raises TandemKvError."""
        res = _lib.TransferResult()
        return self._finish(self._lib.tandem_kv_transfer_poll(self._h(), handle, ctypes.byref(res)), res)

    def wait(self, handle: int, timeout_s: float) -> Optional[TransferResult]:
        """Like poll, waiting up to `timeout_s` (microsecond resolution; up to 2 ms is spent
        on this thread stepping the transfer, so a copy is seen as it lands)."""
        res = _lib.TransferResult()
        us = max(0, int(timeout_s * 1e6))
        status = self._lib.tandem_kv_transfer_wait_us(self._h(), handle, us, ctypes.byref(res))
        return self._finish(status, res)

    def hold(self, request_id: str, blocks: Sequence[int]) -> None:
        arr, n = _u32s(blocks)
        _check(self._lib.tandem_kv_hold(self._h(), request_id.encode(), arr, n))

    def release(self, request_id: str) -> int:
        n = ctypes.c_size_t(0)
        _check(self._lib.tandem_kv_release(self._h(), request_id.encode(), ctypes.byref(n)))
        return n.value

    def notify(self, peer: str, message: str) -> None:
        _check(self._lib.tandem_kv_notify(self._h(), peer.encode(), message.encode()))

    def drain_released(self) -> list[dict]:
        """Blocks released since the last call: [{"request_id", "blocks", "reason"}]."""
        h = self._h()
        return json.loads(_text(lambda b, c, n: self._lib.tandem_kv_drain_released(h, b, c, n)))
