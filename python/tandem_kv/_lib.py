"""Loading libtandem_kv.so and declaring its C functions (ctypes; no compile step).

The library is looked for, in order: `TANDEM_KV_LIB` (a path to the .so), next to this
package, then the checkout's `target/release` and `target/debug` (a `pip install -e` or a
source tree). `cargo build -p ffi --release` builds it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

LIB_NAME = "libtandem_kv.so"

# TandemKvStatus
OK = 0
PENDING = 1
INVALID_ARGUMENT = -1
NOT_FOUND = -2
TRANSFER = -3
TIMEOUT = -4
STATE = -5
INTERNAL = -6
BUFFER_TOO_SMALL = -7

STATUS_NAMES = {
    OK: "ok",
    PENDING: "pending",
    INVALID_ARGUMENT: "invalid argument",
    NOT_FOUND: "not found",
    TRANSFER: "transfer failed",
    TIMEOUT: "timeout",
    STATE: "wrong state",
    INTERNAL: "internal error",
    BUFFER_TOO_SMALL: "buffer too small",
}

OP_READ = 0
OP_WRITE = 1
BACKENDS = {0: "cuda-ipc", 1: "nixl", 2: "tcp"}


class TransferSpec(ctypes.Structure):
    _fields_ = [
        ("op", ctypes.c_int),
        ("request_id", ctypes.c_char_p),
        ("peer", ctypes.c_char_p),
        ("local_blocks", ctypes.POINTER(ctypes.c_uint32)),
        ("num_local_blocks", ctypes.c_size_t),
        ("remote_blocks", ctypes.POINTER(ctypes.c_uint32)),
        ("num_remote_blocks", ctypes.c_size_t),
        ("notify_request_id", ctypes.c_char_p),
        ("notify_tp_size", ctypes.c_uint32),
        ("timeout_ms", ctypes.c_uint64),
    ]


class TransferResult(ctypes.Structure):
    _fields_ = [
        ("bytes", ctypes.c_uint64),
        ("descriptors", ctypes.c_uint32),
        ("elapsed_ns", ctypes.c_uint64),
        ("backend", ctypes.c_uint32),
        ("plan_ns", ctypes.c_uint64),
        ("submit_ns", ctypes.c_uint64),
        ("device_ns", ctypes.c_uint64),
    ]


def _candidates() -> list[Path]:
    env = os.environ.get("TANDEM_KV_LIB")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent
    out = [here / LIB_NAME]
    for root in [here.parent, *here.parents]:
        for profile in ("release", "debug"):
            out.append(root / "target" / profile / LIB_NAME)
        if (root / "Cargo.toml").is_file():
            break
    return out


_LIB = None


def lib() -> ctypes.CDLL:
    """The loaded library, its functions declared."""
    global _LIB
    if _LIB is not None:
        return _LIB
    tried = []
    for path in _candidates():
        if path.is_file():
            _LIB = _declare(ctypes.CDLL(str(path)))
            return _LIB
        tried.append(str(path))
    raise OSError(f"{LIB_NAME} not found (set TANDEM_KV_LIB); looked in: {', '.join(tried)}")


def _declare(l: ctypes.CDLL) -> ctypes.CDLL:
    c = ctypes
    agent = c.c_void_p
    sigs = {
        "tandem_kv_version": ([], c.c_char_p),
        "tandem_kv_last_error": ([], c.c_char_p),
        "tandem_kv_agent_create": ([c.c_char_p, c.POINTER(c.c_void_p)], c.c_int),
        "tandem_kv_agent_destroy": ([agent], None),
        "tandem_kv_register_memory": ([agent, c.c_char_p, c.POINTER(c.c_uint64), c.c_size_t], c.c_int),
        "tandem_kv_metadata": ([agent, c.c_char_p, c.c_size_t, c.POINTER(c.c_size_t)], c.c_int),
        "tandem_kv_transfer_start": ([agent, c.POINTER(TransferSpec), c.POINTER(c.c_uint64)], c.c_int),
        "tandem_kv_transfer_poll": ([agent, c.c_uint64, c.POINTER(TransferResult)], c.c_int),
        "tandem_kv_transfer_wait": ([agent, c.c_uint64, c.c_uint64, c.POINTER(TransferResult)], c.c_int),
        "tandem_kv_transfer_wait_us": ([agent, c.c_uint64, c.c_uint64, c.POINTER(TransferResult)], c.c_int),
        "tandem_kv_hold": ([agent, c.c_char_p, c.POINTER(c.c_uint32), c.c_size_t], c.c_int),
        "tandem_kv_release": ([agent, c.c_char_p, c.POINTER(c.c_size_t)], c.c_int),
        "tandem_kv_notify": ([agent, c.c_char_p, c.c_char_p], c.c_int),
        "tandem_kv_drain_released": ([agent, c.c_char_p, c.c_size_t, c.POINTER(c.c_size_t)], c.c_int),
    }
    for name, (args, res) in sigs.items():
        f = getattr(l, name)
        f.argtypes = args
        f.restype = res
    return l
