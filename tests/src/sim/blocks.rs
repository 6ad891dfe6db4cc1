//! The simulator's KV block pool: block-id allocation, the prefix cache, and the blocks a
//! prefill-role request holds for a remote decode (until a release notification or expiry).
//! Knows nothing about HTTP or about the bytes (`kv` owns those).
//!
//! Prefix cache, as vLLM's: a full block is known by the hash chain of the tokens up to its end.
//! A finished request's blocks go to the back of the free queue with their hash, so a later
//! request with the same prefix finds them (a hit) until they are reused for something else,
//! front of the queue first (least recently used). Blocks are reference-counted: two running
//! requests with one prefix share its blocks. As in vLLM's `free_blocks`, a request's blocks are
//! freed last block first, and blocks holding no cached prefix go to the front of the queue, so a
//! prompt's tail is evicted before its head and the head stays reachable.
//!
//! KV events, as vLLM's `BlockPool` queues them (`kv_event_queue`): a pool made
//! [`BlockPool::with_events`] queues a [`CacheEvent`] under its lock for every change to the
//! prefix cache, in the order the changes happen; `events` drains them into batches. The
//! pool's own `u64` chain hash keys the cache; the engine's hash of each cached block (vLLM's
//! `sha256_cbor` digest, computed by the caller) is kept beside it only to name the block in
//! events, so a removal names the hash its store did.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sidecar::kv_events::BlockHash as EngineHash;

pub type BlockId = u32;

/// A change to the prefix cache, named by the engine's block hashes (vLLM's `BlockStored`,
/// `BlockRemoved` and `AllBlocksCleared` before they are put on the wire).
#[derive(Debug, Clone, PartialEq)]
pub enum CacheEvent {
    /// A run of a prompt's full blocks became cached: `hashes[i]` holds
    /// `token_ids[i * block_size..][..block_size]`, chained from `parent` (the hash of the
    /// prompt's block before the run; `None` when the run starts the prompt).
    Stored {
        parent: Option<EngineHash>,
        hashes: Vec<EngineHash>,
        token_ids: Vec<u32>,
    },
    /// A cached block was reused for other content.
    Removed(EngineHash),
    /// The whole prefix cache was dropped (`/reset_prefix_cache`).
    Cleared,
}

/// The engine's view of a prompt's full blocks, given to [`BlockPool::publish`] so the pool can
/// name them in [`CacheEvent`]s.
#[derive(Debug, Clone, Copy)]
pub struct EngineBlocks<'a> {
    /// The engine hash of each full block, in prompt order (one per pool hash).
    pub hashes: &'a [EngineHash],
    /// The prompt's token ids (at least `block_size * hashes.len()` of them).
    pub token_ids: &'a [u32],
    pub block_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("out of KV blocks: {needed} needed, {free} free of {total}")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
    pub total: usize,
}

/// A point-in-time view of the pool, for `/sim/state` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub num_blocks: usize,
    /// Blocks no request uses (cached ones included: they can be evicted).
    pub free_blocks: usize,
    /// Free blocks that still hold a cached prefix.
    pub cached_blocks: usize,
    pub held_requests: usize,
    pub held_blocks: usize,
    pub released_blocks_total: u64,
    pub expired_blocks_total: u64,
    pub evicted_blocks_total: u64,
}

struct Held {
    blocks: Vec<BlockId>,
    deadline: Instant,
}

struct Inner {
    /// Users of each block; 0 = free.
    refs: Vec<u32>,
    /// The prefix hash a block holds, if it is a cached full block.
    hash: Vec<Option<u64>>,
    /// The engine hash of a cached block, when the publisher gave one (see [`EngineBlocks`]).
    engine_hash: Vec<Option<EngineHash>>,
    /// hash -> block holding that prefix.
    index: HashMap<u64, BlockId>,
    /// Free blocks, least recently used first, each with the generation it was freed in. An
    /// entry goes stale when its block is taken by a cache hit (and perhaps freed again, under a
    /// new generation); `in_free` and `free_gen` say whether an entry is current.
    free: VecDeque<(BlockId, u32)>,
    in_free: Vec<bool>,
    free_gen: Vec<u32>,
    free_count: usize,
    /// Queued events (`None`: the pool records none).
    events: Option<Vec<CacheEvent>>,
    held: HashMap<String, Held>,
    released_blocks_total: u64,
    expired_blocks_total: u64,
    evicted_blocks_total: u64,
}

