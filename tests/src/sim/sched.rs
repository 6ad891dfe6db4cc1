//! The timing model: continuous batching as vLLM's scheduler does it, so that latency depends on
//! load the way a real engine's does. One loop runs engine steps; each step takes the running
//! sequences' next tokens plus chunks of waiting prefills up to a token budget, and lasts
//! `step_base + prefill_tokens x per_token + decode_seqs x per_seq`. A prefill finishes at the end
//! of the step that computes its last chunk; a running sequence gets one token per step. At most
//! `max_num_seqs` sequences decode at once; the rest wait for a slot.
//!
//! Off unless `--timing-model` is given (tests that do not ask for it run at full speed).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, Copy)]
pub struct TimingModel {
    pub step_base: Duration,
    pub prefill_per_token: Duration,
    pub decode_per_seq: Duration,
    pub token_budget: u64,
    pub max_num_seqs: usize,
}

impl TimingModel {
    /// How long one step takes.
    pub fn step(&self, prefill_tokens: u64, decode_seqs: usize) -> Duration {
        self.step_base
            + self.prefill_per_token * prefill_tokens as u32
            + self.decode_per_seq * decode_seqs as u32
    }
}

enum Cmd {
    Prefill {
        tokens: u64,
        done: oneshot::Sender<()>,
    },
    Join {
        id: u64,
        tokens: u64,
        ticks: mpsc::UnboundedSender<()>,
    },
    Leave {
        id: u64,
    },
}

/// Handle to the engine loop.
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Cmd>,
    next_id: AtomicU64,
    pub steps: Arc<AtomicU64>,
}

/// A sequence in the decode batch; leaves it when dropped.
pub struct Seq {
    id: u64,
    ticks: mpsc::UnboundedReceiver<()>,
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Seq {
    /// Waits for the step that produces this sequence's next token.
    pub async fn next_token(&mut self) {
        let _ = self.ticks.recv().await;
    }
}

impl Drop for Seq {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Leave { id: self.id });
    }
}

struct Decoding {
    id: u64,
    left: u64,
    ticks: mpsc::UnboundedSender<()>,
}

struct PendingPrefill {
    left: u64,
    done: oneshot::Sender<()>,
}

impl Scheduler {
    pub fn start(model: TimingModel) -> Arc<Scheduler> {
        let (tx, rx) = mpsc::unbounded_channel();
        let steps = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(model, rx, Arc::clone(&steps)));
        Arc::new(Scheduler {
            tx,
            next_id: AtomicU64::new(0),
            steps,
        })
    }

    /// Computes `tokens` prompt tokens; returns when the step that finishes them ends.
    pub async fn prefill(&self, tokens: u64) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Cmd::Prefill { tokens, done }).is_ok() {
            let _ = wait.await;
        }
    }

    /// Joins the decode batch for `tokens` decode steps (it leaves after the last one, or when
    /// the [`Seq`] is dropped).
    pub fn join(&self, tokens: u64) -> Seq {
        let id = self.next_id.fetch_add(1, Relaxed);
        let (ticks_tx, ticks) = mpsc::unbounded_channel();
        let _ = self.tx.send(Cmd::Join {
            id,
            tokens,
            ticks: ticks_tx,
        });
        Seq {
            id,
            ticks,
            tx: self.tx.clone(),
        }
    }
}

