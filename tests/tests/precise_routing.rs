//! Precise prefix-cache routing end to end: real `engine-sim` processes
//! publish vLLM's KV events over ZMQ to a real `pd-router` (llm-d's
//! centralized mode: the router binds, engines connect with topic
//! `kv@<ip>:<port>@<model>`), which routes by what the events say each
//! engine holds. Prompts are token-id lists, so the router's blocks are the
//! engine's exactly without a tokenizer.

use std::time::Duration;

use serde_json::{json, Value};
use tandem_tests::harness::{free_port, http_post_json, poll_until, EngineSim, Router};

const WAIT: Duration = Duration::from_secs(20);
const BLOCK: usize = 16;

/// A router config with llm-d's precise scorer fed on `zmq_port`.
fn config(zmq_port: u16) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("precise-routing-{}-{zmq_port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("epp.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: precise-prefix-cache-scorer
    parameters:
      tokenProcessorConfig:
        blockSize: {BLOCK}
      kvEventsConfig:
        zmqEndpoint: \"tcp://127.0.0.1:{zmq_port}\"
        topicFilter: \"kv@\"
        discoverPods: false
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: precise-prefix-cache-scorer
        weight: 3
      - pluginRef: max-score-picker
"
        ),
    )
    .unwrap();
    path
}

/// An engine-sim publishing its KV events to the router's socket.
async fn engine(zmq_port: u16, extra: &[&str]) -> EngineSim {
    let port = free_port();
    let events = json!({
        "enable_kv_cache_events": true,
        "publisher": "zmq",
        "endpoint": format!("tcp://127.0.0.1:{zmq_port}"),
        "topic": format!("kv@127.0.0.1:{port}@sim-model"),
    })
    .to_string();
    let mut args = vec!["--kv-events-config", events.as_str()];
    args.extend_from_slice(extra);
    EngineSim::start_on_port(port, &args).await
}

/// `n` distinct token ids starting at `from`.
fn ids(from: u32, n: usize) -> Vec<u32> {
    (from..from + n as u32).collect()
}

async fn complete(url: &str, prompt: &[u32]) -> Value {
    let body = json!({"model": "sim-model", "prompt": prompt, "max_tokens": 1});
    let (status, _, resp) = http_post_json(url, &body, &[]).await;
    assert!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&resp)
    );
    serde_json::from_slice(&resp).unwrap()
}

