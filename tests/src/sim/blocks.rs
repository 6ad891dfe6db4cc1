//! The simulator's KV block pool. Owns block-id allocation and the blocks a prefill-role request
//! holds for a remote decode (until a release notification or expiry). v0 tracks ids only; the
//! paged KV pool with real bytes will live behind this same interface. Knows nothing about HTTP.

use std::collections::HashMap;
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
    pub free_blocks: usize,
    pub held_requests: usize,
    pub held_blocks: usize,
    pub released_blocks_total: u64,
    pub expired_blocks_total: u64,
}

struct Held {
    blocks: Vec<BlockId>,
    deadline: Instant,
}

struct Inner {
    /// Free ids as a stack; the lowest ids are handed out first.
    free: Vec<BlockId>,
    held: HashMap<String, Held>,
    released_blocks_total: u64,
    expired_blocks_total: u64,
}

pub struct BlockPool {
    num_blocks: usize,
    inner: Mutex<Inner>,
}

impl BlockPool {
    pub fn new(num_blocks: u32) -> Arc<BlockPool> {
        Arc::new(BlockPool {
            num_blocks: num_blocks as usize,
            inner: Mutex::new(Inner {
                free: (0..num_blocks).rev().collect(),
                held: HashMap::new(),
                released_blocks_total: 0,
                expired_blocks_total: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `n` blocks; they return to the pool when the allocation is dropped unless it is
    /// turned into a hold first.
    pub fn allocate(self: &Arc<Self>, n: usize) -> Result<Allocation, OutOfBlocks> {
        let mut inner = self.lock();
        let free = inner.free.len();
        if n > free {
            return Err(OutOfBlocks {
                needed: n,
                free,
                total: self.num_blocks,
            });
        }
        let blocks = inner.free.split_off(free - n).into_iter().rev().collect();
        Ok(Allocation {
            pool: Arc::clone(self),
            blocks,
        })
    }

    /// Frees the blocks held under `id`; returns how many, or None if `id` holds nothing.
    pub fn release(&self, id: &str) -> Option<usize> {
        let mut inner = self.lock();
        let held = inner.held.remove(id)?;
        let n = held.blocks.len();
        inner.released_blocks_total += n as u64;
        inner.free.extend(held.blocks);
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
                inner.free.extend(h.blocks);
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
            free_blocks: inner.free.len(),
            held_requests: inner.held.len(),
            held_blocks: inner.held.values().map(|h| h.blocks.len()).sum(),
            released_blocks_total: inner.released_blocks_total,
            expired_blocks_total: inner.expired_blocks_total,
        }
    }
}

/// Blocks in use by one running request.
pub struct Allocation {
    pool: Arc<BlockPool>,
    blocks: Vec<BlockId>,
}

impl Allocation {
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
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
            inner.free.extend(old.blocks);
        }
        blocks
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        if !self.blocks.is_empty() {
            let blocks = std::mem::take(&mut self.blocks);
            self.pool.lock().free.extend(blocks);
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
}
