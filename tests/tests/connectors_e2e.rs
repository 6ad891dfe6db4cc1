//! The connectors whose legs run at once or name a peer, end to end: real
//! `engine-sim` engines (one serving a Mooncake bootstrap server), a real
//! `pd-sidecar`, loopback HTTP. Each test checks what the engines received,
//! field by field as llm-d-router's sidecar sends it.

use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use tandem_tests::harness::{
    free_port, http_post_json, poll_until, prom_sample, start_test_sidecar as start_sidecar,
    EngineSim, Sidecar,
};

fn prompt() -> String {
    "The quick brown fox jumps over the lazy dog. ".repeat(20)
}

/// The one inference request `sim` has logged (waiting for it: a concurrent
/// prefill leg may land after the client's answer).
async fn one_request(sim: &EngineSim, what: &str) -> Value {
    let reqs = poll_until(Duration::from_secs(10), what, || async {
        let reqs = sim.inference_requests().await;
        (!reqs.is_empty()).then_some(reqs)
    })
    .await;
    assert_eq!(reqs.len(), 1, "{what}: {reqs:#?}");
    reqs.into_iter().next().unwrap()
}

#[tokio::test]
async fn mooncake_asks_the_prefill_bootstrap_server_and_runs_both_legs() {
    let bootstrap = free_port();
    let bootstrap_flag = format!("--mooncake-bootstrap-port={bootstrap}");
    let prefill = EngineSim::start(&["--engine-id", "prefill-engine-7", &bootstrap_flag]).await;
    let decode = EngineSim::start(&[]).await;
    let sidecar = start_sidecar(decode.port(), &["--kv-connector=mooncake", &bootstrap_flag]).await;
    let body = json!({"model": "sim-model", "prompt": prompt(), "max_tokens": 5, "stream": true,
        "stream_options": {"include_usage": true}});
    let (status, _, answer) = http_post_json(
        &sidecar.url("/v1/completions"),
        &body,
        &[("x-prefiller-host-port", &prefill.host_port())],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer:?}");
    assert!(String::from_utf8_lossy(&answer).contains("[DONE]"));

    let p = one_request(&prefill, "the prefill leg").await;
    let d = one_request(&decode, "the decode leg").await;
    let id = p["body"]["kv_transfer_params"]["transfer_id"]
        .as_str()
        .expect("a transfer_id")
        .to_string();
    assert!(id.starts_with("xfer-"), "{id}");
    assert_eq!(
        p["body"]["kv_transfer_params"],
        json!({"do_remote_prefill": false, "do_remote_decode": true, "transfer_id": id})
    );
    assert_eq!(p["body"]["stream"], false);
    assert_eq!(p["body"]["max_tokens"], 1);
    assert!(p["body"].get("stream_options").is_none());
    assert_eq!(p["headers"]["x-data-parallel-rank"], "0");
    assert_eq!(
        d["body"]["kv_transfer_params"],
        json!({"do_remote_prefill": true, "do_remote_decode": false, "transfer_id": id,
            "remote_bootstrap_addr": format!("http://127.0.0.1:{bootstrap}"),
            "remote_engine_id": "prefill-engine-7"})
    );
    assert_eq!(d["body"]["stream"], true);
    assert_eq!(d["body"]["max_tokens"], 5);
    assert!(d["headers"].get("x-data-parallel-rank").is_none());
}

