//! The simulator's HTTP surface: routes, the shared state, and the life of a generation request
//! (parse -> role -> checks -> faults -> blocks -> pull/notify -> generate). Wire formats live in
//! `openai`, P/D fields in `pd`, block accounting in `blocks`.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::blocks::{BlockPool, EngineBlocks};
use super::config::Config;
use super::error::SimError;
use super::events::{KvEvents, Step};
use super::faults::{FaultAction, FaultConfig, Faults};
use super::generate::{plan, Generation, HoldSpec, SERVER_TIMING_REQUEST_HEADER};
use super::kv::{block_hashes, Kv};
use super::metrics::Metrics;
use super::openai::{parse_request, Api, Reply, Usage, DONE_EVENT};
use super::pd::{self, detect_role, Role};
use super::record::{self, RequestLog, MAX_BODY_BYTES};
use super::sched::Scheduler;
use super::tokens::blocks_for;

pub struct AppState {
    pub cfg: Config,
    pub engine_id: String,
    /// The port actually bound (differs from `cfg.port` when that is 0).
    pub port: AtomicU16,
    created: u64,
    pub pool: Arc<BlockPool>,
    pub faults: Faults,
    pub metrics: Arc<Metrics>,
    pub log: Arc<RequestLog>,
    pub kv: Arc<Kv>,
    /// The timing model's engine loop (`--timing-model`).
    pub sched: Option<Arc<Scheduler>>,
    /// vLLM's KV events (`--kv-events-config`), when enabled.
    pub kv_events: Option<Arc<KvEvents>>,
}

impl AppState {
    /// Builds the state and starts the KV-transfer agent.
    pub async fn new(cfg: Config) -> anyhow::Result<Arc<AppState>> {
        let engine_id = cfg
            .engine_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let kv_events = KvEvents::start(&cfg).await?;
        let pool = match kv_events {
            Some(_) => BlockPool::with_events(cfg.num_blocks),
            None => BlockPool::new(cfg.num_blocks),
        };
        let kv = Kv::start(&cfg, &engine_id, Arc::clone(&pool)).await?;
        Ok(Arc::new(AppState {
            engine_id,
            port: AtomicU16::new(cfg.port),
            created: unix_secs(),
            pool,
            faults: Faults::new(cfg.faults()),
            metrics: Metrics::new(),
            log: Arc::new(RequestLog::default()),
            kv,
            sched: cfg.timing().map(Scheduler::start),
            kv_events,
            cfg,
        }))
    }

    fn hold_ttl(&self) -> Duration {
        Duration::from_secs_f64(self.cfg.hold_timeout_s)
    }

    /// One engine step: the KV events the pool queues until the returned guard drops go out
    /// as one batch.
    fn step(&self) -> Step<'_> {
        Step::new(self.kv_events.as_deref(), &self.pool, &self.faults)
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A Mooncake bootstrap server: the data-parallel ranks of this engine (one) and their engine ids.
pub fn mooncake_bootstrap(state: Arc<AppState>) -> Router {
    Router::new().route(
        "/query",
        get(move || {
            let id = state.engine_id.clone();
            async move { Json(json!({"0": {"engine_id": id}})) }
        }),
    )
}

pub fn router(state: Arc<AppState>) -> Router {
    let log = Arc::clone(&state.log);
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(messages))
        .route("/v1/responses", post(responses))
        .route("/inference/v1/generate", post(generate_tokens))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/sim/faults", get(get_faults).post(set_faults))
        .route("/sim/release", post(release))
        .route("/sim/requests", get(get_requests).delete(clear_requests))
        .route("/sim/state", get(sim_state))
        .fallback(|| async { SimError::NotFound("Not Found".into()) })
        .method_not_allowed_fallback(|| async { SimError::MethodNotAllowed })
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(log, record::record))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

async fn completions(st: State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    generation(st, Api::Completions, headers, body).await
}

async fn chat(st: State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    generation(st, Api::Chat, headers, body).await
}

/// `/v1/messages`: non-streaming only (`stream: true` is answered with 400).
async fn messages(st: State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    generation(st, Api::Messages, headers, body).await
}

/// `/v1/responses`: non-streaming only (`stream: true` is answered with 400).
async fn responses(st: State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    generation(st, Api::Responses, headers, body).await
}

/// `/inference/v1/generate`: non-streaming only (`stream: true` is answered with 400).
async fn generate_tokens(st: State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    generation(st, Api::Generate, headers, body).await
}

