//! The demo's client: sends prepared requests with bounded concurrency over one pooled HTTP/1
//! client and records what a user would see (status, time to first token, total latency). Never
//! panics on a bad answer: every failure becomes an [`Outcome`] with an error.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Time limit of one request, answer included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One request ready to send.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub id: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub stream: bool,
}

/// What the client saw.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub id: String,
    /// HTTP status, when a response head arrived.
    pub status: Option<u16>,
    /// First SSE event for streams, the whole response otherwise.
    pub ttft: Option<Duration>,
    pub total: Duration,
    /// Why the request counts as failed (status, transport, malformed answer).
    pub error: Option<String>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Clone)]
pub struct DemoClient {
    http: HttpClient,
}

impl Default for DemoClient {
    fn default() -> Self {
        Self::new()
    }
}

impl DemoClient {
    pub fn new() -> DemoClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        DemoClient {
            http: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(&self, req: &Prepared) -> Outcome {
        let started = Instant::now();
        let result = tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(req, started)).await;
        let (status, ttft, error) = match result {
            Ok(r) => r,
            Err(_) => (
                None,
                None,
                Some(format!("no complete answer within {REQUEST_TIMEOUT:?}")),
            ),
        };
        Outcome {
            id: req.id.clone(),
            status,
            ttft,
            total: started.elapsed(),
            error,
        }
    }

    async fn exchange(
        &self,
        req: &Prepared,
        started: Instant,
    ) -> (Option<u16>, Option<Duration>, Option<String>) {
        let mut builder = Request::post(&req.url)
            .header("content-type", "application/json")
            .header("x-request-id", &req.id);
        for (k, v) in &req.headers {
            builder = builder.header(k, v);
        }
        let http_req = match builder.body(Full::new(req.body.clone())) {
            Ok(r) => r,
            Err(e) => return (None, None, Some(format!("building the request: {e}"))),
        };
        let resp = match self.http.request(http_req).await {
            Ok(r) => r,
            Err(e) => return (None, None, Some(format!("{}: {e}", req.url))),
        };
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let mut ttft = None;
        loop {
            match body.frame().await {
                None => break,
                Some(Err(e)) => {
                    return (Some(status), ttft, Some(format!("reading the body: {e}")));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                        // The first complete SSE event is the first token a user sees.
                        if req.stream && ttft.is_none() && has_complete_event(&buf) {
                            ttft = Some(started.elapsed());
                        }
                    }
                }
            }
        }
        if status != 200 {
            let text = String::from_utf8_lossy(&buf);
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.chars().take(160).collect());
            return (Some(status), ttft, Some(format!("HTTP {status}: {detail}")));
        }
        let error = if req.stream {
            let text = String::from_utf8_lossy(&buf).replace("\r\n", "\n");
            (!text.contains("data: [DONE]")).then(|| "stream ended without [DONE]".to_string())
        } else {
            ttft = Some(started.elapsed());
            match serde_json::from_slice::<Value>(&buf) {
                Ok(v) if v.get("choices").is_some() => None,
                Ok(_) => Some("answer has no `choices`".to_string()),
                Err(e) => Some(format!("answer is not JSON: {e}")),
            }
        };
        (Some(status), ttft, error)
    }

    /// Sends `reqs` with at most `concurrency` in flight; `done` counts finished requests (for a
    /// progress display). Outcomes come back in the order of `reqs`.
    pub async fn run_all(
        &self,
        reqs: Vec<Prepared>,
        concurrency: usize,
        done: Arc<AtomicUsize>,
    ) -> Vec<Outcome> {
        let reqs = Arc::new(reqs);
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..concurrency.max(1).min(reqs.len().max(1)) {
            let (client, reqs, next, done) = (
                self.clone(),
                Arc::clone(&reqs),
                Arc::clone(&next),
                Arc::clone(&done),
            );
            workers.push(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(req) = reqs.get(i) else { break };
                    out.push((i, client.send(req).await));
                    done.fetch_add(1, Ordering::Relaxed);
                }
                out
            }));
        }
        let mut slots: Vec<Option<Outcome>> = vec![None; reqs.len()];
        for w in workers {
            // A worker only panics on a bug; its requests then count as failed below.
            if let Ok(results) = w.await {
                for (i, o) in results {
                    slots[i] = Some(o);
                }
            }
        }
        slots
            .into_iter()
            .zip(reqs.iter())
            .map(|(o, r)| {
                o.unwrap_or_else(|| Outcome {
                    id: r.id.clone(),
                    status: None,
                    ttft: None,
                    total: Duration::ZERO,
                    error: Some("the client task failed".into()),
                })
            })
            .collect()
    }
}

/// Whether `buf` holds a complete SSE event with data.
fn has_complete_event(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf).replace("\r\n", "\n");
    // Only what precedes the last blank line is complete.
    text.rfind("\n\n")
        .is_some_and(|end| text[..end].lines().any(|l| l.starts_with("data:")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_event_needs_a_blank_line_and_data() {
        assert!(!has_complete_event(b"data: {\"a\":1}"));
        assert!(!has_complete_event(b": keep-alive\n\n"));
        assert!(has_complete_event(b"data: {\"a\":1}\n\n"));
        assert!(has_complete_event(b"data: {\"a\":1}\r\n\r\ndata: x"));
    }
}
