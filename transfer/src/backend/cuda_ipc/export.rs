//! What a cuda-ipc backend publishes about its pool ([`Export`], the
//! metadata blob), whether a peer's can be opened from here, and, for an
//! engine's lent GPU memory, the allocation table: one legacy IPC handle
//! per CUDA allocation behind the regions, and per region (allocation,
//! offset), which the importer turns into its own region addresses. Pure
//! but for [`LentExport::of`], which asks the driver for the handles.

use std::path::PathBuf;
use std::sync::OnceLock;

use super::super::wire;
use crate::error::TransferError;
use crate::gpu::lent::{AllocationTable, LentGpu};
use crate::memory::RegionMap;

const MAGIC: &[u8] = b"TNDMCIPC3";
pub(super) const NAME: &str = "cuda-ipc";

pub(super) const POOL_GPU: u32 = 1;
pub(super) const POOL_HOST_SHM: u32 = 2;
pub(super) const POOL_HOST_PRIVATE: u32 = 3;
pub(super) const POOL_GPU_FD: u32 = 4;
/// An engine's GPU memory: regions in one or more `cudaMalloc` allocations.
pub(super) const POOL_GPU_LENT: u32 = 5;

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
pub(super) fn process_nonce() -> u64 {
    static N: OnceLock<u64> = OnceLock::new();
    *N.get_or_init(|| {
        let id = uuid::Uuid::new_v4().as_u64_pair();
        id.0 ^ id.1
    })
}

/// Lent GPU memory as a peer opens it: the allocations (addresses in the
/// exporting process, sizes) and where each region lies, plus one IPC
/// handle per allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LentExport {
    pub table: AllocationTable,
    pub handles: Vec<[u8; 64]>,
}

