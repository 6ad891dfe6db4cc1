//! The KV-transfer control messages an agent takes from peers and clients:
//! gRPC `TransferRequest` and `AgentMetadata` bytes (prost), `"<id>:<tp>"`
//! notifications, and the plans made against a peer's layout with block
//! ids from the request. No input may panic; a layout the agent accepts and
//! a mapping the planner accepts never yield a copy outside either pool,
//! and a block list expands to exactly the naive descriptors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use transfer::agent::parse_notification;
use transfer::grpc::proto;
use transfer::layout::{Dtype, KvFormat, MemKind, RegionKind};
use transfer::plan::{plan, plan_blocks, PlanKind, PlanOptions};
use transfer::{KvLayout, LayoutParams, ModelShape, PeerMetadata};

/// A small layout drawn from 8 bytes (so the planner is reached without
/// seeds); `num_blocks` from `nb`.
fn layout(b: &[u8; 8], nb: u8) -> Option<KvLayout> {
    let tp_size = 1 + u32::from(b[6] % 2);
    KvLayout::new(LayoutParams {
        shape: ModelShape {
            name: "fuzz".into(),
            layers: 1 + u32::from(b[0] % 4),
            kv_heads: 1 + u32::from(b[1] % 8),
            head_dim: 16 * (1 + u32::from(b[2] % 4)),
            dtype: [Dtype::Bf16, Dtype::F16, Dtype::F32, Dtype::Fp8][usize::from(b[3] % 4)],
        },
        block_size: 1 + u32::from(b[4] % 32),
        num_blocks: 1 + u32::from(nb),
        tp_rank: u32::from(b[7]) % tp_size,
        tp_size,
        format: if b[5] & 1 == 0 { KvFormat::Hnd } else { KvFormat::Nhd },
        regions: if b[5] & 2 == 0 { RegionKind::Split } else { RegionKind::Fused },
        mem: MemKind::Host,
    })
    .ok()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let (_, tp) = parse_notification(s);
        assert!(tp >= 1);
    }
    let _ = proto::TransferRequest::decode(data);
    // A peer's metadata as it arrives: accepted ones round-trip.
    if let Ok(md) = proto::AgentMetadata::decode(data) {
        if let Ok(peer) = PeerMetadata::try_from(md) {
            let again = PeerMetadata::try_from(proto::AgentMetadata::from(&peer)).unwrap();
            assert_eq!(again.layout, peer.layout);
        }
    }
    // Plans: two layouts from the first bytes, block ids from the rest.
    if data.len() < 10 {
        return;
    }
    let shape: [u8; 8] = data[..8].try_into().unwrap();
    let (Some(local), Some(remote)) = (layout(&shape, data[8]), layout(&shape, data[9])) else {
        return;
    };
    // A peer layout as the agent would take it: through its JSON.
    let remote: KvLayout = serde_json::from_str(&serde_json::to_string(&remote).unwrap()).unwrap();
    let ids = &data[10..];
    let half = ids.len() / 2;
    let local_ids: Vec<u32> = ids[..half].iter().map(|&b| u32::from(b)).collect();
    let remote_ids: Vec<u32> = ids[half..2 * half].iter().map(|&b| u32::from(b)).collect();
    let opts = PlanOptions {
        max_desc_bytes: 1 + u64::from(data[0]) * 4096,
        merge_regions: data[1] & 1 == 0,
    };
    let mut naive = None;
    for kind in [PlanKind::Naive, PlanKind::Coalesced] {
        let Ok(p) = plan(kind, &local, &remote, &local_ids, &remote_ids, &opts) else {
            continue;
        };
        let mut bytes = 0;
        for d in &p.descs {
            assert!(d.len > 0);
            assert!(d.local.checked_add(d.len).is_some_and(|e| e <= local.total_bytes()));
            assert!(d.remote.checked_add(d.len).is_some_and(|e| e <= remote.total_bytes()));
            bytes += d.len;
        }
        assert_eq!(bytes, local_ids.len() as u64 * local.bytes_per_block());
        if kind == PlanKind::Naive {
            naive = Some(p);
        }
    }
    if let Ok(p) = plan_blocks(&local, &remote, &local_ids, &remote_ids) {
        let blocks = p.blocks.as_ref().expect("a block list");
        let (le, re) = blocks.extents();
        assert!(le <= local.total_bytes() && re <= remote.total_bytes());
        let naive = naive.expect("the naive plan accepts what the block list does");
        assert_eq!(blocks.descs().collect::<Vec<_>>(), naive.descs);
    }
});
