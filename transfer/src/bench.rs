//! `kvbench` building blocks: block placements (how an engine's allocator
//! scatters a request's blocks), the byte pattern a pool is filled with so the
//! receiver can check every byte, latency statistics, the host memcpy
//! ceiling, and the report (table, JSON, chart). The binary wires them to
//! agents.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;

use crate::chart::{BarChart, Series};
use crate::layout::{format_bytes, MemKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// One run of consecutive blocks on both sides (a fresh engine).
    Contiguous,
    /// Every block anywhere (a long-running engine with a churned free list).
    Random,
    /// Runs of consecutive blocks with random lengths, scattered.
    Fragmented,
}

impl std::str::FromStr for Placement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "contiguous" => Ok(Placement::Contiguous),
            "random" => Ok(Placement::Random),
            "fragmented" => Ok(Placement::Fragmented),
            other => Err(format!(
                "unknown placement {other:?} (contiguous|random|fragmented)"
            )),
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Placement::Contiguous => "contiguous",
            Placement::Random => "random",
            Placement::Fragmented => "fragmented",
        })
    }
}

/// Distribution of run lengths for [`Placement::Fragmented`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase", tag = "dist")]
pub enum RunLengths {
    /// Geometric with this mean (at least 1): many short runs, a few long.
    Geometric {
        mean: f64,
    },
    /// Uniform in [min, max].
    Uniform {
        min: u32,
        max: u32,
    },
    Fixed {
        len: u32,
    },
}

impl std::str::FromStr for RunLengths {
    type Err = String;
    /// `geometric:8`, `uniform:4-16`, `fixed:8`, or a bare number (geometric mean).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("bad run lengths {s:?} (geometric:MEAN, uniform:MIN-MAX, fixed:N)");
        let (kind, arg) = s.split_once(':').unwrap_or(("geometric", s));
        match kind {
            "geometric" => {
                let mean: f64 = arg.parse().map_err(|_| bad())?;
                if !(mean >= 1.0 && mean.is_finite()) {
                    return Err(bad());
                }
                Ok(RunLengths::Geometric { mean })
            }
            "uniform" => {
                let (a, b) = arg.split_once('-').ok_or_else(bad)?;
                let (min, max): (u32, u32) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if min == 0 || max < min {
                    return Err(bad());
                }
                Ok(RunLengths::Uniform { min, max })
            }
            "fixed" => {
                let len: u32 = arg.parse().map_err(|_| bad())?;
                if len == 0 {
                    return Err(bad());
                }
                Ok(RunLengths::Fixed { len })
            }
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for RunLengths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunLengths::Geometric { mean } => write!(f, "geometric:{mean}"),
            RunLengths::Uniform { min, max } => write!(f, "uniform:{min}-{max}"),
            RunLengths::Fixed { len } => write!(f, "fixed:{len}"),
        }
    }
}

impl RunLengths {
    fn sample(&self, rng: &mut StdRng) -> u32 {
        match *self {
            RunLengths::Geometric { mean } => {
                // P(len = k) = p (1-p)^(k-1), mean 1/p.
                let p = 1.0 / mean;
                let mut k = 1u32;
                while k < 1 << 16 && rng.random::<f64>() >= p {
                    k += 1;
                }
                k
            }
            RunLengths::Uniform { min, max } => rng.random_range(min..=max),
            RunLengths::Fixed { len } => len,
        }
    }
}

