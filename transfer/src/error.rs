//! The transfer crate's error type. Variants name the cause; the gRPC status
//! code is a pure function of the variant.

use crate::layout::LayoutError;
use crate::plan::PlanError;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The NIXL runtime libraries are missing or unusable: a setup problem.
    #[error("NIXL runtime unavailable: {0}")]
    NixlUnavailable(String),
    /// GPU memory was asked for where there is no usable CUDA driver or
    /// device: a start-up problem (exit code 2).
    #[error("GPU unavailable: {0}")]
    GpuUnavailable(String),
    /// A CUDA driver call failed.
    #[error("CUDA: {0}")]
    Gpu(String),
    #[error("{backend} backend error: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
    #[error("unknown peer {0:?}: no metadata loaded (handshake first)")]
    UnknownPeer(String),
    #[error("bad peer metadata: {0}")]
    BadMetadata(String),
    #[error("peer {peer} unreachable: {message}")]
    PeerUnreachable { peer: String, message: String },
    #[error("peer {peer} refused the transfer: {message}")]
    PeerRefused { peer: String, message: String },
    #[error("transfer plan: {0}")]
    Plan(#[from] PlanError),
    #[error("layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("layouts do not match: {0}")]
    LayoutMismatch(String),
    #[error("deadline of {deadline_ms} ms passed with {done} of {total} bytes moved")]
    Deadline {
        deadline_ms: u64,
        done: u64,
        total: u64,
    },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl TransferError {
    pub fn backend(backend: &'static str, message: impl std::fmt::Display) -> Self {
        TransferError::Backend {
            backend,
            message: message.to_string(),
        }
    }

    /// Whether a fresh handshake with the peer might fix this error (the
    /// peer restarted, its memory keys changed).
    pub fn may_need_rehandshake(&self) -> bool {
        matches!(
            self,
            TransferError::Backend { .. }
                | TransferError::PeerUnreachable { .. }
                | TransferError::UnknownPeer(_)
                | TransferError::Deadline { .. }
        )
    }

    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            TransferError::NixlUnavailable(_) | TransferError::GpuUnavailable(_) => {
                Code::FailedPrecondition
            }
            TransferError::Backend { .. } | TransferError::Gpu(_) | TransferError::Io(_) => {
                Code::Internal
            }
            TransferError::UnknownPeer(_) => Code::NotFound,
            TransferError::BadMetadata(_)
            | TransferError::Plan(_)
            | TransferError::Layout(_)
            | TransferError::LayoutMismatch(_)
            | TransferError::BadRequest(_) => Code::InvalidArgument,
            TransferError::PeerUnreachable { .. } => Code::Unavailable,
            TransferError::PeerRefused { .. } => Code::FailedPrecondition,
            TransferError::Deadline { .. } => Code::DeadlineExceeded,
        }
    }
}

impl From<TransferError> for tonic::Status {
    fn from(e: TransferError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
