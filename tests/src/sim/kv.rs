//! The simulator's paged KV memory and its transfer agent (the `transfer` crate, linked as a
//! library). Owns the pool (host or GPU memory, `--kv-mem`), what the bytes of a block are, the pull a decode-role request
//! makes, and the check that every pulled byte is right. Block ids and holds stay in `blocks`.
//!
//! The bytes of block `k` of a request are a function of the token prefix up to the end of that
//! block (a hash chain over the blocks' tokens), the region (layer, K or V) and the position in
//! the block, so a decode engine that has the same prompt knows what it must have received.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use transfer::agent::ReleaseReason;
use transfer::bench::{check_pattern, fill_pattern};
use transfer::layout::{KvLayout, LayoutParams, ModelShape};
use transfer::{Agent, AgentConfig, Op, PlanKind, TransferError, TransferSpec};

use super::blocks::{BlockId, BlockPool};
use super::config::Config;
use super::pd::{host_port, DecodeParams};

/// Counters for `/metrics` and `/sim/state`.
#[derive(Debug, Default)]
pub struct KvStats {
    pub pulls_ok: AtomicU64,
    pub pulls_failed: AtomicU64,
    pub bytes_pulled: AtomicU64,
    pub pull_micros: AtomicU64,
    pub integrity_failures: AtomicU64,
    pub blocks_written: AtomicU64,
}

pub struct Kv {
    pub agent: Arc<Agent>,
    /// Where peers reach the agent: what a prefill returns as `remote_host`/`remote_port`.
    pub host: String,
    pub port: u16,
    layout: KvLayout,
    corrupt: bool,
    pull_timeout: Duration,
    pub stats: KvStats,
}

/// The chain hashes of a prompt's blocks (the last one may be partial).
pub fn block_hashes(tokens: &[u32], block_size: u64) -> Vec<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    tokens
        .chunks(block_size.max(1) as usize)
        .map(|block| {
            for &t in block {
                h ^= t as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            // The block length too: a partial block differs from a full one.
            h ^= block.len() as u64;
            h = h.rotate_left(17).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            h
        })
        .collect()
}

