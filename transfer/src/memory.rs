//! The memory that backs a KV pool ([`KvMemory`]): host memory (an anonymous
//! mapping owned by this process, a shared file mapping (`/dev/shm/...`)
//! that an engine process maps too, or an engine's own memory lent to us,
//! possibly one allocation per region: [`RegionMap`]) or GPU memory
//! (`gpu:N`: our own allocation, or an engine's tensors lent to us,
//! [`LentGpu`]). Owns the memory's lifetime (not a lent one's); knows
//! nothing about layouts beyond where each region starts.
//!
//! Transfers write into this memory from other threads (and, with NIXL, from
//! the network) while the engine may read other blocks of it, as RDMA does.
//! The invariant callers keep: a block being transferred is owned by that
//! transfer, so no two parties touch the same bytes at once.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::TransferError;
use crate::gpu::lent::LentGpu;
use crate::gpu::{self, DeviceBuffer, Gpu, GpuShare};
use crate::layout::MemKind;

/// A KV pool's memory: host or GPU.
pub enum KvMemory {
    Host(Arc<HostMemory>),
    Gpu(DeviceBuffer),
    /// An engine's GPU memory (vLLM's tensors): never freed here.
    GpuLent(LentGpu),
}

impl std::fmt::Debug for KvMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvMemory({}, {} bytes)", self.kind(), self.len())
    }
}

impl From<HostMemory> for KvMemory {
    fn from(m: HostMemory) -> Self {
        KvMemory::Host(Arc::new(m))
    }
}

impl From<LentGpu> for KvMemory {
    fn from(m: LentGpu) -> Self {
        KvMemory::GpuLent(m)
    }
}

impl KvMemory {
    /// `len` bytes of `kind`: host memory is anonymous, or the shared file
    /// `shm` when given (host only: GPU memory is shared by CUDA, as
    /// `share` says).
    pub fn allocate(
        kind: MemKind,
        len: usize,
        shm: Option<(&Path, bool)>,
        share: GpuShare,
    ) -> Result<KvMemory, TransferError> {
        match (kind, shm) {
            (MemKind::Host, None) => Ok(HostMemory::anonymous(len)?.into()),
            (MemKind::Host, Some((path, unlink))) => {
                Ok(HostMemory::shared(path, len, unlink)?.into())
            }
            (MemKind::Gpu(_), Some(_)) => Err(TransferError::BadRequest(
                "a shared-memory file holds host pools only; GPU pools are shared by CUDA IPC"
                    .into(),
            )),
            (MemKind::Gpu(n), None) => {
                let dev = gpu::device(n)?;
                Ok(KvMemory::Gpu(match share {
                    GpuShare::Ipc => dev.alloc(len)?,
                    GpuShare::Fd => dev.alloc_shareable(len)?,
                }))
            }
        }
    }

    /// `regions` regions of `region_len` bytes of `kind`, each its own
    /// allocation (an anonymous mapping, or a `cuMemAlloc`), lent to the
    /// pool as an engine's tensors are: how benchmarks and tests exercise
    /// separate regions. The pool owns the allocations.
    pub fn allocate_separate(
        kind: MemKind,
        regions: u32,
        region_len: usize,
    ) -> Result<KvMemory, TransferError> {
        if regions == 0 || region_len == 0 {
            return Err(TransferError::BadRequest("an empty pool".into()));
        }
        match kind {
            MemKind::Host => {
                // A page past each region keeps the next mapping from
                // starting where a region ends: the regions stay separate.
                let backing = (0..regions)
                    .map(|_| HostMemory::anonymous(region_len + 4096))
                    .collect::<io::Result<Vec<_>>>()?;
                let map = RegionMap::new(
                    backing.iter().map(|m| m.addr() as u64).collect(),
                    region_len as u64,
                )?;
                // SAFETY: each region lies in a mapping the pool keeps.
                let mut lent = unsafe { HostMemory::lent(map) };
                lent.backing = Some(Box::new(backing));
                Ok(lent.into())
            }
            MemKind::Gpu(n) => {
                let dev = gpu::device(n)?;
                let backing = (0..regions)
                    .map(|_| dev.alloc(region_len))
                    .collect::<Result<Vec<_>, _>>()?;
                let map =
                    RegionMap::new(backing.iter().map(|b| b.ptr()).collect(), region_len as u64)?;
                // SAFETY: each region is an allocation of `dev` the pool keeps.
                Ok(unsafe { LentGpu::backed_by(&dev, map, Box::new(backing))? }.into())
            }
        }
    }