impl Inner {
    fn take_free(&mut self) -> Option<BlockId> {
        while let Some((b, generation)) = self.free.pop_front() {
            if self.in_free[b as usize] && self.free_gen[b as usize] == generation {
                self.in_free[b as usize] = false;
                self.free_count -= 1;
                if let Some(h) = self.hash[b as usize].take() {
                    // Reused for new content: the cached prefix is gone.
                    self.index.remove(&h);
                    self.evicted_blocks_total += 1;
                    self.removed(b);
                }
                return Some(b);
            }
        }
        None
    }

    /// Queues the removal of block `b`'s cached prefix, if the engine named it.
    fn removed(&mut self, b: BlockId) {
        if let Some(h) = self.engine_hash[b as usize].take() {
            if let Some(events) = &mut self.events {
                events.push(CacheEvent::Removed(h));
            }
        }
    }

    /// Takes block `b` out of the free queue (a cache hit on a free block).
    fn unfree(&mut self, b: BlockId) {
        self.in_free[b as usize] = false;
        self.free_count -= 1;
    }

    fn put(&mut self, b: BlockId) {
        let i = b as usize;
        self.refs[i] = self.refs[i].saturating_sub(1);
        if self.refs[i] == 0 {
            self.in_free[i] = true;
            self.free_gen[i] = self.free_gen[i].wrapping_add(1);
            self.free_count += 1;
            let entry = (b, self.free_gen[i]);
            // vLLM: blocks without a cached prefix can never be hit, so they are reused first.
            if self.hash[i].is_some() {
                self.free.push_back(entry);
            } else {
                self.free.push_front(entry);
            }
        }
    }

    /// Frees a request's blocks, given in prompt order, last block first (vLLM's eviction
    /// order: a prompt's tail goes before its head).
    fn put_all(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            self.put(b);
        }
    }
}

pub struct BlockPool {
    num_blocks: usize,
    inner: Mutex<Inner>,
}

impl BlockPool {
    pub fn new(num_blocks: u32) -> Arc<BlockPool> {
        BlockPool::build(num_blocks, false)
    }

    /// A pool that queues a [`CacheEvent`] for every change to its prefix cache; drain them
    /// with [`BlockPool::take_events`].
    pub fn with_events(num_blocks: u32) -> Arc<BlockPool> {
        BlockPool::build(num_blocks, true)
    }

