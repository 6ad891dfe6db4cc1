//! Scheduling: scorers, pickers, the P/D decider and the per-endpoint state
//! they read (in-flight count, prefix index).
//!
//! Owns the pick and nothing else: no HTTP, no bodies. Scorers are a trait with
//! one method over a `#[non_exhaustive]` input, as the P/D decider is a pure
//! function over one, so each is unit-tested without endpoints or sockets.

use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::gauge::Gauge;
use rand::Rng;

use super::config::{PickerSpec, PrefixParams, ProfileSpec, Scheduling, ScorerSpec};
use super::prefix::{block_hashes, PrefixLru, Prompt};

/// What a scorer knows about one candidate endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    /// Requests the router has forwarded there and not yet finished.
    pub inflight: u64,
    /// Leading prompt blocks the endpoint is believed to have cached.
    pub matched_blocks: usize,
}

/// Input of every scorer: the candidates of one pick.
#[non_exhaustive]
pub struct ScoreInput<'a> {
    pub candidates: &'a [Candidate],
    /// Blocks of the prompt considered (full blocks, capped at maxPrefixBlocksToMatch).
    pub prompt_blocks: usize,
}

impl<'a> ScoreInput<'a> {
    pub fn new(candidates: &'a [Candidate], prompt_blocks: usize) -> Self {
        ScoreInput {
            candidates,
            prompt_blocks,
        }
    }
}

/// Scores each candidate in [0, 1]; higher is better. `out` has one slot per candidate.
pub trait Scorer: Send + Sync {
    fn score(&self, input: &ScoreInput<'_>, out: &mut [f64]);
}

/// The share of the prompt's leading blocks that the endpoint has cached.
pub struct PrefixCacheScorer;

impl Scorer for PrefixCacheScorer {
    fn score(&self, input: &ScoreInput<'_>, out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(input.candidates) {
            *o = if input.prompt_blocks == 0 {
                0.0
            } else {
                c.matched_blocks.min(input.prompt_blocks) as f64 / input.prompt_blocks as f64
            };
        }
    }
}

/// Fewer requests in flight scores higher: relative to the busiest candidate,
/// or, with a threshold, 0 at or above `threshold` requests.
pub struct LoadAwareScorer {
    pub threshold: Option<u64>,
}

impl Scorer for LoadAwareScorer {
    fn score(&self, input: &ScoreInput<'_>, out: &mut [f64]) {
        let scale = match self.threshold {
            Some(t) => t.max(1),
            None => input
                .candidates
                .iter()
                .map(|c| c.inflight)
                .max()
                .unwrap_or(0)
                .max(1),
        };
        for (o, c) in out.iter_mut().zip(input.candidates) {
            *o = 1.0 - c.inflight.min(scale) as f64 / scale as f64;
        }
    }
}

fn scorer_for(spec: ScorerSpec) -> Box<dyn Scorer> {
    match spec {
        ScorerSpec::PrefixCache => Box::new(PrefixCacheScorer),
        ScorerSpec::LoadAware { threshold } => Box::new(LoadAwareScorer { threshold }),
    }
}

/// One scheduling profile: weighted scorers and a picker.
pub struct Profile {
    pub name: String,
    scorers: Vec<(Box<dyn Scorer>, f64)>,
    picker: PickerSpec,
}

/// A profile's choice.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pick {
    pub index: usize,
    /// The weighted score of the picked candidate.
    pub score: f64,
}

impl Profile {
    pub fn from_spec(spec: &ProfileSpec) -> Profile {
        Profile {
            name: spec.name.clone(),
            scorers: spec
                .scorers
                .iter()
                .map(|s| (scorer_for(s.scorer), s.weight))
                .collect(),
            picker: spec.picker,
        }
    }

    /// Picks one of `input.candidates` (there must be at least one).
    pub fn pick<R: Rng + ?Sized>(&self, input: &ScoreInput<'_>, rng: &mut R) -> Pick {
        let n = input.candidates.len();
        debug_assert!(n > 0, "a pick needs candidates");
        let mut total = vec![0.0f64; n];
        let mut one = vec![0.0f64; n];
        for (scorer, weight) in &self.scorers {
            scorer.score(input, &mut one);
            for (t, s) in total.iter_mut().zip(&one) {
                *t += weight * s;
            }
        }
        let index = match self.picker {
            PickerSpec::Random => rng.random_range(0..n.max(1)),
            PickerSpec::MaxScore => {
                let best = total.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let ties: Vec<usize> = (0..n).filter(|&i| total[i] >= best - 1e-9).collect();
                match ties.len() {
                    0 => 0,
                    1 => ties[0],
                    k => ties[rng.random_range(0..k)],
                }
            }
        };
        Pick {
            index,
            score: total.get(index).copied().unwrap_or(0.0),
        }
    }
}

