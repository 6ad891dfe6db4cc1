//! Typed errors of the proxy. The HTTP status and the stable `x-pd-error-code`
//! are pure functions of the variant; the body is OpenAI's error JSON.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};

pub const ERROR_CODE_HEADER: &str = "x-pd-error-code";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid JSON body: {0}")]
    InvalidJson(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("the request body stalled: no bytes for {0} ms")]
    BodyTimeout(u64),
    #[error("prefill target {0:?} is not allowed (SSRF protection)")]
    PrefillForbidden(String),
    #[error("prefill target {0:?} is not allowed yet: the InferencePool's pods have not been listed (SSRF protection)")]
    PrefillPoolNotSynced(String),
    #[error("invalid prefill target {0:?}")]
    BadPrefillTarget(String),
    #[error("prefill engine {target} unreachable: {detail}")]
    PrefillUnreachable { target: String, detail: String },
    #[error("prefill engine {target} timed out after {timeout_ms} ms")]
    PrefillTimeout { target: String, timeout_ms: u64 },
    #[error("prefill engine {target} answered {status}")]
    PrefillStatus {
        target: String,
        status: u16,
        body: Bytes,
    },
    #[error("prefill engine {target} sent an invalid response: {detail}")]
    PrefillBadResponse { target: String, detail: String },
    #[error("prefill engine {target}: its KV bootstrap server did not answer usefully: {detail}")]
    PrefillBootstrap { target: String, detail: String },
    #[error("decode engine unavailable: {0}")]
    DecodeUnavailable(String),
    #[error("decode engine error: {0}")]
    DecodeFailed(String),
    #[error("unknown data-parallel rank {0:?}")]
    UnknownDataParallelRank(String),
    #[error("decode engine not ready")]
    NotReady,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::InvalidJson(_)
            | ProxyError::InvalidRequest(_)
            | ProxyError::BadPrefillTarget(_)
            | ProxyError::UnknownDataParallelRank(_)
            | ProxyError::BodyRead(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::PrefillForbidden(_) | ProxyError::PrefillPoolNotSynced(_) => {
                StatusCode::FORBIDDEN
            }
            ProxyError::PrefillUnreachable { .. }
            | ProxyError::PrefillBadResponse { .. }
            | ProxyError::PrefillBootstrap { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::PrefillTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::PrefillStatus { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            ProxyError::DecodeUnavailable(_) | ProxyError::NotReady => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::DecodeFailed(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Stable machine-readable code, also the `class` label of the error metric.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::InvalidJson(_) => "invalid_json",
            ProxyError::InvalidRequest(_) => "invalid_request",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BodyRead(_) => "body_read",
            ProxyError::BodyTimeout(_) => "body_timeout",
            ProxyError::PrefillForbidden(_) => "prefill_forbidden",
            ProxyError::PrefillPoolNotSynced(_) => "prefill_pool_not_synced",
            ProxyError::BadPrefillTarget(_) => "bad_prefill_target",
            ProxyError::PrefillUnreachable { .. } => "prefill_unreachable",
            ProxyError::PrefillTimeout { .. } => "prefill_timeout",
            ProxyError::PrefillStatus { .. } => "prefill_status",
            ProxyError::PrefillBadResponse { .. } => "prefill_bad_response",
            ProxyError::PrefillBootstrap { .. } => "prefill_bootstrap_failed",
            ProxyError::DecodeUnavailable(_) => "decode_unavailable",
            ProxyError::DecodeFailed(_) => "decode_failed",
            ProxyError::UnknownDataParallelRank(_) => "unknown_dp_rank",
            ProxyError::NotReady => "not_ready",
        }
    }

    fn openai_type(&self) -> &'static str {
        match self.status().as_u16() {
            400 => "BadRequestError",
            403 => "PermissionDeniedError",
            413 => "RequestTooLargeError",
            404 => "NotFoundError",
            503 => "ServiceUnavailableError",
            504 => "GatewayTimeoutError",
            s if s >= 500 => "BadGatewayError",
            _ => "APIError",
        }
    }

    /// Whether another prefill attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProxyError::PrefillUnreachable { .. } => true,
            ProxyError::PrefillStatus { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }
}

