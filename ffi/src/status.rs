//! What every C function returns, the thread-local last error, and the
//! guard that turns Rust errors and panics into both.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Result of a call. `Ok` and `Pending` are not errors; every negative value
/// is, and `tandem_kv_last_error()` on the same thread says why.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TandemKvStatus {
    Ok = 0,
    /// The transfer has not finished yet.
    Pending = 1,
    /// A null pointer, a bad length, bad JSON, a string that is not UTF-8.
    InvalidArgument = -1,
    /// No such transfer handle or held request.
    NotFound = -2,
    /// The transfer failed (peer gone, bad block ids, backend error).
    Transfer = -3,
    /// The deadline passed.
    Timeout = -4,
    /// Not in this state: memory not registered yet, or registered twice.
    State = -5,
    /// A bug: the library caught a panic.
    Internal = -6,
    /// The output buffer is too small; the length needed was written.
    BufferTooSmall = -7,
}

/// An error on its way to C: a status and a message.
#[derive(Debug)]
pub struct Failure {
    pub status: TandemKvStatus,
    pub message: String,
}

impl Failure {
    pub fn new(status: TandemKvStatus, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(TandemKvStatus::InvalidArgument, message)
    }
}

impl From<transfer::TransferError> for Failure {
    fn from(e: transfer::TransferError) -> Failure {
        let status = match &e {
            transfer::TransferError::Deadline { .. } => TandemKvStatus::Timeout,
            transfer::TransferError::BadRequest(_) => TandemKvStatus::InvalidArgument,
            _ => TandemKvStatus::Transfer,
        };
        Failure::new(status, e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub fn set_last_error(message: &str) {
    // A message with a NUL in it is cut there rather than lost.
    let message = message.split('\0').next().unwrap_or_default();
    let c = CString::new(message).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The calling thread's last error message ("" when none); valid until the
/// next call on this thread.
pub fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs `f`, mapping its error or panic to a status and the last error.
pub fn guard(f: impl FnOnce() -> Result<TandemKvStatus, Failure>) -> TandemKvStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(status)) => status,
        Ok(Err(failure)) => {
            set_last_error(&failure.message);
            failure.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error (a bug in libtandem_kv): {what}"));
            TandemKvStatus::Internal
        }
    }
}
