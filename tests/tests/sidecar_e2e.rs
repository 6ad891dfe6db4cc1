//! pd-sidecar end to end: real `engine-sim` processes as prefill and decode
//! engines, a real `pd-sidecar` process in front of the decode engine, real
//! HTTP on loopback. Each test asserts what a user or the engines would see.
//! This file: the protocols and the request path when everything works;
//! `sidecar_failures.rs` the failing engines and connections,
//! `sidecar_input.rs` what clients may not send, `sidecar_hardening.rs`
//! hostile conditions.

mod sidecar_common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use sidecar_common::*;
use tandem_tests::harness::{
    free_port, http, http_get, http_post_json, http_post_stream, json, poll_until,
    start_test_sidecar as start_sidecar, try_http, EngineSim, Proc, READY_TIMEOUT,
};

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
            "/v1/messages",
            json!({"model": "sim-model", "system": "Be brief.", "messages": [{"role": "user", "content": [{"type": "text", "text": long_prompt()}]}], "max_tokens": 7}),
            "max_tokens",
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
            "/v1/messages" => {
                assert_eq!(pb["max_tokens"], 1);
                assert_eq!(pb["system"], body["system"]);
            }
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
        if path == "/v1/messages" {
            let answer = json(&resp);
            assert_eq!(answer["type"], "message", "{answer}");
            assert_eq!(answer["usage"]["output_tokens"], 7, "{answer}");
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

#[tokio::test]
async fn shared_storage_with_a_cache_hit_threshold_asks_the_decode_engine_first() {
    let (prefill, decode, sidecar) = cluster(&[], &["--kv-connector=shared-storage"]).await;
    let body = json!({"model": "sim-model", "prompt": long_prompt(), "max_tokens": 3, "cache_hit_threshold": 0.5});
    let thresholds = |reqs: &[Value]| -> Vec<Value> {
        reqs.iter()
            .map(|r| r["body"]["cache_hit_threshold"].clone())
            .collect()
    };
    // Nothing cached on the decode engine: it declines, the prefill runs, then the decode
    // engine computes it with the threshold off.
    let (status, _, resp) = pd_post(&sidecar, "/v1/completions", &body, &prefill.host_port()).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(json(&resp)["usage"]["completion_tokens"], 3);
    assert_eq!(json(&resp)["choices"][0]["finish_reason"], "length");
    assert_eq!(
        thresholds(&decode.inference_requests().await),
        [json!(0.5), json!(0)]
    );
    let p = only_request(&prefill).await;
    assert_eq!(p["body"]["cache_hit_threshold"], 0);
    assert_eq!(p["body"]["max_tokens"], 1);

    // Now cached there: the decode engine serves it and no prefill runs.
    prefill.clear_requests().await;
    decode.clear_requests().await;
    let (status, _, resp) = pd_post(&sidecar, "/v1/completions", &body, &prefill.host_port()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&resp)["usage"]["completion_tokens"], 3);
    assert!(prefill.inference_requests().await.is_empty());
    assert_eq!(thresholds(&decode.inference_requests().await), [json!(0.5)]);

    // Streaming, another prompt: the declined first event never reaches the client.
    decode.clear_requests().await;
    let body = json!({"model": "sim-model", "prompt": "Another prompt here. ".repeat(80),
        "max_tokens": 4, "stream": true, "cache_hit_threshold": 0.9});
    let events = pd_stream(&sidecar, "/v1/completions", &body, &prefill.host_port()).await;
    assert!(events.last().is_some_and(|e| e.is_done()));
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| !e.is_done())
        .map(|e| e.json())
        .collect();
    assert_eq!(chunks.len(), 4, "{chunks:#?}");
    assert!(chunks
        .iter()
        .all(|c| c["choices"][0]["finish_reason"] != "cache_threshold"));
    assert_eq!(
        thresholds(&decode.inference_requests().await),
        [json!(0.9), json!(0)]
    );
}
