//! Scheduling: scorers, pickers, the P/D decider, and the scheduler that runs
//! them over the endpoints the circuit breakers admit.
//!
//! Owns the pick and nothing else: no HTTP, no bodies, no probing. Scorers are
//! a trait with one method over a `#[non_exhaustive]` input, as the P/D decider
//! is a pure function over one, so each is unit-tested without endpoints or
//! sockets. What each scorer reads: prefix-cache-scorer the router's prefix
//! index, load-aware-scorer the router's in-flight counts, queue-scorer and
//! kv-cache-utilization-scorer the engines' scraped metrics (neutral 0.5 when
//! unknown or stale).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use super::breaker::Admission;
use super::config::{PickerSpec, PrefixParams, ProfileSpec, Scheduling, ScorerSpec};
pub use super::endpoint::{Candidate, Endpoint, InflightGuard, Outcome, Role};
use super::kv_index::KvIndex;
use super::prefix::{block_hashes, PrefixIndex, Prompt};

/// Engine blocks the exact index keeps per endpoint unless `indexerConfig`
/// sets a size: four 64k-block engines' worth.
const KV_INDEX_MAX_BLOCKS: usize = 1 << 20;

/// The score of an endpoint whose engine metrics are unknown or stale: neither
/// preferred nor avoided.
pub const NEUTRAL: f64 = 0.5;

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

/// A shorter engine queue (`vllm:num_requests_waiting`) scores higher,
/// min-max normalised over the candidates whose queue is known:
/// (max - q) / (max - min), 1 for all when they are equal; unknown = neutral.
pub struct QueueScorer;

impl Scorer for QueueScorer {
    fn score(&self, input: &ScoreInput<'_>, out: &mut [f64]) {
        let known = || input.candidates.iter().filter_map(|c| c.waiting);
        let min = known().fold(f64::INFINITY, f64::min);
        let max = known().fold(f64::NEG_INFINITY, f64::max);
        for (o, c) in out.iter_mut().zip(input.candidates) {
            *o = match c.waiting {
                None => NEUTRAL,
                Some(q) if max > min => (max - q) / (max - min),
                Some(_) => 1.0,
            };
        }
    }
}

/// Free KV cache scores higher: 1 - `vllm:kv_cache_usage_perc`; unknown = neutral.
pub struct KvCacheUtilizationScorer;

impl Scorer for KvCacheUtilizationScorer {
    fn score(&self, input: &ScoreInput<'_>, out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(input.candidates) {
            *o = c.kv_usage.map_or(NEUTRAL, |u| 1.0 - u.clamp(0.0, 1.0));
        }
    }
}

