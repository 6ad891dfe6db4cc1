//! engine-sim publishes vLLM's KV events (`--kv-events-config`): real engine-sim processes on
//! loopback, received with the sidecar's ZMQ subscriber and checked against vLLM's block hash
//! (`BlockHasher`, `sha256_cbor`, `NONE_HASH` from `PYTHONHASHSEED`) computed here.

use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use sidecar::kv_events::{
    none_hash, BlockHash, BlockHasher, BlockRemoved, BlockStored, Continuity, EventBatch,
    ExternalBlockHash, KvEvent, Received, Subscriber, UnsetSeed,
};
use tandem_tests::harness::{http_post_json, json, poll_until, EngineSim, Proc, READY_TIMEOUT};
use tandem_tests::sim::tokens::text_token_ids;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(10);
const BLOCK: usize = 4;
const SEED: &str = "0";

fn hasher(seed: &str) -> BlockHasher {
    BlockHasher::new(none_hash(Some(seed), UnsetSeed::Random), BLOCK)
}

fn ints(hashes: &[BlockHash]) -> Vec<ExternalBlockHash> {
    hashes
        .iter()
        .map(|h| ExternalBlockHash::Int(h.low64()))
        .collect()
}

fn kv_config(endpoint: &str, replay: Option<&str>, topic: &str) -> String {
    json!({
        "enable_kv_cache_events": true,
        "publisher": "zmq",
        "endpoint": endpoint,
        "replay_endpoint": replay,
        "topic": topic,
        "buffer_steps": 1000,
    })
    .to_string()
}

async fn post(sim: &EngineSim, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, _, bytes) = http_post_json(&format!("{}{path}", sim.url()), &body, &[]).await;
    (status, json(&bytes))
}

