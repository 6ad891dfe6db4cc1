//! pd-router's view of its endpoints, end to end with real processes: engine
//! metrics scraped (through a pd-sidecar too) and scored, health checks and
//! the circuit breaker taking dead endpoints out and letting them back, the
//! endpoints file. Each test polls with a deadline; none sleeps to synchronise.

use std::path::PathBuf;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use tandem_tests::harness::{
    free_port, http_get, http_post_json, json, poll_until, EngineSim, Proc, Router, Sidecar,
};

const WAIT: Duration = Duration::from_secs(20);

/// Fast probes for tests: checks every 100 ms, 2 failures open a circuit for `open_for`.
/// A test that asserts what happens while a circuit is open uses a longer `open_for` than
/// its assertions can take on a loaded machine, so a half-open trial cannot slip in.
fn fast(open_for: &str) -> Vec<String> {
    vec![
        "--health-check-interval=100ms".into(),
        "--health-check-timeout=500ms".into(),
        "--unhealthy-threshold=2".into(),
        format!("--circuit-open-duration={open_for}"),
    ]
}

/// Exactly `tokens` tokens of ASCII text in engine-sim's estimate (4 bytes each), starting
/// with `salt`.
fn text(tokens: usize, salt: &str) -> String {
    let mut s = format!("[{salt}]");
    while s.len() < tokens * 4 {
        s.push_str(" the quick brown fox jumps over the lazy dog");
    }
    s.truncate(tokens * 4);
    s
}

