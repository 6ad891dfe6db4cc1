//! The short soak inside `make test`: `soak` for 15 s at concurrency 16 with prefill 5xx,
//! prefill hangs past the sidecar's timeout and clients leaving mid-stream (engine restarts
//! are left to `make soak`, which runs minutes). Every check the binary makes must hold.

#[test]
fn a_short_soak_serves_everything_and_leaks_nothing() {
    let dir = std::env::temp_dir().join(format!("tandem-soak-{}", uuid::Uuid::new_v4()));
    let json = dir.join("soak.json");
    let out = std::process::Command::new(tandem_tests::harness::bin_path("soak"))
        .args(["--duration", "15", "--concurrency", "16", "--no-restarts"])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "soak failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["ok"], true, "{stdout}");
    assert!(report["requests"].as_u64().unwrap() >= 200, "{stdout}");
    assert!(report["client_left"].as_u64().unwrap() > 0, "{stdout}");
    assert!(
        report["fallbacks"].as_u64().unwrap() > 0,
        "no fault was injected:\n{stdout}"
    );
    assert_eq!(report["held_blocks_at_end"], 0);
    let _ = std::fs::remove_dir_all(&dir);
}
