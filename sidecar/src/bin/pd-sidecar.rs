//! `pd-sidecar`: see the crate docs and the README for flags.

use clap::Parser;
use sidecar::config::{Args, Config};

fn main() -> std::process::ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    let cfg = match Config::from_args(args) {
        Ok(cfg) => cfg,
        Err(msg) => {
            eprintln!("pd-sidecar: error: {msg}");
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
    raise_open_files_limit();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pd-sidecar: error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sidecar::server::run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("pd-sidecar: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Each proxied request holds two sockets; like Go programs, take the hard
/// limit on open files instead of the (often 1024) soft one.
#[cfg(unix)]
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::warn!(
                    soft = limit.rlim_cur,
                    "could not raise the open-files limit"
                );
            }
        }
    }
}

#[cfg(not(unix))]
fn raise_open_files_limit() {}
