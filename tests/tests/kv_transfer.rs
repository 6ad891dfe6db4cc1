//! KV transfers between two real `kv-agent` processes on loopback, over real
//! NIXL (the wheel's UCX on host memory) and over TCP. Each agent's pool is a
//! shared mapping that the test maps too, so it writes the source bytes and
//! checks the destination byte for byte.

use tandem_tests::harness::{free_port, poll_until};
use tandem_tests::kv_agent::{
    kvbench, kvbench_serve, layout, transfer, AgentProc, PullArgs, MODEL, NUM_BLOCKS, TIMEOUT,
};
use tonic::Code;
use transfer::grpc::proto;
use transfer::HostMemory;

fn assert_moved(dst: &AgentProc, src: &AgentProc, dst_blocks: &[u32], src_blocks: &[u32]) {
    let l = layout();
    for region in 0..l.num_regions() {
        for (d, s) in dst_blocks.iter().zip(src_blocks) {
            assert!(
                dst.block(region, *d) == src.block(region, *s),
                "region {region}: destination block {d} differs from source block {s}"
            );
        }
    }
}

const SRC_BLOCKS: &[u32] = &[3, 4, 5, 6, 20, 21, 40, 7, 63, 0];
const DST_BLOCKS: &[u32] = &[10, 11, 12, 13, 30, 31, 2, 50, 51, 1];

async fn pull_is_byte_exact(backend: &str, plan: proto::Plan) {
    let prefill = AgentProc::start(backend, "prefill").await;
    let decode = AgentProc::start(backend, "decode").await;
    prefill.fill(0xA1);
    decode.fill(0x5C);
    let done = transfer(
        &decode,
        &prefill.endpoint,
        false,
        PullArgs {
            local: DST_BLOCKS,
            remote: SRC_BLOCKS,
            plan,
            notify: None,
        },
    )
    .await
    .unwrap();
    let l = layout();
    assert_eq!(done.bytes, SRC_BLOCKS.len() as u64 * l.bytes_per_block());
    let naive = SRC_BLOCKS.len() as u32 * l.num_regions();
    match plan {
        proto::Plan::Naive => assert_eq!(done.descriptors, naive),
        // Runs 3..=6 -> 10..=13 and 20..=21 -> 30..=31 coalesce. A block
        // list plans coalesced on a backend that cannot run one (host pools).
        proto::Plan::Coalesced | proto::Plan::Blocks => {
            assert!(done.descriptors < naive, "{} descriptors", done.descriptors)
        }
    }
    assert_moved(&decode, &prefill, DST_BLOCKS, SRC_BLOCKS);
    decode.assert_untouched(0x5C, DST_BLOCKS);
    prefill.assert_untouched(0xA1, &[]);
}

async fn push_is_byte_exact(backend: &str) {
    let prefill = AgentProc::start(backend, "prefill").await;
    let decode = AgentProc::start(backend, "decode").await;
    prefill.fill(0x11);
    decode.fill(0x22);
    // The prefill side writes its blocks into the decode's pool.
    transfer(
        &prefill,
        &decode.endpoint,
        true,
        PullArgs {
            local: SRC_BLOCKS,
            remote: DST_BLOCKS,
            plan: proto::Plan::Coalesced,
            notify: None,
        },
    )
    .await
    .unwrap();
    assert_moved(&decode, &prefill, DST_BLOCKS, SRC_BLOCKS);
    decode.assert_untouched(0x22, DST_BLOCKS);
}

#[tokio::test]
async fn nixl_pull_coalesced_between_two_processes_is_byte_exact() {
    pull_is_byte_exact("nixl", proto::Plan::Coalesced).await;
}

#[tokio::test]
async fn nixl_pull_naive_between_two_processes_is_byte_exact() {
    pull_is_byte_exact("nixl", proto::Plan::Naive).await;
}

