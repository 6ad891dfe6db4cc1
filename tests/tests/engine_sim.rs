//! End-to-end tests of the `engine-sim` binary: real processes on loopback, driven over HTTP.

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
async fn prefill_role_holds_blocks_and_returns_handle() {
    let sim = EngineSim::start(&["--block-size", "16", "--engine-id", "prefill-0"]).await;
    // 40 tokens at 16 per block: 3 blocks.
    let (status, body) = post(&sim, "/v1/completions", prefill_body(&prompt_of(40))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], " tok0");
    assert_eq!(body["usage"]["completion_tokens"], 1);
    let kv = &body["kv_transfer_params"];
    assert_eq!(kv["do_remote_prefill"], true);
    assert_eq!(kv["do_remote_decode"], false);
    // vLLM 0.26's shape: one list of block ids per KV-cache group, the token count and when
    // the held blocks expire.
    let groups = kv["remote_block_ids"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{kv}");
    assert_eq!(groups[0].as_array().unwrap().len(), 3, "{kv}");
    assert_eq!(kv["remote_num_tokens"], 40, "{kv}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = kv["remote_blocks_expiry_time"].as_f64().unwrap();
    assert!(
        expiry > now + 400.0 && expiry < now + 500.0,
        "{expiry} vs {now}"
    );
    assert_eq!(kv["remote_engine_id"], "prefill-0");
    assert_eq!(kv["remote_host"], "127.0.0.1");
    assert_eq!(kv["remote_port"], sim.kv_port().await);
    assert_eq!(kv["tp_size"], 1);
    assert!(kv["remote_request_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    let state = sim.state().await;
    assert_eq!(state["held_requests"], 1, "{state}");
    assert_eq!(state["held_blocks"], 3, "{state}");

    // The legacy v1 form: the handle also at the top level.
    let (status, body) = post(
        &sim,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": prompt_of(17)}], "max_tokens": 1, "do_remote_decode": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["remote_block_ids"].as_array().unwrap().len(),
        2,
        "{body}"
    );
    assert_eq!(body["remote_engine_id"], "prefill-0");
    assert_eq!(body["remote_host"], "127.0.0.1");
    assert_eq!(body["remote_port"], sim.kv_port().await);
    assert_eq!(sim.state().await["held_blocks"], 5);
    assert!(sim
        .metrics()
        .await
        .contains("engine_sim:held_blocks{model_name=\"sim-model\",engine=\"0\"} 5\n"));
}

#[tokio::test]
async fn decode_role_releases_prefill_blocks() {
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let prompt = prompt_of(40);
    let (_, pbody) = post(&prefill, "/v1/completions", prefill_body(&prompt)).await;
    let kv = pbody["kv_transfer_params"].clone();
    assert_eq!(prefill.state().await["held_blocks"], 3);

    // A handle whose block count does not match the prompt is refused.
    let mut wrong = kv.clone();
    wrong["remote_block_ids"] = json!([1]);
    let (status, body) = post(
        &decode,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 5, "kv_transfer_params": wrong}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("remote_block_ids"));
    let mut no_host = kv.clone();
    no_host.as_object_mut().unwrap().remove("remote_host");
    let (status, _) = post(
        &decode,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 5, "kv_transfer_params": no_host}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        prefill.state().await["held_blocks"],
        3,
        "refused decodes release nothing"
    );

    let (status, body) = post(
        &decode,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 5, "kv_transfer_params": kv}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], " tok0 tok1 tok2 tok3 tok4");
    assert!(body["kv_transfer_params"].is_null());
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 40);

    let state = poll_until(WAIT, "the prefill engine to free its blocks", || async {
        let s = prefill.state().await;
        (s["held_blocks"] == 0).then_some(s)
    })
    .await;
    assert_eq!(state["held_requests"], 0);
    assert_eq!(state["released_total"], 3);
    assert_eq!(state["expired_total"], 0);
    let d = decode.state().await;
    assert_eq!(
        (d["kv_pulls_ok"].as_u64(), d["kv_pulls_failed"].as_u64()),
        (Some(1), Some(0)),
        "{d}"
    );
    assert_eq!(d["kv_integrity_failures"], 0);

    // A second notification for the same request is unknown.
    let id = pbody["kv_transfer_params"]["remote_request_id"]
        .as_str()
        .unwrap();
    let (status, body) = post(
        &prefill,
        "/sim/release",
        json!({"notif": format!("{id}:1")}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_openai_error(&body, 404, "NotFoundError");
}

#[tokio::test]
async fn unreachable_prefill_falls_back_to_local_prefill() {
    let decode = EngineSim::start(&["--kv-pull-timeout-ms", "2000"]).await;
    let dead_port = free_port();
    let (status, body) = post(
        &decode,
        "/v1/completions",
        json!({"prompt": prompt_of(16), "max_tokens": 2, "kv_transfer_params": {
            "do_remote_prefill": true, "do_remote_decode": false, "remote_block_ids": [7],
            "remote_engine_id": "x", "remote_request_id": "r1", "remote_host": "127.0.0.1",
            "remote_port": dead_port, "tp_size": 1
        }}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "prefilled locally: {body}"
    );
    let s = decode.state().await;
    assert_eq!(
        (s["kv_pulls_failed"].as_u64(), s["kv_pulls_ok"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );
}

#[tokio::test]
async fn held_blocks_expire_after_hold_timeout() {
    let sim = EngineSim::start(&["--hold-timeout-s", "1"]).await;
    let (status, _) = post(&sim, "/v1/completions", prefill_body(&prompt_of(20))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sim.state().await["held_blocks"], 2);
    let state = poll_until(WAIT, "held blocks to expire", || async {
        let s = sim.state().await;
        (s["held_blocks"] == 0).then_some(s)
    })
    .await;
    assert_eq!(state["held_requests"], 0);
    assert_eq!(state["expired_total"], 2);
    assert_eq!(state["released_total"], 0);
    assert!(sim
        .metrics()
        .await
        .contains("engine_sim:expired_blocks_total"));
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let sim = EngineSim::start(&[]).await;
    let url = format!("{}/v1/completions", sim.url());
    let (status, headers, body) = http(
        Method::POST,
        &url,
        &[("content-type", "application/json")],
        Bytes::from_static(b"{not json"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["content-type"], "application/json");
    assert_openai_error(&json(&body), 400, "BadRequestError");

    let (status, body) = post(&sim, "/v1/completions", json!({"max_tokens": 3})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("prompt"));
    let (status, body) = post(&sim, "/v1/chat/completions", json!({"model": "sim-model"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("messages"));
    let (status, _) = post(
        &sim,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": "many"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, body) = post(
        &sim,
        "/v1/completions",
        json!({"model": "other", "prompt": "x"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_openai_error(&body, 404, "NotFoundError");
    assert_eq!(
        body["error"]["message"],
        "The model `other` does not exist."
    );

    let (status, _, body) = http_get(&format!("{}/no/such/path", sim.url())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_openai_error(&json(&body), 404, "NotFoundError");
}

#[tokio::test]
async fn fail_next_and_scoped_faults() {
    let sim = EngineSim::start(&[]).await;
    sim.set_faults(json!({"fail_next": 2, "error_status": 503}))
        .await;
    let body = json!({"prompt": "hi", "max_tokens": 1});
    for _ in 0..2 {
        let (status, err) = post(&sim, "/v1/completions", body.clone()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_openai_error(&err, 503, "ServiceUnavailableError");
    }
    let (status, _) = post(&sim, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let (_, _, faults) = http_get(&format!("{}/sim/faults", sim.url())).await;
    let faults = json(&faults);
    assert_eq!(faults["fail_next"], 0);
    assert_eq!(faults["error_status"], 503);

    // Scope prefill: only prefill-role requests fail.
    sim.set_faults(json!({"error_rate": 1.0, "error_status": 502, "scope": "prefill"}))
        .await;
    let (status, _) = post(&sim, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = post(&sim, "/v1/completions", prefill_body("hi")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        sim.state().await["held_blocks"],
        0,
        "a failed prefill holds nothing"
    );

    // Invalid configs are refused and leave the current one alone.
    let (status, _) = post(&sim, "/sim/faults", json!({"error_rate": 3})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = post(&sim, "/sim/faults", json!({"fail-next": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, _, faults) = http_get(&format!("{}/sim/faults", sim.url())).await;
    assert_eq!(json(&faults)["scope"], "prefill");
}

#[tokio::test]
async fn error_rate_flag_fails_requests() {
    let sim = EngineSim::start(&["--error-rate", "1", "--error-status", "504"]).await;
    let (status, body) = post(&sim, "/v1/completions", json!({"prompt": "hi"})).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_openai_error(&body, 504, "InternalServerError");
    // Non-generation routes are never faulted.
    let (status, _, _) = http_get(&format!("{}/v1/models", sim.url())).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn hang_faults_never_answer() {
    let sim = EngineSim::start(&["--hang-rate", "1"]).await;
    let r = try_http(
        Method::POST,
        &format!("{}/v1/completions", sim.url()),
        &[],
        Bytes::from(json!({"prompt": "hi"}).to_string()),
        Duration::from_millis(500),
    )
    .await;
    assert!(r.is_err(), "a hung request was answered: {r:?}");
    let reqs = sim.requests().await;
    assert_eq!(reqs.len(), 1);
    assert!(reqs[0]["status"].is_null());
    assert_eq!(reqs[0]["completed"], false);
}

#[tokio::test]
async fn request_log_records_body_headers_and_status() {
    let sim = EngineSim::start(&[]).await;
    let body = json!({"prompt": "hello", "max_tokens": 2});
    let (status, headers, resp) = http_post_json(
        &format!("{}/v1/completions?trace=1", sim.url()),
        &body,
        &[("X-Request-Id", "req-42"), ("X-Custom", "abc")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-request-id"], "req-42");
    assert_eq!(json(&resp)["id"], "cmpl-req-42");
    // Neither of these is recorded.
    http_get(&format!("{}/health", sim.url())).await;
    http_get(&format!("{}/metrics", sim.url())).await;
    let (status, _, _) = http_get(&format!("{}/v1/models", sim.url())).await;
    assert_eq!(status, StatusCode::OK);

    let reqs = sim.requests().await;
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    let r = &reqs[0];
    assert_eq!(r["method"], "POST");
    assert_eq!(r["path"], "/v1/completions");
    assert_eq!(r["query"], "trace=1");
    assert_eq!(r["body"], body);
    assert_eq!(r["headers"]["x-request-id"], "req-42");
    assert_eq!(r["headers"]["x-custom"], "abc");
    assert_eq!(r["headers"]["content-type"], "application/json");
    assert_eq!(r["status"], 200);
    assert_eq!(r["completed"], true);
    assert_eq!(r["cancelled"], false);
    assert!(r["received_ms"].as_u64().unwrap() > 0);
    assert_eq!(reqs[1]["path"], "/v1/models");
    assert!(reqs[1]["body"].is_null());
    assert!(reqs[1]["seq"].as_u64().unwrap() > r["seq"].as_u64().unwrap());

    sim.clear_requests().await;
    assert!(sim.requests().await.is_empty());
}

/// Sends a raw HTTP/1.1 request, waits until the simulator has logged it, then disconnects
/// after reading `read_first` bytes of the answer (0: without reading anything).
async fn disconnect_mid_request(sim: &EngineSim, body: &Value, read_first: usize) {
    let mut sock = TcpStream::connect(("127.0.0.1", sim.port())).await.unwrap();
    let body = body.to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(body.as_bytes()).await.unwrap();
    if read_first > 0 {
        let mut buf = vec![0u8; read_first];
        tokio::time::timeout(WAIT, sock.read_exact(&mut buf))
            .await
            .expect("first bytes of the answer")
            .unwrap();
    }
    poll_until(WAIT, "the request to be logged", || async {
        (!sim.requests().await.is_empty()).then_some(())
    })
    .await;
    drop(sock);
}

#[tokio::test]
async fn client_disconnect_is_recorded_as_cancelled() {
    // Non-streaming: the handler is still waiting for its first token.
    let sim = EngineSim::start(&["--ttft-ms", "60000"]).await;
    disconnect_mid_request(&sim, &json!({"prompt": "slow", "max_tokens": 2}), 0).await;
    let r = poll_until(WAIT, "the request to be marked cancelled", || async {
        let reqs = sim.requests().await;
        (reqs[0]["cancelled"] == true).then(|| reqs[0].clone())
    })
    .await;
    assert_eq!(r["completed"], false);
    assert!(r["status"].is_null());
    let metrics = sim.metrics().await;
    assert!(
        metrics.contains("vllm:num_requests_running{model_name=\"sim-model\",engine=\"0\"} 0\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn dropped_stream_is_recorded_as_cancelled() {
    let sim = EngineSim::start(&["--itl-ms", "500"]).await;
    // Read the response head, then hang up before [DONE] (a 100-token stream takes ~50 s).
    disconnect_mid_request(
        &sim,
        &json!({"prompt": "slow", "max_tokens": 100, "stream": true}),
        12,
    )
    .await;
    let r = poll_until(WAIT, "the stream to be marked cancelled", || async {
        let reqs = sim.requests().await;
        (reqs[0]["cancelled"] == true).then(|| reqs[0].clone())
    })
    .await;
    assert_eq!(r["status"], 200);
    assert_eq!(r["completed"], false);
    poll_until(WAIT, "the aborted request to be counted", || async {
        sim.metrics()
            .await
            .contains("finished_reason=\"abort\"} 1\n")
            .then_some(())
    })
    .await;
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
