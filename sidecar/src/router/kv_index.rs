//! The exact prefix index: which prompt blocks each endpoint's engine holds,
//! as its KV events say (vLLM's `BlockStored`, `BlockRemoved`,
//! `AllBlocksCleared`).
//!
//! Owns: turning an engine's stored runs into the router's own chain keys
//! (`prefix::chain_from` over the run's token ids, continued from the parent
//! block's key), so a prompt's [`KvIndex::prompt_hashes`] look up what an
//! engine holds without knowing the engine's hash function or its seed
//! (`PYTHONHASHSEED`, or vLLM's default pickle-based `sha256`); per endpoint,
//! whether the index is complete (`synced`: followed from a known point;
//! false after a sequence gap that a replay did not close, for a late joiner
//! whose history is gone, or past the size bound: then it is a lower bound,
//! which the scheduler combines with the approximate index). It does not
//! know about ZMQ, the wire encodings or scores.
//!
//! Chains start from one root for every model: an engine serves one model,
//! and the events' topic need not name it. Runs shaped by a LoRA adapter or
//! extra keys start from another root, so no plain prompt matches them.
//!
//! Endpoints are known by the `host:port` their events name (vLLM's topic
//! `kv@<pod ip>:<port>@<model>`, the engine's port) or the router connected
//! to; a router endpoint (`host:port` of its pd-sidecar) finds its index by
//! the exact address, else by the host alone when one index has it.
//!
//! An engine's block is known by (data-parallel rank, medium, engine hash):
//! two ranks, or a GPU block and its CPU copy, are separate entries with the
//! same chain key, and the key counts as held while any of them is.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::prefix::{block_hashes, chain_from, chain_root, BYTES_PER_TOKEN};
use crate::config::split_host_port;

/// One run of stored blocks from a `BlockStored` event.
#[derive(Debug, Clone, Copy)]
pub struct StoredRun<'a> {
    pub dp_rank: u32,
    /// The storage medium (`GPU`, `CPU`, ...); None is the GPU.
    pub medium: Option<&'a str>,
    /// The engine's hash of the block before the run; None at a prompt's start.
    pub parent: Option<u64>,
    /// The engine's hashes of the run's blocks, in order.
    pub hashes: &'a [u64],
    /// `block_size` token ids per block.
    pub token_ids: &'a [u32],
    pub block_size: usize,
    /// A LoRA adapter or per-block extra keys (multimodal inputs, cache
    /// salt) shaped the engine's hashes: the blocks are indexed under keys no
    /// plain prompt of the model produces.
    pub tagged: bool,
}

/// Why a stored run was not indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// Its block size is not the router's.
    BlockSize { theirs: usize, ours: usize },
    /// `token_ids` is not `hashes.len() * block_size` long.
    Malformed,
    /// Its parent block is not in the index (events were missed).
    UnknownParent,
}

#[derive(Default)]
struct Endpoint {
    /// (dp rank, medium, engine hash) -> chain key.
    blocks: HashMap<(u32, u32, u64), u64>,
    /// Chain key -> engine blocks holding it.
    held: HashMap<u64, u32>,
    /// Medium names, numbered as met.
    media: Vec<String>,
    synced: bool,
    last_event: Option<Instant>,
}

impl Endpoint {
    fn medium(&mut self, m: Option<&str>) -> u32 {
        let m = m.unwrap_or("GPU");
        match self.media.iter().position(|x| x.eq_ignore_ascii_case(m)) {
            Some(i) => i as u32,
            None => {
                self.media.push(m.to_string());
                (self.media.len() - 1) as u32
            }
        }
    }

    fn clear(&mut self) {
        self.blocks.clear();
        self.held.clear();
    }

    fn insert(&mut self, at: (u32, u32, u64), key: u64) {
        if let Some(old) = self.blocks.insert(at, key) {
            self.unhold(old);
        }
        *self.held.entry(key).or_insert(0) += 1;
    }

