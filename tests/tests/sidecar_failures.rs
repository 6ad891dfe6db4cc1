//! pd-sidecar end to end when engines or connections fail: prefill down,
//! erroring, slow or answering something else; the decode engine refusing
//! or breaking mid-stream; clients leaving; shutdown. Nothing servable is
//! lost: the sidecar retries, falls back to local prefill, or (in `fail`
//! mode) relays a bounded error.

mod sidecar_common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::json;
use sidecar_common::*;
use tandem_tests::harness::{
    free_port, http_get, http_post_json, http_post_stream, json, poll_until, prom_sample,
    start_test_sidecar as start_sidecar, try_http, EngineSim,
};

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
    let p = last_ended(&prefill, true).await;
    assert_eq!(p["cancelled"], false, "{p:#}");
    assert_eq!(only_request(&decode).await["completed"], true);
}

#[tokio::test]
async fn sglang_streaming_request_keeps_its_decode_stream() {
    // sglang sends the client's body to both engines, so a streaming request's prefill
    // leg answers an event stream. It ends while the decode stream is still running.
    let prefill = EngineSim::start(&["--ttft-ms", "100"]).await;
    let decode = EngineSim::start(&["--itl-ms", "100"]).await;
    let sidecar = start_sidecar(
        decode.port(),
        &["--kv-connector=sglang", "--prefill-max-retries=0"],
    )
    .await;
    let body =
        json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 6, "stream": true});
    let events = pd_stream(&sidecar, "/v1/completions", &body, &prefill.host_port()).await;
    assert!(events.last().is_some_and(|e| e.is_done()), "stream cut off");
    assert_eq!(events.iter().filter(|e| !e.is_done()).count(), 6);
    let p = last_ended(&prefill, false).await;
    assert_eq!(p["body"]["stream"], true);
    // One decode request, with its bootstrap room: no local fallback.
    let d = only_request(&decode).await;
    assert_eq!(d["body"]["bootstrap_room"], p["body"]["bootstrap_room"]);
    let metrics = metrics(&sidecar).await;
    assert!(!metrics.contains("prefill_bad_response"), "{metrics}");
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
    let url = sidecar.url("/v1/completions");
    // The client sees the body break: a 200 head and a truncated body, or, when the engine
    // died before the head went out, a closed connection (the harness panics on either).
    let read = tokio::spawn(async move {
        let mut stream = http_post_stream(&url, &body, &[]).await;
        assert_eq!(stream.status, StatusCode::OK);
        while stream.next_event().await.is_some() {}
    });
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