#[tokio::test]
async fn mooncake_without_a_bootstrap_server_serves_with_local_prefill() {
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let nothing_there = free_port().to_string();
    let sidecar = start_sidecar(
        decode.port(),
        &[
            "--kv-connector=mooncake",
            &format!("--mooncake-bootstrap-port={nothing_there}"),
        ],
    )
    .await;
    let body = json!({"model": "sim-model", "prompt": prompt(), "max_tokens": 3});
    let (status, _, answer) = http_post_json(
        &sidecar.url("/v1/completions"),
        &body,
        &[("x-prefiller-host-port", &prefill.host_port())],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer:?}");
    let d = one_request(&decode, "the local decode").await;
    assert!(d["body"].get("kv_transfer_params").is_none(), "{d}");
    assert!(prefill.inference_requests().await.is_empty());
    let m = sidecar.metrics().await.unwrap();
    assert_eq!(
        prom_sample(
            &m,
            r#"pd_sidecar_errors_total{class="prefill_bootstrap_failed"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn offloading_legs_share_a_request_id_and_name_the_p2p_ports() {
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let sidecar = start_sidecar(
        decode.port(),
        &["--kv-connector=offloading", "--p2p-connector-port=7301"],
    )
    .await;
    let body = json!({"model": "sim-model", "messages": [{"role": "user", "content": prompt()}],
        "max_completion_tokens": 4});
    let (status, _, answer) = http_post_json(
        &sidecar.url("/v1/chat/completions"),
        &body,
        &[
            ("x-prefiller-host-port", &prefill.host_port()),
            ("x-kv-cache-source-host-port", "127.0.0.9:8000"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer:?}");
    let p = one_request(&prefill, "the prefill leg").await;
    let d = one_request(&decode, "the decode leg").await;
    let params = &p["body"]["kv_transfer_params"];
    let id = params["remote_decoder"]["kv_request_id"].clone();
    assert_eq!(id.as_str().map(str::len), Some(36), "{params}");
    let source = &params["remote_kv_source"];
    assert_eq!(source["remote_host"], "127.0.0.9");
    assert_eq!(source["remote_port"], 7301);
    assert_ne!(source["kv_request_id"], id);
    assert_eq!(p["body"]["max_completion_tokens"], 1);
    assert_eq!(
        d["body"]["kv_transfer_params"],
        json!({"remote_prefiller": {"kv_request_id": id, "remote_host": "127.0.0.1", "remote_port": 7301}})
    );
    assert_eq!(d["body"]["max_completion_tokens"], 4);
    for leg in [&p, &d] {
        assert!(leg["headers"].get("x-kv-cache-source-host-port").is_none());
    }
}

/// Decode-only requests with a KV source: the engine is told to pull the
/// cached prefix from the peer, unless the peer is this pod, the connector has
/// no P2P tier, or SSRF protection does not allow it.
#[tokio::test]
async fn a_kv_source_on_a_decode_only_request_becomes_remote_kv_source() {
    let decode = EngineSim::start(&[]).await;
    let body = json!({"model": "sim-model", "prompt": prompt(), "max_tokens": 2,
        "kv_transfer_params": {"remote_host": "evil"}});
    let send = |sidecar: &Sidecar, source: &str| {
        let url = sidecar.url("/v1/completions");
        let source = source.to_string();
        let body = body.clone();
        async move {
            let (status, _, answer) =
                http_post_json(&url, &body, &[("x-kv-cache-source-host-port", &source)]).await;
            assert_eq!(status, StatusCode::OK, "{answer:?}");
        }
    };

    let sidecar = Sidecar::try_start(
        decode.port(),
        &[
            "--enable-p2p-pull".to_string(),
            "--p2p-connector-port=7401".to_string(),
        ],
        &[("POD_IP", "127.0.0.1")],
    )
    .await
    .unwrap();
    send(&sidecar, "10.9.8.7:8000").await;
    let d = one_request(&decode, "a decode with a source").await;
    let src = &d["body"]["kv_transfer_params"]["remote_kv_source"];
    assert_eq!(src["remote_host"], "10.9.8.7");
    assert_eq!(src["remote_port"], 7401);
    assert_eq!(
        d["body"]["kv_transfer_params"].as_object().unwrap().len(),
        1,
        "{d}"
    );

    // This pod itself is no source.
    decode.clear_requests().await;
    send(&sidecar, &format!("127.0.0.1:{}", sidecar.port())).await;
    let d = one_request(&decode, "a decode naming itself").await;
    assert!(d["body"].get("kv_transfer_params").is_none(), "{d}");

    // Without a P2P tier (nixlv2 alone) the header means nothing.
    let plain = start_sidecar(decode.port(), &[]).await;
    decode.clear_requests().await;
    send(&plain, "10.9.8.7:8000").await;
    let d = one_request(&decode, "a decode without a tier").await;
    assert!(d["body"].get("kv_transfer_params").is_none(), "{d}");

    // SSRF protection: a source off the allow-list is ignored.
    let guarded = start_sidecar(
        decode.port(),
        &[
            "--kv-connector=offloading",
            "--enable-ssrf-protection",
            "--prefill-allowlist=10.0.0.0/8",
        ],
    )
    .await;
    decode.clear_requests().await;
    send(&guarded, "192.168.1.1:8000").await;
    let d = one_request(&decode, "a decode with a forbidden source").await;
    assert!(d["body"].get("kv_transfer_params").is_none(), "{d}");
    decode.clear_requests().await;
    send(&guarded, "10.1.1.1:8000").await;
    let d = one_request(&decode, "a decode with an allowed source").await;
    assert_eq!(
        d["body"]["kv_transfer_params"]["remote_kv_source"]["remote_host"],
        "10.1.1.1"
    );
}
