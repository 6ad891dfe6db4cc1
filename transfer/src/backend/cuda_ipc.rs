//! `cuda-ipc` backend: peers on the same host. A GPU pool is exported as a
//! legacy CUDA IPC handle, or (`--gpu-share fd`, a VMM allocation) as a file
//! descriptor handed out on a Unix socket (`fd_pass`); an engine's lent GPU
//! memory as one IPC handle per allocation behind its regions and a region
//! table (`export`); a host pool as its
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
use std::sync::{Arc, Mutex};

mod export;

pub use self::export::host_id;
use self::export::{
    process_nonce, reachable, Export, LentExport, NAME, POOL_GPU, POOL_GPU_FD, POOL_GPU_LENT,
    POOL_HOST_PRIVATE, POOL_HOST_SHM,
};
use super::fd_pass::{fetch_fd, FdServer};
use super::{check_bounds, wire, Backend, BackendKind, InFlight, Notification, Op};
use crate::error::TransferError;
use crate::gpu::copy::{BlockCopy, Copier, CopyMethod, CopyOp, Submitted};
use crate::gpu::{DeviceBuffer, Gpu, HostRegistration, IpcMapping};
use crate::memory::{HostMemory, KvMemory, RegionMap};
use crate::plan::{BlockList, Desc};

/// Folder for the notification sockets.
pub const IPC_DIR_ENV: &str = "TANDEM_CUDA_IPC_DIR";