/// Longest part of a prefill engine's message relayed to the client.
pub const RELAYED_MESSAGE_CHARS: usize = 200;

/// What a client is told of a prefill engine's non-2xx answer: its status
/// and at most [`RELAYED_MESSAGE_CHARS`] printable characters of its message
/// (OpenAI's `error.message`, FastAPI's `detail`, or the text).
pub fn relayed_message(status: u16, body: &[u8]) -> String {
    let parsed = serde_json::from_slice::<serde_json::Value>(body).ok();
    let detail = parsed
        .as_ref()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("message"))
                .or_else(|| v.get("detail"))
        })
        .and_then(|m| m.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let clean: String = detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let clean = clean.trim();
    if clean.is_empty() {
        return format!("the prefill engine answered {status}");
    }
    let mut out: String = clean.chars().take(RELAYED_MESSAGE_CHARS).collect();
    if clean.chars().count() > RELAYED_MESSAGE_CHARS {
        out.push_str("...");
    }
    format!("the prefill engine answered {status}: {out}")
}

/// OpenAI-style error body.
pub fn error_body(message: &str, kind: &str, code: u16) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "error": {"message": message, "type": kind, "param": null, "code": code}
        })
        .to_string(),
    )
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let status = self.status();
        // A prefill error relayed in `fail` mode keeps the engine's status and
        // a bounded, cleaned message: never its body verbatim (an internal
        // service's answer is not the client's to read), nor its address.
        let body = match &self {
            ProxyError::PrefillStatus {
                status: s, body, ..
            } => error_body(
                &relayed_message(*s, body),
                self.openai_type(),
                status.as_u16(),
            ),
            _ => error_body(&self.to_string(), self.openai_type(), status.as_u16()),
        };
        let mut response = Response::new(axum::body::Body::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(ERROR_CODE_HEADER, HeaderValue::from_static(self.code()));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_a_function_of_the_variant() {
        assert_eq!(ProxyError::InvalidJson("x".into()).status(), 400);
        assert_eq!(ProxyError::BodyTooLarge { limit: 1 }.status(), 413);
        assert_eq!(
            ProxyError::DecodeUnavailable("refused".into()).status(),
            503
        );
        assert_eq!(ProxyError::DecodeFailed("reset".into()).status(), 502);
        let t = ProxyError::PrefillTimeout {
            target: "p:1".into(),
            timeout_ms: 5,
        };
        assert_eq!(t.status(), 504);
        assert!(!t.is_retryable());
        let s = ProxyError::PrefillStatus {
            target: "p:1".into(),
            status: 503,
            body: Bytes::new(),
        };
        assert!(s.is_retryable());
        let s = ProxyError::PrefillStatus {
            target: "p:1".into(),
            status: 500,
            body: Bytes::new(),
        };
        assert!(!s.is_retryable());
    }

    #[test]
    fn relayed_prefill_errors_are_bounded_and_cleaned() {
        let long = "x".repeat(5000);
        let body = format!(r#"{{"error":{{"message":"denied\n{long}","type":"auth"}}}}"#);
        let m = relayed_message(401, body.as_bytes());
        assert!(
            m.starts_with("the prefill engine answered 401: denied x"),
            "{m}"
        );
        assert!(m.len() < RELAYED_MESSAGE_CHARS + 64, "{}", m.len());
        assert!(!m.contains('\n'));
        assert_eq!(
            relayed_message(422, br#"{"detail":"bad field"}"#),
            "the prefill engine answered 422: bad field"
        );
        assert_eq!(relayed_message(500, b""), "the prefill engine answered 500");
        assert_eq!(
            relayed_message(503, b"upstream \x1b[31mdown"),
            "the prefill engine answered 503: upstream  [31mdown"
        );
        let resp = ProxyError::PrefillStatus {
            target: "10.1.2.3:8000".into(),
            status: 401,
            body: Bytes::from_static(br#"{"error":{"message":"no"}}"#),
        }
        .into_response();
        assert_eq!(resp.status(), 401);
    }

    #[test]
    fn response_is_openai_json_with_code_header() {
        let resp = ProxyError::InvalidJson("eof".into()).into_response();
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()[ERROR_CODE_HEADER], "invalid_json");
    }
}
