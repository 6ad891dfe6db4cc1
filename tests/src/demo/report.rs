//! Turns a [`PhaseRun`] into numbers and verdicts: per-request decisions read back from the
//! engines' logs, latency percentiles, checks against the phase's [`Expect`], plain-language
//! lines, the results table and the JSON written next to it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use super::workload::{Expect, Phase, WorkloadParams};
use super::PhaseRun;

/// Latency percentiles in milliseconds (nearest rank).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(samples: impl IntoIterator<Item = Duration>) -> Stats {
        let mut ms: Vec<f64> = samples.into_iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let pick = |q: f64| -> f64 {
            if ms.is_empty() {
                return 0.0;
            }
            let rank = (q * ms.len() as f64).ceil() as usize;
            ms[rank.clamp(1, ms.len()) - 1]
        };
        Stats {
            n: ms.len(),
            p50: pick(0.50),
            p90: pick(0.90),
            p99: pick(0.99),
            max: ms.last().copied().unwrap_or(0.0),
        }
    }

    pub fn to_json(self) -> Value {
        let r = |v: f64| (v * 10.0).round() / 10.0;
        json!({"n": self.n, "p50": r(self.p50), "p90": r(self.p90), "p99": r(self.p99), "max": r(self.max)})
    }
}

/// How a request was prefilled, read back from the engines' logs by its `x-request-id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Observed {
    /// The decode engine got the client's body (no KV from elsewhere); no prefill engine saw it.
    Local,
    /// The decode engine got `kv_transfer_params` from a prefill engine.
    Remote,
    /// Prefill engines saw attempts, but the decode engine prefilled locally.
    Fallback,
    /// No decode engine logged the request.
    Unseen,
}

impl Observed {
    pub fn name(self) -> &'static str {
        match self {
            Observed::Local => "local",
            Observed::Remote => "remote",
            Observed::Fallback => "fallback",
            Observed::Unseen => "unseen",
        }
    }
}

/// One verdict.
#[derive(Clone, Debug)]
pub struct Check {
    pub ok: bool,
    pub what: String,
}

/// Everything reported about one phase.
pub struct PhaseResult {
    pub key: String,
    pub title: String,
    pub about: String,
    pub expect: Expect,
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    /// A few "id: error" lines.
    pub error_samples: Vec<String>,
    /// Sidecar decisions (counter deltas): local, remote, fallback, failed.
    pub decisions: BTreeMap<String, u64>,
    pub sidecar_errors: BTreeMap<String, u64>,
    pub prefill_retries: u64,
    /// Per-request decisions from the engine logs.
    pub observed: BTreeMap<String, usize>,
    pub prompt_tokens: (u64, u64),
    /// Time to the first SSE event, streaming requests only (the TTFT a user feels).
    pub ttft: Stats,
    /// Every request: first SSE event for streams, the whole answer otherwise.
    pub ttft_all: Stats,
    /// Whole answer, successful requests.
    pub latency: Stats,
    /// Streaming TTFT by observed decision.
    pub ttft_by_decision: BTreeMap<String, Stats>,
    /// Per prefill engine: (answered 200, failed) inference requests, attempts included.
    pub prefill_requests: Vec<(usize, usize)>,
    pub decode_requests: Vec<usize>,
    /// Requests whose prefill failed at least once and then succeeded on a retry.
    pub recovered_on_retry: usize,
    pub faults_left: Vec<u64>,
    pub held_left: Vec<u64>,
    pub held_wait: Duration,
    /// KV blocks the prefill engines released on notification during the phase.
    pub released_blocks: u64,
    pub wall: Duration,
    pub checks: Vec<Check>,
}

impl PhaseResult {
    pub fn decision(&self, name: &str) -> u64 {
        self.decisions.get(name).copied().unwrap_or(0)
    }

    pub fn observed(&self, o: Observed) -> usize {
        self.observed.get(o.name()).copied().unwrap_or(0)
    }

    pub fn prefill_total(&self) -> usize {
        self.prefill_requests.iter().map(|(ok, f)| ok + f).sum()
    }

