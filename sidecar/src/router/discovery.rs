//! Endpoints that come and go. `--decode-dns` and `--prefill-dns` names (the
//! headless Services of the decode and prefill pods) are resolved every
//! `--dns-refresh-interval`; each address is one endpoint, next to the static
//! ones. A change builds a new [`View`]: an endpoint that stays keeps its
//! [`Endpoint`] (in-flight count, circuit) and its prefix index, a new one gets
//! probes, and the probes and gauges of one that left stop. A failed lookup
//! keeps the name's last addresses: the circuit breakers, not DNS, take a dead
//! pod out.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::{DecodeTarget, DnsName, PrefillTarget, RouterConfig};
use super::endpoint::{Endpoint, Role};
use super::metrics::RouterMetrics;
use super::pick::Scheduler;
use super::probe;
use super::proxy::{RouterState, View};

/// The endpoints of both roles, in the scheduler's order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members {
    pub decode: Vec<DecodeTarget>,
    pub prefill: Vec<PrefillTarget>,
}

/// The last addresses each name resolved to (None: never resolved).
pub struct Resolved {
    decode: Vec<Option<Vec<IpAddr>>>,
    prefill: Vec<Option<Vec<IpAddr>>>,
}

impl Resolved {
    pub fn new(cfg: &RouterConfig) -> Resolved {
        Resolved {
            decode: vec![None; cfg.decode_dns.len()],
            prefill: vec![None; cfg.prefill_dns.len()],
        }
    }
}

/// The static endpoints (in configuration order), then each name's addresses
/// (sorted), each endpoint once.
pub fn members(cfg: &RouterConfig, resolved: &Resolved) -> Members {
    let mut out = Members {
        decode: cfg.decode.clone(),
        prefill: cfg.prefill.clone(),
    };
    for (name, ips) in cfg.decode_dns.iter().zip(&resolved.decode) {
        for &ip in ips.iter().flatten() {
            let d = name.decode_at(ip);
            if !out.decode.iter().any(|e| e.authority == d.authority) {
                out.decode.push(d);
            }
        }
    }
    for (name, ips) in cfg.prefill_dns.iter().zip(&resolved.prefill) {
        for &ip in ips.iter().flatten() {
            let p = name.prefill_at(ip);
            if !out.prefill.iter().any(|e| e.host_port == p.host_port) {
                out.prefill.push(p);
            }
        }
    }
    out
}

/// The view over `members`: endpoints already in `current` (same label) are
/// kept, with their prefix indexes; the others are new.
pub fn view_of(
    cfg: &RouterConfig,
    metrics: &RouterMetrics,
    current: Option<&View>,
    members: Members,
) -> View {
    let reuse = |label: String, role: Role, old: Option<&[Arc<Endpoint>]>| {
        old.and_then(|old| old.iter().find(|e| e.label == label).cloned())
            .unwrap_or_else(|| {
                let obs = metrics.endpoint_obs(&label, role);
                Arc::new(Endpoint::new(label, role, cfg.breaker, obs))
            })
    };
    let decode: Vec<_> = members
        .decode
        .iter()
        .map(|d| {
            reuse(
                d.label(),
                Role::Decode,
                current.map(|v| &v.scheduler.decode[..]),
            )
        })
        .collect();
    let prefill: Vec<_> = members
        .prefill
        .iter()
        .map(|p| {
            reuse(
                p.label(),
                Role::Prefill,
                current.map(|v| &v.scheduler.prefill[..]),
            )
        })
        .collect();
    metrics.set_endpoints(Role::Decode, decode.len());
    metrics.set_endpoints(Role::Prefill, prefill.len());
    let scheduler = match current {
        Some(v) => v.scheduler.with_endpoints(decode, prefill),
        None => Scheduler::new(
            &cfg.scheduling,
            decode,
            prefill,
            cfg.probes.metrics_staleness,
        ),
    };
    View { scheduler, members }
}

/// The metrics scrapes and health checks of each endpoint of the view, keyed
/// by role and label.
#[derive(Default)]
pub struct Probes {
    running: HashMap<(Role, String), Vec<JoinHandle<()>>>,
}

