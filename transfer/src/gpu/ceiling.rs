//! The copy rates a transfer is measured against, timed with CUDA events in
//! the same run as the transfer: a device-to-device copy, a pinned
//! host-to-device copy, and a peer copy between two GPUs.

use std::sync::Arc;

use super::{Gpu, Stream};
use crate::error::TransferError;

/// The copy ceilings a transfer into this GPU is measured against: a
/// device-to-device copy and a pinned host-to-device copy of `bytes`, each
/// the median GB/s of `reps` timed with CUDA events.
pub fn copy_ceilings(
    gpu: &Arc<Gpu>,
    bytes: usize,
    reps: usize,
) -> Result<(f64, f64), TransferError> {
    let a = gpu.alloc(bytes)?;
    let b = gpu.alloc(bytes)?;
    let mut pinned = gpu.alloc_pinned(bytes)?;
    pinned.as_mut_slice().fill(0x5A);
    let stream = gpu.stream()?;
    let d2d = median_gbps(gpu, &stream, bytes, reps, &|| {
        stream.copy(b.ptr(), a.ptr(), bytes)
    })?;
    // SAFETY: `pinned` outlives the synchronous timing loop.
    let host = unsafe { std::slice::from_raw_parts(pinned.as_ptr(), bytes) };
    let h2d = median_gbps(gpu, &stream, bytes, reps, &|| stream.upload(a.ptr(), host))?;
    Ok((d2d, h2d))
}

/// The ceilings of transfers between two GPUs as cuda-ipc runs them, on a
/// `local` stream with peer access on: a copy of `bytes` from `other`'s
/// memory into `local`'s (a READ), and from `local`'s into `other`'s (a
/// WRITE); the median GB/s of `reps` each.
pub fn peer_copy_ceiling(
    local: &Arc<Gpu>,
    other: &Arc<Gpu>,
    bytes: usize,
    reps: usize,
) -> Result<(f64, f64), TransferError> {
    let theirs = other.alloc(bytes)?;
    let ours = local.alloc(bytes)?;
    local.enable_peer_access(other)?;
    let stream = local.stream()?;
    let read = median_gbps(local, &stream, bytes, reps, &|| {
        stream.copy(ours.ptr(), theirs.ptr(), bytes)
    })?;
    let write = median_gbps(local, &stream, bytes, reps, &|| {
        stream.copy(theirs.ptr(), ours.ptr(), bytes)
    })?;
    Ok((read, write))
}

/// Median GB/s of `reps` runs of `f` on `stream`, timed with events; a
/// first run warms up (module load, page mapping) and is not counted.
fn median_gbps(
    gpu: &Arc<Gpu>,
    stream: &Stream,
    bytes: usize,
    reps: usize,
    f: &dyn Fn() -> Result<(), TransferError>,
) -> Result<f64, TransferError> {
    let mut gbps = Vec::with_capacity(reps.max(1) + 1);
    for i in 0..=reps.max(1) {
        let start = gpu.event(true)?;
        let end = gpu.event(true)?;
        start.record(stream)?;
        f()?;
        end.record(stream)?;
        end.synchronize()?;
        let s = f64::from(end.elapsed_ms(&start)?) / 1e3;
        if i > 0 && s > 0.0 {
            gbps.push(bytes as f64 / s / 1e9);
        }
    }
    gbps.sort_by(|x, y| x.total_cmp(y));
    Ok(gbps.get(gbps.len() / 2).copied().unwrap_or(0.0))
}
