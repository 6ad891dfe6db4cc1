"""Plain stand-ins for the vLLM 0.26 objects a KV connector is handed, with the attributes
and methods vLLM's own classes have (read from vLLM 0.26's source: vllm/config/kv_transfer.py,
vllm/v1/request.py, vllm/v1/core/kv_cache_manager.py, vllm/v1/attention/backends/flash_attn.py),
and a fake engine step that calls a connector in vLLM's order.

CI has no vLLM (and no torch): a "tensor" here is a ctypes buffer with torch's data_ptr /
shape / dtype / device / element_size, laid out as vLLM 0.26 lays a layer's KV cache out:
(num_blocks, kv_heads, block_size, 2 * head_dim), HND, K and V of a token side by side.
"""

import ctypes
import enum
import random
import socket
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    WAITING_FOR_REMOTE_KVS = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_IGNORED = enum.auto()
    FINISHED_ERROR = enum.auto()


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list
    kv_transfer_params: Optional[dict] = None
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING


@dataclass
class KVCacheBlock:
    block_id: int
    block_hash: Optional[bytes] = None
    is_null: bool = False


@dataclass
class KVCacheBlocks:
    blocks: tuple

    def get_block_ids(self):
        return tuple([b.block_id for b in group] for group in self.blocks)

    def get_unhashed_block_ids(self):
        assert len(self.blocks) == 1, "Only one group is supported"
        return [b.block_id for b in self.blocks[0] if b.block_hash is None]


def vllm_config(engine_id: str, role: str, port: int, backend: str = "tcp", tp_size: int = 1,
                rank: int = 0, kv_heads: Optional[int] = None, **extra) -> SimpleNamespace:
    kv = SimpleNamespace(
        kv_connector="TandemConnector",
        kv_connector_module_path="tandem_kv.vllm",
        engine_id=engine_id,
        kv_role=role,
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"backend": backend, "host": "127.0.0.1", "port": port, **extra},
    )
    return SimpleNamespace(
        kv_transfer_config=kv,
        parallel_config=SimpleNamespace(tensor_parallel_size=tp_size, data_parallel_index=0, rank=rank),
        cache_config=SimpleNamespace(block_size=16, enable_prefix_caching=True),
        # ModelConfig.get_total_num_kv_heads: the model's KV heads before TP sharding.
        model_config=SimpleNamespace(get_total_num_kv_heads=lambda: kv_heads) if kv_heads else None,
    )


class Tensor:
    """One layer's KV cache: (num_blocks, kv_heads, block_size, 2 * head_dim) bf16 on the host."""

    dtype = "torch.bfloat16"
    device = SimpleNamespace(type="cpu", index=None)

    def __init__(self, num_blocks: int, kv_heads: int, block_size: int, head_dim: int):
        self.shape = (num_blocks, kv_heads, block_size, 2 * head_dim)
        self.block_len = kv_heads * block_size * 2 * head_dim * 2
        self.buf = (ctypes.c_ubyte * (num_blocks * self.block_len))()

    def data_ptr(self) -> int:
        return ctypes.addressof(self.buf)

    def stride(self) -> tuple:
        """HND in memory, as vLLM lays it out for a connector that asks for HND."""
        _, h, n, d2 = self.shape
        return (h * n * d2, n * d2, d2, 1)

    def element_size(self) -> int:
        return 2

    def block(self, b: int) -> bytes:
        return bytes(self.buf[b * self.block_len:(b + 1) * self.block_len])

    def write_block(self, b: int, data: bytes) -> None:
        ctypes.memmove(ctypes.addressof(self.buf) + b * self.block_len, data, len(data))


def kv_caches(layers: int = 3, num_blocks: int = 32, kv_heads: int = 2, block_size: int = 16,
              head_dim: int = 8) -> dict:
    """Per-layer caches, each its own allocation, in the model's layer order."""
    return {f"model.layers.{i}.self_attn.attn": Tensor(num_blocks, kv_heads, block_size, head_dim)
            for i in range(layers)}


def kv_bytes(prompt: list, layer: int, prompt_block: int, block_len: int, block_size: int = 16) -> bytes:
    """What the KV of a prompt's block is, as a function of the tokens up to its end."""
    seed = hash(tuple(prompt[:(prompt_block + 1) * block_size])) & 0xFFFF
    return bytes((seed + layer * 131 + prompt_block * 31 + i * 7) & 0xFF for i in range(block_len))


@dataclass
class Engine:
    """A scheduler-side and a worker-side connector, stepped in vLLM's order:
    build_connector_meta -> bind -> start_load_kv -> (forward) -> wait_for_save ->
    get_finished -> get_block_ids_with_load_errors -> clear."""

    scheduler: object
    worker: object
    caches: dict
    finished_sending: set = field(default_factory=set)
    finished_recving: set = field(default_factory=set)
    load_errors: set = field(default_factory=set)

    def step(self) -> None:
        meta = self.scheduler.build_connector_meta(SimpleNamespace(finished_req_ids=set()))
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(SimpleNamespace(no_compile_layers={}, attn_metadata={}))
        for name in self.caches:
            self.worker.wait_for_layer_load(name)
            self.worker.save_kv_layer(name, self.caches[name], None)
        self.worker.wait_for_save()
        sending, recving = self.worker.get_finished(set())
        self.finished_sending |= sending or set()
        self.finished_recving |= recving or set()
        self.load_errors |= self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()


def free_ports(n: int) -> int:
    """A base port with `n` free ports from it (each TP rank's agent listens on base + rank)."""
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def rank_engines(name: str, role: str, tp: int, base: int, kv_heads: int, layers: int = 2,
                 block_size: int = 16, head_dim: int = 8, num_blocks: int = 16, **extra) -> list:
    """One engine per TP rank, each a scheduler-side and a worker-side TandemConnector with its
    own agent on `base + rank`, its caches holding the rank's share of `kv_heads`."""
    from tandem_kv.vllm import TandemConnector
    from tandem_kv._vllm_compat import KVConnectorRole

    out = []
    for rank in range(tp):
        cfg = vllm_config(name, role, port=base, tp_size=tp, rank=rank, kv_heads=kv_heads, **extra)
        caches = kv_caches(layers, num_blocks, max(1, kv_heads // tp), block_size, head_dim)
        e = Engine(TandemConnector(cfg, KVConnectorRole.SCHEDULER, None),
                   TandemConnector(cfg, KVConnectorRole.WORKER, None), caches)
        e.worker.register_kv_caches(caches)
        out.append(e)
    return out