    pub fn prefill_failed(&self) -> usize {
        self.prefill_requests.iter().map(|(_, f)| f).sum()
    }

    pub fn held_total(&self) -> u64 {
        self.held_left.iter().sum()
    }

    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    pub fn to_json(&self) -> Value {
        let ttft_by: serde_json::Map<String, Value> = self
            .ttft_by_decision
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect();
        json!({
            "key": self.key,
            "title": self.title,
            "about": self.about,
            "expect": format!("{:?}", self.expect),
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "sidecar": {
                "decisions": self.decisions,
                "errors": self.sidecar_errors,
                "prefill_retries": self.prefill_retries,
            },
            "observed_decisions": self.observed,
            "prompt_tokens": {"min": self.prompt_tokens.0, "max": self.prompt_tokens.1},
            "ttft_ms_streams": self.ttft.to_json(),
            "ttft_ms_all": self.ttft_all.to_json(),
            "latency_ms": self.latency.to_json(),
            "ttft_ms_streams_by_decision": ttft_by,
            "kv_blocks_released": self.released_blocks,
            "prefill_engine_requests": self.prefill_requests.iter().enumerate()
                .map(|(i, (ok, failed))| json!({"engine": format!("prefill-{i}"), "ok": ok, "failed": failed}))
                .collect::<Vec<_>>(),
            "decode_engine_requests": self.decode_requests,
            "recovered_on_retry": self.recovered_on_retry,
            "injected_failures_left": self.faults_left,
            "held_blocks_left": self.held_left,
            "held_blocks_wait_ms": self.held_wait.as_millis() as u64,
            "wall_ms": self.wall.as_millis() as u64,
            "checks": self.checks.iter().map(|c| json!({"ok": c.ok, "check": c.what})).collect::<Vec<_>>(),
            "passed": self.passed(),
        })
    }
}

