//! The Rust side of a `TandemKvAgent`: its own Tokio runtime, the agent
//! started over the engine's registered memory with its gRPC control plane,
//! transfers as handles whose result a C caller polls or waits for, and the
//! released-blocks queue. Pure Rust; `lib.rs` only checks C arguments.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use transfer::agent::{ReleaseReason, Released};
use transfer::gpu::lent::LentGpu;
use transfer::layout::{Dtype, KvFormat, MemKind, RegionKind};
use transfer::memory::{HostMemory, RegionMap};
use transfer::{
    Agent, AgentConfig, BackendKind, KvLayout, KvMemory, LayoutParams, ModelShape, Op, PlanKind,
    TransferError, TransferSpec,
};

use crate::run::Run;
use crate::status::{Failure, TandemKvStatus};

/// `tandem_kv_agent_create`'s JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// vLLM's engine id: part of the agent's name and its metadata.
    pub engine_id: String,
    /// `auto` (cuda-ipc on this host where it can, NIXL otherwise), `cuda-ipc`, `nixl`, `tcp`.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Address the control plane (gRPC) and the TCP data plane bind.
    #[serde(default = "default_listen_host")]
    pub listen_host: String,
    /// Control-plane port; 0 picks a free one (`tandem_kv_metadata` tells which).
    #[serde(default)]
    pub listen_port: u16,
    /// The host peers dial, when not `listen_host` (say, the pod IP behind 0.0.0.0).
    #[serde(default)]
    pub advertise_host: Option<String>,
    /// Blocks held for a finished prefill are freed after this long without a release.
    #[serde(default = "default_hold_timeout")]
    pub hold_timeout_s: f64,
    /// Default deadline of one transfer.
    #[serde(default = "default_transfer_timeout")]
    pub transfer_timeout_s: f64,
    /// Runtime threads of this agent.
    #[serde(default = "default_threads")]
    pub worker_threads: usize,
}

fn default_backend() -> String {
    "auto".into()
}
fn default_listen_host() -> String {
    "127.0.0.1".into()
}
fn default_hold_timeout() -> f64 {
    480.0
}
fn default_transfer_timeout() -> f64 {
    30.0
}
fn default_threads() -> usize {
    2
}

/// `tandem_kv_register_memory`'s layout JSON: the shape of one rank's KV cache as vLLM
/// allocates it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutSpec {
    pub layers: u32,
    /// KV heads of the whole model (this rank holds `kv_heads / tp_size`).
    pub kv_heads: u32,
    pub head_dim: u32,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    pub block_size: u32,
    pub num_blocks: u32,
    #[serde(default)]
    pub tp_rank: u32,
    #[serde(default = "one")]
    pub tp_size: u32,
    /// Token-major inside a block (`nhd`, vLLM's FLASH_ATTN) or head-major (`hnd`).
    #[serde(default = "default_format")]
    pub format: String,
    /// `split`: K and V are separate regions (two per layer); `fused`: one per layer.
    #[serde(default = "default_regions")]
    pub regions: String,
    /// `host` or `gpu:N`.
    #[serde(default = "default_mem")]
    pub mem: String,
}

fn default_dtype() -> String {
    "bf16".into()
}
fn one() -> u32 {
    1
}
fn default_format() -> String {
    "nhd".into()
}
fn default_regions() -> String {
    "split".into()
}
fn default_mem() -> String {
    "host".into()
}

impl LayoutSpec {
    pub fn layout(&self) -> Result<KvLayout, Failure> {
        let bad = |e: transfer::layout::LayoutError| Failure::invalid(format!("layout: {e}"));
        let dtype: Dtype = self.dtype.parse().map_err(bad)?;
        let format: KvFormat = self.format.parse().map_err(bad)?;
        let regions: RegionKind = self.regions.parse().map_err(bad)?;
        let mem: MemKind = self.mem.parse().map_err(bad)?;
        let shape = ModelShape {
            name: "vllm".into(),
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype,
        };
        let mut params = LayoutParams::new(shape, self.num_blocks);
        params.block_size = self.block_size;
        params.tp_rank = self.tp_rank;
        params.tp_size = self.tp_size;
        params.format = format;
        params.regions = regions;
        params.mem = mem;
        KvLayout::new(params).map_err(bad)
    }
}