async fn generation(
    State(st): State<Arc<AppState>>,
    api: Api,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let x_request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let timing_comment = headers.contains_key(SERVER_TIMING_REQUEST_HEADER);
    let mut resp = match generate(&st, api, started, x_request_id, timing_comment, &body).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "request rejected");
            e.into_response()
        }
    };
    if let Some(v) = x_request_id.and_then(|v| HeaderValue::from_str(v).ok()) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn generate(
    st: &Arc<AppState>,
    api: Api,
    started: Instant,
    x_request_id: Option<&str>,
    timing_comment: bool,
    body: &[u8],
) -> Result<Response, SimError> {
    let cfg = &st.cfg;
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| SimError::BadRequest(format!("invalid JSON body: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(SimError::BadRequest(
            "request body must be a JSON object".into(),
        ));
    };
    let req = parse_request(api, &obj, cfg.text_tokens())?;
    if let Some(model) = &req.model {
        if *model != cfg.model {
            return Err(SimError::ModelNotFound(model.clone()));
        }
    }
    if req.stream && matches!(api, Api::Messages | Api::Responses | Api::Generate) {
        return Err(SimError::BadRequest(
            "engine-sim does not stream this endpoint; send \"stream\": false".into(),
        ));
    }
    let role = detect_role(&obj, x_request_id)?;
    if let Some(fields) = pd::sglang_bootstrap(&obj) {
        tracing::debug!(%fields, "sglang bootstrap fields");
    }
    let prompt_tokens = req.prompt_tokens();
    if let Role::Decode(p) = &role {
        p.check_blocks(prompt_tokens, cfg.block_size)?;
    }
    let plan = plan(
        req.max_tokens,
        cfg.output_tokens,
        req.longest_prompt(),
        cfg.max_model_len,
        role.is_prefill(),
    )?;

    let fault = st.faults.decide(role.is_prefill());
    if !fault.delay.is_zero() {
        let _waiting = st.metrics.waiting();
        tokio::time::sleep(fault.delay).await;
    }
    match fault.action {
        FaultAction::Proceed => {}
        FaultAction::Fail(status) => return Err(SimError::Injected(status)),
        FaultAction::Hang => {
            tracing::info!("hanging this request (fault injection)");
            let _waiting = st.metrics.waiting();
            let never: std::convert::Infallible = std::future::pending().await;
            match never {}
        }
    }

    let rid = x_request_id.map_or_else(short_id, str::to_string);
    let id = match api {
        Api::Completions => format!("cmpl-{rid}"),
        Api::Chat => format!("chatcmpl-{rid}"),
        Api::Messages => format!("msg_{rid}"),
        Api::Responses => format!("resp_{rid}"),
        Api::Generate => req
            .request_id
            .clone()
            .unwrap_or_else(|| format!("gen-{rid}")),
    };
    // Prefix cache: the chain hashes of the prompt's blocks; only full blocks are cached, and at
    // least the last token is always computed (as vLLM does), so a prompt that is all cached
    // still recomputes its last block.
    let tokens = req.kv_tokens();
    let hashes = block_hashes(&tokens, cfg.block_size);
    let bs = cfg.block_size.max(1);
    let full_blocks = (prompt_tokens / bs) as usize;
    let hittable = (prompt_tokens.saturating_sub(1) / bs) as usize;
    // What the pool queues from here to the cache publication below (evictions, then stores)
    // leaves as one KV-event batch, also when the request fails on the way.
    let step = st.step();
    let mut blocks = st.pool.allocate_prefix(
        blocks_for(prompt_tokens, cfg.block_size) as usize,
        &hashes[..hittable.min(hashes.len())],
    )?;
    let hit = blocks.cached_blocks();
    let mut cached_tokens = hit as u64 * bs;
    // vLLM's cache_hit_threshold: too little of the prompt cached, and the request ends at
    // once with no output (the blocks go back).
    if let Some(t) = req.cache_hit_threshold.filter(|t| *t > 0.0) {
        if (cached_tokens as f64) < t * prompt_tokens as f64 {
            drop(blocks);
            drop(step);
            let reply = Reply {
                api,
                id,
                created: unix_secs(),
                model: cfg.model.clone(),
                choices: 1,
                output_tokens: 0,
                finish_reason: "cache_threshold",
                usage: Usage {
                    prompt_tokens,
                    completion_tokens: 0,
                    cached_tokens,
                },
                kv_transfer_params: Value::Null,
                top_level: None,
            };
            return Ok(if req.stream {
                let events = format!("{}{DONE_EVENT}", reply.finish_only_event());
                ([(header::CONTENT_TYPE, "text/event-stream")], events).into_response()
            } else {
                axum::Json(reply.full_body()).into_response()
            });
        }
    }
    // Prompt tokens this engine must compute (none when the KV was pulled).
    let mut computed = prompt_tokens - (hit as u64 * bs).min(prompt_tokens);
    if let Role::Decode(p) = &role {
        // Pull the prefill's KV for the blocks not cached here (the agent notifies the prefill
        // engine when the bytes are in), then check every byte. A failed pull falls back to local
        // prefill, as vLLM's recompute policy does; wrong bytes fail the request.
        // The pull runs in its own task, which owns the blocks until the transfer has ended:
        // a client that goes away must not free blocks the peer is still writing into (as
        // vLLM keeps a cancelled request's blocks until its transfer is done).
        let (back, pulled) = {
            let (st, p) = (Arc::clone(st), p.clone());
            tokio::spawn(async move {
                let r = st.kv.pull(&p, blocks.blocks(), hit).await;
                (blocks, r)
            })
            .await
            // Only a panic in the task (re-raised here) or a runtime shutting down end it early.
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        };
        blocks = back;
        match pulled {
            Ok(done) => {
                st.kv
                    .verify(&hashes, blocks.blocks(), hit)
                    .map_err(SimError::KvIntegrity)?;
                tracing::debug!(
                    bytes = done.bytes,
                    us = done.elapsed.as_micros() as u64,
                    "KV pulled"
                );
                cached_tokens = prompt_tokens;
                computed = 0;
            }
            Err(e) => {
                tracing::warn!(error = %e, remote = %pd::host_port(&p.remote_host, p.remote_port), "KV pull failed; prefilling locally");
                st.kv.write(&hashes[hit..], &blocks.blocks()[hit..]);
            }
        }
    } else {
        st.kv.write(&hashes[hit..], &blocks.blocks()[hit..]);
    }
    let engine_hashes = st
        .kv_events
        .as_ref()
        .map(|e| e.shape.hashes(&tokens[..full_blocks * bs as usize]));
    st.pool.publish(
        &blocks.blocks()[..full_blocks],
        &hashes[..full_blocks],
        engine_hashes.as_deref().map(|h| EngineBlocks {
            hashes: h,
            token_ids: &tokens,
            block_size: bs as usize,
        }),
    );
    drop(step);
    st.metrics.add_prompt(prompt_tokens, hit as u64 * bs);
    st.metrics.add_computed(computed);

    let hold = match role {
        Role::Prefill { legacy } => Some(HoldSpec {
            request_id: format!("{id}-{}", &short_id()[..8]),
            engine_id: st.engine_id.clone(),
            host: st.kv.host.clone(),
            port: st.kv.port,
            ttl: st.hold_ttl(),
            legacy,
            shape: st.cfg.kv_params,
            kv: Arc::clone(&st.kv),
        }),
        _ => None,
    };
    let choices = req.prompts.len();
    let reply = Reply {
        api,
        id,
        created: unix_secs(),
        model: cfg.model.clone(),
        choices,
        output_tokens: plan.output_tokens,
        finish_reason: plan.finish_reason,
        usage: Usage {
            prompt_tokens,
            completion_tokens: plan.output_tokens * choices as u64,
            cached_tokens,
        },
        kv_transfer_params: Value::Null,
        top_level: None,
    };
    let mut first_token_delay = Duration::from_millis(cfg.ttft_ms);
    if hold.is_some() {
        first_token_delay += Duration::from_millis(cfg.prefill_delay_ms);
    }
    // Timing model: compute the prompt in the engine's steps, then decode in its batch.
    let mut seq = None;
    if let Some(sched) = &st.sched {
        if computed > 0 {
            sched.prefill(computed).await;
        }
        let decode_steps = plan.output_tokens - u64::from(computed > 0);
        if decode_steps > 0 {
            seq = Some(sched.join(decode_steps));
        }
    }
    let generation = Generation::new(
        reply,
        req.include_usage,
        Arc::clone(&st.metrics),
        blocks,
        hold,
        started,
        first_token_delay,
        Duration::from_millis(cfg.itl_ms),
    )
    .in_batch(seq, computed > 0)
    .with_timing_comment(timing_comment);
    Ok(if req.stream {
        generation.respond_stream()
    } else {
        generation.respond_whole().await
    })
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    let m = &st.cfg.model;
    Json(json!({
        "object": "list",
        "data": [{
            "id": m,
            "object": "model",
            "created": st.created,
            "owned_by": "vllm",
            "root": m,
            "parent": null,
            "max_model_len": st.cfg.max_model_len,
        }]
    }))
}

