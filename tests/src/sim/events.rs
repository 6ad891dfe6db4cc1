//! engine-sim's vLLM KV events (`--kv-events-config`): the ZMQ publisher, the engine's block
//! hashes, and the batches. Owns turning the pool's [`CacheEvent`]s into vLLM's wire events
//! and sending them one batch per engine step; the wire format itself is `sidecar::kv_events`,
//! and what happened to the cache is `blocks`'s business (this module only drains its queue).
//!
//! As vLLM 0.26.0 (`vllm/v1/core/block_pool.py`, `kv_cache_manager.py`, `sched/scheduler.py`):
//! - a `BlockStored` per newly cached run of a prompt's full blocks, with `parent_block_hash` the
//!   hash of the block before the run (`null` at the prompt's start), exactly the run's
//!   `token_ids`, `lora_id`/`lora_name` null, `medium` `"GPU"`, `extra_keys` one null per block,
//!   `group_idx` 0 and `kv_cache_spec_kind` `"full_attention"`;
//! - a `BlockRemoved` per evicted block (one hash each, `medium` `"GPU"`, `group_idx` 0);
//! - `AllBlocksCleared` when the prefix cache is reset;
//! - block hashes are `sha256_cbor` with `NONE_HASH` from `PYTHONHASHSEED` (random per process
//!   when unset, as 0.26.0 does), sent as the low 64 bits or the raw digest (`--kv-events-hash`);
//! - one `[ts, events, data_parallel_rank]` batch per step with any events, the rank left for
//!   the publisher to fill in (0).
//!
//! An engine-sim "step" is the handling of one request (its allocation, KV pull and cache
//! publication) or one reset; a batch carries whatever the pool queued since the last one, so
//! events of requests running at once may share a batch, as they share a step in vLLM. Sending
//! never waits: a batch that finds the publisher's queue full is dropped and counted.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures_util::FutureExt;
use sidecar::kv_events::{
    none_hash_from_env, BlockHash, BlockHasher, BlockRemoved, BlockStored, EventBatch, KvEvent,
    KvEventsConfig, Publisher, PublisherKind, PublisherOptions, TransportError, UnsetSeed,
};

use super::blocks::{BlockPool, CacheEvent};
use super::config::Config;
use super::faults::Faults;

pub use sidecar::kv_events::{Encoding, HashForm};

/// vLLM's `MEDIUM_GPU`.
pub const MEDIUM_GPU: &str = "GPU";
/// The spec kind vLLM 0.26.0 writes on stores of a plain decoder's one KV-cache group.
pub const FULL_ATTENTION: &str = "full_attention";
/// How long shutdown waits for queued batches to go out.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// Counters for `/metrics` and `/sim/state`.
#[derive(Debug, Default)]
pub struct KvEventStats {
    /// Batches handed to the publisher.
    pub published: AtomicU64,
    /// Batches dropped: the publisher's queue was full, or it had stopped.
    pub dropped: AtomicU64,
    /// Batches numbered and kept for replay but not sent (`lose_kv_events` fault).
    pub lost: AtomicU64,
}

/// A point-in-time copy of [`KvEventStats`] (zeros when events are off).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KvEventCounts {
    pub published: u64,
    pub dropped: u64,
    pub lost: u64,
}

/// How the engine names and sends its blocks: what the flags chose.
#[derive(Debug, Clone)]
pub struct EventShape {
    pub hasher: BlockHasher,
    pub form: HashForm,
}

impl EventShape {
    /// The engine hashes of `token_ids`' full blocks.
    pub fn hashes(&self, token_ids: &[u32]) -> Vec<BlockHash> {
        self.hasher.chain(None, token_ids)
    }

    /// vLLM's wire event for one pool event.
    pub fn wire(&self, event: CacheEvent) -> KvEvent {
        match event {
            CacheEvent::Stored {
                parent,
                hashes,
                token_ids,
            } => KvEvent::BlockStored(BlockStored {
                extra_keys: Some(vec![None; hashes.len()]),
                block_hashes: hashes.iter().map(|h| h.external(self.form)).collect(),
                parent_block_hash: parent.map(|h| h.external(self.form)),
                token_ids,
                block_size: self.hasher.block_size() as u32,
                lora_id: None,
                medium: Some(MEDIUM_GPU.into()),
                lora_name: None,
                group_idx: Some(0),
                kv_cache_spec_kind: Some(FULL_ATTENTION.into()),
                ..BlockStored::default()
            }),
            CacheEvent::Removed(h) => KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![h.external(self.form)],
                medium: Some(MEDIUM_GPU.into()),
                group_idx: Some(0),
                ..BlockRemoved::default()
            }),
            CacheEvent::Cleared => KvEvent::AllBlocksCleared,
        }
    }

    /// The batch for one step's pool events at `ts`; `None` when there were none (vLLM sends
    /// no empty batches).
    pub fn batch(&self, events: Vec<CacheEvent>, ts: f64) -> Option<EventBatch> {
        (!events.is_empty()).then(|| EventBatch {
            ts,
            events: events.into_iter().map(|e| self.wire(e)).collect(),
            // The publisher writes its rank, as vLLM's `ZmqEventPublisher.publish` does.
            data_parallel_rank: None,
        })
    }
}

