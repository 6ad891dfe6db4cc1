//! `cuda-ipc` backend: peers on the same host. A GPU pool is exported as a
//! legacy CUDA IPC handle, or (`--gpu-share fd`, a VMM allocation) as a file
//! descriptor handed out on a Unix socket (`fd_pass`); a host pool as its
//! shared-memory file, which the peer maps and registers with CUDA. The peer opens it once per instance
//! (`load_peer`, cached by the agent like NIXL metadata) and then moves a
//! whole transfer plan in ONE submission on its own GPU (`gpu::copy`: the
//! gather kernel, or `cuMemcpyAsync` per long run), completed by a CUDA
//! event.
//!
//! Same host is known from the kernel's boot id
//! (`/proc/sys/kernel/random/boot_id`), which every container on a node
//! shares and no two nodes do. Two agents in one process (kvbench, tests)
//! use each other's addresses directly. Legacy IPC handles do not cross PID
//! namespaces: two pods on one node use `--gpu-share fd` with a socket
//! folder both mount (or a shared PID namespace, or NIXL).
//!
//! Notifications (`"<request_id>:<tp_size>"`) travel as Unix datagrams to
//! the socket each backend binds in its IPC folder (`TANDEM_CUDA_IPC_DIR`,
//! default the temp folder; two pods need a folder both mount).

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use super::fd_pass::{fetch_fd, FdServer};
use super::{check_bounds, wire, Backend, BackendKind, InFlight, Notification, Op};
use crate::error::TransferError;
use crate::gpu::copy::{BlockCopy, Copier, CopyMethod, CopyOp, Submitted};
use crate::gpu::{DeviceBuffer, Gpu, HostRegistration, IpcMapping};
use crate::memory::{HostMemory, KvMemory};
use crate::plan::{BlockList, Desc};

const MAGIC: &[u8] = b"TNDMCIPC2";
const NAME: &str = "cuda-ipc";

/// Folder for the notification sockets.
pub const IPC_DIR_ENV: &str = "TANDEM_CUDA_IPC_DIR";

const POOL_GPU: u32 = 1;
const POOL_HOST_SHM: u32 = 2;
const POOL_HOST_PRIVATE: u32 = 3;
const POOL_GPU_FD: u32 = 4;

/// This host's identity: the kernel's boot id.
pub fn host_id() -> String {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown-host".into())
    })
    .clone()
}

/// Random per process: two agents with the same one share an address space.
fn process_nonce() -> u64 {
    static N: OnceLock<u64> = OnceLock::new();
    *N.get_or_init(|| {
        let id = uuid::Uuid::new_v4().as_u64_pair();
        id.0 ^ id.1
    })
}

/// What a backend publishes about its pool.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Export {
    name: String,
    host_id: String,
    nonce: u64,
    socket: PathBuf,
    pool: u32,
    addr: u64,
    len: u64,
    /// GPU: the device UUID; host: empty.
    device: String,
    /// GPU: the IPC handle; GPU by descriptor: the socket handing it out;
    /// shared host pool: the file's path.
    handle: Vec<u8>,
    /// GPU by descriptor: the allocation's mapped size (>= len).
    alloc: u64,
}

impl Export {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(MAGIC);
        wire::put_bytes(&mut out, self.name.as_bytes());
        wire::put_bytes(&mut out, self.host_id.as_bytes());
        wire::put_u64(&mut out, self.nonce);
        wire::put_bytes(&mut out, self.socket.as_os_str().as_encoded_bytes());
        wire::put_u32(&mut out, self.pool);
        wire::put_u64(&mut out, self.addr);
        wire::put_u64(&mut out, self.len);
        wire::put_bytes(&mut out, self.device.as_bytes());
        wire::put_bytes(&mut out, &self.handle);
        wire::put_u64(&mut out, self.alloc);
        out
    }

    fn decode(buf: &[u8]) -> Result<Export, TransferError> {
        let mut r = wire::Reader::new(buf);
        r.magic(MAGIC)?;
        let name = r.string()?;
        let host_id = r.string()?;
        let nonce = r.u64()?;
        let socket = PathBuf::from(r.string()?);
        let pool = r.u32()?;
        let addr = r.u64()?;
        let len = r.u64()?;
        let device = r.string()?;
        let handle = r.bytes()?.to_vec();
        let alloc = r.u64()?;
        if !matches!(
            pool,
            POOL_GPU | POOL_HOST_SHM | POOL_HOST_PRIVATE | POOL_GPU_FD
        ) {
            return Err(TransferError::BadMetadata(format!(
                "unknown pool kind {pool}"
            )));
        }
        if pool == POOL_GPU_FD && alloc < len {
            return Err(TransferError::BadMetadata(format!(
                "pool of {len} bytes in an allocation of {alloc}"
            )));
        }
        if pool == POOL_GPU && handle.len() != 64 {
            return Err(TransferError::BadMetadata(format!(
                "CUDA IPC handle of {} bytes, expected 64",
                handle.len()
            )));
        }
        Ok(Export {
            name,
            host_id,
            nonce,
            socket,
            pool,
            addr,
            len,
            device,
            handle,
            alloc,
        })
    }
}

