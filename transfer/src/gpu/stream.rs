//! Streams and events of one GPU's primary context.

use std::sync::Arc;

use cudarc::driver::sys;

use super::{check, Gpu};
use crate::error::TransferError;

pub struct Stream {
    pub(super) gpu: Arc<Gpu>,
    pub(super) raw: sys::CUstream,
}

// SAFETY: a stream handle may be used from any thread bound to its context.
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

impl Stream {
    /// `cuMemcpyAsync` on this stream (addresses in the unified space).
    pub fn copy(&self, dst: u64, src: u64, len: usize) -> Result<(), TransferError> {
        // SAFETY: the caller guarantees both ranges are valid device-reachable memory.
        check("cuMemcpyAsync", unsafe {
            sys::cuMemcpyAsync(dst, src, len, self.raw)
        })
    }

    /// Host-to-device copy on this stream; `src` must stay valid until the
    /// stream reaches this point (pinned memory for a true async copy).
    pub fn upload(&self, dst: u64, src: &[u8]) -> Result<(), TransferError> {
        // SAFETY: see above.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), src.len(), self.raw)
        })
    }

    pub fn synchronize(&self) -> Result<(), TransferError> {
        self.gpu.bind()?;
        // SAFETY: a live stream.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(self.raw)
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: destroying our own stream once.
            unsafe { sys::cuStreamDestroy_v2(self.raw) };
        }
    }
}

pub struct Event {
    pub(super) gpu: Arc<Gpu>,
    pub(super) raw: sys::CUevent,
}

// SAFETY: an event handle may be used from any thread bound to its context.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    pub fn record(&self, stream: &Stream) -> Result<(), TransferError> {
        // SAFETY: live event and stream of the same context.
        check("cuEventRecord", unsafe {
            sys::cuEventRecord(self.raw, stream.raw)
        })
    }

    /// True once the work before the record point has finished.
    pub fn done(&self) -> Result<bool, TransferError> {
        self.gpu.bind()?;
        // SAFETY: a live event.
        match unsafe { sys::cuEventQuery(self.raw) } {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            r => check("cuEventQuery", r).map(|_| false),
        }
    }

    pub fn synchronize(&self) -> Result<(), TransferError> {
        self.gpu.bind()?;
        // SAFETY: a live event.
        check("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(self.raw)
        })
    }

    /// Milliseconds from `start` to this event (both recorded with timing).
    pub fn elapsed_ms(&self, start: &Event) -> Result<f32, TransferError> {
        let mut ms = 0.0f32;
        // SAFETY: two completed timing events.
        check("cuEventElapsedTime", unsafe {
            sys::cuEventElapsedTime(&mut ms, start.raw, self.raw)
        })?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: destroying our own event once.
            unsafe { sys::cuEventDestroy_v2(self.raw) };
        }
    }
}
