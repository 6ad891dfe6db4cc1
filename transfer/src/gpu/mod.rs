//! CUDA through the driver API, loaded at run time (`cudarc` with dynamic
//! loading): nothing of CUDA is needed to build, and a machine without a
//! driver only fails when GPU memory is asked for, with
//! [`TransferError::GpuUnavailable`].
//!
//! Owns the per-device primary context, allocation (the buffers themselves
//! are in `buffers.rs`, streams and events in `stream.rs`), CUDA IPC handles,
//! peer access, and the copy kernels (`gather.ptx`, `blocks.ptx`). Knows nothing about layouts or peers: `copy` packs and
//! runs a plan's copies, the `cuda-ipc` backend decides whose memory.
//!
//! Every call binds the device's primary context to the calling thread
//! first: the agent calls from tokio's blocking pool, whose threads come and
//! go.

mod buffers;
mod ceiling;
pub mod copy;
pub mod lent;
mod stream;

use buffers::Vmm;
pub use buffers::{DeviceBuffer, GpuShare, HostRegistration, IpcMapping, PinnedBuffer};
pub use stream::{Event, Stream};

pub use ceiling::{copy_ceilings, peer_copy_ceiling};

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys;

use crate::error::TransferError;

/// A driver call's result as our error, naming the call.
fn check(what: &str, r: sys::CUresult) -> Result<(), TransferError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a static string pointer or leaves null.
    unsafe { sys::cuGetErrorName(r, &mut name) };
    let name = if name.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: a static NUL-terminated string from the driver.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    };
    Err(TransferError::Gpu(format!("{what}: {name}")))
}

/// Whether a CUDA driver library can be loaded at all.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda.
    unsafe { sys::is_culib_present() }
}

static INIT: OnceLock<Result<i32, String>> = OnceLock::new();

/// Loads and initialises the driver once; returns the device count.
pub fn init() -> Result<u32, TransferError> {
    INIT.get_or_init(|| {
        if !driver_present() {
            return Err(
                "no CUDA driver (libcuda.so.1 not found: is this a GPU machine, \
                        with the NVIDIA driver mounted?)"
                    .into(),
            );
        }
        // SAFETY: cuInit may be called any number of times.
        let r = unsafe { sys::cuInit(0) };
        check("cuInit", r).map_err(|e| e.to_string())?;
        let mut n = 0;
        // SAFETY: writes the count.
        let r = unsafe { sys::cuDeviceGetCount(&mut n) };
        check("cuDeviceGetCount", r).map_err(|e| e.to_string())?;
        Ok(n)
    })
    .clone()
    .map(|n| n as u32)
    .map_err(TransferError::GpuUnavailable)
}

/// One GPU: its primary context, identity and the loaded copy kernel.
pub struct Gpu {
    ordinal: u32,
    ctx: sys::CUcontext,
    name: String,
    uuid: [u8; 16],
    sm_count: u32,
    kernel: OnceLock<Result<Kernel, String>>,
    blocks: OnceLock<Result<Kernel, String>>,
}

// SAFETY: a CUcontext is usable from any thread once bound to it; the
// driver serialises what needs it.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

/// A loaded PTX module and its entry points, in the order they were asked for.
struct Kernel {
    _module: sys::CUmodule,
    funcs: Vec<sys::CUfunction>,
}

const GATHER_PTX: &str = concat!(include_str!("gather.ptx"), "\0");
const GATHER_NAMES: [&CStr; 3] = [c"tandem_gather", c"tandem_gather_nc", c"tandem_gather8"];
const BLOCKS_PTX: &str = concat!(include_str!("blocks.ptx"), "\0");
const BLOCKS_NAMES: [&CStr; 3] = [c"tandem_blocks", c"tandem_blocks8", c"tandem_blocks_cs"];

/// One block-list launch ([`Gpu::launch_blocks`]): `pairs` records `{u32
/// src_block, u32 dst_block}` at device address `ids`, copied in each of
/// `regions` regions. Addresses and `block` are multiples of 16.
#[derive(Debug, Clone, Copy)]
pub struct BlockLaunch {
    pub ids: u64,
    pub src: u64,
    pub dst: u64,
    pub src_region: u64,
    pub dst_region: u64,
    pub block: u64,
    pub pairs: u32,
    pub regions: u32,
}

