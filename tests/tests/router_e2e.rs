//! pd-router end to end: real `engine-sim` processes as prefill and decode
//! engines, a real `pd-sidecar` in front of each decode engine, and a real
//! `pd-router` in front of the sidecars, all on loopback. Each test asserts
//! what the engines, the sidecars or the client would see.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tandem_tests::harness::{
    free_port, http, http_post_json, http_post_stream, json, poll_until, EngineSim, Proc, Router,
    Sidecar,
};

const WAIT: Duration = Duration::from_secs(20);

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

/// A decode engine and its sidecar. The sidecar's own threshold is 0, so it
/// disaggregates exactly when the router names a prefill engine.
struct DecodePod {
    engine: EngineSim,
    sidecar: Sidecar,
}

impl DecodePod {
    async fn start(engine_args: &[&str]) -> DecodePod {
        let engine = EngineSim::start(engine_args).await;
        let sidecar = Sidecar::start(
            engine.port(),
            &[
                "--prefill-threshold-tokens=0",
                "--prefill-retry-backoff=10ms",
            ],
        )
        .await;
        DecodePod { engine, sidecar }
    }

    fn url(&self) -> String {
        self.sidecar.url("")
    }

    /// `pd_sidecar_requests_total` for `route` and `decision`, 0 when absent.
    async fn sidecar_count(&self, route: &str, decision: &str) -> u64 {
        let text = self
            .sidecar
            .metrics()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        metric(
            &text,
            &format!(r#"pd_sidecar_requests_total{{route="{route}",decision="{decision}"}}"#),
        )
    }
}

/// The value of the sample named exactly `series` (name and labels), 0 when absent.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn router_metric(router: &Router, series: &str) -> u64 {
    metric(
        &router.metrics().await.unwrap_or_else(|e| panic!("{e}")),
        series,
    )
}

async fn complete(router: &Router, prompt: &str, headers: &[(&str, &str)]) -> Value {
    let body = json!({"model": "sim-model", "prompt": prompt, "max_tokens": 2});
    let (status, _, resp) = http_post_json(&router.url("/v1/completions"), &body, headers).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    json(&resp)
}

