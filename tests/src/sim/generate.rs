//! Producing the output of one admitted request: how many tokens and why it stops ([`plan`]), the
//! timing (TTFT, inter-token latency, extra prefill delay), and the response itself, whole or as an
//! SSE stream that generates each token only when the client is ready for it. Dropping a
//! [`Generation`] part-way (client gone) frees its blocks and counts an abort.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::blocks::Allocation;
use super::error::SimError;
use super::metrics::{Gauge, Metrics};
use super::openai::{Reply, DONE_EVENT};
use super::pd::PrefillHandle;
use super::sched::Seq;

/// How many tokens to generate and the finish reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub output_tokens: u64,
    pub finish_reason: &'static str,
}

/// Decides the output length like vLLM: the request's limit ("length"), or the default output
/// length, which stands for the model emitting EOS ("stop") unless the context runs out first.
/// A prefill for a remote decode generates exactly one token.
pub fn plan(
    limit: Option<u64>,
    default_tokens: u64,
    longest_prompt: u64,
    max_model_len: u64,
    prefill_role: bool,
) -> Result<Plan, SimError> {
    if longest_prompt >= max_model_len {
        return Err(SimError::BadRequest(format!(
            "This model's maximum context length is {max_model_len} tokens. However, your request has {longest_prompt} input tokens. Please reduce the length of the input."
        )));
    }
    let room = max_model_len - longest_prompt;
    if prefill_role {
        return Ok(Plan {
            output_tokens: 1,
            finish_reason: "length",
        });
    }
    match limit {
        Some(n) if n > room => Err(SimError::BadRequest(format!(
            "'max_tokens' is too large: {n}. This model's maximum context length is {max_model_len} tokens and your request has {longest_prompt} input tokens ({n} > {max_model_len} - {longest_prompt})."
        ))),
        Some(n) => Ok(Plan {
            output_tokens: n,
            finish_reason: "length",
        }),
        None if default_tokens > room => Ok(Plan {
            output_tokens: room,
            finish_reason: "length",
        }),
        None => Ok(Plan {
            output_tokens: default_tokens,
            finish_reason: "stop",
        }),
    }
}

/// Where a prefill-role request parks its blocks when it finishes.
pub struct HoldSpec {
    pub request_id: String,
    pub engine_id: String,
    pub host: String,
    pub port: u16,
    pub ttl: Duration,
    /// v1 form: the handle also goes at the top level of the response.
    pub legacy: bool,
    pub shape: super::pd::KvParamsShape,
    /// The agent that frees the blocks on the decode's notification.
    pub kv: Arc<super::kv::Kv>,
}

/// One admitted request, generating.
pub struct Generation {
    reply: Reply,
    include_usage: bool,
    metrics: Arc<Metrics>,
    blocks: Option<Allocation>,
    hold: Option<HoldSpec>,
    started: Instant,
    first_token_delay: Duration,
    itl: Duration,
    _running: Gauge,
    finished: bool,
    /// With the timing model: this request's place in the decode batch, and whether its first
    /// token came out of its prefill step (so it needs no decode step of its own).
    seq: Option<Seq>,
    first_from_prefill: bool,
    /// Streams end with an SSE comment carrying [`server_timing`] (asked for with
    /// [`SERVER_TIMING_REQUEST_HEADER`]).
    timing_comment: bool,
}

/// Request header that asks a streamed answer to end with a `: server-timing ...` SSE comment
/// (comments are ignored by SSE clients; whole answers always carry the `server-timing` header).
pub const SERVER_TIMING_REQUEST_HEADER: &str = "x-sim-server-timing";

/// The engine's own time for a request, from its handler's start to now, in the W3C Server-Timing
/// form (`engine;dur=<ms>`). Benchmarks subtract it from what the client measured to get the time
/// spent outside the engine (network and proxies), free of the engine's timer jitter.
pub fn server_timing(started: Instant) -> String {
    format!("engine;dur={:.3}", started.elapsed().as_secs_f64() * 1e3)
}

