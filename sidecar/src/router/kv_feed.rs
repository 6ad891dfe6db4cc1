//! Feeds the exact prefix index ([`KvIndex`]) from the engines' KV events, in
//! both of llm-d's modes:
//!
//! - centralized (`kvEventsConfig.zmqEndpoint`, e.g. `tcp://*:5557`): the
//!   router binds one SUB socket and every engine connects to it, publishing
//!   with the topic `kv@<pod ip>:<port>@<model>`; the index is kept under
//!   that `<pod ip>:<port>` (the engine's port; a router endpoint finds it by
//!   its host when the port is its sidecar's, see [`KvIndex::matched`]).
//! - per endpoint (`podDiscoveryConfig`, or llm-d-router's default): the
//!   router connects to each endpoint's `tcp://<host>:<socketPort>` (or the
//!   endpoints file's `kvEventsUrl`) and keeps the index under that endpoint.
//!
//! Sequence numbers: a fresh publisher (sequence 0) or one that restarted
//! starts a synced index; a gap or a late join asks the engine's replay
//! socket (`replaySocketPort`) for what was missed. When nothing can replay
//! it, the endpoint's index is dropped and rebuilt from what follows as a
//! lower bound (the scheduler then takes the larger of it and the
//! approximate index) until a full replay or the engine's restart makes it
//! exact again.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::PreciseConfig;
use super::kv_index::{host_of, KvIndex, Skipped, StoredRun};
use super::metrics::KvEventMetrics;
use super::proxy::AppState;
use crate::kv_events::{
    Continuity, EventBatch, KvEvent, Received, Replayed, Subscriber, SubscriberStats,
};

/// How long a replay may take before the endpoint is treated as gapped.
const REPLAY_DEADLINE: Duration = Duration::from_secs(3);
/// How often an endpoint whose index is a lower bound tries a full replay.
const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// How often the per-endpoint mode follows the endpoint list.
const MEMBERS_EVERY: Duration = Duration::from_secs(1);

/// Where one publisher's events go and how its history is fetched.
struct Source {
    /// The index key of a per-endpoint publisher; centralized: from the topic.
    key: Option<String>,
    /// The replay port on the engine's host, or a whole replay endpoint.
    replay: Option<Replay>,
}

#[derive(Clone)]
enum Replay {
    Port(u16),
    At(String),
}

/// Per topic: whether its index is exact, and when a full replay was last tried.
#[derive(Default)]
struct TopicState {
    exact: bool,
    last_resync: Option<Instant>,
}

/// Applies one publisher's messages to the index.
struct Feeder {
    index: Arc<KvIndex>,
    metrics: Arc<KvEventMetrics>,
    source: Source,
    topics: HashMap<String, TopicState>,
    /// The subscriber's malformed-frame count already reported.
    malformed_seen: u64,
}

impl Feeder {
    fn new(index: Arc<KvIndex>, metrics: Arc<KvEventMetrics>, source: Source) -> Feeder {
        Feeder {
            index,
            metrics,
            source,
            topics: HashMap::new(),
            malformed_seen: 0,
        }
    }

    /// The index key and replay endpoint of a message on `topic`.
    fn route(&self, topic: &str) -> Option<(String, Option<String>)> {
        let key = match &self.source.key {
            Some(k) => k.clone(),
            None => topic_endpoint(topic)?.to_string(),
        };
        let replay = self.source.replay.as_ref().map(|r| match r {
            Replay::At(url) => url.clone(),
            Replay::Port(p) => format!("tcp://{}:{p}", host_of(&key)),
        });
        Some((key, replay))
    }

