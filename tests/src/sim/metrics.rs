//! Counters behind `GET /metrics`, written by hand in Prometheus text format under vLLM's metric
//! names (labels `model_name`, `engine="0"`) plus the simulator's own `engine_sim:*` series.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::blocks::PoolStats;
use super::events::KvEventCounts;
use super::kv::KvStats;

/// vLLM's `time_to_first_token_seconds` buckets.
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's finish reasons, in exposition order.
pub const FINISH_REASONS: [&str; 3] = ["stop", "length", "abort"];

#[derive(Default)]
struct Histogram {
    counts: [u64; TTFT_BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct Metrics {
    running: AtomicI64,
    waiting: AtomicI64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    prefix_queries: AtomicU64,
    prefix_hits: AtomicU64,
    computed_tokens: AtomicU64,
    finished: [AtomicU64; FINISH_REASONS.len()],
    ttft: Mutex<Histogram>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    pub fn add_prompt(&self, prompt_tokens: u64, cached_tokens: u64) {
        self.prompt_tokens.fetch_add(prompt_tokens, Relaxed);
        self.prefix_queries.fetch_add(prompt_tokens, Relaxed);
        self.prefix_hits.fetch_add(cached_tokens, Relaxed);
    }

    /// Prompt tokens this engine computed (neither cached nor pulled from a prefill engine).
    pub fn add_computed(&self, tokens: u64) {
        self.computed_tokens.fetch_add(tokens, Relaxed);
    }

    pub fn computed_tokens(&self) -> u64 {
        self.computed_tokens.load(Relaxed)
    }

    /// Prefix-cache lookups and hits so far, in tokens (`vllm:prefix_cache_{queries,hits}_total`).
    pub fn prefix_cache(&self) -> (u64, u64) {
        (
            self.prefix_queries.load(Relaxed),
            self.prefix_hits.load(Relaxed),
        )
    }

    pub fn add_generated(&self, tokens: u64) {
        self.generation_tokens.fetch_add(tokens, Relaxed);
    }

    pub fn observe_ttft(&self, ttft: Duration) {
        let secs = ttft.as_secs_f64();
        let mut h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = TTFT_BUCKETS.iter().position(|b| secs <= *b) {
            h.counts[i] += 1;
        }
        h.sum += secs;
        h.count += 1;
    }

    /// Counts a request as waiting until the returned guard drops.
    pub fn waiting(self: &Arc<Self>) -> Gauge {
        self.waiting.fetch_add(1, Relaxed);
        Gauge {
            metrics: Arc::clone(self),
            running: false,
        }
    }

    /// Counts a request as running until the returned guard drops.
    pub fn running(self: &Arc<Self>) -> Gauge {
        self.running.fetch_add(1, Relaxed);
        Gauge {
            metrics: Arc::clone(self),
            running: true,
        }
    }

    pub fn finished(&self, reason: &str) {
        if let Some(i) = FINISH_REASONS.iter().position(|r| *r == reason) {
            self.finished[i].fetch_add(1, Relaxed);
        }
    }

    /// The exposition text.
    pub fn render(
        &self,
        model: &str,
        block_size: u64,
        pool: &PoolStats,
        kv: &KvStats,
        kv_events: KvEventCounts,
    ) -> String {
        let labels = format!("model_name=\"{}\",engine=\"0\"", escape(model));
        let mut out = String::with_capacity(4096);
        let mut series = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (suffix_labels, value) in samples {
                let _ = writeln!(out, "{name}{{{labels}{suffix_labels}}} {value}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        series(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            &one(self.running.load(Relaxed).to_string()),
        );
        series(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            &one(self.waiting.load(Relaxed).to_string()),
        );
        let used = pool.num_blocks - pool.free_blocks;
        let usage = if pool.num_blocks == 0 {
            0.0
        } else {
            used as f64 / pool.num_blocks as f64
        };
        series(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            &one(usage.to_string()),
        );
        for (name, help, v) in [
            (
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
                &self.prefix_queries,
            ),
            (
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
                &self.prefix_hits,
            ),
            (
                "vllm:prompt_tokens_total",
                "Number of prefill tokens processed.",
                &self.prompt_tokens,
            ),
            (
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
                &self.generation_tokens,
            ),
        ] {
            series(name, "counter", help, &one(v.load(Relaxed).to_string()));
        }
        let finished: Vec<_> = FINISH_REASONS
            .iter()
            .zip(&self.finished)
            .map(|(r, c)| {
                (
                    format!(",finished_reason=\"{r}\""),
                    c.load(Relaxed).to_string(),
                )
            })
            .collect();
        series(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            &finished,
        );
        {
            let h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
            let name = "vllm:time_to_first_token_seconds";
            let _ = writeln!(
                out,
                "# HELP {name} Histogram of time to first token in seconds."
            );
            let _ = writeln!(out, "# TYPE {name} histogram");
            let mut cumulative = 0;
            for (b, c) in TTFT_BUCKETS.iter().zip(h.counts) {
                cumulative += c;
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b:?}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
        }
        let _ = writeln!(
            out,
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig"
        );
        let _ = writeln!(out, "# TYPE vllm:cache_config_info gauge");
        let _ = writeln!(
            out,
            "vllm:cache_config_info{{{labels},block_size=\"{block_size}\",cache_dtype=\"auto\",enable_prefix_caching=\"False\",num_gpu_blocks=\"{}\",num_cpu_blocks=\"0\"}} 1",
            pool.num_blocks
        );
        let mut series = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        };
        series(
            "engine_sim:held_blocks",
            "gauge",
            "KV blocks held for remote decodes.",
            pool.held_blocks as u64,
        );
        series(
            "engine_sim:held_requests",
            "gauge",
            "Prefill requests holding blocks for a remote decode.",
            pool.held_requests as u64,
        );
        series(
            "engine_sim:released_blocks_total",
            "counter",
            "Held blocks freed by a release notification.",
            pool.released_blocks_total,
        );
        series(
            "engine_sim:expired_blocks_total",
            "counter",
            "Held blocks freed by the hold timeout.",
            pool.expired_blocks_total,
        );
        use std::sync::atomic::Ordering::Relaxed as R;
        for (name, help, v) in [
            (
                "engine_sim:kv_pulls_total",
                "KV pulls from prefill engines that completed.",
                &kv.pulls_ok,
            ),
            (
                "engine_sim:kv_pull_failures_total",
                "KV pulls that failed (the request was prefilled locally).",
                &kv.pulls_failed,
            ),
            (
                "engine_sim:kv_pulled_bytes_total",
                "KV bytes pulled from prefill engines.",
                &kv.bytes_pulled,
            ),
            (
                "engine_sim:kv_pull_microseconds_total",
                "Time spent in KV pulls, microseconds.",
                &kv.pull_micros,
            ),
            (
                "engine_sim:kv_integrity_failures_total",
                "Pulled KV blocks whose bytes were wrong.",
                &kv.integrity_failures,
            ),
            (
                "engine_sim:kv_blocks_written_total",
                "KV blocks computed by prefill.",
                &kv.blocks_written,
            ),
        ] {
            series(name, "counter", help, v.load(R));
        }
        for (name, help, v) in [
            (
                "engine_sim:kv_events_published_total",
                "KV-event batches queued for the ZMQ publisher (--kv-events-config).",
                kv_events.published,
            ),
            (
                "engine_sim:kv_events_dropped_total",
                "KV-event batches dropped because the publisher's queue was full or it had stopped.",
                kv_events.dropped,
            ),
            (
                "engine_sim:kv_events_lost_total",
                "KV-event batches kept for replay but not sent (the lose_kv_events fault).",
                kv_events.lost,
            ),
        ] {
            series(name, "counter", help, v);
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Decrements the waiting or running gauge when dropped.
pub struct Gauge {
    metrics: Arc<Metrics>,
    running: bool,
}

impl Drop for Gauge {
    fn drop(&mut self) {
        let g = if self.running {
            &self.metrics.running
        } else {
            &self.metrics.waiting
        };
        g.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_vllm_names_and_cumulative_buckets() {
        let m = Metrics::new();
        m.add_prompt(10, 0);
        m.observe_ttft(Duration::from_millis(30));
        m.finished("length");
        let running = m.running();
        let pool = PoolStats {
            num_blocks: 4,
            free_blocks: 3,
            held_requests: 1,
            held_blocks: 1,
            released_blocks_total: 0,
            expired_blocks_total: 0,
            cached_blocks: 0,
            evicted_blocks_total: 0,
        };
        let events = KvEventCounts {
            published: 3,
            dropped: 1,
            lost: 0,
        };
        let text = m.render("m", 16, &pool, &KvStats::default(), events);
        let l = "model_name=\"m\",engine=\"0\"";
        assert!(text.contains(&format!("vllm:num_requests_running{{{l}}} 1\n")));
        assert!(text.contains(&format!("vllm:prompt_tokens_total{{{l}}} 10\n")));
        assert!(text.contains(&format!("vllm:kv_cache_usage_perc{{{l}}} 0.25\n")));
        assert!(text.contains(&format!(
            "vllm:request_success_total{{{l},finished_reason=\"length\"}} 1\n"
        )));
        assert!(text.contains(&format!(
            "vllm:time_to_first_token_seconds_bucket{{{l},le=\"0.02\"}} 0\n"
        )));
        assert!(text.contains(&format!(
            "vllm:time_to_first_token_seconds_bucket{{{l},le=\"0.04\"}} 1\n"
        )));
        assert!(text.contains("block_size=\"16\""));
        assert!(text.contains("num_gpu_blocks=\"4\""));
        assert!(text.contains(&format!("engine_sim:held_blocks{{{l}}} 1\n")));
        assert!(text.contains(&format!("engine_sim:kv_events_published_total{{{l}}} 3\n")));
        assert!(text.contains(&format!("engine_sim:kv_events_dropped_total{{{l}}} 1\n")));
        drop(running);
        assert!(m
            .render("m", 16, &pool, &KvStats::default(), events)
            .contains(&format!("vllm:num_requests_running{{{l}}} 0\n")));
    }
}