    pub fn kind(&self) -> MemKind {
        match self {
            KvMemory::Host(_) => MemKind::Host,
            KvMemory::Gpu(b) => MemKind::Gpu(b.gpu().ordinal()),
            KvMemory::GpuLent(m) => MemKind::Gpu(m.gpu().ordinal()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            KvMemory::Host(m) => m.len(),
            KvMemory::Gpu(b) => b.len(),
            KvMemory::GpuLent(m) => m.len() as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Base address: a host pointer, or a device pointer for GPU memory
    /// (with separate regions: the first region's).
    pub fn addr(&self) -> u64 {
        match self {
            KvMemory::Host(m) => m.addr() as u64,
            KvMemory::Gpu(b) => b.ptr(),
            KvMemory::GpuLent(m) => m.addr(),
        }
    }

    pub fn host(&self) -> Option<&Arc<HostMemory>> {
        match self {
            KvMemory::Host(m) => Some(m),
            KvMemory::Gpu(_) | KvMemory::GpuLent(_) => None,
        }
    }

    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        match self {
            KvMemory::Host(_) => None,
            KvMemory::Gpu(b) => Some(b.gpu()),
            KvMemory::GpuLent(m) => Some(m.gpu()),
        }
    }

    /// The regions' addresses when they are separate allocations.
    pub fn region_map(&self) -> Option<&RegionMap> {
        match self {
            KvMemory::Host(h) => h.region_map(),
            KvMemory::Gpu(_) => None,
            KvMemory::GpuLent(m) => m.region_map(),
        }
    }

    /// Whether the regions are separate allocations (no range may cross one).
    pub fn separate_regions(&self) -> bool {
        self.region_map().is_some()
    }

    pub fn device_buffer(&self) -> Option<&DeviceBuffer> {
        match self {
            KvMemory::Gpu(b) => Some(b),
            KvMemory::Host(_) | KvMemory::GpuLent(_) => None,
        }
    }

    /// An engine's lent GPU memory.
    pub fn lent_gpu(&self) -> Option<&LentGpu> {
        match self {
            KvMemory::GpuLent(m) => Some(m),
            KvMemory::Host(_) | KvMemory::Gpu(_) => None,
        }
    }

    /// The address (host or device) of pool bytes `[offset, offset + len)`;
    /// None out of range or, with separate regions, across a region's end.
    pub fn resolve(&self, offset: u64, len: u64) -> Option<u64> {
        match self {
            KvMemory::Host(m) => m.resolve(offset, len),
            KvMemory::Gpu(b) => {
                (offset.checked_add(len)? <= b.len() as u64).then(|| b.ptr() + offset)
            }
            KvMemory::GpuLent(m) => m.resolve(offset, len),
        }
    }

    /// The address ranges that make up the pool, as (address, length): one,
    /// or one per region.
    pub fn segments(&self) -> Vec<(u64, u64)> {
        match self {
            KvMemory::Host(m) => m.segments(),
            KvMemory::Gpu(b) => vec![(b.ptr(), b.len() as u64)],
            KvMemory::GpuLent(m) => m.segments(),
        }
    }

    fn range(&self, offset: u64, len: usize) -> Result<u64, TransferError> {
        self.resolve(offset, len as u64).ok_or_else(|| {
            TransferError::BadRequest(format!(
                "range {offset}+{len} outside the pool of {} bytes{}",
                self.len(),
                if self.separate_regions() {
                    " or across one of its separately allocated regions"
                } else {
                    ""
                }
            ))
        })
    }

    /// Copies `src` into the pool at `offset` (the engine writing KV).
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), TransferError> {
        let at = self.range(offset, src.len())?;
        match self {
            KvMemory::Host(m) => {
                m.write(offset, src).expect("range checked");
                Ok(())
            }
            KvMemory::Gpu(b) => b.gpu().upload(at, src),
            KvMemory::GpuLent(m) => m.gpu().upload(at, src),
        }
    }

    /// Copies pool bytes at `offset` into `dst`.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), TransferError> {
        let at = self.range(offset, dst.len())?;
        match self {
            KvMemory::Host(m) => {
                m.read(offset, dst).expect("range checked");
                Ok(())
            }
            KvMemory::Gpu(b) => b.gpu().download(dst, at),
            KvMemory::GpuLent(m) => m.gpu().download(dst, at),
        }
    }
}

/// Where each region of a pool lives when the regions are separate
/// allocations (vLLM gives every layer its own tensor). Pool offsets stay
/// region-major, `region * region_len + offset in the region`, and a range
/// never crosses a region (the planner does not merge across them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionMap {
    bases: Vec<u64>,
    region_len: u64,
}