impl LentExport {
    /// One handle per allocation behind `mem`'s regions.
    pub fn of(mem: &LentGpu) -> Result<LentExport, TransferError> {
        let table = mem
            .table()
            .map_err(|e| TransferError::backend(NAME, format!("exporting lent GPU memory: {e}")))?;
        let handles = table
            .allocs()
            .iter()
            .map(|&(base, size)| {
                mem.gpu().ipc_handle(base).map_err(|e| {
                    TransferError::backend(
                        NAME,
                        format!(
                            "exporting the engine's allocation of {size} bytes at {base:#x}: \
                             {e}. Legacy CUDA IPC needs cudaMalloc memory (PyTorch's \
                             expandable segments are VMM memory: use nixl, or \
                             PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False)"
                        ),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(LentExport {
            table: table.clone(),
            handles,
        })
    }

    /// Where the pool is once allocation `i` is mapped at `mapped[i]`: the
    /// base of its first region, and the regions when they are not one
    /// range.
    pub fn resolve(&self, mapped: &[u64]) -> Result<(u64, Option<RegionMap>), TransferError> {
        let map = self.table.region_map(mapped)?;
        let base = map.bases()[0];
        Ok((base, (!self.table.is_one_range()).then_some(map)))
    }

    fn encode(&self, out: &mut Vec<u8>) {
        wire::put_u64(out, self.table.region_len());
        wire::put_u32(out, self.table.allocs().len() as u32);
        for (&(base, size), handle) in self.table.allocs().iter().zip(&self.handles) {
            wire::put_u64(out, base);
            wire::put_u64(out, size);
            wire::put_bytes(out, handle);
        }
        wire::put_u32(out, self.table.regions().len() as u32);
        for &(alloc, offset) in self.table.regions() {
            wire::put_u32(out, alloc);
            wire::put_u64(out, offset);
        }
    }

    fn decode(r: &mut wire::Reader<'_>) -> Result<LentExport, TransferError> {
        let region_len = r.u64()?;
        let n = r.u32()?;
        // No capacity from the count: a bad one runs into the end of the blob.
        let mut allocs = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..n {
            allocs.push((r.u64()?, r.u64()?));
            let h = r.bytes()?;
            handles.push(<[u8; 64]>::try_from(h).map_err(|_| {
                TransferError::BadMetadata(format!(
                    "CUDA IPC handle of {} bytes, expected 64",
                    h.len()
                ))
            })?);
        }
        let n = r.u32()?;
        let mut regions = Vec::new();
        for _ in 0..n {
            regions.push((r.u32()?, r.u64()?));
        }
        Ok(LentExport {
            table: AllocationTable::from_parts(region_len, allocs, regions)?,
            handles,
        })
    }
}

/// What a backend publishes about its pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Export {
    pub name: String,
    pub host_id: String,
    pub nonce: u64,
    pub socket: PathBuf,
    pub pool: u32,
    pub addr: u64,
    pub len: u64,
    /// GPU: the device UUID; host: empty.
    pub device: String,
    /// GPU: the IPC handle; GPU by descriptor: the socket handing it out;
    /// shared host pool: the file's path.
    pub handle: Vec<u8>,
    /// GPU by descriptor: the allocation's mapped size (>= len).
    pub alloc: u64,
    /// Lent GPU memory: its allocations and regions.
    pub lent: Option<LentExport>,
}

impl Export {
    pub fn encode(&self) -> Vec<u8> {
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
        if let Some(l) = &self.lent {
            l.encode(&mut out);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Export, TransferError> {
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
            POOL_GPU | POOL_HOST_SHM | POOL_HOST_PRIVATE | POOL_GPU_FD | POOL_GPU_LENT
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
        let lent = match pool {
            POOL_GPU_LENT => {
                let l = LentExport::decode(&mut r)?;
                let covered = l
                    .table
                    .region_len()
                    .checked_mul(l.table.regions().len() as u64);
                if covered != Some(len) {
                    return Err(TransferError::BadMetadata(format!(
                        "the region table covers {} regions of {} bytes, the pool {len}",
                        l.table.regions().len(),
                        l.table.region_len()
                    )));
                }
                Some(l)
            }
            _ => None,
        };
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
            lent,
        })
    }
}

/// Why a peer's export cannot be opened from here, before any CUDA call.
pub(super) fn reachable(ours: &Export, peer: &Export) -> Result<(), String> {
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Regions 0 and 2 in one allocation, 1 and 3 in another (PyTorch's
    /// caching allocator handing out per-layer tensors).
    fn lent() -> LentExport {
        LentExport {
            table: AllocationTable::from_parts(
                1 << 18,
                vec![(0x7f10_0000_0000, 1 << 20), (0x7f20_0000_0000, 1 << 21)],
                vec![(0, 0), (1, 1 << 20), (0, 1 << 19), (1, 0)],
            )
            .unwrap(),
            handles: vec![[3; 64], [4; 64]],
        }
    }

    pub fn export(host: &str, nonce: u64, pool: u32) -> Export {
        let gpu = matches!(pool, POOL_GPU | POOL_GPU_LENT);
        Export {
            name: format!("e-{nonce}-{pool}"),
            host_id: host.into(),
            nonce,
            socket: PathBuf::from("/tmp/x.sock"),
            pool,
            addr: 0x7f00_0000_0000,
            len: 1 << 20,
            device: if gpu {
                "GPU-1234".into()
            } else {
                String::new()
            },
            handle: match pool {
                POOL_GPU => vec![7; 64],
                POOL_GPU_LENT => Vec::new(),
                _ => b"/dev/shm/kv".to_vec(),
            },
            alloc: if pool == POOL_GPU_FD { 2 << 20 } else { 0 },
            lent: (pool == POOL_GPU_LENT).then(lent),
        }
    }

    #[test]
    fn metadata_round_trips_and_rejects_garbage() {
        for pool in [
            POOL_GPU,
            POOL_HOST_SHM,
            POOL_HOST_PRIVATE,
            POOL_GPU_FD,
            POOL_GPU_LENT,
        ] {
            let e = export("boot-a", 9, pool);
            assert_eq!(Export::decode(&e.encode()).unwrap(), e);
        }
        assert!(Export::decode(b"TNDMNIXL1").is_err());
        assert!(Export::decode(b"TNDMCIPC2").is_err(), "the old format");
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
    fn a_lent_pools_table_round_trips_and_is_checked() {
        let e = export("boot-a", 9, POOL_GPU_LENT);
        let enc = e.encode();
        let back = Export::decode(&enc).unwrap();
        let l = back.lent.unwrap();
        assert_eq!(l.handles, vec![[3; 64], [4; 64]]);
        assert_eq!(l.table.regions()[1], (1, 1 << 20));
        // Cut anywhere in the table: truncated, not a panic.
        for cut in 1..60 {
            assert!(Export::decode(&enc[..enc.len() - cut]).is_err(), "{cut}");
        }
        // The table must cover the pool.
        let mut short = export("boot-a", 9, POOL_GPU_LENT);
        short.len += 1;
        let err = Export::decode(&short.encode()).unwrap_err();
        assert!(err.to_string().contains("covers 4 regions"), "{err}");
        // A region past its allocation's end.
        let mut over = export("boot-a", 9, POOL_GPU_LENT).encode();
        let at = over.len() - 8;
        over[at..].copy_from_slice(&(3u64 << 20).to_le_bytes());
        let err = Export::decode(&over).unwrap_err();
        assert!(err.to_string().contains("overruns allocation 1"), "{err}");
        // A short handle.
        let mut table = Vec::new();
        wire::put_u64(&mut table, 16);
        wire::put_u32(&mut table, 1);
        wire::put_u64(&mut table, 0x1000);
        wire::put_u64(&mut table, 64);
        wire::put_bytes(&mut table, &[1; 63]);
        wire::put_u32(&mut table, 1);
        wire::put_u32(&mut table, 0);
        wire::put_u64(&mut table, 0);
        let err = LentExport::decode(&mut wire::Reader::new(&table)).unwrap_err();
        assert!(err.to_string().contains("63 bytes"), "{err}");
    }

    #[test]
    fn a_lent_pool_resolves_where_its_allocations_are_mapped() {
        let l = lent();
        // Opened in another process: each allocation wherever the driver put it.
        let (base, map) = l.resolve(&[0x1_0000_0000, 0x2_0000_0000]).unwrap();
        let map = map.expect("separate regions");
        assert_eq!(base, 0x1_0000_0000);
        assert_eq!(
            map.bases(),
            &[0x1_0000_0000, 0x2_0010_0000, 0x1_0008_0000, 0x2_0000_0000]
        );
        // Region 1, 16 bytes in.
        assert_eq!(map.resolve((1 << 18) + 16, 64), Some(0x2_0010_0010));
        assert_eq!(
            map.resolve((1 << 18) - 8, 16),
            None,
            "across regions 0 and 1"
        );
        assert!(l.resolve(&[0x1_0000_0000]).is_err(), "one mapping short");
        // Contiguous regions in one allocation stay one range at the first region.
        let one = LentExport {
            table: AllocationTable::from_parts(
                4096,
                vec![(0x9000_0000, 1 << 20)],
                vec![(0, 8192), (0, 12288), (0, 16384)],
            )
            .unwrap(),
            handles: vec![[1; 64]],
        };
        assert_eq!(one.resolve(&[0x5000_0000]).unwrap(), (0x5000_2000, None));
    }

    #[test]
    fn only_peers_on_this_host_are_reachable() {
        let ours = export("boot-a", 1, POOL_GPU);
        assert!(reachable(&ours, &export("boot-a", 2, POOL_GPU)).is_ok());
        assert!(reachable(&ours, &export("boot-a", 2, POOL_GPU_LENT)).is_ok());
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
}
