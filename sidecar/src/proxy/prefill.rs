//! The prefill leg: bounded retries, the per-attempt timeout, and the watch
//! that cancels a concurrent prefill when its client goes away.

use bytes::Bytes;
use http::header::HeaderMap;
use http::{Method, Uri};
use http_body_util::{BodyExt, Limited};
use rand::Rng;
use serde_json::Value;

use super::Shared;
use crate::error::ProxyError;
use crate::upstream;

/// Aborts the spawned prefill leg when the response it belongs to is dropped
/// before it ended (the client went away). Once the decode answer has ended,
/// [`PrefillWatch::detach`] lets the prefill leg finish on its own.
pub struct PrefillWatch {
    task: Option<tokio::task::AbortHandle>,
}

impl PrefillWatch {
    pub fn new(task: tokio::task::AbortHandle) -> Self {
        PrefillWatch { task: Some(task) }
    }

    /// The response ended normally: the prefill leg is no longer ours to cancel.
    pub fn detach(&mut self) {
        self.task = None;
    }
}

impl Drop for PrefillWatch {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// What the sidecar needs of a prefill engine's answer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// Its JSON body (the `kv_transfer_params` the decode leg carries on).
    Json,
    /// Only its status: a concurrent leg's body is drained and dropped, as
    /// llm-d does; it may be an event stream when the client asked for one
    /// (sglang sends the client's body to both engines).
    Status,
}

pub(super) async fn prefill_with_retries(
    shared: &Shared,
    target: &str,
    uri: &Uri,
    headers: &HeaderMap,
    bytes: Bytes,
    answer: Answer,
) -> Result<Value, ProxyError> {
    let mut attempt = 0u32;
    loop {
        let once = prefill_once(shared, target, uri, headers, bytes.clone(), answer);
        let result = match tokio::time::timeout(shared.cfg.prefill_timeout, once).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::PrefillTimeout {
                target: target.to_string(),
                timeout_ms: shared.cfg.prefill_timeout.as_millis() as u64,
            }),
        };
        match result {
            Err(err) if err.is_retryable() && attempt < shared.cfg.prefill_max_retries => {
                shared.metrics.prefill_retries.inc();
                let base = shared
                    .cfg
                    .prefill_retry_backoff
                    .saturating_mul(1 << attempt.min(10));
                let jitter = rand::rng().random_range(0.5..1.5);
                tracing::debug!(error = %err, attempt, "prefill attempt failed, retrying");
                tokio::time::sleep(base.mul_f64(jitter)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn prefill_once(
    shared: &Shared,
    target: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    answer: Answer,
) -> Result<Value, ProxyError> {
    let unreachable = |detail: String| ProxyError::PrefillUnreachable {
        target: target.to_string(),
        detail,
    };
    let resp = upstream::send_buffered(&shared.prefill_client, &Method::POST, uri, headers, body)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), shared.cfg.max_body_bytes)
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        return Err(ProxyError::PrefillStatus {
            target: target.to_string(),
            status: status.as_u16(),
            body,
        });
    }
    if answer == Answer::Status {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&body).map_err(|e| ProxyError::PrefillBadResponse {
        target: target.to_string(),
        detail: format!("not JSON: {e}"),
    })
}