impl RegionMap {
    /// Regions of `region_len` bytes at `bases`: at least one, none empty or
    /// overlapping another, none wrapping the address space.
    pub fn new(bases: Vec<u64>, region_len: u64) -> Result<RegionMap, TransferError> {
        if bases.is_empty() || region_len == 0 {
            return Err(TransferError::BadRequest(
                "a region map needs at least one region of at least one byte".into(),
            ));
        }
        let mut spans: Vec<(u64, u64)> = Vec::with_capacity(bases.len());
        for (r, &b) in bases.iter().enumerate() {
            if b == 0 {
                return Err(TransferError::BadRequest(format!(
                    "region {r} has a null base address"
                )));
            }
            let end = b.checked_add(region_len).ok_or_else(|| {
                TransferError::BadRequest(format!("region {r} at {b:#x} wraps the address space"))
            })?;
            spans.push((b, end));
        }
        (bases.len() as u64)
            .checked_mul(region_len)
            .ok_or_else(|| TransferError::BadRequest("the pool's size overflows".into()))?;
        spans.sort_unstable();
        if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(TransferError::BadRequest(format!(
                "regions at {:#x} and {:#x} overlap ({region_len} bytes each)",
                w[0].0, w[1].0
            )));
        }
        Ok(RegionMap { bases, region_len })
    }

    pub fn bases(&self) -> &[u64] {
        &self.bases
    }

    pub fn region_len(&self) -> u64 {
        self.region_len
    }

    /// Bytes of the whole pool.
    pub fn len(&self) -> u64 {
        self.bases.len() as u64 * self.region_len
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether each region starts where the one before it ends: then the
    /// pool is one range at `bases[0]`.
    pub fn is_contiguous(&self) -> bool {
        self.bases
            .windows(2)
            .all(|w| w[0].checked_add(self.region_len) == Some(w[1]))
    }

    /// The address of pool bytes `[offset, offset + len)`, which must lie in
    /// one region; None otherwise.
    pub fn resolve(&self, offset: u64, len: u64) -> Option<u64> {
        let region = offset / self.region_len;
        let inner = offset % self.region_len;
        let base = *self.bases.get(usize::try_from(region).ok()?)?;
        if inner.checked_add(len)? > self.region_len {
            return None;
        }
        Some(base + inner)
    }
}

#[derive(Debug)]
pub struct HostMemory {
    ptr: NonNull<u8>,
    len: usize,
    path: Option<PathBuf>,
    unlink_on_drop: bool,
    /// Lent by the engine: never unmapped here.
    lent: bool,
    /// Separate allocations per region (lent memory only).
    map: Option<RegionMap>,
    /// What holds lent memory this process allocated itself
    /// ([`KvMemory::allocate_separate`]); dropped after the value.
    backing: Option<Box<dyn std::any::Any + Send + Sync>>,
}

// SAFETY: the mapping is plain memory; concurrent access follows the
// block-ownership invariant in the module docs.
unsafe impl Send for HostMemory {}
unsafe impl Sync for HostMemory {}

