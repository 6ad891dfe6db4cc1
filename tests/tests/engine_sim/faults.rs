//! Bad input, injected faults (`/sim/fault`, `--error-rate`, hangs), the request log, and
//! clients that go away mid-request.

use super::*;

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