impl Probes {
    /// Starts the probes of endpoints new in `view` and stops those of
    /// endpoints no longer in it (whose gauges are dropped too).
    pub fn sync(&mut self, state: &RouterState, view: &View) {
        let cfg = &state.cfg;
        let expected_block_size = cfg
            .uses_prefix_scorer()
            .then_some(cfg.scheduling.prefix.block_size as u64);
        let s = &view.scheduler;
        let decode = view.members.decode.iter().zip(&s.decode).map(|(t, e)| {
            (
                Role::Decode,
                e,
                t.metrics_uri(),
                t.uri(&cfg.decode_health_path),
            )
        });
        let prefill = view
            .members
            .prefill
            .iter()
            .zip(&s.prefill)
            .map(|(t, e)| (Role::Prefill, e, t.metrics_uri(), t.uri("/health")));
        let mut wanted = HashMap::new();
        let mut new_targets = Vec::new();
        for (role, endpoint, metrics_url, health_url) in decode.chain(prefill) {
            let key = (role, endpoint.label.clone());
            if let Some(tasks) = self.running.remove(&key) {
                wanted.insert(key, tasks);
                continue;
            }
            new_targets.push((
                key,
                probe::Target {
                    endpoint: endpoint.clone(),
                    metrics_url,
                    health_url,
                    obs: state.metrics.probe_obs(&endpoint.label),
                    expected_block_size,
                },
            ));
        }
        for ((role, label), tasks) in self.running.drain() {
            for t in tasks {
                t.abort();
            }
            state.metrics.forget(&label, role);
        }
        for (key, target) in new_targets {
            let tasks = probe::spawn(&state.probe_client, &cfg.probes, vec![target]);
            wanted.insert(key, tasks);
        }
        self.running = wanted;
    }

    /// Stops every probe.
    pub fn stop(&mut self) {
        for (_, tasks) in self.running.drain() {
            for t in tasks {
                t.abort();
            }
        }
    }
}

/// A lookup that takes longer than this fails (the system resolver can hang).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Every address `name` resolves to (the system resolver: /etc/hosts, then DNS).
pub async fn lookup(name: DnsName) -> Result<Vec<IpAddr>, String> {
    let addrs = tokio::time::timeout(
        LOOKUP_TIMEOUT,
        tokio::net::lookup_host((name.host.as_str(), name.port)),
    )
    .await
    .map_err(|_| format!("no answer within {LOOKUP_TIMEOUT:?}"))?
    .map_err(|e| e.to_string())?;
    Ok(addrs.map(|a| a.ip()).collect())
}

/// Resolves every name once (with `resolve`) and, when the endpoints changed,
/// installs the new view and syncs the probes. Returns whether they changed.
pub async fn refresh<F, Fut>(
    state: &RouterState,
    probes: &mut Probes,
    resolved: &mut Resolved,
    resolve: &F,
) -> bool
where
    F: Fn(DnsName) -> Fut,
    Fut: Future<Output = Result<Vec<IpAddr>, String>>,
{
    let cfg = &state.cfg;
    for (names, last) in [
        (&cfg.decode_dns, &mut resolved.decode),
        (&cfg.prefill_dns, &mut resolved.prefill),
    ] {
        for (name, last) in names.iter().zip(last.iter_mut()) {
            match resolve(name.clone()).await {
                Ok(mut ips) => {
                    // Sorted, so a resolver's rotating answer order is no change.
                    ips.sort_unstable();
                    ips.dedup();
                    *last = Some(ips);
                }
                Err(e) => {
                    state.metrics.dns_lookup_failed(&name.host);
                    tracing::warn!(name = %name.host, error = %e, kept = last.as_ref().map_or(0, Vec::len),
                        "DNS lookup failed; keeping the last addresses");
                }
            }
        }
    }
    let current = state.view();
    let next = members(cfg, resolved);
    if next == current.members {
        return false;
    }
    let labels = |m: &Members| -> (Vec<String>, Vec<String>) {
        (
            m.decode.iter().map(DecodeTarget::label).collect(),
            m.prefill.iter().map(PrefillTarget::label).collect(),
        )
    };
    let (decode, prefill) = labels(&next);
    tracing::info!(?decode, ?prefill, "endpoints changed");
    let view = view_of(cfg, &state.metrics, Some(&current), next);
    probes.sync(state, &view);
    state.set_view(view);
    true
}

