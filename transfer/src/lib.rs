//! KV-transfer agent: vLLM-shaped KV layouts, transfer planning with
//! descriptor coalescing, NIXL and TCP backends, the agent that owns held
//! blocks and peers, and its gRPC control plane.
//!
//! Reading order: `layout` (where blocks live) -> `plan` (which bytes move,
//! as how many descriptors) -> `backend` (how bytes move) -> `agent` (peers,
//! deadlines, held blocks) -> `grpc` (the control plane other processes use).

pub mod agent;
pub mod backend;
pub mod bench;
pub mod chart;
pub mod cli;
pub mod error;
pub mod gpu;
pub mod grpc;
pub mod layout;
pub mod memory;
pub mod plan;

pub use agent::{Agent, AgentConfig, PeerMetadata, TransferSpec};
pub use backend::{BackendKind, Op};
pub use error::TransferError;
pub use layout::{KvLayout, LayoutParams, ModelShape};
pub use memory::{HostMemory, KvMemory};
pub use plan::{PlanKind, PlanOptions, TransferPlan};
