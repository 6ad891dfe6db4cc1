//! `pd-router`: see `sidecar::router` and the README for flags and the config file.

use clap::Parser;
use sidecar::launch::Launch;
use sidecar::router::config::{Args, RouterConfig};

fn main() -> std::process::ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    sidecar::launch::main(
        "pd-router",
        RouterConfig::from_args(args),
        |c| Launch {
            log_filter: c.log_filter.clone(),
            log_json: c.log_json,
            worker_threads: c.worker_threads,
            tracing: c.tracing,
            check_config: c.check_config,
        },
        sidecar::router::run,
    )
}
