//! The demo's client: replays sessions (chats turn by turn, one-shots) with a fixed number of
//! simulated users over one pooled HTTP/1 client, and records what a user sees of every
//! streamed answer: time to first token, the gaps between tokens, tokens received, errors.
//! Never panics on a bad answer: every failure becomes an [`Outcome`] with an error.

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

use super::workload::{Kind, Session, Turn};

/// Time limit of one request, answer included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// What the client saw of one request.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub id: String,
    pub kind: Option<Kind>,
    /// HTTP status, when a response head arrived.
    pub status: Option<u16>,
    /// Until the first event carrying a token.
    pub ttft: Option<Duration>,
    /// Gaps between consecutive token events.
    pub itl: Vec<Duration>,
    /// `usage.completion_tokens`, or the token events counted when there is no usage.
    pub output_tokens: u64,
    pub prompt_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
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
            http: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(256)
                .build(connector),
        }
    }

    /// Sends one streaming request to `base` + its path and reads the whole answer.
    pub async fn send(&self, base: &str, turn: &Turn) -> Outcome {
        let started = Instant::now();
        let mut out = Outcome {
            id: turn.id.clone(),
            ..Outcome::default()
        };
        let url = format!("{base}{}", turn.path);
        if tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.exchange(&url, turn, started, &mut out),
        )
        .await
        .is_err()
        {
            out.error = Some(format!("no complete answer within {REQUEST_TIMEOUT:?}"));
        }
        out.total = started.elapsed();
        out
    }

    async fn exchange(&self, url: &str, turn: &Turn, started: Instant, out: &mut Outcome) {
        let req = Request::post(url)
            .header("content-type", "application/json")
            .header("x-request-id", &turn.id)
            .body(Full::new(Bytes::from(turn.body.to_string())));
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                out.error = Some(format!("building the request: {e}"));
                return;
            }
        };
        let resp = match self.http.request(req).await {
            Ok(r) => r,
            Err(e) => {
                out.error = Some(format!("{url}: {e}"));
                return;
            }
        };
        let status = resp.status().as_u16();
        out.status = Some(status);
        let mut body = resp.into_body();
        let mut sse = SseReader::default();
        let mut last_token: Option<Instant> = None;
        let mut token_events = 0u64;
        let mut usage: Option<Value> = None;
        let mut done = false;
        let mut raw = Vec::new();
        loop {
            let frame = match body.frame().await {
                None => break,
                Some(Err(e)) => {
                    out.error = Some(format!("reading the body: {e}"));
                    return;
                }
                Some(Ok(f)) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if status != 200 {
                raw.extend_from_slice(&data);
                continue;
            }
            let now = Instant::now();
            for event in sse.push(&data) {
                if event == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(&event) else {
                    out.error = Some(format!("an SSE event is not JSON: {event:.80}"));
                    return;
                };
                if v.get("error").is_some() {
                    out.error = Some(format!("error event: {}", v["error"]));
                    return;
                }
                if has_token(&v) {
                    token_events += 1;
                    match last_token {
                        None => out.ttft = Some(now - started),
                        Some(prev) => out.itl.push(now - prev),
                    }
                    last_token = Some(now);
                }
                if v.get("usage").is_some_and(Value::is_object) {
                    usage = Some(v["usage"].clone());
                }
            }
        }
        if status != 200 {
            let text = String::from_utf8_lossy(&raw);
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.chars().take(160).collect());
            out.error = Some(format!("HTTP {status}: {detail}"));
            return;
        }
        if !done {
            out.error = Some("stream ended without [DONE]".into());
            return;
        }
        out.output_tokens = token_events;
        if let Some(u) = usage {
            out.output_tokens = u["completion_tokens"].as_u64().unwrap_or(token_events);
            out.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
            out.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0);
        }
        if out.ttft.is_none() {
            out.error = Some("the answer carried no token".into());
        }
    }

    /// Replays `sessions` against `base` with `users` sessions in flight at once (a user takes
    /// the next session when theirs is over; a chat's turns go one after another). `done`
    /// counts finished requests. Outcomes come back in session order, turn by turn.
    pub async fn replay(
        &self,
        base: &str,
        sessions: Arc<Vec<Session>>,
        users: usize,
        done: Arc<AtomicUsize>,
    ) -> Vec<Outcome> {
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..users.clamp(1, sessions.len().max(1)) {
            let (client, sessions, next, done, base) = (
                self.clone(),
                Arc::clone(&sessions),
                Arc::clone(&next),
                Arc::clone(&done),
                base.to_string(),
            );
            workers.push(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(session) = sessions.get(i) else {
                        break;
                    };
                    let mut results = Vec::new();
                    for turn in &session.turns {
                        let mut o = client.send(&base, turn).await;
                        o.kind = Some(session.kind);
                        let failed = !o.ok();
                        results.push(o);
                        done.fetch_add(1, Ordering::Relaxed);
                        if failed {
                            // A user whose chat broke does not go on with it.
                            break;
                        }
                    }
                    out.push((i, results));
                }
                out
            }));
        }
        let mut slots: Vec<Vec<Outcome>> = vec![Vec::new(); sessions.len()];
        for w in workers {
            // A worker only panics on a bug; its sessions then count as failed below.
            if let Ok(results) = w.await {
                for (i, r) in results {
                    slots[i] = r;
                }
            }
        }
        let mut all = Vec::new();
        for (session, results) in sessions.iter().zip(slots) {
            let sent = results.len();
            all.extend(results);
            // Turns never sent (an earlier turn failed) count as failed too.
            for turn in &session.turns[sent..] {
                all.push(Outcome {
                    id: turn.id.clone(),
                    kind: Some(session.kind),
                    error: Some("not sent: an earlier turn of its chat failed".into()),
                    ..Outcome::default()
                });
            }
        }
        all
    }
}

/// Whether a streamed chunk carries generated text.
fn has_token(v: &Value) -> bool {
    v["choices"].as_array().is_some_and(|choices| {
        choices.iter().any(|c| {
            let text = c["text"]
                .as_str()
                .or_else(|| c["delta"]["content"].as_str());
            text.is_some_and(|t| !t.is_empty())
        })
    })
}

/// Splits an SSE byte stream into the `data:` payloads of complete events.
#[derive(Default)]
struct SseReader {
    buf: String,
}

impl SseReader {
    fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf
            .push_str(&String::from_utf8_lossy(chunk).replace('\r', ""));
        let mut events = Vec::new();
        while let Some(end) = self.buf.find("\n\n") {
            let block: String = self.buf.drain(..end + 2).collect();
            let data: Vec<&str> = block
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sse_reader_returns_complete_events_only() {
        let mut r = SseReader::default();
        assert!(r.push(b"data: {\"a\":1}").is_empty());
        assert_eq!(
            r.push(b"\r\n\r\n: keep-alive\n\ndata: x\n\ndata"),
            ["{\"a\":1}", "x"]
        );
        assert_eq!(r.push(b": [DONE]\n\n"), ["[DONE]"]);
    }

    #[test]
    fn token_events_are_the_ones_with_text() {
        assert!(has_token(&json!({"choices": [{"text": " tok0"}]})));
        assert!(has_token(
            &json!({"choices": [{"delta": {"content": " tok1"}}]})
        ));
        assert!(!has_token(
            &json!({"choices": [{"delta": {"role": "assistant"}}]})
        ));
        assert!(!has_token(&json!({"choices": [], "usage": {}})));
    }
}
