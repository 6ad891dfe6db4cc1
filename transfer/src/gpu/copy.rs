//! One transfer's copies as ONE submission on a stream: either the gather
//! kernel over a packed item list (many descriptors: per-block plans,
//! fragmented placements) or `cuMemcpyAsync` per descriptor (a few long
//! runs, where the copy engines do as well and no SM is taken from the
//! engine). Completion is a CUDA event.
//!
//! The packing is pure and tested on CI; the rest needs a GPU.

use std::str::FromStr;
use std::sync::{Arc, Mutex};

use super::{BlockLaunch, DeviceBuffer, Event, Gpu, PinnedBuffer, Stream};
use crate::error::TransferError;

/// Threads of one CTA of `tandem_gather` (16 bytes each per pass).
pub const THREADS_PER_CTA: u32 = 256;
/// CTAs per SM in a launch: enough resident warps to hide memory latency.
pub const CTAS_PER_SM: u32 = 8;
/// Items are cut at this length so one long run spreads over many CTAs.
pub const MAX_ITEM_BYTES: u64 = 64 << 10;

/// Which entry of `gather.ptx` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatherKernel {
    /// Four 16-byte loads in flight per thread.
    Four = 0,
    /// The same through the read-only (non-coherent) load path.
    ReadOnly = 1,
    /// Eight 16-byte loads in flight per thread.
    Eight = 2,
}

/// The kernel's launch shape and item staging, fixed per process. Defaults
/// are what measured best on an H200 (hw-tests/results);
/// `TANDEM_GATHER_KERNEL` (`4|nc|8`), `TANDEM_GATHER_THREADS`,
/// `TANDEM_GATHER_CTAS_PER_SM`, `TANDEM_GATHER_ITEM_BYTES` and
/// `TANDEM_KV_DIRECT_ITEMS_BYTES` override them for tuning on other GPUs.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub kernel: GatherKernel,
    pub threads: u32,
    pub ctas_per_sm: u32,
    /// The shortest item; items grow with the transfer unless `fixed_item`.
    pub item_bytes: u64,
    pub fixed_item: bool,
    /// Item lists up to this many bytes are read by the kernel from the
    /// pinned host buffer itself (mapped memory) instead of being uploaded
    /// first: one driver call fewer, which is most of a small transfer's
    /// host time after the engine idled (hw-tests/results: submit-profile).
    /// Each CTA reads its few records over the bus once. 0 turns it off.
    pub direct_items_bytes: usize,
}

/// A tuning variable: its number clamped to `lo..=hi`, or `default`.
fn env_num(var: &str, default: u64, lo: u64, hi: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|v| v.clamp(lo, hi))
        .unwrap_or(default)
}

pub fn tuning() -> &'static Tuning {
    static T: std::sync::OnceLock<Tuning> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let num = env_num;
        let kernel = match std::env::var("TANDEM_GATHER_KERNEL").as_deref() {
            Ok("nc") => GatherKernel::ReadOnly,
            Ok("8") => GatherKernel::Eight,
            _ => GatherKernel::Four,
        };
        Tuning {
            kernel,
            threads: num("TANDEM_GATHER_THREADS", THREADS_PER_CTA as u64, 32, 1024) as u32 / 32
                * 32,
            // Up to one CTA per item for big grids: 1024 x 132 SMs.
            ctas_per_sm: num("TANDEM_GATHER_CTAS_PER_SM", CTAS_PER_SM as u64, 1, 1024) as u32,
            item_bytes: num("TANDEM_GATHER_ITEM_BYTES", MAX_ITEM_BYTES, ALIGN, 1 << 30) / ALIGN
                * ALIGN,
            fixed_item: std::env::var_os("TANDEM_GATHER_ITEM_BYTES").is_some(),
            direct_items_bytes: num("TANDEM_KV_DIRECT_ITEMS_BYTES", 4096, 0, 1 << 20) as usize,
        }
    })
}
/// The kernel moves 16-byte words: addresses and lengths must be multiples.
pub const ALIGN: u64 = 16;