/// Why a peer's export cannot be opened from here, before any CUDA call.
fn reachable(ours: &Export, peer: &Export) -> Result<(), String> {
    if peer.host_id != ours.host_id {
        return Err(format!(
            "peer {} is on another host (boot id {}, ours {}): cuda-ipc reaches peers on \
             this host only",
            peer.name, peer.host_id, ours.host_id
        ));
    }
    if peer.pool == POOL_HOST_PRIVATE && peer.nonce != ours.nonce {
        return Err(format!(
            "peer {}'s pool is private host memory of another process: give it a shared \
             file (kv-agent --shm) to be reachable by cuda-ipc",
            peer.name
        ));
    }
    Ok(())
}

/// A peer's memory as this process reaches it.
struct PeerPool {
    base: u64,
    len: u64,
    /// The peer's pool is host memory (its copies cross PCIe).
    host: bool,
    socket: PathBuf,
    _mapping: PeerMapping,
}

enum PeerMapping {
    /// In this process: the address as published.
    Direct,
    Ipc(IpcMapping),
    /// A peer's VMM allocation imported from its descriptor.
    Fd(DeviceBuffer),
    /// A peer's shared host file, mapped here; the registration drops
    /// before the mapping (field order).
    Host {
        reg: HostRegistration,
        _map: HostMemory,
    },
    /// Host memory of this process that we registered for the device.
    Registered(HostRegistration),
}

pub struct CudaIpcBackend {
    export: Export,
    mem: Arc<KvMemory>,
    /// The GPU that runs this side's copies (the pool's own GPU).
    copier: Option<Arc<Copier>>,
    method: CopyMethod,
    peers: Mutex<HashMap<String, Arc<PeerPool>>>,
    socket: Arc<UnixDatagram>,
    /// Hands our VMM allocation's descriptor to peers (`--gpu-share fd`).
    _fd_server: Option<FdServer>,
}