/// Reads a phase's record.
pub fn analyze(phase: &Phase, run: &PhaseRun, params: &WorkloadParams) -> PhaseResult {
    let n = phase.requests.len();
    let ok = run.outcomes.iter().filter(|o| o.ok()).count();
    let error_samples: Vec<String> = run
        .outcomes
        .iter()
        .filter_map(|o| o.error.as_ref().map(|e| format!("{}: {e}", o.id)))
        .take(3)
        .collect();
    let to_u64 = |m: &BTreeMap<String, f64>| -> BTreeMap<String, u64> {
        m.iter()
            .map(|(k, v)| (k.clone(), v.max(0.0).round() as u64))
            .collect()
    };
    let decisions = to_u64(&run.counters.decisions);
    let sidecar_errors = to_u64(&run.counters.errors);

    // Per request: prefill attempts (engine, ok) and the decode engine's view.
    let attempts_of = |id: &str| -> Vec<(usize, bool)> {
        run.prefill_log
            .iter()
            .enumerate()
            .flat_map(|(e, log)| {
                log.iter()
                    .filter(move |r| r.request_id.as_deref() == Some(id))
                    .map(move |r| (e, r.ok()))
            })
            .collect()
    };
    let decode_of = |id: &str| {
        run.decode_log
            .iter()
            .flatten()
            .filter(|r| r.request_id.as_deref() == Some(id))
            .collect::<Vec<_>>()
    };
    let mut observed_per_req = Vec::with_capacity(n);
    let mut recovered_on_retry = 0;
    let mut fallback_ok = true;
    let max_attempts = params.prefill_max_retries as usize + 1;
    for spec in &phase.requests {
        let attempts = attempts_of(&spec.id);
        let decode = decode_of(&spec.id);
        let obs = if decode.is_empty() {
            Observed::Unseen
        } else if decode.iter().any(|r| r.remote_prefill) {
            Observed::Remote
        } else if attempts.is_empty() {
            Observed::Local
        } else {
            Observed::Fallback
        };
        let failed = attempts.iter().filter(|(_, ok)| !ok).count();
        if obs == Observed::Remote && failed > 0 {
            recovered_on_retry += 1;
        }
        // A fallback must follow exactly the allowed attempts, all failed, all on the named engine.
        if obs == Observed::Fallback {
            let right_engine = attempts.iter().all(|(e, _)| Some(*e) == spec.prefiller);
            fallback_ok &= right_engine && failed == max_attempts && attempts.len() == failed;
        }
        observed_per_req.push(obs);
    }
    let mut observed = BTreeMap::new();
    for o in &observed_per_req {
        *observed.entry(o.name().to_string()).or_insert(0) += 1;
    }
    let mut ttft_by: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    for ((o, out), spec) in observed_per_req
        .iter()
        .zip(&run.outcomes)
        .zip(&phase.requests)
    {
        if let (Some(t), true) = (out.ttft, spec.stream) {
            ttft_by.entry(o.name().to_string()).or_default().push(t);
        }
    }
    let prefill_requests: Vec<(usize, usize)> = run
        .prefill_log
        .iter()
        .map(|log| {
            let ok = log.iter().filter(|r| r.ok()).count();
            (ok, log.len() - ok)
        })
        .collect();
    let tokens = phase.requests.iter().map(|r| r.prompt_tokens);
    let mut result = PhaseResult {
        key: phase.key.to_string(),
        title: phase.title.to_string(),
        about: phase.about.clone(),
        expect: phase.expect,
        requests: n,
        ok,
        errors: n - ok,
        error_samples,
        decisions,
        sidecar_errors,
        prefill_retries: run.counters.prefill_retries.max(0.0).round() as u64,
        observed,
        prompt_tokens: (tokens.clone().min().unwrap_or(0), tokens.max().unwrap_or(0)),
        ttft: Stats::of(
            run.outcomes
                .iter()
                .zip(&phase.requests)
                .filter(|(_, spec)| spec.stream)
                .filter_map(|(o, _)| o.ttft),
        ),
        ttft_all: Stats::of(run.outcomes.iter().filter_map(|o| o.ttft)),
        latency: Stats::of(run.outcomes.iter().filter(|o| o.ok()).map(|o| o.total)),
        ttft_by_decision: ttft_by
            .into_iter()
            .map(|(k, v)| (k, Stats::of(v)))
            .collect(),
        prefill_requests,
        decode_requests: run.decode_log.iter().map(Vec::len).collect(),
        recovered_on_retry,
        faults_left: run.faults_left.clone(),
        held_left: run.held_left.clone(),
        held_wait: run.held_wait,
        released_blocks: run.released_blocks,
        wall: run.wall,
        checks: Vec::new(),
    };
    result.checks = checks(phase, &result, fallback_ok, params);
    result
}

fn check(ok: bool, what: impl Into<String>) -> Check {
    Check {
        ok,
        what: what.into(),
    }
}

