//! The KV-transfer agent: one per engine KV pool. Owns the backend (and so
//! the memory registration), the peer cache keyed by control-plane endpoint,
//! transfers with deadlines, and the table of blocks held for peers.
//!
//! Life of a pull (decode side): resolve the peer (cached metadata, or a
//! handshake over gRPC; again when the peer's instance changed or a transfer
//! failed in a way a restarted peer explains), plan descriptors from the two
//! layouts, post the plan in a few chunks so several requests are in flight,
//! wait with a deadline, then notify the peer with `"<request_id>:<tp_size>"`
//! so it frees the blocks. The prefill side holds blocks until that
//! notification or until they expire.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::backend::cuda_ipc::CudaIpcBackend;
use crate::backend::nixl::NixlBackend;
use crate::backend::tcp::TcpBackend;
use crate::backend::{Backend, BackendKind, Op};
use crate::error::TransferError;
use crate::gpu::copy::CopyMethod;
use crate::layout::KvLayout;

mod holds;
use crate::memory::KvMemory;
use crate::plan::{plan, plan_blocks, PlanKind, PlanOptions, TransferPlan};
use holds::HoldTable;
pub use holds::{notifications_needed, parse_notification};

/// vLLM frees blocks held for a remote decode after this long
/// (`VLLM_NIXL_ABORT_REQUEST_TIMEOUT`).
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(480);
pub const DEFAULT_TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);
const NOTIFICATION_POLL: Duration = Duration::from_millis(2);
/// Notifications for requests we do not hold (yet) are kept this long.
const ORPHAN_TTL: Duration = Duration::from_secs(60);
const MAX_ORPHANS: usize = 16_384;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Stable engine id (vLLM's `engine_id`); part of the agent name.
    pub engine_id: String,
    pub layout: KvLayout,
    pub backend: BackendKind,
    /// TCP backend: data port to bind and the address peers dial.
    pub tcp_bind: SocketAddr,
    pub tcp_advertise: Option<SocketAddr>,
    pub transfer_timeout: Duration,
    pub hold_timeout: Duration,
    /// Requests posted at once per transfer (pipelining).
    pub inflight: usize,
    pub plan_options: PlanOptions,
    /// cuda-ipc: how a plan's copies are submitted (kernel, memcpy, auto).
    pub copy_method: CopyMethod,
}

impl AgentConfig {
    pub fn new(engine_id: &str, layout: KvLayout, backend: BackendKind) -> Self {
        AgentConfig {
            engine_id: engine_id.to_string(),
            layout,
            backend,
            tcp_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            tcp_advertise: None,
            transfer_timeout: DEFAULT_TRANSFER_TIMEOUT,
            hold_timeout: DEFAULT_HOLD_TIMEOUT,
            inflight: 4,
            plan_options: PlanOptions::default(),
            copy_method: CopyMethod::Auto,
        }
    }
}

/// What a peer publishes about itself (the gRPC `AgentMetadata`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerMetadata {
    pub agent_name: String,
    pub engine_id: String,
    pub instance_id: String,
    pub layout: KvLayout,
    /// The data planes it can be reached through, preferred first, each
    /// with its backend's metadata blob.
    pub offers: Vec<(BackendKind, Vec<u8>)>,
    /// Its regions are separate allocations: plans never merge across them.
    pub separate_regions: bool,
}