fn region_seed(block_hash: u64, region: u32) -> u64 {
    block_hash ^ (region as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

impl Kv {
    /// Allocates the pool, starts the agent and its gRPC control plane on `cfg.host:cfg.kv_port`,
    /// and frees `pool` holds when a decode's notification arrives.
    pub async fn start(
        cfg: &Config,
        engine_id: &str,
        pool: Arc<BlockPool>,
    ) -> anyhow::Result<Arc<Kv>> {
        let shape = ModelShape::parse(&cfg.kv_model).context("--kv-model")?;
        let mut params = LayoutParams::new(shape, cfg.num_blocks);
        params.block_size = u32::try_from(cfg.block_size).context("--block-size")?;
        params.mem = cfg.kv_mem;
        let layout = KvLayout::new(params).context("KV layout")?;
        // No GPU where --kv-mem gpu:N asks for one: exit 2 with the reason.
        let mem = transfer::cli::allocate_or_exit(
            "engine-sim",
            &layout,
            None,
            transfer::gpu::GpuShare::from_env(),
        )?;
        let mut acfg = AgentConfig::new(engine_id, layout.clone(), cfg.kv_backend);
        acfg.hold_timeout = Duration::from_secs_f64(cfg.hold_timeout_s.max(0.001));
        acfg.transfer_timeout = Duration::from_millis(cfg.kv_pull_timeout_ms);
        acfg.tcp_bind = SocketAddr::new(cfg.host.parse().unwrap_or([127, 0, 0, 1].into()), 0);
        let agent = Agent::start(acfg, Arc::new(mem))
            .await
            .context("starting the KV-transfer agent")?;
        let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.kv_port))
            .await
            .with_context(|| format!("binding the KV agent port {}:{}", cfg.host, cfg.kv_port))?;
        let port = listener.local_addr()?.port();
        let served = Arc::clone(&agent);
        tokio::spawn(async move {
            if let Err(e) = transfer::grpc::serve(served, listener, std::future::pending()).await {
                tracing::error!(error = %e, "KV agent control plane stopped");
            }
        });
        let mut releases = agent.subscribe_releases();
        tokio::spawn(async move {
            loop {
                match releases.recv().await {
                    // Expiry is the pool's own business (same timeout); a notification or an
                    // explicit release frees the hold now.
                    Ok(r) if r.reason != ReleaseReason::Expired => {
                        if let Some(n) = pool.release(&r.request_id) {
                            tracing::info!(remote_request_id = %r.request_id, blocks = n, "held blocks released by the decode engine");
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "release notifications lagged");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        tracing::info!(port, backend = %cfg.kv_backend, %layout, "KV agent ready");
        Ok(Arc::new(Kv {
            agent,
            host: cfg.host.clone(),
            port,
            layout,
            corrupt: cfg.corrupt_kv,
            pull_timeout: Duration::from_millis(cfg.kv_pull_timeout_ms),
            stats: KvStats::default(),
        }))
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Computes the KV of blocks whose chain hashes are `hashes` into `blocks` (what prefill
    /// does).
    pub fn write(&self, hashes: &[u64], blocks: &[BlockId]) {
        let mem = self.agent.memory();
        let mut buf = vec![0u8; self.layout.block_len() as usize];
        for (&block, &hash) in blocks.iter().zip(hashes) {
            for region in 0..self.layout.num_regions() {
                let off = self.layout.block_offset(region, block);
                fill_pattern(&mut buf, 0, region_seed(hash, region));
                if self.corrupt && region == 0 {
                    let mid = buf.len() / 2;
                    buf[mid] ^= 0x5A;
                }
                // The running request owns this block; nobody else touches it now.
                if let Err(e) = mem.write(off, &buf) {
                    tracing::error!(block, error = %e, "writing KV failed");
                }
            }
        }
        self.stats
            .blocks_written
            .fetch_add(blocks.len() as u64, Relaxed);
    }

    /// Checks that `blocks[from..]` hold the KV of the blocks with chain hashes `hashes[from..]`,
    /// byte for byte (the first `from` are this engine's own cached blocks, not pulled).
    pub fn verify(&self, hashes: &[u64], blocks: &[BlockId], from: usize) -> Result<(), String> {
        let mem = self.agent.memory();
        let mut buf = vec![0u8; self.layout.block_len() as usize];
        for (i, (&block, &hash)) in blocks.iter().zip(hashes).enumerate().skip(from) {
            for region in 0..self.layout.num_regions() {
                let off = self.layout.block_offset(region, block);
                // The pull into these blocks has completed.
                mem.read(off, &mut buf)
                    .map_err(|e| format!("reading block {block}: {e}"))?;
                if let Some(at) = check_pattern(&buf, 0, region_seed(hash, region)) {
                    self.stats.integrity_failures.fetch_add(1, Relaxed);
                    return Err(format!(
                        "KV integrity check failed: prompt block {i} (local block {block}), {} byte {at} does not hold this prompt's KV",
                        self.layout.region_name(region)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Pulls the prefill's blocks from index `skip` on into `local` (the first `skip` are in
    /// this engine's prefix cache already) and notifies the prefill engine
    /// (`"<remote_request_id>:<tp_size>"`) so it frees them.
    pub async fn pull(
        &self,
        p: &DecodeParams,
        local: &[BlockId],
        skip: usize,
    ) -> Result<transfer::agent::TransferDone, TransferError> {
        let remote = p
            .block_ids
            .iter()
            .skip(skip)
            .map(|&b| {
                u32::try_from(b).map_err(|_| {
                    TransferError::BadRequest(format!("remote block id {b} is too large"))
                })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let spec_peer = host_port(&p.remote_host, p.remote_port);
        let spec = TransferSpec {
            request_id: p.remote_request_id.clone(),
            peer: spec_peer.clone(),
            op: Op::Read,
            local_blocks: local[skip.min(local.len())..].to_vec(),
            remote_blocks: remote,
            plan: PlanKind::Blocks,
            timeout: Some(self.pull_timeout),
            notify: Some((
                p.remote_request_id.clone(),
                p.tp_size.clamp(1, u32::MAX as u64) as u32,
            )),
            remote_instance_id: None,
        };
        match self.agent.transfer(spec, |_| {}).await {
            Ok(done) => {
                self.stats.pulls_ok.fetch_add(1, Relaxed);
                self.stats.bytes_pulled.fetch_add(done.bytes, Relaxed);
                self.stats
                    .pull_micros
                    .fetch_add(done.elapsed.as_micros() as u64, Relaxed);
                Ok(done)
            }
            Err(e) => {
                self.stats.pulls_failed.fetch_add(1, Relaxed);
                // This engine prefills locally instead: tell the prefill engine now, so it frees
                // the blocks instead of holding them until they expire.
                // In the background: a dead peer must not delay the local prefill.
                let message = format!("{}:{}", p.remote_request_id, p.tp_size.max(1));
                let agent = Arc::clone(&self.agent);
                tokio::spawn(async move {
                    if let Err(n) = agent.notify(&spec_peer, &message).await {
                        tracing::debug!(error = %n, "could not notify the prefill engine after a failed pull");
                    }
                });
                Err(e)
            }
        }
    }

    /// Holds a prefill's blocks in the agent until the decode's notification (or expiry).
    pub fn hold(&self, request_id: &str, blocks: &[BlockId], ttl: Duration) {
        if let Err(e) = self.agent.hold(request_id, blocks.to_vec(), Some(ttl)) {
            tracing::error!(error = %e, request_id, "could not hold blocks in the KV agent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_hashes_chain_the_prefix() {
        let a = block_hashes(&[1, 2, 3, 4, 5, 6], 2);
        let b = block_hashes(&[1, 2, 3, 4, 9, 6], 2);
        let c = block_hashes(&[1, 2, 3, 4, 5], 2);
        assert_eq!(a.len(), 3);
        assert_eq!(a[..2], b[..2], "same prefix, same blocks");
        assert_ne!(a[2], b[2]);
        assert_eq!(a[..2], c[..2]);
        assert_ne!(a[2], c[2], "a partial block differs from a full one");
        let d = block_hashes(&[9, 2, 3, 4], 2);
        assert_ne!(a[1], d[1], "a block's hash depends on everything before it");
    }
}
