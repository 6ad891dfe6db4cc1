//! The harness's HTTP side: readiness and condition polls with a deadline, one-shot HTTP/1
//! exchanges through hyper's legacy client, and responses read frame by frame or SSE event by
//! event as they arrive (for streaming and timing tests).

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::{HTTP_TIMEOUT, POLL_INTERVAL};

/// Polls `GET url` every [`POLL_INTERVAL`] until it answers 200; panics at the deadline.
pub async fn wait_ready(url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let last = try_http(Method::GET, url, &[], Bytes::new(), Duration::from_secs(2)).await;
        if let Ok((StatusCode::OK, _, _)) = last {
            return;
        }
        if Instant::now() >= deadline {
            let last = last.map(|(status, _, _)| status.to_string());
            panic!("{url} not ready after {timeout:?}; last answer: {last:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Calls `f` every [`POLL_INTERVAL`] until it returns `Some`; panics at the deadline, naming
/// `what` was awaited.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// A fresh client per exchange: pooled connections must not outlive a test's runtime.
fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn build_request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Request<Full<Bytes>>, String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(body))
        .map_err(|e| format!("bad request for {url}: {e}"))
}

/// One HTTP exchange; `Err` on connection errors and timeouts (for tests about those).
pub async fn try_http(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    timeout: Duration,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let req = build_request(method, url, headers, body)?;
    let exchange = async {
        let resp = client()
            .request(req)
            .await
            .map_err(|e| format!("{url}: {e:?}"))?;
        let (parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| format!("{url}: reading body: {e}"))?
            .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{url}: no complete answer within {timeout:?}"))?
}

/// Like [`try_http`] with [`HTTP_TIMEOUT`], panicking on failure.
pub async fn http(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (StatusCode, HeaderMap, Bytes) {
    match try_http(method, url, headers, body, HTTP_TIMEOUT).await {
        Ok(r) => r,
        Err(e) => panic!("HTTP request failed: {e}"),
    }
}

pub async fn http_get(url: &str) -> (StatusCode, HeaderMap, Bytes) {
    http(Method::GET, url, &[], Bytes::new()).await
}

pub async fn http_delete(url: &str) -> (StatusCode, HeaderMap, Bytes) {
    http(Method::DELETE, url, &[], Bytes::new()).await
}

fn with_json_content_type<'a>(headers: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    all
}

/// POSTs `body` as JSON with extra `headers`.
pub async fn http_post_json(
    url: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Bytes) {
    let all = with_json_content_type(headers);
    http(Method::POST, url, &all, Bytes::from(body.to_string())).await
}

/// Parses a response body as JSON, panicking with the body when it is not.
pub fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "response body is not JSON ({e}): {}",
            String::from_utf8_lossy(body)
        )
    })
}

/// A body frame and when it arrived.
#[derive(Clone, Debug)]
pub struct TimedFrame {
    pub at: Instant,
    pub data: Bytes,
}

/// One server-sent event's `data` and when its last byte arrived.
#[derive(Clone, Debug)]
pub struct SseEvent {
    pub at: Instant,
    pub data: String,
}

impl SseEvent {
    pub fn is_done(&self) -> bool {
        self.data == "[DONE]"
    }

    /// The event's data as JSON (panics if it is not).
    pub fn json(&self) -> Value {
        json(self.data.as_bytes())
    }
}

/// A response whose body is read frame by frame (or SSE event by event) as it arrives.
pub struct StreamingResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    sse_buf: String,
}

impl StreamingResponse {
    /// The next data frame, or None at the end of the body. Panics if nothing arrives within
    /// [`HTTP_TIMEOUT`] or the body fails.
    pub async fn next_frame(&mut self) -> Option<TimedFrame> {
        loop {
            let frame = match tokio::time::timeout(HTTP_TIMEOUT, self.body.frame()).await {
                Err(_) => panic!("no body frame within {HTTP_TIMEOUT:?}"),
                Ok(None) => return None,
                Ok(Some(Err(e))) => panic!("reading the response body: {e}"),
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data() {
                return Some(TimedFrame {
                    at: Instant::now(),
                    data,
                });
            }
        }
    }

    /// The next SSE event's data (multi-line data joined with '\n'), or None at the end.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.sse_buf.find("\n\n") {
                let raw: String = self.sse_buf.drain(..end + 2).collect();
                let data: Vec<&str> = raw
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return Some(SseEvent {
                    at: Instant::now(),
                    data: data.join("\n"),
                });
            }
            let frame = self.next_frame().await?;
            self.sse_buf
                .push_str(&String::from_utf8_lossy(&frame.data).replace("\r\n", "\n"));
        }
    }

    /// All remaining SSE events.
    pub async fn events(mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(e) = self.next_event().await {
            out.push(e);
        }
        out
    }

    /// The rest of the body.
    pub async fn bytes(mut self) -> Bytes {
        let mut out = self.sse_buf.clone().into_bytes();
        while let Some(f) = self.next_frame().await {
            out.extend_from_slice(&f.data);
        }
        Bytes::from(out)
    }
}

/// POSTs `body` as JSON and returns as soon as the response head arrives.
pub async fn http_post_stream(
    url: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> StreamingResponse {
    let all = with_json_content_type(headers);
    let req = build_request(Method::POST, url, &all, Bytes::from(body.to_string()))
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = match tokio::time::timeout(HTTP_TIMEOUT, client().request(req)).await {
        Err(_) => panic!("{url}: no response head within {HTTP_TIMEOUT:?}"),
        Ok(Err(e)) => panic!("{url}: {e:?}"),
        Ok(Ok(r)) => r,
    };
    let (parts, body) = resp.into_parts();
    StreamingResponse {
        status: parts.status,
        headers: parts.headers,
        body,
        sse_buf: String::new(),
    }
}
