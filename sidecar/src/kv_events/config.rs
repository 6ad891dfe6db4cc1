//! vLLM's `--kv-events-config` (`vllm/config/kv_events.py`) and the endpoint
//! rules `ZmqEventPublisher` applies to it.

use serde::{Deserialize, Serialize};

use super::TransportError;

/// Which publisher vLLM builds (`publisher`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublisherKind {
    Null,
    Zmq,
}

/// `KVEventsConfig` as vLLM reads it from JSON: same names, same defaults;
/// unknown keys are refused, as vLLM's config class refuses them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvEventsConfig {
    pub enable_kv_cache_events: bool,
    /// Unset: `zmq` when events are enabled, else `null`.
    pub publisher: Option<PublisherKind>,
    /// PUB endpoint; [`is_bind_endpoint`] decides bind or connect.
    pub endpoint: String,
    /// ROUTER endpoint answering replay requests; always bound.
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// PUB high-water mark, in messages.
    pub hwm: usize,
    /// Batches queued between the scheduler and the publishing thread.
    pub max_queue_size: usize,
    /// First frame of every message; subscribers filter on its prefix.
    pub topic: String,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            enable_kv_cache_events: false,
            publisher: None,
            endpoint: "tcp://*:5557".into(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            hwm: 100_000,
            max_queue_size: 100_000,
            topic: String::new(),
        }
    }
}

impl KvEventsConfig {
    /// Parses the JSON vLLM takes after `--kv-events-config`.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// The publisher vLLM would build: `null` unless events are enabled.
    pub fn publisher_kind(&self) -> PublisherKind {
        match (self.enable_kv_cache_events, self.publisher) {
            (false, _) => PublisherKind::Null,
            (true, Some(kind)) => kind,
            (true, None) => PublisherKind::Zmq,
        }
    }

    /// The endpoints data-parallel rank `rank` uses: vLLM runs one publisher
    /// per rank, each on the configured port plus its rank.
    pub fn for_rank(&self, rank: u32) -> Result<Self, TransportError> {
        let replay_endpoint = match &self.replay_endpoint {
            Some(ep) => Some(offset_endpoint_port(ep, rank)?),
            None => None,
        };
        Ok(Self {
            endpoint: offset_endpoint_port(&self.endpoint, rank)?,
            replay_endpoint,
            ..self.clone()
        })
    }
}

/// vLLM's rule for the PUB socket: bind when the endpoint has a wildcard
/// (`*`), an IPv6 `::`, or is `ipc://`/`inproc://`; connect otherwise
/// ("bind stable, connect volatile"). `tcp://*:5557` binds every interface;
/// `tcp://router:5557` connects to a collector that binds.
pub fn is_bind_endpoint(endpoint: &str) -> bool {
    endpoint.contains('*')
        || endpoint.contains("::")
        || endpoint.starts_with("ipc://")
        || endpoint.starts_with("inproc://")
}

/// vLLM's `offset_endpoint_port`: rank 0 keeps the endpoint; other ranks add
/// their rank to a `tcp` port (port 0 stays 0) or suffix an `inproc` name
/// with `_dp<rank>`; anything else (`ipc`) is refused for ranks above 0.
pub fn offset_endpoint_port(endpoint: &str, rank: u32) -> Result<String, TransportError> {
    if endpoint.is_empty() || rank == 0 {
        return Ok(endpoint.to_owned());
    }
    if endpoint.contains("inproc") {
        return Ok(format!("{endpoint}_dp{rank}"));
    }
    if !endpoint.contains("tcp") {
        return Err(bad(
            endpoint,
            "a data-parallel rank needs a tcp or inproc endpoint",
        ));
    }
    let Some((base, port)) = endpoint.rsplit_once(':') else {
        return Ok(endpoint.to_owned());
    };
    let port: u32 = port
        .parse()
        .map_err(|_| bad(endpoint, "the port is not a number"))?;
    if port == 0 {
        return Ok(endpoint.to_owned());
    }
    let port = port
        .checked_add(rank)
        .filter(|&p| p <= u32::from(u16::MAX))
        .ok_or_else(|| bad(endpoint, "port plus rank exceeds 65535"))?;
    Ok(format!("{base}:{port}"))
}

/// The endpoint as the ZMQ crate takes it: libzmq's `*` host (every IPv4
/// interface) becomes `0.0.0.0`; `inproc://` has no meaning across
/// processes and is refused.
pub(crate) fn socket_endpoint(endpoint: &str) -> Result<String, TransportError> {
    if endpoint.starts_with("inproc://") {
        return Err(bad(
            endpoint,
            "inproc:// is in-process only; use tcp:// or ipc://",
        ));
    }
    if let Some(rest) = endpoint.strip_prefix("tcp://*:") {
        return Ok(format!("tcp://0.0.0.0:{rest}"));
    }
    Ok(endpoint.to_owned())
}

fn bad(endpoint: &str, reason: &str) -> TransportError {
    TransportError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    }
}
