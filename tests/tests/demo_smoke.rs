//! `pd-demo --quick` end to end: four clusters (engine-sim, pd-sidecar, pd-router) come up one
//! after another, the small workload runs through each, and the demo writes its JSON and chart.
//! The numbers are not asserted (they are the demo's output); what it promises is: every request
//! answered, every KV byte verified, no KV left held, and the modes doing what they say (the
//! precise mode's router index fed by the engines' KV events).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_tests::harness::{bin_path, POLL_INTERVAL};

const DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn quick_demo_runs_all_four_modes_and_writes_its_files() {
    let out = std::env::temp_dir().join(format!("pd-demo-{}", uuid::Uuid::new_v4().simple()));
    let mut child = Command::new(bin_path("pd-demo"))
        // The decode engines' pools named on their own (here where the others are too: the
        // flag the two-GPU run uses to put them on another GPU).
        .args([
            "--quick",
            "--users",
            "4",
            "--decode-kv-mem",
            "host",
            "--out-dir",
        ])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pd-demo");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for pd-demo") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("pd-demo --quick did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    let output = child.wait_with_output().expect("pd-demo output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        status.success(),
        "pd-demo failed ({status}):\n{stdout}\n{stderr}"
    );

    // The table names every mode and the columns a reader needs.
    for word in [
        "aggregated",
        "pd-always",
        "pd-selective",
        "pd-selective-precise",
        "Precise vs approximate pd-selective",
        "TTFT p50",
        "ITL p50",
        "out tok/s",
        "KV moved",
        "cached tok",
        "xfer GB/s",
    ] {
        assert!(stdout.contains(word), "{word:?} missing from:\n{stdout}");
    }

    let doc: Value =
        serde_json::from_slice(&std::fs::read(out.join("demo.json")).unwrap()).unwrap();
    assert_eq!(doc["passed"], true, "{doc:#}");
    let modes = doc["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "aggregated",
            "pd-always",
            "pd-selective",
            "pd-selective-precise"
        ]
    );
    assert_eq!(doc["decode_kv_mem"], "host");
    for c in doc["clusters"].as_array().unwrap() {
        assert_eq!(
            c["cluster"]["decode_engine_args"],
            serde_json::json!(["--kv-mem=host"]),
            "{c:#}"
        );
    }
    let requests = doc["workload"]["requests"].as_u64().unwrap();
    for m in modes {
        assert_eq!(m["ok"].as_u64(), Some(requests), "{m:#}");
        assert_eq!(m["kv"]["integrity_failures"], 0, "{m:#}");
        assert_eq!(m["kv"]["blocks_held_after"], 0, "{m:#}");
        assert!(m["ttft"]["p50_ms"].as_f64().unwrap() > 0.0, "{m:#}");
        assert!(m["output_tokens_per_s"].as_f64().unwrap() > 0.0, "{m:#}");
    }
    let kv = |i: usize| modes[i]["kv"]["bytes_moved"].as_u64().unwrap();
    assert_eq!(kv(0), 0, "aggregated moves no KV");
    assert!(kv(1) > 0, "pd-always moves KV");
    assert!(kv(2) < kv(1), "selective moves less KV than always");
    assert_eq!(
        modes[1]["router"]["remote_prefill"].as_u64(),
        Some(requests)
    );
    // The precise mode's router index was fed by the engines' KV events (and only its).
    let precise = &modes[3];
    let index = &precise["precise_index"];
    assert!(
        index["block_stored_events"].as_u64().unwrap() > 0,
        "{precise:#}"
    );
    assert!(index["index_blocks"].as_u64().unwrap() > 0, "{precise:#}");
    assert!(modes[..3].iter().all(|m| m["precise_index"].is_null()));
    let endpoints =
        std::fs::read_to_string(out.join("endpoints-pd-selective-precise.yaml")).unwrap();
    assert_eq!(
        endpoints.matches("kvEventsUrl: tcp://").count(),
        4,
        "{endpoints}"
    );
    // Every engine ran with byte tokens, so the modes stay comparable.
    assert!(doc["engine_args"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "--byte-tokens"));

    let png = std::fs::read(out.join("demo.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    for m in [
        "aggregated",
        "pd-always",
        "pd-selective",
        "pd-selective-precise",
    ] {
        let cfg = std::fs::read_to_string(out.join(format!("router-{m}.yaml"))).unwrap();
        assert!(cfg.contains("kind: EndpointPickerConfig"), "{cfg}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
