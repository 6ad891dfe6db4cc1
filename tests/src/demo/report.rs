//! Turns each mode's [`ModeRun`] into numbers and verdicts: latency percentiles, throughput, KV
//! bytes and transfer rate, the router's decisions, checks that the run did what the mode
//! promises, the comparison table, plain-language lines, the JSON and the PNG chart.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use transfer::chart::{BarChart, Series};
use transfer::layout::format_bytes;

use super::client::Outcome;
use super::cluster::KvFeed;
use super::{Mode, ModeRun};

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
        let r = |v: f64| (v * 100.0).round() / 100.0;
        json!({"n": self.n, "p50_ms": r(self.p50), "p90_ms": r(self.p90), "p99_ms": r(self.p99), "max_ms": r(self.max)})
    }
}

/// One verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub what: String,
    pub ok: bool,
}

fn check(ok: bool, what: String) -> Check {
    Check { what, ok }
}

/// The numbers of one mode.
#[derive(Clone, Debug)]
pub struct ModeResult {
    pub mode: Mode,
    pub requests: usize,
    pub ok: usize,
    /// The first few failures, `id: why`.
    pub errors: Vec<String>,
    pub ttft: Stats,
    pub itl: Stats,
    pub output_tokens: u64,
    pub tokens_per_s: f64,
    pub wall: Duration,
    /// Requests the router sent with a prefill engine (remote prefill) and without.
    pub remote: u64,
    pub local: u64,
    pub kv_bytes: u64,
    pub kv_pulls: u64,
    /// Bytes over the summed duration of the pulls.
    pub kv_gbps: f64,
    pub prompt_tokens: u64,
    pub prompt_tokens_computed: u64,
    /// Prompt tokens the engines found in their prefix caches (decode and prefill engines).
    pub cache_hit_tokens: u64,
    /// What the router's precise index got from the engines' KV events (precise mode).
    pub kv_feed: Option<KvFeed>,
    pub integrity_failures: u64,
    pub pulls_failed: u64,
    pub released_blocks: u64,
    pub held_left: u64,
    pub checks: Vec<Check>,
}

impl ModeResult {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    pub fn failed(&self) -> usize {
        self.requests - self.ok
    }

    /// Share of requests prefilled remotely.
    pub fn pd_share(&self) -> f64 {
        let all = (self.remote + self.local).max(1);
        self.remote as f64 / all as f64
    }

    pub fn to_json(&self) -> Value {
        json!({
            "mode": self.mode.name(),
            "description": self.mode.describe(),
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.failed(),
            "error_samples": self.errors,
            "ttft": self.ttft.to_json(),
            "itl": self.itl.to_json(),
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": (self.tokens_per_s * 10.0).round() / 10.0,
            "wall_s": (self.wall.as_secs_f64() * 1000.0).round() / 1000.0,
            "router": {"remote_prefill": self.remote, "local_prefill": self.local},
            "kv": {
                "bytes_moved": self.kv_bytes,
                "pulls": self.kv_pulls,
                "transfer_gbps": (self.kv_gbps * 1000.0).round() / 1000.0,
                "pulls_failed": self.pulls_failed,
                "integrity_failures": self.integrity_failures,
                "blocks_released_on_notification": self.released_blocks,
                "blocks_held_after": self.held_left,
            },
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_computed": self.prompt_tokens_computed,
            "prefix_cache_hit_tokens": self.cache_hit_tokens,
            "precise_index": self.kv_feed.map(|f| json!({
                "kv_events": f.events,
                "block_stored_events": f.block_stored,
                "block_removed_events": f.block_removed,
                "index_blocks": f.index_blocks,
            })),
            "checks": self.checks.iter().map(|c| json!({"what": c.what, "ok": c.ok})).collect::<Vec<_>>(),
        })
    }
}