fn socket_dir() -> PathBuf {
    std::env::var_os(IPC_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

impl CudaIpcBackend {
    /// Exports `mem` under `name`. A GPU pool needs the driver; a host pool
    /// can be exported (and read by GPU peers) without one.
    pub fn new(
        name: &str,
        mem: Arc<KvMemory>,
        method: CopyMethod,
    ) -> Result<CudaIpcBackend, TransferError> {
        let nonce = process_nonce();
        let dir = socket_dir();
        let stem = format!(
            "tkv-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        if mem.separate_regions() {
            return Err(TransferError::backend(
                NAME,
                "a pool whose regions are separate host allocations is moved by nixl or tcp",
            ));
        }
        let mut fd_server = None;
        let mut alloc = 0;
        let (pool, device, handle, copier) = match mem.as_ref() {
            KvMemory::Gpu(buf) if buf.alloc_size().is_some() => {
                let path = dir.join(format!("{stem}.fd.sock"));
                let server = FdServer::start(&path, buf.export_fd()?).map_err(|e| {
                    TransferError::backend(
                        NAME,
                        format!(
                            "serving the pool's descriptor on {}: {e} (set {IPC_DIR_ENV} to a \
                             writable folder)",
                            path.display()
                        ),
                    )
                })?;
                fd_server = Some(server);
                alloc = buf.alloc_size().unwrap_or(0) as u64;
                (
                    POOL_GPU_FD,
                    buf.gpu().uuid(),
                    path.as_os_str().as_encoded_bytes().to_vec(),
                    Some(Copier::new(buf.gpu())?),
                )
            }
            KvMemory::Gpu(buf) => (
                POOL_GPU,
                buf.gpu().uuid(),
                buf.ipc_handle()?.to_vec(),
                Some(Copier::new(buf.gpu())?),
            ),
            KvMemory::Host(h) => match h.path() {
                Some(p) => (
                    POOL_HOST_SHM,
                    String::new(),
                    p.as_os_str().as_encoded_bytes().to_vec(),
                    None,
                ),
                None => (POOL_HOST_PRIVATE, String::new(), Vec::new(), None),
            },
        };
        if let Some(c) = &copier {
            // Compile the block-list kernel now rather than on a first pull.
            c.gpu().has_block_kernel();
        }
        let socket_path = dir.join(format!("{stem}.sock"));
        let socket = UnixDatagram::bind(&socket_path).map_err(|e| {
            TransferError::backend(
                NAME,
                format!(
                    "binding the notification socket {}: {e} (set {IPC_DIR_ENV} to a writable folder)",
                    socket_path.display()
                ),
            )
        })?;
        socket.set_nonblocking(true)?;
        Ok(CudaIpcBackend {
            export: Export {
                name: name.to_string(),
                host_id: host_id(),
                nonce,
                socket: socket_path,
                pool,
                addr: mem.addr(),
                len: mem.len() as u64,
                device,
                handle,
                alloc,
            },
            mem,
            copier,
            method,
            peers: Mutex::new(HashMap::new()),
            socket: Arc::new(socket),
            _fd_server: fd_server,
        })
    }

    /// This side's copier: only a GPU pool has one.
    fn copier(&self) -> Result<&Arc<Copier>, TransferError> {
        self.copier.as_ref().ok_or_else(|| {
            TransferError::backend(
                NAME,
                "this side's pool is host memory: cuda-ipc transfers are run by the side with \
                 the GPU pool",
            )
        })
    }

    fn gpu(&self) -> Result<&Arc<Gpu>, TransferError> {
        self.copier().map(|c| c.gpu())
    }

    fn open(&self, peer: &Export) -> Result<PeerPool, TransferError> {
        reachable(&self.export, peer).map_err(TransferError::BadMetadata)?;
        let same_process = peer.nonce == self.export.nonce;
        let mapping = match peer.pool {
            POOL_GPU | POOL_GPU_FD if same_process => PeerMapping::Direct,
            POOL_GPU_FD => {
                let gpu = self.gpu()?;
                let path = PathBuf::from(String::from_utf8_lossy(&peer.handle).into_owned());
                let fd = fetch_fd(&path, std::time::Duration::from_secs(5)).map_err(|e| {
                    TransferError::backend(
                        NAME,
                        format!(
                            "taking {}'s pool descriptor from {}: {e} (pods on one node need \
                             a {IPC_DIR_ENV} folder both mount)",
                            peer.name,
                            path.display()
                        ),
                    )
                })?;
                PeerMapping::Fd(gpu.import_fd(fd, peer.alloc as usize, peer.len as usize)?)
            }
            POOL_GPU => {
                let gpu = self.gpu()?;
                let handle: [u8; 64] = peer.handle.as_slice().try_into().expect("checked");
                PeerMapping::Ipc(IpcMapping::open(gpu, &handle).map_err(|e| {
                    TransferError::backend(
                        NAME,
                        format!(
                            "opening {}'s GPU memory ({}): {e}. Legacy CUDA IPC handles work \
                             between processes of one PID namespace (one pod, or pods with \
                             a shared PID namespace)",
                            peer.name, peer.device
                        ),
                    )
                })?)
            }
            _ if same_process => {
                let gpu = self.gpu()?;
                // SAFETY: the peer's pool lives in this process as long as its
                // agent; the agent drops peers before the memory.
                match unsafe { HostRegistration::new(gpu, peer.addr as *mut u8, peer.len as usize) }
                {
                    Ok(r) => PeerMapping::Registered(r),
                    // Another agent of this process registered it already.
                    Err(e) if e.to_string().contains("ALREADY_REGISTERED") => PeerMapping::Direct,
                    Err(e) => return Err(e),
                }
            }
            _ => {
                let gpu = self.gpu()?;
                let path = PathBuf::from(String::from_utf8_lossy(&peer.handle).into_owned());
                let host = HostMemory::shared(&path, peer.len as usize, false).map_err(|e| {
                    TransferError::backend(
                        NAME,
                        format!(
                            "mapping {}'s pool file {}: {e} (two pods need a volume both mount)",
                            peer.name,
                            path.display()
                        ),
                    )
                })?;
                // SAFETY: `host` is kept next to its registration and drops after it.
                let reg = unsafe { HostRegistration::new(gpu, host.as_ptr(), host.len())? };
                PeerMapping::Host { reg, _map: host }
            }
        };
        let base = match &mapping {
            PeerMapping::Direct => peer.addr,
            PeerMapping::Ipc(m) => m.ptr(),
            PeerMapping::Fd(b) => b.ptr(),
            PeerMapping::Host { reg: r, .. } | PeerMapping::Registered(r) => r.device_ptr(),
        };
        Ok(PeerPool {
            base,
            len: peer.len,
            host: matches!(peer.pool, POOL_HOST_SHM | POOL_HOST_PRIVATE),
            socket: peer.socket.clone(),
            _mapping: mapping,
        })
    }

    fn peer(&self, peer: &str) -> Result<Arc<PeerPool>, TransferError> {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned()
            .ok_or_else(|| TransferError::UnknownPeer(peer.to_string()))
    }

    /// The handle of a submitted copy; `notify` goes to the peer once it
    /// has landed.
    fn in_flight(
        &self,
        sub: Submitted,
        pool: Arc<PeerPool>,
        notify: Option<&[u8]>,
    ) -> Box<dyn InFlight> {
        Box::new(IpcInFlight {
            sub,
            note: notify.map(|m| {
                (
                    self.socket.clone(),
                    self.export.name.clone(),
                    pool.socket.clone(),
                    m.to_vec(),
                )
            }),
            _peer: pool,
        })
    }

    /// Device address of our own pool for this side's copies.
    fn local_base(&self) -> u64 {
        // GPU pools only: a host pool never runs copies (see `gpu`).
        self.mem.addr()
    }

    fn send(&self, to: &Path, message: &[u8]) -> Result<(), TransferError> {
        send_note(&self.socket, &self.export.name, to, message)
    }
}

fn send_note(
    sock: &UnixDatagram,
    from: &str,
    to: &Path,
    message: &[u8],
) -> Result<(), TransferError> {
    let mut dgram = Vec::with_capacity(from.len() + message.len() + 8);
    wire::put_bytes(&mut dgram, from.as_bytes());
    wire::put_bytes(&mut dgram, message);
    sock.send_to(&dgram, to)
        .map(|_| ())
        .map_err(|e| TransferError::backend(NAME, format!("notification to {}: {e}", to.display())))
}

impl Drop for CudaIpcBackend {
    fn drop(&mut self) {
        // Peers' mappings close before our memory goes.
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let _ = std::fs::remove_file(&self.export.socket);
    }
}

struct IpcInFlight {
    sub: Submitted,
    note: Option<(Arc<UnixDatagram>, String, PathBuf, Vec<u8>)>,
    /// Keeps the peer's mapping open while the copy runs.
    _peer: Arc<PeerPool>,
}

impl InFlight for IpcInFlight {
    fn poll(&mut self) -> Result<bool, TransferError> {
        if !self.sub.poll()? {
            return Ok(false);
        }
        // The data has landed: only now may the peer free its blocks.
        if let Some((sock, from, to, msg)) = self.note.take() {
            send_note(&sock, &from, &to, &msg)?;
        }
        Ok(true)
    }

    fn device_time(&self) -> Option<std::time::Duration> {
        self.sub.device_time()
    }

    /// A GPU copy takes microseconds to tens of milliseconds: poll without
    /// sleeping (a 50 us sleep would be a sixth of a 4,096-token transfer,
    /// and Linux rounds short sleeps up), then back off for long ones.
    fn wait_until(&mut self, deadline: std::time::Instant) -> Result<bool, TransferError> {
        let spin_until = std::time::Instant::now() + std::time::Duration::from_millis(50);
        loop {
            if self.poll()? {
                return Ok(true);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            if now < spin_until {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
    }
}

impl Backend for CudaIpcBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::CudaIpc
    }

    fn agent_name(&self) -> &str {
        &self.export.name
    }

    fn local_metadata(&self) -> Result<Vec<u8>, TransferError> {
        Ok(self.export.encode())
    }

    fn load_peer(&self, metadata: &[u8]) -> Result<String, TransferError> {
        let peer = Export::decode(metadata)?;
        if peer.name == self.export.name {
            return Err(TransferError::BadMetadata(
                "that is our own metadata".into(),
            ));
        }
        let pool = Arc::new(self.open(&peer)?);
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.name.clone(), pool);
        Ok(peer.name)
    }

    fn forget_peer(&self, peer: &str) {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer);
    }

    fn post(
        &self,
        op: Op,
        peer: &str,
        descs: &[Desc],
        notify: Option<&[u8]>,
    ) -> Result<Box<dyn InFlight>, TransferError> {
        let pool = self.peer(peer)?;
        check_bounds(descs, self.mem.len() as u64, pool.len)?;
        let copier = self.copier()?;
        let local = self.local_base();
        let base = pool.base;
        let copies = descs.iter().map(move |d| match op {
            Op::Read => CopyOp {
                src: base + d.remote,
                dst: local + d.local,
                len: d.len,
            },
            Op::Write => CopyOp {
                src: local + d.local,
                dst: base + d.remote,
                len: d.len,
            },
        });
        let sub = copier.submit(copies, self.method, pool.host)?;
        Ok(self.in_flight(sub, pool, notify))
    }

    /// Between two GPU pools: the block-list kernel. A host peer keeps the
    /// descriptor path, where long runs go to the copy engines.
    fn runs_block_lists(&self, peer: &str) -> bool {
        self.copier
            .as_ref()
            .is_some_and(|c| c.gpu().has_block_kernel())
            && self
                .peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(peer)
                .is_some_and(|p| !p.host)
    }

    fn post_blocks(
        &self,
        op: Op,
        peer: &str,
        blocks: &BlockList,
        notify: Option<&[u8]>,
    ) -> Result<Box<dyn InFlight>, TransferError> {
        let pool = self.peer(peer)?;
        let (local_end, remote_end) = blocks.extents();
        let local_len = self.mem.len() as u64;
        if local_end > local_len || remote_end > pool.len {
            return Err(TransferError::BadRequest(format!(
                "block list reaches byte {local_end} of the local pool ({local_len}) and \
                 {remote_end} of the peer's ({})",
                pool.len
            )));
        }
        let copier = self.copier()?;
        // (base, region length, block ids) of each side; READ copies theirs into ours.
        let ours = (self.local_base(), blocks.local_region_len, &blocks.local);
        let theirs = (pool.base, blocks.remote_region_len, &blocks.remote);
        let (from, to) = match op {
            Op::Read => (theirs, ours),
            Op::Write => (ours, theirs),
        };
        let b = BlockCopy {
            src: from.0,
            dst: to.0,
            src_region: from.1,
            dst_region: to.1,
            block: blocks.block_len,
            regions: blocks.regions,
        };
        let sub = copier.submit_blocks(&b, from.2, to.2, self.method)?;
        Ok(self.in_flight(sub, pool, notify))
    }

    fn notify(&self, peer: &str, message: &[u8]) -> Result<(), TransferError> {
        let to = self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .map(|p| p.socket.clone())
            .ok_or_else(|| TransferError::UnknownPeer(peer.to_string()))?;
        self.send(&to, message)
    }

    fn take_notifications(&self) -> Result<Vec<Notification>, TransferError> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let mut r = wire::Reader::new(&buf[..n]);
                    // A datagram we cannot read is dropped, not fatal.
                    if let (Ok(from), Ok(msg)) = (r.string(), r.bytes()) {
                        out.push(Notification {
                            from,
                            message: msg.to_vec(),
                        });
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    fn max_posts(&self) -> Option<usize> {
        Some(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(host: &str, nonce: u64, pool: u32) -> Export {
        Export {
            name: format!("e-{nonce}-{pool}"),
            host_id: host.into(),
            nonce,
            socket: PathBuf::from("/tmp/x.sock"),
            pool,
            addr: 0x7f00_0000_0000,
            len: 1 << 20,
            device: if pool == POOL_GPU {
                "GPU-1234".into()
            } else {
                String::new()
            },
            handle: if pool == POOL_GPU {
                vec![7; 64]
            } else {
                b"/dev/shm/kv".to_vec()
            },
            alloc: if pool == POOL_GPU_FD { 2 << 20 } else { 0 },
        }
    }

    #[test]
    fn metadata_round_trips_and_rejects_garbage() {
        for pool in [POOL_GPU, POOL_HOST_SHM, POOL_HOST_PRIVATE, POOL_GPU_FD] {
            let e = export("boot-a", 9, pool);
            assert_eq!(Export::decode(&e.encode()).unwrap(), e);
        }
        assert!(Export::decode(b"TNDMNIXL1").is_err());
        let mut bad = export("boot-a", 9, POOL_GPU);
        bad.handle = vec![1; 10];
        assert!(Export::decode(&bad.encode()).is_err());
        let mut small = export("boot-a", 9, POOL_GPU_FD);
        small.alloc = small.len - 1;
        assert!(Export::decode(&small.encode()).is_err());
        let enc = export("boot-a", 9, POOL_GPU).encode();
        assert!(Export::decode(&enc[..enc.len() - 3]).is_err());
    }

    #[test]
    fn only_peers_on_this_host_are_reachable() {
        let ours = export("boot-a", 1, POOL_GPU);
        assert!(reachable(&ours, &export("boot-a", 2, POOL_GPU)).is_ok());
        assert!(reachable(&ours, &export("boot-a", 2, POOL_HOST_SHM)).is_ok());
        let far = reachable(&ours, &export("boot-b", 2, POOL_GPU)).unwrap_err();
        assert!(far.contains("another host"), "{far}");
        // Private host memory only within one process.
        let private = reachable(&ours, &export("boot-a", 2, POOL_HOST_PRIVATE)).unwrap_err();
        assert!(private.contains("--shm"), "{private}");
        assert!(reachable(&ours, &export("boot-a", 1, POOL_HOST_PRIVATE)).is_ok());
    }

    #[test]
    fn the_host_id_is_the_boot_id() {
        let id = host_id();
        if let Ok(b) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
            assert_eq!(id, b.trim());
        }
        assert!(!id.is_empty());
    }

    #[test]
    fn a_host_pool_exports_without_a_gpu_and_notifications_arrive() {
        let dir = std::env::temp_dir().join(format!("tkv-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let shm = dir.join("pool");
        let a = Arc::new(KvMemory::from(
            HostMemory::shared(&shm, 1 << 16, false).unwrap(),
        ));
        let b = Arc::new(KvMemory::from(HostMemory::anonymous(1 << 16).unwrap()));
        let a = CudaIpcBackend::new("a", a, CopyMethod::Auto).unwrap();
        let b = CudaIpcBackend::new("b", b, CopyMethod::Auto).unwrap();
        let ea = Export::decode(&a.local_metadata().unwrap()).unwrap();
        assert_eq!(ea.pool, POOL_HOST_SHM);
        assert_eq!(ea.handle, shm.as_os_str().as_encoded_bytes());
        // b can tell a that it is done with a's blocks.
        send_note(&b.socket, "b", &ea.socket, b"req-1:2").unwrap();
        let got = a.take_notifications().unwrap();
        assert_eq!(
            got,
            vec![Notification {
                from: "b".into(),
                message: b"req-1:2".to_vec()
            }]
        );
        assert!(a.take_notifications().unwrap().is_empty());
        // A host-only side cannot run copies.
        let err = b
            .post(
                Op::Read,
                "a",
                &[Desc {
                    local: 0,
                    remote: 0,
                    len: 16,
                }],
                None,
            )
            .err()
            .unwrap();
        assert!(matches!(err, TransferError::UnknownPeer(_)), "{err}");
        drop(a);
        assert!(!ea.socket.exists(), "socket removed on drop");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