/// One transfer asked of this agent.
#[derive(Debug, Clone)]
pub struct TransferSpec {
    pub request_id: String,
    /// Peer control-plane endpoint, "host:port".
    pub peer: String,
    pub op: Op,
    pub local_blocks: Vec<u32>,
    pub remote_blocks: Vec<u32>,
    pub plan: PlanKind,
    pub timeout: Option<Duration>,
    /// Sends `"<remote_request_id>:<tp_size>"` to the peer when done.
    pub notify: Option<(String, u32)>,
    pub remote_instance_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub descs_done: u32,
    pub descs_total: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransferDone {
    pub bytes: u64,
    pub descriptors: u32,
    pub elapsed: Duration,
    pub rehandshake: bool,
    /// The data plane that moved the bytes.
    pub backend: BackendKind,
    /// Time the GPU spent copying (cuda-ipc), from CUDA events.
    pub device_time: Option<Duration>,
    /// Host time planning the descriptors, and from then until the last
    /// post returned (thread hand-off and the backend's submission): with
    /// `elapsed` and `device_time`, where a transfer's time goes.
    pub plan_time: Duration,
    pub submit_time: Duration,
}

impl TransferDone {
    pub fn gbps(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s / 1e9
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseReason {
    Notification,
    Request,
    Expired,
}

/// Blocks handed back to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub request_id: String,
    pub blocks: Vec<u32>,
    pub reason: ReleaseReason,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub released_by_notification: AtomicU64,
    pub released_by_request: AtomicU64,
    pub expired: AtomicU64,
    pub notifications_received: AtomicU64,
    pub handshakes: AtomicU64,
    pub transfers_ok: AtomicU64,
    pub transfers_failed: AtomicU64,
    pub bytes_moved: AtomicU64,
}

#[derive(Clone)]
struct CachedPeer {
    name: String,
    instance_id: String,
    layout: KvLayout,
    separate_regions: bool,
    backend: Arc<dyn Backend>,
}

pub struct Agent {
    cfg: AgentConfig,
    instance_id: String,
    name: String,
    mem: Arc<KvMemory>,
    /// Data planes in order of preference; a peer uses the first it shares.
    backends: Vec<Arc<dyn Backend>>,
    peers: tokio::sync::Mutex<HashMap<String, CachedPeer>>,
    holds: Mutex<HoldTable>,
    releases: broadcast::Sender<Released>,
    pub stats: Stats,
}

/// Starts the data planes `cfg.backend` names for `mem`, preferred first.
async fn start_backends(
    cfg: &AgentConfig,
    name: &str,
    mem: &Arc<KvMemory>,
) -> Result<Vec<Arc<dyn Backend>>, TransferError> {
    let nixl = || async {
        let name = name.to_string();
        let mem = mem.clone();
        Ok::<Arc<dyn Backend>, TransferError>(Arc::new(
            tokio::task::spawn_blocking(move || NixlBackend::new(&name, mem))
                .await
                .map_err(|e| TransferError::backend("nixl", e))??,
        ))
    };
    let cuda_ipc = || -> Result<Arc<dyn Backend>, TransferError> {
        Ok(Arc::new(CudaIpcBackend::new(
            name,
            mem.clone(),
            cfg.copy_method,
        )?))
    };
    match cfg.backend {
        BackendKind::Nixl => Ok(vec![nixl().await?]),
        BackendKind::CudaIpc => Ok(vec![cuda_ipc()?]),
        BackendKind::Tcp => {
            let host = mem.host().cloned().ok_or_else(|| {
                TransferError::BadRequest(format!(
                    "the tcp backend moves host pools only; a {} pool uses cuda-ipc or nixl",
                    mem.kind()
                ))
            })?;
            Ok(vec![Arc::new(
                TcpBackend::start(name, host, cfg.tcp_bind, cfg.tcp_advertise).await?,
            )])
        }
        BackendKind::Auto => {
            let mut out: Vec<Arc<dyn Backend>> = Vec::new();
            // cuda-ipc where peers on this host can reach the pool: GPU
            // memory, or a shared host file.
            let shareable = mem.gpu().is_some() || mem.host().is_some_and(|h| h.path().is_some());
            if shareable {
                match cuda_ipc() {
                    Ok(b) => out.push(b),
                    Err(e) => tracing::warn!(error = %e, "cuda-ipc unavailable; NIXL only"),
                }
            }
            match nixl().await {
                Ok(b) => out.push(b),
                // A GPU pool still serves peers on this node by cuda-ipc; a
                // host pool without NIXL could move nothing at all.
                Err(e) if !out.is_empty() && mem.gpu().is_some() => {
                    tracing::warn!(error = %e, "NIXL unavailable; peers on other hosts cannot be reached")
                }
                Err(e) => return Err(e),
            }
            Ok(out)
        }
    }
}

/// Plans up to this many descriptors are posted on the calling task when the
/// backend takes a whole transfer in one submission; longer ones (a naive
/// 32k-token plan has 10^5) go to a blocking thread.
const INLINE_POST_MAX_DESCS: usize = 4096;

/// Polls a transfer posted on the calling task to its end cooperatively:
/// spinning through the scheduler for a copy's usual length, then with timer
/// sleeps; reports the whole plan done.
async fn finish_inline(
    mut req: Box<dyn crate::backend::InFlight>,
    deadline: Instant,
    timeout_ms: u64,
    plan: &TransferPlan,
    progress: Arc<Mutex<dyn FnMut(Progress) + Send>>,
    submit_time: Duration,
) -> Result<(Option<Duration>, Duration), TransferError> {
    let spin_until = Instant::now() + Duration::from_millis(20);
    while !req.poll()? {
        let now = Instant::now();
        if now >= deadline {
            return Err(TransferError::Deadline {
                deadline_ms: timeout_ms,
                done: 0,
                total: plan.bytes,
            });
        }
        if now < spin_until {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    (progress.lock().unwrap_or_else(|p| p.into_inner()))(Progress {
        bytes_done: plan.bytes,
        bytes_total: plan.bytes,
        descs_done: plan.len() as u32,
        descs_total: plan.len() as u32,
    });
    Ok((req.device_time(), submit_time))
}

impl Agent {
    /// Starts an agent over `mem`, which must hold `cfg.layout`.
    pub async fn start(cfg: AgentConfig, mem: Arc<KvMemory>) -> Result<Arc<Agent>, TransferError> {
        if (mem.len() as u64) < cfg.layout.total_bytes() {
            return Err(TransferError::LayoutMismatch(format!(
                "memory has {} bytes, the layout needs {}",
                mem.len(),
                cfg.layout.total_bytes()
            )));
        }
        let instance_id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("{}-{}", cfg.engine_id, &instance_id[..12]);
        let backends = start_backends(&cfg, &name, &mem).await?;
        tracing::debug!(
            agent = %name,
            memory = %mem.kind(),
            backends = ?backends.iter().map(|b| b.kind().to_string()).collect::<Vec<_>>(),
            "data planes"
        );
        let (releases, _) = broadcast::channel(1024);
        let agent = Arc::new(Agent {
            cfg,
            instance_id,
            name,
            mem,
            backends,
            peers: tokio::sync::Mutex::new(HashMap::new()),
            holds: Mutex::new(HoldTable::default()),
            releases,
            stats: Stats::default(),
        });
        let weak = Arc::downgrade(&agent);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(NOTIFICATION_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(agent) = weak.upgrade() else { break };
                agent.housekeeping();
            }
        });
        Ok(agent)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn layout(&self) -> &KvLayout {
        &self.cfg.layout
    }

    pub fn memory(&self) -> &Arc<KvMemory> {
        &self.mem
    }

    /// The configured backend (`auto` picks per peer).
    pub fn backend_kind(&self) -> BackendKind {
        self.cfg.backend
    }

    /// The data planes this agent runs, preferred first.
    pub fn backend_kinds(&self) -> Vec<BackendKind> {
        self.backends.iter().map(|b| b.kind()).collect()
    }

    /// The data plane in use with a peer endpoint, once handshaken.
    pub async fn peer_backend(&self, endpoint: &str) -> Option<BackendKind> {
        self.peers
            .lock()
            .await
            .get(endpoint)
            .map(|p| p.backend.kind())
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    pub fn metadata(&self) -> Result<PeerMetadata, TransferError> {
        Ok(PeerMetadata {
            agent_name: self.name.clone(),
            engine_id: self.cfg.engine_id.clone(),
            instance_id: self.instance_id.clone(),
            layout: self.cfg.layout.clone(),
            offers: self
                .backends
                .iter()
                .map(|b| Ok((b.kind(), b.local_metadata()?)))
                .collect::<Result<_, TransferError>>()?,
            separate_regions: self.mem.separate_regions(),
        })
    }

    /// Blocks released from now on (notification, request, expiry).
    pub fn subscribe_releases(&self) -> broadcast::Receiver<Released> {
        self.releases.subscribe()
    }

    /// Loads a peer's metadata under its endpoint, replacing what we had.
    /// The first of our data planes that the peer offers and that can open
    /// it wins: cuda-ipc refuses peers on another host, and NIXL takes them.
    pub async fn handshake(&self, endpoint: &str, md: PeerMetadata) -> Result<(), TransferError> {
        let mut peers = self.peers.lock().await;
        if let Some(old) = peers.remove(endpoint) {
            old.backend.forget_peer(&old.name);
        }
        let mut refusals = Vec::new();
        for backend in &self.backends {
            let Some((_, blob)) = md.offers.iter().find(|(k, _)| *k == backend.kind()) else {
                continue;
            };
            let b = backend.clone();
            let blob = blob.clone();
            let loaded = tokio::task::spawn_blocking(move || b.load_peer(&blob))
                .await
                .map_err(|e| TransferError::backend("agent", e))?;
            let name = match loaded {
                Ok(name) => name,
                Err(e) => {
                    tracing::debug!(peer = endpoint, backend = %backend.kind(), error = %e, "data plane refused");
                    refusals.push(format!("{}: {e}", backend.kind()));
                    continue;
                }
            };
            if name != md.agent_name {
                backend.forget_peer(&name);
                return Err(TransferError::BadMetadata(format!(
                    "backend metadata names {name:?}, the peer says {:?}",
                    md.agent_name
                )));
            }
            self.stats.handshakes.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = endpoint, agent = %name, instance = %md.instance_id, backend = %backend.kind(), "handshake");
            peers.insert(
                endpoint.to_string(),
                CachedPeer {
                    name,
                    instance_id: md.instance_id,
                    layout: md.layout,
                    separate_regions: md.separate_regions,
                    backend: backend.clone(),
                },
            );
            return Ok(());
        }
        if refusals.is_empty() {
            let offered: Vec<String> = md.offers.iter().map(|(k, _)| k.to_string()).collect();
            return Err(TransferError::BadMetadata(format!(
                "peer {endpoint} offers the {} backend(s) and this agent runs {}: no data plane in common",
                offered.join(", "),
                self.backend_kinds()
                    .iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Err(TransferError::BadMetadata(refusals.join("; ")))
    }

    /// Forgets a peer endpoint (the next transfer handshakes again).
    pub async fn forget(&self, endpoint: &str) {
        if let Some(old) = self.peers.lock().await.remove(endpoint) {
            old.backend.forget_peer(&old.name);
        }
    }

    async fn resolve(
        &self,
        endpoint: &str,
        want_instance: Option<&str>,
        force: bool,
    ) -> Result<(CachedPeer, bool), TransferError> {
        if !force {
            let peers = self.peers.lock().await;
            if let Some(p) = peers.get(endpoint) {
                if want_instance.is_none_or(|w| w.is_empty() || w == p.instance_id) {
                    return Ok((p.clone(), false));
                }
            }
        }
        let asked = Instant::now();
        let md = crate::grpc::fetch_metadata(endpoint).await?;
        let fetched = Instant::now();
        self.handshake(endpoint, md).await?;
        if crate::gpu::copy::profiling() {
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            eprintln!(
                "tandem transfer profile: {endpoint}: metadata {:.1} us, data plane {:.1} us",
                us(fetched - asked),
                us(fetched.elapsed())
            );
        }
        let peers = self.peers.lock().await;
        let p = peers
            .get(endpoint)
            .cloned()
            .ok_or_else(|| TransferError::UnknownPeer(endpoint.to_string()))?;
        Ok((p, true))
    }

    /// Plans a transfer against a peer's layout: a block list when asked
    /// for and the peer's backend runs them, descriptors otherwise.
    fn plan_for(
        &self,
        spec: &TransferSpec,
        peer: &CachedPeer,
    ) -> Result<TransferPlan, TransferError> {
        if spec.plan == PlanKind::Blocks
            && !crate::plan::shards_differ(&self.cfg.layout, &peer.layout)
            && peer.backend.runs_block_lists(&peer.name)
        {
            return Ok(plan_blocks(
                &self.cfg.layout,
                &peer.layout,
                &spec.local_blocks,
                &spec.remote_blocks,
            )?);
        }
        // Merging runs across a region boundary needs both pools to be one range there.
        let mut options = self.cfg.plan_options;
        options.merge_regions &= !peer.separate_regions && !self.mem.separate_regions();
        let p = plan(
            spec.plan,
            &self.cfg.layout,
            &peer.layout,
            &spec.local_blocks,
            &spec.remote_blocks,
            &options,
        )?;
        Ok(p)
    }

    /// Runs one transfer to completion, calling `progress` as chunks land.
    pub async fn transfer(
        &self,
        spec: TransferSpec,
        progress: impl FnMut(Progress) + Send + 'static,
    ) -> Result<TransferDone, TransferError> {
        let started = Instant::now();
        let timeout = spec.timeout.unwrap_or(self.cfg.transfer_timeout);
        let deadline = started + timeout;
        let progress = Arc::new(Mutex::new(progress));
        // A peer that accepts and never answers must not outlive the deadline.
        let resolve_by = |refresh: bool, want: Option<String>| {
            let peer = spec.peer.clone();
            async move {
                match tokio::time::timeout_at(
                    deadline.into(),
                    self.resolve(&peer, want.as_deref(), refresh),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(TransferError::Deadline {
                        deadline_ms: timeout.as_millis() as u64,
                        done: 0,
                        total: 0,
                    }),
                }
            }
        };
        let (peer, mut handshaken) = match resolve_by(false, spec.remote_instance_id.clone()).await
        {
            Ok(p) => p,
            Err(e) => {
                self.stats.transfers_failed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let planning = Instant::now();
        let resolve_time = planning - started;
        let mut plan = Arc::new(self.plan_for(&spec, &peer)?);
        let mut plan_time = planning.elapsed();
        let mut peer = peer;
        let mut retried = false;
        loop {
            let result = self
                .execute(&spec, &peer, &plan, deadline, progress.clone())
                .await;
            match result {
                Ok((device_time, submit_time)) => {
                    if crate::gpu::copy::profiling() {
                        let us = |d: Duration| d.as_secs_f64() * 1e6;
                        eprintln!(
                            "tandem transfer profile: peer lookup {:.1} us, plan {:.1} us, \
                             submit {:.1} us, total {:.1} us",
                            us(resolve_time),
                            us(plan_time),
                            us(submit_time),
                            us(started.elapsed())
                        );
                    }
                    self.stats.transfers_ok.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .bytes_moved
                        .fetch_add(plan.bytes, Ordering::Relaxed);
                    return Ok(TransferDone {
                        bytes: plan.bytes,
                        descriptors: plan.len() as u32,
                        elapsed: started.elapsed(),
                        rehandshake: handshaken && retried,
                        backend: peer.backend.kind(),
                        device_time,
                        plan_time,
                        submit_time,
                    });
                }
                Err(e) if !retried && e.may_need_rehandshake() && Instant::now() < deadline => {
                    // The peer may have restarted (new memory, new keys):
                    // handshake again and retry once.
                    tracing::info!(peer = %spec.peer, error = %e, "transfer failed; re-handshaking");
                    retried = true;
                    match resolve_by(true, None).await {
                        Ok((p, _)) => {
                            handshaken = true;
                            let planning = Instant::now();
                            plan = Arc::new(self.plan_for(&spec, &p)?);
                            plan_time = planning.elapsed();
                            peer = p;
                        }
                        Err(_) => {
                            self.stats.transfers_failed.fetch_add(1, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                }
                Err(e) => {
                    self.stats.transfers_failed.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }

    async fn execute(
        &self,
        spec: &TransferSpec,
        peer: &CachedPeer,
        plan: &Arc<TransferPlan>,
        deadline: Instant,
        progress: Arc<Mutex<dyn FnMut(Progress) + Send>>,
    ) -> Result<(Option<Duration>, Duration), TransferError> {
        let entered = Instant::now();
        let backend = peer.backend.clone();
        let peer = peer.name.clone();
        let op = spec.op;
        // Shared, not copied: a 32k-token naive plan has 10^5 descriptors.
        let plan = plan.clone();
        let total_bytes = plan.bytes;
        let inflight = match backend.max_posts() {
            Some(m) => m.min(self.cfg.inflight).max(1),
            None => self.cfg.inflight.max(1),
        };
        let notify = spec
            .notify
            .as_ref()
            .map(|(id, tp)| format!("{id}:{tp}").into_bytes());
        let timeout_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        if let Some(blocks) = plan.blocks.as_ref().filter(|_| !plan.is_empty()) {
            // A block list is posted on this task: the post is a few driver
            // calls (the ids' upload, one launch), and a hand-off to a
            // blocking thread and back costs as much as they do. Completion
            // is polled cooperatively: spinning through the scheduler for a
            // copy's usual length, then with timer sleeps.
            let req = backend.post_blocks(op, &peer, blocks, notify.as_deref())?;
            let submit_time = entered.elapsed();
            return finish_inline(req, deadline, timeout_ms, &plan, progress, submit_time).await;
        }
        // A one-submission backend (cuda-ipc) with a plan of modest size: the
        // same, for descriptors. A blocking-thread hand-off there and back
        // costs more than a small transfer's copies (~150 us of ~300 measured
        // with real vLLM).
        if inflight == 1 && !plan.is_empty() && plan.len() <= INLINE_POST_MAX_DESCS {
            let chunks = plan.chunks(1);
            let req = backend.post(op, &peer, chunks[0], notify.as_deref())?;
            let submit_time = entered.elapsed();
            drop(chunks);
            return finish_inline(req, deadline, timeout_ms, &plan, progress, submit_time).await;
        }
        tokio::task::spawn_blocking(
            move || -> Result<(Option<Duration>, Duration), TransferError> {
                let chunks = plan.chunks(inflight);
                let single = chunks.len() <= 1;
                let mut posted = Vec::with_capacity(chunks.len());
                for (i, chunk) in chunks.iter().enumerate() {
                    // With one request the notification rides on it; with several
                    // it goes out after the last one lands (order is not kept).
                    let note = if single && i == 0 {
                        notify.as_deref()
                    } else {
                        None
                    };
                    let bytes: u64 = chunk.iter().map(|d| d.len).sum();
                    posted.push((
                        backend.post(op, &peer, chunk, note)?,
                        bytes,
                        chunk.len() as u32,
                    ));
                }
                let submit_time = entered.elapsed();
                let descs_total = plan.len() as u32;
                let mut done = Progress {
                    bytes_done: 0,
                    bytes_total: total_bytes,
                    descs_done: 0,
                    descs_total,
                };
                let mut device_time: Option<Duration> = None;
                for (mut req, bytes, n) in posted {
                    if !req.wait_until(deadline)? {
                        return Err(TransferError::Deadline {
                            deadline_ms: timeout_ms,
                            done: done.bytes_done,
                            total: total_bytes,
                        });
                    }
                    if let Some(t) = req.device_time() {
                        *device_time.get_or_insert(Duration::ZERO) += t;
                    }
                    done.bytes_done += bytes;
                    done.descs_done += n;
                    (progress.lock().unwrap_or_else(|p| p.into_inner()))(done);
                }
                if plan.is_empty() || !single {
                    if let Some(msg) = &notify {
                        backend.notify(&peer, msg)?;
                    }
                }
                Ok((device_time, submit_time))
            },
        )
        .await
        .map_err(|e| TransferError::backend("agent", e))?
    }

    /// Sends a notification to a peer endpoint (handshaking if needed).
    pub async fn notify(&self, endpoint: &str, message: &str) -> Result<(), TransferError> {
        let (peer, _) = self.resolve(endpoint, None, false).await?;
        let backend = peer.backend.clone();
        let msg = message.as_bytes().to_vec();
        tokio::task::spawn_blocking(move || backend.notify(&peer.name, &msg))
            .await
            .map_err(|e| TransferError::backend("agent", e))?
    }
}
