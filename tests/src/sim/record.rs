//! The request log behind `GET /sim/requests`: what each request looked like (method, path,
//! query, headers, body), the status it got, and whether its response completed or was cancelled
//! by the client going away. Implemented as middleware plus a response-body wrapper so handlers
//! stay unaware of it. `/sim/*`, `/health` and `/metrics` are not recorded.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use serde::Serialize;
use serde_json::{Map, Value};

use super::error::error_response;

/// Largest request body the simulator reads.
pub const MAX_BODY_BYTES: usize = 64 << 20;

#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub seq: u64,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Map<String, Value>,
    pub body: Value,
    pub status: Option<u16>,
    pub completed: bool,
    pub cancelled: bool,
    pub received_ms: u64,
}

#[derive(Default)]
struct Inner {
    next_seq: u64,
    entries: Vec<Entry>,
}

#[derive(Default)]
pub struct RequestLog {
    inner: Mutex<Inner>,
}

impl RequestLog {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, mut entry: Entry) -> u64 {
        let mut inner = self.lock();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        entry.seq = seq;
        inner.entries.push(entry);
        seq
    }

    /// Applies `f` to entry `seq`, if it is still in the log (it may have been cleared).
    fn update(&self, seq: u64, f: impl FnOnce(&mut Entry)) {
        let mut inner = self.lock();
        if let Ok(i) = inner.entries.binary_search_by_key(&seq, |e| e.seq) {
            f(&mut inner.entries[i]);
        }
    }

    pub fn snapshot(&self) -> Vec<Entry> {
        self.lock().entries.clone()
    }

    pub fn clear(&self) {
        self.lock().entries.clear();
    }
}

/// Whether requests to `path` go into the log.
pub fn is_recorded(path: &str) -> bool {
    !(path == "/sim" || path.starts_with("/sim/") || path == "/health" || path == "/metrics")
}

/// Marks its entry cancelled when dropped before the response completed.
struct Tracker {
    log: Arc<RequestLog>,
    seq: u64,
    done: AtomicBool,
}

impl Tracker {
    fn complete(&self) {
        if !self.done.swap(true, Ordering::Relaxed) {
            self.log.update(self.seq, |e| e.completed = true);
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.done.load(Ordering::Relaxed) {
            self.log.update(self.seq, |e| e.cancelled = true);
        }
    }
}

/// A response body that marks the request completed at its end, or cancelled when dropped early
/// (the client went away mid-stream).
struct TrackedBody {
    inner: Body,
    tracker: Tracker,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.tracker.complete(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.tracker.complete(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // hyper may stop polling once this says true, so the end is noted here too.
        let end = self.inner.is_end_stream();
        if end {
            self.tracker.complete();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Middleware: records the request, then follows its response to completion or cancellation.
pub async fn record(State(log): State<Arc<RequestLog>>, req: Request, next: Next) -> Response {
    if !is_recorded(req.uri().path()) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("cannot read request body: {e}"),
            )
        }
    };
    let mut headers = Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_string(), Value::String(value));
            }
        }
    }
    let body_value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    let seq = log.push(Entry {
        seq: 0,
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers,
        body: body_value,
        status: None,
        completed: false,
        cancelled: false,
        received_ms: now_ms(),
    });
    // Dropped with this future if the client disconnects while the handler runs.
    let tracker = Tracker {
        log: Arc::clone(&log),
        seq,
        done: AtomicBool::new(false),
    };
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let status = resp.status().as_u16();
    log.update(seq, |e| e.status = Some(status));
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        parts,
        Body::new(TrackedBody {
            inner: body,
            tracker,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_health_and_metrics_are_not_recorded() {
        assert!(!is_recorded("/sim/requests"));
        assert!(!is_recorded("/health"));
        assert!(!is_recorded("/metrics"));
        assert!(is_recorded("/v1/completions"));
        assert!(is_recorded("/simulate"));
    }

    #[test]
    fn dropped_tracker_marks_cancelled_unless_completed() {
        let log = Arc::new(RequestLog::default());
        let entry = |log: &RequestLog| {
            log.push(Entry {
                seq: 0,
                method: "GET".into(),
                path: "/".into(),
                query: None,
                headers: Map::new(),
                body: Value::Null,
                status: None,
                completed: false,
                cancelled: false,
                received_ms: 0,
            })
        };
        let a = entry(&log);
        let b = entry(&log);
        let t = |seq| Tracker {
            log: Arc::clone(&log),
            seq,
            done: AtomicBool::new(false),
        };
        drop(t(a));
        let tb = t(b);
        tb.complete();
        drop(tb);
        let snap = log.snapshot();
        assert!(snap[0].cancelled && !snap[0].completed);
        assert!(snap[1].completed && !snap[1].cancelled);
    }
}
