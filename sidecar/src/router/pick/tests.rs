//! Tests of `router::pick`.

use super::*;
use crate::router::breaker::BreakerConfig;
use crate::router::config::WeightedScorer;
use crate::router::endpoint::{EndpointObs, Role};
use crate::router::probe::EngineMetrics;
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
        ..Candidate::default()
    }
}

fn q(waiting: Option<f64>) -> Candidate {
    Candidate {
        waiting,
        ..Candidate::default()
    }
}

fn kv(kv_usage: Option<f64>) -> Candidate {
    Candidate {
        kv_usage,
        ..Candidate::default()
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

const STALE: Duration = Duration::from_secs(2);

fn endpoint(label: String, role: Role) -> Arc<Endpoint> {
    Arc::new(Endpoint::new(
        label,
        role,
        BreakerConfig {
            threshold: 1,
            open_for: Duration::from_secs(5),
        },
        EndpointObs::default(),
    ))
}

fn scheduler_with(scheduling: Scheduling, decodes: usize, prefills: usize) -> Scheduler {
    Scheduler::new(
        &scheduling,
        (0..decodes)
            .map(|i| endpoint(format!("d{i}"), Role::Decode))
            .collect(),
        (0..prefills)
            .map(|i| endpoint(format!("p{i}"), Role::Prefill))
            .collect(),
        STALE,
    )
}

fn scheduler(decodes: usize, prefills: usize, threshold: u64) -> Scheduler {
    let scheduling = Scheduling {
        threshold,
        ..Scheduling::default()
    };
    scheduler_with(scheduling, decodes, prefills)
}

fn schedule(s: &Scheduler, p: &Prompt, r: &mut StdRng) -> Routed {
    let routed = s
        .schedule("m", p, None, Instant::now(), r)
        .expect("a decode endpoint");
    s.record(&routed);
    routed
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
    let first = schedule(&s, &prompt(&shared, &"a".repeat(400 * 4)), &mut r);
    assert_eq!(first.uncached_tokens, 2000);
    let (d0, p0) = (
        first.decode.label.clone(),
        first.prefill.as_ref().unwrap().0.label.clone(),
    );
    assert_eq!(first.decode.inflight(), 1);
    drop(first);
    for tail in ["b", "c", "d", "e"] {
        let next = schedule(&s, &prompt(&shared, &tail.repeat(400 * 4)), &mut r);
        assert_eq!(next.decode.label, d0);
        // 1600 shared tokens = 100 cached blocks on D.
        assert_eq!(next.uncached_tokens, 400);
        assert_eq!(next.prefill.as_ref().unwrap().0.label, p0);
    }
    // The same prompt again: all of it cached on D, so it stays local.
    let again = schedule(&s, &prompt(&shared, &"e".repeat(400 * 4)), &mut r);
    assert_eq!(again.uncached_tokens, 0);
    assert!(again.prefill.is_none());
}

#[test]
fn short_prompts_and_zero_threshold_stay_local() {
    let s = scheduler(2, 2, 256);
    let r = schedule(&s, &prompt("short prompt", ""), &mut rng());
    assert!(r.prefill.is_none());
    assert_eq!(r.guards.len(), 1);
    let never = scheduler(2, 2, 0);
    let r = schedule(&never, &prompt(&"z".repeat(40_000), ""), &mut rng());
    assert!(r.prefill.is_none());
}

#[test]
fn guards_release_inflight_and_load_picks_the_idle_one() {
    let s = scheduler(2, 0, 256);
    let now = Instant::now();
    let busy = s.pick_by_load(now, &mut rng()).unwrap();
    assert_eq!(busy.endpoint.inflight(), 1);
    for _ in 0..10 {
        let other = s.pick_by_load(now, &mut rng()).unwrap();
        assert_ne!(other.endpoint.label, busy.endpoint.label);
    }
    let endpoint = busy.endpoint.clone();
    drop(busy);
    assert_eq!(endpoint.inflight(), 0);
}

#[test]
fn queue_scores_min_max_over_known_queues() {
    let mut out = [0.0; 4];
    let cands = [q(Some(0.0)), q(Some(5.0)), q(Some(10.0)), q(None)];
    QueueScorer.score(&ScoreInput::new(&cands, 0), &mut out);
    assert_eq!(out, [1.0, 0.5, 0.0, NEUTRAL]);
    let equal = [q(Some(3.0)), q(Some(3.0)), q(None), q(Some(3.0))];
    QueueScorer.score(&ScoreInput::new(&equal, 0), &mut out);
    assert_eq!(out, [1.0, 1.0, NEUTRAL, 1.0], "all equal: 1");
    let unknown = [q(None), q(None)];
    let mut out = [0.0; 2];
    QueueScorer.score(&ScoreInput::new(&unknown, 0), &mut out);
    assert_eq!(out, [NEUTRAL, NEUTRAL]);
    // Not relative to an absolute scale: 1 vs 2 waiting is as far apart as 0 vs 100.
    let near = [q(Some(1.0)), q(Some(2.0))];
    QueueScorer.score(&ScoreInput::new(&near, 0), &mut out);
    assert_eq!(out, [1.0, 0.0]);
}

#[test]
fn kv_cache_scores_free_share_and_neutral_when_unknown() {
    let cands = [
        kv(Some(0.0)),
        kv(Some(0.25)),
        kv(Some(1.0)),
        kv(None),
        kv(Some(1.7)),
    ];
    let mut out = [0.0; 5];
    KvCacheUtilizationScorer.score(&ScoreInput::new(&cands, 0), &mut out);
    assert_eq!(out, [1.0, 0.75, 0.0, NEUTRAL, 0.0]);
}

fn only(scorer: ScorerSpec) -> Scheduling {
    let profile = ProfileSpec {
        name: "decode".into(),
        scorers: vec![WeightedScorer {
            name: "s".into(),
            scorer,
            weight: 1.0,
        }],
        picker: PickerSpec::MaxScore,
    };
    Scheduling {
        decode: profile.clone(),
        prefill: Some(ProfileSpec {
            name: "prefill".into(),
            ..profile
        }),
        ..Scheduling::default()
    }
}

fn waiting(n: f64) -> EngineMetrics {
    EngineMetrics {
        waiting: Some(n),
        ..EngineMetrics::default()
    }
}

#[test]
fn a_queue_loses_traffic_and_stale_metrics_are_neutral() {
    let s = scheduler_with(only(ScorerSpec::Queue), 3, 0);
    let t0 = Instant::now();
    s.decode[0].set_metrics(waiting(4.0), t0);
    s.decode[1].set_metrics(waiting(0.0), t0);
    s.decode[2].set_metrics(waiting(9.0), t0);
    let mut r = rng();
    for _ in 0..20 {
        let routed = s.schedule("m", &prompt("x", ""), None, t0, &mut r).unwrap();
        assert_eq!(routed.decode_index, 1);
    }
    // d1's metrics go stale: neutral, between fresh d0 (now the shortest, 1) and d2 (0).
    let later = t0 + STALE + Duration::from_millis(1);
    s.decode[0].set_metrics(waiting(4.0), later);
    s.decode[2].set_metrics(waiting(9.0), later);
    let routed = s
        .schedule("m", &prompt("x", ""), None, later, &mut r)
        .unwrap();
    assert_eq!(routed.decode_index, 0);
    let routed = s
        .schedule("m", &prompt("x", ""), Some(0), later, &mut r)
        .unwrap();
    assert_eq!(
        (routed.decode_index, routed.decode_score),
        (2, 1.0),
        "the only known queue scores 1 and beats neutral"
    );
    // KV usage is absolute: a stale endpoint (0.5) beats a 90% full one (0.1).
    let s = scheduler_with(only(ScorerSpec::KvCacheUtilization), 2, 0);
    let full = EngineMetrics {
        kv_usage: Some(0.9),
        ..EngineMetrics::default()
    };
    s.decode[0].set_metrics(full, t0);
    s.decode[1].set_metrics(EngineMetrics::default(), t0);
    for _ in 0..10 {
        let routed = s.schedule("m", &prompt("x", ""), None, t0, &mut r).unwrap();
        assert_eq!((routed.decode_index, routed.decode_score), (1, NEUTRAL));
    }
    s.decode[1].set_metrics(
        EngineMetrics {
            kv_usage: Some(0.95),
            ..EngineMetrics::default()
        },
        t0,
    );
    let routed = s.schedule("m", &prompt("x", ""), None, t0, &mut r).unwrap();
    assert_eq!(routed.decode_index, 0);
    let routed = s
        .schedule("m", &prompt("x", ""), None, later, &mut r)
        .unwrap();
    assert_eq!(routed.decode_score, NEUTRAL, "both stale: both neutral");
}

#[test]
fn open_circuits_are_skipped_and_exclude_is_honoured() {
    let s = scheduler(3, 0, 256);
    let now = Instant::now();
    s.decode[0].report(false, now);
    s.decode[2].report(false, now);
    let mut r = rng();
    for _ in 0..10 {
        assert_eq!(schedule(&s, &prompt("x", ""), &mut r).decode_index, 1);
        assert_eq!(s.pick_by_load(now, &mut r).unwrap().index, 1);
    }
    assert!(s
        .schedule("m", &prompt("x", ""), Some(1), now, &mut r)
        .is_none());
    assert!(s.any_decode_available(now, false));
    s.decode[1].report(false, now);
    assert!(!s.any_decode_available(now, true));
    let due = now + Duration::from_secs(5);
    assert!(s.any_decode_available(due, true), "half-open");
    assert!(
        !s.any_decode_available(due, false),
        "half-open is not closed"
    );
    assert!(s
        .schedule("m", &prompt("x", ""), None, now, &mut r)
        .is_none());
    assert!(s.pick_by_load(now, &mut r).is_none());
}

#[test]
fn a_half_open_endpoint_takes_one_trial_at_a_time() {
    let s = scheduler(2, 0, 256);
    let t0 = Instant::now();
    s.decode[0].report(false, t0);
    s.decode[1].report(false, t0);
    let due = t0 + Duration::from_secs(5);
    let mut r = rng();
    let first = s
        .schedule("m", &prompt("x", ""), None, due, &mut r)
        .unwrap();
    let second = s
        .schedule("m", &prompt("x", ""), None, due, &mut r)
        .unwrap();
    assert_ne!(first.decode_index, second.decode_index);
    assert!(
        s.schedule("m", &prompt("x", ""), None, due, &mut r)
            .is_none(),
        "both trials taken"
    );
    drop(first); // abandoned: its trial comes back
    let third = s
        .schedule("m", &prompt("x", ""), None, due, &mut r)
        .unwrap();
    assert_ne!(third.decode_index, second.decode_index);
    let index = third.decode_index;
    third.outcome.report(true);
    for _ in 0..5 {
        assert_eq!(
            s.schedule("m", &prompt("x", ""), None, due, &mut r)
                .unwrap()
                .decode_index,
            index,
            "closed again: admitted without a trial"
        );
    }
}

#[test]
fn no_admitted_prefill_goes_local_and_says_so() {
    let s = scheduler(1, 2, 256);
    let now = Instant::now();
    let long = prompt(&"z".repeat(4000), "");
    s.prefill[0].report(false, now);
    let mut r = rng();
    let routed = s.schedule("m", &long, None, now, &mut r).unwrap();
    assert_eq!(routed.prefill.as_ref().unwrap().0.label, "p1");
    assert!(!routed.prefill_unavailable);
    s.prefill[1].report(false, now);
    let long = prompt(&"y".repeat(4000), "");
    let routed = s.schedule("m", &long, None, now, &mut r).unwrap();
    assert!(routed.prefill.is_none() && routed.prefill_unavailable);
    // Half-open prefill endpoints wait for a health check: no trials.
    let due = now + Duration::from_secs(5);
    let long = prompt(&"w".repeat(4000), "");
    let routed = s.schedule("m", &long, None, due, &mut r).unwrap();
    assert!(routed.prefill_unavailable);
    s.prefill[0].report(true, due);
    let long = prompt(&"v".repeat(4000), "");
    let routed = s.schedule("m", &long, None, due, &mut r).unwrap();
    assert_eq!(routed.prefill.as_ref().unwrap().0.label, "p0");
}
