//! `pd-sidecar`: see the crate docs and the README for flags.

use clap::Parser;
use sidecar::config::{Args, Config};
use sidecar::launch::Launch;

fn main() -> std::process::ExitCode {
    // llm-d's --configuration / --configuration-file become flags first.
    let argv = match sidecar::configuration::expand(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("pd-sidecar: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let args = match Args::try_parse_from(argv) {
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
            tracing: c.tracing,
            check_config: c.check_config,
        },
        sidecar::server::run,
    )
}
