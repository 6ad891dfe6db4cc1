//! KV transfers between real `kv-agent` processes whose pools are different
//! TP shards of one model, over real NIXL and over TCP: a decode rank holds
//! only its share of the KV heads, so it must get exactly those heads of
//! each prefill block (HND: one half of every block for a model of two KV
//! heads at TP 2), and a prefill rank read by several decode ranks frees its
//! blocks only after all of them notified it, as vLLM counts.

use tandem_tests::harness::poll_until;
use tandem_tests::kv_agent::{
    kvbench, kvbench_serve, shard, transfer, AgentProc, PullArgs, MODEL, TIMEOUT,
};
use transfer::grpc::proto;

const SRC: &[u32] = &[3, 4, 5, 20, 63, 0];
const DST: &[u32] = &[10, 11, 12, 2, 50, 1];

async fn pull(decode: &AgentProc, prefill: &AgentProc, notify: Option<(&str, u32)>) -> u64 {
    let done = transfer(
        decode,
        &prefill.endpoint,
        false,
        PullArgs {
            local: DST,
            remote: SRC,
            plan: proto::Plan::Coalesced,
            notify,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("pull from {}: {e}", prefill.endpoint));
    done.bytes
}

/// Prefill at TP 1 holds both heads; decode ranks 0 and 1 of TP 2 each read
/// their head, and the prefill frees its held blocks after both notified.
async fn decode_ranks_of_a_larger_tp_read_their_heads(backend: &str) {
    let prefill = AgentProc::start(backend, "prefill").await;
    prefill.fill(0xB7);
    let mut pc = transfer::grpc::connect(&prefill.endpoint).await.unwrap();
    pc.hold(proto::HoldRequest {
        request_id: "cmpl-tp".into(),
        block_ids: SRC.to_vec(),
        timeout_ms: 600_000,
    })
    .await
    .unwrap();
    for rank in 0..2u32 {
        let decode = AgentProc::start_shard(backend, &format!("decode-{rank}"), rank, 2).await;
        decode.fill(0x3C);
        // vLLM's notification names the reader's TP size: 2.
        let bytes = pull(&decode, &prefill, Some(("cmpl-tp", 2))).await;
        assert_eq!(
            bytes,
            SRC.len() as u64 * decode.layout.bytes_per_block(),
            "half of each prefill block"
        );
        for region in 0..decode.layout.num_regions() {
            for (&d, &s) in DST.iter().zip(SRC) {
                let whole = prefill.block(region, s);
                let half = whole.len() / 2;
                let mine = &whole[rank as usize * half..(rank as usize + 1) * half];
                assert!(
                    decode.block(region, d) == mine,
                    "rank {rank} region {region}: block {d} is not head {rank} of block {s}"
                );
            }
        }
        decode.assert_untouched(0x3C, DST);
        let h = poll_until(TIMEOUT, "the notification", || async {
            let h = prefill.health().await;
            (h.notifications_received == u64::from(rank) + 1).then_some(h)
        })
        .await;
        if rank == 0 {
            assert_eq!(
                h.held_requests, 1,
                "one of two readers must not free the blocks"
            );
        }
    }
    poll_until(TIMEOUT, "the blocks freed after both readers", || async {
        let h = prefill.health().await;
        (h.released_by_notification == 1 && h.held_requests == 0).then_some(())
    })
    .await;
    prefill.assert_untouched(0xB7, &[]);
}

/// Prefill at TP 2 (two agents, a head each); the decode rank of TP 1 reads
/// both into the two halves of its blocks.
async fn a_decode_rank_of_a_smaller_tp_reads_every_prefill_rank(backend: &str) {
    let p0 = AgentProc::start_shard(backend, "prefill-0", 0, 2).await;
    let p1 = AgentProc::start_shard(backend, "prefill-1", 1, 2).await;
    p0.fill(0x51);
    p1.fill(0x52);
    let decode = AgentProc::start(backend, "decode").await;
    decode.fill(0x9D);
    let per_rank = SRC.len() as u64 * p0.layout.bytes_per_block();
    assert_eq!(pull(&decode, &p0, None).await, per_rank);
    assert_eq!(pull(&decode, &p1, None).await, per_rank);
    for region in 0..decode.layout.num_regions() {
        for (&d, &s) in DST.iter().zip(SRC) {
            let want = [p0.block(region, s), p1.block(region, s)].concat();
            assert!(
                decode.block(region, d) == want,
                "region {region}: block {d} is not both ranks' block {s}"
            );
        }
    }
    decode.assert_untouched(0x9D, DST);
}

#[tokio::test]
async fn nixl_decode_ranks_of_a_larger_tp_read_their_heads() {
    decode_ranks_of_a_larger_tp_read_their_heads("nixl").await;
}

#[tokio::test]
async fn tcp_decode_ranks_of_a_larger_tp_read_their_heads() {
    decode_ranks_of_a_larger_tp_read_their_heads("tcp").await;
}

#[tokio::test]
async fn nixl_a_decode_rank_of_a_smaller_tp_reads_every_prefill_rank() {
    a_decode_rank_of_a_smaller_tp_reads_every_prefill_rank("nixl").await;
}

#[tokio::test]
async fn tcp_a_decode_rank_of_a_smaller_tp_reads_every_prefill_rank() {
    a_decode_rank_of_a_smaller_tp_reads_every_prefill_rank("tcp").await;
}

/// kvbench against a `kvbench serve` of another TP shard: every row moves and verifies the
/// heads both ranks hold (decode rank 1 of TP 2 reading a TP 1 peer over NIXL).
#[tokio::test]
async fn kvbench_between_tp_shards_verifies_every_row() {
    let (_serve, listen) =
        kvbench_serve(&["--backend", "nixl", "--model", MODEL, "--num-blocks", "48"]).await;
    let dir = std::env::temp_dir().join(format!("tandem-kvbench-tp-{}", uuid::Uuid::new_v4()));
    let json = dir.join("kv.json");
    let args: Vec<String> = [
        "run",
        "--peer",
        &listen,
        "--backend",
        "nixl",
        "--model",
        MODEL,
        "--num-blocks",
        "64",
        "--tp-size",
        "2",
        "--tp-rank",
        "1",
        "--tokens",
        "256",
        "--reps",
        "2",
        "--warmup",
        "0",
        "--png",
        "none",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([json.to_string_lossy().into_owned()])
    .collect();
    let out = kvbench(args).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = report["results"].as_array().unwrap();
    assert!(rows.len() >= 3 * 2, "{report:#}");
    let half = shard(1, 2).bytes_per_block() * (256 / 16);
    for r in rows {
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["bytes"], half, "{r}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
