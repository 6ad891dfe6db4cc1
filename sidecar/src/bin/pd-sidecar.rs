//! `pd-sidecar`: see the crate docs and the README for flags.

use clap::Parser;
use sidecar::config::{Args, Config};
use sidecar::launch::Launch;

fn main() -> std::process::ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    sidecar::launch::main(
        "pd-sidecar",
        Config::from_args(args),
        |c| Launch {
            log_filter: c.log_filter.clone(),
            log_json: c.log_json,
            worker_threads: c.worker_threads,
            check_config: c.check_config,
        },
        sidecar::server::run,
    )
}