/// A running KV-event publisher.
pub struct KvEvents {
    pub shape: EventShape,
    /// Held while a step's events are drained and queued, so batches leave in the order the
    /// pool queued their events; `None` after shutdown.
    publisher: Mutex<Option<Publisher>>,
    endpoint: String,
    replay_endpoint: Option<String>,
    pub stats: KvEventStats,
}

impl KvEvents {
    /// Starts the publisher `--kv-events-config` asks for; `None` when it asks for none (events
    /// disabled, or `publisher: null`).
    pub async fn start(cfg: &Config) -> anyhow::Result<Option<Arc<KvEvents>>> {
        let Some(kv_cfg) = &cfg.kv_events_config else {
            return Ok(None);
        };
        if kv_cfg.publisher_kind() != PublisherKind::Zmq {
            return Ok(None);
        }
        if std::env::var_os("PYTHONHASHSEED").is_none() {
            tracing::warn!(
                "PYTHONHASHSEED is not set: KV-event block hashes start from a random NONE_HASH \
                 (as vLLM 0.26.0 does) and no other process can reproduce them"
            );
        }
        let shape = EventShape {
            hasher: BlockHasher::new(
                none_hash_from_env(UnsetSeed::Random),
                cfg.block_size as usize,
            ),
            form: cfg.kv_events_hash.into(),
        };
        let opts = PublisherOptions::from_config(kv_cfg, 0, cfg.kv_events_encoding.into())
            .context("--kv-events-config")?;
        let publisher = Publisher::start(opts)
            .await
            .context("starting the KV-event publisher")?;
        let endpoint = publisher.endpoint().to_owned();
        let replay_endpoint = publisher.replay_endpoint().map(str::to_owned);
        tracing::info!(
            %endpoint,
            replay_endpoint = replay_endpoint.as_deref().unwrap_or("none"),
            topic = %kv_cfg.topic,
            encoding = ?cfg.kv_events_encoding,
            hash = ?cfg.kv_events_hash,
            "publishing KV events"
        );
        Ok(Some(Arc::new(KvEvents {
            shape,
            publisher: Mutex::new(Some(publisher)),
            endpoint,
            replay_endpoint,
            stats: KvEventStats::default(),
        })))
    }

    /// The PUB endpoint as bound (port 0 resolved) or as connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    pub fn counts(&self) -> KvEventCounts {
        KvEventCounts {
            published: self.stats.published.load(Relaxed),
            dropped: self.stats.dropped.load(Relaxed),
            lost: self.stats.lost.load(Relaxed),
        }
    }

    /// Ends a step: drains `pool`'s events into one batch and queues it without waiting.
    pub fn flush(&self, pool: &BlockPool, faults: &Faults) {
        let guard = self.publisher.lock().unwrap_or_else(|e| e.into_inner());
        let Some(batch) = self.shape.batch(pool.take_events(), unix_now()) else {
            return;
        };
        let Some(publisher) = guard.as_ref() else {
            self.stats.dropped.fetch_add(1, Relaxed);
            return;
        };
        let sent = if faults.take_kv_event_loss() {
            // Queued only if there is room right now: this must not wait either.
            match publisher.publish_dropped(batch).now_or_never() {
                Some(Ok(())) => Ok(&self.stats.lost),
                Some(Err(e)) => Err(e),
                None => Err(TransportError::QueueFull),
            }
        } else {
            publisher.try_publish(batch).map(|()| &self.stats.published)
        };
        match sent {
            Ok(counter) => {
                counter.fetch_add(1, Relaxed);
            }
            Err(e) => {
                let n = self.stats.dropped.fetch_add(1, Relaxed);
                if n == 0 {
                    tracing::warn!(error = %e, "KV-event batch dropped (counted in engine_sim:kv_events_dropped_total)");
                }
            }
        }
    }

    /// Sends what is queued (for up to two seconds) and closes the sockets.
    pub async fn shutdown(&self) {
        let publisher = self
            .publisher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(p) = publisher {
            if tokio::time::timeout(SHUTDOWN_TIMEOUT, p.shutdown())
                .await
                .is_err()
            {
                tracing::warn!("KV-event publisher did not drain before shutdown");
            }
        }
    }
}

