//! The decode leg: the request sent to the local engine, and its answer streamed back to the
//! client (usage rewritten with the prefill's cached tokens, time to first byte observed, a
//! break mid-stream counted), or the prefill's failure ending the stream in the concurrent mode.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::Method;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use opentelemetry::trace::SpanKind;
use serde_json::Value;

use super::{client_response, json_headers, upstream_uri, Ctx, PrefillWatch};
use crate::body::{rewrite_usage, Observed, Prepend};
use crate::connectors::CACHE_THRESHOLD;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::telemetry::Trace;
use crate::upstream::{self, UpstreamError};

const DECODE_SPAN: &str = "llm_d.pd_proxy.decode";
const DECODE_TARGET: &str = "llm_d.pd_proxy.decode.target";

/// The decode leg once sent: when, and its span.
pub(super) struct DecodeLeg {
    sent: Instant,
    span: Trace,
}

impl Ctx<'_> {
    /// The decode leg on the local engine; the response streams back.
    pub(super) async fn decode(
        &self,
        body: Bytes,
        cached_tokens: Option<u64>,
    ) -> Result<Response, ProxyError> {
        let (resp, leg) = self.send_decode(body).await?;
        let is_json = content_type_is(&resp, "application/json");
        if let (Some(cached), true, true) = (cached_tokens, is_json, resp.status().is_success()) {
            return self.rewrite_json(resp, cached, leg).await;
        }
        Ok(self.stream_back(resp, cached_tokens, leg, None))
    }

    /// Sends the decode request; returns the engine's response head, when it
    /// was sent and its span.
    pub(super) async fn send_decode(
        &self,
        body: Bytes,
    ) -> Result<(http::Response<Incoming>, DecodeLeg), ProxyError> {
        let shared = self.shared();
        let uri = upstream_uri(
            shared.decode_scheme(),
            &self.decode_authority,
            &self.path_and_query,
        )?;
        let mut headers = json_headers(self.headers.clone(), body.len());
        let span = self.leg_span(DECODE_SPAN, DECODE_TARGET, &self.decode_authority);
        span.inject(&mut headers);
        let sent = Instant::now();
        let resp =
            upstream::send_buffered(&shared.decode_client, &Method::POST, &uri, &headers, body)
                .await
                .map_err(decode_error)
                .inspect_err(|e| span.fail(e.to_string()))?;
        span.set(
            "http.response.status_code",
            i64::from(resp.status().as_u16()),
        );
        Ok((resp, DecodeLeg { sent, span }))
    }

    /// The span of the time to the first byte, from the request's arrival.
    fn ttft_span(&self) -> Trace {
        self.trace
            .child_since("llm_d.pd_proxy.ttft", SpanKind::Internal, self.start)
    }

    pub(super) fn stream_back<B>(
        &self,
        resp: http::Response<B>,
        cached_tokens: Option<u64>,
        leg: DecodeLeg,
        prefill: Option<(tokio::sync::oneshot::Receiver<ProxyError>, PrefillWatch)>,
    ) -> Response
    where
        B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let metrics = self.shared().metrics.clone();
        let start = self.start;
        let sent = leg.sent;
        let ttft = self.ttft_span();
        let on_first = Box::new(move || {
            metrics
                .decode_first_byte
                .observe(sent.elapsed().as_secs_f64());
            metrics.ttft.observe(start.elapsed().as_secs_f64());
            ttft.end();
        });
        let broken = stream_broken(&self.shared().metrics);
        let decode_span = leg.span.clone();
        let on_error = Box::new(move |reason: &str| {
            decode_span.fail(reason.to_string());
            broken(reason);
        });
        let (parts, body) = resp.into_parts();
        // The spans end with the answer's last byte (or when the client goes).
        let mut observed = Observed::new(body, on_first, cached_tokens)
            .on_error(on_error)
            .keep(leg.span)
            .keep(self.trace.clone());
        if let Some((failed, watch)) = prefill {
            observed = observed.abort_on(failed, watch);
        }
        client_response(parts, Body::new(observed))
    }

    /// The client's body to the decode engine before any prefill (shared-storage
    /// with `cache_hit_threshold`). `None` when the engine declined it
    /// (finish reason `cache_threshold`, in a JSON answer or the first event
    /// of a stream): the prefill must run. Otherwise its answer, passed on
    /// whole, errors included, as llm-d does.
    pub(super) async fn decode_first(&self, body: Bytes) -> Result<Option<Response>, ProxyError> {
        let (resp, leg) = self.send_decode(body).await?;
        if !resp.status().is_success() {
            return Ok(Some(self.stream_back(resp, None, leg, None)));
        }
        let stream = content_type_is(&resp, "text/event-stream");
        let (parts, mut body) = resp.into_parts();
        let mut head = BytesMut::new();
        let mut event = None;
        // A JSON answer whole; a stream up to its first event, within bounds.
        let limit = self.shared().cfg.max_body_bytes;
        while head.len() < limit && event.is_none() {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        head.extend_from_slice(&data);
                        if stream {
                            event = first_event(&head);
                        }
                    }
                }
                Some(Err(e)) => return Err(ProxyError::DecodeFailed(e.to_string())),
            }
        }
        let declined = if stream {
            event.is_some_and(|e| finished_on_threshold(&e))
        } else {
            serde_json::from_slice(&head).is_ok_and(|v: Value| finished_on_threshold(&v))
        };
        if declined {
            return Ok(None);
        }
        let body = Prepend {
            head: Some(head.freeze()),
            inner: body,
        };
        Ok(Some(self.stream_back(
            http::Response::from_parts(parts, body),
            None,
            leg,
            None,
        )))
    }

    async fn rewrite_json(
        &self,
        resp: http::Response<Incoming>,
        cached: u64,
        leg: DecodeLeg,
    ) -> Result<Response, ProxyError> {
        let sent = leg.sent;
        let ttft = self.ttft_span();
        let (mut parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| ProxyError::DecodeFailed(e.to_string()))?
            .to_bytes();
        let metrics = &self.shared().metrics;
        metrics
            .decode_first_byte
            .observe(sent.elapsed().as_secs_f64());
        let bytes = match serde_json::from_slice::<Value>(&bytes) {
            Ok(mut doc) => {
                if rewrite_usage(&mut doc, cached) {
                    Bytes::from(doc.to_string())
                } else {
                    bytes
                }
            }
            Err(_) => bytes,
        };
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        metrics.ttft.observe(self.start.elapsed().as_secs_f64());
        ttft.end();
        Ok(client_response(parts, Body::from(bytes)))
    }
}

