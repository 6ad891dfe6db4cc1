//! Memory the GPU reads or writes: device allocations (ours, or a peer's VMM
//! allocation imported from its descriptor), pinned host buffers, a peer
//! process's memory opened from its IPC handle, and host memory registered
//! for the device. Each frees what it holds when dropped.

use std::sync::Arc;

use cudarc::driver::sys;

use super::{check, Gpu};
use crate::error::TransferError;

/// How a GPU pool is allocated, which decides how a peer opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuShare {
    /// `cuMemAlloc` + a legacy CUDA IPC handle: processes of one PID
    /// namespace (one pod).
    #[default]
    Ipc,
    /// A VMM allocation (`cuMemCreate`) exported as a POSIX file
    /// descriptor, passed over a Unix socket: pods on one node that mount
    /// the socket's folder, whatever their PID namespaces.
    Fd,
}

impl GpuShare {
    /// `TANDEM_CUDA_SHARE` (ipc|fd), ipc when unset or unknown.
    pub fn from_env() -> GpuShare {
        std::env::var("TANDEM_CUDA_SHARE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    }
}

impl std::str::FromStr for GpuShare {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ipc" => Ok(GpuShare::Ipc),
            "fd" => Ok(GpuShare::Fd),
            other => Err(format!("unknown GPU sharing {other:?} (ipc|fd)")),
        }
    }
}

impl std::fmt::Display for GpuShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GpuShare::Ipc => "ipc",
            GpuShare::Fd => "fd",
        })
    }
}

/// The physical allocation behind a VMM mapping.
pub(super) struct Vmm {
    pub(super) handle: sys::CUmemGenericAllocationHandle,
    /// Mapped bytes: the length rounded up to the allocation granularity.
    pub(super) size: usize,
}

/// Device memory mapped in this process: our own allocation, or a peer's
/// VMM allocation imported from its descriptor.
pub struct DeviceBuffer {
    pub(super) gpu: Arc<Gpu>,
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) vmm: Option<Vmm>,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Zeroes the buffer and waits: the memset runs on the legacy default
    /// stream, which the copier's non-blocking stream does not wait for (a
    /// staging buffer's first items, uploaded there, were once zeroed after
    /// the fact and its first transfer moved nothing: pd-demo on GPU pools).
    pub(super) fn zero(&self) -> Result<(), TransferError> {
        self.gpu.bind()?;
        // SAFETY: our own mapped range of `len` bytes.
        check("cuMemsetD8", unsafe {
            sys::cuMemsetD8_v2(self.ptr, 0, self.len)
        })?;
        // SAFETY: waits for the legacy default stream.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(std::ptr::null_mut())
        })
    }

    /// Bytes mapped for a VMM allocation (the length rounded up to the
    /// allocation granularity); None for a `cuMemAlloc` buffer.
    pub fn alloc_size(&self) -> Option<usize> {
        self.vmm.as_ref().map(|v| v.size)
    }

    /// A file descriptor for a VMM allocation ([`Gpu::alloc_shareable`]),
    /// which another process maps with [`Gpu::import_fd`].
    pub fn export_fd(&self) -> Result<std::os::fd::OwnedFd, TransferError> {
        use std::os::fd::FromRawFd;
        let vmm = self.vmm.as_ref().ok_or_else(|| {
            TransferError::Gpu("only VMM allocations (--gpu-share fd) export a descriptor".into())
        })?;
        self.gpu.bind()?;
        let mut fd: std::ffi::c_int = -1;
        // SAFETY: the driver writes an int descriptor for POSIX handles.
        check("cuMemExportToShareableHandle", unsafe {
            sys::cuMemExportToShareableHandle(
                (&mut fd as *mut std::ffi::c_int).cast(),
                vmm.handle,
                sys::CUmemAllocationHandleType_enum::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        })?;
        // SAFETY: a fresh descriptor the driver handed to us.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    /// A legacy CUDA IPC handle for the whole allocation: another process of
    /// the same PID namespace opens it with [`IpcMapping::open`].
    pub fn ipc_handle(&self) -> Result<[u8; 64], TransferError> {
        if self.vmm.is_some() {
            return Err(TransferError::Gpu(
                "a VMM allocation has no legacy IPC handle; peers open it by descriptor".into(),
            ));
        }
        self.gpu.ipc_handle(self.ptr)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.gpu.bind().is_err() {
            return;
        }
        match &self.vmm {
            // SAFETY: undoing our own mapping, reservation and handle once.
            Some(v) => unsafe {
                sys::cuMemUnmap(self.ptr, v.size);
                sys::cuMemAddressFree(self.ptr, v.size);
                sys::cuMemRelease(v.handle);
            },
            // SAFETY: freeing our own allocation once.
            None => unsafe {
                sys::cuMemFree_v2(self.ptr);
            },
        }
    }
}

/// Page-locked host memory.
pub struct PinnedBuffer {
    pub(super) gpu: Arc<Gpu>,
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
    /// Where a kernel reads it (mapped host memory, over the bus).
    pub(super) device_ptr: u64,
}

// SAFETY: plain memory; users follow the same ownership rules as HostMemory.
unsafe impl Send for PinnedBuffer {}
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: our allocation of `len` bytes, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// The buffer's address for a kernel, which then reads the host memory
    /// itself; 0 when the driver gave none.
    pub fn device_ptr(&self) -> u64 {
        self.device_ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: freeing our own allocation once.
            unsafe { sys::cuMemFreeHost(self.ptr.cast()) };
        }
    }
}

