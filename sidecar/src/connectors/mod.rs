//! Connectors: how the prefill and decode legs' bodies are built for each KV
//! protocol. One module per protocol behind [`Connector`]; all pure functions
//! over JSON so that each protocol's exact wire shape is unit-tested here. The
//! orchestration (sending, retries, fallback) lives in `proxy` and must not be
//! duplicated in a connector.

pub mod mooncake;
mod nixl;
mod nixlv2;
mod offloading;
mod p2p;
mod sglang;
mod shared_storage;

use serde_json::{Map, Value};

use crate::config::{split_host_port, Config, ConnectorKind};
use crate::request::ApiKind;

pub use mooncake::{Mooncake, RemoteEngine};
pub use nixl::NixlV1;
pub use nixlv2::NixlV2;
pub use offloading::Offloading;
pub use p2p::{same_endpoint, P2pTier, REMOTE_KV_SOURCE};
pub use sglang::Sglang;
pub use shared_storage::SharedStorage;

/// A request on its way to disaggregation.
pub struct PdRequest<'a> {
    pub api: ApiKind,
    /// The client's body, never modified.
    pub body: &'a Map<String, Value>,
    /// `host:port` of the chosen prefill engine.
    pub prefill_target: &'a str,
    /// A peer holding more of the prompt's prefix (`x-kv-cache-source-host-port`,
    /// already checked), for connectors with a P2P tier.
    pub kv_source: Option<&'a str>,
    /// Mooncake: the prefill engine as its bootstrap server describes it.
    pub remote_engine: Option<&'a RemoteEngine>,
}

impl<'a> PdRequest<'a> {
    pub fn new(api: ApiKind, body: &'a Map<String, Value>, prefill_target: &'a str) -> Self {
        PdRequest {
            api,
            body,
            prefill_target,
            kv_source: None,
            remote_engine: None,
        }
    }
}

/// The bodies a connector wants sent.
#[derive(Debug)]
pub enum Legs {
    /// Prefill first; the decode body comes from its response via [`Connector::decode_body`].
    Sequential { prefill: Map<String, Value> },
    /// Both legs at once; the decode response is the client's answer.
    Concurrent {
        prefill: Map<String, Value>,
        decode: Map<String, Value>,
        /// Extra headers of the prefill leg (name, value).
        prefill_headers: Vec<(&'static str, String)>,
    },
}

pub trait Connector: Send + Sync {
    fn name(&self) -> &'static str;

    /// The legs' bodies. `Err` names what is missing to build them; the
    /// caller treats it as a prefill failure.
    fn legs(&self, req: &PdRequest<'_>) -> Result<Legs, String>;

    /// Mooncake: the port of the prefill pods' bootstrap server, which the
    /// caller asks for [`PdRequest::remote_engine`] before [`Connector::legs`].
    fn bootstrap_port(&self) -> Option<u16> {
        None
    }

    /// The decode body after a successful sequential prefill. `Err` names what
    /// the prefill response lacks; the caller treats it as a prefill failure.
    /// By default the client's body as it came (the KV is found by other means).
    fn decode_body(
        &self,
        req: &PdRequest<'_>,
        _prefill_response: &Value,
    ) -> Result<Map<String, Value>, String> {
        Ok(req.body.clone())
    }

    /// Whether the decode engine gets the client's body first, before any
    /// prefill, and the prefill runs only if that answer asks for it
    /// ([`CACHE_THRESHOLD`]): shared-storage with vLLM's `cache_hit_threshold`.
    fn decode_first(&self, _req: &PdRequest<'_>) -> bool {
        false
    }

    /// Top-level body fields only the sidecar may set: removed from every
    /// client body before any leg is built (`sanitize`).
    fn reserved_fields(&self) -> &'static [&'static str] {
        &[crate::sanitize::KV_TRANSFER_PARAMS]
    }
}

pub fn for_config(cfg: &Config) -> Box<dyn Connector> {
    let p2p = P2pTier::of(cfg);
    match cfg.connector {
        ConnectorKind::Nixlv2 => Box::new(NixlV2 {
            p2p: cfg.enable_p2p_pull.then_some(p2p),
        }),
        ConnectorKind::Nixl => Box::new(NixlV1),
        ConnectorKind::SharedStorage => Box::new(SharedStorage),
        ConnectorKind::Sglang => Box::new(Sglang {
            bootstrap_port: cfg.sglang_bootstrap_port,
        }),
        ConnectorKind::Mooncake => Box::new(Mooncake {
            bootstrap_port: cfg.mooncake_bootstrap_port,
        }),
        ConnectorKind::Offloading => Box::new(Offloading { p2p }),
    }
}

/// vLLM's request field: the share of the prompt that must be cached for the
/// engine to serve it; below it the engine answers at once with
/// [`CACHE_THRESHOLD`] as the finish reason (vLLM RFC 24256).
pub const CACHE_HIT_THRESHOLD: &str = "cache_hit_threshold";
/// The finish reason of an answer refused under `cache_hit_threshold`.
pub const CACHE_THRESHOLD: &str = "cache_threshold";

/// The client's `cache_hit_threshold`, if it set one, turned off (0): for the
/// legs that must compute whatever the cache holds.
pub(crate) fn no_cache_threshold(body: &mut Map<String, Value>) {
    if let Some(v) = body.get_mut(CACHE_HIT_THRESHOLD).filter(|v| !v.is_null()) {
        *v = Value::from(0);
    }
}

/// The prefill leg computes the KV cache and nothing else: one output token,
/// no streaming.
pub(crate) fn prefill_only(api: ApiKind, body: &mut Map<String, Value>) {
    body.insert("stream".into(), Value::Bool(false));
    body.remove("stream_options");
    for field in api.token_limit_fields() {
        body.insert((*field).into(), Value::from(1));
    }
    let nested = api.sampling_limit_fields();
    if !nested.is_empty() {
        let params = body
            .entry("sampling_params")
            .or_insert_with(|| Value::Object(Map::new()));
        if !params.is_object() {
            *params = Value::Object(Map::new());
        }
        if let Some(params) = params.as_object_mut() {
            for field in nested {
                params.insert((*field).into(), Value::from(1));
            }
        }
    }
}

/// Host part of `host:port` (brackets of IPv6 removed).
pub(crate) fn host_of(target: &str) -> &str {
    split_host_port(target)
        .map(|(h, _)| h)
        .unwrap_or(target)
        .trim_matches(['[', ']'])
}

#[cfg(test)]
pub(crate) mod test_support {
    use serde_json::{Map, Value};

    pub fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }
}