static DEVICES: OnceLock<Mutex<HashMap<u32, Arc<Gpu>>>> = OnceLock::new();

/// The GPU with CUDA ordinal `ordinal`, opened once per process.
pub fn device(ordinal: u32) -> Result<Arc<Gpu>, TransferError> {
    let count = init()?;
    if ordinal >= count {
        return Err(TransferError::GpuUnavailable(format!(
            "gpu:{ordinal} asked for, but the driver sees {count} GPU(s)"
        )));
    }
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(g) = devices.get(&ordinal) {
        return Ok(g.clone());
    }
    let mut dev = 0;
    // SAFETY: plain driver queries into local out-parameters.
    unsafe {
        check("cuDeviceGet", sys::cuDeviceGet(&mut dev, ordinal as i32))?;
    }
    let mut ctx = std::ptr::null_mut();
    unsafe {
        check(
            "cuDevicePrimaryCtxRetain",
            sys::cuDevicePrimaryCtxRetain(&mut ctx, dev),
        )?
    };
    let mut name = [0 as std::ffi::c_char; 128];
    unsafe {
        check(
            "cuDeviceGetName",
            sys::cuDeviceGetName(name.as_mut_ptr(), 128, dev),
        )?
    };
    // SAFETY: the driver NUL-terminates within the buffer.
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let mut uuid = sys::CUuuid { bytes: [0; 16] };
    unsafe { check("cuDeviceGetUuid", sys::cuDeviceGetUuid(&mut uuid, dev))? };
    let mut sms = 0;
    unsafe {
        check(
            "cuDeviceGetAttribute",
            sys::cuDeviceGetAttribute(
                &mut sms,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                dev,
            ),
        )?
    };
    let gpu = Arc::new(Gpu {
        ordinal,
        ctx,
        name,
        uuid: uuid.bytes.map(|b| b as u8),
        sm_count: sms.max(1) as u32,
        kernel: OnceLock::new(),
        blocks: OnceLock::new(),
    });
    devices.insert(ordinal, gpu.clone());
    Ok(gpu)
}

/// The visible GPU whose UUID ([`Gpu::uuid`]) is `uuid`, if any.
pub fn device_by_uuid(uuid: &str) -> Result<Option<Arc<Gpu>>, TransferError> {
    for ordinal in 0..init()? {
        let gpu = device(ordinal)?;
        if gpu.uuid() == uuid {
            return Ok(Some(gpu));
        }
    }
    Ok(None)
}