/// A peer process's device memory opened from its IPC handle.
pub struct IpcMapping {
    pub(super) gpu: Arc<Gpu>,
    pub(super) ptr: u64,
}

impl IpcMapping {
    pub fn open(gpu: &Arc<Gpu>, handle: &[u8; 64]) -> Result<IpcMapping, TransferError> {
        gpu.bind()?;
        let h = sys::CUipcMemHandle_st {
            reserved: handle.map(|b| b as std::ffi::c_char),
        };
        let mut ptr = 0;
        // SAFETY: out-parameter; closed in Drop.
        check("cuIpcOpenMemHandle", unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        })?;
        Ok(IpcMapping {
            gpu: gpu.clone(),
            ptr,
        })
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: closing our own mapping once.
            unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
        }
    }
}

/// Host memory (ours, or a peer's shared mapping) made reachable from the
/// device: page-locked and mapped into the device's address space.
pub struct HostRegistration {
    pub(super) gpu: Arc<Gpu>,
    pub(super) host: *mut u8,
    pub(super) device_ptr: u64,
}

// SAFETY: only addresses are kept; the memory is owned elsewhere.
unsafe impl Send for HostRegistration {}
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    /// # Safety
    /// `[ptr, ptr + len)` must stay mapped until the registration drops.
    pub unsafe fn new(gpu: &Arc<Gpu>, ptr: *mut u8, len: usize) -> Result<Self, TransferError> {
        gpu.bind()?;
        check(
            "cuMemHostRegister",
            sys::cuMemHostRegister_v2(
                ptr.cast(),
                len,
                sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP,
            ),
        )?;
        let mut dptr = 0;
        let r = sys::cuMemHostGetDevicePointer_v2(&mut dptr, ptr.cast(), 0);
        if let Err(e) = check("cuMemHostGetDevicePointer", r) {
            sys::cuMemHostUnregister(ptr.cast());
            return Err(e);
        }
        Ok(HostRegistration {
            gpu: gpu.clone(),
            host: ptr,
            device_ptr: dptr,
        })
    }

    pub fn device_ptr(&self) -> u64 {
        self.device_ptr
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: unregistering our own registration once.
            unsafe { sys::cuMemHostUnregister(self.host.cast()) };
        }
    }
}