    fn unhold(&mut self, key: u64) {
        if let Some(n) = self.held.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&key);
            }
        }
    }
}

/// A point-in-time view of one endpoint's index, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStats {
    pub endpoint: String,
    pub blocks: usize,
    pub synced: bool,
    pub last_event: Option<Instant>,
}

/// Every endpoint's exact index, keyed by the endpoint's address as the
/// router names it (`host:port`).
pub struct KvIndex {
    block_size: usize,
    /// Entries per endpoint before its index is dropped (a publisher that
    /// never removes would otherwise grow it without end).
    max_blocks: usize,
    endpoints: Mutex<HashMap<String, Endpoint>>,
    /// Per router endpoint (its own label): chain keys of recent picks and
    /// when they stop counting (llm-d's speculative indexing).
    speculative: Mutex<HashMap<String, HashMap<u64, Instant>>>,
}

impl KvIndex {
    pub fn new(block_size: usize, max_blocks: usize) -> KvIndex {
        KvIndex {
            block_size: block_size.max(1),
            max_blocks: max_blocks.max(1),
            endpoints: Mutex::new(HashMap::new()),
            speculative: Mutex::new(HashMap::new()),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Endpoint>> {
        // A panic while holding the lock leaves an index no worse than stale.
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Indexes a stored run for `model` on `endpoint`; the number of blocks
    /// indexed.
    pub fn stored(&self, endpoint: &str, run: &StoredRun<'_>) -> Result<usize, Skipped> {
        if run.block_size != self.block_size {
            return Err(Skipped::BlockSize {
                theirs: run.block_size,
                ours: self.block_size,
            });
        }
        if run.token_ids.len() != run.hashes.len() * run.block_size {
            return Err(Skipped::Malformed);
        }
        let mut all = self.lock();
        let ep = all.entry(endpoint.to_string()).or_default();
        ep.last_event = Some(Instant::now());
        let medium = ep.medium(run.medium);
        let prev = match run.parent {
            None => chain_root("") ^ if run.tagged { TAGGED } else { 0 },
            Some(p) => match ep.blocks.get(&(run.dp_rank, medium, p)).or_else(|| {
                // A parent offloaded to another medium still chains.
                (0..ep.media.len() as u32).find_map(|m| ep.blocks.get(&(run.dp_rank, m, p)))
            }) {
                Some(&k) => k,
                None => return Err(Skipped::UnknownParent),
            },
        };
        let bytes: Vec<u8> = run.token_ids.iter().flat_map(|t| t.to_le_bytes()).collect();
        let keys = chain_from(prev, &bytes, run.block_size, run.hashes.len());
        debug_assert_eq!(keys.len(), run.hashes.len());
        debug_assert_eq!(
            bytes.len(),
            run.hashes.len() * run.block_size * BYTES_PER_TOKEN
        );
        for (&h, &k) in run.hashes.iter().zip(&keys) {
            ep.insert((run.dp_rank, medium, h), k);
        }
        if ep.blocks.len() > self.max_blocks {
            tracing::warn!(
                endpoint,
                blocks = ep.blocks.len(),
                bound = self.max_blocks,
                "KV-event index past its bound: dropped; the approximate index serves this endpoint"
            );
            ep.clear();
            ep.synced = false;
        }
        Ok(keys.len())
    }

    /// Forgets the engine's blocks `hashes` of `medium` on `endpoint`; how
    /// many were known.
    pub fn removed(
        &self,
        endpoint: &str,
        dp_rank: u32,
        medium: Option<&str>,
        hashes: &[u64],
    ) -> usize {
        let mut all = self.lock();
        let Some(ep) = all.get_mut(endpoint) else {
            return 0;
        };
        ep.last_event = Some(Instant::now());
        let medium = ep.medium(medium);
        let mut known = 0;
        for &h in hashes {
            if let Some(k) = ep.blocks.remove(&(dp_rank, medium, h)) {
                ep.unhold(k);
                known += 1;
            }
        }
        known
    }

    /// The engine dropped its whole cache (`AllBlocksCleared`, a restart).
    pub fn cleared(&self, endpoint: &str) {
        let mut all = self.lock();
        let ep = all.entry(endpoint.to_string()).or_default();
        ep.last_event = Some(Instant::now());
        ep.clear();
    }

    /// Whether `endpoint`'s index is complete from here on: true once its
    /// event stream is followed from a known point (the first event of a
    /// fresh engine, or a replay that closed a gap); false drops what it had.
    pub fn set_synced(&self, endpoint: &str, synced: bool) {
        let mut all = self.lock();
        let ep = all.entry(endpoint.to_string()).or_default();
        if !synced {
            ep.clear();
        }
        ep.synced = synced;
    }

    /// Forgets an endpoint that left.
    pub fn remove_endpoint(&self, endpoint: &str) {
        self.lock().remove(endpoint);
        self.speculative
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(endpoint);
    }

    /// The chain keys of a prompt laid out as token ids (4 little-endian
    /// bytes each), at most `max_blocks` of them.
    pub fn prompt_hashes(&self, bytes: &[u8], max_blocks: usize) -> Vec<u64> {
        block_hashes("", bytes, self.block_size, max_blocks)
    }

    /// How many leading blocks of `hashes` ([`KvIndex::prompt_hashes`]) the
    /// router endpoint `endpoint` holds, and whether that count is exact
    /// (the index is synced) or a lower bound; None when no events name it.
    /// Unexpired speculative entries of the endpoint count as held.
    pub fn matched(&self, endpoint: &str, hashes: &[u64]) -> Option<(usize, bool)> {
        let all = self.lock();
        let ep = find(&all, endpoint);
        let spec = self.speculative.lock().unwrap_or_else(|e| e.into_inner());
        let guess = spec.get(endpoint);
        if ep.is_none() && guess.is_none() {
            return None;
        }
        let now = Instant::now();
        let n = hashes
            .iter()
            .take_while(|h| {
                ep.is_some_and(|e| e.held.contains_key(h))
                    || guess.and_then(|g| g.get(h)).is_some_and(|&t| t > now)
            })
            .count();
        Some((n, ep.is_some_and(|e| e.synced)))
    }

    /// Counts `keys` as held by the router endpoint `endpoint` for `ttl`:
    /// the router just sent it this prompt, and its events will say so only
    /// once the engine has stored the blocks.
    pub fn speculate(&self, endpoint: &str, keys: &[u64], ttl: Duration) {
        if keys.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut spec = self.speculative.lock().unwrap_or_else(|e| e.into_inner());
        let entries = spec.entry(endpoint.to_string()).or_default();
        if entries.len() + keys.len() > self.max_blocks {
            entries.retain(|_, &mut t| t > now);
            if entries.len() + keys.len() > self.max_blocks {
                entries.clear();
            }
        }
        for &k in keys {
            entries.insert(k, now + ttl);
        }
    }

    pub fn stats(&self) -> Vec<EndpointStats> {
        let mut out: Vec<EndpointStats> = self
            .lock()
            .iter()
            .map(|(name, ep)| EndpointStats {
                endpoint: name.clone(),
                blocks: ep.blocks.len(),
                synced: ep.synced,
                last_event: ep.last_event,
            })
            .collect();
        out.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        out
    }
}

/// `endpoint`'s index: by its exact address, else by its host when exactly
/// one index is on that host (the engine's port behind a sidecar's).
fn find<'a>(all: &'a HashMap<String, Endpoint>, endpoint: &str) -> Option<&'a Endpoint> {
    if let Some(ep) = all.get(endpoint) {
        return Some(ep);
    }
    // A decode endpoint's label carries its scheme; events name `host:port`.
    let bare = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    if let Some(ep) = all.get(bare) {
        return Some(ep);
    }
    let host = host_of(endpoint);
    let mut same = all.iter().filter(|(k, _)| host_of(k) == host);
    match (same.next(), same.next()) {
        (Some((_, ep)), None) => Some(ep),
        _ => None,
    }
}

/// The host part of `host:port` or `scheme://host:port` (`[v6]:port` keeps
/// its brackets); the address itself when it has no port.
pub(crate) fn host_of(addr: &str) -> &str {
    let addr = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    split_host_port(addr).map_or(addr, |(h, _)| h)
}

/// Mixed into the chain root of tagged runs (LoRA, extra keys).
const TAGGED: u64 = 0x5a17_ed00_7a99_ed01;

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4;