/// Numbers and per-mode checks of one run.
pub fn analyze(run: &ModeRun) -> ModeResult {
    let outcomes = &run.outcomes;
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok()).collect();
    let errors: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.error.as_ref().map(|e| format!("{}: {e}", o.id)))
        .take(5)
        .collect();
    let ttft = Stats::of(ok.iter().filter_map(|o| o.ttft));
    let itl = Stats::of(ok.iter().flat_map(|o| o.itl.iter().copied()));
    let output_tokens: u64 = ok.iter().map(|o| o.output_tokens).sum();
    let prompt_tokens: u64 = ok.iter().map(|o| o.prompt_tokens).sum();
    let secs = run.wall.as_secs_f64().max(1e-9);
    let e = &run.engines;
    let kv_gbps = if e.kv_pull_micros == 0 {
        0.0
    } else {
        e.kv_bytes_pulled as f64 / (e.kv_pull_micros as f64 * 1e-6) / 1e9
    };
    let d = run.decisions;
    let n = outcomes.len();
    let mut checks = vec![
        check(
            ok.len() == n,
            format!(
                "{}: all {n} requests answered ({} did)",
                run.mode.name(),
                ok.len()
            ),
        ),
        check(
            d.local + d.remote == n as u64,
            format!(
                "{}: the router decided every request ({} local + {} remote of {n})",
                run.mode.name(),
                d.local,
                d.remote
            ),
        ),
        check(
            e.kv_integrity_failures == 0,
            format!(
                "{}: every pulled KV byte verified ({} integrity failures)",
                run.mode.name(),
                e.kv_integrity_failures
            ),
        ),
        check(
            run.held_left == 0,
            format!(
                "{}: prefill engines hold no KV blocks afterwards ({} held)",
                run.mode.name(),
                run.held_left
            ),
        ),
    ];
    match run.mode {
        Mode::Aggregated => checks.push(check(
            d.remote == 0 && e.kv_bytes_pulled == 0,
            format!(
                "aggregated: no remote prefill and no KV moved ({} remote, {} B)",
                d.remote, e.kv_bytes_pulled
            ),
        )),
        Mode::PdAlways => checks.push(check(
            d.remote == n as u64 && e.kv_pulls_ok + e.kv_pulls_failed >= n as u64,
            format!(
                "pd-always: every request prefilled remotely and its KV pulled ({} remote, {} pulls of {n})",
                d.remote,
                e.kv_pulls_ok + e.kv_pulls_failed
            ),
        )),
        Mode::PdSelective | Mode::PdSelectivePrecise => checks.push(check(
            d.remote > 0 && d.local > 0 && e.kv_bytes_pulled > 0,
            format!(
                "{}: some requests prefilled remotely, others locally ({} remote, {} local)",
                run.mode.name(),
                d.remote,
                d.local
            ),
        )),
    }
    if run.mode.kv_events() {
        let f = run.kv_feed.unwrap_or_default();
        checks.push(check(
            f.block_stored > 0 && f.index_blocks > 0,
            format!(
                "{}: the engines' KV events fed the router's precise index ({} BlockStored \
                 events, {} blocks indexed at the end)",
                run.mode.name(),
                f.block_stored,
                f.index_blocks
            ),
        ));
    }
    ModeResult {
        mode: run.mode,
        requests: n,
        ok: ok.len(),
        errors,
        ttft,
        itl,
        output_tokens,
        tokens_per_s: output_tokens as f64 / secs,
        wall: run.wall,
        remote: d.remote,
        local: d.local,
        kv_bytes: e.kv_bytes_pulled,
        kv_pulls: e.kv_pulls_ok,
        kv_gbps,
        prompt_tokens,
        prompt_tokens_computed: e.prompt_tokens_computed,
        cache_hit_tokens: e.prefix_cache_hits,
        kv_feed: run.kv_feed,
        integrity_failures: e.kv_integrity_failures,
        pulls_failed: e.kv_pulls_failed,
        released_blocks: e.released_blocks,
        held_left: run.held_left,
        checks,
    }
}

