//! Background probes of every endpoint: engine metrics scraping and active
//! health checks, one task of each kind per endpoint.
//!
//! A scrape reads the engine's Prometheus text (`vllm:num_requests_waiting`,
//! `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
//! `vllm:cache_config_info`) and stores it in the endpoint with its time; the
//! pick path never waits on a probe, it reads whatever the last good scrape
//! left (stale values read as unknown, see `Endpoint::candidate`). Scrape
//! failures are counted and logged, never held against the endpoint's health:
//! only health checks and forwarded requests move the circuit breaker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::endpoint::Endpoint;
use super::promtext;
use crate::upstream::HttpClient;

/// The engine metrics the scorers use. A field is None when the scrape had no
/// usable sample of its family.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineMetrics {
    /// Requests queued, summed over the family's series (engines, DP ranks).
    pub waiting: Option<f64>,
    /// Requests running, summed likewise.
    pub running: Option<f64>,
    /// KV-cache usage in 0..1, the mean over the family's series.
    pub kv_usage: Option<f64>,
    /// From `vllm:cache_config_info`'s labels.
    pub block_size: Option<u64>,
    pub num_gpu_blocks: Option<u64>,
}

const WAITING: &str = "vllm:num_requests_waiting";
const RUNNING: &str = "vllm:num_requests_running";
const KV_USAGE: &str = "vllm:kv_cache_usage_perc";
/// The name before vLLM 0.10; read when the new one is absent.
const KV_USAGE_OLD: &str = "vllm:gpu_cache_usage_perc";
const CACHE_CONFIG: &str = "vllm:cache_config_info";
const WANTED: [&str; 5] = [WAITING, RUNNING, KV_USAGE, KV_USAGE_OLD, CACHE_CONFIG];

#[derive(Default)]
struct Sum {
    total: f64,
    n: u32,
}

impl Sum {
    fn add(&mut self, v: f64) {
        self.total += v;
        self.n += 1;
    }

    fn sum(&self) -> Option<f64> {
        (self.n > 0).then_some(self.total)
    }

    fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.total / self.n as f64)
    }
}

/// Reads the engine metrics out of a Prometheus text page; also returns how
/// many lines of the wanted families could not be parsed. Samples that are
/// NaN, infinite or negative are skipped.
pub fn engine_metrics(text: &str) -> (EngineMetrics, usize) {
    let (mut waiting, mut running, mut kv, mut kv_old) = (
        Sum::default(),
        Sum::default(),
        Sum::default(),
        Sum::default(),
    );
    let mut out = EngineMetrics::default();
    let mut bad = 0;
    for line in text.lines() {
        let l = line.trim_start();
        // Only the wanted families (or a quoted-name line) are worth parsing.
        if !(l.starts_with('{') || WANTED.iter().any(|w| l.starts_with(w))) {
            continue;
        }
        let sample = match promtext::parse_line(l) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(_) => {
                bad += 1;
                continue;
            }
        };
        let usable = sample.value.is_finite() && sample.value >= 0.0;
        match sample.name.as_ref() {
            WAITING if usable => waiting.add(sample.value),
            RUNNING if usable => running.add(sample.value),
            KV_USAGE if usable => kv.add(sample.value.min(1.0)),
            KV_USAGE_OLD if usable => kv_old.add(sample.value.min(1.0)),
            CACHE_CONFIG if out.block_size.is_none() => {
                let num = |key: &str| sample.label(key).and_then(|v| v.trim().parse::<u64>().ok());
                out.block_size = num("block_size").filter(|b| *b > 0);
                out.num_gpu_blocks = num("num_gpu_blocks");
            }
            _ => {}
        }
    }
    out.waiting = waiting.sum();
    out.running = running.sum();
    out.kv_usage = kv.mean().or_else(|| kv_old.mean());
    (out, bad)
}

/// How and how often to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    /// 0 = no scraping (metric scorers then see every endpoint as unknown).
    pub refresh_metrics_interval: Duration,
    /// Scrapes older than this are unknown; also the time limit of one scrape.
    pub metrics_staleness: Duration,
    /// 0 = no active health checks (forwarded requests still count).
    pub health_check_interval: Duration,
    pub health_check_timeout: Duration,
}

