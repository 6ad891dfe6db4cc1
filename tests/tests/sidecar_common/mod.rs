//! What the pd-sidecar end-to-end test files share: posting through a
//! sidecar, a prefill/decode cluster of engine-sims, and small servers.
#![allow(dead_code)] // each test binary uses its own part of this

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;
use tandem_tests::harness::{
    free_port, http_post_json, http_post_stream, poll_until, start_test_sidecar as start_sidecar,
    EngineSim, Sidecar, SseEvent,
};

pub async fn metrics(sidecar: &Sidecar) -> String {
    sidecar.metrics().await.unwrap_or_else(|e| panic!("{e}"))
}

/// POSTs `body` through the sidecar, naming `prefiller` as the prefill engine.
pub async fn pd_post(
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

/// POSTs a streaming `body` through the sidecar, naming `prefiller`; the events it got.
pub async fn pd_stream(
    sidecar: &Sidecar,
    path: &str,
    body: &Value,
    prefiller: &str,
) -> Vec<SseEvent> {
    http_post_stream(
        &sidecar.url(path),
        body,
        &[("x-prefiller-host-port", prefiller)],
    )
    .await
    .events()
    .await
}

/// Waits until the engine's last inference request has ended (completed, or cancelled too
/// with `or_cancelled`).
pub async fn last_ended(sim: &EngineSim, or_cancelled: bool) -> Value {
    poll_until(
        Duration::from_secs(10),
        "the last request to end",
        || async {
            sim.inference_requests()
                .await
                .pop()
                .filter(|r| r["completed"] == true || (or_cancelled && r["cancelled"] == true))
        },
    )
    .await
}

/// Waits until the engine's first inference request is logged as cancelled.
pub async fn first_cancelled(sim: &EngineSim) -> Value {
    poll_until(Duration::from_secs(10), "a cancelled request", || async {
        sim.inference_requests()
            .await
            .first()
            .filter(|r| r["cancelled"] == true)
            .cloned()
    })
    .await
}

pub async fn only_request(sim: &EngineSim) -> Value {
    let mut reqs = sim.inference_requests().await;
    assert_eq!(reqs.len(), 1, "expected exactly one request, got {reqs:#?}");
    reqs.remove(0)
}

pub fn long_prompt() -> String {
    "The quick brown fox jumps over the lazy dog. ".repeat(40)
}

pub async fn cluster(
    decode_args: &[&str],
    sidecar_args: &[&str],
) -> (EngineSim, EngineSim, Sidecar) {
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(decode_args).await;
    let sidecar = start_sidecar(decode.port(), sidecar_args).await;
    (prefill, decode, sidecar)
}

pub const NULL_PARAMS: &str = r#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#;

/// Two consecutive free ports.
pub fn free_port_pair() -> u16 {
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

/// A prefill target that answers every request with `status` and `body`
/// (an internal service behind the prefill address, say).
pub async fn fixed_answer_server(status: u16, body: &'static str) -> String {
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