/// Flushes the step's events when dropped, on every way out of a request's handling.
pub struct Step<'a> {
    events: Option<&'a KvEvents>,
    pool: &'a BlockPool,
    faults: &'a Faults,
}

impl<'a> Step<'a> {
    pub fn new(events: Option<&'a KvEvents>, pool: &'a BlockPool, faults: &'a Faults) -> Self {
        Step {
            events,
            pool,
            faults,
        }
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.events {
            e.flush(self.pool, self.faults);
        }
    }
}

/// `time.time()`.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Parses `--kv-events-config`: vLLM's `KVEventsConfig` JSON, its names and defaults, unknown
/// keys refused.
pub fn parse_config(json: &str) -> Result<KvEventsConfig, String> {
    let cfg = KvEventsConfig::from_json(json).map_err(|e| {
        format!(
            "not a vLLM KVEventsConfig (JSON with enable_kv_cache_events, publisher, endpoint, \
             replay_endpoint, buffer_steps, hwm, max_queue_size, topic): {e}"
        )
    })?;
    for ep in std::iter::once(&cfg.endpoint).chain(&cfg.replay_endpoint) {
        if ep.starts_with("inproc://") {
            return Err(format!(
                "endpoint {ep:?}: inproc:// works only inside one process; use tcp:// or ipc://"
            ));
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::blocks::EngineBlocks;
    use crate::sim::faults::FaultConfig;
    use sidecar::kv_events::{none_hash, ExternalBlockHash};

    const BS: usize = 4;

    fn shape(form: HashForm) -> EventShape {
        EventShape {
            hasher: BlockHasher::new(none_hash(Some("0"), UnsetSeed::Random), BS),
            form,
        }
    }

    /// The pool hash of each block: any chain does, the pool's own is not under test.
    fn pool_hashes(tokens: &[u32]) -> Vec<u64> {
        crate::sim::kv::block_hashes(tokens, BS as u64)
    }

    /// Allocates a request for `tokens` the way the server does, publishes its full blocks,
    /// and returns its allocation with the store runs.
    fn run(
        pool: &Arc<BlockPool>,
        s: &EventShape,
        tokens: &[u32],
    ) -> (crate::sim::blocks::Allocation, Vec<std::ops::Range<usize>>) {
        let hashes = pool_hashes(tokens);
        let full = tokens.len() / BS;
        let hittable = (tokens.len() - 1) / BS;
        let a = pool
            .allocate_prefix(tokens.len().div_ceil(BS), &hashes[..hittable])
            .unwrap();
        let engine = s.hashes(tokens);
        let runs = pool.publish(
            &a.blocks()[..full],
            &hashes[..full],
            Some(EngineBlocks {
                hashes: &engine,
                token_ids: tokens,
                block_size: BS,
            }),
        );
        (a, runs)
    }

    /// Index ranges as `publish` returns them.
    fn spans(pairs: &[(usize, usize)]) -> Vec<std::ops::Range<usize>> {
        pairs.iter().map(|&(a, b)| a..b).collect()
    }

    fn stored(ev: &KvEvent) -> &BlockStored {
        match ev {
            KvEvent::BlockStored(s) => s,
            other => panic!("expected BlockStored, got {other:?}"),
        }
    }

    fn int(h: &BlockHash) -> ExternalBlockHash {
        ExternalBlockHash::Int(h.low64())
    }

    #[test]
    fn a_prompt_stores_its_full_blocks_in_one_event_and_a_prefix_hit_only_its_tail() {
        let s = shape(HashForm::Int);
        let pool = BlockPool::with_events(16);
        let a: Vec<u32> = (1..=10).collect(); // 2 full blocks + 2 tokens
        let (alloc, runs) = run(&pool, &s, &a);
        assert_eq!(runs, spans(&[(0, 2)]));
        drop(alloc);
        let batch = s.batch(pool.take_events(), 1.5).unwrap();
        assert_eq!(batch.ts, 1.5);
        assert_eq!(batch.data_parallel_rank, None);
        assert_eq!(batch.events.len(), 1);
        let ev = stored(&batch.events[0]);
        let want = s.hasher.chain(None, &a);
        assert_eq!(want.len(), 2);
        assert_eq!(ev.block_hashes, vec![int(&want[0]), int(&want[1])]);
        assert_eq!(ev.parent_block_hash, None);
        assert_eq!(ev.token_ids, (1..=8).collect::<Vec<u32>>());
        assert_eq!(ev.block_size, BS as u32);
        assert_eq!(ev.medium.as_deref(), Some("GPU"));
        assert_eq!((ev.lora_id, ev.lora_name.as_deref()), (None, None));
        assert_eq!(ev.extra_keys, Some(vec![None, None]));
        assert_eq!(ev.group_idx, Some(0));
        assert_eq!(ev.kv_cache_spec_kind.as_deref(), Some("full_attention"));
        assert!(ev.blocks().is_some(), "token_ids is block_size per hash");

        // Same first 2 blocks, 2 more full ones: only the tail is stored, chained from the
        // last hit block.
        let b: Vec<u32> = (1..=8).chain(100..=108).collect();
        let (alloc, runs) = run(&pool, &s, &b);
        assert_eq!(alloc.cached_blocks(), 2);
        assert_eq!(runs, spans(&[(2, 4)]));
        drop(alloc);
        let batch = s.batch(pool.take_events(), 2.0).unwrap();
        assert_eq!(batch.events.len(), 1);
        let ev = stored(&batch.events[0]);
        let chain = s.hasher.chain(None, &b);
        assert_eq!(chain[..2], want[..]);
        assert_eq!(ev.parent_block_hash, Some(int(&want[1])));
        assert_eq!(ev.block_hashes, vec![int(&chain[2]), int(&chain[3])]);
        assert_eq!(ev.token_ids, (100..=107).collect::<Vec<u32>>());
        assert_eq!(
            s.hasher.chain(Some(&want[1]), &ev.token_ids),
            chain[2..],
            "a consumer re-derives the stored hashes from parent and token_ids"
        );

        // All cached: nothing new, no batch.
        let (alloc, runs) = run(&pool, &s, &b);
        assert!(runs.is_empty());
        drop(alloc);
        assert_eq!(s.batch(pool.take_events(), 3.0), None);
    }

    #[test]
    fn eviction_removes_the_hashes_that_were_stored_tail_first() {
        let s = shape(HashForm::Bytes);
        // 3 full blocks of `a` fill 3 of the 4 blocks; `b` needs 3 fresh ones.
        let pool = BlockPool::with_events(4);
        let a: Vec<u32> = (1..=12).collect();
        let (alloc, _) = run(&pool, &s, &a);
        drop(alloc);
        let stored_a = match s.batch(pool.take_events(), 0.0).unwrap().events.remove(0) {
            KvEvent::BlockStored(st) => st.block_hashes,
            other => panic!("{other:?}"),
        };
        let digests = s.hasher.chain(None, &a);
        assert_eq!(
            stored_a,
            digests
                .iter()
                .map(|d| ExternalBlockHash::Bytes(d.0.to_vec()))
                .collect::<Vec<_>>(),
            "raw digests with --kv-events-hash bytes"
        );
        let b: Vec<u32> = (50..62).collect();
        let (alloc, runs) = run(&pool, &s, &b);
        assert_eq!(runs, spans(&[(0, 3)]));
        let events = s.batch(pool.take_events(), 0.0).unwrap().events;
        // The never-used block goes first; then a's tail, then the block before it; the
        // removals come before the store, as in one vLLM step.
        let removed: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                KvEvent::BlockRemoved(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(removed.len(), 2);
        for (r, d) in removed.iter().zip([&digests[2], &digests[1]]) {
            assert_eq!(r.block_hashes, vec![ExternalBlockHash::Bytes(d.0.to_vec())]);
            assert_eq!(r.medium.as_deref(), Some("GPU"));
            assert_eq!(r.group_idx, Some(0));
        }
        assert!(matches!(events.last(), Some(KvEvent::BlockStored(_))));
        assert_eq!(events.len(), 3);
        drop(alloc);
        // a's head survives and still hits.
        let (alloc, _) = run(&pool, &s, &a[..5]);
        assert_eq!(alloc.cached_blocks(), 1);
    }

    #[test]
    fn reset_clears_only_an_idle_cache_and_forgets_the_engine_hashes() {
        let s = shape(HashForm::Int);
        let pool = BlockPool::with_events(4);
        let a: Vec<u32> = (1..=8).collect();
        let (alloc, _) = run(&pool, &s, &a);
        assert!(!pool.reset_prefix_cache(), "blocks in use: vLLM refuses");
        drop(alloc);
        pool.take_events();
        assert!(pool.reset_prefix_cache());
        let batch = s.batch(pool.take_events(), 0.0).unwrap();
        assert_eq!(batch.events, vec![KvEvent::AllBlocksCleared]);
        // The cleared blocks are reused without removals: they name nothing now.
        let b: Vec<u32> = (20..36).collect();
        let (alloc, runs) = run(&pool, &s, &b);
        assert_eq!(alloc.cached_blocks(), 0);
        assert_eq!(runs, spans(&[(0, 4)]));
        let events = pool.take_events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(matches!(events[0], CacheEvent::Stored { parent: None, .. }));
    }

    #[test]
    fn a_pool_without_events_queues_none() {
        let s = shape(HashForm::Int);
        let pool = BlockPool::new(4);
        let (alloc, runs) = run(&pool, &s, &[1, 2, 3, 4, 5]);
        assert_eq!(runs, spans(&[(0, 1)]));
        drop(alloc);
        assert!(pool.reset_prefix_cache());
        assert!(pool.take_events().is_empty());
    }

    #[tokio::test]
    async fn flush_publishes_one_batch_per_step_and_loses_on_request() {
        use clap::Parser;
        let cfg = Config::try_parse_from([
            "engine-sim",
            "--block-size",
            "4",
            "--kv-events-config",
            r#"{"enable_kv_cache_events": true, "endpoint": "tcp://*:0", "replay_endpoint": "tcp://*:0"}"#,
        ])
        .unwrap();
        let events = KvEvents::start(&cfg).await.unwrap().expect("zmq publisher");
        let pool = BlockPool::with_events(8);
        let faults = Faults::new(FaultConfig {
            lose_kv_events: 1,
            ..FaultConfig::default()
        });
        // No events: no batch.
        drop(Step::new(Some(&events), &pool, &faults));
        assert_eq!(events.counts(), KvEventCounts::default());
        let (alloc, _) = run(&pool, &events.shape, &[1, 2, 3, 4]);
        drop(alloc);
        drop(Step::new(Some(&events), &pool, &faults));
        assert!(pool.reset_prefix_cache());
        drop(Step::new(Some(&events), &pool, &faults));
        assert_eq!(
            events.counts(),
            KvEventCounts {
                published: 1,
                dropped: 0,
                lost: 1
            }
        );
        let replayed = sidecar::kv_events::replay(
            &events
                .replay_endpoint()
                .unwrap()
                .replace("0.0.0.0", "127.0.0.1"),
            0..2,
            tokio::time::Instant::now() + Duration::from_secs(10),
        )
        .await
        .unwrap();
        let batches: Vec<_> = replayed.into_iter().map(|r| r.batch.unwrap()).collect();
        assert!(matches!(batches[0].events[..], [KvEvent::BlockStored(_)]));
        assert_eq!(batches[1].events, vec![KvEvent::AllBlocksCleared]);
        assert_eq!(batches[1].data_parallel_rank, Some(0));
        events.shutdown().await;
        let (alloc, _) = run(&pool, &events.shape, &[9, 9, 9, 9]);
        drop(alloc);
        events.flush(&pool, &faults);
        assert_eq!(
            events.counts().dropped,
            1,
            "after shutdown batches are dropped"
        );
    }

    #[test]
    fn config_json_is_vllms() {
        let cfg = parse_config(r#"{"enable_kv_cache_events": true, "topic": "kv"}"#).unwrap();
        assert_eq!(cfg.publisher_kind(), PublisherKind::Zmq);
        assert_eq!(cfg.endpoint, "tcp://*:5557");
        let off = parse_config(r#"{"enable_kv_cache_events": true, "publisher": "null"}"#);
        assert_eq!(off.unwrap().publisher_kind(), PublisherKind::Null);
        let err = parse_config(r#"{"enable_kv_cache_events": true, "hwm_": 1}"#).unwrap_err();
        assert!(err.contains("unknown field `hwm_`"), "{err}");
        assert!(parse_config("{enable_kv_cache_events: true}").is_err());
        assert!(parse_config(r#"{"endpoint": "inproc://x"}"#).is_err());
    }
}