async fn run(model: TimingModel, mut rx: mpsc::UnboundedReceiver<Cmd>, steps: Arc<AtomicU64>) {
    let mut prefills: VecDeque<PendingPrefill> = VecDeque::new();
    let mut running: Vec<Decoding> = Vec::new();
    let mut waiting: VecDeque<Decoding> = VecDeque::new();
    let apply = |cmd: Cmd,
                 prefills: &mut VecDeque<PendingPrefill>,
                 running: &mut Vec<Decoding>,
                 waiting: &mut VecDeque<Decoding>| match cmd {
        Cmd::Prefill { tokens, done } => prefills.push_back(PendingPrefill {
            left: tokens.max(1),
            done,
        }),
        Cmd::Join { id, tokens, ticks } if tokens > 0 => waiting.push_back(Decoding {
            id,
            left: tokens,
            ticks,
        }),
        Cmd::Join { .. } => {}
        Cmd::Leave { id } => {
            running.retain(|d| d.id != id);
            waiting.retain(|d| d.id != id);
        }
    };
    loop {
        if prefills.is_empty() && running.is_empty() && waiting.is_empty() {
            match rx.recv().await {
                // A Leave of a finished sequence leaves nothing to run: look again.
                Some(cmd) => {
                    apply(cmd, &mut prefills, &mut running, &mut waiting);
                    continue;
                }
                None => return,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            apply(cmd, &mut prefills, &mut running, &mut waiting);
        }
        while running.len() < model.max_num_seqs {
            match waiting.pop_front() {
                Some(s) => running.push(s),
                None => break,
            }
        }
        // Decode tokens first (one per running sequence), then prefill chunks in arrival order.
        let mut budget = model.token_budget.saturating_sub(running.len() as u64);
        let mut prefill_tokens = 0;
        let mut finished = 0;
        for p in prefills.iter_mut() {
            if budget == 0 {
                break;
            }
            let chunk = p.left.min(budget);
            p.left -= chunk;
            budget -= chunk;
            prefill_tokens += chunk;
            if p.left == 0 {
                finished += 1;
            }
        }
        tokio::time::sleep(model.step(prefill_tokens, running.len())).await;
        steps.fetch_add(1, Relaxed);
        for _ in 0..finished {
            if let Some(p) = prefills.pop_front() {
                let _ = p.done.send(());
            }
        }
        running.retain_mut(|d| {
            d.left -= 1;
            d.ticks.send(()).is_ok() && d.left > 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> TimingModel {
        TimingModel {
            step_base: Duration::from_millis(2),
            prefill_per_token: Duration::from_micros(10),
            decode_per_seq: Duration::from_micros(100),
            token_budget: 512,
            max_num_seqs: 2,
        }
    }

    #[test]
    fn step_cost_is_linear() {
        let m = model();
        assert_eq!(m.step(0, 0), Duration::from_millis(2));
        assert_eq!(
            m.step(100, 3),
            Duration::from_millis(2) + Duration::from_micros(1000 + 300)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn long_prefills_are_chunked_by_the_budget() {
        let s = Scheduler::start(model());
        let t = tokio::time::Instant::now();
        s.prefill(1500).await; // 512 + 512 + 476: three steps
        assert_eq!(s.steps.load(Relaxed), 3);
        let expected = model().step(512, 0) * 2 + model().step(476, 0);
        // tokio's timer rounds each sleep up to the next millisecond.
        let elapsed = t.elapsed();
        assert!(
            elapsed >= expected && elapsed <= expected + Duration::from_millis(3),
            "{elapsed:?} vs {expected:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn max_num_seqs_limits_the_batch() {
        let s = Scheduler::start(model());
        let mut a = s.join(5);
        let mut b = s.join(5);
        let mut c = s.join(5);
        a.next_token().await;
        b.next_token().await;
        // c waits for a slot: after a leaves, c decodes.
        assert!(
            tokio::time::timeout(Duration::from_millis(1), c.next_token())
                .await
                .is_err()
        );
        drop(a);
        c.next_token().await;
        b.next_token().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_sequence_leaves_after_its_last_token() {
        let s = Scheduler::start(model());
        let mut a = s.join(2);
        a.next_token().await;
        a.next_token().await;
        // Nothing left to run: no further steps, while `a` lives or after it leaves.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(s.steps.load(Relaxed), 2);
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            s.steps.load(Relaxed),
            2,
            "a Leave alone must not run a step"
        );
    }
}
