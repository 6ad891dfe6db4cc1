//! Response bodies on their way back to the client: streamed frame by frame,
//! timed at the first byte, and with `cached_tokens` rewritten to the prefill
//! engine's value (SSE event by event, or the whole JSON document).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use serde_json::Value;

type OnFirst = Box<dyn FnOnce() + Send>;
type OnError = Box<dyn FnOnce(&str) + Send>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Ends the stream with an error when a concurrently running prefill fails.
struct Abort {
    failed: tokio::sync::oneshot::Receiver<crate::error::ProxyError>,
    watch: crate::proxy::PrefillWatch,
}

/// Wraps an upstream body; calls `on_first` at the first data frame and, when
/// `cached_tokens` is set, rewrites usage in SSE events.
pub struct Observed<B> {
    inner: B,
    on_first: Option<OnFirst>,
    on_error: Option<OnError>,
    sse: Option<SseRewrite>,
    abort: Option<Abort>,
    /// Spans that end when the answer does (dropped with the body).
    spans: Vec<crate::telemetry::Trace>,
}

impl<B> Observed<B> {
    pub fn new(inner: B, on_first: OnFirst, cached_tokens: Option<u64>) -> Self {
        Observed {
            inner,
            on_first: Some(on_first),
            on_error: None,
            sse: cached_tokens.map(|cached| SseRewrite {
                cached,
                pending: BytesMut::new(),
            }),
            abort: None,
            spans: Vec::new(),
        }
    }

    /// Holds `span` open until the body is finished or dropped.
    pub fn keep(mut self, span: crate::telemetry::Trace) -> Self {
        if span.is_on() {
            self.spans.push(span);
        }
        self
    }

    /// Calls `f` once with the reason if the upstream body breaks before its
    /// end (an engine that died mid-stream).
    pub fn on_error(mut self, f: OnError) -> Self {
        self.on_error = Some(f);
        self
    }

    /// Keeps `watch` (the prefill task) alive with the stream and fails the
    /// stream if `failed` fires.
    pub fn abort_on(
        mut self,
        failed: tokio::sync::oneshot::Receiver<crate::error::ProxyError>,
        watch: crate::proxy::PrefillWatch,
    ) -> Self {
        self.abort = Some(Abort { failed, watch });
        self
    }

    /// The decode answer ended normally: a still-running prefill leg is left to
    /// finish (dropping it now would cancel a request the prefill engine may
    /// already be working on).
    fn ended(&mut self) {
        if let Some(mut abort) = self.abort.take() {
            abort.watch.detach();
        }
    }
}

/// `head`, then the rest of `inner`: an answer whose start was read to be
/// looked at before it is passed on.
pub struct Prepend<B> {
    pub head: Option<Bytes>,
    pub inner: B,
}

impl<B> Body for Prepend<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(head) = self.head.take().filter(|h| !h.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.as_ref().is_none_or(Bytes::is_empty) && self.inner.is_end_stream()
    }
}

