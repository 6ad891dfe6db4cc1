//! The C ABI from C: `tests/c/kv_pair.c` is compiled here with the system
//! compiler against `include/tandem_kv.h` and linked to the built
//! `libtandem_kv.so`; one process serves a pool, another pulls from it over
//! TCP and over NIXL, and every byte is checked by the C program.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

/// `libtandem_kv.so` next to this test's `deps/` folder (`make build` / `cargo build -p ffi`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    assert!(
        dir.join("libtandem_kv.so").is_file(),
        "{} has no libtandem_kv.so: build it first (`cargo build -p ffi`, or `make build`)",
        dir.display()
    );
    dir
}

/// The C program, compiled once per test run.
fn program() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let lib = lib_dir();
        let out = std::env::temp_dir().join(format!("tandem-kv-pair-{}", std::process::id()));
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let status = Command::new(&cc)
            .args([
                "-std=c11",
                "-D_POSIX_C_SOURCE=200809L",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-O1",
            ])
            .arg("-I")
            .arg(crate_dir.join("include"))
            .arg(crate_dir.join("tests/c/kv_pair.c"))
            .arg("-L")
            .arg(&lib)
            .arg("-ltandem_kv")
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .arg("-o")
            .arg(&out)
            .status()
            .unwrap_or_else(|e| panic!("running {cc}: {e}"));
        assert!(status.success(), "compiling kv_pair.c failed");
        out
    })
}

struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let mut child = Command::new(program())
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting kv_pair");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Running { child, lines }
    }

    fn line(&self, what: &str) -> String {
        self.lines
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("no {what} from kv_pair within {DEADLINE:?}"))
    }

    /// Waits for the exit, polling with a deadline.
    fn exit_ok(mut self, what: &str) {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{what} exited with {status}");
                return;
            }
            if start.elapsed() > DEADLINE {
                let _ = self.child.kill();
                panic!("{what} did not exit within {DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pair(backend: &str) {
    let server = Running::start(&["serve", backend]);
    let endpoint = server.line("endpoint");
    let endpoint = endpoint
        .strip_prefix("endpoint ")
        .unwrap_or_else(|| panic!("serve printed {endpoint:?}"))
        .to_string();
    let puller = Running::start(&["pull", backend, &endpoint]);
    assert_eq!(puller.line("pull result"), "pulled 3072");
    puller.exit_ok("pull");
    assert_eq!(server.line("release"), "released 4");
    server.exit_ok("serve");
}

#[test]
fn c_processes_move_blocks_between_separately_allocated_regions_over_tcp() {
    pair("tcp");
}

#[test]
fn c_processes_move_blocks_between_separately_allocated_regions_over_nixl() {
    pair("nixl");
}

#[test]
fn c_sees_argument_and_state_errors_as_statuses() {
    let run = Running::start(&["errors"]);
    assert_eq!(run.line("errors result"), "errors ok");
    run.exit_ok("errors");
}
