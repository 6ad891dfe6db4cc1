//! OpenTelemetry traces end to end: a real OTLP/gRPC collector
//! (`tandem_tests::otlp`, opentelemetry-proto's TraceService) receives the
//! spans of a real `pd-router` and `pd-sidecar` started with `--tracing`, in
//! front of two engine-sim engines. One client trace must come out as one
//! tree: the client's span -> router request -> {pick, decode leg, TTFT};
//! router decode leg -> sidecar request -> {prefill leg, decode leg, TTFT};
//! and each engine sees its leg's span as the parent in `traceparent`.

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use tandem_tests::harness::{http_post_json, poll_until, EngineSim, Router, Sidecar};
use tandem_tests::otlp::{OtlpReceiver, ReceivedSpan};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const INTERNAL: i32 = 1;
const ERROR: i32 = 2;

fn otel_env(receiver: &OtlpReceiver) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_TRACES_SAMPLER", "parentbased_always_on".into()),
        // Export within a few milliseconds instead of the default 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "20".into()),
        ("RUST_LOG", "debug".into()),
    ]
}

fn one<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(found.len(), 1, "{service}/{name} in {spans:#?}");
    found[0]
}

#[tokio::test]
async fn one_client_trace_is_one_tree_across_router_sidecar_and_engines() {
    let receiver = OtlpReceiver::start().await;
    let env = otel_env(&receiver);
    let env_refs = |extra: &[(&'static str, &'static str)]| -> Vec<(&str, String)> {
        env.iter()
            .cloned()
            .chain(extra.iter().map(|(k, v)| (*k, v.to_string())))
            .collect()
    };

    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let sidecar_env = env_refs(&[("OTEL_SERVICE_NAME", "decode-pod-sidecar")]);
    let sidecar_env: Vec<(&str, &str)> =
        sidecar_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let sidecar = Sidecar::try_start(
        decode.port(),
        &[
            "--tracing".to_string(),
            "--prefill-threshold-tokens=0".to_string(),
        ],
        &sidecar_env,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let router_env = env_refs(&[]);
    let router_env: Vec<(&str, &str)> = router_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let router = Router::try_start(
        &[sidecar.url("")],
        &[prefill.host_port()],
        &["--tracing".to_string(), "--threshold-tokens=16".to_string()],
        &router_env,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // A request the router refuses (412) is a failed request span.
    let url = router.url("/v1/chat/completions");
    let refused = json!({"model": "sim-model", "messages": [{"role": "user", "content": "never seen before"}]});
    let (status, _, _) = http_post_json(&url, &refused, &[("prefer", "if-available")]).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);

    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let body = json!({"model": "sim-model", "stream": true, "max_tokens": 4,
        "messages": [{"role": "user", "content": "tell me about the quick brown fox ".repeat(30)}]});
    let (status, _, answer) = http_post_json(&url, &body, &[("traceparent", &traceparent)]).await;
    assert_eq!(status, StatusCode::OK, "{answer:?}");

    let spans = poll_until(Duration::from_secs(20), "every span exported", || async {
        let spans: Vec<ReceivedSpan> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == CLIENT_TRACE)
            .collect();
        (spans.len() >= 8).then_some(spans)
    })
    .await;
    assert_eq!(spans.len(), 8, "{spans:#?}");

    let request = one(&spans, "pd-router", "pd_router.request");
    assert_eq!(request.kind, SERVER);
    assert_eq!(
        request.parent_span_id, CLIENT_SPAN,
        "continues the client's trace"
    );
    assert_eq!(request.attributes["http.response.status_code"], 200);
    let pick = one(&spans, "pd-router", "pd_router.pick");
    assert_eq!(pick.kind, INTERNAL);
    let sidecar_port = sidecar.port().to_string();
    assert!(
        pick.attributes["pd_router.decode"]
            .as_str()
            .unwrap()
            .contains(&sidecar_port),
        "{pick:?}"
    );
    assert_eq!(pick.attributes["pd_router.prefill"], prefill.host_port());
    assert!(pick.attributes["pd_router.prompt_tokens"].as_i64().unwrap() > 16);
    let leg = one(&spans, "pd-router", "pd_router.decode");
    assert_eq!(leg.kind, CLIENT);
    let ttft = one(&spans, "pd-router", "pd_router.ttft");
    for child in [pick, leg, ttft] {
        assert_eq!(child.parent_span_id, request.span_id, "{child:?}");
    }
    assert!(ttft.start_unix_nano <= leg.start_unix_nano);
    assert!(ttft.end_unix_nano <= request.end_unix_nano);

    let sc = one(&spans, "decode-pod-sidecar", "forward_request");
    assert_eq!(sc.kind, SERVER);
    assert_eq!(
        sc.parent_span_id, leg.span_id,
        "the router's traceparent reached the sidecar"
    );
    assert_eq!(sc.attributes["llm_d.pd_proxy.connector"], "nixlv2");
    assert_eq!(sc.attributes["llm_d.pd_proxy.decision"], "remote");
    assert_eq!(
        sc.attributes["llm_d.pd_proxy.prefill_target"],
        prefill.host_port()
    );
    let p = one(&spans, "decode-pod-sidecar", "llm_d.pd_proxy.prefill");
    let d = one(&spans, "decode-pod-sidecar", "llm_d.pd_proxy.decode");
    let t = one(&spans, "decode-pod-sidecar", "llm_d.pd_proxy.ttft");
    for child in [p, d, t] {
        assert_eq!(child.parent_span_id, sc.span_id, "{child:?}");
    }
    assert_eq!(p.kind, CLIENT);
    assert_eq!(d.kind, CLIENT);
    assert_eq!(p.attributes["llm_d.pd_proxy.prefill.status_code"], 200);
    assert!(p.end_unix_nano <= d.start_unix_nano, "prefill, then decode");

    // Each engine's traceparent names its leg's span.
    let engine_parent = |reqs: Vec<serde_json::Value>| {
        let tp = reqs[0]["headers"]["traceparent"]
            .as_str()
            .unwrap()
            .to_string();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts[1], CLIENT_TRACE, "{tp}");
        parts[2].to_string()
    };
    assert_eq!(engine_parent(prefill.inference_requests().await), p.span_id);
    assert_eq!(engine_parent(decode.inference_requests().await), d.span_id);

    // The refused request: its own trace, failed, with the error class.
    let failed = receiver
        .spans()
        .into_iter()
        .find(|s| s.name == "pd_router.request" && s.trace_id != CLIENT_TRACE)
        .expect("the refused request's span");
    assert_eq!(failed.status_code, ERROR);
    assert_eq!(failed.attributes["pd_router.error"], "no_cached_prefix");
    assert_eq!(failed.attributes["http.response.status_code"], 412);
}