impl<B> Body for Observed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(abort) = this.abort.as_mut() {
            match Pin::new(&mut abort.failed).poll(cx) {
                Poll::Ready(Ok(err)) => {
                    this.abort = None;
                    return Poll::Ready(Some(Err(Box::new(err))));
                }
                // The prefill succeeded: nothing more to watch.
                Poll::Ready(Err(_)) => this.abort = None,
                Poll::Pending => {}
            }
        }
        loop {
            let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
            let frame = match frame {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    if let Some(f) = this.on_error.take() {
                        f(&e.to_string());
                    }
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.ended();
                    // Whatever is left of an unterminated last event.
                    let rest = this.sse.as_mut().map(|s| s.pending.split().freeze());
                    return Poll::Ready(rest.filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))));
                }
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            let data = match this.sse.as_mut() {
                Some(sse) => match sse.push(data) {
                    Some(out) => out,
                    None => continue,
                },
                None => data,
            };
            if let Some(f) = this.on_first.take() {
                f();
            }
            if this.inner.is_end_stream() {
                // The server may not poll again after the last frame.
                this.ended();
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() && self.sse.as_ref().is_none_or(|s| s.pending.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        match self.sse {
            // A rewrite may change the length.
            Some(_) => SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

/// Above this, an event without a terminator is passed on as is rather than held.
const MAX_PENDING: usize = 1 << 20;

struct SseRewrite {
    cached: u64,
    pending: BytesMut,
}

impl SseRewrite {
    /// Returns the complete events received so far (rewritten where they carry
    /// usage), keeping an incomplete tail for the next frame.
    fn push(&mut self, data: Bytes) -> Option<Bytes> {
        self.pending.extend_from_slice(&data);
        let end = match last_event_end(&self.pending) {
            Some(end) => end,
            None if self.pending.len() > MAX_PENDING => self.pending.len(),
            None => return None,
        };
        let complete = self.pending.split_to(end).freeze();
        if !contains(&complete, b"\"usage\"") {
            return Some(complete);
        }
        let mut out = BytesMut::with_capacity(complete.len() + 16);
        for line in complete.split_inclusive(|&b| b == b'\n') {
            match line.strip_prefix(b"data:") {
                Some(rest) if contains(rest, b"\"usage\"") => {
                    let json = rest.trim_ascii();
                    let rewritten = serde_json::from_slice::<Value>(json)
                        .ok()
                        .and_then(|mut v| rewrite_usage(&mut v, self.cached).then_some(v));
                    match rewritten {
                        Some(v) => {
                            out.extend_from_slice(b"data: ");
                            out.extend_from_slice(v.to_string().as_bytes());
                            out.extend_from_slice(&line[line.trim_ascii_end().len()..]);
                        }
                        None => out.extend_from_slice(line),
                    }
                }
                _ => out.extend_from_slice(line),
            }
        }
        Some(out.freeze())
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// End of the last complete SSE event (after its blank line).
fn last_event_end(buf: &[u8]) -> Option<usize> {
    (1..buf.len()).rev().find_map(|i| {
        if buf[i] == b'\n'
            && (buf[i - 1] == b'\n'
                || (i >= 3 && &buf[i - 3..i] == b"\n\r\n" && buf[i - 3] == b'\n'))
        {
            Some(i + 1)
        } else {
            None
        }
    })
}

/// Sets the prompt's cached-token count in a response or stream chunk (chat and
/// completions: `usage.prompt_tokens_details`; Responses API, also nested under
/// `response`: `usage.input_tokens_details`). Returns whether anything changed.
pub fn rewrite_usage(doc: &mut Value, cached: u64) -> bool {
    let mut changed = false;
    if let Some(usage) = doc.get_mut("usage").and_then(Value::as_object_mut) {
        changed |= set_cached(usage, cached);
    }
    if let Some(usage) = doc
        .get_mut("response")
        .and_then(|r| r.get_mut("usage"))
        .and_then(Value::as_object_mut)
    {
        changed |= set_cached(usage, cached);
    }
    changed
}

fn set_cached(usage: &mut serde_json::Map<String, Value>, cached: u64) -> bool {
    let key = if usage.contains_key("input_tokens") {
        "input_tokens_details"
    } else {
        "prompt_tokens_details"
    };
    // vLLM reports `prompt_tokens_details: null` unless it runs with
    // --enable-prompt-tokens-details: null (or absent) stays as the engine sent it.
    match usage.get_mut(key).and_then(Value::as_object_mut) {
        Some(d) => {
            d.insert("cached_tokens".into(), Value::from(cached));
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rewrites_usage_event_and_keeps_others() {
        let mut s = SseRewrite {
            cached: 42,
            pending: BytesMut::new(),
        };
        let first = s.push(Bytes::from_static(
            b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[],\"us",
        ));
        assert_eq!(
            first.unwrap(),
            Bytes::from_static(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n")
        );
        let second = s
            .push(Bytes::from_static(
                b"age\":{\"prompt_tokens\":5,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\ndata: [DONE]\n\n",
            ))
            .unwrap();
        let text = std::str::from_utf8(&second).unwrap();
        assert!(text.contains("\"cached_tokens\":42"), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }

    #[test]
    fn holds_incomplete_events() {
        let mut s = SseRewrite {
            cached: 1,
            pending: BytesMut::new(),
        };
        assert!(s.push(Bytes::from_static(b"data: {\"x\":1}")).is_none());
        assert_eq!(
            s.push(Bytes::from_static(b"\n\n")).unwrap(),
            Bytes::from_static(b"data: {\"x\":1}\n\n")
        );
    }

    #[test]
    fn rewrites_json_shapes() {
        let mut chat =
            json!({"usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 0}}});
        assert!(rewrite_usage(&mut chat, 7));
        assert_eq!(chat["usage"]["prompt_tokens_details"]["cached_tokens"], 7);
        let mut resp =
            json!({"usage": {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0}}});
        rewrite_usage(&mut resp, 3);
        assert_eq!(resp["usage"]["input_tokens_details"]["cached_tokens"], 3);
        // Null details (vLLM without --enable-prompt-tokens-details) stay null, absent stays absent.
        let mut null = json!({"usage": {"prompt_tokens": 9, "prompt_tokens_details": null}});
        assert!(!rewrite_usage(&mut null, 7));
        assert_eq!(null["usage"]["prompt_tokens_details"], Value::Null);
        let mut absent = json!({"usage": {"prompt_tokens": 9}});
        assert!(!rewrite_usage(&mut absent, 7));
        assert!(absent["usage"].get("prompt_tokens_details").is_none());
        let mut none = json!({"choices": []});
        assert!(!rewrite_usage(&mut none, 3));
    }
}