/// The metric handles of one endpoint's probes.
#[derive(Clone, Debug, Default)]
pub struct ProbeObs {
    pub scrape_errors: Counter,
    pub health_check_failures: Counter,
    pub waiting: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub running: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub kv_usage: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// What to probe for one endpoint.
pub struct Target {
    pub endpoint: Arc<Endpoint>,
    pub metrics_url: Uri,
    pub health_url: Uri,
    pub obs: ProbeObs,
    /// The prefix-cache-scorer's blockSize, when a profile uses that scorer:
    /// an engine reporting another block size gets one warning.
    pub expected_block_size: Option<u64>,
}

/// Largest metrics page read (vLLM's is tens of KiB).
const MAX_METRICS_BYTES: usize = 16 << 20;
const MAX_HEALTH_BYTES: usize = 64 << 10;

async fn get(client: &HttpClient, uri: &Uri, limit: usize) -> Result<(StatusCode, Bytes), String> {
    let mut req = Request::new(Body::empty());
    *req.uri_mut() = uri.clone();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    Ok((status, body))
}

fn ticker(every: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(every);
    // A slow probe delays the next one instead of firing a burst after it.
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

async fn scrape_loop(client: HttpClient, cfg: ProbeConfig, target: Arc<Target>) {
    let ep = &target.endpoint;
    let mut tick = ticker(cfg.refresh_metrics_interval);
    let mut failing = false;
    let mut warned_empty = false;
    let mut warned_block_size = false;
    loop {
        tick.tick().await;
        let result = tokio::time::timeout(
            cfg.metrics_staleness,
            get(&client, &target.metrics_url, MAX_METRICS_BYTES),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", cfg.metrics_staleness)))
        .and_then(|(status, body)| {
            if status == StatusCode::OK {
                Ok(body)
            } else {
                Err(format!("status {status}"))
            }
        });
        let body = match result {
            Ok(body) => body,
            Err(error) => {
                target.obs.scrape_errors.inc();
                if failing {
                    tracing::debug!(endpoint = %ep.label, url = %target.metrics_url, %error, "metrics scrape failed");
                } else {
                    failing = true;
                    tracing::warn!(endpoint = %ep.label, url = %target.metrics_url, %error,
                        "metrics scrape failed; its scores go neutral once the last scrape is stale");
                }
                continue;
            }
        };
        let (m, bad) = engine_metrics(&String::from_utf8_lossy(&body));
        ep.set_metrics(m, Instant::now());
        if failing {
            failing = false;
            tracing::info!(endpoint = %ep.label, "metrics scrape answering again");
        }
        let set = |g: &Gauge<f64, _>, v: Option<f64>| g.set(v.unwrap_or(f64::NAN));
        set(&target.obs.waiting, m.waiting);
        set(&target.obs.running, m.running);
        set(&target.obs.kv_usage, m.kv_usage);
        if bad > 0 {
            tracing::debug!(endpoint = %ep.label, lines = bad, "unparsable vllm:* lines in the metrics");
        }
        if !warned_empty && m.waiting.is_none() && m.running.is_none() && m.kv_usage.is_none() {
            warned_empty = true;
            tracing::warn!(endpoint = %ep.label, url = %target.metrics_url,
                "the metrics page has no vllm:num_requests_* or vllm:kv_cache_usage_perc samples; \
                 queue and KV-cache scores stay neutral for this endpoint");
        }
        if let (Some(expected), Some(got), false) =
            (target.expected_block_size, m.block_size, warned_block_size)
        {
            if expected != got {
                warned_block_size = true;
                tracing::warn!(endpoint = %ep.label, engine_block_size = got, scorer_block_size = expected,
                    "the engine's KV block size differs from prefix-cache-scorer's blockSize; \
                     prefix matches are counted in the scorer's blocks");
            }
        }
    }
}

async fn health_loop(client: HttpClient, cfg: ProbeConfig, target: Arc<Target>) {
    let ep = &target.endpoint;
    let mut tick = ticker(cfg.health_check_interval);
    loop {
        tick.tick().await;
        let result = tokio::time::timeout(
            cfg.health_check_timeout,
            get(&client, &target.health_url, MAX_HEALTH_BYTES),
        )
        .await;
        let ok = matches!(&result, Ok(Ok((status, _))) if status.is_success());
        if !ok {
            target.obs.health_check_failures.inc();
            let error = match result {
                Ok(Ok((status, _))) => format!("status {status}"),
                Ok(Err(e)) => e,
                Err(_) => format!("no answer within {:?}", cfg.health_check_timeout),
            };
            tracing::debug!(endpoint = %ep.label, url = %target.health_url, %error, "health check failed");
        }
        ep.report(ok, Instant::now());
    }
}

/// Starts the scrape and health-check tasks of every target.
pub fn spawn(client: &HttpClient, cfg: &ProbeConfig, targets: Vec<Target>) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for target in targets {
        let target = Arc::new(target);
        if !cfg.refresh_metrics_interval.is_zero() {
            tasks.push(tokio::spawn(scrape_loop(
                client.clone(),
                cfg.clone(),
                target.clone(),
            )));
        }
        if !cfg.health_check_interval.is_zero() {
            tasks.push(tokio::spawn(health_loop(
                client.clone(),
                cfg.clone(),
                target,
            )));
        }
    }
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What engine-sim (and vLLM) serve, trimmed.
    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m",engine="0"} 2
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m",engine="0"} 3
vllm:num_requests_waiting_by_reason{reason="x"} 100
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m",engine="0"} 0.25
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{model_name="m",engine="0",block_size="16",cache_dtype="auto",num_gpu_blocks="16384",num_cpu_blocks="0"} 1
vllm:time_to_first_token_seconds_bucket{le="+Inf"} 7
"#;

    #[test]
    fn reads_the_four_families() {
        let (m, bad) = engine_metrics(VLLM);
        assert_eq!(bad, 0);
        assert_eq!(
            m,
            EngineMetrics {
                waiting: Some(3.0),
                running: Some(2.0),
                kv_usage: Some(0.25),
                block_size: Some(16),
                num_gpu_blocks: Some(16384),
            }
        );
    }

    #[test]
    fn several_series_are_summed_and_usage_averaged() {
        let text = "vllm:num_requests_waiting{engine=\"0\"} 3\n\
                    vllm:num_requests_waiting{engine=\"1\"} 4\n\
                    vllm:num_requests_waiting{engine=\"2\"} NaN\n\
                    vllm:num_requests_running{engine=\"0\"} -1\n\
                    vllm:kv_cache_usage_perc{engine=\"0\"} 0.2\n\
                    vllm:kv_cache_usage_perc{engine=\"1\"} 0.6\n\
                    vllm:gpu_cache_usage_perc{engine=\"1\"} 0.9\n\
                    vllm:num_requests_waiting{engine=\"3\" 5\n";
        let (m, bad) = engine_metrics(text);
        assert_eq!(m.waiting, Some(7.0), "NaN skipped, the broken line skipped");
        assert_eq!(m.running, None, "a negative gauge is not usable");
        assert!((m.kv_usage.unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(bad, 1);
    }

    #[test]
    fn missing_families_are_unknown_and_old_names_are_read() {
        let (m, _) = engine_metrics("# nothing here\nother_metric 1\n");
        assert_eq!(m, EngineMetrics::default());
        let (m, _) = engine_metrics(
            "vllm:gpu_cache_usage_perc 1.5\nvllm:cache_config_info{block_size=\"None\"} 1\n",
        );
        assert_eq!(m.kv_usage, Some(1.0), "clamped to 1");
        assert_eq!((m.block_size, m.num_gpu_blocks), (None, None));
        let (m, _) = engine_metrics("vllm:num_requests_waiting +Inf\n");
        assert_eq!(m.waiting, None);
    }
}
