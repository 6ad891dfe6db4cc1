//! End-to-end tests of the `engine-sim` binary: real processes on loopback, driven over HTTP.
//! Here the API's shapes, streaming, metrics and timing; the prefill/decode roles in `pd`, bad
//! input, injected faults and disconnects in `faults`.

mod faults;
mod pd;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tandem_tests::harness::{
    free_port, http, http_get, http_post_json, http_post_stream, json, poll_until, try_http,
    EngineSim, Proc, READY_TIMEOUT,
};
use tandem_tests::sim::generate::engine_duration_ms;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

async fn post(sim: &EngineSim, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, _, bytes) = http_post_json(&format!("{}{path}", sim.url()), &body, &[]).await;
    (status, json(&bytes))
}

/// A prompt of exactly `tokens` estimated tokens (4 bytes each).
fn prompt_of(tokens: usize) -> String {
    "abcd".repeat(tokens)
}

fn assert_openai_error(body: &Value, status: u16, kind: &str) {
    assert_eq!(body["error"]["code"], status, "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(body["error"]["param"].is_null(), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

fn prefill_body(prompt: &str) -> Value {
    json!({
        "prompt": prompt,
        "max_tokens": 1,
        "stream": false,
        "kv_transfer_params": {
            "do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
            "remote_block_ids": null, "remote_host": null, "remote_port": null
        }
    })
}

#[tokio::test]
async fn completions_shape_and_usage() {
    let sim = EngineSim::start(&["--output-tokens", "4", "--model", "m1"]).await;
    let (status, body) = post(
        &sim,
        "/v1/completions",
        json!({"model": "m1", "prompt": "abcdefghi", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"), "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], "m1");
    assert!(body["created"].is_u64());
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["text"], " tok0 tok1 tok2");
    assert_eq!(choice["finish_reason"], "length");
    assert!(choice["logprobs"].is_null() && choice["stop_reason"].is_null());
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
               "prompt_tokens_details": {"cached_tokens": 0}})
    );
    assert!(body.as_object().unwrap().contains_key("kv_transfer_params"));
    assert!(body["kv_transfer_params"].is_null());

    // No limit: --output-tokens, ended by "EOS"; token-id prompts count their length.
    let (_, body) = post(&sim, "/v1/completions", json!({"prompt": [5, 6, 7, 8, 9]})).await;
    assert_eq!(body["choices"][0]["text"], " tok0 tok1 tok2 tok3");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 5);
    assert_eq!(body["usage"]["completion_tokens"], 4);

    // A batch of prompts: one choice each.
    let (_, body) = post(
        &sim,
        "/v1/completions",
        json!({"prompt": ["abcd", [1, 2, 3]], "max_tokens": 2}),
    )
    .await;
    assert_eq!(body["choices"].as_array().unwrap().len(), 2);
    assert_eq!(body["choices"][1]["index"], 1);
    assert_eq!(body["usage"]["prompt_tokens"], 4);
    assert_eq!(body["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn chat_responses_and_generate_shapes() {
    let sim = EngineSim::start(&[]).await;
    let (status, body) = post(
        &sim,
        "/v1/chat/completions",
        json!({
            "model": "sim-model",
            "messages": [
                {"role": "system", "content": "abcdabcd"},
                {"role": "user", "content": [{"type": "text", "text": "abcde"}]}
            ],
            "max_completion_tokens": 2
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], " tok0 tok1");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["prompt_tokens"], 4);
    assert_eq!(body["usage"]["completion_tokens"], 2);
    assert_eq!(body["usage"]["total_tokens"], 6);
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    let (status, body) = post(
        &sim,
        "/v1/responses",
        json!({"input": [{"role": "user", "content": "abcdabcd"}], "max_output_tokens": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(body["object"], "response");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["output"][0]["type"], "message");
    assert_eq!(body["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(body["output"][0]["content"][0]["text"], " tok0 tok1 tok2");
    assert_eq!(body["usage"]["input_tokens"], 2);
    assert_eq!(body["usage"]["output_tokens"], 3);
    assert_eq!(body["usage"]["total_tokens"], 5);
    assert_eq!(body["usage"]["input_tokens_details"]["cached_tokens"], 0);

    let (status, body) = post(
        &sim,
        "/inference/v1/generate",
        json!({"token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 2}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["token_ids"], json!([1000, 1001]));
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert!(body["request_id"].is_string());

    // Streaming these two is not simulated: a clear 400.
    let (status, body) = post(
        &sim,
        "/v1/responses",
        json!({"input": "hi", "stream": true}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_openai_error(&body, 400, "BadRequestError");
}

#[tokio::test]
async fn streaming_chat_sends_tokens_usage_then_done() {
    let sim = EngineSim::start(&["--itl-ms", "100"]).await;
    let resp = http_post_stream(
        &format!("{}/v1/chat/completions", sim.url()),
        &json!({
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
            "stream": true,
            "stream_options": {"include_usage": true}
        }),
        &[],
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert!(resp.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = resp.events().await;
    assert_eq!(events.len(), 6, "4 tokens + usage + [DONE]: {events:?}");
    assert!(events[5].is_done(), "[DONE] must be last");
    let chunks: Vec<Value> = events[..5].iter().map(|e| e.json()).collect();
    let mut text = String::new();
    for (i, c) in chunks[..4].iter().enumerate() {
        assert_eq!(c["object"], "chat.completion.chunk");
        let delta = &c["choices"][0]["delta"];
        assert_eq!(
            delta["role"] == "assistant",
            i == 0,
            "role only in the first delta: {c}"
        );
        text.push_str(delta["content"].as_str().unwrap());
        let finish = &c["choices"][0]["finish_reason"];
        if i == 3 {
            assert_eq!(finish, "length");
        } else {
            assert!(finish.is_null(), "{c}");
        }
    }
    assert_eq!(text, " tok0 tok1 tok2 tok3");
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(chunks[4]["usage"]["completion_tokens"], 4);
    assert_eq!(chunks[4]["usage"]["prompt_tokens"], 2);
    // Streamed as generated, not buffered: the last token comes three inter-token gaps later.
    let spread = events[3].at - events[0].at;
    assert!(
        spread >= Duration::from_millis(250),
        "tokens arrived together ({spread:?}): the stream is buffered"
    );
}

#[tokio::test]
async fn streaming_completions_without_usage() {
    let sim = EngineSim::start(&[]).await;
    let resp = http_post_stream(
        &format!("{}/v1/completions", sim.url()),
        &json!({"prompt": "hello", "max_tokens": 3, "stream": true}),
        &[],
    )
    .await;
    let events = resp.events().await;
    assert_eq!(events.len(), 4, "3 tokens + [DONE]: {events:?}");
    assert!(events[3].is_done());
    for (i, e) in events[..3].iter().enumerate() {
        let c = e.json();
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["text"], format!(" tok{i}"));
        assert!(c.get("usage").is_none(), "no usage unless asked: {c}");
    }
    assert_eq!(events[2].json()["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn models_health_and_metrics() {
    let sim = EngineSim::start(&[
        "--model",
        "my-model",
        "--max-model-len",
        "4096",
        "--num-blocks",
        "100",
    ])
    .await;
    let (status, _, body) = http_get(&format!("{}/health", sim.url())).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    let (_, _, body) = http_get(&format!("{}/v1/models", sim.url())).await;
    let models = json(&body);
    assert_eq!(models["object"], "list");
    let m = &models["data"][0];
    assert_eq!(m["id"], "my-model");
    assert_eq!(m["object"], "model");
    assert_eq!(m["owned_by"], "vllm");
    assert_eq!(m["root"], "my-model");
    assert!(m["parent"].is_null());
    assert_eq!(m["max_model_len"], 4096);

    post(
        &sim,
        "/v1/completions",
        json!({"prompt": "abcdabcd", "max_tokens": 3}),
    )
    .await;
    let text = sim.metrics().await;
    let l = "model_name=\"my-model\",engine=\"0\"";
    for needle in [
        format!("vllm:num_requests_running{{{l}}} 0\n"),
        format!("vllm:num_requests_waiting{{{l}}} 0\n"),
        format!("vllm:kv_cache_usage_perc{{{l}}} 0\n"),
        format!("vllm:prompt_tokens_total{{{l}}} 2\n"),
        format!("vllm:generation_tokens_total{{{l}}} 3\n"),
        format!("vllm:prefix_cache_queries_total{{{l}}} 2\n"),
        format!("vllm:prefix_cache_hits_total{{{l}}} 0\n"),
        format!("vllm:request_success_total{{{l},finished_reason=\"length\"}} 1\n"),
        format!("vllm:time_to_first_token_seconds_count{{{l}}} 1\n"),
        "num_gpu_blocks=\"100\"".to_string(),
        "block_size=\"16\"".to_string(),
        format!("engine_sim:held_requests{{{l}}} 0\n"),
        format!("engine_sim:released_blocks_total{{{l}}} 0\n"),
    ] {
        assert!(text.contains(&needle), "missing {needle:?} in:\n{text}");
    }
}

#[tokio::test]
async fn out_of_blocks_and_context_limits() {
    let sim = EngineSim::start(&[
        "--num-blocks",
        "2",
        "--block-size",
        "16",
        "--max-model-len",
        "100",
    ])
    .await;
    let (status, body) = post(&sim, "/v1/completions", prefill_body(&prompt_of(40))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_openai_error(&body, 503, "ServiceUnavailableError");
    let (status, _) = post(&sim, "/v1/completions", json!({"prompt": prompt_of(100)})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = post(
        &sim,
        "/v1/completions",
        json!({"prompt": prompt_of(10), "max_tokens": 91}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn listen_after_refuses_connections_until_bound() {
    let port = free_port();
    let port_s = port.to_string();
    let mut p = Proc::spawn(
        "engine-sim",
        &["--port", port_s.as_str(), "--listen-after-ms", "3000"],
        &[],
    );
    let url = format!("http://127.0.0.1:{port}/health");
    let early = try_http(Method::GET, &url, &[], Bytes::new(), Duration::from_secs(1)).await;
    assert!(
        early.is_err(),
        "answered before --listen-after-ms: {early:?}"
    );
    p.wait_ready(&url, READY_TIMEOUT).await;
}

/// The `dur` (ms) of `engine;dur=<ms>` in a Server-Timing value or SSE comment.
fn engine_dur_ms(text: &str) -> f64 {
    engine_duration_ms(text).unwrap_or_else(|| panic!("no engine timing in {text:?}"))
}

#[tokio::test]
async fn answers_report_the_engines_own_time() {
    let sim = EngineSim::start(&["--ttft-ms", "30"]).await;
    let url = format!("{}/v1/completions", sim.url());
    let body = json!({"prompt": "hello", "max_tokens": 2});
    let (status, headers, _) = http_post_json(&url, &body, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let timing = headers
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .expect("a whole answer carries server-timing");
    let dur = engine_dur_ms(timing);
    assert!((30.0..10_000.0).contains(&dur), "{timing}");

    let stream = json!({"prompt": "hello", "max_tokens": 2, "stream": true});
    let asked = [("x-sim-server-timing", "1")];
    let (status, _, bytes) = http_post_json(&url, &stream, &asked).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let comment = text
        .find(": server-timing engine;dur=")
        .unwrap_or_else(|| panic!("asked-for timing comment missing: {text}"));
    assert!(
        text[comment..].starts_with(": server-timing")
            && text[comment..].ends_with("data: [DONE]\n\n"),
        "the comment comes right before [DONE]: {text}"
    );
    assert!(engine_dur_ms(&text[comment..]) >= 30.0, "{text}");

    let (_, _, bytes) = http_post_json(&url, &stream, &[]).await;
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(!text.contains("server-timing"), "only when asked: {text}");
}

#[tokio::test]
async fn older_vllm_params_shape_by_flag_and_a_decode_takes_either() {
    let flat = EngineSim::start(&["--block-size", "16", "--kv-params", "flat"]).await;
    let (status, body) = post(&flat, "/v1/completions", prefill_body(&prompt_of(40))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let kv = &body["kv_transfer_params"];
    assert_eq!(kv["remote_block_ids"].as_array().unwrap().len(), 3, "{kv}");
    assert!(kv["remote_block_ids"][0].is_u64(), "{kv}");
    assert!(kv.get("remote_num_tokens").is_none(), "{kv}");
}