    async fn handle(&mut self, sub: &Subscriber, msg: Received) {
        self.count_frames(sub.stats());
        let Some((key, replay)) = self.route(&msg.topic) else {
            self.metrics.dropped("topic");
            return;
        };
        let state = self.topics.entry(msg.topic.clone()).or_default();
        let wanted: Option<Range<u64>> = match &msg.continuity {
            Continuity::Next => None,
            Continuity::First | Continuity::Restart { .. } => {
                if matches!(msg.continuity, Continuity::Restart { .. }) {
                    self.index.cleared(&key);
                }
                if msg.seq == 0 {
                    state.exact = true;
                    self.index.set_synced(&key, true);
                    None
                } else {
                    // Joined late, or a restart we heard late: the history is on the replay socket.
                    Some(0..msg.seq)
                }
            }
            Continuity::Gap { missed } => {
                self.metrics.gap(&key);
                Some(missed.clone())
            }
        };
        if let Some(missed) = wanted {
            let gap = missed.start > 0;
            let replayed = match &replay {
                Some(ep) => self.fetch(sub, &key, ep, missed).await,
                None => None,
            };
            if let Some(batches) = &replayed {
                self.apply_replayed(&key, batches);
                self.exact(&msg.topic, &key);
            }
            let state = self.topics.entry(msg.topic.clone()).or_default();
            if replayed.is_none() && (gap || state.exact) {
                // What was missed may have removed blocks the index holds.
                tracing::warn!(endpoint = %key, topic = %msg.topic, "KV events missed and not replayed: index dropped; a lower bound until it resyncs");
                state.exact = false;
                self.index.set_synced(&key, false);
            }
            state.last_resync = Some(Instant::now());
        }
        match msg.batch {
            Ok(batch) => {
                if self.apply(&key, &batch) {
                    // The engine's cache is empty now: from here the index is exact.
                    self.exact(&msg.topic, &key);
                }
            }
            Err(e) => {
                tracing::debug!(endpoint = %key, error = %e, "KV event batch undecodable");
                self.metrics.dropped("decode");
            }
        }
        // A lower bound tries now and then to become exact again.
        let state = self.topics.entry(msg.topic.clone()).or_default();
        let due = state
            .last_resync
            .is_none_or(|t| t.elapsed() >= RESYNC_EVERY);
        if let Some(ep) = replay.filter(|_| !state.exact && due) {
            state.last_resync = Some(Instant::now());
            // Everything from the publisher's first batch: the index is rebuilt from it.
            if let Some(all) = self.fetch(sub, &key, &ep, 0..msg.seq + 1).await {
                self.index.cleared(&key);
                self.apply_replayed(&key, &all);
                self.exact(&msg.topic, &key);
            }
        }
    }

    /// The index of `key` follows `topic` from a known point from here on.
    fn exact(&mut self, topic: &str, key: &str) {
        self.index.set_synced(key, true);
        self.topics.entry(topic.to_string()).or_default().exact = true;
    }

    /// Asks the replay socket `ep` for `missed`; the batches when all of them
    /// arrived (counted either way).
    async fn fetch(
        &self,
        sub: &Subscriber,
        key: &str,
        ep: &str,
        missed: Range<u64>,
    ) -> Option<Vec<Replayed>> {
        let deadline = tokio::time::Instant::now() + REPLAY_DEADLINE;
        let got = sub.replay(ep, missed, deadline).await;
        self.metrics.replay(key, got.is_ok());
        got.map_err(|e| {
            tracing::debug!(endpoint = %key, replay = %ep, error = %e, "KV event replay failed");
        })
        .ok()
    }

    /// Indexes replayed batches in order; undecodable ones are counted.
    fn apply_replayed(&self, key: &str, batches: &[Replayed]) {
        for r in batches {
            match &r.batch {
                Ok(b) => {
                    self.apply(key, b);
                }
                Err(_) => self.metrics.dropped("decode"),
            }
        }
    }

    /// Indexes a batch; whether it ended with the cache cleared (nothing
    /// after the last `AllBlocksCleared` failed to index).
    fn apply(&self, key: &str, batch: &EventBatch) -> bool {
        let dp_rank = batch.data_parallel_rank.unwrap_or(0);
        let mut clean = false;
        for event in &batch.events {
            self.metrics.event(key, event.tag());
            match event {
                KvEvent::BlockStored(s) => {
                    let other_group = s.group_idx.unwrap_or(0) != 0
                        || s.kv_cache_spec_kind
                            .as_deref()
                            .is_some_and(|k| k != "full_attention");
                    if other_group {
                        self.metrics.dropped("other_cache_group");
                        continue;
                    }
                    let hashes: Vec<u64> = s.block_hashes.iter().map(|h| h.low64()).collect();
                    let tagged = s.lora_id.is_some()
                        || s.lora_name.is_some()
                        || s.extra_keys.as_ref().is_some_and(|k| {
                            k.iter().any(|b| b.as_ref().is_some_and(|v| !v.is_empty()))
                        });
                    let run = StoredRun {
                        dp_rank,
                        medium: s.medium.as_deref(),
                        parent: s.parent_block_hash.as_ref().map(|h| h.low64()),
                        hashes: &hashes,
                        token_ids: &s.token_ids,
                        block_size: s.block_size as usize,
                        tagged,
                    };
                    match self.index.stored(key, &run) {
                        Ok(_) => continue,
                        Err(Skipped::BlockSize { theirs, ours }) => {
                            self.metrics.dropped("block_size");
                            tracing::debug!(endpoint = %key, theirs, ours, "KV event block size differs from the index's");
                        }
                        Err(Skipped::Malformed) => self.metrics.dropped("malformed_run"),
                        Err(Skipped::UnknownParent) => self.metrics.dropped("unknown_parent"),
                    }
                }
                KvEvent::BlockRemoved(r) => {
                    if r.group_idx.unwrap_or(0) != 0 {
                        continue;
                    }
                    let hashes: Vec<u64> = r.block_hashes.iter().map(|h| h.low64()).collect();
                    self.index
                        .removed(key, dp_rank, r.medium.as_deref(), &hashes);
                }
                KvEvent::AllBlocksCleared => {
                    self.index.cleared(key);
                    clean = true;
                    continue;
                }
            }
            // A run skipped after a clear leaves the index short of the engine.
            clean = clean && !matches!(event, KvEvent::BlockStored(_));
        }
        clean
    }

