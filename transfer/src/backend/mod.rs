//! Data-plane backends behind one trait: `nixl` (NIXL/UCX: NVLink, RDMA,
//! TCP, shared memory) and `tcp` (plain sockets). A backend moves byte ranges
//! between this process's registered pool and a peer's, and carries
//! notifications. It knows nothing about layouts, blocks or requests: the
//! agent plans descriptors and owns held blocks. A raw ibverbs backend plugs
//! in here later.

pub mod cuda_ipc;
pub mod fd_pass;
pub mod nixl;
pub mod tcp;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::TransferError;
use crate::plan::{BlockList, Desc};

/// Direction of a transfer, from the point of view of the agent posting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Op {
    /// Peer memory -> local memory (vLLM's decode side pulls).
    Read,
    /// Local memory -> peer memory (a prefill side pushes).
    Write,
}

impl std::str::FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "read" => Ok(Op::Read),
            "write" => Ok(Op::Write),
            other => Err(format!("unknown op {other:?} (read|write)")),
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Read => "READ",
            Op::Write => "WRITE",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Peers on the same host: their GPU memory opened by CUDA IPC (or
    /// their shared host mapping registered with CUDA), one copy
    /// submission per transfer.
    #[serde(rename = "cuda-ipc")]
    CudaIpc,
    Nixl,
    Tcp,
    /// cuda-ipc for peers on this host when the pool can use it, NIXL
    /// otherwise: chosen per peer at the handshake.
    Auto,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cuda-ipc" | "cuda_ipc" | "cudaipc" => Ok(BackendKind::CudaIpc),
            "nixl" => Ok(BackendKind::Nixl),
            "tcp" => Ok(BackendKind::Tcp),
            "auto" => Ok(BackendKind::Auto),
            other => Err(format!(
                "unknown backend {other:?} (auto|cuda-ipc|nixl|tcp)"
            )),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::CudaIpc => "cuda-ipc",
            BackendKind::Nixl => "nixl",
            BackendKind::Tcp => "tcp",
            BackendKind::Auto => "auto",
        })
    }
}

/// A message a peer sent us (vLLM: `"<request_id>:<tp_size>"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub from: String,
    pub message: Vec<u8>,
}

/// One posted transfer.
pub trait InFlight: Send {
    /// True once every byte has arrived; an error ends the transfer.
    fn poll(&mut self) -> Result<bool, TransferError>;

    /// Time the device spent on it, once done (GPU copies only).
    fn device_time(&self) -> Option<Duration> {
        None
    }

    /// Blocks until done or until `deadline`; returns whether it is done.
    /// Backends that progress on their own override this to sleep instead
    /// of spinning.
    fn wait_until(&mut self, deadline: Instant) -> Result<bool, TransferError> {
        let mut spins = 0u32;
        loop {
            if self.poll()? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            // Spin briefly (transfers of a few MiB finish in microseconds),
            // then yield the core to whoever moves the bytes.
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 4096 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// This backend's agent name, unique per process start.
    fn agent_name(&self) -> &str;

    /// Opaque blob a peer passes to `load_peer` to reach our memory.
    fn local_metadata(&self) -> Result<Vec<u8>, TransferError>;

    /// Loads (or replaces) a peer's blob; returns the peer's agent name.
    fn load_peer(&self, metadata: &[u8]) -> Result<String, TransferError>;

    /// Drops what we know about a peer (it restarted or went away).
    fn forget_peer(&self, peer: &str);

    /// Posts one transfer of `descs` (offsets relative to each pool base).
    /// `notify`, if any, reaches the peer after the data has landed.
    fn post(
        &self,
        op: Op,
        peer: &str,
        descs: &[Desc],
        notify: Option<&[u8]>,
    ) -> Result<Box<dyn InFlight>, TransferError>;

    /// Whether [`Backend::post_blocks`] runs block lists to this peer
    /// (addresses computed on the device, nothing planned on the host).
    fn runs_block_lists(&self, _peer: &str) -> bool {
        false
    }

    /// Posts one transfer given as block ids (a [`BlockList`] from
    /// `plan::plan_blocks`); only called when [`Backend::runs_block_lists`]
    /// said yes.
    fn post_blocks(
        &self,
        _op: Op,
        peer: &str,
        _blocks: &BlockList,
        _notify: Option<&[u8]>,
    ) -> Result<Box<dyn InFlight>, TransferError> {
        Err(TransferError::backend(
            "agent",
            format!("{} runs no block lists (peer {peer})", self.kind()),
        ))
    }

    /// Sends a notification on its own.
    fn notify(&self, peer: &str, message: &[u8]) -> Result<(), TransferError>;

    /// Notifications received since the last call.
    fn take_notifications(&self) -> Result<Vec<Notification>, TransferError>;

    /// How many posts one transfer should be split into at most; None lets
    /// the agent's `inflight` decide. cuda-ipc moves a whole plan in one
    /// submission.
    fn max_posts(&self) -> Option<usize> {
        None
    }
}

/// Length-prefixed fields for backend metadata blobs.
pub(crate) mod wire {
    use crate::error::TransferError;

    pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }

    pub fn put_u32(out: &mut Vec<u8>, v: u32) {
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn put_u64(out: &mut Vec<u8>, v: u64) {
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub struct Reader<'a> {
        buf: &'a [u8],
    }

    impl<'a> Reader<'a> {
        pub fn new(buf: &'a [u8]) -> Self {
            Reader { buf }
        }

        fn take(&mut self, n: usize) -> Result<&'a [u8], TransferError> {
            if self.buf.len() < n {
                return Err(TransferError::BadMetadata(format!(
                    "truncated: needed {n} more bytes, {} left",
                    self.buf.len()
                )));
            }
            let (head, tail) = self.buf.split_at(n);
            self.buf = tail;
            Ok(head)
        }

        pub fn u64(&mut self) -> Result<u64, TransferError> {
            let b = self.take(8)?;
            Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
        }

        pub fn u32(&mut self) -> Result<u32, TransferError> {
            let b = self.take(4)?;
            Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
        }

        pub fn bytes(&mut self) -> Result<&'a [u8], TransferError> {
            let b = self.take(4)?;
            let n = u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
            self.take(n)
        }

        pub fn string(&mut self) -> Result<String, TransferError> {
            let b = self.bytes()?;
            String::from_utf8(b.to_vec())
                .map_err(|_| TransferError::BadMetadata("name is not UTF-8".into()))
        }

        pub fn magic(&mut self, want: &[u8]) -> Result<(), TransferError> {
            let got = self.take(want.len())?;
            if got != want {
                return Err(TransferError::BadMetadata(format!(
                    "wrong magic {:?}, expected {:?}",
                    String::from_utf8_lossy(got),
                    String::from_utf8_lossy(want)
                )));
            }
            Ok(())
        }
    }
}

/// Checks that every descriptor stays inside a pool of `pool_len` bytes on
/// the given side.
pub(crate) fn check_bounds(
    descs: &[Desc],
    local_len: u64,
    remote_len: u64,
) -> Result<(), TransferError> {
    for d in descs {
        let local_end = d.local.checked_add(d.len);
        let remote_end = d.remote.checked_add(d.len);
        if local_end.is_none_or(|e| e > local_len) {
            return Err(TransferError::BadRequest(format!(
                "local range {}+{} outside the pool of {local_len} bytes",
                d.local, d.len
            )));
        }
        if remote_end.is_none_or(|e| e > remote_len) {
            return Err(TransferError::BadRequest(format!(
                "remote range {}+{} outside the peer pool of {remote_len} bytes",
                d.remote, d.len
            )));
        }
    }
    Ok(())
}