/// Checks that compare modes.
pub fn cross_checks(results: &[ModeResult]) -> Vec<Check> {
    let get = |m: Mode| results.iter().find(|r| r.mode == m);
    let mut out = Vec::new();
    // Not asked of pd-selective-precise: its index learns of a cold prefix only once an engine
    // has stored it, so concurrent cold chats may each be prefilled remotely (and their KV
    // moved), where the approximate index sends the followers after the first.
    if let (Some(always), Some(sel)) = (get(Mode::PdAlways), get(Mode::PdSelective)) {
        out.push(check(
            sel.kv_bytes < always.kv_bytes,
            format!(
                "pd-selective moved less KV than pd-always ({} vs {})",
                format_bytes(sel.kv_bytes),
                format_bytes(always.kv_bytes)
            ),
        ));
    }
    out
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The comparison table.
pub fn table(results: &[ModeResult]) -> String {
    let header = [
        "mode",
        "reqs",
        "errors",
        "P/D",
        "TTFT p50",
        "p90",
        "p99",
        "ITL p50",
        "p99",
        "out tok/s",
        "prefill tok",
        "cached tok",
        "KV moved",
        "xfer GB/s",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in results {
        rows.push(vec![
            r.mode.name().to_string(),
            r.requests.to_string(),
            r.failed().to_string(),
            format!("{:.0}%", r.pd_share() * 100.0),
            ms(r.ttft.p50),
            ms(r.ttft.p90),
            ms(r.ttft.p99),
            ms(r.itl.p50),
            ms(r.itl.p99),
            format!("{:.0}", r.tokens_per_s),
            r.prompt_tokens_computed.to_string(),
            r.cache_hit_tokens.to_string(),
            if r.kv_bytes == 0 {
                "0".to_string()
            } else {
                format_bytes(r.kv_bytes)
            },
            if r.kv_pulls == 0 {
                "-".to_string()
            } else {
                format!("{:.2}", r.kv_gbps)
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if c == 0 {
                    format!("{v:<w$}", w = widths[c])
                } else {
                    format!("{v:>w$}", w = widths[c])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
            out.push('\n');
        }
    }
    out.pop();
    out
}

fn ratio(a: f64, b: f64) -> String {
    if b <= 0.0 {
        return "-".into();
    }
    let r = a / b;
    if r >= 1.0 {
        format!("{r:.1}x lower")
    } else {
        format!("{:.1}x higher", 1.0 / r)
    }
}

/// What the numbers say, in words. Every statement is computed from the results, including
/// which way a comparison went.
pub fn narrative(results: &[ModeResult]) -> Vec<String> {
    let get = |m: Mode| results.iter().find(|r| r.mode == m);
    let mut out = Vec::new();
    if let (Some(agg), Some(always)) = (get(Mode::Aggregated), get(Mode::PdAlways)) {
        let itl = if always.itl.p99 < agg.itl.p99 {
            "prefills run on other engines, so they no longer stall the decode batches"
        } else {
            "no gain on this run: the machine's cores, not the engines, set the pace"
        };
        out.push(format!(
            "P/D always vs aggregated: ITL p99 {} -> {} ms ({}): {itl}. TTFT p90 {} -> {} ms \
             ({}): every request pays a prefill leg and a KV pull.",
            ms(agg.itl.p99),
            ms(always.itl.p99),
            ratio(agg.itl.p99, always.itl.p99),
            ms(agg.ttft.p90),
            ms(always.ttft.p90),
            ratio(agg.ttft.p90, always.ttft.p90),
        ));
    }
    // The approximate selective mode, or the precise one when it ran alone.
    let selective = get(Mode::PdSelective).or_else(|| get(Mode::PdSelectivePrecise));
    let sel_name = |sel: &ModeResult| match sel.mode {
        Mode::PdSelectivePrecise => "P/D selective (precise)",
        _ => "P/D selective",
    };
    if let (Some(always), Some(sel)) = (get(Mode::PdAlways), selective) {
        out.push(format!(
            "{} vs P/D always: TTFT p90 {} -> {} ms ({}); {} of {} requests were \
             prefilled remotely, moving {} of KV instead of {}. ITL p99 {} -> {} ms: {}.",
            sel_name(sel),
            ms(always.ttft.p90),
            ms(sel.ttft.p90),
            ratio(always.ttft.p90, sel.ttft.p90),
            sel.remote,
            sel.remote + sel.local,
            format_bytes(sel.kv_bytes),
            format_bytes(always.kv_bytes),
            ms(always.itl.p99),
            ms(sel.itl.p99),
            if sel.itl.p99 > always.itl.p99 {
                "the price of prefilling short and cached prompts on the decode engines"
            } else {
                "no price paid for the local prefills"
            },
        ));
    }
    if let (Some(agg), Some(sel)) = (get(Mode::Aggregated), selective) {
        out.push(format!(
            "{} vs aggregated: TTFT p90 {} -> {} ms ({}), prompt tokens computed {} \
             -> {}: cache-aware routing sends each turn where its history is cached.",
            sel_name(sel),
            ms(agg.ttft.p90),
            ms(sel.ttft.p90),
            ratio(agg.ttft.p90, sel.ttft.p90),
            agg.prompt_tokens_computed,
            sel.prompt_tokens_computed,
        ));
    }
    if let (Some(approx), Some(precise)) = (get(Mode::PdSelective), get(Mode::PdSelectivePrecise)) {
        out.push(precise_vs_approximate(approx, precise));
    }
    let pulls: u64 = results.iter().map(|r| r.kv_pulls).sum();
    let released: u64 = results.iter().map(|r| r.released_blocks).sum();
    let bad: u64 = results.iter().map(|r| r.integrity_failures).sum();
    out.push(format!(
        "KV integrity: {pulls} pulls checked byte for byte, {bad} mismatches; {released} blocks \
         freed on the decode engines' notifications."
    ));
    out
}

/// Precise vs approximate pd-selective, either way round: what each index knows differs, and
/// which one wins depends on the workload.
fn precise_vs_approximate(approx: &ModeResult, precise: &ModeResult) -> String {
    let cached = match precise.cache_hit_tokens.cmp(&approx.cache_hit_tokens) {
        std::cmp::Ordering::Greater => "more found",
        std::cmp::Ordering::Less => "fewer found",
        std::cmp::Ordering::Equal => "as many found",
    };
    let events = precise.kv_feed.map_or(0, |f| f.events);
    format!(
        "Precise vs approximate pd-selective: prompt tokens found in a prefix cache {} -> {} \
         ({cached}), computed {} -> {}; TTFT p50 {} -> {} ms ({}), p90 {} -> {} ms ({}); {} -> {} \
         requests prefilled remotely. The precise index knows what the engines hold ({events} KV \
         events: blocks stored after a prefill or a pull, evictions); the approximate one what \
         pd-router sent where, requests still in flight included.",
        approx.cache_hit_tokens,
        precise.cache_hit_tokens,
        approx.prompt_tokens_computed,
        precise.prompt_tokens_computed,
        ms(approx.ttft.p50),
        ms(precise.ttft.p50),
        ratio(approx.ttft.p50, precise.ttft.p50),
        ms(approx.ttft.p90),
        ms(precise.ttft.p90),
        ratio(approx.ttft.p90, precise.ttft.p90),
        approx.remote,
        precise.remote,
    )
}

/// The latency chart: TTFT p50/p90/p99 and ITL p99 per mode.
pub fn write_chart(results: &[ModeResult], path: &Path) -> Result<(), String> {
    let series = |name: &str, f: &dyn Fn(&ModeResult) -> f64| Series {
        name: name.to_string(),
        values: results.iter().map(f).collect(),
    };
    let chart = BarChart {
        title: "pd-demo: latency by mode (lower is better)".into(),
        y_label: "ms".into(),
        groups: results.iter().map(|r| r.mode.name().to_string()).collect(),
        series: vec![
            series("TTFT p50", &|r| r.ttft.p50),
            series("TTFT p90", &|r| r.ttft.p90),
            series("TTFT p99", &|r| r.ttft.p99),
            series("ITL p99", &|r| r.itl.p99),
        ],
        reference: None,
    };
    let moved = BarChart {
        title: "KV moved between engines, and prompt tokens computed".into(),
        y_label: "MiB / thousand tokens".into(),
        groups: results.iter().map(|r| r.mode.name().to_string()).collect(),
        series: vec![
            series("KV moved (MiB)", &|r| {
                r.kv_bytes as f64 / (1u64 << 20) as f64
            }),
            series("prompt tokens computed (thousands)", &|r| {
                r.prompt_tokens_computed as f64 / 1000.0
            }),
        ],
        reference: None,
    };
    match transfer::chart::write_png_row(&[&chart, &moved], path, 1500, 500) {
        // The chart is the one optional output: say why it is missing and go on.
        Err(transfer::chart::ChartError::NoFont(why)) => {
            eprintln!("pd-demo: no chart ({why})");
            Ok(())
        }
        other => other.map_err(|e| format!("writing {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let s = Stats::of((1..=100).map(Duration::from_millis));
        assert_eq!((s.p50, s.p90, s.p99, s.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Stats::of([]).p99, 0.0);
    }

    fn result(mode: Mode, cache_hit_tokens: u64, ttft_p90: f64) -> ModeResult {
        ModeResult {
            mode,
            requests: 10,
            ok: 10,
            errors: vec![],
            ttft: Stats {
                n: 10,
                p50: ttft_p90 / 2.0,
                p90: ttft_p90,
                p99: ttft_p90,
                max: ttft_p90,
            },
            itl: Stats::default(),
            output_tokens: 100,
            tokens_per_s: 10.0,
            wall: Duration::from_secs(1),
            remote: 3,
            local: 7,
            kv_bytes: 1 << 20,
            kv_pulls: 3,
            kv_gbps: 1.0,
            prompt_tokens: 5000,
            prompt_tokens_computed: 5000 - cache_hit_tokens,
            cache_hit_tokens,
            kv_feed: (mode == Mode::PdSelectivePrecise).then_some(KvFeed {
                events: 42,
                block_stored: 40,
                block_removed: 0,
                index_blocks: 300,
            }),
            integrity_failures: 0,
            pulls_failed: 0,
            released_blocks: 0,
            held_left: 0,
            checks: vec![],
        }
    }

    #[test]
    fn precise_vs_approximate_reads_either_way() {
        let approx = result(Mode::PdSelective, 2000, 200.0);
        let line = |precise: &ModeResult| {
            narrative(&[approx.clone(), precise.clone()])
                .into_iter()
                .find(|l| l.starts_with("Precise vs approximate"))
                .unwrap()
        };
        let better = line(&result(Mode::PdSelectivePrecise, 3000, 100.0));
        assert!(better.contains("2000 -> 3000 (more found)"), "{better}");
        assert!(
            better.contains("p90 200 -> 100 ms (2.0x lower)"),
            "{better}"
        );
        assert!(better.contains("42 KV events"), "{better}");
        let worse = line(&result(Mode::PdSelectivePrecise, 1000, 400.0));
        assert!(worse.contains("2000 -> 1000 (fewer found)"), "{worse}");
        assert!(worse.contains("p90 200 -> 400 ms (2.0x higher)"), "{worse}");
        // Without the approximate run the selective lines speak of the precise one.
        let only = narrative(&[
            result(Mode::PdAlways, 0, 300.0),
            result(Mode::PdSelectivePrecise, 1000, 400.0),
        ]);
        assert!(
            only.iter()
                .any(|l| l.starts_with("P/D selective (precise) vs P/D always")),
            "{only:?}"
        );
        assert!(
            !only.iter().any(|l| l.starts_with("Precise vs")),
            "{only:?}"
        );
    }

    #[test]
    fn the_precise_mode_checks_that_its_index_was_fed() {
        let feed = |kv_feed: Option<KvFeed>| {
            let run = ModeRun {
                mode: Mode::PdSelectivePrecise,
                outcomes: vec![],
                engines: super::super::cluster::EngineTotals::default(),
                decisions: super::super::cluster::Decisions::default(),
                kv_feed,
                held_left: 0,
                wall: Duration::from_secs(1),
                cluster_started_in: Duration::ZERO,
                topology: Value::Null,
            };
            analyze(&run)
                .checks
                .into_iter()
                .find(|c| c.what.contains("precise index"))
                .unwrap()
                .ok
        };
        assert!(!feed(None));
        assert!(!feed(Some(KvFeed::default())));
        assert!(feed(Some(KvFeed {
            events: 3,
            block_stored: 2,
            block_removed: 0,
            index_blocks: 8,
        })));
    }

    #[test]
    fn ratios_read_the_right_way() {
        assert_eq!(ratio(200.0, 100.0), "2.0x lower");
        assert_eq!(ratio(100.0, 200.0), "2.0x higher");
        assert_eq!(ratio(1.0, 0.0), "-");
    }
}