/// Input of the P/D decision.
#[non_exhaustive]
pub struct DecideInput {
    /// Prompt tokens the decode pick is not believed to have cached.
    pub uncached_tokens: u64,
    /// 0 = never disaggregate.
    pub threshold: u64,
    pub prefill_endpoints: usize,
}

impl DecideInput {
    pub fn new(uncached_tokens: u64, threshold: u64, prefill_endpoints: usize) -> Self {
        DecideInput {
            uncached_tokens,
            threshold,
            prefill_endpoints,
        }
    }
}

/// Remote prefill when there is a prefill endpoint, the threshold is on, and
/// the decode pick would have to compute at least `threshold` tokens itself.
pub fn wants_remote_prefill(input: &DecideInput) -> bool {
    input.prefill_endpoints > 0 && input.threshold > 0 && input.uncached_tokens >= input.threshold
}

/// A decode or prefill endpoint and what the router knows about it.
pub struct Endpoint {
    /// Metric label and log name: the decode URL, or the prefill `host:port`.
    pub label: String,
    inflight: Gauge,
    index: Mutex<PrefixLru>,
}

impl Endpoint {
    pub fn new(label: String, inflight: Gauge, lru_capacity: usize) -> Endpoint {
        Endpoint {
            label,
            inflight,
            index: Mutex::new(PrefixLru::new(lru_capacity)),
        }
    }

    fn index(&self) -> MutexGuard<'_, PrefixLru> {
        // A panic while holding the lock cannot leave the LRU worse than stale.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn inflight(&self) -> u64 {
        self.inflight.get().max(0) as u64
    }

    fn candidate(&self, hashes: &[u64]) -> Candidate {
        Candidate {
            inflight: self.inflight(),
            matched_blocks: if hashes.is_empty() {
                0
            } else {
                self.index().matched_prefix(hashes)
            },
        }
    }

    fn record(&self, hashes: &[u64]) {
        if !hashes.is_empty() {
            self.index().insert_chain(hashes);
        }
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn acquire(self: &Arc<Self>) -> InflightGuard {
        self.inflight.inc();
        InflightGuard {
            endpoint: self.clone(),
        }
    }
}

/// Holds one in-flight count on an endpoint.
pub struct InflightGuard {
    endpoint: Arc<Endpoint>,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.endpoint.inflight.dec();
    }
}

/// Where one request goes, and why.
pub struct Routed {
    /// Position of `decode` among the decode endpoints (the `--decode` order).
    pub decode_index: usize,
    pub decode: Arc<Endpoint>,
    pub decode_score: f64,
    pub prefill: Option<(Arc<Endpoint>, f64)>,
    pub prompt_tokens: u64,
    pub uncached_tokens: u64,
    /// In-flight counts held until the response is finished.
    pub guards: Vec<InflightGuard>,
}

/// The router's scheduling state: endpoints, profiles, threshold.
pub struct Scheduler {
    pub decode: Vec<Arc<Endpoint>>,
    pub prefill: Vec<Arc<Endpoint>>,
    decode_profile: Profile,
    prefill_profile: Option<Profile>,
    prefix: PrefixParams,
    threshold: u64,
}

impl Scheduler {
    /// `decode` must not be empty (the config guarantees it).
    pub fn new(
        scheduling: &Scheduling,
        decode: Vec<Arc<Endpoint>>,
        prefill: Vec<Arc<Endpoint>>,
    ) -> Scheduler {
        Scheduler {
            decode,
            prefill,
            decode_profile: Profile::from_spec(&scheduling.decode),
            prefill_profile: scheduling.prefill.as_ref().map(Profile::from_spec),
            prefix: scheduling.prefix,
            threshold: scheduling.threshold,
        }
    }

