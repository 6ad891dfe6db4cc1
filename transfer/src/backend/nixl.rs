//! NIXL backend: the real NIXL library (UCX underneath: NVLink, RDMA, TCP,
//! shared memory), loaded at run time from the `nixl-cu12`/`nixl-cu13` wheels
//! through `nixl-sys`'s `stub-api` (dlopen of `libnixl_capi.so`).
//!
//! Owns one NIXL agent with the UCX backend and the pool's registrations (the
//! whole pool, or each region when they are separate allocations: an
//! engine's host memory or its GPU tensors, as DRAM or VRAM). Peers are
//! NIXL agents whose metadata blob we load; descriptors are turned into
//! addresses with each pool's base or region table. All NIXL calls go through one
//! mutex: NIXL's own tests run single-threaded because concurrent use can
//! deadlock, and a lock per call costs nothing next to a transfer.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use nixl_sys::{
    Agent, MemType, MemoryRegion, NixlDescriptor, NotificationMap, OptArgs, RegistrationHandle,
    XferDescList, XferOp, XferRequest, XferStatus,
};

use super::{check_bounds, wire, Backend, BackendKind, InFlight, Notification, Op};
use crate::error::TransferError;
use crate::gpu::Gpu;
use crate::memory::{KvMemory, RegionMap};
use crate::plan::Desc;

const MAGIC: &[u8] = b"TNDMNIXL3";
const NAME: &str = "nixl";

/// Where the NIXL runtime was found. Set once per process.
static RUNTIME: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Env var with extra UCX plugin parameters, `key=value,...`.
pub const UCX_PARAMS_ENV: &str = "TANDEM_NIXL_UCX_PARAMS";

/// Env var for NIXL's progress thread: its pause between progress passes in
/// microseconds (default [`PROGRESS_PAUSE_US`]), or `off` for no thread.
pub const PROGRESS_THREAD_ENV: &str = "TANDEM_NIXL_PROGRESS_THREAD_US";

/// Default pause of NIXL's progress thread. NIXL's own default is 0: the
/// thread polls UCX without pausing and keeps a core busy even when idle,
/// which on a small machine halves the transfer rate of every other process.
/// Without the thread, a peer's first connection is only progressed when we
/// poll, and concurrent first transfers to one peer can fail ("Not found").
pub const PROGRESS_PAUSE_US: u64 = 100;

/// The agent configuration: NIXL's, with a pausing progress thread.
fn agent_config() -> Result<nixl_sys::AgentConfig, TransferError> {
    let mut cfg = nixl_sys::AgentConfig {
        enable_prog_thread: true,
        pthr_delay_us: PROGRESS_PAUSE_US,
        ..nixl_sys::AgentConfig::default()
    };
    if let Ok(v) = std::env::var(PROGRESS_THREAD_ENV) {
        let v = v.trim();
        if v.eq_ignore_ascii_case("off") {
            cfg.enable_prog_thread = false;
        } else {
            cfg.pthr_delay_us = v.parse().map_err(|_| {
                TransferError::backend(
                    NAME,
                    format!("{PROGRESS_THREAD_ENV}={v:?}: expected microseconds or `off`"),
                )
            })?;
        }
    }
    Ok(cfg)
}

/// Env var naming the folder that holds `libnixl_capi.so`.
pub const LIB_DIR_ENV: &str = "TANDEM_NIXL_LIB_DIR";

fn candidate_dirs() -> Vec<PathBuf> {
    // An explicit folder is authoritative: no silent fallback to another copy.
    if let Some(dir) = std::env::var_os(LIB_DIR_ENV) {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs = Vec::new();
    // Next to the binary (a deployed bundle), then a checkout's .deps/nixl
    // above target/<profile>/[deps/].
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            dirs.push(dir.join("nixl"));
            for anc in dir.ancestors().take(5) {
                dirs.push(anc.join(".deps/nixl"));
            }
        }
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/nixl"));
    dirs
}

