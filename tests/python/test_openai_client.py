"""The official `openai` client against pd-sidecar, through a real P/D round trip."""

import openai
import pytest


@pytest.fixture
def client(cluster):
    prefill_hostport = f"127.0.0.1:{cluster['prefill'].port}"
    return openai.OpenAI(
        base_url=cluster["url"] + "/v1",
        api_key="unused",
        default_headers={"x-prefiller-host-port": prefill_hostport},
        max_retries=0,
        timeout=30,
    )


def last_prefill_and_decode(cluster):
    prefill = [r for r in cluster["prefill"].requests() if r["path"].startswith("/v1/")]
    decode = [r for r in cluster["decode"].requests() if r["path"].startswith("/v1/")]
    assert prefill and decode, "both legs must have reached their engines"
    return prefill[-1], decode[-1]


def test_chat_non_streaming(client, cluster):
    resp = client.chat.completions.create(
        model="sim-model",
        messages=[{"role": "user", "content": "Tell me about disaggregated prefill."}],
        max_tokens=5,
    )
    assert resp.choices[0].message.content.strip().startswith("tok0")
    assert resp.usage.completion_tokens == 5
    prefill, decode = last_prefill_and_decode(cluster)
    assert prefill["body"]["kv_transfer_params"]["do_remote_decode"] is True
    assert prefill["body"]["max_tokens"] == 1
    assert decode["body"]["kv_transfer_params"]["do_remote_prefill"] is True
    assert decode["body"]["max_tokens"] == 5


def test_chat_streaming(client, cluster):
    stream = client.chat.completions.create(
        model="sim-model",
        messages=[{"role": "user", "content": "stream please"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text.split() == ["tok0", "tok1", "tok2", "tok3"]
    assert usage is not None and usage.completion_tokens == 4
    # The sidecar reports the prefill engine's cache hits.
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens is not None
    _, decode = last_prefill_and_decode(cluster)
    assert decode["body"]["stream"] is True


def test_completions_non_streaming(client, cluster):
    resp = client.completions.create(model="sim-model", prompt="Once upon a time", max_tokens=3)
    assert resp.choices[0].text.split() == ["tok0", "tok1", "tok2"]
    prefill, decode = last_prefill_and_decode(cluster)
    assert prefill["path"] == decode["path"] == "/v1/completions"
    assert prefill["headers"]["x-request-id"] == decode["headers"]["x-request-id"]


def test_completions_streaming(client, cluster):
    stream = client.completions.create(model="sim-model", prompt="Once upon a time", max_tokens=3, stream=True)
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert "".join(pieces).split() == ["tok0", "tok1", "tok2"]


def test_error_is_openai_shaped(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert "does not exist" in str(info.value)