/// Which entry of `blocks.ptx` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKernel {
    /// Four 16-byte loads in flight per thread.
    Four = 0,
    /// Eight.
    Eight = 1,
    /// Four, with streaming (evict-first) cache hints on loads and stores.
    Streaming = 2,
}

/// The block-list kernel's launch shape, fixed per process:
/// `TANDEM_BLOCKS_KERNEL` (`4|8|cs`), `TANDEM_BLOCKS_THREADS` and
/// `TANDEM_BLOCKS_CTAS_PER_SM` (0, the default: one CTA per block copy;
/// otherwise a grid of that many CTAs per SM looping over the copies).
#[derive(Debug, Clone, Copy)]
pub struct BlockTuning {
    pub kernel: BlockKernel,
    pub threads: u32,
    pub ctas_per_sm: u32,
}

pub fn block_tuning() -> &'static BlockTuning {
    static T: std::sync::OnceLock<BlockTuning> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let num = |var: &str, default: u32, lo: u32, hi: u32| {
            env_num(var, default.into(), lo.into(), hi.into()) as u32
        };
        BlockTuning {
            kernel: match std::env::var("TANDEM_BLOCKS_KERNEL").as_deref() {
                Ok("8") => BlockKernel::Eight,
                Ok("cs") => BlockKernel::Streaming,
                _ => BlockKernel::Four,
            },
            threads: num("TANDEM_BLOCKS_THREADS", THREADS_PER_CTA, 32, 1024) / 32 * 32,
            ctas_per_sm: num("TANDEM_BLOCKS_CTAS_PER_SM", 0, 0, 1024),
        }
    })
}

/// One transfer as block ids between two pools of `regions` regions: block
/// `b` of region `r` is at `base + r * region + b * block` on either side
/// (absolute device addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: u64,
    pub dst: u64,
    pub src_region: u64,
    pub dst_region: u64,
    pub block: u64,
    pub regions: u32,
}

impl BlockCopy {
    /// Whether the kernel can move it (16-byte words).
    pub fn aligned(&self) -> bool {
        (self.src | self.dst | self.src_region | self.dst_region | self.block).is_multiple_of(ALIGN)
    }

    /// The same copies one per (region, block pair), region-major.
    pub fn copies<'a>(
        &'a self,
        src_ids: &'a [u32],
        dst_ids: &'a [u32],
    ) -> impl Iterator<Item = CopyOp> + Clone + 'a {
        (0..u64::from(self.regions)).flat_map(move |r| {
            src_ids.iter().zip(dst_ids).map(move |(&s, &d)| CopyOp {
                src: self.src + r * self.src_region + u64::from(s) * self.block,
                dst: self.dst + r * self.dst_region + u64::from(d) * self.block,
                len: self.block,
            })
        })
    }
}

/// The kernel's id records: `{u32 src_block, u32 dst_block}` little-endian,
/// written into `out` (8 bytes a pair).
pub fn pack_ids(src_ids: &[u32], dst_ids: &[u32], out: &mut [u8]) {
    for ((rec, s), d) in out.chunks_exact_mut(8).zip(src_ids).zip(dst_ids) {
        rec[..4].copy_from_slice(&s.to_le_bytes());
        rec[4..].copy_from_slice(&d.to_le_bytes());
    }
}

/// `auto` picks per plan: `memcpy` when one side is host memory and the
/// descriptors average at least this many bytes (the copy engines then run
/// at the link's rate: 98% of a pinned host-to-device copy on an H200,
/// against 88% for the kernel reading host memory), the kernel otherwise
/// (between GPU memories it won at every size measured: 1,382 against
/// 1,091 GB/s for 64 descriptors of 8 MiB, 40x for 4,224 of ~128 KiB).
pub const MEMCPY_MIN_AVG_DESC: u64 = 1 << 20;

/// How a plan's copies are submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMethod {
    /// Chosen per plan ([`choose`]).
    Auto,
    /// One `tandem_gather` launch over all descriptors.
    Kernel,
    /// One `cuMemcpyAsync` per descriptor on one stream.
    Memcpy,
}