/// `POST /reset_prefix_cache`, as vLLM serves it: `{"success": bool}`, false while blocks are
/// in use (running requests, blocks held for a remote decode). Its query parameters
/// (`reset_running_requests`, `reset_external`) are accepted and ignored: engine-sim neither
/// preempts running requests nor has an external cache.
async fn reset_prefix_cache(State(st): State<Arc<AppState>>) -> Json<Value> {
    let step = st.step();
    let success = st.pool.reset_prefix_cache();
    drop(step);
    if success {
        tracing::info!("prefix cache reset");
    } else {
        tracing::warn!("prefix cache not reset: some blocks are in use");
    }
    Json(json!({ "success": success }))
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let text = st.metrics.render(
        &st.cfg.model,
        st.cfg.block_size,
        &st.pool.stats(),
        &st.kv.stats,
        st.kv_events
            .as_ref()
            .map(|e| e.counts())
            .unwrap_or_default(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn get_faults(State(st): State<Arc<AppState>>) -> Json<FaultConfig> {
    Json(st.faults.get())
}

async fn set_faults(
    State(st): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<FaultConfig>, SimError> {
    let cfg: FaultConfig = serde_json::from_slice(&body)
        .map_err(|e| SimError::BadRequest(format!("invalid fault config: {e}")))?;
    cfg.validate().map_err(SimError::BadRequest)?;
    tracing::info!(?cfg, "fault config replaced");
    st.faults.set(cfg.clone());
    Ok(Json(cfg))
}

/// `POST /sim/release {"notif": "<remote_request_id>:<tp_size>"}`: a decode engine has pulled
/// the blocks of that request.
async fn release(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, SimError> {
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| SimError::BadRequest(format!("invalid JSON body: {e}")))?;
    let notif = v.get("notif").and_then(Value::as_str).ok_or_else(|| {
        SimError::BadRequest("`notif` is required (\"<request id>:<tp size>\")".into())
    })?;
    let id = match notif.rsplit_once(':') {
        Some((id, tp)) if tp.parse::<u64>().is_ok() => id,
        _ => notif,
    };
    match st.pool.release(id) {
        Some(n) => {
            tracing::info!(remote_request_id = %id, blocks = n, "held blocks released by the decode engine");
            Ok(Json(json!({"remote_request_id": id, "released_blocks": n})))
        }
        None => Err(SimError::UnknownRelease(id.to_string())),
    }
}

async fn get_requests(State(st): State<Arc<AppState>>) -> Json<Vec<record::Entry>> {
    Json(st.log.snapshot())
}

async fn clear_requests(State(st): State<Arc<AppState>>) -> StatusCode {
    st.log.clear();
    StatusCode::NO_CONTENT
}

async fn sim_state(State(st): State<Arc<AppState>>) -> Json<Value> {
    let s = st.pool.stats();
    let (prefix_queries, prefix_hits) = st.metrics.prefix_cache();
    Json(json!({
        "engine_id": st.engine_id,
        "port": st.port.load(Ordering::Relaxed),
        "held_requests": s.held_requests,
        "held_blocks": s.held_blocks,
        "released_total": s.released_blocks_total,
        "expired_total": s.expired_blocks_total,
        "engine_steps": st.sched.as_ref().map(|s| s.steps.load(Ordering::Relaxed)),
        "kv_port": st.kv.port,
        "kv_backend": st.cfg.kv_backend.to_string(),
        "kv_pulls_ok": st.kv.stats.pulls_ok.load(Ordering::Relaxed),
        "kv_pulls_failed": st.kv.stats.pulls_failed.load(Ordering::Relaxed),
        "kv_bytes_pulled": st.kv.stats.bytes_pulled.load(Ordering::Relaxed),
        "kv_pull_micros": st.kv.stats.pull_micros.load(Ordering::Relaxed),
        "kv_integrity_failures": st.kv.stats.integrity_failures.load(Ordering::Relaxed),
        "prefix_cache_queries": prefix_queries,
        "prefix_cache_hits": prefix_hits,
        "prompt_tokens_computed": st.metrics.computed_tokens(),
        "free_blocks": s.free_blocks,
        "cached_blocks": s.cached_blocks,
        "evicted_blocks_total": s.evicted_blocks_total,
        "num_blocks": s.num_blocks,
        "kv_events_endpoint": st.kv_events.as_ref().map(|e| e.endpoint()),
        "kv_events_replay_endpoint": st.kv_events.as_ref().and_then(|e| e.replay_endpoint()),
        "kv_events_published": st.kv_events.as_ref().map(|e| e.counts().published),
        "kv_events_dropped": st.kv_events.as_ref().map(|e| e.counts().dropped),
    }))
}

/// Frees holds past their deadline, checking often enough for short test timeouts.
pub async fn expire_holds(st: Arc<AppState>) {
    let period = st
        .hold_ttl()
        .div_f64(10.0)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        st.pool.expire(Instant::now());
    }
}
