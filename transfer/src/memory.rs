//! The memory that backs a KV pool ([`KvMemory`]): host memory (an anonymous
//! mapping owned by this process, or a shared file mapping (`/dev/shm/...`)
//! that an engine process maps too) or GPU memory (`gpu:N`). Owns the
//! memory's lifetime; knows nothing about layouts.
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
use crate::gpu::{self, DeviceBuffer, Gpu, GpuShare};
use crate::layout::MemKind;

/// A KV pool's memory: host or GPU.
pub enum KvMemory {
    Host(Arc<HostMemory>),
    Gpu(DeviceBuffer),
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

    pub fn kind(&self) -> MemKind {
        match self {
            KvMemory::Host(_) => MemKind::Host,
            KvMemory::Gpu(b) => MemKind::Gpu(b.gpu().ordinal()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            KvMemory::Host(m) => m.len(),
            KvMemory::Gpu(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Base address: a host pointer, or a device pointer for GPU memory.
    pub fn addr(&self) -> u64 {
        match self {
            KvMemory::Host(m) => m.addr() as u64,
            KvMemory::Gpu(b) => b.ptr(),
        }
    }

    pub fn host(&self) -> Option<&Arc<HostMemory>> {
        match self {
            KvMemory::Host(m) => Some(m),
            KvMemory::Gpu(_) => None,
        }
    }

    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        match self {
            KvMemory::Host(_) => None,
            KvMemory::Gpu(b) => Some(b.gpu()),
        }
    }

    pub fn device_buffer(&self) -> Option<&DeviceBuffer> {
        match self {
            KvMemory::Host(_) => None,
            KvMemory::Gpu(b) => Some(b),
        }
    }

    fn range(&self, offset: u64, len: usize) -> Result<(), TransferError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len() as u64 => Ok(()),
            _ => Err(TransferError::BadRequest(format!(
                "range {offset}+{len} outside the pool of {} bytes",
                self.len()
            ))),
        }
    }

    /// Copies `src` into the pool at `offset` (the engine writing KV).
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), TransferError> {
        self.range(offset, src.len())?;
        match self {
            KvMemory::Host(m) => {
                m.write(offset, src).expect("range checked");
                Ok(())
            }
            KvMemory::Gpu(b) => b.gpu().upload(b.ptr() + offset, src),
        }
    }

    /// Copies pool bytes at `offset` into `dst`.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), TransferError> {
        self.range(offset, dst.len())?;
        match self {
            KvMemory::Host(m) => {
                m.read(offset, dst).expect("range checked");
                Ok(())
            }
            KvMemory::Gpu(b) => b.gpu().download(dst, b.ptr() + offset),
        }
    }
}

#[derive(Debug)]
pub struct HostMemory {
    ptr: NonNull<u8>,
    len: usize,
    path: Option<PathBuf>,
    unlink_on_drop: bool,
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
        })
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
        })
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
        let end = offset.checked_add(len)?;
        if end > self.len as u64 {
            return None;
        }
        Some(std::slice::from_raw_parts(
            self.ptr.as_ptr().add(offset as usize),
            len as usize,
        ))
    }

    /// Mutable view of `[offset, offset + len)`, or None when out of range.
    ///
    /// # Safety
    /// The caller owns these bytes for the slice's lifetime (nobody else
    /// reads or writes them).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: u64, len: u64) -> Option<&mut [u8]> {
        let end = offset.checked_add(len)?;
        if end > self.len as u64 {
            return None;
        }
        Some(std::slice::from_raw_parts_mut(
            self.ptr.as_ptr().add(offset as usize),
            len as usize,
        ))
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
