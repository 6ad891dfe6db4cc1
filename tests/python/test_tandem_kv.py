"""The Python wrapper (python/tandem_kv) over the built libtandem_kv.so: two processes, one
serving a pool of separately allocated regions (as vLLM's per-layer tensors), one pulling
blocks over TCP and checking every byte; and the errors a caller sees."""

import ctypes
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, TARGET

sys.path.insert(0, str(ROOT / "python"))
os.environ.setdefault("TANDEM_KV_LIB", str(TARGET / "libtandem_kv.so"))

import tandem_kv  # noqa: E402
from tandem_kv import Agent, TandemKvError  # noqa: E402

LAYOUT = {"layers": 2, "kv_heads": 4, "head_dim": 16, "dtype": "bf16", "block_size": 8,
          "num_blocks": 12, "format": "hnd", "regions": "fused"}
BLOCK_LEN = 8 * 4 * 2 * 16 * 2  # block_size x heads x (K and V) x head_dim x 2 bytes
REGIONS = 2  # fused: one region per layer, as vLLM 0.26 lays K and V out


def byte(region: int, block: int, i: int) -> int:
    return (region * 131 + block * 31 + i * 7 + 5) & 0xFF


def regions(fill: bool):
    bufs = [(ctypes.c_ubyte * (LAYOUT["num_blocks"] * BLOCK_LEN))() for _ in range(REGIONS)]
    if fill:
        for r, buf in enumerate(bufs):
            for b in range(LAYOUT["num_blocks"]):
                for i in range(BLOCK_LEN):
                    buf[b * BLOCK_LEN + i] = byte(r, b, i)
    return bufs, [ctypes.addressof(b) for b in bufs]


SERVER = textwrap.dedent(
    """
    import ctypes, sys, time
    sys.path.insert(0, {python!r})
    from test_tandem_kv import regions, LAYOUT
    from tandem_kv import Agent
    bufs, bases = regions(fill=True)
    agent = Agent("prefill-engine", backend="tcp", hold_timeout_s=30)
    agent.register_memory(LAYOUT, bases)
    agent.hold("req-7", [2, 3, 11])
    print(agent.endpoint, flush=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for r in agent.drain_released():
            print(r["request_id"], r["blocks"], r["reason"], flush=True)
            agent.close()
            sys.exit(0)
        time.sleep(0.01)
    sys.exit(1)
    """
)


def test_a_pull_between_two_processes_moves_every_byte_and_releases_the_prefill():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests/python"), str(ROOT / "python")]))
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(python=str(ROOT / "python"))],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        endpoint = server.stdout.readline().strip()
        assert ":" in endpoint, endpoint
        bufs, bases = regions(fill=False)
        with Agent("decode-engine", backend="tcp") as agent:
            agent.register_memory(LAYOUT, bases)
            md = agent.metadata()
            assert md["num_regions"] == REGIONS and md["block_len"] == BLOCK_LEN
            handle = agent.start_transfer(endpoint, [0, 1, 5], [2, 3, 11], "decode-7", notify=("req-7", 1))
            result = agent.wait(handle, 30)
            assert result is not None and result.bytes == 3 * BLOCK_LEN * REGIONS
            assert result.backend == "tcp"
            for r in range(REGIONS):
                for local, remote in ((0, 2), (1, 3), (5, 11)):
                    got = bytes(bufs[r][local * BLOCK_LEN:(local + 1) * BLOCK_LEN])
                    assert got == bytes(byte(r, remote, i) for i in range(BLOCK_LEN)), (r, local)
                assert not any(bufs[r][2 * BLOCK_LEN:3 * BLOCK_LEN]), "block 2 was not pulled into"
            with pytest.raises(TandemKvError) as e:
                agent.poll(handle)
            assert e.value.status == -2
        assert server.stdout.readline().strip() == "req-7 [2, 3, 11] notification"
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()


def test_errors_are_typed_and_say_why():
    assert tandem_kv.version()
    with pytest.raises(TandemKvError) as e:
        Agent("")
    assert e.value.status == -1 and "engine_id" in e.value.message
    with pytest.raises(TandemKvError, match="backend"):
        Agent("e", backend="carrier-pigeon")
    with Agent("e", backend="tcp") as agent:
        with pytest.raises(TandemKvError) as e:
            agent.metadata()
        assert e.value.status == -5
        bufs, bases = regions(fill=False)
        with pytest.raises(TandemKvError, match="2 regions"):
            agent.register_memory(LAYOUT, bases[:1])
        with pytest.raises(TandemKvError, match="overlap"):
            agent.register_memory(LAYOUT, [bases[0], bases[0] + 64])
        agent.register_memory(LAYOUT, bases)
        with pytest.raises(TandemKvError, match="out of range"):
            agent.hold("r", [12])
        # A peer that is not listening: the transfer's error, within its deadline.
        started = time.monotonic()
        handle = agent.start_transfer("127.0.0.1:1", [0], [0], "x", timeout_s=5)
        with pytest.raises(TandemKvError) as e:
            agent.wait(handle, 20)
        assert e.value.status in (-3, -4)
        assert time.monotonic() - started < 20
    with pytest.raises(TandemKvError, match="closed"):
        agent.metadata()