impl FromStr for CopyMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(CopyMethod::Auto),
            "kernel" => Ok(CopyMethod::Kernel),
            "memcpy" => Ok(CopyMethod::Memcpy),
            other => Err(format!(
                "unknown copy method {other:?} (auto|kernel|memcpy)"
            )),
        }
    }
}

impl std::fmt::Display for CopyMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CopyMethod::Auto => "auto",
            CopyMethod::Kernel => "kernel",
            CopyMethod::Memcpy => "memcpy",
        })
    }
}

/// One copy between absolute addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// The method for these copies: `want` unless it is `Auto`; the kernel only
/// when every copy is 16-byte aligned.
/// `host_side`: one end of every copy is host memory (DRAM -> VRAM).
pub fn choose(want: CopyMethod, copies: &[CopyOp], host_side: bool) -> CopyMethod {
    let aligned = copies.iter().all(|c| (c.src | c.dst | c.len) % ALIGN == 0);
    let total = copies.iter().map(|c| c.len).sum();
    choose_by(want, copies.len(), total, aligned, host_side)
}

fn choose_by(
    want: CopyMethod,
    count: usize,
    total: u64,
    aligned: bool,
    host_side: bool,
) -> CopyMethod {
    match want {
        CopyMethod::Kernel if aligned => CopyMethod::Kernel,
        CopyMethod::Kernel | CopyMethod::Memcpy => CopyMethod::Memcpy,
        CopyMethod::Auto => {
            let long = count > 0 && total / count as u64 >= MEMCPY_MIN_AVG_DESC;
            if !aligned || (host_side && long) {
                CopyMethod::Memcpy
            } else {
                CopyMethod::Kernel
            }
        }
    }
}

/// The item length for a transfer of `total` bytes: at least the tuned
/// minimum, and long enough that a big transfer is not cut into far more
/// items than the launch has CTAs (each item costs a CTA a descriptor
/// fetch, and the host 24 bytes to pack): about four items per CTA.
pub fn item_bytes(total: u64, sm_count: u32) -> u64 {
    let t = tuning();
    if t.fixed_item {
        return t.item_bytes;
    }
    let ctas = u64::from(sm_count.max(1)) * u64::from(t.ctas_per_sm);
    let per = (total / (ctas * 4)).clamp(t.item_bytes, 16 << 20);
    (per / ALIGN).max(1) * ALIGN
}

/// Packs copies into the kernel's item records (`{src, dst, len}` as three
/// little-endian u64), cutting each at `max_item` bytes (a multiple of
/// [`ALIGN`]). None when a copy is not 16-byte aligned. Empty copies are
/// dropped.
pub fn pack_items(copies: &[CopyOp], max_item: u64) -> Option<Vec<u64>> {
    let max_item = (max_item / ALIGN).max(1) * ALIGN;
    if copies.iter().any(|c| (c.src | c.dst | c.len) % ALIGN != 0) {
        return None;
    }
    Some(
        copies
            .iter()
            .flat_map(|c| items_of(*c, max_item))
            .flatten()
            .collect(),
    )
}

/// One copy cut into `{src, dst, len}` items of at most `item` bytes, in
/// order; `len.div_ceil(item)` of them.
fn items_of(c: CopyOp, item: u64) -> impl Iterator<Item = [u64; 3]> {
    (0..c.len.div_ceil(item)).map(move |k| {
        let off = k * item;
        [c.src + off, c.dst + off, (c.len - off).min(item)]
    })
}

/// `TANDEM_KV_PROFILE=1`: each submission prints how long its driver calls
/// took, and each transfer its phases (hw-tests: where a small transfer's
/// host time goes).
pub(crate) fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TANDEM_KV_PROFILE").is_some_and(|v| v == "1"))
}

/// Whether submissions are timed on the GPU (a start event, and timing
/// events): what kvbench's `dev GB/s` and a pull's `device_time` come from.
/// Without it a submission records one event that cannot time, one driver
/// call fewer and cheaper queries: what an engine's small pulls want.
/// `TANDEM_KV_DEVICE_TIMING=1|0` decides; otherwise the process's default
/// ([`set_device_timing_default`]: on, except in `libtandem_kv`), and
/// always on with `TANDEM_KV_PROFILE=1`.
pub fn device_timing() -> bool {
    *TIMING.get_or_init(
        || match std::env::var("TANDEM_KV_DEVICE_TIMING").as_deref() {
            Ok("1") => true,
            Ok("0") => profiling(),
            _ => profiling() || TIMING_DEFAULT.load(std::sync::atomic::Ordering::Relaxed),
        },
    )
}