impl HostMemory {
    /// An anonymous private mapping, pre-faulted so the first transfer does
    /// not pay for page faults.
    pub fn anonymous(len: usize) -> io::Result<HostMemory> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: plain anonymous mmap; result checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        // Huge pages where the kernel allows them: transfers that pin pages
        // one by one (CMA, RDMA registration) then walk far fewer.
        // SAFETY: advice on our own fresh mapping; failure is harmless.
        unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        prefault(ptr.as_ptr(), len);
        Ok(HostMemory {
            ptr,
            len,
            path: None,
            unlink_on_drop: false,
            lent: false,
            map: None,
            backing: None,
        })
    }

    /// An engine's own host memory: the regions `map` describes (one range
    /// when they are contiguous).
    ///
    /// # Safety
    /// Every region must be valid, writable memory that outlives this value
    /// and every transfer into or out of it.
    pub unsafe fn lent(map: RegionMap) -> HostMemory {
        let ptr = NonNull::new(map.bases()[0] as *mut u8).expect("RegionMap has no null base");
        let len = map.len() as usize;
        HostMemory {
            ptr,
            len,
            path: None,
            unlink_on_drop: false,
            lent: true,
            map: (!map.is_contiguous()).then_some(map),
            backing: None,
        }
    }

    /// Maps `path` shared, creating it with `len` bytes if it does not exist.
    /// An existing file must have exactly `len` bytes: a size mismatch means
    /// the engine and the agent disagree on the layout.
    pub fn shared(path: &Path, len: usize, unlink_on_drop: bool) -> io::Result<HostMemory> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        // SAFETY: FFI with a valid C string; fd checked.
        let fd = unsafe {
            libc::open(
                c_path.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let result = (|| {
            // SAFETY: fstat on a valid fd into a zeroed struct.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            if unsafe { libc::fstat(fd, &mut st) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let size = st.st_size as usize;
            if size == 0 {
                if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if size != len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} has {size} bytes, the layout needs {len}",
                        path.display()
                    ),
                ));
            }
            // SAFETY: shared mapping of a file of at least `len` bytes.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_POPULATE,
                    fd,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)
        })();
        // SAFETY: fd is ours; the mapping stays valid after close.
        unsafe { libc::close(fd) };
        let ptr = result?;
        Ok(HostMemory {
            ptr,
            len,
            path: Some(path.to_path_buf()),
            unlink_on_drop,
            lent: false,
            map: None,
            backing: None,
        })
    }

    /// The region map of memory whose regions are separate allocations.
    pub fn region_map(&self) -> Option<&RegionMap> {
        self.map.as_ref()
    }

    /// The address ranges that make up the pool, as (address, length): one,
    /// or one per region.
    pub fn segments(&self) -> Vec<(u64, u64)> {
        match &self.map {
            Some(m) => m.bases().iter().map(|&b| (b, m.region_len())).collect(),
            None => vec![(self.addr() as u64, self.len as u64)],
        }
    }

    /// The address of pool bytes `[offset, offset + len)`, or None when out
    /// of range (or, with a region map, across a region's end).
    pub fn resolve(&self, offset: u64, len: u64) -> Option<u64> {
        match &self.map {
            Some(m) => m.resolve(offset, len),
            None => {
                let end = offset.checked_add(len)?;
                (end <= self.len as u64).then(|| self.addr() as u64 + offset)
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The bytes at `[offset, offset + len)`, or None when out of range.
    ///
    /// # Safety
    /// No transfer may be writing these bytes while the slice lives.
    pub unsafe fn slice(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let at = self.resolve(offset, len)?;
        Some(std::slice::from_raw_parts(at as *const u8, len as usize))
    }

    /// Mutable view of `[offset, offset + len)`, or None when out of range.
    ///
    /// # Safety
    /// The caller owns these bytes for the slice's lifetime (nobody else
    /// reads or writes them).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: u64, len: u64) -> Option<&mut [u8]> {
        let at = self.resolve(offset, len)?;
        Some(std::slice::from_raw_parts_mut(at as *mut u8, len as usize))
    }

    /// Copies `src` into the pool at `offset` (the engine writing KV).
    pub fn write(&self, offset: u64, src: &[u8]) -> Option<()> {
        // SAFETY: bounds checked by slice_mut; the caller owns the block.
        let dst = unsafe { self.slice_mut(offset, src.len() as u64)? };
        dst.copy_from_slice(src);
        Some(())
    }

    /// Copies pool bytes at `offset` into `dst`.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Option<()> {
        // SAFETY: bounds checked by slice; the caller owns the block.
        let src = unsafe { self.slice(offset, dst.len() as u64)? };
        dst.copy_from_slice(src);
        Some(())
    }
}