/// The `dur` (ms) of the `engine` entry in a Server-Timing value (or in the SSE comment that
/// carries one): the inverse of [`server_timing`].
pub fn engine_duration_ms(text: &str) -> Option<f64> {
    let at = text.find("engine;dur=")? + "engine;dur=".len();
    text[at..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

impl Generation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        reply: Reply,
        include_usage: bool,
        metrics: Arc<Metrics>,
        blocks: Allocation,
        hold: Option<HoldSpec>,
        started: Instant,
        first_token_delay: Duration,
        itl: Duration,
    ) -> Generation {
        let running = metrics.running();
        Generation {
            reply,
            include_usage,
            metrics,
            blocks: Some(blocks),
            hold,
            started,
            first_token_delay,
            itl,
            _running: running,
            finished: false,
            seq: None,
            first_from_prefill: false,
            timing_comment: false,
        }
    }

    /// Ends a streamed answer with the engine's time as an SSE comment.
    pub fn with_timing_comment(mut self, on: bool) -> Generation {
        self.timing_comment = on;
        self
    }

    /// Paces the tokens by the engine's steps (timing model).
    pub fn in_batch(mut self, seq: Option<Seq>, first_from_prefill: bool) -> Generation {
        self.seq = seq;
        self.first_from_prefill = first_from_prefill;
        self
    }

    /// Waits until token `i` is due; at the last token, finishes the request.
    async fn produce(&mut self, i: u64) {
        let delay = if i == 0 {
            self.first_token_delay
        } else {
            self.itl
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if i > 0 || !self.first_from_prefill {
            if let Some(seq) = self.seq.as_mut() {
                seq.next_token().await;
            }
        }
        if i == 0 {
            self.metrics.observe_ttft(self.started.elapsed());
        }
        self.metrics.add_generated(self.reply.choices as u64);
        if i + 1 == self.reply.output_tokens {
            self.finish();
        }
    }

    /// Releases the blocks, or parks them for the remote decode and publishes the handle.
    fn finish(&mut self) {
        self.finished = true;
        self.metrics.finished(self.reply.finish_reason);
        let Some(blocks) = self.blocks.take() else {
            return;
        };
        if let Some(h) = &self.hold {
            let block_ids = blocks.hold(&h.request_id, h.ttl);
            h.kv.hold(&h.request_id, &block_ids, h.ttl);
            tracing::info!(
                remote_request_id = %h.request_id,
                blocks = block_ids.len(),
                "prefill done, holding blocks for the remote decode"
            );
            let handle = PrefillHandle {
                block_ids: &block_ids,
                engine_id: &h.engine_id,
                request_id: &h.request_id,
                host: &h.host,
                port: h.port,
                shape: h.shape,
                num_tokens: self.reply.usage.prompt_tokens,
                expiry_unix_s: (std::time::SystemTime::now() + h.ttl)
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
            };
            self.reply.kv_transfer_params = handle.kv_transfer_params();
            if h.legacy {
                self.reply.top_level = Some(handle.top_level());
            }
        }
    }

    /// Generates everything, then answers with one JSON body.
    pub async fn respond_whole(mut self) -> Response {
        for i in 0..self.reply.output_tokens {
            self.produce(i).await;
        }
        let timing = server_timing(self.started);
        (
            StatusCode::OK,
            [(HeaderName::from_static("server-timing"), timing)],
            axum::Json(self.reply.full_body()),
        )
            .into_response()
    }

    /// Answers with an SSE stream; each token is generated when the body is polled, so a client
    /// that goes away stops the generation.
    pub fn respond_stream(self) -> Response {
        enum Phase {
            Token(u64),
            Usage,
            Done,
            End,
        }
        let stream =
            futures_util::stream::unfold((self, Phase::Token(0)), |(mut g, phase)| async move {
                let (event, next) = match phase {
                    Phase::Token(i) => {
                        g.produce(i).await;
                        let next = if i + 1 < g.reply.output_tokens {
                            Phase::Token(i + 1)
                        } else if g.include_usage {
                            Phase::Usage
                        } else {
                            Phase::Done
                        };
                        (g.reply.token_events(i), next)
                    }
                    Phase::Usage => (g.reply.usage_event(), Phase::Done),
                    Phase::Done if g.timing_comment => (
                        format!(
                            ": server-timing {}\n\n{DONE_EVENT}",
                            server_timing(g.started)
                        ),
                        Phase::End,
                    ),
                    Phase::Done => (DONE_EVENT.to_string(), Phase::End),
                    Phase::End => return None,
                };
                Some((Ok::<_, Infallible>(Bytes::from(event)), (g, next)))
            });
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(stream))
            .unwrap_or_else(|e| {
                super::error::error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
            })
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics.finished("abort");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_follows_limits_and_context() {
        let p = plan(Some(5), 16, 10, 100, false).unwrap();
        assert_eq!((p.output_tokens, p.finish_reason), (5, "length"));
        let p = plan(None, 16, 10, 100, false).unwrap();
        assert_eq!((p.output_tokens, p.finish_reason), (16, "stop"));
        let p = plan(None, 16, 90, 100, false).unwrap();
        assert_eq!((p.output_tokens, p.finish_reason), (10, "length"));
        let p = plan(Some(50), 16, 10, 100, true).unwrap();
        assert_eq!((p.output_tokens, p.finish_reason), (1, "length"));
        assert!(plan(Some(91), 16, 10, 100, false).is_err());
        assert!(plan(None, 16, 100, 100, false).is_err());
    }
}
