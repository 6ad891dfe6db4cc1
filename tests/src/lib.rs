//! Shared helpers for Tandem's tests: the engine simulator (`sim`, served by the `engine-sim`
//! binary) and the end-to-end test harness (`harness`) that starts real processes on loopback.

pub mod demo;
pub mod fake_kube;
pub mod harness;
pub mod kv_agent;
pub mod otlp;
pub mod sim;