    /// Reports the frames the subscriber dropped since the last message.
    fn count_frames(&mut self, stats: &SubscriberStats) {
        let n = stats.malformed.load(Ordering::Relaxed);
        if n > self.malformed_seen {
            self.metrics
                .dropped_n("malformed_frame", n - self.malformed_seen);
            self.malformed_seen = n;
        }
    }
}

/// `<pod ip>:<port>` of vLLM's topic `kv@<pod ip>:<port>@<model>`.
pub fn topic_endpoint(topic: &str) -> Option<&str> {
    let mut parts = topic.splitn(3, '@');
    let (_, addr) = (parts.next()?, parts.next()?);
    (!addr.is_empty() && addr.contains(':')).then_some(addr)
}

/// Receives until `stop`, feeding the index.
async fn pump(mut sub: Subscriber, mut feeder: Feeder, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            msg = sub.recv() => feeder.handle(&sub, msg).await,
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    sub.close().await;
}

/// Starts the feed the config asks for; None without a precise index.
pub async fn start(
    state: &AppState,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    let Some(precise) = state.cfg.scheduling.precise.clone() else {
        return Ok(None);
    };
    let Some(index) = state.view().scheduler.kv_index() else {
        return Ok(None);
    };
    let metrics = state.metrics.kv.clone();
    if let Some(per) = precise.per_endpoint() {
        let state = state.clone();
        return Ok(Some(tokio::spawn(follow_endpoints(
            state,
            precise,
            per.socket_port,
            per.replay_socket_port,
            index,
            metrics,
            stop,
        ))));
    }
    let Some(ep) = precise.centralized_endpoint() else {
        return Ok(None);
    };
    let sub = Subscriber::bind(ep, precise.topic_filter())
        .await
        .map_err(|e| anyhow::anyhow!("KV events: cannot bind {ep}: {e}"))?;
    tracing::info!(endpoint = %sub.endpoint(), topic_filter = precise.topic_filter(), "receiving KV events (centralized)");
    let source = Source {
        key: None,
        replay: precise.replay_socket_port.map(Replay::Port),
    };
    let feeder = Feeder::new(index, metrics, source);
    Ok(Some(tokio::spawn(pump(sub, feeder, stop))))
}