fn checks(
    phase: &Phase,
    r: &PhaseResult,
    fallback_ok: bool,
    params: &WorkloadParams,
) -> Vec<Check> {
    let n = r.requests;
    let counted: u64 = ["local", "remote", "fallback", "failed"]
        .iter()
        .map(|d| r.decision(d))
        .sum();
    let mut out = vec![
        check(
            r.ok == n,
            format!("{}: every request answered 200 ({}/{n})", r.title, r.ok),
        ),
        check(
            counted == n as u64,
            format!(
                "{}: the sidecars decided on every request ({counted}/{n})",
                r.title
            ),
        ),
        check(
            r.observed(Observed::Unseen) == 0,
            format!(
                "{}: every request reached a decode engine with its x-request-id ({} unseen)",
                r.title,
                r.observed(Observed::Unseen)
            ),
        ),
        check(
            r.held_total() == 0,
            format!(
                "{}: prefill engines hold no KV blocks afterwards ({} left)",
                r.title,
                r.held_total()
            ),
        ),
    ];
    match phase.expect {
        Expect::Local => {
            out.push(check(
                r.decision("local") == n as u64 && r.observed(Observed::Local) == n,
                format!(
                    "{}: all stayed local (sidecars: {} local, engine logs: {} local)",
                    r.title,
                    r.decision("local"),
                    r.observed(Observed::Local)
                ),
            ));
            out.push(check(
                r.prefill_total() == 0,
                format!(
                    "{}: no prefill engine was asked ({} requests reached one)",
                    r.title,
                    r.prefill_total()
                ),
            ));
        }
        Expect::Remote => {
            out.push(check(
                r.decision("remote") == n as u64 && r.observed(Observed::Remote) == n,
                format!(
                    "{}: all were prefilled remotely (sidecars: {} remote, engine logs: {} remote)",
                    r.title,
                    r.decision("remote"),
                    r.observed(Observed::Remote)
                ),
            ));
            for (e, (ok, _)) in r.prefill_requests.iter().enumerate() {
                let named = phase
                    .requests
                    .iter()
                    .filter(|q| q.prefiller == Some(e))
                    .count();
                out.push(check(
                    *ok == named,
                    format!(
                        "{}: prefill-{e} served the {named} prefills named for it ({ok})",
                        r.title
                    ),
                ));
            }
        }
        Expect::Fallback { engine } => {
            let fb = r.decision("fallback");
            out.push(check(
                fb >= 1,
                format!(
                    "{}: some requests fell back to local prefill ({fb})",
                    r.title
                ),
            ));
            out.push(check(
                fb as usize == r.observed(Observed::Fallback),
                format!(
                    "{}: sidecar fallbacks match the engine logs ({fb} vs {})",
                    r.title,
                    r.observed(Observed::Fallback)
                ),
            ));
            out.push(check(
                fallback_ok,
                format!(
                    "{}: each fallback followed {} failed attempts on prefill-{engine}",
                    r.title,
                    params.prefill_max_retries + 1
                ),
            ));
            out.push(check(
                r.observed(Observed::Remote) + r.observed(Observed::Fallback) == n
                    && r.decision("failed") == 0,
                format!(
                    "{}: every other request was prefilled remotely ({} remote, {} failed)",
                    r.title,
                    r.observed(Observed::Remote),
                    r.decision("failed")
                ),
            ));
        }
    }
    out
}

/// The results table, one row per phase.
pub fn table(results: &[PhaseResult]) -> String {
    let header = [
        "phase",
        "prompt tok",
        "reqs",
        "ok",
        "err",
        "local",
        "remote",
        "fallback",
        "TTFT p50",
        "p90",
        "p99 ms",
        "total p50",
        "prefill reqs",
        "held blocks",
    ];
    let ms = |v: f64| format!("{v:.1}");
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let prefill = if r.prefill_failed() > 0 {
                format!("{} ({} err)", r.prefill_total(), r.prefill_failed())
            } else {
                r.prefill_total().to_string()
            };
            vec![
                r.title.clone(),
                format!("{}-{}", r.prompt_tokens.0, r.prompt_tokens.1),
                r.requests.to_string(),
                r.ok.to_string(),
                r.errors.to_string(),
                r.decision("local").to_string(),
                r.decision("remote").to_string(),
                r.decision("fallback").to_string(),
                ms(r.ttft.p50),
                ms(r.ttft.p90),
                ms(r.ttft.p99),
                ms(r.latency.p50),
                prefill,
                r.held_total().to_string(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[String]| -> String {
        let mut s = String::from("  ");
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                s.push_str(&format!("{c:<w$}"));
            } else {
                s.push_str(&format!("  {c:>w$}"));
            }
        }
        s.trim_end().to_string()
    };
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut out = vec![line(&header)];
    let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
    out.push(format!("  {}", "-".repeat(total)));
    out.extend(rows.iter().map(|r| line(r)));
    out.join("\n")
}

