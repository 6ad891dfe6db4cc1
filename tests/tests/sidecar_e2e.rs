//! pd-sidecar end to end: real `engine-sim` processes as prefill and decode
//! engines, a real `pd-sidecar` process in front of the decode engine, real
//! HTTP on loopback. Each test asserts what a user or the engines would see.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tandem_tests::harness::{
    free_port, http, http_get, http_post_json, http_post_stream, json, poll_until, prom_sample,
    start_test_sidecar as start_sidecar, try_http, EngineSim, Proc, Sidecar, READY_TIMEOUT,
};

async fn metrics(sidecar: &Sidecar) -> String {
    sidecar.metrics().await.unwrap_or_else(|e| panic!("{e}"))
}

/// POSTs `body` through the sidecar, naming `prefiller` as the prefill engine.
async fn pd_post(
    sidecar: &Sidecar,
    path: &str,
    body: &Value,
    prefiller: &str,
) -> (StatusCode, http::HeaderMap, Bytes) {
    http_post_json(
        &sidecar.url(path),
        body,
        &[("x-prefiller-host-port", prefiller)],
    )
    .await
}

/// Waits until the engine's first inference request is logged as cancelled.
async fn first_cancelled(sim: &EngineSim) -> Value {
    poll_until(Duration::from_secs(10), "a cancelled request", || async {
        sim.inference_requests()
            .await
            .first()
            .filter(|r| r["cancelled"] == true)
            .cloned()
    })
    .await
}

async fn only_request(sim: &EngineSim) -> Value {
    let mut reqs = sim.inference_requests().await;
    assert_eq!(reqs.len(), 1, "expected exactly one request, got {reqs:#?}");
    reqs.remove(0)
}

fn long_prompt() -> String {
    "The quick brown fox jumps over the lazy dog. ".repeat(40)
}

async fn cluster(decode_args: &[&str], sidecar_args: &[&str]) -> (EngineSim, EngineSim, Sidecar) {
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(decode_args).await;
    let sidecar = start_sidecar(decode.port(), sidecar_args).await;
    (prefill, decode, sidecar)
}

const NULL_PARAMS: &str = r#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#;

#[tokio::test]
async fn nixlv2_prefill_and_decode_bodies_on_every_route() {
    let (prefill, decode, sidecar) = cluster(&[], &[]).await;
    let hp = prefill.host_port();
    let cases = [
        (
            "/v1/completions",
            json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 7, "stream": false, "temperature": 0.3}),
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "sim-model", "messages": [{"role": "user", "content": long_prompt()}], "max_completion_tokens": 7}),
            "max_completion_tokens",
        ),
        (
            "/v1/responses",
            json!({"model": "sim-model", "input": long_prompt(), "max_output_tokens": 7}),
            "max_output_tokens",
        ),
        (
            "/inference/v1/generate",
            json!({"model": "sim-model", "token_ids": (0..300).collect::<Vec<u32>>(), "sampling_params": {"max_tokens": 7, "temperature": 0}}),
            "",
        ),
    ];
    for (path, body, limit) in cases {
        prefill.clear_requests().await;
        decode.clear_requests().await;
        let (status, headers, resp) =
            http_post_json(&sidecar.url(path), &body, &[("x-prefiller-host-port", &hp)]).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{path}: {}",
            String::from_utf8_lossy(&resp)
        );
        assert!(headers.contains_key("x-request-id"));

        let p = only_request(&prefill).await;
        assert_eq!(p["path"], path);
        let pb = &p["body"];
        assert_eq!(
            pb["kv_transfer_params"],
            serde_json::from_str::<Value>(NULL_PARAMS).unwrap(),
            "{path}"
        );
        assert_eq!(pb["stream"], false, "{path}");
        assert!(pb.get("stream_options").is_none(), "{path}");
        match path {
            "/v1/completions" | "/v1/chat/completions" => {
                for f in ["max_tokens", "max_completion_tokens", "min_tokens"] {
                    assert_eq!(pb[f], 1, "{path} {f}");
                }
                assert_eq!(pb["temperature"], body["temperature"]);
            }
            "/v1/responses" => assert_eq!(pb["max_output_tokens"], 1),
            _ => {
                assert_eq!(pb["sampling_params"]["max_tokens"], 1);
                assert_eq!(pb["sampling_params"]["min_tokens"], 1);
                assert_eq!(pb["sampling_params"]["temperature"], 0);
            }
        }

        let d = only_request(&decode).await;
        let db = &d["body"];
        let params = &db["kv_transfer_params"];
        assert_eq!(params["do_remote_prefill"], true, "{path}: {db}");
        assert_eq!(params["remote_engine_id"], prefill.engine_id());
        assert_eq!(params["remote_port"], prefill.kv_port().await);
        assert!(params["remote_block_ids"]
            .as_array()
            .is_some_and(|b| !b.is_empty()));
        // The client's own fields come back; the ones it never sent stay absent.
        if !limit.is_empty() {
            assert_eq!(db[limit], 7, "{path}");
        }
        if path == "/inference/v1/generate" {
            assert_eq!(db["sampling_params"], body["sampling_params"]);
        }
        for absent in ["min_tokens", "stream_options"] {
            assert!(db.get(absent).is_none(), "{path}: {absent} in {db}");
        }
        if path == "/v1/chat/completions" {
            assert!(
                db.get("max_tokens").is_none() && db.get("stream").is_none(),
                "{db}"
            );
        }
        assert_eq!(p["headers"]["x-request-id"], d["headers"]["x-request-id"]);
        assert_eq!(
            d["headers"]["x-request-id"],
            headers["x-request-id"].to_str().unwrap()
        );
    }
    // The decode engine told the prefill engine to free the blocks.
    poll_until(
        Duration::from_secs(10),
        "prefill blocks released",
        || async { (prefill.state().await["held_blocks"] == 0).then_some(()) },
    )
    .await;
    let metrics = metrics(&sidecar).await;
    assert!(
        metrics.contains(
            r#"pd_sidecar_requests_total{route="/v1/chat/completions",decision="remote"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn streaming_decode_restores_stream_fields_and_arrives_event_by_event() {
    let (prefill, decode, sidecar) = cluster(&["--itl-ms", "150"], &[]).await;
    let body = json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 6, "stream": true,
        "stream_options": {"include_usage": true}});
    let started = Instant::now();
    let resp = http_post_stream(
        &sidecar.url("/v1/completions"),
        &body,
        &[("x-prefiller-host-port", &prefill.host_port())],
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert!(resp.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = resp.events().await;
    assert!(events.last().unwrap().is_done());
    let content: Vec<_> = events
        .iter()
        .filter(|e| !e.is_done() && !e.json()["choices"].as_array().unwrap().is_empty())
        .collect();
    assert_eq!(content.len(), 6);
    // Six tokens 150 ms apart: a proxy that buffered would deliver them together.
    let spread = content.last().unwrap().at - content[0].at;
    assert!(
        spread >= Duration::from_millis(600),
        "events arrived together: spread {spread:?}"
    );
    assert!(content[0].at - started < started.elapsed() - Duration::from_millis(500));
    // usage chunk: cached_tokens is the prefill engine's count, not the decode engine's.
    let usage = events
        .iter()
        .rev()
        .find(|e| !e.is_done() && !e.json()["usage"].is_null())
        .unwrap()
        .json();
    let prefill_req = only_request(&prefill).await;
    assert_eq!(prefill_req["body"]["stream"], false);
    let d = only_request(&decode).await;
    assert_eq!(d["body"]["stream"], true);
    assert_eq!(d["body"]["stream_options"], json!({"include_usage": true}));
    assert_eq!(d["body"]["max_tokens"], 6);
    assert_eq!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{usage}"
    );
}