#[tokio::test]
async fn a_shared_prefix_sticks_to_one_decode_and_one_prefill() {
    let prefills = [EngineSim::start(&[]).await, EngineSim::start(&[]).await];
    let decodes = [DecodePod::start(&[]).await, DecodePod::start(&[]).await];
    let router = Router::start(
        &decodes.iter().map(DecodePod::url).collect::<Vec<_>>(),
        &prefills
            .iter()
            .map(EngineSim::host_port)
            .collect::<Vec<_>>(),
        &["--threshold-tokens=256"],
    )
    .await;
    // 2000-token prompts sharing 1600 tokens: after the first, 400 are uncached on the
    // decode pod that served it, still at least the threshold, so all go P/D.
    let shared = text(1600, "shared");
    const N: usize = 6;
    for i in 0..N {
        let prompt = format!("{shared}{}", text(400, &format!("tail-{i}")));
        let resp = complete(&router, &prompt, &[]).await;
        assert_eq!(resp["usage"]["prompt_tokens"], 2000, "{resp}");
    }
    let mut per_decode = Vec::new();
    for d in &decodes {
        per_decode.push(d.engine.inference_requests().await.len());
    }
    let mut per_prefill = Vec::new();
    for p in &prefills {
        per_prefill.push(p.inference_requests().await);
    }
    let mut remote = Vec::new();
    for d in &decodes {
        remote.push(d.sidecar_count("/v1/completions", "remote").await);
    }
    let counts = |mut v: Vec<usize>| {
        v.sort();
        v
    };
    assert_eq!(counts(per_decode), [0, N], "decode engines' request counts");
    assert_eq!(
        counts(per_prefill.iter().map(Vec::len).collect()),
        [0, N],
        "prefill engines' request counts"
    );
    remote.sort();
    assert_eq!(remote, [0, N as u64], "sidecars' remote prefills");
    assert_eq!(
        router_metric(&router, r#"pd_router_requests_total{decision="remote"}"#).await,
        N as u64
    );
    // What the chosen prefill engine got was a prefill leg of the P/D protocol.
    for r in per_prefill.iter().flatten() {
        assert_eq!(
            r["body"]["kv_transfer_params"]["do_remote_decode"], true,
            "{r}"
        );
    }
}

#[tokio::test]
async fn short_prompts_get_no_prefill() {
    let prefill = EngineSim::start(&[]).await;
    let decode = DecodePod::start(&[]).await;
    let router = Router::start(
        &[decode.url()],
        &[prefill.host_port()],
        &["--threshold-tokens=256"],
    )
    .await;
    for i in 0..3 {
        complete(&router, &text(100, &format!("short-{i}")), &[]).await;
    }
    // Just under the threshold, as a chat (role and newline included in the estimate).
    let content = text(255, "chat");
    let content = &content[..content.len() - 8];
    let (status, _, resp) = http_post_json(
        &router.url("/v1/chat/completions"),
        &json!({"model": "sim-model", "messages": [{"role": "user", "content": content}], "max_tokens": 2}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    assert!(
        prefill.inference_requests().await.is_empty(),
        "a prefill engine was asked"
    );
    assert_eq!(decode.engine.inference_requests().await.len(), 4);
    assert_eq!(decode.sidecar_count("/v1/completions", "local").await, 3);
    assert_eq!(
        decode.sidecar_count("/v1/chat/completions", "local").await,
        1
    );
    assert_eq!(
        router_metric(&router, r#"pd_router_requests_total{decision="local"}"#).await,
        4
    );
    // A long one through the same router does go P/D: the threshold is what kept them local.
    complete(&router, &text(300, "long"), &[]).await;
    assert_eq!(prefill.inference_requests().await.len(), 1);
}

#[tokio::test]
async fn a_spoofed_prefiller_header_is_removed() {
    let spoofed = EngineSim::start(&[]).await;
    let prefill = EngineSim::start(&[]).await;
    let decode = DecodePod::start(&[]).await;
    let spoofed_hp = spoofed.host_port();
    let spoof = [("x-prefiller-host-port", spoofed_hp.as_str())];

    // No prefill endpoints: never P/D, whatever the client says.
    let no_pd = Router::start(&[decode.url()], &[], &[]).await;
    complete(&no_pd, &text(2000, "spoof-1"), &spoof).await;
    assert_eq!(decode.sidecar_count("/v1/completions", "local").await, 1);
    assert_eq!(decode.sidecar_count("/v1/completions", "remote").await, 0);

    // With a prefill endpoint: the router's choice replaces the client's.
    let pd = Router::start(&[decode.url()], &[prefill.host_port()], &[]).await;
    complete(&pd, &text(2000, "spoof-2"), &spoof).await;
    assert_eq!(decode.sidecar_count("/v1/completions", "remote").await, 1);
    assert_eq!(prefill.inference_requests().await.len(), 1);

    assert!(
        spoofed.inference_requests().await.is_empty(),
        "the spoofed address was reached"
    );
}

/// Runs pd-router with `args` and waits for it to exit; returns its exit code and log.
async fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut proc = Proc::spawn("pd-router", args, &[]);
    let status = poll_until(WAIT, "pd-router to exit", || {
        let exited = proc.exited();
        async move { exited }
    })
    .await;
    (status.code(), proc.log())
}

#[tokio::test]
async fn invalid_configs_exit_2_naming_the_problem() {
    let dir = std::env::temp_dir().join(format!("router-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "unknown-type.yaml",
            "plugins:\n- type: magic-scorer\nschedulingProfiles:\n- name: decode\n  plugins:\n  - pluginRef: magic-scorer\n",
            "unknown type \"magic-scorer\"",
        ),
        (
            "unknown-key.yaml",
            "plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSize: 16, bogusKey: 3}\nschedulingProfiles:\n- name: decode\n",
            "unknown parameter \"bogusKey\"",
        ),
        (
            "queue-scorer-parameter.yaml",
            "plugins:\n- type: queue-scorer\n  parameters: {maxQueue: 8}\nschedulingProfiles:\n- name: decode\n",
            "unknown parameter \"maxQueue\"",
        ),
        (
            "no-decode-profile.yaml",
            "plugins:\n- type: max-score-picker\nschedulingProfiles:\n- name: prefill\n",
            "\"decode\" is required",
        ),
    ];
    for (file, yaml, expected) in cases {
        let path = dir.join(file);
        std::fs::write(&path, yaml).unwrap();
        let (code, log) =
            run_to_exit(&["--decode=127.0.0.1:1", "--config", path.to_str().unwrap()]).await;
        assert_eq!(code, Some(2), "{file}: {log}");
        assert!(
            log.contains("pd-router: error:") && log.contains(expected),
            "{file}: expected {expected:?} in {log}"
        );
    }
    let (code, log) = run_to_exit(&[]).await;
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("--decode"), "{log}");
}

/// llm-d's own configs, as their repositories print them (same keys, our values): the precise
/// path's seed config, llm-d-router's P/D sample, the split precise pipeline and an always-P/D
/// config with label selectors pass the real binary's `--check-config`.
#[tokio::test]
async fn llm_d_configs_pass_check_config() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llm-d-configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        seen += 1;
        let (code, log) = run_to_exit(&[
            "--decode=127.0.0.1:1",
            "--prefill=127.0.0.1:2",
            "--check-config",
            "--config",
            path.to_str().unwrap(),
        ])
        .await;
        assert_eq!(code, Some(0), "{}: {log}", path.display());
        assert!(log.contains("scheduling"), "{}: {log}", path.display());
    }
    assert!(seen >= 4, "{seen} configs in {}", dir.display());
}

