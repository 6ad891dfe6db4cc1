//! The hold table: a finished prefill's blocks stay held until the peers
//! that read them notify (as many as vLLM counts from the reader's TP size),
//! a release, or the hold timeout; notifications that arrive first wait as
//! orphans. Released blocks are broadcast to the engine.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Agent, ReleaseReason, Released, MAX_ORPHANS, ORPHAN_TTL};
use crate::backend::Notification;
use crate::error::TransferError;

#[derive(Debug)]
pub(super) struct Held {
    blocks: Vec<u32>,
    expires: Instant,
    notified: u32,
}

#[derive(Debug, Default)]
pub(super) struct HoldTable {
    held: HashMap<String, Held>,
    /// Notifications that arrived before (or without) a hold.
    orphans: HashMap<String, (u32, u32, Instant)>,
}

/// Parses vLLM's notification `"<request_id>:<tp_size>"`. A message without
/// a numeric suffix counts as one notification of a TP-1 peer.
pub fn parse_notification(msg: &str) -> (String, u32) {
    match msg.rsplit_once(':') {
        Some((id, n)) => match n.parse::<u32>() {
            Ok(n) if n > 0 => (id.to_string(), n),
            _ => (msg.to_string(), 1),
        },
        None => (msg.to_string(), 1),
    }
}

/// How many notifications free a held request on a rank of `own_tp`, when
/// each says the reading engine's TP size is `readers` (vLLM's rule): a
/// larger reader TP sends `readers / own_tp` readers to every rank, each of
/// which notifies; otherwise one reader per rank.
pub fn notifications_needed(readers: u32, own_tp: u32) -> u32 {
    if readers > own_tp {
        readers / own_tp.max(1)
    } else {
        1
    }
}

impl Agent {
    /// Holds `blocks` for `request_id` until a peer's notification, a
    /// release, or `timeout` (default: the agent's hold timeout).
    pub fn hold(
        &self,
        request_id: &str,
        blocks: Vec<u32>,
        timeout: Option<Duration>,
    ) -> Result<Duration, TransferError> {
        let n = self.cfg.layout.num_blocks();
        if let Some(&b) = blocks.iter().find(|&&b| b >= n) {
            return Err(TransferError::BadRequest(format!(
                "block {b} out of range (pool has {n} blocks)"
            )));
        }
        if request_id.is_empty() {
            return Err(TransferError::BadRequest("empty request id".into()));
        }
        let timeout = timeout.unwrap_or(self.cfg.hold_timeout);
        let mut table = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        let mut held = Held {
            blocks,
            expires: Instant::now() + timeout,
            notified: 0,
        };
        if let Some((count, tp, _)) = table.orphans.remove(request_id) {
            held.notified = count;
            if count >= tp {
                drop(table);
                self.finish_release(request_id, held.blocks, ReleaseReason::Notification);
                return Ok(Duration::ZERO);
            }
        }
        table.held.insert(request_id.to_string(), held);
        Ok(timeout)
    }

    /// Releases a request's held blocks now; None if it held nothing.
    pub fn release(&self, request_id: &str) -> Option<Vec<u32>> {
        let held = self
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .held
            .remove(request_id)?;
        self.finish_release(request_id, held.blocks.clone(), ReleaseReason::Request);
        Some(held.blocks)
    }

    /// (held requests, held blocks)
    pub fn held(&self) -> (usize, usize) {
        let table = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        (
            table.held.len(),
            table.held.values().map(|h| h.blocks.len()).sum(),
        )
    }

    fn finish_release(&self, request_id: &str, blocks: Vec<u32>, reason: ReleaseReason) {
        let counter = match reason {
            ReleaseReason::Notification => &self.stats.released_by_notification,
            ReleaseReason::Request => &self.stats.released_by_request,
            ReleaseReason::Expired => &self.stats.expired,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            request_id,
            blocks = blocks.len(),
            ?reason,
            "released held blocks"
        );
        let _ = self.releases.send(Released {
            request_id: request_id.to_string(),
            blocks,
            reason,
        });
    }

    /// Applies incoming notifications and expires old holds.
    pub(super) fn housekeeping(&self) {
        let mut notes = Vec::new();
        for backend in &self.backends {
            match backend.take_notifications() {
                Ok(n) => notes.extend(n),
                Err(e) => {
                    tracing::warn!(backend = %backend.kind(), error = %e, "reading notifications failed")
                }
            }
        }
        let now = Instant::now();
        let mut released = Vec::new();
        {
            let mut table = self.holds.lock().unwrap_or_else(|p| p.into_inner());
            for Notification { from, message } in notes {
                self.stats
                    .notifications_received
                    .fetch_add(1, Ordering::Relaxed);
                let text = String::from_utf8_lossy(&message);
                let (id, readers) = parse_notification(&text);
                let tp = notifications_needed(readers, self.cfg.layout.params().tp_size);
                tracing::debug!(from, request_id = %id, readers, tp, "notification");
                if let Some(h) = table.held.get_mut(&id) {
                    h.notified += 1;
                    if h.notified >= tp {
                        let h = table.held.remove(&id).expect("present");
                        released.push((id, h.blocks, ReleaseReason::Notification));
                    }
                } else if table.orphans.len() < MAX_ORPHANS {
                    let e = table.orphans.entry(id).or_insert((0, tp, now + ORPHAN_TTL));
                    e.0 += 1;
                }
            }
            let expired: Vec<String> = table
                .held
                .iter()
                .filter(|(_, h)| h.expires <= now)
                .map(|(k, _)| k.clone())
                .collect();
            for id in expired {
                let h = table.held.remove(&id).expect("present");
                released.push((id, h.blocks, ReleaseReason::Expired));
            }
            table.orphans.retain(|_, (_, _, until)| *until > now);
        }
        for (id, blocks, reason) in released {
            self.finish_release(&id, blocks, reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_format_is_vllms() {
        assert_eq!(
            parse_notification("cmpl-abc-0:2"),
            ("cmpl-abc-0".to_string(), 2)
        );
        assert_eq!(
            parse_notification("req:with:colons:1"),
            ("req:with:colons".to_string(), 1)
        );
        assert_eq!(parse_notification("plain"), ("plain".to_string(), 1));
        assert_eq!(parse_notification("x:0"), ("x:0".to_string(), 1));
        assert_eq!(parse_notification("x:abc"), ("x:abc".to_string(), 1));
    }

    #[test]
    fn a_held_request_waits_for_every_reader_as_vllm_counts_them() {
        // Same TP: each rank is read once, whatever the TP size says.
        assert_eq!(notifications_needed(1, 1), 1);
        assert_eq!(notifications_needed(4, 4), 1);
        // Decode TP 4 over prefill TP 1: four readers of the one rank.
        assert_eq!(notifications_needed(4, 1), 4);
        assert_eq!(notifications_needed(4, 2), 2);
        // Decode TP 1 over prefill TP 4: one reader per prefill rank.
        assert_eq!(notifications_needed(1, 4), 1);
    }
}