    /// The decode profile picks D; the decider compares D's uncached tokens
    /// with the threshold; the prefill profile picks P. Both indexes then
    /// remember the prompt: D holds all of it after the request either way.
    pub fn schedule<R: Rng + ?Sized>(&self, model: &str, prompt: &Prompt, rng: &mut R) -> Routed {
        let hashes = block_hashes(
            model,
            &prompt.bytes,
            self.prefix.block_size,
            self.prefix.max_blocks,
        );
        let candidates: Vec<Candidate> = self.decode.iter().map(|e| e.candidate(&hashes)).collect();
        let d = self
            .decode_profile
            .pick(&ScoreInput::new(&candidates, hashes.len()), rng);
        let matched_tokens = (candidates[d.index].matched_blocks as u64)
            .saturating_mul(self.prefix.block_size as u64);
        let uncached = prompt.tokens.saturating_sub(matched_tokens);
        let decode = self.decode[d.index].clone();
        let mut guards = vec![decode.acquire()];
        let remote = wants_remote_prefill(&DecideInput::new(
            uncached,
            self.threshold,
            self.prefill.len(),
        ));
        let prefill = match (&self.prefill_profile, remote) {
            (Some(profile), true) => {
                let candidates: Vec<Candidate> =
                    self.prefill.iter().map(|e| e.candidate(&hashes)).collect();
                let p = profile.pick(&ScoreInput::new(&candidates, hashes.len()), rng);
                let endpoint = self.prefill[p.index].clone();
                guards.push(endpoint.acquire());
                endpoint.record(&hashes);
                Some((endpoint, p.score))
            }
            _ => None,
        };
        decode.record(&hashes);
        Routed {
            decode_index: d.index,
            decode,
            decode_score: d.score,
            prefill,
            prompt_tokens: prompt.tokens,
            uncached_tokens: uncached,
            guards,
        }
    }

