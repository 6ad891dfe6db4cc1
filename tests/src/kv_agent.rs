//! Real `kv-agent` processes for tests: each over a shared-file pool the
//! test maps too (to write source bytes and check destinations), and the
//! gRPC calls a test makes of them.

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::{free_port, poll_until, Proc};
use transfer::bench::{check_pattern, fill_pattern};
use transfer::grpc::proto::{self, transfer_event::Event};
use transfer::layout::{KvLayout, LayoutParams, ModelShape};
use transfer::HostMemory;

/// Small but vLLM-shaped: 4 layers x K/V = 8 regions, 4 KiB blocks.
pub const MODEL: &str = "layers=4,kv_heads=2,head_dim=64,dtype=bf16";
pub const NUM_BLOCKS: u32 = 64;
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub fn layout() -> KvLayout {
    KvLayout::new(LayoutParams::new(
        ModelShape::parse(MODEL).unwrap(),
        NUM_BLOCKS,
    ))
    .unwrap()
}

pub struct AgentProc {
    pub proc: Proc,
    pub endpoint: String,
    pub port: u16,
    pub shm: PathBuf,
    pub mem: HostMemory,
    /// The pool's layout ([`layout`] unless started with another TP shard).
    pub layout: KvLayout,
}

impl AgentProc {
    pub async fn start(backend: &str, engine: &str) -> AgentProc {
        Self::start_on(backend, engine, free_port(), None, &[]).await
    }

    /// An agent whose pool is TP rank `rank` of `size` of [`MODEL`]: its
    /// share of the KV heads.
    pub async fn start_shard(backend: &str, engine: &str, rank: u32, size: u32) -> AgentProc {
        let (r, s) = (rank.to_string(), size.to_string());
        Self::start_with(
            backend,
            engine,
            free_port(),
            None,
            &["--tp-rank", &r, "--tp-size", &s],
            shard(rank, size),
        )
        .await
    }

    pub async fn start_on(
        backend: &str,
        engine: &str,
        port: u16,
        shm: Option<PathBuf>,
        extra: &[&str],
    ) -> AgentProc {
        Self::start_with(backend, engine, port, shm, extra, layout()).await
    }

    async fn start_with(
        backend: &str,
        engine: &str,
        port: u16,
        shm: Option<PathBuf>,
        extra: &[&str],
        layout: KvLayout,
    ) -> AgentProc {
        let shm = shm.unwrap_or_else(|| {
            std::env::temp_dir().join(format!("tandem-kv-{}", uuid::Uuid::new_v4()))
        });
        let listen = format!("127.0.0.1:{port}");
        let blocks = NUM_BLOCKS.to_string();
        let shm_arg = shm.to_string_lossy().into_owned();
        let mut args = vec![
            "--listen",
            &listen,
            "--engine-id",
            engine,
            "--backend",
            backend,
            "--model",
            MODEL,
            "--num-blocks",
            &blocks,
            "--shm",
            &shm_arg,
        ];
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn("kv-agent", &args, &[("RUST_LOG", "info,transfer=debug")]);
        let endpoint = listen.clone();
        let ep = endpoint.clone();
        poll_until(TIMEOUT, "kv-agent health", || {
            let ep = ep.clone();
            async move { health_of(&ep).await.ok() }
        })
        .await;
        if let Some(status) = proc.exited() {
            panic!("kv-agent exited: {status:?}\n{}", proc.log());
        }
        let mem = HostMemory::shared(&shm, layout.total_bytes() as usize, false).unwrap();
        AgentProc {
            proc,
            endpoint,
            port,
            shm,
            mem,
            layout,
        }
    }

    pub async fn health(&self) -> proto::HealthResponse {
        health_of(&self.endpoint).await.unwrap()
    }

    /// Fills the whole pool with kvbench's pattern: bytes that depend on `seed` and the offset.
    pub fn fill(&self, seed: u64) {
        let mut buf = vec![0u8; self.mem.len()];
        fill_pattern(&mut buf, 0, seed);
        self.mem.write(0, &buf).unwrap();
    }

