//! Process start-up shared by `pd-sidecar` and `pd-router`: the validated
//! configuration in, logging, the open-files limit and the runtime set up, the
//! server run to completion, an exit code out. Each binary's `main` only parses
//! its flags and names its server.

use std::fmt::Debug;
use std::future::Future;
use std::process::ExitCode;

/// The start-up settings both configurations carry.
pub struct Launch {
    pub log_filter: String,
    pub log_json: bool,
    /// Runtime worker threads; 0 = one per CPU.
    pub worker_threads: usize,
    /// Export OpenTelemetry traces (`telemetry.rs`).
    pub tracing: bool,
    /// Only print the validated configuration and exit.
    pub check_config: bool,
}

/// Starts binary `name`'s server from its parsed configuration (`Err` is a
/// message for exit 2); `launch` reads the start-up settings from it.
pub fn main<C, F, Fut>(
    name: &str,
    cfg: Result<C, String>,
    launch: impl FnOnce(&C) -> Launch,
    run: F,
) -> ExitCode
where
    C: Debug,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let cfg = match cfg {
        Ok(cfg) => cfg,
        Err(msg) => {
            eprintln!("{name}: error: {msg}");
            return ExitCode::from(2);
        }
    };
    let launch = launch(&cfg);
    if launch.check_config {
        // Validated without binding anything: print what a real start would run with.
        println!("{cfg:#?}");
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&launch.log_filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_logs())
        .with_writer(std::io::stderr);
    if launch.log_json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    tracing::debug!(config = ?cfg, "effective configuration");
    raise_open_files_limit();

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if launch.worker_threads > 0 {
        builder.worker_threads(launch.worker_threads);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = if launch.tracing {
        match runtime.block_on(async { crate::telemetry::init(name) }) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("{name}: error: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let result = runtime.block_on(run(cfg));
    if let Some(t) = telemetry {
        // The exporter's gRPC channel runs on the runtime: flush from a blocking thread.
        let _ = runtime.block_on(tokio::task::spawn_blocking(move || t.shutdown()));
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("{name}: error: {e:#}");
            ExitCode::FAILURE
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

/// Colour only for a person at a terminal: log files and collectors get no
/// escape codes. `NO_COLOR` (no-color.org) turns it off there too.
pub fn colour_logs() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}
