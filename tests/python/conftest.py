"""Fixtures that start real engine simulators and a pd-sidecar on loopback.

Binaries come from the cargo target dir (`make test` builds them first)."""

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"


def binary(name: str) -> Path:
    path = TARGET / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `cargo build --workspace --bins` (or `make test`)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.02)
    raise TimeoutError(f"{url} not ready after {timeout}s: {last}")


class Proc:
    def __init__(self, name: str, args: list[str]):
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([str(binary(name)), *args], stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Sim:
    def __init__(self, args: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc("engine-sim", ["--port", str(self.port), *(args or [])])
        wait_ready(self.url + "/health")

    def requests(self) -> list[dict]:
        with urllib.request.urlopen(self.url + "/sim/requests") as resp:
            return json.load(resp)

    def state(self) -> dict:
        with urllib.request.urlopen(self.url + "/sim/state") as resp:
            return json.load(resp)


@pytest.fixture(scope="module")
def cluster():
    """One prefill engine, one decode engine, and a sidecar in front of the decode engine."""
    prefill = Sim(["--output-tokens", "8"])
    decode = Sim(["--output-tokens", "8", "--itl-ms", "5"])
    port = free_port()
    sidecar = Proc(
        "pd-sidecar",
        [
            f"--port={port}",
            f"--vllm-port={decode.port}",
            "--connector=nixlv2",
            "--secure-proxy=false",
            "--metrics-port=0",
            "--prefill-threshold-tokens=0",
        ],
    )
    wait_ready(f"http://127.0.0.1:{port}/ready")
    yield {"prefill": prefill, "decode": decode, "url": f"http://127.0.0.1:{port}"}
    for p in (sidecar, prefill.proc, decode.proc):
        p.stop()


@pytest.fixture(scope="module")
def full_path():
    """The whole P/D path: pd-router -> pd-sidecar -> decode engine, with a prefill engine whose
    KV blocks the decode engine pulls over NIXL and checks byte for byte."""
    prefill = Sim(["--kv-backend", "nixl"])
    decode = Sim(["--kv-backend", "nixl", "--itl-ms", "2"])
    sidecar_port = free_port()
    sidecar = Proc(
        "pd-sidecar",
        [
            f"--port={sidecar_port}",
            f"--vllm-port={decode.port}",
            "--connector=nixlv2",
            "--secure-proxy=false",
            "--metrics-port=0",
            "--prefill-threshold-tokens=0",
        ],
    )
    wait_ready(f"http://127.0.0.1:{sidecar_port}/ready")
    router_port = free_port()
    router = Proc(
        "pd-router",
        [
            "--bind=127.0.0.1",
            f"--port={router_port}",
            "--metrics-port=0",
            f"--decode=http://127.0.0.1:{sidecar_port}",
            f"--prefill=127.0.0.1:{prefill.port}",
            "--threshold-tokens=64",
        ],
    )
    wait_ready(f"http://127.0.0.1:{router_port}/health")
    yield {"prefill": prefill, "decode": decode, "url": f"http://127.0.0.1:{router_port}"}
    for p in (router, sidecar, prefill.proc, decode.proc):
        p.stop()