    /// Asserts that every block outside `except` still holds the pattern
    /// [`Self::fill`] wrote with `seed`.
    pub fn assert_untouched(&self, seed: u64, except: &[u32]) {
        let l = &self.layout;
        for region in 0..l.num_regions() {
            for b in (0..l.num_blocks()).filter(|b| !except.contains(b)) {
                let got = self.block(region, b);
                assert!(
                    check_pattern(&got, l.block_offset(region, b), seed).is_none(),
                    "region {region} block {b} changed but was not part of the transfer"
                );
            }
        }
    }

    pub fn block(&self, region: u32, block: u32) -> Vec<u8> {
        let l = &self.layout;
        let mut out = vec![0u8; l.block_len() as usize];
        self.mem
            .read(l.block_offset(region, block), &mut out)
            .unwrap();
        out
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_file(&self.shm);
    }
}

pub async fn health_of(endpoint: &str) -> Result<proto::HealthResponse, String> {
    let mut c = transfer::grpc::connect(endpoint)
        .await
        .map_err(|e| e.to_string())?;
    c.health(proto::HealthRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|e| e.to_string())
}

pub struct PullArgs<'a> {
    pub local: &'a [u32],
    pub remote: &'a [u32],
    pub plan: proto::Plan,
    pub notify: Option<(&'a str, u32)>,
}

/// Runs a Pull (or Push) on `agent` against `peer`; returns the final event
/// or the error status. Checks that progress ends at the total.
pub async fn transfer(
    agent: &AgentProc,
    peer: &str,
    push: bool,
    a: PullArgs<'_>,
) -> Result<proto::TransferDone, tonic::Status> {
    let mut c = transfer::grpc::connect(&agent.endpoint).await.unwrap();
    let req = proto::TransferRequest {
        request_id: "test-req".into(),
        peer: peer.to_string(),
        local_block_ids: a.local.to_vec(),
        remote_block_ids: a.remote.to_vec(),
        plan: a.plan as i32,
        deadline_ms: 20_000,
        remote_request_id: a.notify.map(|(id, _)| id.to_string()).unwrap_or_default(),
        tp_size: a.notify.map(|(_, tp)| tp).unwrap_or(0),
        remote_instance_id: String::new(),
    };
    let mut stream = if push {
        c.push(req).await?.into_inner()
    } else {
        c.pull(req).await?.into_inner()
    };
    let mut last_progress = None;
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(Event::Progress(p)) => last_progress = Some(p),
            Some(Event::Done(d)) => {
                if d.bytes > 0 {
                    let p = last_progress.expect("progress before done");
                    assert_eq!(p.bytes_done, p.bytes_total);
                    assert_eq!(p.bytes_total, d.bytes);
                }
                return Ok(d);
            }
            None => panic!("empty event"),
        }
    }
    panic!("stream ended without a result")
}

/// [`MODEL`]'s layout on TP rank `rank` of `size`.
pub fn shard(rank: u32, size: u32) -> KvLayout {
    let mut p = LayoutParams::new(ModelShape::parse(MODEL).unwrap(), NUM_BLOCKS);
    (p.tp_rank, p.tp_size) = (rank, size);
    KvLayout::new(p).unwrap()
}

/// A `kvbench serve` process on a free port with `args` after `--listen`, once its control
/// plane answers; the process and its endpoint.
pub async fn kvbench_serve(args: &[&str]) -> (Proc, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut all = vec!["serve", "--listen", &listen];
    all.extend_from_slice(args);
    let mut serve = Proc::spawn("kvbench", &all, &[]);
    let ep = listen.clone();
    poll_until(TIMEOUT, "kvbench serve", || {
        let ep = ep.clone();
        async move { health_of(&ep).await.ok() }
    })
    .await;
    assert!(
        serve.exited().is_none(),
        "kvbench serve exited:\n{}",
        serve.log()
    );
    (serve, listen)
}

/// Runs `kvbench` with `args` off the async runtime; its output.
pub async fn kvbench(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::harness::bin_path("kvbench"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}
