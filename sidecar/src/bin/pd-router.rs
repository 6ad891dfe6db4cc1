//! `pd-router`: see `sidecar::router` and the README for flags and the config file.

use clap::Parser;
use sidecar::router::config::{Args, RouterConfig};

fn main() -> std::process::ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    let cfg = match RouterConfig::from_args(args) {
        Ok(cfg) => cfg,
        Err(msg) => {
            eprintln!("pd-router: error: {msg}");
            return std::process::ExitCode::from(2);
        }
    };
    if cfg.check_config {
        // Validated without binding anything: print what a real start would run with.
        println!("{cfg:#?}");
        return std::process::ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log_json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    tracing::debug!(config = ?cfg, "effective configuration");

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if cfg.worker_threads > 0 {
        builder.worker_threads(cfg.worker_threads);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pd-router: error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sidecar::router::run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("pd-router: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