/// The router metric `series` (name and labels exactly), 0 when absent.
async fn router_metric(router: &Router, series: &str) -> f64 {
    let text = router.metrics().await.unwrap_or_else(|e| panic!("{e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Waits until the router's index holds `blocks` blocks of `engine`.
async fn index_has(router: &Router, engine: &EngineSim, blocks: f64) {
    let series = format!(
        r#"pd_router_kv_index_blocks{{endpoint="{}"}}"#,
        engine.host_port()
    );
    let end = std::time::Instant::now() + WAIT;
    loop {
        let now = router_metric(router, &series).await;
        if now == blocks {
            return;
        }
        if std::time::Instant::now() >= end {
            let text = router.metrics().await.unwrap_or_default();
            let kv: Vec<&str> = text.lines().filter(|l| l.contains("_kv_")).collect();
            let log = std::fs::read_to_string(router.log_path()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let (_, _, state) =
                tandem_tests::harness::http_get(&format!("{}/sim/state", engine.url())).await;
            eprintln!("engine state: {}", String::from_utf8_lossy(&state));
            panic!(
                "{series} is {now}, not {blocks}:\n{}\nrouter log (last lines first):\n{}",
                kv.join("\n"),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `engine`'s events reach the router: a PUB socket drops what it
/// sends before its subscriber is connected, so empty-cache resets
/// (`AllBlocksCleared`) are sent until the router has counted one.
async fn connected(router: &Router, engine: &EngineSim) {
    let series = format!(
        r#"pd_router_kv_events_total{{endpoint="{}",type="AllBlocksCleared"}}"#,
        engine.host_port()
    );
    let reset = format!("{}/reset_prefix_cache", engine.url());
    let end = std::time::Instant::now() + WAIT;
    while router_metric(router, &series).await < 1.0 {
        assert!(
            std::time::Instant::now() < end,
            "{} never reached the router's KV-event socket",
            engine.host_port()
        );
        http_post_json(&reset, &json!({}), &[]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Which of `engines` served how many inference requests.
async fn served(engines: &[&EngineSim]) -> Vec<usize> {
    let mut out = Vec::new();
    for e in engines {
        out.push(e.inference_requests().await.len());
    }
    out
}

async fn router_for(zmq_port: u16, engines: &[&EngineSim]) -> Router {
    let cfg = config(zmq_port);
    let decode: Vec<String> = engines.iter().map(|e| e.url()).collect();
    let router = Router::start(&decode, &[], &[&format!("--config={}", cfg.display())]).await;
    for e in engines {
        connected(&router, e).await;
    }
    router
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_goes_to_the_engine_whose_events_say_it_holds_the_prefix() {
    let zmq = free_port();
    // Engines connect to the router's socket, retrying until it is bound.
    let a = engine(zmq, &[]).await;
    let b = engine(zmq, &[]).await;
    let router = router_for(zmq, &[&a, &b]).await;
    let url = router.url("/v1/completions");
    // Each prompt is computed first on one engine directly; the router hears of it only
    // through that engine's events, never from a request it routed.
    let engines = [&a, &b];
    for (i, h) in [1, 0, 1, 0].into_iter().enumerate() {
        let holder = engines[h];
        let prompt = ids(1000 * (i as u32 + 1), 4 * BLOCK + 3);
        complete(&format!("{}/v1/completions", holder.url()), &prompt).await;
        // Four full blocks per prompt; each engine holds two prompts at the end.
        index_has(&router, holder, (4 * (i / 2 + 1)) as f64).await;
        let before = served(&engines).await;
        complete(&url, &prompt).await;
        let after = served(&engines).await;
        assert_eq!(
            after[h],
            before[h] + 1,
            "prompt {i}: routed to the engine that holds it ({before:?} -> {after:?})"
        );
    }
    let stored = router_metric(
        &router,
        &format!(
            r#"pd_router_kv_events_total{{endpoint="{}",type="BlockStored"}}"#,
            a.host_port()
        ),
    )
    .await;
    assert!(stored >= 2.0, "{stored}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_or_a_reset_moves_the_next_request_elsewhere() {
    let zmq = free_port();
    // B's pool is small: 12 blocks of 16 tokens.
    let a = engine(zmq, &[]).await;
    let b = engine(zmq, &["--num-blocks=12"]).await;
    let router = router_for(zmq, &[&a, &b]).await;
    let url = router.url("/v1/completions");
    let engines = [&a, &b];
    let prompt = ids(7000, 4 * BLOCK + 1);
    // A holds the prompt's first block only, B all four.
    complete(&format!("{}/v1/completions", a.url()), &prompt[..BLOCK + 1]).await;
    complete(&format!("{}/v1/completions", b.url()), &prompt).await;
    index_has(&router, &a, 1.0).await;
    index_has(&router, &b, 4.0).await;
    let before = served(&engines).await;
    complete(&url, &prompt).await;
    assert_eq!(served(&engines).await[1], before[1] + 1, "B holds more");

    // Another prompt fills B's pool: the first prompt's blocks are evicted (BlockRemoved).
    complete(
        &format!("{}/v1/completions", b.url()),
        &ids(50_000, 11 * BLOCK + 1),
    )
    .await;
    index_has(&router, &b, 11.0).await;
    let before = served(&engines).await;
    complete(&url, &prompt).await;
    assert_eq!(
        served(&engines).await[0],
        before[0] + 1,
        "after B evicted the prompt, A's one block wins"
    );

    // A forgets everything (vLLM's /reset_prefix_cache: AllBlocksCleared); B learns the
    // prompt again through the direct request.
    let (status, _, _) =
        http_post_json(&format!("{}/reset_prefix_cache", a.url()), &json!({}), &[]).await;
    assert!(status.is_success(), "{status}");
    index_has(&router, &a, 0.0).await;
    complete(
        &format!("{}/v1/completions", b.url()),
        &prompt[..2 * BLOCK + 1],
    )
    .await;
    poll_until(
        WAIT,
        "B's index to hold the prompt's head again",
        || async {
            let s = format!(
                r#"pd_router_kv_index_blocks{{endpoint="{}"}}"#,
                b.host_port()
            );
            (router_metric(&router, &s).await >= 2.0).then_some(())
        },
    )
    .await;
    let before = served(&engines).await;
    complete(&url, &prompt).await;
    assert_eq!(
        served(&engines).await[1],
        before[1] + 1,
        "A holds nothing now"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_event_messages_are_counted_and_routing_goes_on() {
    use zeromq::{Socket, SocketSend, ZmqMessage};
    let zmq = free_port();
    let a = engine(zmq, &[]).await;
    let router = router_for(zmq, &[&a]).await;
    // A rogue publisher on the router's socket: a payload that is not msgpack, a message
    // with two frames, and a bad sequence frame.
    let mut rogue = zeromq::PubSocket::new();
    rogue
        .connect(&format!("tcp://127.0.0.1:{zmq}"))
        .await
        .unwrap();
    let end = std::time::Instant::now() + WAIT;
    loop {
        assert!(
            std::time::Instant::now() < end,
            "the router never counted the malformed KV events"
        );
        let bad: [(&[u8], &[u8], &[u8]); 2] = [
            (b"kv@127.0.0.1:1@m", &[0; 8], b"\xc1\xc1 not msgpack"),
            (b"kv@127.0.0.1:1@m", b"short", b"\x93"),
        ];
        for (t, s, p) in bad {
            let mut m = ZmqMessage::from(t.to_vec());
            m.push_back(s.to_vec().into());
            m.push_back(p.to_vec().into());
            let _ = rogue.send(m).await;
        }
        let mut two = ZmqMessage::from(b"kv@127.0.0.1:1@m".to_vec());
        two.push_back(b"x".to_vec().into());
        let _ = rogue.send(two).await;
        let decode = router_metric(
            &router,
            r#"pd_router_kv_events_dropped_total{reason="decode"}"#,
        )
        .await;
        let frames = router_metric(
            &router,
            r#"pd_router_kv_events_dropped_total{reason="malformed_frame"}"#,
        )
        .await;
        if decode >= 1.0 && frames >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still routing, and a real engine's events still index.
    let prompt = ids(300, 2 * BLOCK + 1);
    complete(&format!("{}/v1/completions", a.url()), &prompt).await;
    index_has(&router, &a, 2.0).await;
    complete(&router.url("/v1/completions"), &prompt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_batch_is_recovered_from_the_engines_replay_socket() {
    // llm-d's per-pod mode: the engine binds its publisher and replay socket, the router
    // connects to each endpoint's socketPort and asks replaySocketPort for what it missed.
    let (events, replay) = (free_port(), free_port());
    let port = free_port();
    let cfg_json = json!({
        "enable_kv_cache_events": true,
        "publisher": "zmq",
        "endpoint": format!("tcp://*:{events}"),
        "replay_endpoint": format!("tcp://*:{replay}"),
        "topic": format!("kv@127.0.0.1:{port}@sim-model"),
    })
    .to_string();
    let a = EngineSim::start_on_port(port, &["--kv-events-config", &cfg_json]).await;
    let dir = std::env::temp_dir().join(format!("precise-replay-{}-{events}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("epp.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: precise-prefix-cache-scorer
    parameters:
      tokenProcessorConfig: {{blockSize: {BLOCK}}}
      kvEventsConfig:
        discoverPods: true
        podDiscoveryConfig: {{socketPort: {events}, replaySocketPort: {replay}}}
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: precise-prefix-cache-scorer
      - pluginRef: max-score-picker
"
        ),
    )
    .unwrap();
    let router = Router::start(&[a.url()], &[], &[&format!("--config={}", path.display())]).await;
    // Per endpoint, the index is kept under the router's own name for it.
    let label = a.url();
    let reset = format!("{}/reset_prefix_cache", a.url());
    let cleared =
        format!(r#"pd_router_kv_events_total{{endpoint="{label}",type="AllBlocksCleared"}}"#);
    let end = std::time::Instant::now() + WAIT;
    while router_metric(&router, &cleared).await < 1.0 {
        assert!(
            std::time::Instant::now() < end,
            "the router never subscribed"
        );
        http_post_json(&reset, &json!({}), &[]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A router that subscribed after the first reset was published has already replayed
    // once (a late join); count from here.
    let replays = format!(r#"pd_router_kv_event_replays_total{{endpoint="{label}",result="ok"}}"#);
    let gaps = format!(r#"pd_router_kv_event_gaps_total{{endpoint="{label}"}}"#);
    let (replays_before, gaps_before) = (
        router_metric(&router, &replays).await,
        router_metric(&router, &gaps).await,
    );
    // The next batch is numbered but never sent: the router sees a gap at the one after.
    let (status, _, _) = http_post_json(
        &format!("{}/sim/faults", a.url()),
        &json!({"lose_kv_events": 1}),
        &[],
    )
    .await;
    assert!(status.is_success());
    complete(
        &format!("{}/v1/completions", a.url()),
        &ids(100, 3 * BLOCK + 1),
    )
    .await;
    complete(
        &format!("{}/v1/completions", a.url()),
        &ids(900, 2 * BLOCK + 1),
    )
    .await;
    let blocks = format!(r#"pd_router_kv_index_blocks{{endpoint="{label}"}}"#);
    poll_until(WAIT, "both prompts' blocks in the index", || async {
        (router_metric(&router, &blocks).await == 5.0).then_some(())
    })
    .await;
    assert_eq!(router_metric(&router, &replays).await - replays_before, 1.0);
    assert_eq!(router_metric(&router, &gaps).await - gaps_before, 1.0);
    let synced = format!(r#"pd_router_kv_index_synced{{endpoint="{label}"}}"#);
    assert_eq!(router_metric(&router, &synced).await, 1.0);
}