/// Per-endpoint mode: one subscriber per endpoint the router has now,
/// started and stopped as the endpoint list changes.
async fn follow_endpoints(
    state: AppState,
    precise: PreciseConfig,
    port: u16,
    replay_port: Option<u16>,
    index: Arc<KvIndex>,
    metrics: Arc<KvEventMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut running: HashMap<String, (JoinHandle<()>, watch::Sender<bool>)> = HashMap::new();
    let mut tick = tokio::time::interval(MEMBERS_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let view = state.view();
        let mut wanted: HashMap<String, (String, Option<Replay>)> = HashMap::new();
        for d in &view.members.decode {
            let url = d
                .kv_events_url
                .clone()
                .unwrap_or_else(|| format!("tcp://{}:{port}", host_of(&d.authority)));
            wanted.insert(d.label(), (url, replay_port.map(Replay::Port)));
        }
        for p in &view.members.prefill {
            let url = p
                .kv_events_url
                .clone()
                .unwrap_or_else(|| format!("tcp://{}:{port}", host_of(&p.host_port)));
            wanted.insert(p.label(), (url, replay_port.map(Replay::Port)));
        }
        running.retain(|label, (task, tx)| {
            let keep = wanted.contains_key(label) && !task.is_finished();
            if !keep {
                let _ = tx.send(true);
                index.remove_endpoint(label);
            }
            keep
        });
        for (label, (url, replay)) in wanted {
            if running.contains_key(&label) {
                continue;
            }
            let (tx, rx) = watch::channel(false);
            let feeder = Feeder::new(
                index.clone(),
                metrics.clone(),
                Source {
                    key: Some(label.clone()),
                    replay: replay.map(|r| match r {
                        Replay::Port(p) => Replay::At(format!("tcp://{}:{p}", host_of(&url))),
                        at => at,
                    }),
                },
            );
            let filter = precise.topic_filter().to_string();
            let task = tokio::spawn(async move {
                // No connect timeout: the socket keeps trying until the engine publishes.
                match Subscriber::connect(&url, &filter, None).await {
                    Ok(sub) => pump(sub, feeder, rx).await,
                    Err(e) => {
                        tracing::warn!(endpoint = %url, error = %e, "KV events: cannot subscribe")
                    }
                }
            });
            running.insert(label, (task, tx));
        }
    }
    for (_, (task, tx)) in running {
        let _ = tx.send(true);
        let _ = task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_events::{
        Attach, BlockRemoved, BlockStored, ExternalBlockHash, Publisher, PublisherOptions,
    };
    use tokio::time::timeout;

    const WAIT: Duration = Duration::from_secs(20);
    const BS: usize = 4;

    fn batch(events: Vec<KvEvent>) -> EventBatch {
        EventBatch {
            ts: 1.0,
            events,
            data_parallel_rank: Some(0),
        }
    }

    fn stored(parent: Option<u64>, hashes: &[u64], tokens: &[u32]) -> KvEvent {
        KvEvent::BlockStored(BlockStored {
            block_hashes: hashes.iter().map(|&h| ExternalBlockHash::Int(h)).collect(),
            parent_block_hash: parent.map(ExternalBlockHash::Int),
            token_ids: tokens.to_vec(),
            block_size: BS as u32,
            medium: Some("GPU".into()),
            kv_cache_spec_kind: Some("full_attention".into()),
            ..Default::default()
        })
    }

    fn removed(hashes: &[u64]) -> KvEvent {
        KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: hashes.iter().map(|&h| ExternalBlockHash::Int(h)).collect(),
            medium: Some("GPU".into()),
            ..Default::default()
        })
    }

    fn prompt(index: &KvIndex, ids: &[u32]) -> Vec<u64> {
        let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
        index.prompt_hashes(&bytes, 64)
    }

    /// A publisher on loopback, a subscriber to it and a feeder into a fresh
    /// index, past the subscription's setup: harmless clears are published
    /// until one arrives, and every one sent is fed. Also the next sequence.
    async fn setup(replay: bool) -> (Publisher, Subscriber, Feeder, Arc<KvIndex>, u64) {
        let publisher = Publisher::start(PublisherOptions {
            endpoint: "tcp://127.0.0.1:0".into(),
            attach: Attach::Bind,
            replay_endpoint: replay.then(|| "tcp://127.0.0.1:0".into()),
            topic: TOPIC.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut sub = Subscriber::connect(publisher.endpoint(), "kv@", Some(WAIT))
            .await
            .unwrap();
        let index = Arc::new(KvIndex::new(BS, 1000));
        let source = Source {
            key: Some("e:1".into()),
            replay: publisher
                .replay_endpoint()
                .map(|r| Replay::At(r.to_string())),
        };
        let mut feeder = Feeder::new(index.clone(), Arc::default(), source);
        let end = Instant::now() + WAIT;
        let mut sent = 0;
        loop {
            assert!(Instant::now() < end, "the subscription never took");
            let clear = batch(vec![KvEvent::AllBlocksCleared]);
            publisher.publish(clear).await.unwrap();
            sent += 1;
            if let Ok(m) = timeout(Duration::from_millis(100), sub.recv()).await {
                feeder.handle(&sub, m).await;
                break;
            }
        }
        feed_through(&mut sub, &mut feeder, sent - 1).await;
        (publisher, sub, feeder, index, sent)
    }

    const TOPIC: &str = "kv@10.0.0.1:8200@m";

    /// Feeds messages until the one with sequence `seq` has been handled.
    async fn feed_through(sub: &mut Subscriber, feeder: &mut Feeder, seq: u64) {
        while sub.last_seq(TOPIC) < Some(seq) {
            let m = timeout(WAIT, sub.recv()).await.expect("a message");
            feeder.handle(sub, m).await;
        }
    }

    /// Publishes `events` (or numbers them without sending, `drop`); their sequence.
    async fn send(p: &Publisher, next: &mut u64, events: Vec<KvEvent>, drop: bool) -> u64 {
        if drop {
            p.publish_dropped(batch(events)).await.unwrap();
        } else {
            p.publish(batch(events)).await.unwrap();
        }
        *next += 1;
        *next - 1
    }

    fn dropped(f: &Feeder, reason: &'static str) -> u64 {
        let labels = super::super::metrics::ReasonLabels { reason };
        f.metrics.dropped.get_or_create(&labels).get()
    }

    #[tokio::test]
    async fn a_gap_is_filled_by_replay_and_the_index_stays_exact() {
        let (p, mut sub, mut feeder, index, mut next) = setup(true).await;
        let ids: Vec<u32> = (0..2 * BS as u32).collect();
        let s = send(&p, &mut next, vec![stored(None, &[1, 2], &ids)], false).await;
        feed_through(&mut sub, &mut feeder, s).await;
        assert_eq!(index.matched("e:1", &prompt(&index, &ids)), Some((2, true)));
        // An eviction the subscriber never hears, then another store: the gap is replayed.
        send(&p, &mut next, vec![removed(&[2])], true).await;
        let other: Vec<u32> = (100..100 + BS as u32).collect();
        let s = send(&p, &mut next, vec![stored(None, &[3], &other)], false).await;
        feed_through(&mut sub, &mut feeder, s).await;
        assert_eq!(index.matched("e:1", &prompt(&index, &ids)), Some((1, true)));
        assert_eq!(
            index.matched("e:1", &prompt(&index, &other)),
            Some((1, true))
        );
        let gaps = super::super::metrics::EndpointLabels {
            endpoint: "e:1".into(),
        };
        assert_eq!(feeder.metrics.gaps.get_or_create(&gaps).get(), 1);
        p.shutdown().await;
    }

    #[tokio::test]
    async fn without_replay_a_gap_drops_the_index_to_a_lower_bound() {
        let (p, mut sub, mut feeder, index, mut next) = setup(false).await;
        let ids: Vec<u32> = (0..2 * BS as u32).collect();
        let s = send(&p, &mut next, vec![stored(None, &[1, 2], &ids)], false).await;
        feed_through(&mut sub, &mut feeder, s).await;
        assert_eq!(index.matched("e:1", &prompt(&index, &ids)), Some((2, true)));
        send(&p, &mut next, vec![removed(&[2])], true).await;
        let other: Vec<u32> = (100..100 + BS as u32).collect();
        let s = send(&p, &mut next, vec![stored(None, &[3], &other)], false).await;
        feed_through(&mut sub, &mut feeder, s).await;
        // What the index held may be stale: gone; what followed is known, as a lower bound.
        assert_eq!(
            index.matched("e:1", &prompt(&index, &ids)),
            Some((0, false))
        );
        assert_eq!(
            index.matched("e:1", &prompt(&index, &other)),
            Some((1, false))
        );
        // A child of a block the index lost cannot be placed.
        let s = send(&p, &mut next, vec![stored(Some(2), &[4], &other)], false).await;
        feed_through(&mut sub, &mut feeder, s).await;
        assert_eq!(dropped(&feeder, "unknown_parent"), 1);
        // A cleared cache (a reset, a restarted engine) is known exactly again.
        let s = send(&p, &mut next, vec![KvEvent::AllBlocksCleared], false).await;
        feed_through(&mut sub, &mut feeder, s).await;
        assert_eq!(
            index.matched("e:1", &prompt(&index, &other)),
            Some((0, true))
        );
        p.shutdown().await;
    }

    #[test]
    fn topics_name_the_engine_address() {
        assert_eq!(
            topic_endpoint("kv@10.1.2.3:8200@meta/llama"),
            Some("10.1.2.3:8200")
        );
        assert_eq!(
            topic_endpoint("kv@[fd00::1]:8200@m@x"),
            Some("[fd00::1]:8200")
        );
        assert_eq!(topic_endpoint("kv@nohost@m"), None);
        assert_eq!(topic_endpoint(""), None);
        assert_eq!(host_of("http://10.0.0.1:8000"), "10.0.0.1");
        assert_eq!(host_of("tcp://h:5557"), "h");
        assert_eq!(host_of("h:1"), "h");
    }
}
