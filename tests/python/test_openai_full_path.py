"""The official `openai` client through pd-router -> pd-sidecar -> engines, with the KV cache
moved between the engines over NIXL and verified by the decode engine."""

import time

import openai

LONG_PROMPT = "You are a careful assistant. " * 80  # about 580 tokens: above the router's threshold


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError("condition not met in time")


def test_streaming_chat_moves_verified_kv(full_path):
    client = openai.OpenAI(base_url=full_path["url"] + "/v1", api_key="unused", max_retries=0, timeout=30)
    before = full_path["decode"].state()
    stream = client.chat.completions.create(
        model="sim-model",
        messages=[
            {"role": "system", "content": LONG_PROMPT},
            {"role": "user", "content": "Summarise the instructions."},
        ],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == [f"tok{i}" for i in range(6)]
    usage = [c.usage for c in chunks if c.usage][-1]
    assert usage.completion_tokens == 6
    assert usage.prompt_tokens > 500

    after = full_path["decode"].state()
    assert after["kv_backend"] == "nixl"
    assert after["kv_pulls_ok"] == before["kv_pulls_ok"] + 1, "the decode engine pulled the prompt's KV"
    assert after["kv_bytes_pulled"] > before["kv_bytes_pulled"]
    assert after["kv_integrity_failures"] == 0
    # The prefill engine frees its blocks once the decode engine's notification arrives.
    wait_until(lambda: full_path["prefill"].state()["held_blocks"] == 0)
    assert full_path["prefill"].state()["released_total"] > 0


def test_short_prompt_stays_on_the_decode_engine(full_path):
    client = openai.OpenAI(base_url=full_path["url"] + "/v1", api_key="unused", max_retries=0, timeout=30)
    prefill_before = len(full_path["prefill"].requests())
    resp = client.completions.create(model="sim-model", prompt="Hi there", max_tokens=2)
    assert resp.choices[0].text.split() == ["tok0", "tok1"]
    assert len(full_path["prefill"].requests()) == prefill_before, "no prefill leg for a short prompt"