/// A peer's memory as this process reaches it.
struct PeerPool {
    base: u64,
    len: u64,
    /// The peer's regions in this process, when they are not one range.
    map: Option<RegionMap>,
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
    /// A peer engine's lent GPU memory: each allocation opened once.
    Lent(Vec<IpcMapping>),
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
        if mem.host().is_some_and(|h| h.region_map().is_some()) {
            return Err(TransferError::backend(
                NAME,
                "a pool whose regions are separate host allocations is moved by nixl or tcp",
            ));
        }
        let mut fd_server = None;
        let mut alloc = 0;
        let mut lent = None;
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
            KvMemory::GpuLent(m) => {
                lent = Some(LentExport::of(m)?);
                (
                    POOL_GPU_LENT,
                    m.gpu().uuid(),
                    Vec::new(),
                    Some(Copier::new(m.gpu())?),
                )
            }
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
            // Compile the copy kernels now rather than on a first pull.
            c.gpu().preload_kernels();
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
                lent,
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
            POOL_GPU | POOL_GPU_FD | POOL_GPU_LENT if same_process => {
                // Our own process's memory, by address; on another of its GPUs only with
                // peer access on (a peer in another process gets it when its memory opens).
                if let Ok(gpu) = self.gpu() {
                    if peer.device != gpu.uuid() {
                        if let Some(other) = crate::gpu::device_by_uuid(&peer.device)? {
                            gpu.enable_peer_access(&other)?;
                        }
                    }
                }
                PeerMapping::Direct
            }
            POOL_GPU_LENT => {
                let gpu = self.gpu()?;
                let lent = peer.lent.as_ref().ok_or_else(|| {
                    TransferError::BadMetadata("a lent GPU pool without its allocations".into())
                })?;
                let opened = lent
                    .handles
                    .iter()
                    .map(|h| IpcMapping::open(gpu, h))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        TransferError::backend(
                            NAME,
                            format!(
                                "opening {}'s GPU memory ({}, {} allocations): {e}. Legacy CUDA \
                                 IPC handles work between processes of one PID namespace (one \
                                 pod, or pods with a shared PID namespace)",
                                peer.name,
                                peer.device,
                                lent.handles.len()
                            ),
                        )
                    })?;
                PeerMapping::Lent(opened)
            }
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
        let (base, map) = match (&mapping, &peer.lent) {
            // In this process: the allocations where the peer has them.
            (PeerMapping::Direct, Some(l)) => {
                let at: Vec<u64> = l.table.allocs().iter().map(|a| a.0).collect();
                l.resolve(&at)?
            }
            (PeerMapping::Lent(m), l) => {
                let at: Vec<u64> = m.iter().map(IpcMapping::ptr).collect();
                l.as_ref()
                    .ok_or_else(|| TransferError::BadMetadata("no allocation table".into()))?
                    .resolve(&at)?
            }
            (PeerMapping::Direct, None) => (peer.addr, None),
            (PeerMapping::Ipc(m), _) => (m.ptr(), None),
            (PeerMapping::Fd(b), _) => (b.ptr(), None),
            (PeerMapping::Host { reg: r, .. } | PeerMapping::Registered(r), _) => {
                (r.device_ptr(), None)
            }
        };
        Ok(PeerPool {
            base,
            map,
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

/// A plan's copies as absolute addresses, each side's offsets resolved
/// through its region table: no descriptor may cross a region of a pool
/// whose regions are separate allocations.
fn resolve_copies(
    op: Op,
    descs: &[Desc],
    mem: &KvMemory,
    pool: &PeerPool,
) -> Result<Vec<CopyOp>, TransferError> {
    let across = |side: &str, off: u64, len: u64| {
        TransferError::BadRequest(format!(
            "descriptor {off}+{len} crosses a region of the {side} pool, whose regions are \
             separate allocations"
        ))
    };
    descs
        .iter()
        .map(|d| {
            let local = mem
                .resolve(d.local, d.len)
                .ok_or_else(|| across("local", d.local, d.len))?;
            let remote = pool
                .resolve(d.remote, d.len)
                .ok_or_else(|| across("peer's", d.remote, d.len))?;
            let (src, dst) = match op {
                Op::Read => (remote, local),
                Op::Write => (local, remote),
            };
            Ok(CopyOp {
                src,
                dst,
                len: d.len,
            })
        })
        .collect()
}

impl PeerPool {
    /// Where the peer's pool bytes `[offset, offset + len)` are in this process.
    fn resolve(&self, offset: u64, len: u64) -> Option<u64> {
        match &self.map {
            Some(m) => m.resolve(offset, len),
            None => (offset.checked_add(len)? <= self.len).then(|| self.base + offset),
        }
    }
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
        if self.mem.separate_regions() || pool.map.is_some() {
            let copies = resolve_copies(op, descs, &self.mem, &pool)?;
            let sub = copier.submit(copies.iter().copied(), self.method, pool.host)?;
            return Ok(self.in_flight(sub, pool, notify));
        }
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

    /// Between two GPU pools, each one range: the block-list kernel. A
    /// host peer keeps the descriptor path, where long runs go to the copy
    /// engines; so do separate regions (the kernel has one base per side).
    fn runs_block_lists(&self, peer: &str) -> bool {
        self.copier
            .as_ref()
            .is_some_and(|c| c.gpu().has_block_kernel())
            && !self.mem.separate_regions()
            && self
                .peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(peer)
                .is_some_and(|p| !p.host && p.map.is_none())
    }

    fn post_blocks(
        &self,
        op: Op,
        peer: &str,
        blocks: &BlockList,
        notify: Option<&[u8]>,
    ) -> Result<Box<dyn InFlight>, TransferError> {
        let pool = self.peer(peer)?;
        if self.mem.separate_regions() || pool.map.is_some() {
            return Err(TransferError::backend(
                NAME,
                "block lists need both pools to be one range; separate regions take descriptors",
            ));
        }
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

    #[test]
    fn copies_between_separate_regions_resolve_through_both_tables() {
        let local = KvMemory::allocate_separate(crate::layout::MemKind::Host, 2, 4096).unwrap();
        let lb = local.region_map().unwrap().bases().to_vec();
        let peer = PeerPool {
            base: 0x9000_0000,
            len: 3 * 1024,
            map: Some(RegionMap::new(vec![0x9000_0000, 0x5000_0000, 0x7000_0000], 1024).unwrap()),
            host: false,
            socket: PathBuf::new(),
            _mapping: PeerMapping::Direct,
        };
        let descs = [
            Desc {
                local: 4096 + 32,
                remote: 2048 + 16,
                len: 512,
            },
            Desc {
                local: 0,
                remote: 1024,
                len: 1024,
            },
        ];
        let read = resolve_copies(Op::Read, &descs, &local, &peer).unwrap();
        assert_eq!(
            read,
            vec![
                CopyOp {
                    src: 0x7000_0010,
                    dst: lb[1] + 32,
                    len: 512
                },
                CopyOp {
                    src: 0x5000_0000,
                    dst: lb[0],
                    len: 1024
                },
            ]
        );
        let write = resolve_copies(Op::Write, &descs[1..], &local, &peer).unwrap();
        assert_eq!((write[0].src, write[0].dst), (lb[0], 0x5000_0000));
        // Across a region of either side.
        let cross_peer = Desc {
            local: 0,
            remote: 1000,
            len: 64,
        };
        let err = resolve_copies(Op::Read, &[cross_peer], &local, &peer).unwrap_err();
        assert!(err.to_string().contains("peer's pool"), "{err}");
        let cross_local = Desc {
            local: 4090,
            remote: 0,
            len: 16,
        };
        let err = resolve_copies(Op::Read, &[cross_local], &local, &peer).unwrap_err();
        assert!(err.to_string().contains("local pool"), "{err}");
        // A peer that is one range resolves from its base.
        let one = PeerPool { map: None, ..peer };
        assert_eq!(one.resolve(2048, 1024), Some(0x9000_0800));
        assert_eq!(one.resolve(2048, 1025), None);
    }

    #[test]
    fn separate_host_regions_are_refused() {
        let mem =
            Arc::new(KvMemory::allocate_separate(crate::layout::MemKind::Host, 2, 4096).unwrap());
        let err = CudaIpcBackend::new("s", mem, CopyMethod::Auto)
            .err()
            .unwrap();
        assert!(err.to_string().contains("nixl or tcp"), "{err}");
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
