//! The simulator's KV block pool: block-id allocation, the prefix cache, and the blocks a
//! prefill-role request holds for a remote decode (until a release notification or expiry).
//! Knows nothing about HTTP or about the bytes (`kv` owns those).
//!
//! Prefix cache, as vLLM's: a full block is known by the hash chain of the tokens up to its end.
//! A finished request's blocks go to the back of the free queue with their hash, so a later
//! request with the same prefix finds them (a hit) until they are reused for something else,
//! front of the queue first (least recently used). Blocks are reference-counted: two running
//! requests with one prefix share its blocks.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub type BlockId = u32;

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
    /// hash -> block holding that prefix.
    index: HashMap<u64, BlockId>,
    /// Free blocks, least recently freed first. Entries go stale when a free block is taken by a
    /// cache hit; `in_free` says whether an entry is current.
    free: VecDeque<BlockId>,
    in_free: Vec<bool>,
    free_count: usize,
    held: HashMap<String, Held>,
    released_blocks_total: u64,
    expired_blocks_total: u64,
    evicted_blocks_total: u64,
}

impl Inner {
    fn take_free(&mut self) -> Option<BlockId> {
        while let Some(b) = self.free.pop_front() {
            if self.in_free[b as usize] {
                self.in_free[b as usize] = false;
                self.free_count -= 1;
                if let Some(h) = self.hash[b as usize].take() {
                    // Reused for new content: the cached prefix is gone.
                    self.index.remove(&h);
                    self.evicted_blocks_total += 1;
                }
                return Some(b);
            }
        }
        None
    }

    fn put(&mut self, b: BlockId) {
        let r = &mut self.refs[b as usize];
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.in_free[b as usize] = true;
            self.free_count += 1;
            self.free.push_back(b);
        }
    }

    fn put_all(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
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
        let n = num_blocks as usize;
        Arc::new(BlockPool {
            num_blocks: n,
            inner: Mutex::new(Inner {
                refs: vec![0; n],
                hash: vec![None; n],
                index: HashMap::new(),
                free: (0..num_blocks).collect(),
                in_free: vec![true; n],
                free_count: n,
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
                inner.in_free[b as usize] = false;
                inner.free_count -= 1;
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
    pub fn publish(&self, blocks: &[BlockId], hashes: &[u64]) {
        let mut inner = self.lock();
        for (&b, &h) in blocks.iter().zip(hashes) {
            if inner.hash[b as usize] == Some(h) || inner.index.contains_key(&h) {
                continue;
            }
            if let Some(old) = inner.hash[b as usize].replace(h) {
                inner.index.remove(&old);
            }
            inner.index.insert(h, b);
        }
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
        pool.publish(&a.blocks()[..2], &[10, 11]);
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
    fn a_miss_stops_the_prefix_and_full_pools_refuse() {
        let pool = BlockPool::new(4);
        let a = pool.allocate_prefix(2, &[1, 2]).unwrap();
        pool.publish(a.blocks(), &[1, 2]);
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