/// Refreshes every `interval` until `stop` flips.
pub async fn run(
    state: Arc<RouterState>,
    mut probes: Probes,
    mut resolved: Resolved,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => break,
        }
        refresh(&state, &mut probes, &mut resolved, &lookup).await;
    }
    probes.stop();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::ApiKind;
    use crate::router::prefix::prompt_of;
    use std::sync::Mutex;
    use std::time::Instant;

    fn cfg(extra: &[&str]) -> RouterConfig {
        let mut argv = vec![
            "pd-router",
            "--decode-dns",
            "http://pods:8000",
            "--prefill-dns",
            "prefill:9000",
            "--health-check-interval",
            "0",
            "--refresh-metrics-interval",
            "0",
        ];
        argv.extend_from_slice(extra);
        RouterConfig::parse_from(argv).expect("config")
    }

    /// A resolver answering from a table the test changes; a missing name fails.
    struct FakeDns(Mutex<HashMap<String, Vec<IpAddr>>>);

    impl FakeDns {
        fn new() -> Arc<FakeDns> {
            Arc::new(FakeDns(Mutex::new(HashMap::new())))
        }
        fn set(&self, host: &str, ips: &[&str]) {
            let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
            self.0.lock().unwrap().insert(host.to_string(), ips);
        }
        fn fail(&self, host: &str) {
            self.0.lock().unwrap().remove(host);
        }
        fn resolver(
            self: &Arc<Self>,
        ) -> impl Fn(DnsName) -> std::future::Ready<Result<Vec<IpAddr>, String>> {
            let dns = self.clone();
            move |name: DnsName| {
                std::future::ready(
                    dns.0
                        .lock()
                        .unwrap()
                        .get(&name.host)
                        .cloned()
                        .ok_or_else(|| format!("{}: no such name", name.host)),
                )
            }
        }
    }

    fn decode_labels(view: &View) -> Vec<String> {
        view.members
            .decode
            .iter()
            .map(DecodeTarget::label)
            .collect()
    }

    #[test]
    fn static_endpoints_come_first_then_each_address_once() {
        let cfg = cfg(&["--decode", "http://10.0.0.2:8000", "--prefill", "p:1"]);
        let mut resolved = Resolved::new(&cfg);
        assert_eq!(
            members(&cfg, &resolved).decode,
            cfg.decode,
            "nothing resolved yet"
        );
        resolved.decode[0] = Some(vec![
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
        ]);
        resolved.prefill[0] = Some(vec!["fd00::7".parse().unwrap()]);
        let m = members(&cfg, &resolved);
        let decode: Vec<_> = m.decode.iter().map(DecodeTarget::label).collect();
        assert_eq!(decode, ["http://10.0.0.2:8000", "http://10.0.0.1:8000"]);
        let prefill: Vec<_> = m.prefill.iter().map(PrefillTarget::label).collect();
        assert_eq!(prefill, ["p:1", "[fd00::7]:9000"]);
    }

    #[tokio::test]
    async fn pods_come_and_go_and_the_ones_that_stay_keep_their_state() {
        let state = crate::router::state(cfg(&[]));
        let dns = FakeDns::new();
        let resolve = dns.resolver();
        let (mut probes, mut resolved) = (Probes::default(), Resolved::new(&state.cfg));
        assert!(
            state.view().members.decode.is_empty(),
            "no endpoints before the first lookup"
        );

        dns.set("pods", &["10.0.0.2", "10.0.0.1"]);
        dns.set("prefill", &["10.1.0.1"]);
        assert!(refresh(&state, &mut probes, &mut resolved, &resolve).await);
        let first = state.view();
        assert_eq!(
            decode_labels(&first),
            ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
        );
        assert_eq!(first.members.prefill[0].label(), "10.1.0.1:9000");
        let text = state.metrics.render();
        assert!(
            text.contains(r#"pd_router_endpoints{role="decode"} 2"#),
            "{text}"
        );

        // A long prompt lands on one pod, which learns its prefix.
        let body = serde_json::json!({"prompt": "a shared system prompt ".repeat(200)});
        let prompt = prompt_of(ApiKind::Completions, body.as_object().unwrap());
        let routed = first
            .scheduler
            .schedule("m", &prompt, None, Instant::now(), &mut rand::rng())
            .expect("a decode endpoint");
        first.scheduler.record(&routed);
        let kept = routed.decode.clone();
        drop(routed);

        // The other pod goes away and a new one comes.
        let kept_ip = kept
            .label
            .trim_start_matches("http://")
            .trim_end_matches(":8000")
            .to_string();
        dns.set("pods", &[&kept_ip, "10.0.0.3"]);
        assert!(refresh(&state, &mut probes, &mut resolved, &resolve).await);
        let second = state.view();
        let mut want = vec![kept.label.clone(), "http://10.0.0.3:8000".to_string()];
        want.sort();
        assert_eq!(decode_labels(&second), want);
        let same = second
            .scheduler
            .decode
            .iter()
            .find(|e| e.label == kept.label)
            .unwrap();
        assert!(
            Arc::ptr_eq(same, &kept),
            "the pod that stayed keeps its endpoint"
        );
        let again = second
            .scheduler
            .schedule("m", &prompt, None, Instant::now(), &mut rand::rng())
            .unwrap();
        assert_eq!(
            again.decode.label, kept.label,
            "its prefix index came along"
        );
        assert!(
            again.uncached_tokens < prompt.tokens,
            "matched part of the prompt"
        );
        let gone = if kept_ip == "10.0.0.1" {
            "10.0.0.2"
        } else {
            "10.0.0.1"
        };
        let text = state.metrics.render();
        assert!(
            !text.contains(&format!(
                r#"pd_router_endpoint_healthy{{endpoint="http://{gone}:8000""#
            )),
            "the gone pod's gauges are dropped:\n{text}"
        );

        // A failed lookup changes nothing; an unchanged answer is no change.
        dns.fail("pods");
        assert!(!refresh(&state, &mut probes, &mut resolved, &resolve).await);
        assert_eq!(decode_labels(&state.view()), want);
        assert!(state
            .metrics
            .render()
            .contains(r#"pd_router_dns_lookup_failures_total{name="pods"} 1"#));
        dns.set("pods", &[&kept_ip, "10.0.0.3"]);
        assert!(!refresh(&state, &mut probes, &mut resolved, &resolve).await);
        probes.stop();
    }
}
