//! `pd-router`: picks the prefill/decode pair for each OpenAI request and
//! forwards it to the decode pod's pd-sidecar, naming the prefill engine in
//! `x-prefiller-host-port`.
//!
//! Life of a request: `bin/pd-router` -> [`config`] (flags, endpoints file,
//! EndpointPickerConfig YAML) -> this module's listeners and middleware ->
//! [`proxy`] (read, parse, forward, retry once, stream back) -> [`pick`]
//! (decode profile, P/D decider, prefill profile over the endpoints the
//! [`breaker`]s admit) over [`endpoint`] (in-flight, [`prefix`] index, scraped
//! engine metrics, breaker). [`probe`] runs the background scrapes (parsed by
//! [`promtext`]) and health checks. Engine clients and error bodies are the
//! sidecar's ([`crate::upstream`], [`crate::error`]).

pub mod breaker;
pub mod chat;
pub mod config;
pub mod discovery;
pub mod endpoint;
pub mod kv_feed;
pub mod kv_index;
pub mod metrics;
pub mod pick;
pub mod prefix;
pub mod probe;
pub mod promtext;
pub mod proxy;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;

use crate::config::UpstreamTls;
use crate::proxy::REQUEST_ID_HEADER;
use crate::server::{drain_on_signal, listen, serve, spawn_metrics};
use config::RouterConfig;
use metrics::RouterMetrics;
use proxy::{AppState, RouterState};

/// Keeps the client's `x-request-id` (or makes one) so the sidecar, both
/// engines and the client see the same id.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = crate::server::ensure_request_id(&mut req);
    let span = tracing::debug_span!("request", id = ?id, path = %req.uri().path());
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    resp.headers_mut().insert(REQUEST_ID_HEADER, id);
    resp
}

/// The main listener's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(proxy::health))
        .route("/ready", get(proxy::ready))
        .route("/v1/completions", post(proxy::routed))
        .route("/v1/chat/completions", post(proxy::routed))
        .route("/v1/messages", post(proxy::routed))
        .route("/v1/responses", post(proxy::routed))
        .route("/inference/v1/generate", post(proxy::routed))
        .fallback(proxy::passthrough)
        .with_state(state)
        .layer(middleware::from_fn(request_id))
}

fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(st): State<AppState>| async move {
                let now = Instant::now();
                let view = st.view();
                let s = &view.scheduler;
                for e in s.decode.iter().chain(&s.prefill) {
                    if let Some(at) = e.metrics_at() {
                        st.metrics
                            .set_metrics_age(&e.label, now.saturating_duration_since(at));
                    }
                }
                if let Some(kv) = s.kv_index() {
                    st.metrics.kv.set_index(&kv.stats(), now);
                }
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    st.metrics.render(),
                )
            }),
        )
        .with_state(state)
}

/// The shared state of a router built from `cfg`, over its static endpoints
/// (names to resolve are added by [`discovery`]).
pub fn state(cfg: RouterConfig) -> AppState {
    let metrics = Arc::new(RouterMetrics::new());
    let members = discovery::Members {
        decode: cfg.decode.clone(),
        prefill: cfg.prefill.clone(),
    };
    let view = discovery::view_of(&cfg, &metrics, None, members);
    let client = |max_idle| {
        crate::upstream::build_client(
            UpstreamTls {
                enabled: true,
                insecure_skip_verify: cfg.tls_insecure_skip_verify,
            },
            cfg.upstream_idle_timeout,
            max_idle,
        )
    };
    let probe_client = client(2);
    let proxy_client = client(cfg.max_idle_conns_per_host);
    Arc::new(RouterState::new(
        cfg,
        view,
        proxy_client,
        probe_client,
        metrics,
    ))
}

/// Binds the listeners, then serves until a termination signal.
pub async fn run(cfg: RouterConfig) -> anyhow::Result<()> {
    let grace = cfg.shutdown_grace_period;
    let (bind, port, metrics_port) = (cfg.bind.clone(), cfg.port, cfg.metrics_port);
    let state = state(cfg);
    let (stop_tx, stop_rx) = watch::channel(false);

    let listener = listen(&bind, port)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {bind} port {port}: {e}"))?;
    // Probes for the static endpoints, then a first lookup of the names before serving.
    let mut probes = discovery::Probes::default();
    probes.sync(&state, &state.view());
    let mut resolved = discovery::Resolved::new(&state.cfg);
    let dns = !state.cfg.decode_dns.is_empty() || !state.cfg.prefill_dns.is_empty();
    if dns {
        discovery::refresh(&state, &mut probes, &mut resolved, &discovery::lookup).await;
    }
    let s = &state.cfg.scheduling;
    let p = &state.cfg.probes;
    let view = state.view();
    tracing::info!(
        addr = %listener.local_addr()?,
        decode = ?view.members.decode.iter().map(|d| d.label()).collect::<Vec<_>>(),
        prefill = ?view.members.prefill.iter().map(|p| p.label()).collect::<Vec<_>>(),
        decode_dns = ?state.cfg.decode_dns.iter().map(|n| &n.host).collect::<Vec<_>>(),
        prefill_dns = ?state.cfg.prefill_dns.iter().map(|n| &n.host).collect::<Vec<_>>(),
        threshold_tokens = s.threshold,
        block_size = s.prefix.block_size,
        refresh_metrics_interval = ?p.refresh_metrics_interval,
        health_check_interval = ?p.health_check_interval,
        "pd-router listening"
    );
    s.log_unapplied();
    // With names to resolve, the discovery task owns the probes (and stops them at the end).
    let (discovery, mut static_probes) = if dns {
        let task = tokio::spawn(discovery::run(
            state.clone(),
            probes,
            resolved,
            state.cfg.dns_refresh_interval,
            stop_rx.clone(),
        ));
        (Some(task), None)
    } else {
        (None, Some(probes))
    };
    // The engines' KV events, when a precise prefix scorer is configured.
    let kv_feed = kv_feed::start(&state, stop_rx.clone()).await?;
    let mut tasks = vec![tokio::spawn(serve(
        listener,
        router(state.clone()),
        None,
        stop_rx.clone(),
        grace,
    ))];
    if metrics_port != 0 {
        let app = metrics_router(state.clone());
        tasks.push(spawn_metrics(&bind, metrics_port, app, stop_rx.clone(), grace).await?);
    }
    drain_on_signal(stop_tx, tasks, grace).await;
    if let Some(d) = discovery {
        let _ = d.await;
    }
    if let Some(f) = kv_feed {
        let _ = f.await;
    }
    if let Some(p) = static_probes.as_mut() {
        p.stop();
    }
    Ok(())
}