fn scorer_for(spec: ScorerSpec) -> Box<dyn Scorer> {
    match spec {
        ScorerSpec::PrefixCache => Box::new(PrefixCacheScorer),
        ScorerSpec::LoadAware { threshold } => Box::new(LoadAwareScorer { threshold }),
        ScorerSpec::Queue => Box::new(QueueScorer),
        ScorerSpec::KvCacheUtilization => Box::new(KvCacheUtilizationScorer),
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

/// Where one request goes, and why.
pub struct Routed {
    /// Position of `decode` among the decode endpoints (the `--decode` order).
    pub decode_index: usize,
    pub decode: Arc<Endpoint>,
    pub decode_score: f64,
    pub prefill: Option<(Arc<Endpoint>, f64)>,
    /// The decider wanted a remote prefill but every prefill endpoint's
    /// circuit is open: the request goes local.
    pub prefill_unavailable: bool,
    pub prompt_tokens: u64,
    pub uncached_tokens: u64,
    /// Blocks of the prompt's prefix the decode pick holds, by the index.
    pub decode_matched_blocks: usize,
    /// The prompt's block-hash chain, for [`Scheduler::record`].
    pub hashes: Vec<u64>,
    /// Its chain keys in the exact index (empty without one).
    pub precise: Vec<u64>,
    /// Position of the prefill pick among the prefill endpoints.
    pub prefill_index: Option<usize>,
    /// In-flight counts held until the response is finished.
    pub guards: Vec<InflightGuard>,
    /// To report once the decode endpoint has answered (or failed).
    pub outcome: Outcome,
}

/// A pick by load alone (requests without a prompt).
pub struct LoadPick {
    pub index: usize,
    pub endpoint: Arc<Endpoint>,
    pub guard: InflightGuard,
    pub outcome: Outcome,
}

/// The router's scheduling state: endpoints, profiles, threshold.
pub struct Scheduler {
    pub decode: Vec<Arc<Endpoint>>,
    pub prefill: Vec<Arc<Endpoint>>,
    decode_profile: Arc<Profile>,
    prefill_profile: Option<Arc<Profile>>,
    decode_index: PrefixIndex,
    prefill_index: PrefixIndex,
    /// The exact index fed by the engines' KV events (a precise prefix
    /// scorer in the config); where it knows an endpoint it wins over the
    /// approximate one.
    kv: Option<Arc<KvIndex>>,
    /// llm-d's `speculativeIndexing`: a pick counts in the exact index for
    /// this long, until the engine's own events say what it stored.
    speculative: Option<Duration>,
    prefix: PrefixParams,
    threshold: u64,
    /// Engine metrics older than this read as unknown.
    staleness: Duration,
    /// Some scorer reads engine metrics (otherwise the pick skips them).
    reads_metrics: bool,
}

/// Decode endpoints the breakers admit at `now` (all but `exclude`), each with
/// its admission (a half-open one may be admitted for one trial).
fn admitted(
    endpoints: &[Arc<Endpoint>],
    exclude: Option<usize>,
    now: Instant,
    allow_trial: bool,
) -> Vec<(usize, Admission)> {
    endpoints
        .iter()
        .enumerate()
        .filter(|&(i, _)| Some(i) != exclude)
        .filter_map(|(i, e)| match e.admit(now, allow_trial) {
            Admission::No => None,
            a => Some((i, a)),
        })
        .collect()
}

/// Gives back the trials of the admitted endpoints that were not picked.
fn release_others(endpoints: &[Arc<Endpoint>], admitted: &[(usize, Admission)], picked: usize) {
    for &(i, a) in admitted {
        if i != picked && a == Admission::Trial {
            endpoints[i].release_trial();
        }
    }
}

impl Scheduler {
    pub fn new(
        scheduling: &Scheduling,
        decode: Vec<Arc<Endpoint>>,
        prefill: Vec<Arc<Endpoint>>,
        staleness: Duration,
    ) -> Scheduler {
        let reads_metrics = std::iter::once(&scheduling.decode)
            .chain(&scheduling.prefill)
            .flat_map(|p| &p.scorers)
            .any(|s| matches!(s.scorer, ScorerSpec::Queue | ScorerSpec::KvCacheUtilization));
        let capacity = scheduling.prefix.lru_capacity;
        let kv = scheduling.precise.as_ref().map(|p| {
            Arc::new(KvIndex::new(
                p.block_size() as usize,
                p.index_size.map_or(KV_INDEX_MAX_BLOCKS, |n| {
                    n.clamp(1, usize::MAX as u64) as usize
                }),
            ))
        });
        let speculative = scheduling
            .precise
            .as_ref()
            .and_then(|p| p.speculative_ttl());
        Scheduler {
            decode_index: PrefixIndex::new(decode.len(), capacity),
            prefill_index: PrefixIndex::new(prefill.len(), capacity),
            kv,
            speculative,
            decode,
            prefill,
            decode_profile: Arc::new(Profile::from_spec(&scheduling.decode)),
            prefill_profile: scheduling
                .prefill
                .as_ref()
                .map(|p| Arc::new(Profile::from_spec(p))),
            prefix: scheduling.prefix,
            threshold: scheduling.threshold,
            staleness,
            reads_metrics,
        }
    }

    /// The exact index, when the config has a precise prefix scorer.
    pub fn kv_index(&self) -> Option<Arc<KvIndex>> {
        self.kv.clone()
    }

    /// The scorers' view of the admitted endpoints `admitted` of one role.
    /// `precise`: the prompt's chain keys in the exact index.
    fn candidates(
        &self,
        role: Role,
        admitted: &[(usize, Admission)],
        hashes: &[u64],
        precise: &[u64],
        now: Instant,
    ) -> Vec<Candidate> {
        let (endpoints, index) = match role {
            Role::Decode => (&self.decode, &self.decode_index),
            Role::Prefill => (&self.prefill, &self.prefill_index),
        };
        let mut candidates: Vec<Candidate> = admitted
            .iter()
            .map(|&(i, _)| endpoints[i].candidate(now, self.staleness, self.reads_metrics))
            .collect();
        let positions: Vec<usize> = admitted.iter().map(|&(i, _)| i).collect();
        index.matched(hashes, &positions, |k, m| candidates[k].matched_blocks = m);
        if let Some(kv) = &self.kv {
            for (c, &(i, _)) in candidates.iter_mut().zip(admitted) {
                let Some((n, exact)) = kv.matched(&endpoints[i].label, precise) else {
                    continue;
                };
                // In the approximate index's blocks, which the scorers and the decider count.
                let blocks =
                    (n * kv.block_size() / self.prefix.block_size.max(1)).min(hashes.len());
                c.matched_blocks = if exact {
                    blocks
                } else {
                    blocks.max(c.matched_blocks)
                };
            }
        }
        candidates
    }

    /// The decode profile picks D among the admitted decode endpoints (not
    /// `exclude`); the decider compares D's uncached tokens with the
    /// threshold; the prefill profile picks P among the admitted prefill
    /// endpoints. None when no decode endpoint is admitted. The indexes learn
    /// the prompt in [`Scheduler::record`], once the pick is made.
    pub fn schedule<R: Rng + ?Sized>(
        &self,
        model: &str,
        prompt: &Prompt,
        exclude: Option<usize>,
        now: Instant,
        rng: &mut R,
    ) -> Option<Routed> {
        let admitted_decode = admitted(&self.decode, exclude, now, true);
        if admitted_decode.is_empty() {
            return None;
        }
        let hashes = block_hashes(
            model,
            &prompt.bytes,
            self.prefix.block_size,
            self.prefix.max_blocks,
        );
        let precise = self.kv.as_ref().map_or_else(Vec::new, |kv| {
            let tokens = self
                .prefix
                .max_blocks
                .saturating_mul(self.prefix.block_size);
            kv.prompt_hashes(&prompt.bytes, tokens / kv.block_size().max(1))
        });
        let candidates = self.candidates(Role::Decode, &admitted_decode, &hashes, &precise, now);
        let d = self
            .decode_profile
            .pick(&ScoreInput::new(&candidates, hashes.len()), rng);
        let (decode_index, admission) = admitted_decode[d.index];
        release_others(&self.decode, &admitted_decode, decode_index);
        let decode_matched_blocks = candidates[d.index].matched_blocks;
        let matched_tokens =
            (decode_matched_blocks as u64).saturating_mul(self.prefix.block_size as u64);
        let uncached = prompt.tokens.saturating_sub(matched_tokens);
        let decode = self.decode[decode_index].clone();
        let mut guards = vec![decode.acquire()];
        let remote = wants_remote_prefill(&DecideInput::new(
            uncached,
            self.threshold,
            self.prefill.len(),
        ));
        let mut prefill_unavailable = false;
        let mut prefill_index = None;
        let prefill = match (&self.prefill_profile, remote) {
            (Some(profile), true) => {
                // No trials: the router never sees a prefill leg's outcome, so
                // only a health check closes a prefill endpoint's circuit.
                let admitted_prefill = admitted(&self.prefill, None, now, false);
                if admitted_prefill.is_empty() {
                    prefill_unavailable = true;
                    None
                } else {
                    let candidates =
                        self.candidates(Role::Prefill, &admitted_prefill, &hashes, &precise, now);
                    let p = profile.pick(&ScoreInput::new(&candidates, hashes.len()), rng);
                    let i = admitted_prefill[p.index].0;
                    let endpoint = self.prefill[i].clone();
                    guards.push(endpoint.acquire());
                    prefill_index = Some(i);
                    Some((endpoint, p.score))
                }
            }
            _ => None,
        };
        Some(Routed {
            decode_index,
            outcome: Outcome::new(decode.clone(), admission),
            decode,
            decode_score: d.score,
            prefill,
            prefill_unavailable,
            prompt_tokens: prompt.tokens,
            uncached_tokens: uncached,
            decode_matched_blocks,
            hashes,
            precise,
            prefill_index,
            guards,
        })
    }

    /// Both picks now hold the prompt's prefix (D holds all of it after the
    /// request either way): their indexes remember it. Kept out of
    /// [`Scheduler::schedule`] so the pick itself stays short.
    pub fn record(&self, routed: &Routed) {
        self.decode_index
            .record(routed.decode_index, &routed.hashes);
        if let Some(p) = routed.prefill_index {
            self.prefill_index.record(p, &routed.hashes);
        }
        if let (Some(kv), Some(ttl)) = (&self.kv, self.speculative) {
            kv.speculate(&routed.decode.label, &routed.precise, ttl);
            if let Some((p, _)) = &routed.prefill {
                kv.speculate(&p.label, &routed.precise, ttl);
            }
        }
    }

    /// The same scheduler over other endpoints: those also in `self` (the same
    /// `Arc`, so in-flight counts and circuits go on) keep their prefix indexes.
    pub fn with_endpoints(
        &self,
        decode: Vec<Arc<Endpoint>>,
        prefill: Vec<Arc<Endpoint>>,
    ) -> Scheduler {
        let capacity = self.prefix.lru_capacity;
        let carried = |new: &[Arc<Endpoint>], old: &[Arc<Endpoint>], index: &PrefixIndex| {
            let at: Vec<_> = new
                .iter()
                .map(|e| old.iter().position(|o| Arc::ptr_eq(o, e)))
                .collect();
            PrefixIndex::carried(index, &at, capacity)
        };
        Scheduler {
            decode_index: carried(&decode, &self.decode, &self.decode_index),
            prefill_index: carried(&prefill, &self.prefill, &self.prefill_index),
            kv: self.kv.clone(),
            speculative: self.speculative,
            decode,
            prefill,
            decode_profile: self.decode_profile.clone(),
            prefill_profile: self.prefill_profile.clone(),
            prefix: self.prefix,
            threshold: self.threshold,
            staleness: self.staleness,
            reads_metrics: self.reads_metrics,
        }
    }

    /// The prefix-index parameters (block size, blocks matched, LRU capacity).
    pub fn prefix_params(&self) -> PrefixParams {
        self.prefix
    }

    /// For requests without a prompt: the least loaded admitted decode
    /// endpoint (ties at random); None when none is admitted.
    pub fn pick_by_load<R: Rng + ?Sized>(&self, now: Instant, rng: &mut R) -> Option<LoadPick> {
        let admitted_decode = admitted(&self.decode, None, now, true);
        let load: Vec<u64> = admitted_decode
            .iter()
            .map(|&(i, _)| self.decode[i].inflight())
            .collect();
        let min = load.iter().copied().min()?;
        let ties: Vec<usize> = (0..load.len()).filter(|&k| load[k] <= min).collect();
        let (index, admission) = admitted_decode[ties[rng.random_range(0..ties.len())]];
        release_others(&self.decode, &admitted_decode, index);
        let endpoint = self.decode[index].clone();
        Some(LoadPick {
            index,
            guard: endpoint.acquire(),
            outcome: Outcome::new(endpoint.clone(), admission),
            endpoint,
        })
    }

    /// Whether some decode endpoint can take requests: its circuit is closed,
    /// or (with `count_half_open`) half-open, so a trial request may close it.
    pub fn any_decode_available(&self, now: Instant, count_half_open: bool) -> bool {
        self.decode.iter().any(|e| {
            if count_half_open {
                e.available(now)
            } else {
                e.is_closed()
            }
        })
    }
}

#[cfg(test)]
mod tests;