#[tokio::test]
async fn nixl_push_writes_into_the_peer_byte_exact() {
    push_is_byte_exact("nixl").await;
}

#[tokio::test]
async fn tcp_pull_between_two_processes_is_byte_exact() {
    pull_is_byte_exact("tcp", proto::Plan::Coalesced).await;
    pull_is_byte_exact("tcp", proto::Plan::Naive).await;
    pull_is_byte_exact("tcp", proto::Plan::Blocks).await;
}

#[tokio::test]
async fn tcp_push_writes_into_the_peer_byte_exact() {
    push_is_byte_exact("tcp").await;
}

async fn notification_frees_held_blocks(backend: &str) {
    let prefill = AgentProc::start(backend, "prefill").await;
    let decode = AgentProc::start(backend, "decode").await;
    let mut pc = transfer::grpc::connect(&prefill.endpoint).await.unwrap();
    pc.hold(proto::HoldRequest {
        request_id: "cmpl-1".into(),
        block_ids: SRC_BLOCKS.to_vec(),
        timeout_ms: 0,
    })
    .await
    .unwrap();
    // tp_size 2: the prefill frees the blocks after two notifications.
    pc.hold(proto::HoldRequest {
        request_id: "cmpl-2".into(),
        block_ids: vec![60, 61],
        timeout_ms: 0,
    })
    .await
    .unwrap();
    let h = prefill.health().await;
    assert_eq!(
        (h.held_requests, h.held_blocks),
        (2, SRC_BLOCKS.len() as u32 + 2)
    );

    transfer(
        &decode,
        &prefill.endpoint,
        false,
        PullArgs {
            local: DST_BLOCKS,
            remote: SRC_BLOCKS,
            plan: proto::Plan::Coalesced,
            notify: Some(("cmpl-1", 1)),
        },
    )
    .await
    .unwrap();
    let h = poll_until(TIMEOUT, "cmpl-1 released by notification", || async {
        let h = prefill.health().await;
        (h.released_by_notification == 1).then_some(h)
    })
    .await;
    assert_eq!((h.held_requests, h.held_blocks), (1, 2));

    let mut dc = transfer::grpc::connect(&decode.endpoint).await.unwrap();
    dc.notify(proto::NotifyRequest {
        peer: prefill.endpoint.clone(),
        message: "cmpl-2:2".into(),
    })
    .await
    .unwrap();
    poll_until(TIMEOUT, "first cmpl-2 notification", || async {
        (prefill.health().await.notifications_received == 2).then_some(())
    })
    .await;
    assert_eq!(
        prefill.health().await.held_blocks,
        2,
        "one of two TP notifications must not free the blocks"
    );
    dc.notify(proto::NotifyRequest {
        peer: prefill.endpoint.clone(),
        message: "cmpl-2:2".into(),
    })
    .await
    .unwrap();
    let h = poll_until(TIMEOUT, "cmpl-2 released", || async {
        let h = prefill.health().await;
        (h.released_by_notification == 2).then_some(h)
    })
    .await;
    assert_eq!((h.held_requests, h.held_blocks, h.expired), (0, 0, 0));
}

#[tokio::test]
async fn nixl_notification_frees_held_blocks() {
    notification_frees_held_blocks("nixl").await;
}

#[tokio::test]
async fn tcp_notification_frees_held_blocks() {
    notification_frees_held_blocks("tcp").await;
}

