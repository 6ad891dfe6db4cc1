//! What arrives from the client: the routing headers the router sets, the
//! headers forwarded upstream, and the body read with size and idle limits.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Limited};
use rand::Rng;

use crate::error::ProxyError;

pub const PREFILLER_HEADER: &str = "x-prefiller-host-port";
pub const DATA_PARALLEL_HEADER: &str = "x-data-parallel-host-port";
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// A peer holding more of the prompt's cached prefix (llm-d's P2P source).
pub const KV_CACHE_SOURCE_HEADER: &str = "x-kv-cache-source-host-port";
/// Routing headers that only mean something to a sidecar; never forwarded upstream (and set
/// only by the router: a client's are removed).
pub const ROUTING_HEADERS: [&str; 4] = [
    PREFILLER_HEADER,
    "x-encoder-hosts-ports",
    DATA_PARALLEL_HEADER,
    KV_CACHE_SOURCE_HEADER,
];
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// The prefill target named by the router: the header may repeat or hold a
/// comma list (first wins, or a random one with sampling) and may carry a
/// legacy `http://` prefix.
pub fn prefill_target(headers: &HeaderMap, sampling: bool) -> Option<String> {
    let candidates: Vec<&str> = headers
        .get_all(PREFILLER_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let pick = if sampling && candidates.len() > 1 {
        candidates[rand::rng().random_range(0..candidates.len())]
    } else {
        candidates[0]
    };
    let pick = pick
        .strip_prefix("http://")
        .or_else(|| pick.strip_prefix("https://"))
        .unwrap_or(pick);
    Some(pick.trim_end_matches('/').to_string())
}

/// The client's address, as the listener recorded it.
pub fn client_addr(parts: &http::request::Parts) -> Option<SocketAddr> {
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// Headers for an upstream leg: the client's, minus hop-by-hop and routing headers, plus the
/// client's address in `x-forwarded-for`.
pub fn forward_headers(inbound: &HeaderMap, peer: Option<SocketAddr>) -> HeaderMap {
    let mut out = inbound.clone();
    let listed: Vec<HeaderName> = inbound
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in listed {
        out.remove(name);
    }
    for name in HOP_BY_HOP.iter().chain(ROUTING_HEADERS.iter()) {
        out.remove(*name);
    }
    out.remove(header::CONTENT_LENGTH);
    if let Some(peer) = peer {
        let ip = peer.ip().to_string();
        let value = match inbound.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            out.insert("x-forwarded-for", v);
        }
    }
    out
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyError {
    TooLarge {
        limit: usize,
    },
    Read(String),
    /// No bytes arrived for this long (slowloris).
    Stalled {
        ms: u64,
    },
}

/// How long a request body may go without a byte before the request is
/// answered 408 (`TANDEM_BODY_IDLE_TIMEOUT_MS`, default 30 s): a body that
/// stalls must not hold a task, a socket and an in-flight slot for ever.
pub fn body_idle_timeout() -> Duration {
    static T: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| crate::server::env_duration_ms("TANDEM_BODY_IDLE_TIMEOUT_MS", 30_000))
}

/// Reads a request body up to `limit` bytes, refusing early when Content-Length says more.
pub async fn read_limited(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let idle = body_idle_timeout();
    let mut body = Limited::new(body, limit);
    let mut out = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(BodyError::Stalled {
                    ms: idle.as_millis() as u64,
                })
            }
            Ok(None) => return Ok(out.freeze()),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Ok(Some(Err(e))) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(BodyError::TooLarge { limit })
            }
            Ok(Some(Err(e))) => return Err(BodyError::Read(e.to_string())),
        }
    }
}

/// Reads the request body up to the limit (413 past it).
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ProxyError> {
    read_limited(headers, body, limit)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { limit } => ProxyError::BodyTooLarge { limit },
            BodyError::Read(msg) => ProxyError::BodyRead(msg),
            BodyError::Stalled { ms } => ProxyError::BodyTimeout(ms),
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header map of `pairs` (repeats kept), for tests here and in `router`.
    pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::try_from(*k).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn target_takes_first_of_comma_list_and_strips_http() {
        let h = headers(&[(PREFILLER_HEADER, "http://10.0.0.1:8000, 10.0.0.2:8000")]);
        assert_eq!(prefill_target(&h, false).as_deref(), Some("10.0.0.1:8000"));
        let h = headers(&[(PREFILLER_HEADER, "a:1"), (PREFILLER_HEADER, "b:2")]);
        assert_eq!(prefill_target(&h, false).as_deref(), Some("a:1"));
        assert_eq!(
            prefill_target(&headers(&[(PREFILLER_HEADER, " ")]), false),
            None
        );
    }

    #[test]
    fn sampling_picks_among_all() {
        let h = headers(&[(PREFILLER_HEADER, "a:1,b:2,c:3")]);
        let seen: std::collections::HashSet<String> =
            (0..200).filter_map(|_| prefill_target(&h, true)).collect();
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn forwarded_headers_drop_routing_and_hop_by_hop() {
        let h = headers(&[
            (PREFILLER_HEADER, "p:1"),
            ("x-encoder-hosts-ports", "e:1"),
            ("x-data-parallel-host-port", "d:1"),
            ("x-kv-cache-source-host-port", "k:1"),
            ("connection", "keep-alive, x-custom-hop"),
            ("x-custom-hop", "1"),
            ("authorization", "Bearer t"),
            ("traceparent", "00-abc-def-01"),
            ("content-length", "5"),
        ]);
        let out = forward_headers(&h, Some("10.1.1.1:5".parse().unwrap()));
        for gone in [
            PREFILLER_HEADER,
            "x-encoder-hosts-ports",
            "x-data-parallel-host-port",
            "x-kv-cache-source-host-port",
            "connection",
            "x-custom-hop",
            "content-length",
        ] {
            assert!(out.get(gone).is_none(), "{gone} forwarded");
        }
        assert_eq!(out["authorization"], "Bearer t");
        assert_eq!(out["traceparent"], "00-abc-def-01");
        assert_eq!(out["x-forwarded-for"], "10.1.1.1");
    }
}