/// A transfer's outcome as C sees it.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub bytes: u64,
    pub descriptors: u32,
    pub elapsed_ns: u64,
    pub backend: BackendKind,
    pub plan_ns: u64,
    pub submit_ns: u64,
    /// The GPU's own time (cuda-ipc), 0 when unknown.
    pub device_ns: u64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

struct Started {
    agent: Arc<Agent>,
    port: u16,
    host: String,
}

pub struct Engine {
    rt: tokio::runtime::Runtime,
    cfg: Config,
    started: Mutex<Option<Started>>,
    transfers: Mutex<HashMap<u64, Arc<Run>>>,
    next_handle: AtomicU64,
    /// Releases taken from the agent, not yet drained by the caller.
    released: Mutex<PendingReleases>,
}

#[derive(Default)]
struct PendingReleases {
    rx: Option<tokio::sync::broadcast::Receiver<Released>>,
    queue: VecDeque<Released>,
}

impl Engine {
    pub fn new(cfg: Config) -> Result<Engine, Failure> {
        // An engine's pulls are small and many: no GPU timing events unless
        // TANDEM_KV_DEVICE_TIMING=1 (or TANDEM_KV_PROFILE=1) asks for them.
        transfer::gpu::copy::set_device_timing_default(false);
        if cfg.engine_id.is_empty() {
            return Err(Failure::invalid("engine_id must not be empty"));
        }
        cfg.backend
            .parse::<BackendKind>()
            .map_err(|e| Failure::invalid(format!("backend: {e}")))?;
        for (v, what) in [
            (cfg.hold_timeout_s, "hold_timeout_s"),
            (cfg.transfer_timeout_s, "transfer_timeout_s"),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Failure::invalid(format!(
                    "{what} must be a positive number of seconds"
                )));
            }
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.worker_threads.clamp(1, 64))
            .thread_name("tandem-kv")
            .enable_all()
            .build()
            .map_err(|e| {
                Failure::new(
                    TandemKvStatus::Internal,
                    format!("starting the runtime: {e}"),
                )
            })?;
        Ok(Engine {
            rt,
            cfg,
            started: Mutex::new(None),
            transfers: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            released: Mutex::new(PendingReleases::default()),
        })
    }

    fn agent(&self) -> Result<Arc<Agent>, Failure> {
        lock(&self.started)
            .as_ref()
            .map(|s| s.agent.clone())
            .ok_or_else(|| Failure::new(TandemKvStatus::State, "no KV memory registered yet"))
    }

    /// Starts the agent over the engine's memory: region `r` of `layout`
    /// lives at `bases[r]` (vLLM's per-layer tensors), host memory or, with
    /// `mem: "gpu:N"`, device memory of CUDA device N.
    ///
    /// # Safety
    /// The regions must stay valid and writable until the agent is destroyed.
    pub unsafe fn register(&self, spec: &LayoutSpec, bases: Vec<u64>) -> Result<(), Failure> {
        let mut started = lock(&self.started);
        if started.is_some() {
            return Err(Failure::new(
                TandemKvStatus::State,
                "KV memory is registered already (one pool per agent)",
            ));
        }
        let layout = spec.layout()?;
        if bases.len() != layout.num_regions() as usize {
            return Err(Failure::invalid(format!(
                "the layout has {} regions ({} layers, {}), {} base addresses were given",
                layout.num_regions(),
                spec.layers,
                spec.regions,
                bases.len()
            )));
        }
        let map = RegionMap::new(bases, layout.region_len())
            .map_err(|e| Failure::invalid(e.to_string()))?;
        let mem = Arc::new(match layout.params().mem {
            MemKind::Host => KvMemory::from(unsafe { HostMemory::lent(map) }),
            MemKind::Gpu(n) => {
                // Initialises the driver and the device's primary context
                // (the one PyTorch uses), then checks every region is this
                // device's memory and finds the allocations behind them.
                let gpu = transfer::gpu::device(n).map_err(|e| {
                    Failure::new(TandemKvStatus::Transfer, format!("mem gpu:{n}: {e}"))
                })?;
                KvMemory::from(unsafe { LentGpu::new(&gpu, map) }.map_err(|e| {
                    Failure::new(TandemKvStatus::InvalidArgument, format!("mem gpu:{n}: {e}"))
                })?)
            }
        });
        let mut acfg = AgentConfig::new(
            &self.cfg.engine_id,
            layout,
            self.cfg.backend.parse().map_err(Failure::invalid)?,
        );
        acfg.hold_timeout = Duration::from_secs_f64(self.cfg.hold_timeout_s);
        acfg.transfer_timeout = Duration::from_secs_f64(self.cfg.transfer_timeout_s);
        let host = self.cfg.listen_host.clone();
        let bind_ip = host
            .parse()
            .map_err(|_| Failure::invalid(format!("listen_host {host:?} is not an IP address")))?;
        acfg.tcp_bind = SocketAddr::new(bind_ip, 0);
        if let Some(adv) = &self.cfg.advertise_host {
            let ip = adv.parse().map_err(|_| {
                Failure::invalid(format!("advertise_host {adv:?} is not an IP address"))
            })?;
            acfg.tcp_advertise = Some(SocketAddr::new(ip, 0));
        }
        let listen_port = self.cfg.listen_port;
        let (agent, port) = self.rt.block_on(async move {
            let agent = Agent::start(acfg, mem).await?;
            let listener = tokio::net::TcpListener::bind((bind_ip, listen_port)).await?;
            let port = listener.local_addr()?.port();
            let served = agent.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    transfer::grpc::serve(served, listener, std::future::pending()).await
                {
                    tracing::error!(error = %e, "the KV agent's control plane stopped");
                }
            });
            Ok::<_, TransferError>((agent, port))
        })?;
        lock(&self.released).rx = Some(agent.subscribe_releases());
        let host = self.cfg.advertise_host.clone().unwrap_or(host);
        *started = Some(Started { agent, port, host });
        Ok(())
    }

    /// What a peer needs to reach this agent, as JSON.
    pub fn metadata(&self) -> Result<String, Failure> {
        let started = lock(&self.started);
        let s = started
            .as_ref()
            .ok_or_else(|| Failure::new(TandemKvStatus::State, "no KV memory registered yet"))?;
        let layout = s.agent.layout();
        Ok(json!({
            "engine_id": self.cfg.engine_id,
            "agent_name": s.agent.name(),
            "instance_id": s.agent.instance_id(),
            "host": s.host,
            "port": s.port,
            "backends": s.agent.backend_kinds().iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            "num_blocks": layout.num_blocks(),
            "num_regions": layout.num_regions(),
            "block_len": layout.block_len(),
            "block_size": layout.block_size(),
            "tp_rank": layout.params().tp_rank,
            "tp_size": layout.params().tp_size,
        })
        .to_string())
    }

    /// Starts a transfer; its handle. The transfer runs on this thread
    /// until its first wait (with a known peer: planned and posted), then
    /// on the runtime (see [`Run`]).
    pub fn start_transfer(&self, spec: TransferSpec) -> Result<u64, Failure> {
        let agent = self.agent()?;
        let _rt = self.rt.enter();
        let (run, pending) = Run::start(async move { agent.transfer(spec, |_| {}).await });
        if pending {
            self.rt.spawn(run.drive());
        }
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.transfers).insert(handle, run);
        Ok(handle)
    }

    /// The transfer's outcome if it has finished (the handle is then gone),
    /// waiting up to `wait` for it.
    pub fn poll(&self, handle: u64, wait: Duration) -> Result<Option<Outcome>, Failure> {
        let run = lock(&self.transfers).get(&handle).cloned().ok_or_else(|| {
            Failure::new(
                TandemKvStatus::NotFound,
                format!("no transfer with handle {handle}"),
            )
        })?;
        let _rt = self.rt.enter();
        let Some(result) = run.poll_until(Instant::now() + wait) else {
            return Ok(None);
        };
        lock(&self.transfers).remove(&handle);
        let done = result?;
        Ok(Some(Outcome {
            bytes: done.bytes,
            descriptors: done.descriptors,
            elapsed_ns: nanos(done.elapsed),
            backend: done.backend,
            plan_ns: nanos(done.plan_time),
            submit_ns: nanos(done.submit_time),
            device_ns: done.device_time.map_or(0, nanos),
        }))
    }

    pub fn hold(&self, request_id: &str, blocks: Vec<u32>) -> Result<(), Failure> {
        self.agent()?.hold(request_id, blocks, None)?;
        Ok(())
    }

    /// Frees a held request's blocks now; how many it held.
    pub fn release(&self, request_id: &str) -> Result<usize, Failure> {
        self.agent()?
            .release(request_id)
            .map(|b| b.len())
            .ok_or_else(|| {
                Failure::new(
                    TandemKvStatus::NotFound,
                    format!("request {request_id:?} holds no blocks"),
                )
            })
    }

    /// Sends vLLM's `"<request_id>:<tp_size>"` notification to a peer.
    pub fn notify(&self, peer: &str, message: &str) -> Result<(), Failure> {
        let agent = self.agent()?;
        self.rt.block_on(agent.notify(peer, message))?;
        Ok(())
    }

    /// The releases queued so far as a JSON array, if it fits in `cap` bytes
    /// (then they are taken from the queue); else the length needed.
    pub fn drain_released(&self, cap: usize) -> Result<Result<String, usize>, Failure> {
        let mut released = lock(&self.released);
        let PendingReleases { rx, queue: q } = &mut *released;
        if let Some(rx) = rx {
            use tokio::sync::broadcast::error::TryRecvError;
            loop {
                match rx.try_recv() {
                    Ok(r) => q.push_back(r),
                    Err(TryRecvError::Lagged(n)) => {
                        tracing::warn!(
                            missed = n,
                            "released-blocks events were lost: drain more often"
                        );
                    }
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
        }
        let out: Vec<ReleasedJson> = q.iter().map(ReleasedJson::from).collect();
        let text = serde_json::to_string(&out)
            .map_err(|e| Failure::new(TandemKvStatus::Internal, e.to_string()))?;
        if text.len() + 1 > cap {
            return Ok(Err(text.len() + 1));
        }
        q.clear();
        Ok(Ok(text))
    }
}

#[derive(Serialize)]
struct ReleasedJson<'a> {
    request_id: &'a str,
    blocks: &'a [u32],
    reason: &'static str,
}