/// Plain-language lines about what happened, phase by phase.
pub fn narrative(results: &[PhaseResult], params: &WorkloadParams) -> Vec<String> {
    let baseline = results
        .iter()
        .find(|r| r.expect == Expect::Local)
        .map(|r| r.ttft.p50);
    let mut out = Vec::new();
    for r in results {
        let n = r.requests;
        match r.expect {
            Expect::Local if r.decision("local") == n as u64 && r.prefill_total() == 0 => {
                out.push(format!(
                    "{}: stayed local. All {n} were prefilled on their own decode engine and none \
                     reached a prefill engine, although every request named one: {}-{} prompt \
                     tokens is below the {}-token threshold.",
                    r.title, r.prompt_tokens.0, r.prompt_tokens.1, params.threshold_tokens
                ))
            }
            Expect::Local => out.push(format!(
                "{}: expected to stay local, but only {} of {n} did ({} remote, {} fallback) and \
                 {} requests reached a prefill engine; prompts {}-{} tokens, threshold {}.",
                r.title,
                r.decision("local"),
                r.decision("remote"),
                r.decision("fallback"),
                r.prefill_total(),
                r.prompt_tokens.0,
                r.prompt_tokens.1,
                params.threshold_tokens
            )),
            Expect::Remote if r.decision("remote") == n as u64 => {
                let per_engine: Vec<String> = r
                    .prefill_requests
                    .iter()
                    .enumerate()
                    .map(|(i, (ok, _))| format!("prefill-{i} {ok}"))
                    .collect();
                out.push(format!(
                    "{}: disaggregated. All {n} ({}-{} prompt tokens) were prefilled on a \
                     prefill engine ({}) and decoded with the KV blocks it handed over.",
                    r.title,
                    r.prompt_tokens.0,
                    r.prompt_tokens.1,
                    per_engine.join(", ")
                ));
                if let Some(b) = baseline {
                    out.push(format!(
                        "{}: streaming TTFT p50 {:.1} ms vs {b:.1} ms for short prompts: the \
                         prefill leg runs on the prefill engine before the decode engine makes \
                         the first token.",
                        r.title, r.ttft.p50
                    ));
                }
            }
            Expect::Remote => out.push(format!(
                "{}: expected to be disaggregated, but only {} of {n} were prefilled remotely \
                 ({} local, {} fallback, {} failed); prompts {}-{} tokens, threshold {}.",
                r.title,
                r.decision("remote"),
                r.decision("local"),
                r.decision("fallback"),
                r.decision("failed"),
                r.prompt_tokens.0,
                r.prompt_tokens.1,
                params.threshold_tokens
            )),
            Expect::Fallback { engine } => {
                out.push(format!(
                    "{}: prefill-{engine} answered 503 to {} prefill attempts and the sidecars \
                     retried {} times: {} requests used up their 1 + {} attempts and fell back to local \
                     prefill, {} recovered on a retry, {} were prefilled remotely in all. {} of \
                     {n} answered 200.",
                    r.title,
                    r.prefill_failed(),
                    r.prefill_retries,
                    r.decision("fallback"),
                    params.prefill_max_retries,
                    r.recovered_on_retry,
                    r.observed(Observed::Remote),
                    r.ok
                ));
                if let (Some(f), Some(m)) = (
                    r.ttft_by_decision.get("fallback"),
                    r.ttft_by_decision.get("remote"),
                ) {
                    out.push(format!(
                        "{}: a failed prefill costs time, not the answer: streaming TTFT p50 \
                         {:.1} ms for the {} streamed fallbacks (failed attempts and backoff \
                         included) vs {:.1} ms for the {} streamed remote prefills.",
                        r.title, f.p50, f.n, m.p50, m.n
                    ));
                }
            }
        }
        if matches!(r.expect, Expect::Remote | Expect::Fallback { .. }) {
            if r.held_total() == 0 {
                out.push(format!(
                    "{}: the prefill engines held {} KV blocks for the decode engines and \
                     released them all once notified; none left.",
                    r.title, r.released_blocks
                ));
            } else {
                out.push(format!(
                    "{}: {} KV blocks still held on the prefill engines {} ms after the last \
                     answer ({} released): the decode engines did not notify them all.",
                    r.title,
                    r.held_total(),
                    r.held_wait.as_millis(),
                    r.released_blocks
                ));
            }
        }
        if r.errors > 0 {
            out.push(format!(
                "{}: {} requests failed, e.g. {}",
                r.title,
                r.errors,
                r.error_samples.join("; ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Stats::of((1..=100).map(Duration::from_millis));
        assert_eq!(
            (s.n, s.p50, s.p90, s.p99, s.max),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        let one = Stats::of([Duration::from_millis(7)]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert_eq!(Stats::of([]).n, 0);
    }
}
