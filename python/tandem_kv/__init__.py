"""tandem_kv: Tandem's KV-transfer agent (libtandem_kv.so) for Python.

`Agent` wraps one agent; `tandem_kv.vllm.TandemConnector` is the vLLM KV connector built on it.
"""

from .agent import Agent, TandemKvError, TransferResult, version

__all__ = ["Agent", "TandemKvError", "TransferResult", "version"]