impl<'a> From<&'a Released> for ReleasedJson<'a> {
    fn from(r: &'a Released) -> Self {
        ReleasedJson {
            request_id: &r.request_id,
            blocks: &r.blocks,
            reason: match r.reason {
                ReleaseReason::Notification => "notification",
                ReleaseReason::Request => "request",
                ReleaseReason::Expired => "expired",
            },
        }
    }
}

/// A transfer asked of [`Engine::start_transfer`] in Rust terms.
pub struct TransferArgs {
    pub op: Op,
    pub request_id: String,
    pub peer: String,
    pub local_blocks: Vec<u32>,
    pub remote_blocks: Vec<u32>,
    pub notify: Option<(String, u32)>,
    pub timeout: Option<Duration>,
}

impl From<TransferArgs> for TransferSpec {
    fn from(a: TransferArgs) -> TransferSpec {
        TransferSpec {
            request_id: a.request_id,
            peer: a.peer,
            op: a.op,
            local_blocks: a.local_blocks,
            remote_blocks: a.remote_blocks,
            plan: PlanKind::Blocks,
            timeout: a.timeout,
            notify: a.notify,
            remote_instance_id: None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        Engine::new(serde_json::from_str(r#"{"engine_id": "t", "backend": "tcp"}"#).unwrap())
            .unwrap()
    }

    fn spec(mem: &str) -> LayoutSpec {
        serde_json::from_value(json!({
            "layers": 2, "kv_heads": 2, "head_dim": 16, "block_size": 4, "num_blocks": 8,
            "mem": mem,
        }))
        .unwrap()
    }

    #[test]
    fn gpu_memory_is_registered_through_the_driver_or_refused_with_the_reason() {
        if transfer::gpu::driver_present() {
            eprintln!("skipped: this machine has a CUDA driver");
            return;
        }
        let e = engine();
        // Four regions (K and V of two layers) of device pointers: without a
        // driver the registration says so, and nothing was started.
        let err = unsafe { e.register(&spec("gpu:0"), vec![0x1000, 0x2000, 0x3000, 0x4000]) }
            .unwrap_err();
        assert_eq!(err.status, TandemKvStatus::Transfer, "{}", err.message);
        assert!(
            err.message.contains("gpu:0") && err.message.contains("no CUDA driver"),
            "{}",
            err.message
        );
        assert!(e.metadata().is_err());
        // The region count is checked before any driver call.
        let err = unsafe { e.register(&spec("gpu:0"), vec![0x1000]) }.unwrap_err();
        assert_eq!(err.status, TandemKvStatus::InvalidArgument);
    }
}