/// `count` distinct block ids out of a pool of `num_blocks`, placed as
/// `placement` says. Each side of a transfer draws its own placement, as two
/// engines' allocators do.
pub fn place_blocks(
    placement: Placement,
    count: u32,
    num_blocks: u32,
    runs: RunLengths,
    rng: &mut StdRng,
) -> Vec<u32> {
    assert!(
        count <= num_blocks,
        "{count} blocks do not fit a pool of {num_blocks}"
    );
    match placement {
        Placement::Contiguous => {
            let start = rng.random_range(0..=num_blocks - count);
            (start..start + count).collect()
        }
        Placement::Random => {
            let mut all: Vec<u32> = (0..num_blocks).collect();
            all.shuffle(rng);
            all.truncate(count as usize);
            all
        }
        Placement::Fragmented => {
            // Cut the pool into runs, shuffle the runs, take blocks in that
            // order: consecutive within a run, scattered between runs.
            let mut runs_list = Vec::new();
            let mut at = 0;
            while at < num_blocks {
                let len = runs.sample(rng).min(num_blocks - at);
                runs_list.push(at..at + len);
                at += len;
            }
            runs_list.shuffle(rng);
            runs_list
                .into_iter()
                .flatten()
                .take(count as usize)
                .collect()
        }
    }
}

/// The byte at pool `offset` of a pool filled with `seed`: cheap, and
/// different for every 8-byte word, so a misplaced block cannot pass.
#[inline]
pub fn pattern_word(seed: u64, offset: u64) -> u64 {
    let mut x = (offset >> 3) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x
}