    fn ids(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + seed).collect()
    }

    fn prompt_hashes(ids: &[u32]) -> Vec<u64> {
        let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
        KvIndex::new(BS, 1).prompt_hashes(&bytes, usize::MAX)
    }

    fn run<'a>(parent: Option<u64>, hashes: &'a [u64], token_ids: &'a [u32]) -> StoredRun<'a> {
        StoredRun {
            dp_rank: 0,
            medium: None,
            parent,
            hashes,
            token_ids,
            block_size: BS,
            tagged: false,
        }
    }

    #[test]
    fn a_run_and_its_continuation_match_the_prompts_own_chain() {
        let idx = KvIndex::new(BS, 1000);
        idx.set_synced("10.0.0.1:8200", true);
        let prompt = ids(5 * BS + 2, 3);
        // The engine stored 3 blocks, then 2 more after them, with its own hashes.
        let e = "10.0.0.1:8200";
        idx.stored(e, &run(None, &[901, 902, 903], &prompt[..3 * BS]))
            .unwrap();
        idx.stored(e, &run(Some(903), &[904, 905], &prompt[3 * BS..5 * BS]))
            .unwrap();
        let hashes = prompt_hashes(&prompt);
        assert_eq!(hashes.len(), 5);
        assert_eq!(idx.matched(e, &hashes), Some((5, true)));
        // The router knows the pod by its sidecar's port: found by host.
        assert_eq!(idx.matched("10.0.0.1:8000", &hashes), Some((5, true)));
        assert_eq!(
            idx.matched("http://10.0.0.1:8000", &hashes),
            Some((5, true))
        );
        assert_eq!(idx.matched("10.0.0.2:8000", &hashes), None);
        // The same ids from elsewhere in a prompt do not match.
        assert_eq!(
            idx.matched(e, &prompt_hashes(&prompt[BS..])),
            Some((0, true))
        );
        // Evicting block 2 leaves block 1 matched.
        assert_eq!(idx.removed(e, 0, Some("GPU"), &[902]), 1);
        assert_eq!(idx.matched(e, &hashes), Some((1, true)));
        idx.cleared(e);
        assert_eq!(idx.matched(e, &hashes), Some((0, true)));
    }

    #[test]
    fn two_engines_on_one_host_are_found_by_exact_address_only() {
        let idx = KvIndex::new(BS, 1000);
        let prompt = ids(BS, 5);
        idx.stored("h:8200", &run(None, &[1], &prompt)).unwrap();
        idx.stored("h:8300", &run(None, &[1], &prompt)).unwrap();
        assert_eq!(idx.matched("h:8000", &prompt_hashes(&prompt)), None);
        assert_eq!(
            idx.matched("h:8300", &prompt_hashes(&prompt)),
            Some((1, false))
        );
        assert_eq!(
            idx.matched("http://h:8300", &prompt_hashes(&prompt)),
            Some((1, false))
        );
    }

    #[test]
    fn unsynced_endpoints_and_bad_runs_are_told_apart() {
        let idx = KvIndex::new(BS, 1000);
        let prompt = ids(2 * BS, 1);
        idx.stored("e:1", &run(None, &[1, 2], &prompt)).unwrap();
        // Known, but not followed from a known point: a lower bound.
        assert_eq!(
            idx.matched("e:1", &prompt_hashes(&prompt)),
            Some((2, false))
        );
        assert_eq!(
            idx.stored("e:1", &run(Some(77), &[3], &prompt[..BS])),
            Err(Skipped::UnknownParent)
        );
        assert_eq!(
            idx.stored("e:1", &run(None, &[3, 4], &prompt[..BS])),
            Err(Skipped::Malformed)
        );
        let mut wide = run(None, &[5], &prompt);
        wide.block_size = 2 * BS;
        assert_eq!(
            idx.stored("e:1", &wide),
            Err(Skipped::BlockSize { theirs: 8, ours: 4 })
        );
        // Losing sync drops what was known.
        idx.set_synced("e:1", true);
        assert_eq!(idx.matched("e:1", &prompt_hashes(&prompt)), Some((2, true)));
        idx.set_synced("e:1", false);
        assert_eq!(
            idx.matched("e:1", &prompt_hashes(&prompt)),
            Some((0, false))
        );
    }

    #[test]
    fn ranks_and_media_hold_a_block_until_the_last_copy_goes() {
        let idx = KvIndex::new(BS, 1000);
        idx.set_synced("e:1", true);
        let prompt = ids(BS, 9);
        let h = prompt_hashes(&prompt);
        idx.stored("e:1", &run(None, &[10], &prompt)).unwrap();
        let mut cpu = run(None, &[10], &prompt);
        cpu.medium = Some("CPU");
        idx.stored("e:1", &cpu).unwrap();
        let mut rank1 = run(None, &[10], &prompt);
        rank1.dp_rank = 1;
        idx.stored("e:1", &rank1).unwrap();
        idx.removed("e:1", 0, None, &[10]);
        idx.removed("e:1", 1, None, &[10]);
        assert_eq!(
            idx.matched("e:1", &h),
            Some((1, true)),
            "the CPU copy still holds it"
        );
        idx.removed("e:1", 0, Some("cpu"), &[10]);
        assert_eq!(idx.matched("e:1", &h), Some((0, true)));
        // A tagged run (LoRA, extra keys) never matches a plain prompt.
        let mut lora = run(None, &[11], &prompt);
        lora.tagged = true;
        idx.stored("e:1", &lora).unwrap();
        assert_eq!(idx.matched("e:1", &h), Some((0, true)));
    }

    #[test]
    fn a_speculative_pick_counts_until_its_ttl() {
        let idx = KvIndex::new(BS, 1000);
        let prompt = ids(2 * BS, 4);
        let h = prompt_hashes(&prompt);
        assert_eq!(idx.matched("http://10.0.0.1:8000", &h), None);
        idx.speculate("http://10.0.0.1:8000", &h, Duration::from_secs(60));
        assert_eq!(idx.matched("http://10.0.0.1:8000", &h), Some((2, false)));
        // The engine's events are still found by host, and say more than the guess.
        idx.set_synced("10.0.0.1:8200", true);
        idx.stored("10.0.0.1:8200", &run(None, &[1], &prompt[..BS]))
            .unwrap();
        assert_eq!(idx.matched("http://10.0.0.1:8000", &h), Some((2, true)));
        // An expired guess counts for nothing.
        idx.speculate("http://10.0.0.2:8000", &h, Duration::ZERO);
        assert_eq!(idx.matched("http://10.0.0.2:8000", &h), Some((0, false)));
    }

    #[test]
    fn an_index_past_its_bound_is_dropped_and_unsynced() {
        let idx = KvIndex::new(BS, 3);
        idx.set_synced("e:1", true);
        let prompt = ids(4 * BS, 2);
        idx.stored("e:1", &run(None, &[1, 2, 3, 4], &prompt))
            .unwrap();
        assert_eq!(
            idx.matched("e:1", &prompt_hashes(&prompt)),
            Some((0, false))
        );
        assert_eq!(idx.stats()[0].blocks, 0);
    }
}