/// Touches every page so the first transfer does not pay for page faults.
fn prefault(ptr: *mut u8, len: usize) {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    // SAFETY: our own mapping of `len` bytes.
    if unsafe { libc::madvise(ptr.cast(), len, MADV_POPULATE_WRITE) } == 0 {
        return;
    }
    // Kernels before 5.14: write one byte per page.
    let mut off = 0;
    while off < len {
        // SAFETY: within the mapping; the memory is fresh and unshared.
        unsafe { ptr.add(off).write_volatile(0) };
        off += 4096;
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        if self.lent {
            return;
        }
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if self.unlink_on_drop {
            if let Some(path) = &self.path {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_maps_resolve_inside_one_region_only() {
        let m = RegionMap::new(vec![0x10_000, 0x50_000, 0x30_000], 0x1000).unwrap();
        assert_eq!(m.len(), 0x3000);
        assert!(!m.is_contiguous());
        assert_eq!(m.resolve(0, 0x1000), Some(0x10_000));
        assert_eq!(m.resolve(0x1000 + 16, 32), Some(0x50_010));
        assert_eq!(m.resolve(0x2fff, 1), Some(0x30_fff));
        assert_eq!(m.resolve(0xff0, 0x20), None, "across regions 0 and 1");
        assert_eq!(m.resolve(0x3000, 1), None, "past the last region");
        assert!(RegionMap::new(vec![0x1000, 0x2000], 0x1000)
            .unwrap()
            .is_contiguous());
        for bad in [
            RegionMap::new(vec![], 16),
            RegionMap::new(vec![0x1000], 0),
            RegionMap::new(vec![0], 16),
            RegionMap::new(vec![0x1000, 0x1008], 16),
            RegionMap::new(vec![u64::MAX - 4], 16),
        ] {
            assert!(bad.is_err());
        }
    }

    #[test]
    fn lent_memory_reads_and_writes_the_engines_regions_and_is_not_unmapped() {
        let mut a = vec![0u8; 64];
        let mut b = vec![0u8; 64];
        let map = RegionMap::new(vec![b.as_mut_ptr() as u64, a.as_mut_ptr() as u64], 64).unwrap();
        let lent = unsafe { HostMemory::lent(map) };
        assert!(lent.region_map().is_some());
        assert_eq!(lent.len(), 128);
        lent.write(64 + 8, b"hi").unwrap();
        lent.write(0, b"yo").unwrap();
        assert!(lent.write(60, b"12345678").is_none(), "across the regions");
        let mut out = [0u8; 2];
        lent.read(72, &mut out).unwrap();
        assert_eq!(&out, b"hi");
        assert_eq!(lent.segments().len(), 2);
        drop(lent);
        assert_eq!(&a[8..10], b"hi");
        assert_eq!(&b[..2], b"yo");
        // Contiguous regions become one range.
        let mut c = vec![0u8; 96];
        let base = c.as_mut_ptr() as u64;
        let lent = unsafe {
            HostMemory::lent(RegionMap::new(vec![base, base + 32, base + 64], 32).unwrap())
        };
        assert!(lent.region_map().is_none());
        assert_eq!(lent.segments(), vec![(base, 96)]);
        lent.write(30, b"abcd").unwrap();
        drop(lent);
        assert_eq!(&c[30..34], b"abcd");
    }

    #[test]
    fn a_pool_of_separate_regions_owns_them_and_refuses_ranges_across_them() {
        let mem = KvMemory::allocate_separate(MemKind::Host, 3, 8192).unwrap();
        assert!(mem.separate_regions());
        assert_eq!(mem.len(), 3 * 8192);
        let map = mem.region_map().unwrap().clone();
        assert!(!map.is_contiguous());
        assert_eq!(mem.segments().len(), 3);
        assert_eq!(mem.resolve(8192 + 4, 4), Some(map.bases()[1] + 4));
        mem.write(2 * 8192 + 100, b"third").unwrap();
        let mut out = [0u8; 5];
        mem.read(2 * 8192 + 100, &mut out).unwrap();
        assert_eq!(&out, b"third");
        // An error, not a panic: the range is inside the pool but crosses regions.
        let err = mem.write(8190, b"across").unwrap_err();
        assert!(err.to_string().contains("separately allocated"), "{err}");
        assert!(mem.read(3 * 8192, &mut out).is_err());
        assert!(KvMemory::allocate_separate(MemKind::Host, 0, 16).is_err());
        if !gpu::driver_present() {
            let err = KvMemory::allocate_separate(MemKind::Gpu(0), 2, 4096).unwrap_err();
            assert!(matches!(err, TransferError::GpuUnavailable(_)), "{err}");
        }
    }

    #[test]
    fn anonymous_read_write_and_bounds() {
        let m = HostMemory::anonymous(4096).unwrap();
        m.write(100, b"hello").unwrap();
        let mut out = [0u8; 5];
        m.read(100, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(m.write(4094, b"abc").is_none());
        assert!(unsafe { m.slice(u64::MAX, 2) }.is_none());
    }

    #[test]
    fn shared_mapping_is_seen_by_a_second_mapping_and_checks_size() {
        let path = std::env::temp_dir().join(format!("tandem-mem-{}", uuid::Uuid::new_v4()));
        let a = HostMemory::shared(&path, 8192, true).unwrap();
        let b = HostMemory::shared(&path, 8192, false).unwrap();
        a.write(4000, b"shared").unwrap();
        let mut out = [0u8; 6];
        b.read(4000, &mut out).unwrap();
        assert_eq!(&out, b"shared");
        let err = HostMemory::shared(&path, 4096, false).unwrap_err();
        assert!(err.to_string().contains("8192 bytes"), "{err}");
        drop(b);
        drop(a);
        assert!(!path.exists());
    }
}
