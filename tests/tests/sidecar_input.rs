//! pd-sidecar end to end with what a client may not send: malformed or
//! oversized bodies, transfer parameters only engines may set, invalid
//! requests. Each is refused with OpenAI-style JSON before any engine sees
//! it, or stripped.

mod sidecar_common;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use sidecar_common::*;
use tandem_tests::harness::{
    free_port, http, http_post_json, json, start_test_sidecar as start_sidecar, EngineSim,
};

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