async fn complete(sim: &EngineSim, prompt: Value) -> Value {
    let (status, body) = post(
        sim,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn reset(sim: &EngineSim) -> bool {
    let (status, body) = post(sim, "/reset_prefix_cache", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["success"]
        .as_bool()
        .unwrap_or_else(|| panic!("no success flag: {body}"))
}

/// The next message, decoded.
async fn next(sub: &mut Subscriber, what: &str) -> (Received, EventBatch) {
    let r = tokio::time::timeout(WAIT, sub.recv())
        .await
        .unwrap_or_else(|_| panic!("no KV-event batch within {WAIT:?} (waiting for {what})"));
    let batch = r
        .batch
        .clone()
        .unwrap_or_else(|e| panic!("batch {} does not decode: {e}", r.seq));
    (r, batch)
}

/// A PUB socket drops what it sends before a subscription reaches it, so reset the engine's
/// (empty) prefix cache until one of its `AllBlocksCleared` arrives, then read up to the last
/// probe. Returns that probe's sequence number.
async fn handshake(sim: &EngineSim, sub: &mut Subscriber, topic: &str) -> u64 {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut probes = 0u64;
    let mut got = loop {
        assert!(reset(sim).await, "an idle engine resets its cache");
        probes += 1;
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no KV events from {topic} after {probes} resets"
        );
    };
    loop {
        assert_eq!(got.topic, topic);
        let batch = got.batch.as_ref().expect("a probe's batch decodes");
        assert_eq!(
            batch.events,
            vec![KvEvent::AllBlocksCleared],
            "probe {}",
            got.seq
        );
        assert_eq!(batch.data_parallel_rank, Some(0));
        if got.seq + 1 == probes {
            return got.seq;
        }
        got = next(sub, "the remaining probes").await.0;
    }
}

fn only_stored(batch: &EventBatch) -> &BlockStored {
    match &batch.events[..] {
        [KvEvent::BlockStored(s)] => s,
        other => panic!("expected one BlockStored, got {other:?}"),
    }
}

fn assert_vllm_shape(s: &BlockStored) {
    assert_eq!(s.block_size, BLOCK as u32);
    assert_eq!(s.medium.as_deref(), Some("GPU"));
    assert_eq!((s.lora_id, s.lora_name.as_deref()), (None, None));
    assert_eq!(s.extra_keys, Some(vec![None; s.block_hashes.len()]));
    assert_eq!(s.group_idx, Some(0));
    assert_eq!(s.kv_cache_spec_kind.as_deref(), Some("full_attention"));
    assert_eq!(s.token_ids.len(), BLOCK * s.block_hashes.len());
}

async fn metric(sim: &EngineSim, name: &str) -> u64 {
    let text = sim.metrics().await;
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// The engine binds (`tcp://*:…`, llm-d's per-pod mode) and serves replay; stores, a prefix hit,
/// evictions, a refused and a successful reset, a lost batch and its replay.
#[tokio::test]
async fn stores_hits_evictions_resets_and_replay() {
    let cfg = kv_config("tcp://*:0", Some("tcp://*:0"), "kv@sim");
    let sim = EngineSim::start_with_env(
        &[
            "--block-size",
            "4",
            "--num-blocks",
            "8",
            "--kv-events-config",
            &cfg,
        ],
        &[("PYTHONHASHSEED", SEED)],
    )
    .await;
    let state = sim.state().await;
    let local = |key: &str| {
        state[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key} in {state}"))
            .replace("0.0.0.0", "127.0.0.1")
    };
    let (endpoint, replay_endpoint) = (
        local("kv_events_endpoint"),
        local("kv_events_replay_endpoint"),
    );
    let mut sub = Subscriber::connect(&endpoint, "kv@", Some(WAIT))
        .await
        .unwrap();
    let mut seq = handshake(&sim, &mut sub, "kv@sim").await;
    let h = hasher(SEED);
    let mut expect_next = |r: &Received| {
        seq += 1;
        assert_eq!((r.seq, &r.continuity), (seq, &Continuity::Next));
    };

    // A text prompt of 10 engine-sim tokens (4 bytes each): 2 full blocks in one event.
    let text = "abcdefghijklmnopqrstuvwxyz0123456789ABCD";
    let ids1: Vec<u32> = text_token_ids(text).collect();
    assert_eq!(ids1.len(), 10);
    complete(&sim, json!(text)).await;
    let (r, batch) = next(&mut sub, "the first prompt's store").await;
    expect_next(&r);
    assert_eq!(batch.data_parallel_rank, Some(0));
    let s = only_stored(&batch);
    assert_vllm_shape(s);
    let chain1 = h.chain(None, &ids1);
    assert_eq!(s.block_hashes, ints(&chain1));
    assert_eq!(s.parent_block_hash, None);
    assert_eq!(s.token_ids, ids1[..8]);

    // Token ids sharing the first 2 blocks, then 2 more full blocks: only the tail is stored,
    // chained from the last cached block.
    let ids2: Vec<u32> = ids1[..8].iter().copied().chain(500..508).collect();
    let body = complete(&sim, json!(ids2)).await;
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 8);
    let (r, batch) = next(&mut sub, "the shared prefix's tail").await;
    expect_next(&r);
    let s = only_stored(&batch);
    assert_vllm_shape(s);
    let chain2 = h.chain(None, &ids2);
    assert_eq!(chain2[..2], chain1[..]);
    assert_eq!(
        s.parent_block_hash,
        Some(ExternalBlockHash::Int(chain1[1].low64()))
    );
    assert_eq!(s.block_hashes, ints(&chain2[2..]));
    assert_eq!(s.token_ids, (500..508).collect::<Vec<u32>>());

    // 8 fresh blocks fill the pool: every cached block is evicted, each in its own
    // BlockRemoved naming the hash that was stored, before the new run is stored.
    let ids3: Vec<u32> = (1000..1032).collect();
    complete(&sim, json!(ids3)).await;
    let (r, batch) = next(&mut sub, "the evictions").await;
    expect_next(&r);
    let (stored, removed) = batch.events.split_last().unwrap();
    let mut removed: Vec<u64> = removed
        .iter()
        .map(|e| match e {
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes,
                medium,
                group_idx,
                ..
            }) => {
                assert_eq!((medium.as_deref(), *group_idx), (Some("GPU"), Some(0)));
                match &block_hashes[..] {
                    [ExternalBlockHash::Int(h)] => *h,
                    other => panic!("one int hash per BlockRemoved, got {other:?}"),
                }
            }
            other => panic!("expected BlockRemoved, got {other:?}"),
        })
        .collect();
    removed.sort_unstable();
    let mut cached: Vec<u64> = chain2.iter().map(BlockHash::low64).collect();
    cached.sort_unstable();
    assert_eq!(removed, cached);
    let KvEvent::BlockStored(s) = stored else {
        panic!("expected the store last, got {stored:?}")
    };
    assert_eq!(s.block_hashes, ints(&h.chain(None, &ids3)));
    assert_eq!(s.parent_block_hash, None);

    // Blocks held for a remote decode keep the cache from being reset, as in vLLM.
    let (status, prefill) = post(
        &sim,
        "/v1/completions",
        json!({"prompt": [7, 7, 7, 7, 7], "max_tokens": 1,
               "kv_transfer_params": {"do_remote_decode": true}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{prefill}");
    let (r, batch) = next(&mut sub, "the prefill's store").await;
    expect_next(&r);
    assert!(batch
        .events
        .iter()
        .any(|e| matches!(e, KvEvent::BlockStored(s)
        if s.block_hashes == ints(&h.chain(None, &[7, 7, 7, 7])))));
    assert!(!reset(&sim).await, "held blocks: the reset is refused");
    let id = prefill["kv_transfer_params"]["remote_request_id"]
        .as_str()
        .unwrap();
    let (status, body) = post(&sim, "/sim/release", json!({"notif": format!("{id}:1")})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(reset(&sim).await);
    let (r, batch) = next(&mut sub, "AllBlocksCleared").await;
    expect_next(&r);
    assert_eq!(batch.events, vec![KvEvent::AllBlocksCleared]);

    // A lost batch shows as a gap that the replay socket fills.
    let (status, _) = post(&sim, "/sim/faults", json!({"lose_kv_events": 1})).await;
    assert_eq!(status, StatusCode::OK);
    let ids4: Vec<u32> = (2000..2008).collect();
    complete(&sim, json!(ids4)).await;
    assert!(reset(&sim).await);
    let (r, batch) = next(&mut sub, "the batch after the lost one").await;
    assert_eq!(batch.events, vec![KvEvent::AllBlocksCleared]);
    let Continuity::Gap { missed } = r.continuity.clone() else {
        panic!("expected a gap, got {:?}", r.continuity)
    };
    assert_eq!(missed, seq + 1..seq + 2);
    let deadline = Instant::now() + WAIT;
    let replayed = sub
        .replay(&replay_endpoint, missed.clone(), deadline)
        .await
        .unwrap();
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].seq, missed.start);
    let lost = replayed[0].batch.clone().unwrap();
    let s = only_stored(&lost);
    assert_eq!(s.block_hashes, ints(&h.chain(None, &ids4)));

    // Everything since the start is still buffered: the replay matches what was received.
    let all = sub
        .replay(&replay_endpoint, 0..r.seq + 1, deadline)
        .await
        .unwrap();
    assert_eq!(all.len() as u64, r.seq + 1);
    assert_eq!(all.last().unwrap().batch, Ok(batch));
    assert!(all.iter().all(|b| b.batch.is_ok()));

    assert_eq!(metric(&sim, "engine_sim:kv_events_lost_total").await, 1);
    assert_eq!(metric(&sim, "engine_sim:kv_events_dropped_total").await, 0);
    assert_eq!(
        metric(&sim, "engine_sim:kv_events_published_total").await,
        r.seq,
        "every batch but the lost one was sent"
    );
}

/// llm-d's centralized mode: the subscriber binds and both engines of a P/D pair connect with
/// their own topics. The prefill engine stores what it computes, the decode engine what it
/// pulled; the decode engine sends the older array layout with raw digests.
#[tokio::test]
async fn prefill_and_decode_engines_publish_to_a_bound_subscriber() {
    let mut sub = Subscriber::bind("tcp://127.0.0.1:0", "kv@").await.unwrap();
    let endpoint = sub.endpoint().to_owned();
    let seed = "42";
    let env = [("PYTHONHASHSEED", seed)];
    let prefill_cfg = kv_config(&endpoint, None, "kv@prefill");
    let prefill = EngineSim::start_with_env(
        &["--block-size", "4", "--kv-events-config", &prefill_cfg],
        &env,
    )
    .await;
    let decode_cfg = kv_config(&endpoint, None, "kv@decode");
    let decode = EngineSim::start_with_env(
        &[
            "--block-size",
            "4",
            "--kv-events-config",
            &decode_cfg,
            "--kv-events-encoding",
            "array",
            "--kv-events-hash",
            "bytes",
        ],
        &env,
    )
    .await;
    handshake(&prefill, &mut sub, "kv@prefill").await;
    handshake(&decode, &mut sub, "kv@decode").await;
    let h = hasher(seed);

    let ids: Vec<u32> = (1..=14).collect();
    let chain = h.chain(None, &ids);
    assert_eq!(chain.len(), 3);
    let (status, p) = post(
        &prefill,
        "/v1/completions",
        json!({"prompt": ids, "max_tokens": 1,
               "kv_transfer_params": {"do_remote_decode": true}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{p}");
    let (r, batch) = next(&mut sub, "the prefill engine's store").await;
    assert_eq!(r.topic, "kv@prefill");
    let s = only_stored(&batch);
    assert_vllm_shape(s);
    assert_eq!(s.block_hashes, ints(&chain));
    assert_eq!(s.token_ids, ids[..12]);

    let (status, d) = post(
        &decode,
        "/v1/completions",
        json!({"prompt": ids, "max_tokens": 2, "kv_transfer_params": p["kv_transfer_params"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{d}");
    assert_eq!(decode.state().await["kv_pulls_ok"], 1);
    let (r, batch) = next(&mut sub, "the decode engine's store of the pulled blocks").await;
    assert_eq!(r.topic, "kv@decode");
    let s = only_stored(&batch);
    assert_vllm_shape(s);
    let digests: Vec<ExternalBlockHash> = chain
        .iter()
        .map(|d| ExternalBlockHash::Bytes(d.0.to_vec()))
        .collect();
    assert_eq!(s.block_hashes, digests);
    assert_eq!(s.parent_block_hash, None);
    assert_eq!(s.token_ids, ids[..12]);
    assert_eq!(
        sub.stats()
            .decode_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// Bad `--kv-events-config` values stop the engine at start-up with exit status 2, as other bad
/// flags do; `enable_kv_cache_events: false` publishes nothing and the reset still works.
#[tokio::test]
async fn bad_configs_exit_2_and_disabled_events_publish_nothing() {
    for (args, env, needle) in [
        (
            vec![
                "--kv-events-config",
                r#"{"enable_kv_cache_events": true, "bogus": 1}"#,
            ],
            vec![],
            "unknown field `bogus`",
        ),
        (
            vec!["--kv-events-config", "{enable_kv_cache_events: true}"],
            vec![],
            "--kv-events-config",
        ),
        (
            vec![],
            vec![(
                "ENGINE_SIM_KV_EVENTS_CONFIG",
                r#"{"endpoint": "inproc://x"}"#,
            )],
            "inproc://",
        ),
        (vec!["--kv-events-hash", "hex"], vec![], "--kv-events-hash"),
    ] {
        let mut p = Proc::spawn("engine-sim", &args, &env);
        let status = poll_until(WAIT, "engine-sim to exit", || {
            std::future::ready(p.exited())
        })
        .await;
        let log = p.log();
        assert_eq!(status.code(), Some(2), "{args:?} {env:?}: {log}");
        assert!(log.contains(needle), "{needle:?} not in: {log}");
    }

    let sim =
        EngineSim::start(&["--kv-events-config", r#"{"enable_kv_cache_events": false}"#]).await;
    let state = sim.state().await;
    assert!(state["kv_events_endpoint"].is_null(), "{state}");
    complete(
        &sim,
        json!("abcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcdabcd"),
    )
    .await;
    assert_eq!(sim.state().await["cached_blocks"], 1);
    assert!(reset(&sim).await);
    assert_eq!(sim.state().await["cached_blocks"], 0);
    assert_eq!(
        metric(&sim, "engine_sim:kv_events_published_total").await,
        0
    );
}
