//! Checking what a transfer moved, byte for byte, against the pattern the
//! source pool was filled with.

use std::time::Duration;

use anyhow::{bail, Context};
use transfer::backend::Op;
use transfer::bench::check_pattern;
use transfer::layout::KvLayout;
use transfer::plan::PlanKind;
use transfer::{Agent, KvMemory, TransferSpec};

use crate::LOCAL_SEED;

/// A WRITE into another process's pool is checked by reading it back: our
/// source blocks are cleared, the peer's blocks read back into them, and
/// every byte must be our pattern again (which checks a READ too).
#[allow(clippy::too_many_arguments)]
pub async fn verify_write_by_readback(
    agent: &Agent,
    endpoint: &str,
    layout: &KvLayout,
    local_mem: &KvMemory,
    local: &[u32],
    remote: &[u32],
    plan: PlanKind,
    timeout: f64,
) -> anyhow::Result<bool> {
    let zero = vec![0u8; layout.block_len() as usize];
    for region in 0..layout.num_regions() {
        for &b in local {
            local_mem.write(layout.block_offset(region, b), &zero)?;
        }
    }
    let spec = TransferSpec {
        request_id: "kvbench-readback".into(),
        peer: endpoint.to_string(),
        op: Op::Read,
        local_blocks: local.to_vec(),
        remote_blocks: remote.to_vec(),
        plan,
        timeout: Some(Duration::from_secs_f64(timeout)),
        notify: None,
        remote_instance_id: None,
    };
    agent
        .transfer(spec, |_| {})
        .await
        .context("reading the written blocks back")?;
    // Our blocks now hold what we wrote: our own pattern at our own offsets.
    verify(
        Op::Read,
        layout,
        layout,
        local_mem,
        None,
        local,
        local,
        LOCAL_SEED,
    )
    .context("after a WRITE and a READ back")
}

/// Checks every destination byte of one transfer, reading the destination
/// pool back (host or GPU) region by region on every core. READ: our blocks
/// must hold the peer's pattern at the remote offsets. WRITE: the peer's
/// blocks must hold ours (only when the peer is in this process).
#[allow(clippy::too_many_arguments)]
pub fn verify(
    op: Op,
    layout: &KvLayout,
    peer_layout: &KvLayout,
    local_mem: &KvMemory,
    peer: Option<&Agent>,
    local: &[u32],
    remote: &[u32],
    peer_seed: u64,
) -> anyhow::Result<bool> {
    let (dst_mem, dst_layout, src_layout, dst_ids, src_ids, seed) = match (op, peer) {
        (Op::Read, _) => (local_mem, layout, peer_layout, local, remote, peer_seed),
        (Op::Write, Some(p)) => (
            p.memory().as_ref(),
            peer_layout,
            layout,
            remote,
            local,
            LOCAL_SEED,
        ),
        (Op::Write, None) => return Ok(false),
    };
    if transfer::plan::shards_differ(dst_layout, src_layout) {
        // Different TP shards: every range of the heads both hold, as planned.
        let plan = transfer::plan::plan_heads(dst_layout, src_layout, dst_ids, src_ids)?;
        for d in &plan.descs {
            let mut got = vec![0u8; d.len as usize];
            dst_mem.read(d.local, &mut got)?;
            if let Some(at) = check_pattern(&got, d.remote, seed) {
                bail!(
                    "verification failed: {op} bytes {}+{} (from the peer's {}) differ at byte {at}",
                    d.local,
                    d.len,
                    d.remote
                );
            }
        }
        return Ok(true);
    }
    let len = layout.block_len() as usize;
    let regions = layout.num_regions();
    let next = std::sync::atomic::AtomicU32::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .min(16);
    std::thread::scope(|s| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    // Reading a GPU pool back block by block costs a driver
                    // call per 32 KiB: when the transfer covers a good part
                    // of a region, read the whole region in one call.
                    let whole = dst_ids.len() * 4 >= dst_layout.num_blocks() as usize;
                    let mut region_buf = vec![0u8; if whole { dst_layout.region_len() as usize } else { 0 }];
                    let mut buf = vec![0u8; len];
                    loop {
                        let region = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if region >= regions {
                            return Ok(());
                        }
                        if whole {
                            dst_mem.read(dst_layout.region_offset(region), &mut region_buf)?;
                        }
                        for (&d, &s) in dst_ids.iter().zip(src_ids) {
                            let got: &[u8] = if whole {
                                let at = (dst_layout.block_offset(region, d)
                                    - dst_layout.region_offset(region))
                                    as usize;
                                &region_buf[at..at + len]
                            } else {
                                dst_mem.read(dst_layout.block_offset(region, d), &mut buf)?;
                                &buf
                            };
                            if let Some(at) =
                                check_pattern(got, src_layout.block_offset(region, s), seed)
                            {
                                bail!(
                                    "verification failed: {op} region {} block {d} (from {s}) differs at byte {at}{}",
                                    layout.region_name(region),
                                    if op == Op::Read { "; does --peer-seed match the peer's --seed?" } else { "" }
                                );
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("verify thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(true)
}