#[tokio::test]
async fn non_streaming_usage_reports_prefill_cached_tokens() {
    let (prefill, _decode, sidecar) = cluster(&[], &[]).await;
    let body = json!({"model": "sim-model", "messages": [{"role": "user", "content": long_prompt()}], "max_tokens": 2});
    let (status, _, resp) = pd_post(
        &sidecar,
        "/v1/chat/completions",
        &body,
        &prefill.host_port(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let resp = json(&resp);
    let prefill_cached = only_request(&prefill).await;
    assert_eq!(prefill_cached["status"], 200);
    assert_eq!(
        resp["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{resp}"
    );
    assert_eq!(resp["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn other_connectors_send_their_protocol() {
    // nixl v1: fields at the top level.
    let (prefill, decode, sidecar) = cluster(&[], &["--kv-connector=nixl"]).await;
    let body = json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 4});
    let (status, _, _) = pd_post(&sidecar, "/v1/completions", &body, &prefill.host_port()).await;
    assert_eq!(status, StatusCode::OK);
    let p = only_request(&prefill).await;
    assert_eq!(p["body"]["do_remote_decode"], true);
    assert!(p["body"].get("kv_transfer_params").is_none());
    let d = only_request(&decode).await;
    assert_eq!(d["body"]["do_remote_prefill"], true);
    assert_eq!(d["body"]["remote_engine_id"], prefill.engine_id());
    assert_eq!(d["body"]["max_tokens"], 4);
    drop(sidecar);

    // shared-storage (and its old name lmcache): prefill limited, decode gets the client's body.
    for name in ["shared-storage", "lmcache"] {
        prefill.clear_requests().await;
        decode.clear_requests().await;
        let sidecar = start_sidecar(decode.port(), &[&format!("--kv-connector={name}")]).await;
        let (status, _, _) =
            pd_post(&sidecar, "/v1/completions", &body, &prefill.host_port()).await;
        assert_eq!(status, StatusCode::OK);
        let p = only_request(&prefill).await;
        assert_eq!(p["body"]["max_tokens"], 1);
        assert!(p["body"].get("kv_transfer_params").is_none());
        assert_eq!(only_request(&decode).await["body"], body, "{name}");
    }

    // sglang: both legs with the same bootstrap room.
    prefill.clear_requests().await;
    decode.clear_requests().await;
    let sidecar = start_sidecar(
        decode.port(),
        &["--kv-connector=sglang", "--sglang-bootstrap-port=9911"],
    )
    .await;
    let (status, _, _) = pd_post(&sidecar, "/v1/completions", &body, &prefill.host_port()).await;
    assert_eq!(status, StatusCode::OK);
    let p = poll_until(Duration::from_secs(5), "sglang prefill leg", || async {
        prefill.inference_requests().await.pop()
    })
    .await;
    let d = only_request(&decode).await;
    for leg in [&p["body"], &d["body"]] {
        assert_eq!(leg["bootstrap_host"], "127.0.0.1");
        assert_eq!(leg["bootstrap_port"], 9911);
        assert_eq!(leg["max_tokens"], 4);
    }
    assert_eq!(p["body"]["bootstrap_room"], d["body"]["bootstrap_room"]);
}

#[tokio::test]
async fn routing_headers_are_stripped_and_ids_propagate() {
    let (prefill, decode, sidecar) = cluster(&[], &[]).await;
    let body = json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 2});
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let target = format!("http://{} , 127.0.0.1:1", prefill.host_port());
    let (status, headers, _) = http_post_json(
        &sidecar.url("/v1/completions"),
        &body,
        &[
            ("x-prefiller-host-port", &target),
            ("x-encoder-hosts-ports", "127.0.0.1:2"),
            ("x-kv-cache-source-host-port", "127.0.0.1:3"),
            ("x-data-parallel-host-port", "127.0.0.1:4"),
            ("x-request-id", "client-id-123"),
            ("traceparent", traceparent),
            ("authorization", "Bearer secret"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-request-id"], "client-id-123");
    let p = only_request(&prefill).await;
    let d = only_request(&decode).await;
    for leg in [&p, &d] {
        let h = &leg["headers"];
        for gone in [
            "x-prefiller-host-port",
            "x-encoder-hosts-ports",
            "x-kv-cache-source-host-port",
            "x-data-parallel-host-port",
        ] {
            assert!(h.get(gone).is_none(), "{gone} reached an engine: {h}");
        }
        assert_eq!(h["x-request-id"], "client-id-123");
        assert_eq!(h["traceparent"], traceparent);
        assert_eq!(h["authorization"], "Bearer secret");
    }
    // Passthrough paths lose the routing headers too.
    let (status, _, _) = http(
        Method::GET,
        &sidecar.url("/v1/models"),
        &[("x-prefiller-host-port", "127.0.0.1:9")],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let models = decode
        .requests()
        .await
        .into_iter()
        .find(|r| r["path"] == "/v1/models")
        .unwrap();
    assert!(models["headers"].get("x-prefiller-host-port").is_none());
}

#[tokio::test]
async fn threshold_keeps_short_prompts_local() {
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let sidecar = start_sidecar(decode.port(), &["--prefill-threshold-tokens=256"]).await;
    let hp = prefill.host_port();
    let short = json!({"model": "sim-model", "prompt": "short prompt", "max_tokens": 2});
    let (status, _, _) = pd_post(&sidecar, "/v1/completions", &short, &hp).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        prefill.inference_requests().await.is_empty(),
        "short prompt was sent to prefill"
    );
    assert_eq!(
        only_request(&decode).await["body"],
        short,
        "local prefill must forward the body unchanged"
    );

    let long = json!({"model": "sim-model", "prompt": "x".repeat(4 * 300), "max_tokens": 2});
    let (status, _, _) = pd_post(&sidecar, "/v1/completions", &long, &hp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        prefill.inference_requests().await.len(),
        1,
        "long prompt must be prefilled remotely"
    );
    let metrics = metrics(&sidecar).await;
    assert!(
        metrics.contains(r#"decision="local"} 1"#) && metrics.contains(r#"decision="remote"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn prefill_down_retries_then_falls_back() {
    let decode = EngineSim::start(&[]).await;
    let dead = free_port();
    let sidecar = start_sidecar(decode.port(), &["--prefill-max-retries=2"]).await;
    let body = json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 3});
    let (status, _, resp) = pd_post(
        &sidecar,
        "/v1/completions",
        &body,
        &format!("127.0.0.1:{dead}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(json(&resp)["usage"]["completion_tokens"], 3);
    // Local prefill: the client's body, untouched.
    assert_eq!(only_request(&decode).await["body"], body);
    let metrics = metrics(&sidecar).await;
    assert!(
        metrics.contains("pd_sidecar_prefill_retries_total 2"),
        "{metrics}"
    );
    assert!(metrics.contains(r#"decision="fallback"} 1"#), "{metrics}");
    assert!(
        metrics.contains(r#"pd_sidecar_errors_total{class="prefill_unreachable"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn prefill_5xx_is_retried_and_persistent_5xx_falls_back() {
    let (prefill, decode, sidecar) = cluster(&[], &["--prefill-max-retries=2"]).await;
    let hp = prefill.host_port();
    let body = json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 2});
    // One 503, then success: still disaggregated.
    prefill
        .set_faults(json!({"fail_next": 1, "error_status": 503}))
        .await;
    let (status, _, _) = pd_post(&sidecar, "/v1/completions", &body, &hp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(prefill.inference_requests().await.len(), 2);
    assert!(only_request(&decode).await["body"]["kv_transfer_params"]["do_remote_prefill"] == true);

    // 503 on every attempt: 1 + 2 retries, then served locally.
    prefill.clear_requests().await;
    decode.clear_requests().await;
    prefill
        .set_faults(json!({"fail_next": 10, "error_status": 503}))
        .await;
    let (status, _, _) = pd_post(&sidecar, "/v1/completions", &body, &hp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(prefill.inference_requests().await.len(), 3);
    assert_eq!(only_request(&decode).await["body"], body);

    // 500 is not retried.
    prefill.clear_requests().await;
    prefill
        .set_faults(json!({"fail_next": 10, "error_status": 500}))
        .await;
    let (status, _, _) = pd_post(&sidecar, "/v1/completions", &body, &hp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(prefill.inference_requests().await.len(), 1);
}

#[tokio::test]
async fn prefill_timeout_falls_back() {
    let prefill = EngineSim::start(&["--prefill-delay-ms", "20000"]).await;
    let decode = EngineSim::start(&[]).await;
    let sidecar = start_sidecar(decode.port(), &["--prefill-timeout=300ms"]).await;
    let body = json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 2});
    let started = Instant::now();
    let (status, _, _) = pd_post(&sidecar, "/v1/completions", &body, &prefill.host_port()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the prefill deadline was not applied"
    );
    assert_eq!(only_request(&decode).await["body"], body);
    assert!(metrics(&sidecar)
        .await
        .contains(r#"class="prefill_timeout"} 1"#));
    // The abandoned prefill request was cancelled, not left running.
    first_cancelled(&prefill).await;
}

#[tokio::test]
async fn fail_mode_relays_prefill_errors() {
    let (prefill, decode, sidecar) = cluster(
        &[],
        &["--on-prefill-failure=fail", "--prefill-max-retries=0"],
    )
    .await;
    let body = json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 2});
    prefill
        .set_faults(json!({"fail_next": 1, "error_status": 500}))
        .await;
    let (status, headers, resp) =
        pd_post(&sidecar, "/v1/completions", &body, &prefill.host_port()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(headers["x-pd-error-code"], "prefill_status");
    assert!(json(&resp)["error"]["message"].is_string());
    assert!(
        decode.inference_requests().await.is_empty(),
        "fail mode must not reach decode"
    );
    // A relayed error is counted once.
    let m = metrics(&sidecar).await;
    assert!(
        m.contains(r#"pd_sidecar_errors_total{class="prefill_status"} 1"#),
        "{m}"
    );

    let dead = free_port();
    let (status, headers, resp) = pd_post(
        &sidecar,
        "/v1/completions",
        &body,
        &format!("127.0.0.1:{dead}"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["x-pd-error-code"], "prefill_unreachable");
    assert_eq!(json(&resp)["error"]["code"], 502);
}

#[tokio::test]
async fn client_disconnect_cancels_the_prefill_leg() {
    let prefill = EngineSim::start(&["--prefill-delay-ms", "30000"]).await;
    let decode = EngineSim::start(&[]).await;
    let sidecar = start_sidecar(decode.port(), &[]).await;
    let body = Bytes::from(
        json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 2}).to_string(),
    );
    let hp = prefill.host_port();
    let headers = [
        ("content-type", "application/json"),
        ("x-prefiller-host-port", hp.as_str()),
    ];
    // The client gives up while the prefill is still running.
    let gave_up = try_http(
        Method::POST,
        &sidecar.url("/v1/completions"),
        &headers,
        body,
        Duration::from_millis(500),
    )
    .await;
    assert!(gave_up.is_err());
    let cancelled = first_cancelled(&prefill).await;
    assert_eq!(cancelled["completed"], false);
    assert!(decode.inference_requests().await.is_empty());
}

#[tokio::test]
async fn decode_refused_is_503_json() {
    let dead = free_port();
    let sidecar = start_sidecar(dead, &[]).await;
    let body = json!({"model": "sim-model", "prompt": "hi"});
    let (status, headers, resp) = http_post_json(&sidecar.url("/v1/completions"), &body, &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-pd-error-code"], "decode_unavailable");
    assert_eq!(json(&resp)["error"]["code"], 503);
    let (status, _, _) = http_get(&sidecar.url("/v1/models")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, _) = http_get(&sidecar.url("/ready")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, _) = http_get(&sidecar.url("/health")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn bad_json_is_400_and_oversize_is_413() {
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let sidecar = start_sidecar(decode.port(), &["--max-body-bytes=1000"]).await;
    let url = sidecar.url("/v1/chat/completions");
    let hp = prefill.host_port();
    let pd = [
        ("content-type", "application/json"),
        ("x-prefiller-host-port", hp.as_str()),
    ];
    let (status, headers, resp) =
        http(Method::POST, &url, &pd, Bytes::from_static(b"{not json")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["x-pd-error-code"], "invalid_json");
    assert_eq!(json(&resp)["error"]["type"], "BadRequestError");
    let (status, headers, _) = http(Method::POST, &url, &pd, Bytes::from_static(b"[1,2]")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["x-pd-error-code"], "invalid_request");
    assert!(
        prefill.inference_requests().await.is_empty(),
        "bad requests must not reach prefill"
    );
    assert!(
        decode.inference_requests().await.is_empty(),
        "bad requests must not reach decode"
    );

    // Without a prefiller the sidecar is transparent: the engine judges the body.
    let ct = [("content-type", "application/json")];
    let (status, headers, resp) =
        http(Method::POST, &url, &ct, Bytes::from_static(b"{not json")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(headers.get("x-pd-error-code").is_none());
    assert!(json(&resp)["error"]["message"].is_string());

    let big =
        json!({"model": "sim-model", "messages": [{"role": "user", "content": "x".repeat(2000)}]});
    for headers in [&pd[..], &ct[..]] {
        let (status, h, resp) =
            http(Method::POST, &url, headers, Bytes::from(big.to_string())).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(h["x-pd-error-code"], "body_too_large");
        assert_eq!(json(&resp)["error"]["code"], 413);
    }
    assert_eq!(
        decode.inference_requests().await.len(),
        1,
        "only the transparent bad-JSON request"
    );
}

#[tokio::test]
async fn modelservice_legacy_flags_work() {
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let port = free_port();
    let args = [
        format!("--port={port}"),
        format!("--vllm-port={}", decode.port()),
        "--connector=nixlv2".to_string(),
        "--secure-proxy=false".to_string(),
        "--metrics-port=0".to_string(),
        "--zap-log-level=debug".to_string(),
        "--prefill-threshold-tokens=0".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proc = Proc::spawn("pd-sidecar", &args, &[]);
    proc.wait_ready(&format!("http://127.0.0.1:{port}/ready"), READY_TIMEOUT)
        .await;
    let body = json!({"model": "sim-model", "prompt": "hello", "max_tokens": 2});
    let (status, _, _) = http_post_json(
        &format!("http://127.0.0.1:{port}/v1/completions"),
        &body,
        &[("x-prefiller-host-port", &prefill.host_port())],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(prefill.inference_requests().await.len(), 1);

    // An unknown flag is an error that names it.
    let out = std::process::Command::new(tandem_tests::harness::bin_path("pd-sidecar"))
        .arg("--no-such-flag=1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}

#[tokio::test]
async fn tls_in_and_out() {
    // Client -> sidecar A (plain) -> prefill over TLS to sidecar B (self-signed) -> prefill engine.
    // B fronts a prefill engine for TLS only: its clients are sidecars, whose
    // transfer parameters it must pass on.
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let b_port = free_port();
    let b_args = [
        format!("--port={b_port}"),
        format!("--vllm-port={}", prefill.port()),
        "--metrics-port=0".into(),
        "--trust-client-kv-transfer-params".into(),
    ];
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let mut b = Proc::spawn("pd-sidecar", &b_args, &[]);
    // B serves TLS only: a plain HTTP probe must not get a 200.
    poll_until(Duration::from_secs(10), "TLS sidecar listening", || async {
        std::net::TcpStream::connect(("127.0.0.1", b_port))
            .ok()
            .map(|_| ())
    })
    .await;
    assert!(b.exited().is_none());
    let plain = try_http(
        Method::GET,
        &format!("http://127.0.0.1:{b_port}/health"),
        &[],
        Bytes::new(),
        Duration::from_secs(2),
    )
    .await;
    assert!(
        !matches!(plain, Ok((StatusCode::OK, _, _))),
        "TLS port answered plain HTTP"
    );

    let a = start_sidecar(
        decode.port(),
        &[
            "--prefiller-use-tls=true",
            "--prefiller-tls-insecure-skip-verify=true",
        ],
    )
    .await;
    let body = json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 2});
    let (status, _, resp) =
        pd_post(&a, "/v1/completions", &body, &format!("127.0.0.1:{b_port}")).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(
        only_request(&prefill).await["body"]["kv_transfer_params"]["do_remote_decode"],
        true
    );
    assert_eq!(
        only_request(&decode).await["body"]["kv_transfer_params"]["do_remote_prefill"],
        true
    );

    // With verification on, the self-signed certificate is refused and the request falls back.
    let strict = start_sidecar(decode.port(), &["--enable-tls=prefiller"]).await;
    let (status, _, _) = pd_post(
        &strict,
        "/v1/completions",
        &body,
        &format!("127.0.0.1:{b_port}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(metrics(&strict).await.contains(r#"decision="fallback"} 1"#));
}

#[tokio::test]
async fn sglang_prefill_failure_fails_the_decode_fast() {
    let prefill = EngineSim::start(&[]).await;
    // A decode engine that would wait a long time for its KV cache.
    let decode = EngineSim::start(&["--ttft-ms", "60000"]).await;
    let sidecar = start_sidecar(
        decode.port(),
        &[
            "--kv-connector=sglang",
            "--on-prefill-failure=fail",
            "--prefill-max-retries=0",
        ],
    )
    .await;
    prefill
        .set_faults(json!({"fail_next": 1, "error_status": 500}))
        .await;
    let body = json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 2});
    let started = Instant::now();
    let (status, headers, _) =
        pd_post(&sidecar, "/v1/completions", &body, &prefill.host_port()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(headers["x-pd-error-code"], "prefill_status");
    assert!(started.elapsed() < Duration::from_secs(20));
    // The decode request was dropped: either it never reached the engine (the
    // prefill failed first) or the engine saw it cancelled.
    poll_until(
        Duration::from_secs(10),
        "the decode leg cancelled",
        || async {
            let reqs = decode.inference_requests().await;
            reqs.iter().all(|r| r["cancelled"] == true).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn sglang_prefill_outliving_the_decode_answer_is_not_cancelled() {
    // The prefill leg answers well after the decode engine has finished.
    let prefill = EngineSim::start(&["--ttft-ms", "400"]).await;
    let decode = EngineSim::start(&[]).await;
    let sidecar = start_sidecar(decode.port(), &["--kv-connector=sglang"]).await;
    let body = json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 2});
    let (status, _, _) = pd_post(&sidecar, "/v1/completions", &body, &prefill.host_port()).await;
    assert_eq!(status, StatusCode::OK);
    let p = poll_until(
        Duration::from_secs(10),
        "the prefill leg to end",
        || async {
            prefill
                .inference_requests()
                .await
                .pop()
                .filter(|r| r["completed"] == true || r["cancelled"] == true)
        },
    )
    .await;
    assert_eq!(p["cancelled"], false, "{p:#}");
    assert_eq!(only_request(&decode).await["completed"], true);
}

#[tokio::test]
async fn passthrough_streams_other_paths() {
    let decode = EngineSim::start(&[]).await;
    let sidecar = start_sidecar(decode.port(), &[]).await;
    let (status, _, body) = http_get(&sidecar.url("/v1/models")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["data"][0]["id"], "sim-model");
    let (status, _, body) = http_get(&sidecar.url("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("vllm:num_requests_running"));
    let (status, _, _) = http(
        Method::POST,
        &sidecar.url("/tokenize?x=1"),
        &[("content-type", "application/json")],
        Bytes::from_static(b"{\"prompt\":\"a\"}"),
    )
    .await;
    let rec = decode
        .requests()
        .await
        .into_iter()
        .find(|r| r["path"] == "/tokenize")
        .unwrap();
    assert_eq!(rec["query"], "x=1");
    assert_eq!(rec["body"], json!({"prompt": "a"}));
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the engine's own answer comes back"
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_streams() {
    let decode = EngineSim::start(&["--itl-ms", "100"]).await;
    let sidecar = start_sidecar(decode.port(), &["--shutdown-grace-period=20s"]).await;
    let body = json!({"model": "sim-model", "prompt": "hi", "max_tokens": 10, "stream": true});
    let mut stream = http_post_stream(&sidecar.url("/v1/completions"), &body, &[]).await;
    let first = stream.next_event().await.expect("first event");
    assert!(!first.is_done());
    let status = std::process::Command::new("kill")
        .args(["-TERM", &sidecar.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest = stream.events().await;
    assert!(
        rest.last().is_some_and(|e| e.is_done()),
        "stream cut off by shutdown"
    );
    assert_eq!(rest.iter().filter(|e| !e.is_done()).count(), 9);
    let mut sidecar = sidecar;
    poll_until(Duration::from_secs(10), "sidecar exit", || {
        let exited = sidecar.proc_mut().exited();
        async move { exited }
    })
    .await;
}

#[tokio::test]
async fn stale_keepalive_connection_is_retried_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An engine that answers the first request on a connection, keeps it open,
    // and closes it without answering when the next request arrives on it
    // (what uvicorn does when its keep-alive timer fires as the request lands).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let served2 = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let served = served2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut answered = false;
                loop {
                    let mut got = Vec::new();
                    // Read one request (headers + content-length body).
                    loop {
                        let n = match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        got.extend_from_slice(&buf[..n]);
                        if let Some(h) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&got[..h]).to_ascii_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map_or(0, |v| v.trim().parse().unwrap());
                            if got.len() >= h + 4 + len {
                                break;
                            }
                        }
                    }
                    if answered {
                        return; // close without a byte
                    }
                    let body = r#"{"id":"x","object":"text_completion","choices":[{"index":0,"text":"ok","finish_reason":"length"}]}"#;
                    let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    sock.write_all(resp.as_bytes()).await.unwrap();
                    served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    answered = true;
                }
            });
        }
    });
    let sidecar = start_sidecar(port, &[]).await;
    let body = json!({"model": "m", "prompt": "hi"});
    for _ in 0..3 {
        let (status, _, resp) = http_post_json(&sidecar.url("/v1/completions"), &body, &[]).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    }
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test]
async fn tokenizer_gives_exact_counts_for_the_threshold() {
    let tokenizer = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/wordlevel-tokenizer.json"
    );
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    // 20 words of ~15 bytes: 20 tokens by the tokenizer, ~80 by the 4-byte estimate.
    let prompt = vec!["supercalifragil"; 20].join(" ");
    let body = json!({"model": "sim-model", "prompt": prompt, "max_tokens": 2});
    let hp = prefill.host_port();
    let estimate = start_sidecar(decode.port(), &["--prefill-threshold-tokens=50"]).await;
    let (status, _, _) = pd_post(&estimate, "/v1/completions", &body, &hp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        prefill.inference_requests().await.len(),
        1,
        "estimate: 80 >= 50 goes remote"
    );
    prefill.clear_requests().await;
    let exact = start_sidecar(
        decode.port(),
        &[
            "--prefill-threshold-tokens=50",
            &format!("--tokenizer={tokenizer}"),
        ],
    )
    .await;
    let (status, _, _) = pd_post(&exact, "/v1/completions", &body, &hp).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        prefill.inference_requests().await.is_empty(),
        "tokenizer: 20 < 50 stays local"
    );
}

/// Two consecutive free ports.
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let p = free_port();
        if p < u16::MAX
            && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
        {
            return p;
        }
    }
    panic!("no two consecutive free ports");
}

#[tokio::test]
async fn data_parallel_ranks_get_their_own_ports_and_header_routing() {
    let engine_base = free_port_pair();
    let mut engines = Vec::new();
    for rank in 0..2u16 {
        let port = (engine_base + rank).to_string();
        let id = format!("rank{rank}");
        let mut proc = Proc::spawn("engine-sim", &["--port", &port, "--engine-id", &id], &[]);
        proc.wait_ready(&format!("http://127.0.0.1:{port}/health"), READY_TIMEOUT)
            .await;
        engines.push(proc);
    }
    let base = free_port_pair();
    let args = [
        format!("--port={base}"),
        format!("--model-server-port={engine_base}"),
        "--data-parallel-size=2".into(),
        "--secure-proxy=false".into(),
        "--metrics-port=0".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut sidecar = Proc::spawn("pd-sidecar", &args, &[]);
    for port in [base, base + 1] {
        sidecar
            .wait_ready(&format!("http://127.0.0.1:{port}/ready"), READY_TIMEOUT)
            .await;
    }
    let body = json!({"model": "sim-model", "prompt": "hi", "max_tokens": 1});
    let engine_id = |port: u16| async move {
        json(
            &http_get(&format!("http://127.0.0.1:{port}/sim/state"))
                .await
                .2,
        )["engine_id"]
            .clone()
    };
    // Each rank's own listener reaches its own engine.
    assert_eq!(engine_id(base).await, "rank0");
    assert_eq!(engine_id(base + 1).await, "rank1");
    // The header on the main port picks the rank.
    let dp = format!("127.0.0.1:{}", base + 1);
    let (status, _, resp) = http_post_json(
        &format!("http://127.0.0.1:{base}/v1/completions"),
        &body,
        &[("x-data-parallel-host-port", &dp)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    let rank1 = json(
        &http_get(&format!(
            "http://127.0.0.1:{}/sim/requests",
            engine_base + 1
        ))
        .await
        .2,
    );
    assert_eq!(
        rank1.as_array().unwrap().len(),
        1,
        "rank 1 engine got the request"
    );
    let (status, headers, _) = http_post_json(
        &format!("http://127.0.0.1:{base}/v1/completions"),
        &body,
        &[("x-data-parallel-host-port", "127.0.0.1:1")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["x-pd-error-code"], "unknown_dp_rank");
}

/// A client's `kv_transfer_params` would tell the decode engine which host to
/// pull KV from and which blocks: no path may hand it to an engine.
#[tokio::test]
async fn client_transfer_parameters_never_reach_an_engine() {
    let decode = EngineSim::start(&[]).await;
    let sidecar = start_sidecar(decode.port(), &["--prefill-threshold-tokens=64"]).await;
    let evil = json!({
        "do_remote_prefill": true, "remote_host": "127.0.0.1", "remote_port": 1,
        "remote_engine_id": "someone-else", "remote_block_ids": [[1, 2, 3]]
    });
    let dead = format!("127.0.0.1:{}", free_port());
    let cases: [(&str, Value, Option<&str>); 3] = [
        // No prefiller named: the transparent path.
        (
            "local",
            json!({"model": "sim-model", "prompt": "hi", "max_tokens": 2, "kv_transfer_params": evil}),
            None,
        ),
        // A prefiller, but a short prompt stays local.
        (
            "short",
            json!({"model": "sim-model", "prompt": "hi", "max_tokens": 2, "kv_transfer_params": evil}),
            Some(dead.as_str()),
        ),
        // The prefiller is down: fallback to local prefill.
        (
            "fallback",
            json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 2, "kv_transfer_params": evil}),
            Some(dead.as_str()),
        ),
    ];
    for (case, body, prefiller) in cases {
        decode.clear_requests().await;
        let headers: Vec<(&str, &str)> = prefiller
            .map(|p| vec![("x-prefiller-host-port", p)])
            .unwrap_or_default();
        let (status, _, resp) =
            http_post_json(&sidecar.url("/v1/completions"), &body, &headers).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{case}: {}",
            String::from_utf8_lossy(&resp)
        );
        let seen = only_request(&decode).await["body"].clone();
        assert!(seen.get("kv_transfer_params").is_none(), "{case}: {seen}");
        assert_eq!(seen["prompt"], body["prompt"], "{case}");
    }
    // The name written with an escape is the same field to the engine.
    decode.clear_requests().await;
    let raw = r#"{"model":"sim-model","prompt":"hi","max_tokens":2,"kv_transfer_param\u0073":{"remote_host":"127.0.0.1"}}"#;
    let (status, _, _) = http(
        Method::POST,
        &sidecar.url("/v1/completions"),
        &[("content-type", "application/json")],
        Bytes::from_static(raw.as_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let seen = only_request(&decode).await["body"].clone();
    assert!(seen.get("kv_transfer_params").is_none(), "{seen}");
    // A body that may hide the field but that we cannot parse is refused
    // (Python's parser takes NaN; ours does not), and reaches no engine.
    decode.clear_requests().await;
    let raw = r#"{"model":"sim-model","prompt":"hi","temperature":NaN,"kv_transfer_params":{"remote_host":"127.0.0.1"}}"#;
    let (status, headers, resp) = http(
        Method::POST,
        &sidecar.url("/v1/completions"),
        &[("content-type", "application/json")],
        Bytes::from_static(raw.as_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["x-pd-error-code"], "invalid_json");
    assert!(json(&resp)["error"]["message"].is_string());
    assert!(decode.inference_requests().await.is_empty());
}

#[tokio::test]
async fn sglang_bootstrap_fields_from_a_client_are_removed() {
    let decode = EngineSim::start(&[]).await;
    let sidecar = start_sidecar(decode.port(), &["--kv-connector=sglang"]).await;
    let body = json!({"model": "sim-model", "prompt": "hi", "max_tokens": 2,
        "bootstrap_host": "127.0.0.1", "bootstrap_port": 1, "bootstrap_room": 7});
    let (status, _, _) = http_post_json(&sidecar.url("/v1/completions"), &body, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let seen = only_request(&decode).await["body"].clone();
    for field in ["bootstrap_host", "bootstrap_port", "bootstrap_room"] {
        assert!(seen.get(field).is_none(), "{field}: {seen}");
    }
}

/// A prefill target that answers every request with `status` and `body`
/// (an internal service behind the prefill address, say).
async fn fixed_answer_server(status: u16, body: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn fail_mode_relays_the_status_and_a_bounded_message_not_the_body() {
    const SECRET: &str = r#"{"error":{"message":"invalid credentials","type":"auth","internal":{"token":"s3cr3t-admin-token","upstream":"10.20.30.40:9000"}}}"#;
    let target = fixed_answer_server(401, SECRET).await;
    let decode = EngineSim::start(&[]).await;
    let sidecar = start_sidecar(
        decode.port(),
        &["--on-prefill-failure=fail", "--prefill-max-retries=0"],
    )
    .await;
    let body = json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 2});
    let (status, headers, resp) = pd_post(&sidecar, "/v1/completions", &body, &target).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["x-pd-error-code"], "prefill_status");
    let text = String::from_utf8_lossy(&resp);
    assert!(
        !text.contains("s3cr3t"),
        "the engine's body was relayed: {text}"
    );
    assert!(
        !text.contains(&target),
        "the prefill address was relayed: {text}"
    );
    let err = &json(&resp)["error"];
    assert_eq!(
        err["message"],
        "the prefill engine answered 401: invalid credentials"
    );
    assert_eq!(err["code"], 401);
    assert!(decode.inference_requests().await.is_empty());
}

#[tokio::test]
async fn invalid_requests_are_refused_before_any_leg() {
    let (prefill, decode, sidecar) = cluster(&[], &[]).await;
    let hp = prefill.host_port();
    let long = long_prompt();
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": "sim-model", "prompt": long, "max_tokens": "lots"}),
        ),
        (
            "/v1/completions",
            json!({"model": "sim-model", "prompt": {"text": long}, "max_tokens": 2}),
        ),
        (
            "/v1/completions",
            json!({"model": "sim-model", "prompt": long, "max_tokens": 2, "stream": "sometimes"}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "sim-model", "messages": long, "max_tokens": 2}),
        ),
    ] {
        let (status, headers, resp) = pd_post(&sidecar, path, &body, &hp).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            String::from_utf8_lossy(&resp)
        );
        assert_eq!(headers["x-pd-error-code"], "invalid_request");
        assert!(json(&resp)["error"]["message"].is_string());
    }
    assert!(
        prefill.inference_requests().await.is_empty(),
        "a malformed request reached the prefill engine"
    );
    assert!(decode.inference_requests().await.is_empty());
}

#[tokio::test]
async fn a_stream_counts_in_flight_until_its_last_byte() {
    // ~3 s of stream: time enough to look while it is still being sent,
    // even on a loaded machine.
    let decode = EngineSim::start(&["--itl-ms", "300"]).await;
    let sidecar = start_sidecar(decode.port(), &[]).await;
    let body = json!({"model": "sim-model", "prompt": "hi", "max_tokens": 10, "stream": true});
    let mut stream = http_post_stream(&sidecar.url("/v1/completions"), &body, &[]).await;
    assert_eq!(stream.status, StatusCode::OK);
    // The head and a first event are here; the rest takes ~2.7 s more.
    assert!(stream.next_event().await.is_some());
    let m = metrics(&sidecar).await;
    assert_eq!(
        prom_sample(&m, "pd_sidecar_in_flight_requests"),
        Some(1.0),
        "a stream still being sent is in flight:\n{m}"
    );
    while stream.next_event().await.is_some() {}
    poll_until(Duration::from_secs(10), "in-flight back to 0", || async {
        let m = metrics(&sidecar).await;
        (prom_sample(&m, "pd_sidecar_in_flight_requests") == Some(0.0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_decode_answer_that_breaks_mid_stream_is_counted_and_logged() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A decode engine that sends a 200 head and one event, then dies.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let _ = s.read(&mut buf).await;
                let event = "data: {\"choices\":[{\"text\":\"a\"}]}\n\n";
                let msg = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n",
                    event.len()
                );
                let _ = s.write_all(msg.as_bytes()).await;
                let _ = s.flush().await;
                // Dropped without the last chunk: the engine went away.
            });
        }
    });
    let sidecar = start_sidecar(port, &[]).await;
    let body = json!({"model": "sim-model", "prompt": "hi", "max_tokens": 6, "stream": true});
    let mut stream = http_post_stream(&sidecar.url("/v1/completions"), &body, &[]).await;
    assert_eq!(stream.status, StatusCode::OK);
    // The client sees the body break (the harness reader panics on that).
    let read = tokio::spawn(async move { while stream.next_event().await.is_some() {} });
    assert!(read.await.is_err(), "the truncated body read as complete");
    poll_until(
        Duration::from_secs(10),
        "the broken stream counted",
        || async {
            let m = metrics(&sidecar).await;
            m.contains(r#"pd_sidecar_errors_total{class="decode_stream_broken"} 1"#)
                .then_some(())
        },
    )
    .await;
    let log = std::fs::read_to_string(sidecar.log_path()).unwrap_or_default();
    assert!(
        log.contains("broke off mid-stream") && log.contains("WARN"),
        "not logged as a warning:\n{log}"
    );
}
