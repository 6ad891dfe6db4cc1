//! KV bytes end to end: client -> pd-sidecar -> prefill engine-sim computes the KV -> decode
//! engine-sim pulls it through its transfer agent (TCP or real NIXL) and checks every byte ->
//! the prefill engine frees its blocks on the notification.

use http::StatusCode;
use serde_json::{json, Value};
use tandem_tests::harness::{http_post_json, json, poll_until, EngineSim, Sidecar};

const WAIT: std::time::Duration = std::time::Duration::from_secs(20);
/// engine-sim's default KV shape: 2 layers x K/V = 4 regions of 16 x 1 x 16 x 2 B = 512 B blocks.
const BYTES_PER_BLOCK: u64 = 4 * 512;

fn long_prompt(tokens: usize, salt: &str) -> String {
    // 4 bytes per token in engine-sim's estimate.
    let mut s = format!("{salt:>8}");
    while s.len() < tokens * 4 {
        s.push_str(" lorem ipsum dolor sit amet");
    }
    s.truncate(tokens * 4);
    s
}

async fn kv_through_the_sidecar(backend: &str) {
    let prefill = EngineSim::start(&["--kv-backend", backend]).await;
    let decode = EngineSim::start(&["--kv-backend", backend]).await;
    let sidecar = Sidecar::start(decode.port(), &["--prefill-threshold-tokens=0"]).await;
    for (i, stream) in [(0, false), (1, true)] {
        let prompt = long_prompt(1000, &format!("req{i}"));
        let body = json!({"model": "sim-model", "prompt": prompt, "max_tokens": 4, "stream": stream,
            "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null }});
        let (status, _, resp) = http_post_json(
            &sidecar.url("/v1/completions"),
            &body,
            &[("x-prefiller-host-port", &prefill.host_port())],
        )
        .await;
        let text = String::from_utf8_lossy(&resp).into_owned();
        assert_eq!(status, StatusCode::OK, "{text}");
        let usage = if stream {
            let last = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .rfind(|d| *d != "[DONE]")
                .unwrap();
            json(last.as_bytes())["usage"].clone()
        } else {
            json(&resp)["usage"].clone()
        };
        // (cached_tokens is the prefill's own prefix-cache hit, which the sidecar passes on.)
        assert_eq!(usage["prompt_tokens"], 1000, "{text}");
        assert_eq!(usage["completion_tokens"], 4, "{text}");
    }
    let d = decode.state().await;
    assert_eq!(d["kv_backend"], backend);
    assert_eq!(d["kv_pulls_ok"], 2, "{d}");
    assert_eq!(d["kv_pulls_failed"], 0, "{d}");
    assert_eq!(d["kv_integrity_failures"], 0, "{d}");
    // 1000 tokens = 63 blocks of 16, in every region.
    assert_eq!(d["kv_bytes_pulled"], 2 * 63 * BYTES_PER_BLOCK, "{d}");
    let p = poll_until(WAIT, "the prefill engine to free its blocks", || async {
        let s = prefill.state().await;
        (s["held_blocks"] == 0).then_some(s)
    })
    .await;
    assert_eq!(p["released_total"], 2 * 63, "{p}");
    assert_eq!(p["expired_total"], 0, "{p}");
    assert!(decode
        .metrics()
        .await
        .contains("engine_sim:kv_pulls_total{model_name=\"sim-model\",engine=\"0\"} 2\n"));
}

#[tokio::test]
async fn kv_moves_intact_through_the_sidecar_over_tcp() {
    kv_through_the_sidecar("tcp").await;
}

#[tokio::test]
async fn kv_moves_intact_through_the_sidecar_over_nixl() {
    kv_through_the_sidecar("nixl").await;
}

#[tokio::test]
async fn a_corrupted_block_fails_the_decode_loudly() {
    let prefill = EngineSim::start(&["--corrupt-kv"]).await;
    let decode = EngineSim::start(&[]).await;
    let prompt = long_prompt(100, "bad");
    let (status, _, resp) = http_post_json(
        &format!("{}/v1/completions", prefill.url()),
        &json!({"prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": true}}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let params = json(&resp)["kv_transfer_params"].clone();
    let (status, _, resp) = http_post_json(
        &format!("{}/v1/completions", decode.url()),
        &json!({"prompt": prompt, "max_tokens": 3, "kv_transfer_params": params}),
        &[],
    )
    .await;
    let body = json(&resp);
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("KV integrity check failed") && msg.contains("layer0.k"),
        "{msg}"
    );
    assert_eq!(decode.state().await["kv_integrity_failures"], 1);
}

#[tokio::test]
async fn a_different_prompt_does_not_pass_the_check() {
    // The decode is handed the blocks of another prompt: the bytes are intact but not this
    // prompt's KV, which the check must notice too.
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let (_, _, resp) = http_post_json(
        &format!("{}/v1/completions", prefill.url()),
        &json!({"prompt": long_prompt(64, "one"), "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": true}}),
        &[],
    )
    .await;
    let params = json(&resp)["kv_transfer_params"].clone();
    let (status, _, resp) = http_post_json(
        &format!("{}/v1/completions", decode.url()),
        &json!({"prompt": long_prompt(64, "two"), "max_tokens": 1, "kv_transfer_params": params}),
        &[],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        String::from_utf8_lossy(&resp)
    );
}

async fn complete(sim: &EngineSim, prompt: &str, kv: Value) -> Value {
    let (status, _, resp) = http_post_json(
        &format!("{}/v1/completions", sim.url()),
        &json!({"prompt": prompt, "max_tokens": 1, "kv_transfer_params": kv}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    json(&resp)
}

#[tokio::test]
async fn prefix_cache_hits_follow_the_shared_prefix() {
    let sim = EngineSim::start(&[]).await;
    let a = long_prompt(100, "a");
    // Same first 64 tokens (4 blocks), then different.
    let mut b = a[..256].to_string();
    b.push_str(&long_prompt(36, "b"));
    let cached = |v: &Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        cached(&complete(&sim, &a, Value::Null).await),
        0,
        "cold cache"
    );
    // All 100 tokens are cached but the last is always computed: 6 full blocks of 16 hit.
    assert_eq!(cached(&complete(&sim, &a, Value::Null).await), 96);
    assert_eq!(
        cached(&complete(&sim, &b, Value::Null).await),
        64,
        "only the shared prefix hits"
    );
    let m = sim.metrics().await;
    assert!(
        m.contains("vllm:prefix_cache_hits_total{model_name=\"sim-model\",engine=\"0\"} 160\n"),
        "{m}"
    );
    assert!(
        m.contains("vllm:prefix_cache_queries_total{model_name=\"sim-model\",engine=\"0\"} 300\n"),
        "{m}"
    );
    assert!(sim.state().await["cached_blocks"].as_u64().unwrap() >= 6);
}

#[tokio::test]
async fn the_lru_evicts_cached_prefixes_when_the_pool_fills() {
    // 16 blocks: a 100-token prompt caches 6 full blocks; 12 blocks of other prompts later
    // need some of them back.
    let sim = EngineSim::start(&["--num-blocks", "16"]).await;
    let a = long_prompt(100, "a");
    complete(&sim, &a, Value::Null).await;
    complete(&sim, &long_prompt(190, "filler"), Value::Null).await;
    let s = sim.state().await;
    assert!(s["evicted_blocks_total"].as_u64().unwrap() > 0, "{s}");
    let again = complete(&sim, &a, Value::Null).await;
    assert!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            < 96,
        "{again}"
    );
}

#[tokio::test]
async fn a_decode_pulls_only_what_its_prefix_cache_lacks() {
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let prompt = long_prompt(100, "shared");
    for round in 0..2 {
        let p = complete(&prefill, &prompt, json!({"do_remote_decode": true})).await;
        let expected_prefill_hit = if round == 0 { 0 } else { 96 };
        assert_eq!(
            p["usage"]["prompt_tokens_details"]["cached_tokens"],
            expected_prefill_hit
        );
        let d = complete(&decode, &prompt, p["kv_transfer_params"].clone()).await;
        assert_eq!(
            d["usage"]["prompt_tokens_details"]["cached_tokens"], 100,
            "all KV was there: {d}"
        );
    }
    let s = decode.state().await;
    // 100 tokens = 7 blocks; the second time 6 were cached and one was pulled.
    assert_eq!(s["kv_bytes_pulled"], (7 + 1) * BYTES_PER_BLOCK, "{s}");
    assert_eq!(s["kv_integrity_failures"], 0);
    poll_until(WAIT, "both holds released", || async {
        (prefill.state().await["held_blocks"] == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_timing_model_computes_only_uncached_tokens_in_budgeted_steps() {
    // A 64-token budget per step: a 200-token prompt takes 4 prefill steps (64+64+64+8; the
    // last one yields the first token) and 2 more steps for tokens 2 and 3.
    let sim = EngineSim::start(&[
        "--timing-model",
        "--max-num-batched-tokens",
        "64",
        "--step-base-us",
        "100",
        "--prefill-us-per-token",
        "1",
    ])
    .await;
    let prompt = long_prompt(200, "timed");
    let steps = |s: Value| s["engine_steps"].as_u64().unwrap();
    let run = || async {
        let (status, _, resp) = http_post_json(
            &format!("{}/v1/completions", sim.url()),
            &json!({"prompt": prompt, "max_tokens": 3}),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        json(&resp)
    };
    run().await;
    assert_eq!(steps(sim.state().await), 6);
    // Again: 192 tokens are cached, 8 are computed in one step, then 2 decode steps.
    let again = run().await;
    assert_eq!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"],
        192
    );
    assert_eq!(steps(sim.state().await), 9);
}

#[tokio::test]
async fn a_failed_pull_falls_back_and_still_frees_the_prefill_blocks() {
    // The decode is handed a block id outside the prefill's pool: the pull fails, the decode
    // prefills locally and answers, and its notification frees the prefill's hold at once
    // (instead of after the 480 s hold timeout).
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let prompt = long_prompt(100, "fail");
    let (status, _, resp) = http_post_json(
        &format!("{}/v1/completions", prefill.url()),
        &json!({"prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": true}}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let mut params = json(&resp)["kv_transfer_params"].clone();
    let held = prefill.state().await["held_blocks"].as_u64().unwrap();
    assert!(held > 0);
    let ids = params["remote_block_ids"][0].as_array_mut().unwrap();
    *ids.last_mut().unwrap() = json!(1u64 << 30);
    let (status, _, resp) = http_post_json(
        &format!("{}/v1/completions", decode.url()),
        &json!({"prompt": prompt, "max_tokens": 3, "kv_transfer_params": params}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(json(&resp)["usage"]["completion_tokens"], 3);
    let d = decode.state().await;
    assert_eq!(
        (d["kv_pulls_ok"].as_u64(), d["kv_pulls_failed"].as_u64()),
        (Some(0), Some(1)),
        "{d}"
    );
    let p = poll_until(WAIT, "the prefill engine to free its blocks", || async {
        let s = prefill.state().await;
        (s["held_blocks"] == 0).then_some(s)
    })
    .await;
    assert_eq!(p["released_total"].as_u64(), Some(held), "{p}");
    assert_eq!(p["expired_total"], 0, "{p}");
}
