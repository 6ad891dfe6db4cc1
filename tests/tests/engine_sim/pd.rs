//! The prefill and decode roles: held blocks, their release by the decode engine, expiry, and
//! the fallback to local prefill.

use super::*;

#[tokio::test]
async fn prefill_role_holds_blocks_and_returns_handle() {
    let sim = EngineSim::start(&["--block-size", "16", "--engine-id", "prefill-0"]).await;
    // 40 tokens at 16 per block: 3 blocks.
    let (status, body) = post(&sim, "/v1/completions", prefill_body(&prompt_of(40))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], " tok0");
    assert_eq!(body["usage"]["completion_tokens"], 1);
    let kv = &body["kv_transfer_params"];
    assert_eq!(kv["do_remote_prefill"], true);
    assert_eq!(kv["do_remote_decode"], false);
    // vLLM 0.26's shape: one list of block ids per KV-cache group, the token count and when
    // the held blocks expire.
    let groups = kv["remote_block_ids"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{kv}");
    assert_eq!(groups[0].as_array().unwrap().len(), 3, "{kv}");
    assert_eq!(kv["remote_num_tokens"], 40, "{kv}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = kv["remote_blocks_expiry_time"].as_f64().unwrap();
    assert!(
        expiry > now + 400.0 && expiry < now + 500.0,
        "{expiry} vs {now}"
    );
    assert_eq!(kv["remote_engine_id"], "prefill-0");
    assert_eq!(kv["remote_host"], "127.0.0.1");
    assert_eq!(kv["remote_port"], sim.kv_port().await);
    assert_eq!(kv["tp_size"], 1);
    assert!(kv["remote_request_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    let state = sim.state().await;
    assert_eq!(state["held_requests"], 1, "{state}");
    assert_eq!(state["held_blocks"], 3, "{state}");

    // The legacy v1 form: the handle also at the top level.
    let (status, body) = post(
        &sim,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": prompt_of(17)}], "max_tokens": 1, "do_remote_decode": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["remote_block_ids"].as_array().unwrap().len(),
        2,
        "{body}"
    );
    assert_eq!(body["remote_engine_id"], "prefill-0");
    assert_eq!(body["remote_host"], "127.0.0.1");
    assert_eq!(body["remote_port"], sim.kv_port().await);
    assert_eq!(sim.state().await["held_blocks"], 5);
    assert!(sim
        .metrics()
        .await
        .contains("engine_sim:held_blocks{model_name=\"sim-model\",engine=\"0\"} 5\n"));
}

#[tokio::test]
async fn decode_role_releases_prefill_blocks() {
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let prompt = prompt_of(40);
    let (_, pbody) = post(&prefill, "/v1/completions", prefill_body(&prompt)).await;
    let kv = pbody["kv_transfer_params"].clone();
    assert_eq!(prefill.state().await["held_blocks"], 3);

    // A handle whose block count does not match the prompt is refused.
    let mut wrong = kv.clone();
    wrong["remote_block_ids"] = json!([1]);
    let (status, body) = post(
        &decode,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 5, "kv_transfer_params": wrong}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("remote_block_ids"));
    let mut no_host = kv.clone();
    no_host.as_object_mut().unwrap().remove("remote_host");
    let (status, _) = post(
        &decode,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 5, "kv_transfer_params": no_host}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        prefill.state().await["held_blocks"],
        3,
        "refused decodes release nothing"
    );

    let (status, body) = post(
        &decode,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 5, "kv_transfer_params": kv}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], " tok0 tok1 tok2 tok3 tok4");
    assert!(body["kv_transfer_params"].is_null());
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 40);

    let state = poll_until(WAIT, "the prefill engine to free its blocks", || async {
        let s = prefill.state().await;
        (s["held_blocks"] == 0).then_some(s)
    })
    .await;
    assert_eq!(state["held_requests"], 0);
    assert_eq!(state["released_total"], 3);
    assert_eq!(state["expired_total"], 0);
    let d = decode.state().await;
    assert_eq!(
        (d["kv_pulls_ok"].as_u64(), d["kv_pulls_failed"].as_u64()),
        (Some(1), Some(0)),
        "{d}"
    );
    assert_eq!(d["kv_integrity_failures"], 0);

    // A second notification for the same request is unknown.
    let id = pbody["kv_transfer_params"]["remote_request_id"]
        .as_str()
        .unwrap();
    let (status, body) = post(
        &prefill,
        "/sim/release",
        json!({"notif": format!("{id}:1")}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_openai_error(&body, 404, "NotFoundError");
}

#[tokio::test]
async fn unreachable_prefill_falls_back_to_local_prefill() {
    let decode = EngineSim::start(&["--kv-pull-timeout-ms", "2000"]).await;
    let dead_port = free_port();
    let (status, body) = post(
        &decode,
        "/v1/completions",
        json!({"prompt": prompt_of(16), "max_tokens": 2, "kv_transfer_params": {
            "do_remote_prefill": true, "do_remote_decode": false, "remote_block_ids": [7],
            "remote_engine_id": "x", "remote_request_id": "r1", "remote_host": "127.0.0.1",
            "remote_port": dead_port, "tp_size": 1
        }}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "prefilled locally: {body}"
    );
    let s = decode.state().await;
    assert_eq!(
        (s["kv_pulls_failed"].as_u64(), s["kv_pulls_ok"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );
}

#[tokio::test]
async fn held_blocks_expire_after_hold_timeout() {
    let sim = EngineSim::start(&["--hold-timeout-s", "1"]).await;
    let (status, _) = post(&sim, "/v1/completions", prefill_body(&prompt_of(20))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sim.state().await["held_blocks"], 2);
    let state = poll_until(WAIT, "held blocks to expire", || async {
        let s = sim.state().await;
        (s["held_blocks"] == 0).then_some(s)
    })
    .await;
    assert_eq!(state["held_requests"], 0);
    assert_eq!(state["expired_total"], 2);
    assert_eq!(state["released_total"], 0);
    assert!(sim
        .metrics()
        .await
        .contains("engine_sim:expired_blocks_total"));
}