#[tokio::test]
async fn held_blocks_expire_without_a_notification() {
    let prefill = AgentProc::start("tcp", "prefill").await;
    let mut pc = transfer::grpc::connect(&prefill.endpoint).await.unwrap();
    pc.hold(proto::HoldRequest {
        request_id: "short".into(),
        block_ids: vec![1, 2, 3],
        timeout_ms: 200,
    })
    .await
    .unwrap();
    pc.hold(proto::HoldRequest {
        request_id: "long".into(),
        block_ids: vec![4],
        timeout_ms: 600_000,
    })
    .await
    .unwrap();
    let h = poll_until(TIMEOUT, "expiry", || async {
        let h = prefill.health().await;
        (h.expired == 1).then_some(h)
    })
    .await;
    assert_eq!((h.held_requests, h.held_blocks), (1, 1));
    let r = pc
        .release(proto::ReleaseRequest {
            request_id: "long".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.released);
    assert_eq!(r.blocks, 1);
    let r = pc
        .release(proto::ReleaseRequest {
            request_id: "long".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.released, "a second release finds nothing");
    assert_eq!(prefill.health().await.released_by_request, 1);
}

#[tokio::test]
async fn nixl_rehandshakes_after_the_peer_restarts() {
    let mut prefill = AgentProc::start("nixl", "prefill").await;
    let decode = AgentProc::start("nixl", "decode").await;
    prefill.fill(0x33);
    let args = || PullArgs {
        local: &[0, 1, 2],
        remote: &[5, 6, 7],
        plan: proto::Plan::Coalesced,
        notify: None,
    };
    transfer(&decode, &prefill.endpoint, false, args())
        .await
        .unwrap();
    assert_moved(&decode, &prefill, &[0, 1, 2], &[5, 6, 7]);
    let first = prefill.health().await.instance_id;

    // Restart the prefill agent on the same port with a new pool and new bytes.
    let port = prefill.port;
    prefill.proc.kill();
    let prefill2 = AgentProc::start_on("nixl", "prefill", port, None, &[]).await;
    prefill2.fill(0x44);
    assert_ne!(prefill2.health().await.instance_id, first);

    let done = transfer(&decode, &prefill2.endpoint, false, args())
        .await
        .unwrap();
    assert_moved(&decode, &prefill2, &[0, 1, 2], &[5, 6, 7]);
    assert!(done.rehandshake, "the second pull must have re-handshaken");
    assert_eq!(decode.health().await.handshakes, 2);
}

#[tokio::test]
async fn out_of_range_and_mismatched_block_ids_are_clear_errors() {
    let prefill = AgentProc::start("tcp", "prefill").await;
    let decode = AgentProc::start("tcp", "decode").await;
    let err = transfer(
        &decode,
        &prefill.endpoint,
        false,
        PullArgs {
            local: &[1],
            remote: &[NUM_BLOCKS],
            plan: proto::Plan::Coalesced,
            notify: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains(&NUM_BLOCKS.to_string()) && err.message().contains("remote"),
        "{}",
        err.message()
    );

    let err = transfer(
        &decode,
        &prefill.endpoint,
        false,
        PullArgs {
            local: &[1, 2],
            remote: &[3],
            plan: proto::Plan::Naive,
            notify: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let mut pc = transfer::grpc::connect(&prefill.endpoint).await.unwrap();
    let err = pc
        .hold(proto::HoldRequest {
            request_id: "x".into(),
            block_ids: vec![NUM_BLOCKS + 5],
            timeout_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("out of range"), "{}", err.message());
}

#[tokio::test]
async fn unknown_peers_are_clear_errors() {
    let decode = AgentProc::start("tcp", "decode").await;
    let dead = format!("127.0.0.1:{}", free_port());
    let err = transfer(
        &decode,
        &dead,
        false,
        PullArgs {
            local: &[1],
            remote: &[1],
            plan: proto::Plan::Coalesced,
            notify: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&dead), "{}", err.message());
    let mut dc = transfer::grpc::connect(&decode.endpoint).await.unwrap();
    let err = dc
        .notify(proto::NotifyRequest {
            peer: dead.clone(),
            message: "r:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
}

#[tokio::test]
async fn a_peer_with_another_backend_is_refused() {
    let prefill = AgentProc::start("tcp", "prefill").await;
    let decode = AgentProc::start("nixl", "decode").await;
    let err = transfer(
        &decode,
        &prefill.endpoint,
        false,
        PullArgs {
            local: &[1],
            remote: &[1],
            plan: proto::Plan::Naive,
            notify: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("tcp backend"), "{}", err.message());
}

#[test]
fn bad_metadata_is_rejected_with_a_reason() {
    let md = proto::AgentMetadata {
        agent_name: "p".into(),
        engine_id: "p".into(),
        instance_id: "i".into(),
        backend: "nixl".into(),
        layout: None,
        backend_metadata: vec![1, 2, 3],
        offers: vec![],
        separate_regions: false,
    };
    let err = transfer::PeerMetadata::try_from(md.clone()).unwrap_err();
    assert!(err.to_string().contains("layout missing"), "{err}");
    let mut lied = md.clone();
    let l = layout();
    let mut summary = proto::Layout::from(&l);
    summary.num_blocks += 1;
    lied.layout = Some(summary);
    let err = transfer::PeerMetadata::try_from(lied).unwrap_err();
    assert!(err.to_string().contains("contradicts"), "{err}");
    let mut unknown = md;
    unknown.layout = Some(proto::Layout::from(&l));
    unknown.backend = "carrier-pigeon".into();
    let err = transfer::PeerMetadata::try_from(unknown).unwrap_err();
    assert!(err.to_string().contains("carrier-pigeon"), "{err}");
}

#[tokio::test]
async fn garbage_backend_metadata_is_rejected_by_the_agent() {
    // A real agent in this process (TCP: no NIXL in the test process) given a
    // peer whose backend blob is garbage.
    let mem = std::sync::Arc::new(transfer::KvMemory::from(
        HostMemory::anonymous(layout().total_bytes() as usize).unwrap(),
    ));
    let agent = transfer::Agent::start(
        transfer::AgentConfig::new("t", layout(), transfer::BackendKind::Tcp),
        mem,
    )
    .await
    .unwrap();
    let mut md = agent.metadata().unwrap();
    md.agent_name = "other".into();
    md.offers = vec![(
        transfer::BackendKind::Tcp,
        b"definitely not metadata".to_vec(),
    )];
    let err = agent.handshake("127.0.0.1:1", md).await.unwrap_err();
    assert!(
        matches!(err, transfer::TransferError::BadMetadata(_)),
        "{err}"
    );
    assert!(err.to_string().contains("magic"), "{err}");
}

#[test]
fn a_missing_nixl_library_is_a_clear_setup_error() {
    let empty = std::env::temp_dir().join(format!("tandem-no-nixl-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&empty).unwrap();
    let shm = empty.join("pool");
    let shm = shm.to_string_lossy().into_owned();
    // `auto` over a shared host pool offers cuda-ipc too, but a host pool
    // without NIXL could move nothing: it must fail the same way.
    for backend in ["nixl", "auto"] {
        let out = std::process::Command::new(tandem_tests::harness::bin_path("kv-agent"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--backend",
                backend,
                "--model",
                MODEL,
                "--num-blocks",
                "4",
                "--shm",
                &shm,
                "--shm-unlink",
            ])
            .env("TANDEM_NIXL_LIB_DIR", &empty)
            .env("TANDEM_CUDA_IPC_DIR", &empty)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{backend}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("libnixl_capi.so not found") && stderr.contains("make setup"),
            "{backend}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&empty);
}

/// Runs `cmd`, asserts it exited 0 (showing both streams if not) and returns its stdout.
fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn kvbench_report(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn kvbench_runs_every_case_verified_and_writes_json_and_png() {
    let dir = std::env::temp_dir().join(format!("tandem-kvbench-{}", uuid::Uuid::new_v4()));
    let json = dir.join("kv.json");
    let png = dir.join("kv.png");
    let stdout = run_ok(
        std::process::Command::new(tandem_tests::harness::bin_path("kvbench"))
            .args([
                "run",
                "--backend",
                "nixl,tcp",
                "--model",
                MODEL,
                "--num-blocks",
                "64",
                "--tokens",
                "512",
            ])
            .args([
                "--op",
                "read,write",
                "--reps",
                "2",
                "--warmup",
                "1",
                "--runs",
                "uniform:2-4",
            ])
            .arg("--json")
            .arg(&json)
            .arg("--png")
            .arg(&png),
    );
    assert!(stdout.contains("host memcpy ceiling"), "{stdout}");
    let report = kvbench_report(&json);
    let results = report["results"].as_array().unwrap();
    // 2 backends x 2 ops x 3 placements x 2 plans.
    assert_eq!(results.len(), 24);
    for r in results {
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["bytes"], 32 * layout().bytes_per_block(), "{r}");
        assert!(r["gbps_p50"].as_f64().unwrap() > 0.0, "{r}");
        let descs = r["descriptors"].as_u64().unwrap();
        match (
            r["plan"].as_str().unwrap(),
            r["placement"].as_str().unwrap(),
        ) {
            ("naive", _) => assert_eq!(descs, 32 * 8),
            ("coalesced", "contiguous") => assert_eq!(descs, 8, "one descriptor per region"),
            ("coalesced", _) => assert!(descs <= 32 * 8),
            other => panic!("unexpected case {other:?}"),
        }
    }
    let png_bytes = std::fs::read(&png).unwrap();
    assert_eq!(&png_bytes[1..4], b"PNG");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kvbench_with_one_allocation_per_region_verifies_over_tcp_and_nixl() {
    // Each side's pool is lent memory, one mapping per region (an engine's
    // per-layer tensors): NIXL registers each region and sends its table,
    // TCP checks ranges against it, and no plan merges across regions.
    let dir = std::env::temp_dir().join(format!("tandem-kvbench-{}", uuid::Uuid::new_v4()));
    let json = dir.join("kv.json");
    let stdout = run_ok(
        std::process::Command::new(tandem_tests::harness::bin_path("kvbench"))
            .args(["run", "--backend", "nixl,tcp", "--region-alloc", "separate"])
            .args(["--model", MODEL, "--num-blocks", "64"])
            // The whole pool, contiguous on both sides: one allocation would be one descriptor.
            .args(["--tokens", "1024", "--placement", "contiguous,fragmented"])
            .args(["--op", "read,write", "--reps", "2", "--warmup", "1"])
            .args(["--png", "none", "--json"])
            .arg(&json),
    );
    assert!(stdout.contains("one allocation per region"), "{stdout}");
    let report = kvbench_report(&json);
    assert_eq!(report["region_alloc"], "separate");
    let results = report["results"].as_array().unwrap();
    // 2 backends x 2 ops x 2 placements x 2 plans.
    assert_eq!(results.len(), 16);
    let regions = layout().num_regions() as u64;
    for r in results {
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["bytes"], 64 * layout().bytes_per_block(), "{r}");
        let descs = r["descriptors"].as_u64().unwrap();
        match (
            r["plan"].as_str().unwrap(),
            r["placement"].as_str().unwrap(),
        ) {
            ("naive", _) => assert_eq!(descs, 64 * regions),
            ("coalesced", "contiguous") => {
                assert_eq!(descs, regions, "one per region, never merged across: {r}")
            }
            ("coalesced", _) => assert!(descs >= regions && descs <= 64 * regions),
            other => panic!("unexpected case {other:?}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn kvbench_run_against_a_serve_process_verifies_the_peers_bytes() {
    let (mut serve, listen) = kvbench_serve(&[
        "--backend",
        "nixl",
        "--model",
        MODEL,
        "--num-blocks",
        "48",
        "--seed",
        "9",
    ])
    .await;
    let dir = std::env::temp_dir().join(format!("tandem-kvbench-{}", uuid::Uuid::new_v4()));
    let json = dir.join("kv.json");
    let run = |seed: &str, reps: &str| {
        let mut args: Vec<String> = [
            "run",
            "--peer",
            &listen,
            "--peer-seed",
            seed,
            "--model",
            MODEL,
            "--num-blocks",
            "64",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(
            [
                "--tokens",
                "256",
                "--reps",
                reps,
                "--warmup",
                "0",
                "--png",
                "none",
                "--placement",
                "random",
                "--json",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args.push(json.to_string_lossy().into_owned());
        kvbench(args)
    };
    let out = run("9", "2").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = kvbench_report(&json);
    assert_eq!(report["peer"], listen.as_str());
    assert!(report["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["verified"] == true));
    // With the wrong seed the bytes cannot match: the check must notice.
    let out = run("10", "1").await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("verification failed") && stderr.contains("--peer-seed"),
        "{stderr}"
    );
    serve.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn auto_on_a_host_without_gpus_offers_cuda_ipc_and_moves_bytes_over_nixl() {
    // Both agents run `auto` with shared host pools: each offers cuda-ipc
    // (same host, a shared file) first and NIXL second. Without a GPU on
    // either side cuda-ipc cannot run the copy, so the handshake falls
    // through to NIXL, and the bytes still arrive.
    let prefill = AgentProc::start("auto", "prefill").await;
    let decode = AgentProc::start("auto", "decode").await;
    let md = transfer::grpc::fetch_metadata(&prefill.endpoint)
        .await
        .unwrap();
    let offered: Vec<_> = md.offers.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        offered,
        vec![transfer::BackendKind::CudaIpc, transfer::BackendKind::Nixl]
    );
    prefill.fill(0x31);
    decode.fill(0x32);
    let done = transfer(
        &decode,
        &prefill.endpoint,
        false,
        PullArgs {
            local: DST_BLOCKS,
            remote: SRC_BLOCKS,
            plan: proto::Plan::Coalesced,
            notify: Some(("auto-req", 1)),
        },
    )
    .await
    .unwrap();
    assert_eq!(done.backend, "nixl");
    assert_eq!(done.device_us, 0);
    assert_moved(&decode, &prefill, DST_BLOCKS, SRC_BLOCKS);
    // A pull pinned to cuda-ipc has no data plane in common with a NIXL-only peer.
    let nixl_only = AgentProc::start("nixl", "prefill2").await;
    let ipc = AgentProc::start("cuda-ipc", "decode2").await;
    let err = transfer(
        &ipc,
        &nixl_only.endpoint,
        false,
        PullArgs {
            local: &[1],
            remote: &[1],
            plan: proto::Plan::Coalesced,
            notify: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("nixl backend") && err.message().contains("cuda-ipc"),
        "{}",
        err.message()
    );
}

#[test]
fn asking_for_gpu_memory_without_a_driver_is_exit_2_with_the_reason() {
    if transfer::gpu::driver_present() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    let dir = std::env::temp_dir().join(format!("tandem-nogpu-{}", uuid::Uuid::new_v4()));
    for (bin, args) in [
        (
            "kvbench",
            vec![
                "run",
                "--mem",
                "gpu:0",
                "--model",
                MODEL,
                "--num-blocks",
                "8",
                "--tokens",
                "16",
            ],
        ),
        (
            "kv-agent",
            vec![
                "--listen",
                "127.0.0.1:0",
                "--mem",
                "gpu:0",
                "--model",
                MODEL,
                "--num-blocks",
                "8",
            ],
        ),
        ("engine-sim", vec!["--kv-mem", "gpu:0", "--port", "0"]),
    ] {
        let out = std::process::Command::new(tandem_tests::harness::bin_path(bin))
            .args(&args)
            .env("TMPDIR", &dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bin}: {stderr}");
        assert!(
            stderr.contains("gpu:0") && stderr.contains("no CUDA driver"),
            "{bin}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{bin}: {stderr}");
    }
}