    fn build(num_blocks: u32, events: bool) -> Arc<BlockPool> {
        let n = num_blocks as usize;
        Arc::new(BlockPool {
            num_blocks: n,
            inner: Mutex::new(Inner {
                refs: vec![0; n],
                hash: vec![None; n],
                engine_hash: vec![None; n],
                index: HashMap::new(),
                free: (0..num_blocks).map(|b| (b, 0)).collect(),
                in_free: vec![true; n],
                free_gen: vec![0; n],
                free_count: n,
                events: events.then(Vec::new),
                held: HashMap::new(),
                released_blocks_total: 0,
                expired_blocks_total: 0,
                evicted_blocks_total: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `n` blocks without looking at the prefix cache.
    pub fn allocate(self: &Arc<Self>, n: usize) -> Result<Allocation, OutOfBlocks> {
        self.allocate_prefix(n, &[])
    }

    /// Takes `n` blocks for a prompt whose full blocks have the chain hashes `prefix`: the
    /// longest run of those already cached is reused (shared), the rest are fresh blocks. The
    /// allocation's `cached_blocks()` says how many came from the cache.
    pub fn allocate_prefix(
        self: &Arc<Self>,
        n: usize,
        prefix: &[u64],
    ) -> Result<Allocation, OutOfBlocks> {
        let mut inner = self.lock();
        let mut hits = Vec::new();
        for h in prefix.iter().take(n) {
            match inner.index.get(h) {
                Some(&b) => hits.push(b),
                None => break,
            }
        }
        // Hits that are free right now leave the free count when taken.
        let free_hits = hits
            .iter()
            .filter(|&&b| inner.refs[b as usize] == 0)
            .count();
        let fresh = n - hits.len();
        let free = inner.free_count;
        if fresh + free_hits > free {
            return Err(OutOfBlocks {
                needed: n,
                free,
                total: self.num_blocks,
            });
        }
        let mut blocks = Vec::with_capacity(n);
        for &b in &hits {
            if inner.refs[b as usize] == 0 {
                inner.unfree(b);
            }
            inner.refs[b as usize] += 1;
            blocks.push(b);
        }
        for _ in 0..fresh {
            let b = inner.take_free().expect("counted free blocks");
            inner.refs[b as usize] = 1;
            blocks.push(b);
        }
        Ok(Allocation {
            pool: Arc::clone(self),
            blocks,
            cached: hits.len(),
        })
    }

    /// Publishes `blocks[i]` as holding the prefix `hashes[i]` (their bytes are now written), so
    /// later requests can hit them. A hash already cached in another block keeps that block.
    /// With `engine`, each run of newly cached blocks queues one [`CacheEvent::Stored`] (vLLM's
    /// `cache_full_blocks`); returns the index ranges of those runs.
    pub fn publish(
        &self,
        blocks: &[BlockId],
        hashes: &[u64],
        engine: Option<EngineBlocks<'_>>,
    ) -> Vec<Range<usize>> {
        let mut inner = self.lock();
        let mut runs: Vec<Range<usize>> = Vec::new();
        for (i, (&b, &h)) in blocks.iter().zip(hashes).enumerate() {
            if inner.hash[b as usize] == Some(h) || inner.index.contains_key(&h) {
                continue;
            }
            if let Some(old) = inner.hash[b as usize].replace(h) {
                inner.index.remove(&old);
                inner.removed(b);
            }
            inner.index.insert(h, b);
            inner.engine_hash[b as usize] = engine.and_then(|e| e.hashes.get(i).copied());
            match runs.last_mut() {
                Some(run) if run.end == i => run.end = i + 1,
                _ => runs.push(i..i + 1),
            }
        }
        if let (Some(e), Some(events)) = (engine, inner.events.as_mut()) {
            for run in &runs {
                let Some(run_hashes) = e.hashes.get(run.clone()) else {
                    continue;
                };
                let tokens = e
                    .token_ids
                    .get(run.start * e.block_size..run.end * e.block_size)
                    .unwrap_or_default();
                events.push(CacheEvent::Stored {
                    parent: run
                        .start
                        .checked_sub(1)
                        .and_then(|p| e.hashes.get(p).copied()),
                    hashes: run_hashes.to_vec(),
                    token_ids: tokens.to_vec(),
                });
            }
        }
        runs
    }

    /// vLLM's `reset_prefix_cache`: forgets every cached prefix, only while no block is in use
    /// (running requests and holds keep theirs); returns whether it did. Queues
    /// [`CacheEvent::Cleared`] when it did.
    pub fn reset_prefix_cache(&self) -> bool {
        let mut inner = self.lock();
        if inner.free_count != self.num_blocks {
            return false;
        }
        let inner = &mut *inner;
        inner.index.clear();
        inner.hash.iter_mut().for_each(|h| *h = None);
        inner.engine_hash.iter_mut().for_each(|h| *h = None);
        if let Some(events) = &mut inner.events {
            events.push(CacheEvent::Cleared);
        }
        true
    }

    /// Drains the queued events, oldest first (vLLM's `take_events`).
    pub fn take_events(&self) -> Vec<CacheEvent> {
        self.lock()
            .events
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Frees the blocks held under `id`; returns how many, or None if `id` holds nothing.
    pub fn release(&self, id: &str) -> Option<usize> {
        let mut inner = self.lock();
        let held = inner.held.remove(id)?;
        let n = held.blocks.len();
        inner.released_blocks_total += n as u64;
        inner.put_all(&held.blocks);
        Some(n)
    }

    /// Frees every hold whose deadline is at or before `now`; returns the number of blocks freed.
    pub fn expire(&self, now: Instant) -> usize {
        let mut inner = self.lock();
        let expired: Vec<String> = inner
            .held
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let mut freed = 0;
        for id in expired {
            if let Some(h) = inner.held.remove(&id) {
                freed += h.blocks.len();
                inner.put_all(&h.blocks);
                tracing::warn!(remote_request_id = %id, "held blocks expired without a release notification");
            }
        }
        inner.expired_blocks_total += freed as u64;
        freed
    }

    pub fn stats(&self) -> PoolStats {
        let inner = self.lock();
        PoolStats {
            num_blocks: self.num_blocks,
            free_blocks: inner.free_count,
            cached_blocks: inner
                .index
                .values()
                .filter(|&&b| inner.refs[b as usize] == 0)
                .count(),
            held_requests: inner.held.len(),
            held_blocks: inner.held.values().map(|h| h.blocks.len()).sum(),
            released_blocks_total: inner.released_blocks_total,
            expired_blocks_total: inner.expired_blocks_total,
            evicted_blocks_total: inner.evicted_blocks_total,
        }
    }
}

/// Blocks in use by one running request.
pub struct Allocation {
    pool: Arc<BlockPool>,
    blocks: Vec<BlockId>,
    cached: usize,
}

impl Allocation {
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// How many leading blocks came from the prefix cache (their bytes are already there).
    pub fn cached_blocks(&self) -> usize {
        self.cached
    }

    /// Keeps the blocks after the request finishes, under `id`, until `release(id)` or until
    /// `ttl` has passed. Returns the block ids. A previous hold under the same id is freed.
    pub fn hold(mut self, id: &str, ttl: Duration) -> Vec<BlockId> {
        let blocks = std::mem::take(&mut self.blocks);
        let mut inner = self.pool.lock();
        let held = Held {
            blocks: blocks.clone(),
            deadline: Instant::now() + ttl,
        };
        if let Some(old) = inner.held.insert(id.to_string(), held) {
            inner.put_all(&old.blocks);
        }
        blocks
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        if !self.blocks.is_empty() {
            let blocks = std::mem::take(&mut self.blocks);
            self.pool.lock().put_all(&blocks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_returns_blocks_on_drop() {
        let pool = BlockPool::new(8);
        let a = pool.allocate(3).unwrap();
        assert_eq!(a.blocks(), &[0, 1, 2]);
        assert_eq!(pool.stats().free_blocks, 5);
        let err = pool.allocate(6).err().unwrap();
        assert_eq!(err.needed, 6);
        assert_eq!(err.free, 5);
        drop(a);
        assert_eq!(pool.stats().free_blocks, 8);
    }

    #[test]
    fn hold_survives_until_release() {
        let pool = BlockPool::new(8);
        let ids = pool
            .allocate(2)
            .unwrap()
            .hold("r1", Duration::from_secs(60));
        assert_eq!(ids.len(), 2);
        let s = pool.stats();
        assert_eq!((s.held_requests, s.held_blocks, s.free_blocks), (1, 2, 6));
        assert_eq!(pool.release("r1"), Some(2));
        assert_eq!(pool.release("r1"), None);
        let s = pool.stats();
        assert_eq!(
            (s.held_blocks, s.free_blocks, s.released_blocks_total),
            (0, 8, 2)
        );
    }

    #[test]
    fn expiry_frees_only_past_deadline() {
        let pool = BlockPool::new(8);
        pool.allocate(1).unwrap().hold("short", Duration::ZERO);
        pool.allocate(2)
            .unwrap()
            .hold("long", Duration::from_secs(3600));
        assert_eq!(pool.expire(Instant::now()), 1);
        let s = pool.stats();
        assert_eq!(
            (s.held_requests, s.held_blocks, s.expired_blocks_total),
            (1, 2, 1)
        );
        assert_eq!(s.free_blocks, 6);
    }

    #[test]
    fn prefix_hits_share_blocks_and_survive_until_evicted() {
        let pool = BlockPool::new(6);
        let a = pool.allocate_prefix(3, &[10, 11]).unwrap();
        assert_eq!(a.cached_blocks(), 0);
        pool.publish(&a.blocks()[..2], &[10, 11], None);
        let first = a.blocks().to_vec();
        // A concurrent request with the same prefix shares the two full blocks.
        let b = pool.allocate_prefix(3, &[10, 11]).unwrap();
        assert_eq!(b.cached_blocks(), 2);
        assert_eq!(b.blocks()[..2], first[..2]);
        assert_eq!(pool.stats().free_blocks, 2, "2 shared + 2 private in use");
        drop(a);
        drop(b);
        let s = pool.stats();
        assert_eq!((s.free_blocks, s.cached_blocks), (6, 2));
        // A different prefix hits nothing; the cached blocks are the most recently freed, so the
        // fresh ones come from the least recently used end.
        let c = pool.allocate_prefix(2, &[99]).unwrap();
        assert_eq!(c.cached_blocks(), 0);
        assert!(!c.blocks().contains(&first[0]) && !c.blocks().contains(&first[1]));
        drop(c);
        let d = pool.allocate_prefix(2, &[10, 11]).unwrap();
        assert_eq!(d.cached_blocks(), 2, "still cached");
        drop(d);
        // Filling the pool evicts the cached prefix.
        let e = pool.allocate(6).unwrap();
        assert_eq!(pool.stats().evicted_blocks_total, 2);
        drop(e);
        assert_eq!(
            pool.allocate_prefix(2, &[10, 11]).unwrap().cached_blocks(),
            0
        );
    }

    #[test]
    fn a_hit_refreshes_a_free_blocks_place_in_the_lru() {
        let pool = BlockPool::new(3);
        let a = pool.allocate_prefix(1, &[1]).unwrap();
        pool.publish(a.blocks(), &[1], None);
        drop(a);
        let b = pool.allocate_prefix(1, &[2]).unwrap();
        pool.publish(b.blocks(), &[2], None);
        drop(b);
        // Prefix 1 is used again: it is now more recent than prefix 2, although its first free
        // queue entry is older.
        assert_eq!(pool.allocate_prefix(1, &[1]).unwrap().cached_blocks(), 1);
        let c = pool.allocate(2).unwrap();
        drop(c);
        assert_eq!(pool.allocate_prefix(1, &[1]).unwrap().cached_blocks(), 1);
        assert_eq!(pool.allocate_prefix(1, &[2]).unwrap().cached_blocks(), 0);
    }

    #[test]
    fn a_miss_stops_the_prefix_and_full_pools_refuse() {
        let pool = BlockPool::new(4);
        let a = pool.allocate_prefix(2, &[1, 2]).unwrap();
        pool.publish(a.blocks(), &[1, 2], None);
        drop(a);
        // Block 2 of this prompt differs: only the first block hits.
        let b = pool.allocate_prefix(3, &[1, 7, 8]).unwrap();
        assert_eq!(b.cached_blocks(), 1);
        let err = pool.allocate_prefix(2, &[]).err().unwrap();
        assert_eq!((err.needed, err.free), (2, 1));
        // A hit on a block in use costs no free block.
        let c = pool.allocate_prefix(2, &[1, 9]).unwrap();
        assert_eq!(c.cached_blocks(), 1);
    }
}