/// Whether the answer's content type starts with `prefix`.
fn content_type_is<B>(resp: &http::Response<B>, prefix: &str) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(prefix))
}

/// The first `data:` event of an event stream read so far, once its line is whole.
fn first_event(buf: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(buf).ok().or_else(|| {
        // Cut at the last whole line: a multi-byte character may be split.
        let end = buf.iter().rposition(|b| *b == b'\n')?;
        std::str::from_utf8(&buf[..end]).ok()
    })?;
    let complete = &text[..text.rfind('\n')? + 1];
    complete.lines().find_map(|line| {
        let data = line.trim().strip_prefix("data:")?.trim();
        (data != "[DONE]")
            .then(|| serde_json::from_str(data).ok())
            .flatten()
    })
}

/// Whether an answer's (or a chunk's) first choice finished on `cache_threshold`.
fn finished_on_threshold(v: &Value) -> bool {
    v.pointer("/choices/0/finish_reason")
        .and_then(Value::as_str)
        == Some(CACHE_THRESHOLD)
}

/// Counts and logs an engine answer that broke off before its end: the client
/// got a truncated answer, which is an error even though its head said 200.
pub(super) fn stream_broken(metrics: &Arc<Metrics>) -> Box<dyn FnOnce(&str) + Send> {
    let metrics = metrics.clone();
    Box::new(move |reason| {
        metrics.error(DECODE_STREAM_BROKEN);
        tracing::warn!(error = reason, "the engine's answer broke off mid-stream");
    })
}

/// Error class of an answer that broke off mid-stream.
pub const DECODE_STREAM_BROKEN: &str = "decode_stream_broken";

pub(super) fn decode_error(err: UpstreamError) -> ProxyError {
    match err {
        UpstreamError::Connect(d) => ProxyError::DecodeUnavailable(d),
        UpstreamError::Other(d) => ProxyError::DecodeFailed(d),
    }
}