    /// For requests without a prompt: the least loaded decode endpoint (ties at
    /// random), its index, and its in-flight count.
    pub fn pick_by_load<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
    ) -> (usize, Arc<Endpoint>, InflightGuard) {
        let load: Vec<u64> = self.decode.iter().map(|e| e.inflight()).collect();
        let min = load.iter().copied().min().unwrap_or(0);
        let ties: Vec<usize> = (0..load.len()).filter(|&i| load[i] <= min).collect();
        let index = match ties.len() {
            0 => 0,
            k => ties[rng.random_range(0..k)],
        };
        let endpoint = self.decode[index].clone();
        let guard = endpoint.acquire();
        (index, endpoint, guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::config::WeightedScorer;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn default_decode() -> Profile {
        Profile::from_spec(&Scheduling::default().decode)
    }

    fn c(inflight: u64, matched_blocks: usize) -> Candidate {
        Candidate {
            inflight,
            matched_blocks,
        }
    }

    #[test]
    fn prefix_wins_when_load_is_equal() {
        let cands = [c(2, 0), c(2, 10), c(2, 3)];
        for _ in 0..20 {
            assert_eq!(
                default_decode()
                    .pick(&ScoreInput::new(&cands, 10), &mut rng())
                    .index,
                1
            );
        }
    }

    #[test]
    fn load_wins_when_prefix_is_equal() {
        let cands = [c(5, 4), c(1, 4), c(3, 4)];
        let p = default_decode().pick(&ScoreInput::new(&cands, 10), &mut rng());
        assert_eq!(p.index, 1);
        // prefix 0.4 * 2 + load (1 - 1/5) * 1
        assert!((p.score - (0.8 + 0.8)).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn a_full_prefix_outweighs_moderate_load_with_default_weights() {
        // All cached on a busy endpoint vs nothing cached on an idle one.
        let cands = [c(4, 10), c(0, 0)];
        let p = default_decode().pick(&ScoreInput::new(&cands, 10), &mut rng());
        assert_eq!(p.index, 0);
    }

    #[test]
    fn ties_are_broken_at_random() {
        let cands = [c(0, 0), c(0, 0), c(0, 0)];
        let mut r = rng();
        let seen: std::collections::HashSet<usize> = (0..100)
            .map(|_| {
                default_decode()
                    .pick(&ScoreInput::new(&cands, 4), &mut r)
                    .index
            })
            .collect();
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn random_picker_ignores_scores() {
        let spec = ProfileSpec {
            name: "decode".into(),
            scorers: vec![WeightedScorer {
                name: "prefix-cache-scorer".into(),
                scorer: ScorerSpec::PrefixCache,
                weight: 1.0,
            }],
            picker: PickerSpec::Random,
        };
        let cands = [c(0, 10), c(0, 0)];
        let mut r = rng();
        let seen: std::collections::HashSet<usize> = (0..100)
            .map(|_| {
                Profile::from_spec(&spec)
                    .pick(&ScoreInput::new(&cands, 10), &mut r)
                    .index
            })
            .collect();
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn load_scores_relative_or_by_threshold() {
        let cands = [c(0, 0), c(2, 0), c(4, 0)];
        let mut out = [0.0; 3];
        LoadAwareScorer { threshold: None }.score(&ScoreInput::new(&cands, 0), &mut out);
        assert_eq!(out, [1.0, 0.5, 0.0]);
        LoadAwareScorer { threshold: Some(8) }.score(&ScoreInput::new(&cands, 0), &mut out);
        assert_eq!(out, [1.0, 0.75, 0.5]);
        let idle = [c(0, 0), c(0, 0)];
        let mut out = [0.0; 2];
        LoadAwareScorer { threshold: None }.score(&ScoreInput::new(&idle, 0), &mut out);
        assert_eq!(out, [1.0, 1.0]);
        PrefixCacheScorer.score(&ScoreInput::new(&idle, 0), &mut out);
        assert_eq!(out, [0.0, 0.0], "no full block: no prefix score");
    }

    #[test]
    fn decider_threshold_edges() {
        let d = |uncached, threshold, prefills| {
            wants_remote_prefill(&DecideInput::new(uncached, threshold, prefills))
        };
        assert!(!d(10_000, 0, 2), "threshold 0 = never");
        assert!(d(256, 256, 1), "exactly the threshold disaggregates");
        assert!(!d(255, 256, 1));
        assert!(!d(10_000, 256, 0), "no prefill endpoint");
    }

    fn scheduler(decodes: usize, prefills: usize, threshold: u64) -> Scheduler {
        let ep = |l: String| Arc::new(Endpoint::new(l, Gauge::default(), 1000));
        let scheduling = Scheduling {
            threshold,
            ..Scheduling::default()
        };
        Scheduler::new(
            &scheduling,
            (0..decodes).map(|i| ep(format!("d{i}"))).collect(),
            (0..prefills).map(|i| ep(format!("p{i}"))).collect(),
        )
    }

    fn prompt(shared: &str, tail: &str) -> Prompt {
        let text = format!("{shared}{tail}");
        Prompt {
            tokens: (text.len() as u64).div_ceil(4),
            bytes: text.into_bytes(),
        }
    }

    #[test]
    fn shared_prefix_sticks_to_one_pair_and_counts_uncached() {
        let s = scheduler(4, 3, 256);
        let shared = "s".repeat(1600 * 4);
        let mut r = rng();
        let first = s.schedule("m", &prompt(&shared, &"a".repeat(400 * 4)), &mut r);
        assert_eq!(first.uncached_tokens, 2000);
        let (d0, p0) = (
            first.decode.label.clone(),
            first.prefill.as_ref().unwrap().0.label.clone(),
        );
        assert_eq!(first.decode.inflight(), 1);
        drop(first);
        for tail in ["b", "c", "d", "e"] {
            let next = s.schedule("m", &prompt(&shared, &tail.repeat(400 * 4)), &mut r);
            assert_eq!(next.decode.label, d0);
            // 1600 shared tokens = 100 cached blocks on D.
            assert_eq!(next.uncached_tokens, 400);
            assert_eq!(next.prefill.as_ref().unwrap().0.label, p0);
        }
        // The same prompt again: all of it cached on D, so it stays local.
        let again = s.schedule("m", &prompt(&shared, &"e".repeat(400 * 4)), &mut r);
        assert_eq!(again.uncached_tokens, 0);
        assert!(again.prefill.is_none());
    }

    #[test]
    fn short_prompts_and_zero_threshold_stay_local() {
        let s = scheduler(2, 2, 256);
        let r = s.schedule("m", &prompt("short prompt", ""), &mut rng());
        assert!(r.prefill.is_none());
        assert_eq!(r.guards.len(), 1);
        let never = scheduler(2, 2, 0);
        let r = never.schedule("m", &prompt(&"z".repeat(40_000), ""), &mut rng());
        assert!(r.prefill.is_none());
    }

    #[test]
    fn guards_release_inflight_and_load_picks_the_idle_one() {
        let s = scheduler(2, 0, 256);
        let (_, busy, g) = s.pick_by_load(&mut rng());
        assert_eq!(busy.inflight(), 1);
        for _ in 0..10 {
            let (_, other, _g2) = s.pick_by_load(&mut rng());
            assert_ne!(other.label, busy.label);
        }
        drop(g);
        assert_eq!(busy.inflight(), 0);
    }
}