/// Loads the NIXL runtime libraries once. Must run before any other NIXL
/// call: the stub dlopens `libnixl_capi.so` by name on first use, and finds
/// the copy we loaded here by its soname.
pub fn load_runtime() -> Result<PathBuf, TransferError> {
    RUNTIME
        .get_or_init(|| {
            let mut tried = Vec::new();
            for dir in candidate_dirs() {
                let lib = dir.join("libnixl_capi.so");
                if !lib.is_file() {
                    tried.push(dir.display().to_string());
                    continue;
                }
                let c =
                    CString::new(lib.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
                // SAFETY: dlopen of a library path; the handle is kept for
                // the life of the process on purpose.
                let handle =
                    unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
                if handle.is_null() {
                    // SAFETY: dlerror returns a C string or null.
                    let err = unsafe { libc::dlerror() };
                    let msg = if err.is_null() {
                        "unknown dlopen error".to_string()
                    } else {
                        unsafe { std::ffi::CStr::from_ptr(err) }
                            .to_string_lossy()
                            .into_owned()
                    };
                    return Err(format!("{}: {msg}", lib.display()));
                }
                if nixl_sys::is_stub() {
                    return Err(format!(
                        "loaded {} but nixl-sys still reports a stub",
                        lib.display()
                    ));
                }
                return Ok(dir.canonicalize().unwrap_or(dir));
            }
            // Last chance: the dynamic linker's own search (LD_LIBRARY_PATH).
            if std::env::var_os(LIB_DIR_ENV).is_none() && !nixl_sys::is_stub() {
                return Ok(PathBuf::from("libnixl_capi.so (LD_LIBRARY_PATH)"));
            }
            Err(format!(
                "libnixl_capi.so not found (looked in {}). Run `make setup`, which unpacks the \
                 nixl-cu12 wheel into .deps/nixl, or set {LIB_DIR_ENV} to the wheel's \
                 .nixl_cu12.mesonpy.libs folder",
                tried.join(", ")
            ))
        })
        .clone()
        .map_err(TransferError::NixlUnavailable)
}

/// The registered pool as NIXL sees it.
#[derive(Debug)]
struct Pool {
    addr: usize,
    len: usize,
    /// CUDA ordinal of a VRAM pool; None for DRAM.
    device: Option<u32>,
}

fn mem_type(device: Option<u32>) -> MemType {
    if device.is_some() {
        MemType::Vram
    } else {
        MemType::Dram
    }
}

impl MemoryRegion for Pool {
    unsafe fn as_ptr(&self) -> *const u8 {
        self.addr as *const u8
    }
    fn size(&self) -> usize {
        self.len
    }
}

impl NixlDescriptor for Pool {
    fn mem_type(&self) -> MemType {
        mem_type(self.device)
    }
    fn device_id(&self) -> u64 {
        self.device.unwrap_or(0) as u64
    }
}

#[derive(Debug, Clone)]
struct PeerPool {
    addr: u64,
    len: u64,
    device: Option<u32>,
    /// The peer's regions are separate allocations.
    map: Option<RegionMap>,
}

impl PeerPool {
    fn resolve(&self, offset: u64, len: u64) -> Option<u64> {
        match &self.map {
            Some(m) => m.resolve(offset, len),
            None => (offset.checked_add(len)? <= self.len).then(|| self.addr + offset),
        }
    }
}

struct Inner {
    agent: Agent,
    backend: nixl_sys::Backend,
    _registrations: Vec<RegistrationHandle>,
    peers: HashMap<String, PeerPool>,
}

pub struct NixlBackend {
    name: String,
    mem: Arc<KvMemory>,
    /// A VRAM pool's GPU: bound on every thread that calls NIXL, as UCX's
    /// CUDA transports need the context current.
    gpu: Option<Arc<Gpu>>,
    inner: Arc<Mutex<Inner>>,
    /// vLLM's naive path posts one descriptor per block and NIXL must not
    /// merge them behind our back, or the comparison would be meaningless.
    skip_merge: bool,
}

impl NixlBackend {
    /// Creates a NIXL agent named `name` with the UCX backend and registers
    /// `mem` with it.
    pub fn new(name: &str, mem: Arc<KvMemory>) -> Result<NixlBackend, TransferError> {
        load_runtime()?;
        let gpu = mem.gpu().cloned();
        if let Some(g) = &gpu {
            g.bind()?;
        }
        let err = |what: &str, e: nixl_sys::NixlError| {
            TransferError::backend(NAME, format!("{what}: {e}"))
        };
        let agent =
            Agent::new_configured(name, &agent_config()?).map_err(|e| err("create agent", e))?;
        let plugins = agent
            .get_available_plugins()
            .map_err(|e| err("list plugins", e))?;
        let has_ucx = plugins
            .iter()
            .any(|p| p.map(|p| p == "UCX").unwrap_or(false));
        if !has_ucx {
            return Err(TransferError::NixlUnavailable(
                "the UCX plugin is missing from the NIXL plugin folder (plugins/libplugin_UCX.so)"
                    .into(),
            ));
        }
        let (_mems, params) = agent
            .get_plugin_params("UCX")
            .map_err(|e| err("UCX params", e))?;
        let backend = agent
            .create_backend("UCX", &params)
            .map_err(|e| err("create UCX backend", e))?;
        let segments = mem.segments();
        let mut opt = OptArgs::new().map_err(|e| err("opt args", e))?;
        opt.add_backend(&backend).map_err(|e| err("opt args", e))?;
        let mut registrations = Vec::with_capacity(segments.len());
        for (addr, len) in segments {
            let pool = Pool {
                addr: addr as usize,
                len: len as usize,
                device: gpu.as_ref().map(|g| g.ordinal()),
            };
            registrations.push(
                agent
                    .register_memory(&pool, Some(&opt))
                    .map_err(|e| err("register memory", e))?,
            );
        }
        Ok(NixlBackend {
            name: name.to_string(),
            mem,
            gpu,
            inner: Arc::new(Mutex::new(Inner {
                agent,
                backend,
                _registrations: registrations,
                peers: HashMap::new(),
            })),
            skip_merge: true,
        })
    }

    fn bind(&self) -> Result<(), TransferError> {
        match &self.gpu {
            Some(g) => g.bind(),
            None => Ok(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves NIXL state as it was; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct NixlInFlight {
    inner: Arc<Mutex<Inner>>,
    req: Option<XferRequest>,
}

impl InFlight for NixlInFlight {
    fn poll(&mut self) -> Result<bool, TransferError> {
        let Some(req) = &self.req else {
            return Ok(true);
        };
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match inner.agent.get_xfer_status(req) {
            Ok(XferStatus::Success) => {
                drop(inner);
                self.req = None;
                Ok(true)
            }
            Ok(XferStatus::InProgress) => Ok(false),
            Err(e) => Err(TransferError::backend(
                NAME,
                format!("transfer failed: {e}"),
            )),
        }
    }
}

impl Drop for NixlInFlight {
    fn drop(&mut self) {
        // Releasing a request NIXL still works on must happen under the lock.
        if let Some(req) = self.req.take() {
            let _guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            drop(req);
        }
    }
}

impl Backend for NixlBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Nixl
    }

    fn agent_name(&self) -> &str {
        &self.name
    }

    fn local_metadata(&self) -> Result<Vec<u8>, TransferError> {
        let md = self
            .lock()
            .agent
            .get_local_md()
            .map_err(|e| TransferError::backend(NAME, format!("metadata: {e}")))?;
        let mut out = Vec::with_capacity(md.len() + 64);
        out.extend_from_slice(MAGIC);
        wire::put_bytes(&mut out, self.name.as_bytes());
        wire::put_u64(&mut out, self.mem.addr());
        wire::put_u64(&mut out, self.mem.len() as u64);
        // 0 = DRAM, N + 1 = VRAM of CUDA device N.
        wire::put_u32(&mut out, self.gpu.as_ref().map_or(0, |g| g.ordinal() + 1));
        wire::put_bytes(&mut out, &md);
        // The region table when the regions are separate allocations (count 0: one range).
        match self.mem.region_map() {
            Some(m) => {
                wire::put_u32(&mut out, m.bases().len() as u32);
                wire::put_u64(&mut out, m.region_len());
                for &b in m.bases() {
                    wire::put_u64(&mut out, b);
                }
            }
            None => wire::put_u32(&mut out, 0),
        }
        Ok(out)
    }

    fn load_peer(&self, metadata: &[u8]) -> Result<String, TransferError> {
        let mut r = wire::Reader::new(metadata);
        r.magic(MAGIC)?;
        let name = r.string()?;
        let addr = r.u64()?;
        let len = r.u64()?;
        let device = r.u32()?.checked_sub(1);
        let md = r.bytes()?;
        let regions = r.u32()?;
        let map = if regions == 0 {
            None
        } else {
            let region_len = r.u64()?;
            let bases = (0..regions)
                .map(|_| r.u64())
                .collect::<Result<Vec<_>, _>>()?;
            let map = RegionMap::new(bases, region_len)
                .map_err(|e| TransferError::BadMetadata(format!("the peer's region table: {e}")))?;
            if map.len() != len {
                return Err(TransferError::BadMetadata(format!(
                    "the peer's region table covers {} bytes, its pool {len}",
                    map.len()
                )));
            }
            Some(map)
        };
        if name == self.name {
            return Err(TransferError::BadMetadata(
                "that is our own metadata".into(),
            ));
        }
        let mut inner = self.lock();
        if inner.peers.contains_key(&name) {
            let _ = inner.agent.invalidate_remote_md(&name);
        }
        let loaded = inner.agent.load_remote_md(md).map_err(|e| {
            TransferError::BadMetadata(format!("NIXL rejected the peer's metadata: {e}"))
        })?;
        if loaded != name {
            return Err(TransferError::BadMetadata(format!(
                "metadata names agent {loaded:?} but the envelope says {name:?}"
            )));
        }
        inner.peers.insert(
            name.clone(),
            PeerPool {
                addr,
                len,
                device,
                map,
            },
        );
        Ok(name)
    }

    fn forget_peer(&self, peer: &str) {
        let mut inner = self.lock();
        if inner.peers.remove(peer).is_some() {
            let _ = inner.agent.invalidate_remote_md(peer);
        }
    }

    fn post(
        &self,
        op: Op,
        peer: &str,
        descs: &[Desc],
        notify: Option<&[u8]>,
    ) -> Result<Box<dyn InFlight>, TransferError> {
        self.bind()?;
        let inner = self.lock();
        let remote = inner
            .peers
            .get(peer)
            .cloned()
            .ok_or_else(|| TransferError::UnknownPeer(peer.to_string()))?;
        check_bounds(descs, self.mem.len() as u64, remote.len)?;
        let err = |what: &str, e: nixl_sys::NixlError| {
            TransferError::backend(NAME, format!("{what}: {e}"))
        };
        let local_dev = self.gpu.as_ref().map(|g| g.ordinal());
        let mut local_list =
            XferDescList::new(mem_type(local_dev)).map_err(|e| err("descriptor list", e))?;
        let mut remote_list =
            XferDescList::new(mem_type(remote.device)).map_err(|e| err("descriptor list", e))?;
        let (ldev, rdev) = (
            local_dev.unwrap_or(0) as u64,
            remote.device.unwrap_or(0) as u64,
        );
        let across = |side: &str, d: &Desc| {
            TransferError::BadRequest(format!(
                "descriptor {}+{} crosses a region of the {side} pool, whose regions are separate allocations",
                if side == "local" { d.local } else { d.remote },
                d.len
            ))
        };
        for d in descs {
            let l = self
                .mem
                .resolve(d.local, d.len)
                .ok_or_else(|| across("local", d))?;
            let r = remote
                .resolve(d.remote, d.len)
                .ok_or_else(|| across("remote", d))?;
            local_list.add_desc(l as usize, d.len as usize, ldev);
            remote_list.add_desc(r as usize, d.len as usize, rdev);
        }
        let mut opt = OptArgs::new().map_err(|e| err("opt args", e))?;
        opt.add_backend(&inner.backend)
            .map_err(|e| err("opt args", e))?;
        if self.skip_merge {
            opt.set_skip_descriptor_merge(true)
                .map_err(|e| err("opt args", e))?;
        }
        if let Some(msg) = notify {
            opt.set_notification_message(msg)
                .map_err(|e| err("notification", e))?;
            opt.set_has_notification(true)
                .map_err(|e| err("notification", e))?;
        }
        let xop = match op {
            Op::Read => XferOp::Read,
            Op::Write => XferOp::Write,
        };
        let req = inner
            .agent
            .create_xfer_req(xop, &local_list, &remote_list, peer, Some(&opt))
            .map_err(|e| err("create transfer", e))?;
        let in_progress = inner
            .agent
            .post_xfer_req(&req, Some(&opt))
            .map_err(|e| err("post transfer", e))?;
        drop(inner);
        Ok(Box::new(NixlInFlight {
            inner: self.inner.clone(),
            req: if in_progress { Some(req) } else { None },
        }))
    }

    fn notify(&self, peer: &str, message: &[u8]) -> Result<(), TransferError> {
        let inner = self.lock();
        if !inner.peers.contains_key(peer) {
            return Err(TransferError::UnknownPeer(peer.to_string()));
        }
        inner
            .agent
            .send_notification(peer, message, Some(&inner.backend))
            .map_err(|e| TransferError::backend(NAME, format!("notification: {e}")))
    }

    fn take_notifications(&self) -> Result<Vec<Notification>, TransferError> {
        let inner = self.lock();
        let mut map = NotificationMap::new()
            .map_err(|e| TransferError::backend(NAME, format!("notifications: {e}")))?;
        inner
            .agent
            .get_notifications(&mut map, None)
            .map_err(|e| TransferError::backend(NAME, format!("notifications: {e}")))?;
        drop(inner);
        let mut out = Vec::new();
        let all = map
            .take_notifs()
            .map_err(|e| TransferError::backend(NAME, format!("notifications: {e}")))?;
        for (from, messages) in all {
            for m in messages {
                out.push(Notification {
                    from: from.clone(),
                    message: m.into_bytes(),
                });
            }
        }
        Ok(out)
    }
}

// SAFETY: every use of the NIXL handles inside goes through the mutex.
unsafe impl Send for Inner {}