/// llm-d-router's P/D sample config (approximate producer, disagg-profile-handler, decider
/// at 64 uncached tokens) drives a real router: short prompts stay local, a long one is
/// prefilled remotely, and its repeat, cached on the decode pod, stays local.
#[tokio::test]
async fn llm_d_routers_pd_sample_config_works() {
    let prefill = EngineSim::start(&[]).await;
    let decode = DecodePod::start(&[]).await;
    let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/llm-d-configs/pd-disagg.yaml");
    let router = Router::start(
        &[decode.url()],
        &[prefill.host_port()],
        &[&format!("--config={}", cfg.display())],
    )
    .await;
    complete(&router, &text(40, "short"), &[]).await;
    assert!(prefill.inference_requests().await.is_empty());
    let long = text(400, "pd-sample");
    complete(&router, &long, &[]).await;
    assert_eq!(
        prefill.inference_requests().await.len(),
        1,
        "remote prefill"
    );
    complete(&router, &long, &[]).await;
    assert_eq!(
        prefill.inference_requests().await.len(),
        1,
        "cached on D: local"
    );
    assert_eq!(
        router_metric(&router, r#"pd_router_requests_total{decision="remote"}"#).await,
        1
    );
}

#[tokio::test]
async fn bad_json_is_400_and_a_dead_decode_is_503() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    // No health checks: the circuit stays closed, so the request meets the dead endpoint
    // (router_health.rs covers the circuit breaker).
    let router = Router::start(&[dead], &[], &["--health-check-interval=0"]).await;
    let (status, headers, body) = http(
        Method::POST,
        &router.url("/v1/completions"),
        &[("content-type", "application/json")],
        Bytes::from_static(b"{\"prompt\": "),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["content-type"], "application/json");
    let err = json(&body)["error"].clone();
    assert_eq!(err["type"], "invalid_request_error", "{err}");
    assert_eq!(err["code"], 400, "{err}");
    assert!(
        err["param"].is_null() && err["message"].is_string(),
        "{err}"
    );

    let (status, headers, body) = http_post_json(
        &router.url("/v1/chat/completions"),
        &json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-pd-error-code"], "decode_unavailable");
    let err = json(&body)["error"].clone();
    assert_eq!(err["code"], 503, "{err}");
    let text = router.metrics().await.unwrap();
    assert_eq!(
        metric(&text, r#"pd_router_errors_total{class="invalid_json"}"#),
        1
    );
    assert_eq!(
        metric(
            &text,
            r#"pd_router_errors_total{class="decode_unavailable"}"#
        ),
        1
    );
}

#[tokio::test]
async fn a_streaming_chat_arrives_event_by_event_through_router_and_sidecar() {
    let prefill = EngineSim::start(&[]).await;
    let decode = DecodePod::start(&["--itl-ms", "100"]).await;
    let router = Router::start(&[decode.url()], &[prefill.host_port()], &[]).await;
    let body = json!({"model": "sim-model", "stream": true, "max_tokens": 6,
        "messages": [{"role": "user", "content": text(1000, "stream")}]});
    let mut resp = http_post_stream(&router.url("/v1/chat/completions"), &body, &[]).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert!(resp.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert!(resp.headers.contains_key("x-request-id"));
    let first = resp.next_event().await.expect("a first event");
    // Mid-stream, both endpoints count the request in flight.
    let inflight = |ep: String| format!(r#"pd_router_inflight{{endpoint="{ep}"}}"#);
    assert_eq!(router_metric(&router, &inflight(decode.url())).await, 1);
    assert_eq!(
        router_metric(&router, &inflight(prefill.host_port())).await,
        1
    );
    let mut events = vec![first];
    events.extend(resp.events().await);
    assert!(events.last().unwrap().is_done(), "no [DONE]");
    let content: Vec<_> = events
        .iter()
        .filter(|e| {
            !e.is_done()
                && e.json()["choices"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty())
        })
        .collect();
    assert!(content.len() >= 6, "{} content events", content.len());
    // Tokens 100 ms apart: a router that buffered would deliver them together.
    let spread = content.last().unwrap().at - content[0].at;
    assert!(
        spread >= Duration::from_millis(300),
        "events arrived together: spread {spread:?}"
    );
    // It went P/D, and the counts are released once the stream is over.
    assert_eq!(prefill.inference_requests().await.len(), 1);
    assert_eq!(
        decode.sidecar_count("/v1/chat/completions", "remote").await,
        1
    );
    poll_until(WAIT, "in-flight counts back to 0", || async {
        let text = router.metrics().await.ok()?;
        (metric(&text, &inflight(decode.url())) == 0
            && metric(&text, &inflight(prefill.host_port())) == 0)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_client_disconnect_releases_the_in_flight_count() {
    let decode = DecodePod::start(&["--itl-ms", "200"]).await;
    let router = Router::start(&[decode.url()], &[], &[]).await;
    let series = format!(r#"pd_router_inflight{{endpoint="{}"}}"#, decode.url());
    let body = json!({"model": "sim-model", "prompt": "hi", "max_tokens": 50, "stream": true});
    let started = Instant::now();
    let mut resp = http_post_stream(&router.url("/v1/completions"), &body, &[]).await;
    resp.next_event().await.expect("a first event");
    assert_eq!(router_metric(&router, &series).await, 1);
    drop(resp);
    poll_until(WAIT, "the in-flight count released", || async {
        (router_metric(&router, &series).await == 0).then_some(())
    })
    .await;
    // Released by the disconnect, long before the 50 tokens (10 s) would have finished.
    assert!(started.elapsed() < Duration::from_secs(8));
    // /v1/models and other paths go to a decode endpoint too.
    let (status, _, body) = http(Method::GET, &router.url("/v1/models"), &[], Bytes::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["data"][0]["id"], "sim-model");
}

/// `--decode-dns`/`--prefill-dns` with a real lookup of `localhost`: each address it resolves to
/// is an endpoint, picked and named in `x-prefiller-host-port` by address.
#[tokio::test]
async fn endpoints_named_by_dns_are_resolved_per_address() {
    let pod = DecodePod::start(&[]).await;
    let prefill = EngineSim::start(&[]).await;
    let decode_port = pod.sidecar.port();
    let router = Router::start(
        &[],
        &[],
        &[
            &format!("--decode-dns=http://localhost:{decode_port}"),
            &format!("--prefill-dns=localhost:{}", prefill.port()),
            "--threshold-tokens=64",
        ],
    )
    .await;
    let mut addresses: Vec<_> = tokio::net::lookup_host(("localhost", 0))
        .await
        .expect("localhost resolves")
        .map(|a| a.ip())
        .collect();
    addresses.sort();
    addresses.dedup();
    assert_eq!(
        router_metric(&router, r#"pd_router_endpoints{role="decode"}"#).await,
        addresses.len() as u64,
        "one decode endpoint per address of localhost: {addresses:?}"
    );
    complete(&router, &text(400, "by-dns"), &[]).await;
    assert_eq!(
        router_metric(
            &router,
            &format!(r#"pd_router_picks_total{{profile="decode",endpoint="http://127.0.0.1:{decode_port}"}}"#)
        )
        .await,
        1,
        "the decode endpoint is named by address"
    );
    if addresses.len() == 1 {
        // Only 127.0.0.1, where the prefill engine listens: the request was disaggregated there.
        let requests = prefill.inference_requests().await;
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(pod.sidecar_count("/v1/completions", "remote").await, 1);
    }
}

#[tokio::test]
async fn client_transfer_parameters_never_leave_the_router() {
    // The engine stands where a decode sidecar would: what it logs is what
    // the router forwarded.
    let engine = EngineSim::start(&[]).await;
    let router = Router::start(&[engine.url()], &[], &[]).await;
    let body = json!({
        "model": "sim-model",
        "prompt": text(50, "kvp"),
        "max_tokens": 2,
        "kv_transfer_params": {
            "do_remote_prefill": true, "remote_host": "127.0.0.1", "remote_port": 1,
            "remote_engine_id": "someone-else", "remote_block_ids": [[1, 2, 3]]
        },
        "bootstrap_host": "127.0.0.1",
        "bootstrap_room": 42
    });
    let (status, _, resp) = http_post_json(&router.url("/v1/completions"), &body, &[]).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    let reqs = engine.inference_requests().await;
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    let seen = &reqs[0]["body"];
    for field in ["kv_transfer_params", "bootstrap_host", "bootstrap_room"] {
        assert!(
            seen.get(field).is_none(),
            "{field} reached the engine: {seen}"
        );
    }
    assert_eq!(seen["prompt"], body["prompt"]);
    assert_eq!(seen["max_tokens"], 2);
}

#[tokio::test]
async fn logs_written_to_a_file_carry_no_colour_codes() {
    let engine = EngineSim::start(&[]).await;
    let router = Router::start(&[engine.url()], &[], &["--log-json=false"]).await;
    let (status, _, _) = http_post_json(
        &router.url("/v1/completions"),
        &json!({"model": "sim-model", "prompt": "hi", "max_tokens": 1}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let log = poll_until(WAIT, "the router to log", || async {
        let log = std::fs::read_to_string(router.log_path()).unwrap_or_default();
        log.contains("INFO").then_some(log)
    })
    .await;
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log file:\n{log}"
    );
}

/// llm-d's conditional decode: with `Prefer: if-available` a request goes
/// only to a decode endpoint that already holds part of its prefix, else 412
/// (and nothing is sent, and the prompt is not recorded as cached).
#[tokio::test]
async fn prefer_if_available_is_412_until_a_decode_holds_the_prefix() {
    let decode = DecodePod::start(&[]).await;
    let router = Router::start(&[decode.url()], &[], &[]).await;
    let prompt = text(400, "conditional");
    let body = json!({"model": "sim-model", "prompt": prompt, "max_tokens": 2});
    let url = router.url("/v1/completions");
    let (status, headers, resp) = http_post_json(
        &url,
        &body,
        &[("prefer", "respond-async, If-Available; x=1")],
    )
    .await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(headers["x-pd-error-code"], "no_cached_prefix");
    assert_eq!(
        json(&resp)["error"]["code"],
        412,
        "{}",
        String::from_utf8_lossy(&resp)
    );
    assert!(decode.engine.inference_requests().await.is_empty());
    // Refused twice: the first refusal did not teach the index the prompt.
    let (status, _, _) = http_post_json(&url, &body, &[("prefer", "if-available")]).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);

    complete(&router, &prompt, &[]).await;
    let (status, _, resp) = http_post_json(&url, &body, &[("prefer", "if-available")]).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(decode.engine.inference_requests().await.len(), 2);
    assert_eq!(
        router_metric(
            &router,
            r#"pd_router_errors_total{class="no_cached_prefix"}"#
        )
        .await,
        2
    );
}