/// Fills `buf` (which starts at pool offset `base`, 8-byte aligned) with the pattern.
pub fn fill_pattern(buf: &mut [u8], base: u64, seed: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let w = pattern_word(seed, base + (i as u64) * 8).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// First offset in `buf` (at pool offset `buf_base`) that does not hold the
/// pattern of a pool filled with `seed` at `src_base`.
pub fn check_pattern(buf: &[u8], src_base: u64, seed: u64) -> Option<usize> {
    for (i, chunk) in buf.chunks(8).enumerate() {
        let w = pattern_word(seed, src_base + (i as u64) * 8).to_le_bytes();
        if chunk != &w[..chunk.len()] {
            return Some(i * 8);
        }
    }
    None
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyStats {
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub min_us: f64,
    pub max_us: f64,
}

impl LatencyStats {
    pub fn of(samples: &[Duration]) -> LatencyStats {
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(|a, b| a.total_cmp(b));
        let pick = |q: f64| -> f64 {
            if us.is_empty() {
                return 0.0;
            }
            let i = ((us.len() as f64 - 1.0) * q).round() as usize;
            us[i.min(us.len() - 1)]
        };
        LatencyStats {
            p50_us: pick(0.5),
            p99_us: pick(0.99),
            mean_us: if us.is_empty() {
                0.0
            } else {
                us.iter().sum::<f64>() / us.len() as f64
            },
            min_us: us.first().copied().unwrap_or(0.0),
            max_us: us.last().copied().unwrap_or(0.0),
        }
    }
}

/// Single-threaded memcpy of `bytes` between two pre-faulted buffers: the
/// host memory ceiling a transfer on this machine can approach. Median GB/s
/// over `reps`.
pub fn memcpy_ceiling(bytes: usize, reps: usize) -> f64 {
    let src = vec![0x5Au8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src); // fault the pages in
    let mut samples = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        samples.push(t.elapsed());
    }
    let s = LatencyStats::of(&samples);
    bytes as f64 / (s.p50_us / 1e6) / 1e9
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub backend: String,
    pub op: String,
    pub placement: Placement,
    pub plan: String,
    pub bytes: u64,
    pub descriptors: u32,
    pub reps: usize,
    pub latency: LatencyStats,
    /// bytes / p50 latency.
    pub gbps_p50: f64,
    pub verified: bool,
    /// Destination and source memory, "gpu:0 <- host".
    pub memory: String,
    /// The copy this row is held against ("d2d", "h2d", "memcpy") and its GB/s.
    pub ceiling: String,
    pub ceiling_gbps: f64,
    /// gbps_p50 / ceiling_gbps.
    pub of_ceiling: f64,
    /// bytes / p50 device time (GPU copies: what the GPU spent, without
    /// planning, submission and completion polling).
    pub device_gbps: Option<f64>,
    /// Median host time planning, and handing off and submitting (us).
    pub plan_us: f64,
    pub submit_us: f64,
}

impl CaseResult {
    /// Sets the ceiling columns.
    pub fn against(mut self, name: &str, gbps: f64) -> Self {
        self.ceiling = name.to_string();
        self.ceiling_gbps = gbps;
        self.of_ceiling = if gbps > 0.0 {
            self.gbps_p50 / gbps
        } else {
            0.0
        };
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub layout: String,
    /// How our pool (and an in-process peer's) is allocated: `one`, or
    /// `separate` (one allocation per region, lent as an engine's tensors).
    pub region_alloc: String,
    pub tokens: u64,
    pub blocks: u32,
    pub bytes_per_transfer: u64,
    pub pool_blocks: u32,
    pub peer: String,
    pub run_lengths: String,
    pub inflight: usize,
    pub max_desc_bytes: u64,
    /// The copy ceilings of this run (`memcpy_gbps`, `d2d_gbps`, ... in
    /// the JSON).
    #[serde(flatten)]
    pub ceilings: Ceilings,
    pub results: Vec<CaseResult>,
}

/// Copy rates of the same bytes measured in one run, for [`Ceilings::of`].
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Ceilings {
    /// One host thread's memcpy.
    #[serde(rename = "memcpy_gbps")]
    pub memcpy: f64,
    /// GPU runs: device-to-device and pinned host-to-device copies.
    #[serde(rename = "d2d_gbps")]
    pub d2d: Option<f64>,
    #[serde(rename = "h2d_gbps")]
    pub h2d: Option<f64>,
    /// The peer on another GPU: a peer copy into the local GPU from the
    /// peer's, and out of it (READ and WRITE).
    #[serde(rename = "peer_in_gbps")]
    pub peer_in: Option<f64>,
    #[serde(rename = "peer_out_gbps")]
    pub peer_out: Option<f64>,
}

impl Ceilings {
    /// The ceiling a transfer into `dst` memory from `src` memory is
    /// compared with: a peer copy between two GPUs (`local` is this side's
    /// memory: the direction is in or out of it), a device copy within one,
    /// the pinned host-device copy across the bus, a host memcpy between
    /// host pools. None when it was not measured.
    pub fn of(&self, dst: MemKind, src: MemKind, local: MemKind) -> Option<(&'static str, f64)> {
        match (dst, src) {
            (MemKind::Gpu(a), MemKind::Gpu(b)) if a != b => {
                if dst == local {
                    self.peer_in.map(|g| ("peer", g))
                } else {
                    self.peer_out.map(|g| ("peer", g))
                }
            }
            (MemKind::Gpu(_), MemKind::Gpu(_)) => self.d2d.map(|g| ("d2d", g)),
            (MemKind::Gpu(_), MemKind::Host) | (MemKind::Host, MemKind::Gpu(_)) => {
                self.h2d.map(|g| ("h2d", g))
            }
            (MemKind::Host, MemKind::Host) => Some(("memcpy", self.memcpy)),
        }
    }
}

impl Report {
    /// The table kvbench prints.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "kvbench: {}{}\n  {} tokens = {} blocks/region = {} per transfer; peer {}; fragmented runs {}; {} in flight, descriptors <= {}\n",
            self.layout,
            if self.region_alloc == "separate" {
                "; one allocation per region"
            } else {
                ""
            },
            self.tokens,
            self.blocks,
            format_bytes(self.bytes_per_transfer),
            self.peer,
            self.run_lengths,
            self.inflight,
            format_bytes(self.max_desc_bytes)
        ));
        out.push_str(&format!(
            "{:<15} {:<14} {:<6} {:<11} {:<10} {:>7} {:>9} {:>9} {:>9} {:>12} {:>9} {:>11} {:>9} {:>8}\n",
            "backend",
            "dst <- src",
            "op",
            "placement",
            "plan",
            "descs",
            "p50 ms",
            "p99 ms",
            "GB/s",
            "of ceiling",
            "dev GB/s",
            "plan+post",
            "vs naive",
            "verified"
        ));
        for r in &self.results {
            let naive = self.results.iter().find(|n| {
                n.plan == "naive"
                    && n.backend == r.backend
                    && n.op == r.op
                    && n.placement == r.placement
            });
            let speedup = match naive {
                Some(n) if r.plan != "naive" && n.gbps_p50 > 0.0 => {
                    format!("{:.1}x", r.gbps_p50 / n.gbps_p50)
                }
                _ => "-".to_string(),
            };
            let ceiling = if r.ceiling_gbps > 0.0 {
                format!("{:.0}% {}", r.of_ceiling * 100.0, r.ceiling)
            } else {
                "-".into()
            };
            let device = r
                .device_gbps
                .map(|g| format!("{g:.1}"))
                .unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "{:<15} {:<14} {:<6} {:<11} {:<10} {:>7} {:>9.3} {:>9.3} {:>9.2} {:>12} {:>9} {:>11} {:>9} {:>8}\n",
                r.backend,
                r.memory,
                r.op,
                r.placement.to_string(),
                r.plan,
                r.descriptors,
                r.latency.p50_us / 1e3,
                r.latency.p99_us / 1e3,
                r.gbps_p50,
                ceiling,
                device,
                format!("{:.0}+{:.0}us", r.plan_us, r.submit_us),
                speedup,
                if r.verified { "yes" } else { "no" }
            ));
        }
        out.push_str(&format!(
            "host memcpy ceiling (1 thread, {}): {:.2} GB/s\n",
            format_bytes(self.bytes_per_transfer),
            self.ceilings.memcpy
        ));
        if let (Some(d2d), Some(h2d)) = (self.ceilings.d2d, self.ceilings.h2d) {
            out.push_str(&format!(
                "GPU ceilings ({}): device-to-device {:.1} GB/s (d2d), pinned host-to-device {:.1} GB/s (h2d)\n",
                format_bytes(self.bytes_per_transfer),
                d2d,
                h2d
            ));
        }
        if let (Some(i), Some(o)) = (self.ceilings.peer_in, self.ceilings.peer_out) {
            out.push_str(&format!(
                "peer GPU ceilings ({}): peer copy into this GPU {:.1} GB/s, out of it {:.1} GB/s (peer)\n",
                format_bytes(self.bytes_per_transfer),
                i,
                o
            ));
        }
        out
    }

    /// Grouped bars: placements on the x axis, one bar per (backend, op, plan).
    pub fn chart(&self) -> BarChart {
        let mut groups: Vec<Placement> = Vec::new();
        for r in &self.results {
            if !groups.contains(&r.placement) {
                groups.push(r.placement);
            }
        }
        let multi_backend = self
            .results
            .iter()
            .any(|r| r.backend != self.results[0].backend);
        let mut series: Vec<Series> = Vec::new();
        for r in &self.results {
            let name = if multi_backend {
                format!("{} {} {}", r.backend, r.plan, r.op)
            } else {
                format!("{} {}", r.plan, r.op)
            };
            let idx = match series.iter().position(|s| s.name == name) {
                Some(i) => i,
                None => {
                    series.push(Series {
                        name,
                        values: vec![f64::NAN; groups.len()],
                    });
                    series.len() - 1
                }
            };
            let g = groups
                .iter()
                .position(|&p| p == r.placement)
                .expect("group present");
            series[idx].values[g] = r.gbps_p50;
        }
        BarChart {
            title: format!(
                "kvbench: {} tokens = {} per transfer (GB/s at p50)",
                self.tokens,
                format_bytes(self.bytes_per_transfer)
            ),
            y_label: "GB/s".into(),
            groups: groups.iter().map(|p| p.to_string()).collect(),
            series,
            reference: Some(match self.ceilings.d2d {
                Some(d2d) => ("device-to-device copy".into(), d2d),
                None => ("host memcpy".into(), self.ceilings.memcpy),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn each_pair_of_memories_is_measured_against_its_own_copy() {
        let c = Ceilings {
            memcpy: 10.0,
            d2d: Some(2000.0),
            h2d: Some(55.0),
            peer_in: Some(390.0),
            peer_out: Some(380.0),
        };
        let (g0, g1, host) = (MemKind::Gpu(0), MemKind::Gpu(1), MemKind::Host);
        // Local on gpu:1, peer on gpu:0: a READ lands here, a WRITE leaves.
        assert_eq!(c.of(g1, g0, g1), Some(("peer", 390.0)));
        assert_eq!(c.of(g0, g1, g1), Some(("peer", 380.0)));
        assert_eq!(c.of(g0, g0, g0), Some(("d2d", 2000.0)));
        assert_eq!(c.of(g0, host, g0), Some(("h2d", 55.0)));
        assert_eq!(c.of(host, g0, g0), Some(("h2d", 55.0)));
        assert_eq!(c.of(host, host, host), Some(("memcpy", 10.0)));
        // Not measured (no second GPU in this run): no ceiling, not a wrong one.
        let one_gpu = Ceilings {
            peer_in: None,
            peer_out: None,
            ..c
        };
        assert_eq!(one_gpu.of(g1, g0, g1), None);
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn runs_of(ids: &[u32]) -> usize {
        1 + ids.windows(2).filter(|w| w[1] != w[0] + 1).count()
    }

    #[test]
    fn placements_give_distinct_in_range_ids_with_the_expected_runs() {
        let mut r = rng();
        for placement in [
            Placement::Contiguous,
            Placement::Random,
            Placement::Fragmented,
        ] {
            let ids = place_blocks(
                placement,
                256,
                512,
                RunLengths::Geometric { mean: 8.0 },
                &mut r,
            );
            assert_eq!(ids.len(), 256);
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 256, "{placement}: duplicates");
            assert!(ids.iter().all(|&b| b < 512));
            let runs = runs_of(&ids);
            match placement {
                Placement::Contiguous => assert_eq!(runs, 1),
                Placement::Random => assert!(runs > 200, "random gave {runs} runs"),
                Placement::Fragmented => {
                    assert!((16..=80).contains(&runs), "fragmented gave {runs} runs")
                }
            }
        }
        let fixed = place_blocks(
            Placement::Fragmented,
            64,
            64,
            RunLengths::Fixed { len: 4 },
            &mut r,
        );
        assert!(runs_of(&fixed) <= 16, "runs of 4 over 64 blocks");
        assert_eq!(fixed.len(), 64);
    }

    #[test]
    fn run_length_specs_parse_and_reject_nonsense() {
        assert_eq!(
            "8".parse::<RunLengths>().unwrap(),
            RunLengths::Geometric { mean: 8.0 }
        );
        assert_eq!(
            "uniform:4-16".parse::<RunLengths>().unwrap(),
            RunLengths::Uniform { min: 4, max: 16 }
        );
        assert_eq!(
            "fixed:3".parse::<RunLengths>().unwrap(),
            RunLengths::Fixed { len: 3 }
        );
        for bad in [
            "geometric:0.5",
            "uniform:8-2",
            "fixed:0",
            "zipf:3",
            "uniform:x",
        ] {
            assert!(bad.parse::<RunLengths>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pattern_detects_a_misplaced_block() {
        let mut a = vec![0u8; 4096];
        fill_pattern(&mut a, 8192, 1);
        assert_eq!(check_pattern(&a, 8192, 1), None);
        assert_eq!(
            check_pattern(&a, 4096, 1),
            Some(0),
            "a block from elsewhere must not pass"
        );
        assert_eq!(
            check_pattern(&a, 8192, 2),
            Some(0),
            "another seed must not pass"
        );
        a[1000] ^= 1;
        assert_eq!(check_pattern(&a, 8192, 1), Some(1000 / 8 * 8));
    }

    #[test]
    fn latency_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let s = LatencyStats::of(&samples);
        assert_eq!(s.min_us, 1.0);
        assert_eq!(s.max_us, 100.0);
        assert!((s.p50_us - 50.0).abs() <= 1.0);
        assert!((s.p99_us - 99.0).abs() <= 1.0);
        assert!((s.mean_us - 50.5).abs() < 1e-9);
    }

    #[test]
    fn memcpy_ceiling_is_positive() {
        assert!(memcpy_ceiling(1 << 20, 3) > 0.0);
    }
}