impl Gpu {
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's UUID, as `nvidia-smi -L` prints it (`GPU-…`).
    pub fn uuid(&self) -> String {
        let h: String = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "GPU-{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Lets kernels and copies of this device's context reach `other`'s
    /// memory directly (NVLink or PCIe peer to peer). An error names the
    /// pair when the two cannot.
    pub fn enable_peer_access(&self, other: &Gpu) -> Result<(), TransferError> {
        if other.ordinal == self.ordinal {
            return Ok(());
        }
        let (mut a, mut b, mut can) = (0, 0, 0);
        // SAFETY: plain driver queries into local out-parameters.
        unsafe {
            check("cuDeviceGet", sys::cuDeviceGet(&mut a, self.ordinal as i32))?;
            check(
                "cuDeviceGet",
                sys::cuDeviceGet(&mut b, other.ordinal as i32),
            )?;
            check(
                "cuDeviceCanAccessPeer",
                sys::cuDeviceCanAccessPeer(&mut can, a, b),
            )?;
        }
        if can == 0 {
            return Err(TransferError::Gpu(format!(
                "gpu:{} cannot access gpu:{}'s memory directly (no peer-to-peer path)",
                self.ordinal, other.ordinal
            )));
        }
        self.bind()?;
        // SAFETY: both contexts are retained for the life of the process.
        let r = unsafe { sys::cuCtxEnablePeerAccess(other.ctx, 0) };
        if r == sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
            return Ok(());
        }
        check("cuCtxEnablePeerAccess", r)
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<(), TransferError> {
        // SAFETY: the context is retained for the life of the process.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })
    }

    /// Device memory (`cuMemAlloc`: legacy-IPC capable), zeroed.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<DeviceBuffer, TransferError> {
        if len == 0 {
            return Err(TransferError::BadRequest("empty GPU allocation".into()));
        }
        self.bind()?;
        let mut ptr = 0;
        // SAFETY: out-parameter; freed in Drop.
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, len) }).map_err(|e| {
            TransferError::Gpu(format!("{e} ({len} bytes on gpu:{})", self.ordinal))
        })?;
        let buf = DeviceBuffer {
            gpu: self.clone(),
            ptr,
            len,
            vmm: None,
        };
        buf.zero()?;
        Ok(buf)
    }

    fn vmm_prop(&self) -> sys::CUmemAllocationProp {
        // SAFETY: a plain C struct; all-zero is its documented default.
        let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = sys::CUmemAllocationType_enum::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.requestedHandleTypes =
            sys::CUmemAllocationHandleType_enum::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        prop.location.type_ = sys::CUmemLocationType_enum::CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = self.ordinal as i32;
        prop
    }

    /// Device memory another process can open from a file descriptor
    /// ([`DeviceBuffer::export_fd`], [`Gpu::import_fd`]), zeroed.
    pub fn alloc_shareable(self: &Arc<Self>, len: usize) -> Result<DeviceBuffer, TransferError> {
        if len == 0 {
            return Err(TransferError::BadRequest("empty GPU allocation".into()));
        }
        self.bind()?;
        let prop = self.vmm_prop();
        let mut gran = 0usize;
        // SAFETY: out-parameter and a valid property struct.
        check("cuMemGetAllocationGranularity", unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut gran,
                &prop,
                sys::CUmemAllocationGranularity_flags_enum::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
            )
        })?;
        let size = len.div_ceil(gran.max(1)) * gran.max(1);
        let mut handle = 0;
        // SAFETY: out-parameter; released by the buffer (or below on error).
        check("cuMemCreate", unsafe {
            sys::cuMemCreate(&mut handle, size, &prop, 0)
        })
        .map_err(|e| TransferError::Gpu(format!("{e} ({size} bytes on gpu:{})", self.ordinal)))?;
        let buf = self.map_vmm(handle, size, len)?;
        buf.zero()?;
        Ok(buf)
    }

    /// Maps a peer's VMM allocation, received as a file descriptor, of
    /// `size` mapped bytes of which the pool uses `len`.
    pub fn import_fd(
        self: &Arc<Self>,
        fd: std::os::fd::OwnedFd,
        size: usize,
        len: usize,
    ) -> Result<DeviceBuffer, TransferError> {
        use std::os::fd::AsRawFd;
        if len > size || size == 0 {
            return Err(TransferError::BadMetadata(format!(
                "pool of {len} bytes in an allocation of {size}"
            )));
        }
        self.bind()?;
        let mut handle = 0;
        // SAFETY: the driver reads the descriptor number passed as a pointer
        // (its documented convention for POSIX handles) and dups it.
        check("cuMemImportFromShareableHandle", unsafe {
            sys::cuMemImportFromShareableHandle(
                &mut handle,
                fd.as_raw_fd() as usize as *mut c_void,
                sys::CUmemAllocationHandleType_enum::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            )
        })?;
        drop(fd);
        self.map_vmm(handle, size, len)
    }

    /// Reserves an address range, maps `handle` there and lets this device
    /// read and write it. Takes ownership of `handle` (released on error).
    fn map_vmm(
        self: &Arc<Self>,
        handle: sys::CUmemGenericAllocationHandle,
        size: usize,
        len: usize,
    ) -> Result<DeviceBuffer, TransferError> {
        let mut ptr = 0;
        // SAFETY: out-parameter; freed by the buffer's Drop.
        let reserved = check("cuMemAddressReserve", unsafe {
            sys::cuMemAddressReserve(&mut ptr, size, 0, 0, 0)
        });
        if let Err(e) = reserved {
            // SAFETY: releasing the handle we own.
            unsafe { sys::cuMemRelease(handle) };
            return Err(e);
        }
        // From here the buffer owns the handle and the range: its Drop
        // unmaps (a no-op error when never mapped), frees and releases.
        let buf = DeviceBuffer {
            gpu: self.clone(),
            ptr,
            len,
            vmm: Some(Vmm { handle, size }),
        };
        // SAFETY: a fresh reservation of `size` bytes and an allocation of `size`.
        check("cuMemMap", unsafe {
            sys::cuMemMap(ptr, size, 0, handle, 0)
        })?;
        let access = sys::CUmemAccessDesc {
            location: sys::CUmemLocation {
                type_: sys::CUmemLocationType_enum::CU_MEM_LOCATION_TYPE_DEVICE,
                id: self.ordinal as i32,
            },
            flags: sys::CUmemAccess_flags_enum::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the mapped range and one access descriptor.
        check("cuMemSetAccess", unsafe {
            sys::cuMemSetAccess(ptr, size, &access, 1)
        })?;
        Ok(buf)
    }

    /// Checks that `ptr` is device memory of this GPU.
    pub fn check_device_ptr(&self, ptr: u64) -> Result<(), TransferError> {
        self.bind()?;
        let mut mem_type: u32 = 0;
        // SAFETY: MEMORY_TYPE writes an unsigned int.
        check("cuPointerGetAttribute(MEMORY_TYPE)", unsafe {
            sys::cuPointerGetAttribute(
                (&mut mem_type as *mut u32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                ptr,
            )
        })
        .map_err(|e| TransferError::Gpu(format!("{ptr:#x} is not CUDA memory ({e})")))?;
        if mem_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
            return Err(TransferError::Gpu(format!(
                "{ptr:#x} is not device memory (CUDA memory type {mem_type})"
            )));
        }
        let mut ordinal: i32 = -1;
        // SAFETY: DEVICE_ORDINAL writes an int.
        check("cuPointerGetAttribute(DEVICE_ORDINAL)", unsafe {
            sys::cuPointerGetAttribute(
                (&mut ordinal as *mut i32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr,
            )
        })?;
        if ordinal != self.ordinal as i32 {
            return Err(TransferError::Gpu(format!(
                "{ptr:#x} is memory of gpu:{ordinal}, not gpu:{}",
                self.ordinal
            )));
        }
        Ok(())
    }

    /// The CUDA allocation that holds device address `ptr`, as (base,
    /// size), as `cuMemGetAddressRange` reports it.
    pub fn allocation_of(&self, ptr: u64) -> Result<(u64, u64), TransferError> {
        self.bind()?;
        let (mut base, mut size) = (0, 0usize);
        // SAFETY: two out-parameters.
        check("cuMemGetAddressRange", unsafe {
            sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr)
        })?;
        Ok((base, size as u64))
    }

    /// A legacy CUDA IPC handle for the `cuMemAlloc` allocation at `base`
    /// (its base address): another process of the same PID namespace opens
    /// it with [`IpcMapping::open`].
    pub fn ipc_handle(&self, base: u64) -> Result<[u8; 64], TransferError> {
        self.bind()?;
        let mut h = sys::CUipcMemHandle_st { reserved: [0; 64] };
        // SAFETY: an out-parameter; the driver checks the address.
        check("cuIpcGetMemHandle", unsafe {
            sys::cuIpcGetMemHandle(&mut h, base)
        })?;
        Ok(h.reserved.map(|b| b as u8))
    }

    /// Page-locked host memory, mapped for the device.
    pub fn alloc_pinned(self: &Arc<Self>, len: usize) -> Result<PinnedBuffer, TransferError> {
        self.bind()?;
        let mut p = std::ptr::null_mut();
        // SAFETY: out-parameter; freed in Drop.
        check("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(
                &mut p,
                len.max(1),
                sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP,
            )
        })?;
        // Owned from here: an error below frees it.
        let mut buf = PinnedBuffer {
            gpu: self.clone(),
            ptr: p.cast(),
            len,
            device_ptr: 0,
        };
        // SAFETY: `p` is our mapped allocation; out-parameter. Without a
        // device address (0) the buffer is only ever uploaded from.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut buf.device_ptr, p, 0) };
        if r != sys::CUresult::CUDA_SUCCESS {
            buf.device_ptr = 0;
        }
        Ok(buf)
    }

    pub fn stream(self: &Arc<Self>) -> Result<Stream, TransferError> {
        self.bind()?;
        let mut s = std::ptr::null_mut();
        // SAFETY: out-parameter; destroyed in Drop.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        Ok(Stream {
            gpu: self.clone(),
            raw: s,
        })
    }

    /// An event; `timing` events can be read with [`Event::elapsed_ms`].
    pub fn event(self: &Arc<Self>, timing: bool) -> Result<Event, TransferError> {
        self.bind()?;
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT as u32
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
        };
        let mut e = std::ptr::null_mut();
        // SAFETY: out-parameter; destroyed in Drop.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut e, flags)
        })?;
        Ok(Event {
            gpu: self.clone(),
            raw: e,
        })
    }

    /// Copies host bytes to device address `dst`; the bytes are on the
    /// device when this returns. (`cuMemcpyHtoD` from pageable memory
    /// returns once the bytes are staged, before the DMA lands: a peer
    /// process reading the block right after would see old bytes, as
    /// pd-demo on GPU pools did.)
    pub fn upload(&self, dst: u64, src: &[u8]) -> Result<(), TransferError> {
        self.bind()?;
        // SAFETY: the caller passes a device range of at least src.len() bytes.
        check("cuMemcpyHtoD", unsafe {
            sys::cuMemcpyHtoD_v2(dst, src.as_ptr().cast(), src.len())
        })?;
        // SAFETY: waits for the legacy default stream, where that copy ran.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(std::ptr::null_mut())
        })
    }

    /// Copies device bytes at `src` into `dst` (synchronous).
    pub fn download(&self, dst: &mut [u8], src: u64) -> Result<(), TransferError> {
        self.bind()?;
        // SAFETY: the caller passes a device range of at least dst.len() bytes.
        check("cuMemcpyDtoH", unsafe {
            sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, dst.len())
        })
    }

    /// The copy kernel, compiled from PTX by the driver on first use.
    fn kernel(&self) -> Result<&Kernel, TransferError> {
        self.module(&self.kernel, GATHER_PTX, &GATHER_NAMES)
    }

    fn module<'a>(
        &self,
        cell: &'a OnceLock<Result<Kernel, String>>,
        ptx: &str,
        names: &[&CStr],
    ) -> Result<&'a Kernel, TransferError> {
        cell.get_or_init(|| {
            self.bind().map_err(|e| e.to_string())?;
            load_module(ptx, names).map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| TransferError::Gpu(e.clone()))
    }

    /// Compiles both copy kernels now, so that a first transfer does not pay
    /// the driver's PTX JIT: kvbench's first submission took 49 ms on a fresh
    /// H200 machine, a vLLM engine's 0.4-0.5 ms with the compute cache warm. A kernel that does not load fails the
    /// transfers that need it, with the reason, as it would on first use.
    pub fn preload_kernels(&self) {
        if let Err(e) = self.kernel() {
            tracing::warn!(error = %e, "gather kernel unavailable");
        }
        self.has_block_kernel();
    }

    /// Whether the block-list kernel loaded here (it is loaded on first
    /// call; a driver that cannot compile it leaves block lists to the
    /// descriptor path, with the reason logged once).
    pub fn has_block_kernel(&self) -> bool {
        let r = self.module(&self.blocks, BLOCKS_PTX, &BLOCKS_NAMES);
        static LOGGED: std::sync::Once = std::sync::Once::new();
        if let Err(e) = &r {
            LOGGED.call_once(|| tracing::warn!(error = %e, "block-list kernel unavailable"));
        }
        r.is_ok()
    }

    /// Launches the block-list kernel (`blocks.ptx`) for one transfer.
    pub fn launch_blocks(&self, stream: &Stream, b: &BlockLaunch) -> Result<(), TransferError> {
        let units = u64::from(b.pairs) * u64::from(b.regions);
        if units == 0 {
            return Ok(());
        }
        let mut units = u32::try_from(units).map_err(|_| {
            TransferError::BadRequest(format!("{units} block copies in one transfer"))
        })?;
        let k = self.module(&self.blocks, BLOCKS_PTX, &BLOCKS_NAMES)?;
        let t = copy::block_tuning();
        // One CTA per (region, block) unless a persistent grid is asked for.
        let grid = match t.ctas_per_sm {
            0 => units,
            n => units.min(self.sm_count * n),
        };
        let (mut ids, mut src, mut dst) = (b.ids, b.src, b.dst);
        let (mut src_region, mut dst_region, mut block) = (b.src_region, b.dst_region, b.block);
        let mut pairs = b.pairs;
        let mut params: [*mut c_void; 8] = [
            (&mut ids as *mut u64).cast(),
            (&mut src as *mut u64).cast(),
            (&mut dst as *mut u64).cast(),
            (&mut src_region as *mut u64).cast(),
            (&mut dst_region as *mut u64).cast(),
            (&mut block as *mut u64).cast(),
            (&mut pairs as *mut u32).cast(),
            (&mut units as *mut u32).cast(),
        ];
        // SAFETY: the parameters match `tandem_blocks*` (six u64, two u32);
        // the ids buffer outlives the launch (kept until the stream's event).
        unsafe {
            self.launch(
                "cuLaunchKernel(tandem_blocks)",
                k.funcs[t.kernel as usize],
                grid,
                t.threads,
                stream,
                &mut params,
            )
        }
    }

    /// One 1-D launch on `stream`.
    ///
    /// # Safety
    /// `params` must point at values matching `func`'s parameters, and what
    /// they address must outlive the launch.
    unsafe fn launch(
        &self,
        what: &str,
        func: sys::CUfunction,
        grid: u32,
        threads: u32,
        stream: &Stream,
        params: &mut [*mut c_void],
    ) -> Result<(), TransferError> {
        self.bind()?;
        check(what, unsafe {
            sys::cuLaunchKernel(
                func,
                grid,
                1,
                1,
                threads,
                1,
                1,
                0,
                stream.raw,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }

    /// Launches `tandem_gather` over `n` packed items at device address `items`.
    pub fn launch_gather(&self, stream: &Stream, items: u64, n: u32) -> Result<(), TransferError> {
        if n == 0 {
            return Ok(());
        }
        let k = self.kernel()?;
        let t = copy::tuning();
        // Enough CTAs to fill every SM several times over, never more than items.
        let grid = n.min(self.sm_count * t.ctas_per_sm);
        let mut items = items;
        let mut n = n;
        let mut params: [*mut c_void; 2] =
            [(&mut items as *mut u64).cast(), (&mut n as *mut u32).cast()];
        // SAFETY: the kernel's parameters are (u64, u32), matching `params`;
        // the items buffer outlives the launch (the caller keeps it until the
        // stream's event completes).
        unsafe {
            self.launch(
                "cuLaunchKernel(tandem_gather)",
                k.funcs[t.kernel as usize],
                grid,
                t.threads,
                stream,
                &mut params,
            )
        }
    }
}

/// Compiles a NUL-terminated PTX image for the current context's device.
fn load_module(ptx: &str, names: &[&CStr]) -> Result<Kernel, TransferError> {
    let mut log = vec![0u8; 8192];
    let mut opts = [
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
    ];
    let mut vals: [*mut c_void; 2] = [log.as_mut_ptr().cast(), log.len() as *mut c_void];
    let mut module = std::ptr::null_mut();
    // SAFETY: a NUL-terminated PTX image and a log buffer of the size given.
    let r = unsafe {
        sys::cuModuleLoadDataEx(
            &mut module,
            ptx.as_ptr().cast(),
            opts.len() as u32,
            opts.as_mut_ptr(),
            vals.as_mut_ptr(),
        )
    };
    if let Err(e) = check("cuModuleLoadDataEx", r) {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        return Err(TransferError::Gpu(format!(
            "{e}: {}",
            String::from_utf8_lossy(&log[..end]).trim()
        )));
    }
    let mut funcs = vec![std::ptr::null_mut(); names.len()];
    for (f, name) in funcs.iter_mut().zip(names) {
        // SAFETY: a loaded module and a NUL-terminated name.
        check("cuModuleGetFunction", unsafe {
            sys::cuModuleGetFunction(f, module, name.as_ptr())
        })?;
    }
    Ok(Kernel {
        _module: module,
        funcs,
    })
}