fn write(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("router-health-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A decode profile of `scorers` (`(type, weight)`) and nothing else; never P/D.
fn decode_config(name: &str, scorers: &[(&str, u32)]) -> PathBuf {
    let mut yaml = String::from("plugins:\n");
    for (t, _) in scorers {
        yaml.push_str(&format!("- type: {t}\n"));
    }
    yaml.push_str("- type: max-score-picker\nschedulingProfiles:\n- name: decode\n  plugins:\n");
    for (t, w) in scorers {
        yaml.push_str(&format!("  - pluginRef: {t}\n    weight: {w}\n"));
    }
    yaml.push_str("  - pluginRef: max-score-picker\n");
    write(name, &yaml)
}

/// POSTs a short completion through the router with `x-request-id: id`; asserts 200.
async fn complete(router: &Router, id: &str) -> Value {
    let body = json!({"model": "sim-model", "prompt": text(20, id), "max_tokens": 2});
    let (status, _, resp) = http_post_json(
        &router.url("/v1/completions"),
        &body,
        &[("x-request-id", id)],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{id}: {}",
        String::from_utf8_lossy(&resp)
    );
    json(&resp)
}

/// The `x-request-id`s of the inference requests an engine received, starting with `prefix`.
async fn ids(sim: &EngineSim, prefix: &str) -> Vec<String> {
    sim.requests()
        .await
        .into_iter()
        .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/v1/")))
        .filter_map(|r| r["headers"]["x-request-id"].as_str().map(str::to_string))
        .filter(|id| id.starts_with(prefix))
        .collect()
}

fn series(name: &str, endpoint: &str) -> String {
    format!(r#"{name}{{endpoint="{endpoint}"}}"#)
}

fn healthy(endpoint: &str, role: &str) -> String {
    format!(r#"pd_router_endpoint_healthy{{endpoint="{endpoint}",role="{role}"}}"#)
}

/// Polls until the router's sample `series` satisfies `ok`; returns its value.
async fn until_metric(router: &Router, series: &str, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
    poll_until(WAIT, what, || async {
        router.metric(series).await.filter(|v| ok(*v))
    })
    .await
}

#[tokio::test]
async fn a_queued_engine_loses_traffic_until_its_queue_drains() {
    // Decode endpoints are pd-sidecars: the router scrapes each engine's metrics through
    // its sidecar's passthrough of GET /metrics.
    let engines = [EngineSim::start(&[]).await, EngineSim::start(&[]).await];
    let sidecars = [
        Sidecar::start(engines[0].port(), &[]).await,
        Sidecar::start(engines[1].port(), &[]).await,
    ];
    let (a, b) = (&engines[0], &engines[1]);
    let urls: Vec<String> = sidecars.iter().map(|s| s.url("")).collect();
    let config = decode_config(
        "queue.yaml",
        &[("queue-scorer", 10), ("load-aware-scorer", 1)],
    );
    let router = Router::start(&urls, &[], &["--config", config.to_str().unwrap()]).await;
    let waiting_a = series("pd_router_endpoint_requests_waiting", &urls[0]);
    for url in &urls {
        let s = series("pd_router_endpoint_requests_waiting", url);
        until_metric(&router, &s, "both queues scraped", |v| v == 0.0).await;
    }

    // Three requests sent straight to engine A sit in its queue for 5 s.
    a.set_faults(json!({"delay_ms": 5000, "scope": "all"}))
        .await;
    let direct: Vec<_> = (0..3)
        .map(|i| {
            let url = format!("{}/v1/completions", a.url());
            tokio::spawn(async move {
                let body = json!({"model": "sim-model", "prompt": "queued", "max_tokens": 1});
                let id = format!("direct-{i}");
                http_post_json(&url, &body, &[("x-request-id", &id)])
                    .await
                    .0
            })
        })
        .collect();
    let queued = until_metric(&router, &waiting_a, "A's queue scraped", |v| v >= 3.0).await;
    assert_eq!(queued, 3.0, "the router reads the engine's own gauge");

    const N: usize = 12;
    for i in 0..N {
        complete(&router, &format!("queued-{i}")).await;
    }
    assert_eq!(ids(b, "queued-").await.len(), N, "B took every request");
    assert!(
        ids(a, "queued-").await.is_empty(),
        "A got some despite its queue"
    );

    // A's faults cleared and its queue drained: it gets traffic again.
    a.set_faults(json!({})).await;
    for d in direct {
        assert_eq!(d.await.unwrap(), StatusCode::OK);
    }
    until_metric(&router, &waiting_a, "A's queue drained", |v| v == 0.0).await;
    let mut i = 0;
    poll_until(WAIT, "a request to reach A again", || {
        i += 1;
        let id = format!("drained-{i}");
        let router = &router;
        async move {
            complete(router, &id).await;
            (!ids(a, "drained-").await.is_empty()).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn a_dead_decode_endpoint_is_skipped_and_returns_after_recovery() {
    let mut a = EngineSim::start(&[]).await;
    let b = EngineSim::start(&[]).await;
    let (url_a, url_b) = (a.url(), b.url());
    // The probe settings through TANDEM_ROUTER_* environment variables.
    let env = [
        ("RUST_LOG", "debug"),
        ("TANDEM_ROUTER_HEALTH_CHECK_INTERVAL", "100ms"),
        ("TANDEM_ROUTER_UNHEALTHY_THRESHOLD", "2"),
        ("TANDEM_ROUTER_CIRCUIT_OPEN_DURATION", "300ms"),
    ];
    let router = Router::try_start(&[url_a.clone(), url_b.clone()], &[], &[], &env)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let healthy_a = healthy(&url_a, "decode");
    assert_eq!(router.metric(&healthy_a).await, Some(1.0));
    let picks_a = format!(r#"pd_router_picks_total{{profile="decode",endpoint="{url_a}"}}"#);
    let picks_before_kill = router.metric(&picks_a).await.unwrap_or(0.0);

    a.proc_mut().kill();
    // Requests keep succeeding: one that meets the dead endpoint is retried on B.
    for i in 0..6 {
        complete(&router, &format!("dying-{i}")).await;
    }
    until_metric(&router, &healthy_a, "A's circuit to open", |v| v == 0.0).await;
    assert_eq!(router.ready().await, StatusCode::OK, "B is still there");

    // While A is out, a request reaches it only as the one trial of a half-open
    // circuit (each then fails over to B).
    let half_opens =
        format!(r#"pd_router_circuit_transitions_total{{endpoint="{url_a}",to="half_open"}}"#);
    let metric = |s: &str| {
        let router = &router;
        let s = s.to_string();
        async move { router.metric(&s).await.unwrap_or(0.0) }
    };
    let (picks0, half0) = (metric(&picks_a).await, metric(&half_opens).await);
    b.clear_requests().await;
    const N: usize = 20;
    for i in 0..N {
        complete(&router, &format!("down-{i}")).await;
    }
    assert_eq!(ids(&b, "down-").await.len(), N, "B served them all");
    let (picks1, half1) = (metric(&picks_a).await, metric(&half_opens).await);
    assert!(
        picks1 - picks0 <= half1 - half0 + 1.0,
        "A was picked {} times in {} half-open periods",
        picks1 - picks0,
        half1 - half0
    );

    // Every pick of A while it was dead was retried on B. (Ties between A and B
    // are broken at random and the health check may close A out first, so how
    // many picks that is varies from run to run; every request succeeded above.)
    let picks_while_dead = picks1 - picks_before_kill;
    let retries = router
        .metric("pd_router_retries_total")
        .await
        .unwrap_or(0.0);
    assert!(
        retries >= picks_while_dead,
        "{picks_while_dead} picks of the dead A, {retries} retries"
    );

    // A comes back on the same port: after the open period and a good health check,
    // traffic reaches it again.
    let a2 = EngineSim::start_on_port(a.port(), &[]).await;
    until_metric(&router, &healthy_a, "A's circuit to close", |v| v == 1.0).await;
    let closed =
        format!(r#"pd_router_circuit_transitions_total{{endpoint="{url_a}",to="closed"}}"#);
    assert!(metric(&closed).await >= 1.0);
    let mut i = 0;
    poll_until(WAIT, "a request to reach the restarted A", || {
        i += 1;
        let id = format!("back-{i}");
        let router = &router;
        let a2 = &a2;
        async move {
            complete(router, &id).await;
            (!ids(a2, "back-").await.is_empty()).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn an_engine_dead_behind_its_sidecar_fails_the_ready_health_check() {
    // A pd-sidecar's /health is its own liveness; its /ready also asks its engine.
    let mut engines = [EngineSim::start(&[]).await, EngineSim::start(&[]).await];
    let sidecars = [
        Sidecar::start(engines[0].port(), &[]).await,
        Sidecar::start(engines[1].port(), &[]).await,
    ];
    let urls: Vec<String> = sidecars.iter().map(|s| s.url("")).collect();
    let mut args = fast("5s");
    args.push("--decode-health-path=/ready".into());
    let router = Router::try_start(&urls, &[], &args, &[("RUST_LOG", "debug")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    engines[0].proc_mut().kill();
    // No request is sent: the health checks alone open the circuit.
    until_metric(
        &router,
        &healthy(&urls[0], "decode"),
        "the circuit of the sidecar whose engine died to open",
        |v| v == 0.0,
    )
    .await;
    for i in 0..5 {
        complete(&router, &format!("behind-{i}")).await;
    }
    assert_eq!(ids(&engines[1], "behind-").await.len(), 5);
    assert_eq!(router.metric(&healthy(&urls[1], "decode")).await, Some(1.0));
}

#[tokio::test]
async fn no_healthy_decode_endpoint_is_503_and_not_ready_until_one_returns() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let router = Router::try_start(
        std::slice::from_ref(&url),
        &[],
        &fast("2s"),
        &[("RUST_LOG", "debug")],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    poll_until(WAIT, "/ready to answer 503", || async {
        (router.ready().await == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    assert_eq!(http_get(&router.url("/health")).await.0, StatusCode::OK);
    let (status, headers, body) = http_post_json(
        &router.url("/v1/chat/completions"),
        &json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-pd-error-code"], "no_healthy_decode");
    assert_eq!(headers["content-type"], "application/json");
    let err = json(&body)["error"].clone();
    assert_eq!(err["message"], "no healthy decode endpoint", "{err}");
    assert_eq!(err["type"], "server_error", "{err}");
    assert_eq!(err["code"], 503, "{err}");
    // Other paths too.
    let (status, _, _) = http_get(&router.url("/v1/models")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        router
            .metric(r#"pd_router_errors_total{class="no_healthy_decode"}"#)
            .await
            >= Some(2.0)
    );

    // An engine on that port makes the router ready and serving again.
    let _sim = EngineSim::start_on_port(port, &[]).await;
    poll_until(WAIT, "/ready to answer 200", || async {
        (router.ready().await == StatusCode::OK).then_some(())
    })
    .await;
    complete(&router, "recovered").await;
}

#[tokio::test]
async fn a_dead_prefill_endpoint_sends_requests_local() {
    let decode = EngineSim::start(&[]).await;
    let sidecar = Sidecar::start(
        decode.port(),
        &[
            "--prefill-threshold-tokens=0",
            "--prefill-retry-backoff=10ms",
        ],
    )
    .await;
    let mut prefill = EngineSim::start(&[]).await;
    // The prefill endpoint comes from an endpoints file, merged with --decode.
    let file = write(
        "prefill-endpoints.yaml",
        &format!("prefill:\n- hostPort: {}\n", prefill.host_port()),
    );
    let mut args = vec![
        "--threshold-tokens=256".to_string(),
        format!("--endpoints={}", file.display()),
    ];
    args.extend(fast("300ms"));
    let router = Router::try_start(&[sidecar.url("")], &[], &args, &[("RUST_LOG", "debug")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let long =
        |salt: &str| json!({"model": "sim-model", "prompt": text(1000, salt), "max_tokens": 2});
    let (status, _, _) = http_post_json(&router.url("/v1/completions"), &long("pd"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        router
            .metric(r#"pd_router_requests_total{decision="remote"}"#)
            .await,
        Some(1.0),
        "the file's prefill endpoint was used"
    );

    prefill.proc_mut().kill();
    let healthy_p = healthy(&prefill.host_port(), "prefill");
    until_metric(&router, &healthy_p, "the prefill circuit to open", |v| {
        v == 0.0
    })
    .await;
    for i in 0..3 {
        let (status, _, body) = http_post_json(
            &router.url("/v1/completions"),
            &long(&format!("local-{i}")),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert_eq!(json(&body)["usage"]["prompt_tokens"], 1000);
    }
    assert_eq!(
        router
            .metric(r#"pd_router_requests_total{decision="local"}"#)
            .await,
        Some(3.0)
    );
    assert_eq!(
        router
            .metric(r#"pd_router_errors_total{class="no_prefill_endpoint"}"#)
            .await,
        Some(3.0)
    );
    let sidecar_local = tandem_tests::harness::prom_sample(
        &sidecar.metrics().await.unwrap(),
        r#"pd_sidecar_requests_total{route="/v1/completions",decision="local"}"#,
    );
    assert_eq!(
        sidecar_local,
        Some(3.0),
        "no prefiller header reached the sidecar"
    );
    assert_eq!(router.ready().await, StatusCode::OK);
}

/// Makes engine `sim` hold `blocks` KV blocks (a prefill-role request whose blocks wait
/// for a decode engine that never comes).
async fn hold_blocks(sim: &EngineSim, blocks: usize) {
    let body = json!({
        "model": "sim-model", "prompt": text(blocks * 16, &format!("hold-{}", sim.port())),
        "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null,
            "remote_port": null}
    });
    let (status, _, resp) =
        http_post_json(&format!("{}/v1/completions", sim.url()), &body, &[]).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
}

#[tokio::test]
async fn stale_metrics_score_neutral_and_do_not_exclude() {
    // A's metrics come from a separate engine M (its endpoints-file metricsUrl), so they
    // can stop answering while A serves. M and B report 90% and 70% KV-cache usage.
    let a = EngineSim::start(&[]).await;
    let b = EngineSim::start(&["--num-blocks", "100"]).await;
    let mut m = EngineSim::start(&["--num-blocks", "100"]).await;
    hold_blocks(&m, 90).await;
    hold_blocks(&b, 70).await;
    let file = write(
        "stale-endpoints.yaml",
        &format!(
            "decode:\n- url: {}\n  metricsUrl: {}/metrics\n- {}\n",
            a.url(),
            m.url(),
            b.url()
        ),
    );
    // kv-cache-scorer: the alias of kv-cache-utilization-scorer.
    let config = decode_config("kv.yaml", &[("kv-cache-scorer", 1)]);
    let mut args = vec![
        format!("--endpoints={}", file.display()),
        format!("--config={}", config.display()),
        "--metrics-staleness-threshold=300ms".to_string(),
    ];
    args.extend(fast("300ms"));
    let router = Router::try_start(&[], &[], &args, &[("RUST_LOG", "debug")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let kv = |url: &str| series("pd_router_endpoint_kv_cache_usage", url);
    let usage_a = until_metric(&router, &kv(&a.url()), "M's usage scraped", |v| v > 0.8).await;
    let usage_b = until_metric(&router, &kv(&b.url()), "B's usage scraped", |v| v > 0.6).await;
    assert!(usage_a > usage_b && usage_b > 0.5, "{usage_a} {usage_b}");

    // Fresh: B's 1 - 0.7 beats A's 1 - 0.9.
    for i in 0..5 {
        complete(&router, &format!("fresh-{i}")).await;
    }
    assert_eq!(ids(&b, "fresh-").await.len(), 5);

    // M goes away: A's metrics go stale and score neutral (0.5), which now beats B's 0.3.
    // The last good value is not used, and A is not excluded: it is healthy and serving.
    m.proc_mut().kill();
    let age = series("pd_router_endpoint_metrics_age_seconds", &a.url());
    until_metric(&router, &age, "A's metrics to go stale", |v| v > 0.3).await;
    assert!(
        router
            .metric(&series("pd_router_scrape_errors_total", &a.url()))
            .await
            >= Some(1.0)
    );
    for i in 0..5 {
        complete(&router, &format!("stale-{i}")).await;
    }
    assert_eq!(ids(&a, "stale-").await.len(), 5, "A (neutral) took them");
    assert_eq!(router.metric(&healthy(&a.url(), "decode")).await, Some(1.0));
    assert_eq!(router.ready().await, StatusCode::OK);
}

#[tokio::test]
async fn an_endpoints_file_with_an_unknown_key_exits_2_naming_it() {
    let file = write(
        "typo-endpoints.yaml",
        "decode:\n- url: http://127.0.0.1:1\n  metricUrl: http://127.0.0.1:2/metrics\n",
    );
    let path = file.to_str().unwrap();
    let mut proc = Proc::spawn("pd-router", &["--endpoints", path], &[]);
    let status = poll_until(WAIT, "pd-router to exit", || {
        let exited = proc.exited();
        async move { exited }
    })
    .await;
    let log = proc.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains(&format!(
            "pd-router: error: --endpoints={path}: decode[0]: unknown key \"metricUrl\""
        )),
        "{log}"
    );
}