static TIMING: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
static TIMING_DEFAULT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Sets the default of [`device_timing`] for this process; it has effect
/// only before the first GPU submission.
pub fn set_device_timing_default(on: bool) {
    TIMING_DEFAULT.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A pinned host buffer and a device buffer for one launch's items.
struct Staging {
    host: PinnedBuffer,
    dev: DeviceBuffer,
}

/// Submits transfers on one stream of one GPU. Staging buffers are reused
/// once the launch that read them has completed.
pub struct Copier {
    gpu: Arc<Gpu>,
    stream: Stream,
    spare: Mutex<Vec<Staging>>,
    /// (start, end) events of finished submissions, reused: creating events
    /// per transfer costs more than recording them. No start event, and an
    /// end event that cannot time, without [`device_timing`].
    events: Mutex<Vec<(Option<Event>, Event)>>,
}

impl Copier {
    pub fn new(gpu: &Arc<Gpu>) -> Result<Arc<Copier>, TransferError> {
        Ok(Arc::new(Copier {
            stream: gpu.stream()?,
            gpu: gpu.clone(),
            spare: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
        }))
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn staging(&self, bytes: usize) -> Result<Staging, TransferError> {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = spare.iter().position(|s| s.host.len() >= bytes) {
            return Ok(spare.swap_remove(i));
        }
        drop(spare);
        // Round up so that slightly larger plans reuse the buffer.
        let cap = bytes.next_power_of_two().max(64 << 10);
        Ok(Staging {
            host: self.gpu.alloc_pinned(cap)?,
            dev: self.gpu.alloc(cap)?,
        })
    }

    /// Submits all `copies` with `method` and returns at once; the copies
    /// are done when the returned handle says so. `copies` is walked twice
    /// (to choose and size, then to pack straight into pinned memory), so
    /// a plan of 10^5 descriptors costs no allocation here.
    pub fn submit<I>(
        self: &Arc<Self>,
        copies: I,
        method: CopyMethod,
        host_side: bool,
    ) -> Result<Submitted, TransferError>
    where
        I: Iterator<Item = CopyOp> + Clone,
    {
        let bound = std::time::Instant::now();
        self.gpu.bind()?;
        if profiling() {
            eprintln!(
                "tandem submit profile: bind {:.1} us",
                bound.elapsed().as_secs_f64() * 1e6
            );
        }
        let (count, total, aligned) = copies.clone().fold((0usize, 0u64, true), |(n, t, a), c| {
            (n + 1, t + c.len, a && (c.src | c.dst | c.len) % ALIGN == 0)
        });
        let method = choose_by(method, count, total, aligned, host_side);
        self.timed(method, || match method {
            CopyMethod::Kernel => {
                let item = item_bytes(total, self.gpu.sm_count());
                let n: usize = copies.clone().map(|c| c.len.div_ceil(item) as usize).sum();
                if n == 0 {
                    return Ok(None);
                }
                // Each item is read once, by one CTA: fine over the bus.
                let (s, items) = self.staged(n * 24, true, |buf| {
                    let words = copies.flat_map(|c| items_of(c, item)).flatten();
                    for (dst, w) in buf.chunks_exact_mut(8).zip(words) {
                        dst.copy_from_slice(&w.to_le_bytes());
                    }
                })?;
                let n = u32::try_from(n).map_err(|_| {
                    TransferError::BadRequest(format!("{n} copy items in one transfer"))
                })?;
                self.gpu.launch_gather(&self.stream, items, n)?;
                Ok(Some(s))
            }
            CopyMethod::Memcpy | CopyMethod::Auto => {
                for c in copies.filter(|c| c.len > 0) {
                    self.stream.copy(c.dst, c.src, c.len as usize)?;
                }
                Ok(None)
            }
        })
    }

    /// Runs `enqueue` between a start and an end event on the stream and
    /// returns the handle that owns what it staged. Event pairs are reused.
    fn timed(
        self: &Arc<Self>,
        method: CopyMethod,
        enqueue: impl FnOnce() -> Result<Option<Staging>, TransferError>,
    ) -> Result<Submitted, TransferError> {
        let t0 = std::time::Instant::now();
        let reused = self.events.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let (start, event) = match reused {
            Some(pair) => pair,
            None if device_timing() => (Some(self.gpu.event(true)?), self.gpu.event(true)?),
            None => (None, self.gpu.event(false)?),
        };
        if let Some(start) = &start {
            start.record(&self.stream)?;
        }
        let t1 = std::time::Instant::now();
        let staging = enqueue()?;
        let t2 = std::time::Instant::now();
        event.record(&self.stream)?;
        if profiling() {
            let us = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e6;
            eprintln!(
                "tandem submit profile: start event {:.1} us, copies ({method:?}) {:.1} us, end event {:.1} us",
                us(t0, t1),
                us(t1, t2),
                us(t2, std::time::Instant::now())
            );
        }
        Ok(Submitted {
            posted: std::time::Instant::now(),
            queries: 0,
            copier: self.clone(),
            start,
            event: Some(event),
            staging,
            method,
            done: false,
        })
    }

    /// A staging pair whose first `bytes` host bytes `fill` writes, and the
    /// device address a kernel reads them at: the host half itself for a
    /// short list the kernel reads once (`in_place`, [`Tuning::direct_items_bytes`]),
    /// else the device half after an upload on the stream.
    fn staged(
        &self,
        bytes: usize,
        in_place: bool,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(Staging, u64), TransferError> {
        let mut s = self.staging(bytes)?;
        fill(&mut s.host.as_mut_slice()[..bytes]);
        if in_place && bytes <= tuning().direct_items_bytes && s.host.device_ptr() != 0 {
            // The launch after this orders the host's writes before the
            // kernel's reads; the buffer is kept until the end event.
            let at = s.host.device_ptr();
            return Ok((s, at));
        }
        // SAFETY of the async upload: `s.host` is pinned and kept (in the
        // handle) until the event after the kernel completes.
        let host = unsafe { std::slice::from_raw_parts(s.host.as_ptr(), bytes) };
        self.stream.upload(s.dev.ptr(), host)?;
        let at = s.dev.ptr();
        Ok((s, at))
    }

    /// Submits one transfer given as block ids with the block-list kernel:
    /// the host only writes the id pairs (8 bytes each) and launches. Falls
    /// back to [`Copier::submit`] with one copy per block when `method` is
    /// `Memcpy`, the pools are not 16-byte aligned, or the kernel did not
    /// load.
    pub fn submit_blocks(
        self: &Arc<Self>,
        b: &BlockCopy,
        src_ids: &[u32],
        dst_ids: &[u32],
        method: CopyMethod,
    ) -> Result<Submitted, TransferError> {
        let pairs = src_ids.len().min(dst_ids.len());
        let (src_ids, dst_ids) = (&src_ids[..pairs], &dst_ids[..pairs]);
        if method == CopyMethod::Memcpy || !b.aligned() || !self.gpu.has_block_kernel() {
            return self.submit(b.copies(src_ids, dst_ids), method, false);
        }
        self.gpu.bind()?;
        self.timed(CopyMethod::Kernel, || {
            if pairs == 0 || b.regions == 0 {
                return Ok(None);
            }
            // Every region's CTAs read each pair again: uploaded, not read over the bus.
            let (s, ids) = self.staged(pairs * 8, false, |buf| pack_ids(src_ids, dst_ids, buf))?;
            let pairs = u32::try_from(pairs).map_err(|_| {
                TransferError::BadRequest(format!("{pairs} blocks in one transfer"))
            })?;
            self.gpu.launch_blocks(
                &self.stream,
                &BlockLaunch {
                    ids,
                    src: b.src,
                    dst: b.dst,
                    src_region: b.src_region,
                    dst_region: b.dst_region,
                    block: b.block,
                    pairs,
                    regions: b.regions,
                },
            )?;
            Ok(Some(s))
        })
    }
}

/// One submitted transfer.
pub struct Submitted {
    /// When the submission returned, and the event queries since (profiling).
    posted: std::time::Instant,
    queries: u32,
    copier: Arc<Copier>,
    /// `event` is Some until drop hands the pair back to the copier; `start`
    /// is None without [`device_timing`].
    start: Option<Event>,
    event: Option<Event>,
    staging: Option<Staging>,
    method: CopyMethod,
    done: bool,
}

impl Submitted {
    pub fn method(&self) -> CopyMethod {
        self.method
    }

    /// True once every copy has landed; errors are the device's (a bad
    /// address faults the kernel).
    pub fn poll(&mut self) -> Result<bool, TransferError> {
        if !self.done {
            let asked = std::time::Instant::now();
            self.queries += 1;
            if self.end().done()? {
                self.done = true;
                self.return_staging();
                if profiling() {
                    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
                    eprintln!(
                        "tandem submit profile: done at query {} ({:.1} us), {:.1} us after the submission, device {:?}",
                        self.queries,
                        us(asked.elapsed()),
                        us(self.posted.elapsed()),
                        self.device_time()
                    );
                }
            }
        }
        Ok(self.done)
    }

    /// Hands the staging buffers back for the next transfer (once done).
    fn return_staging(&mut self) {
        if let Some(s) = self.staging.take() {
            self.copier
                .spare
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(s);
        }
    }

    /// Device time from the first copy to the last, once done.
    pub fn device_time(&self) -> Option<std::time::Duration> {
        if !self.done {
            return None;
        }
        let ms = self.end().elapsed_ms(self.start.as_ref()?).ok()?;
        Some(std::time::Duration::from_secs_f64(
            f64::from(ms.max(0.0)) / 1e3,
        ))
    }

    pub fn wait(&mut self) -> Result<(), TransferError> {
        self.end().synchronize()?;
        self.poll().map(|_| ())
    }

    fn end(&self) -> &Event {
        self.event.as_ref().expect("events live until drop")
    }
}

impl Drop for Submitted {
    fn drop(&mut self) {
        // The device may still read the staging buffers: let it finish
        // before they are freed (bounded by one transfer's copy time).
        if !self.done && self.end().synchronize().is_err() {
            // A device error: keep nothing that the device may still touch.
            std::mem::forget(self.staging.take());
            return;
        }
        self.return_staging();
        if let Some(b) = self.event.take() {
            self.copier
                .events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((self.start.take(), b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(src: u64, dst: u64, len: u64) -> CopyOp {
        CopyOp { src, dst, len }
    }

    #[test]
    fn packing_cuts_long_runs_and_keeps_order() {
        let items = pack_items(&[c(0x1000, 0x9000, 160), c(0x4000, 0x100, 32)], 64).unwrap();
        assert_eq!(
            items,
            vec![
                0x1000, 0x9000, 64, //
                0x1040, 0x9040, 64, //
                0x1080, 0x9080, 32, //
                0x4000, 0x100, 32,
            ]
        );
    }

    #[test]
    fn packing_covers_every_byte_exactly_once() {
        let copies = [
            c(16, 4096, 32768),
            c(65536, 0, 48),
            c(1 << 20, 1 << 30, 5 << 20),
        ];
        let items = pack_items(&copies, MAX_ITEM_BYTES).unwrap();
        let total: u64 = items.chunks(3).map(|i| i[2]).sum();
        assert_eq!(total, 32768 + 48 + (5 << 20));
        for i in items.chunks(3) {
            assert!(i[2] > 0 && i[2] <= MAX_ITEM_BYTES);
            assert_eq!((i[0] | i[1] | i[2]) % ALIGN, 0);
        }
        // Items of one copy are adjacent and contiguous on both sides.
        let third: Vec<_> = items.chunks(3).filter(|i| i[0] >= 1 << 20).collect();
        for w in third.windows(2) {
            assert_eq!(w[0][0] + w[0][2], w[1][0]);
            assert_eq!(w[0][1] + w[0][2], w[1][1]);
        }
    }

    #[test]
    fn unaligned_copies_are_not_packed_and_go_to_memcpy() {
        assert!(pack_items(&[c(8, 0, 16)], 64).is_none());
        assert!(pack_items(&[c(0, 0, 20)], 64).is_none());
        assert!(pack_items(&[c(0, 0, 0)], 64).unwrap().is_empty());
        let odd = [c(0, 0, 24)];
        assert_eq!(choose(CopyMethod::Kernel, &odd, false), CopyMethod::Memcpy);
        assert_eq!(choose(CopyMethod::Auto, &odd, false), CopyMethod::Memcpy);
    }

    #[test]
    fn auto_takes_the_kernel_between_gpus_and_memcpy_for_long_host_runs() {
        let per_block: Vec<_> = (0..4096).map(|i| c(i * 32768, i * 32768, 32768)).collect();
        let runs: Vec<_> = (0..64).map(|i| c(i << 23, i << 23, 8 << 20)).collect();
        // GPU <-> GPU: the kernel, whatever the descriptors.
        assert_eq!(
            choose(CopyMethod::Auto, &per_block, false),
            CopyMethod::Kernel
        );
        assert_eq!(choose(CopyMethod::Auto, &runs, false), CopyMethod::Kernel);
        // Host memory on one side: the copy engines for long runs only.
        assert_eq!(choose(CopyMethod::Auto, &runs, true), CopyMethod::Memcpy);
        assert_eq!(
            choose(CopyMethod::Auto, &per_block, true),
            CopyMethod::Kernel
        );
        assert_eq!(choose(CopyMethod::Auto, &[], true), CopyMethod::Kernel);
        // Asked for explicitly: as asked (the kernel when aligned).
        assert_eq!(choose(CopyMethod::Kernel, &runs, true), CopyMethod::Kernel);
        assert_eq!(
            choose(CopyMethod::Memcpy, &per_block, false),
            CopyMethod::Memcpy
        );
        assert_eq!("KERNEL".parse::<CopyMethod>().unwrap(), CopyMethod::Kernel);
        assert!("dma".parse::<CopyMethod>().is_err());
    }

    #[test]
    fn block_ids_pack_as_pairs_and_copies_follow_the_layout() {
        let mut out = vec![0u8; 24];
        pack_ids(&[1, 2, 0x0102_0304], &[7, 8, 9], &mut out);
        assert_eq!(&out[..8], &[1, 0, 0, 0, 7, 0, 0, 0]);
        assert_eq!(&out[16..], &[4, 3, 2, 1, 9, 0, 0, 0]);
        let b = BlockCopy {
            src: 0x10_0000,
            dst: 0x80_0000,
            src_region: 0x1000,
            dst_region: 0x4000,
            block: 0x100,
            regions: 2,
        };
        assert!(b.aligned());
        let copies: Vec<_> = b.copies(&[3, 0], &[1, 5]).collect();
        assert_eq!(
            copies,
            vec![
                c(0x10_0300, 0x80_0100, 0x100),
                c(0x10_0000, 0x80_0500, 0x100),
                c(0x10_1300, 0x80_4100, 0x100),
                c(0x10_1000, 0x80_4500, 0x100),
            ]
        );
        assert!(!BlockCopy { block: 24, ..b }.aligned());
        assert!(!BlockCopy { dst: 8, ..b }.aligned());
    }

    #[test]
    fn items_grow_with_the_transfer_so_big_ones_are_not_cut_into_millions() {
        // Defaults: 64 KiB minimum, 8 CTAs per SM, about four items per CTA.
        let sms = 132;
        assert_eq!(item_bytes(1 << 20, sms), MAX_ITEM_BYTES);
        let mid = item_bytes(512 << 20, sms);
        assert!(mid > MAX_ITEM_BYTES && mid < 256 << 10, "{mid}");
        assert_eq!(mid % ALIGN, 0);
        let ten_gib = item_bytes(10 << 30, sms);
        assert!((10u64 << 30).div_ceil(ten_gib) <= 132 * 8 * 4 + 1);
        assert_eq!(item_bytes(1 << 40, sms), 16 << 20);
    }
}
