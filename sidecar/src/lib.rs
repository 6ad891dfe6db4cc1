//! Tandem's sidecar crate: `pd-sidecar`, the llm-d-compatible prefill/decode
//! routing proxy that runs next to every decode engine.
//!
//! Life of a request: `bin/pd-sidecar` -> [`config`] -> [`server`] (listeners,
//! middleware) -> [`proxy`] (parse, decide, prefill leg, decode leg) ->
//! [`connectors`] (per-protocol bodies) -> [`upstream`] (engine clients) ->
//! [`body`] (streamed response, usage rewrite).
//!
//! `pd-router` lives in [`router`]: it picks the prefill/decode pair per request
//! and forwards to a decode pod's sidecar, reusing [`upstream`] and [`error`].

pub mod allow;
pub mod body;
pub mod config;
pub mod configuration;
pub mod connectors;
pub mod error;
pub mod kv_events;
pub mod launch;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod request;
pub mod router;
pub mod sanitize;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod validate;
