//! pd-sidecar's SSRF protection from an InferencePool, against a fake
//! Kubernetes API server (`tandem_tests::fake_kube`) speaking list + watch:
//! nothing is allowed before the first lists, then exactly the ready pods'
//! IPs on the pool's target ports, following pods that become ready, not
//! ready or go away, a port change, and the API server going down and
//! coming back. Prefill engines are engine-sim processes on loopback; a
//! refused target must receive nothing.

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use tandem_tests::fake_kube::FakeKube;
use tandem_tests::harness::{http_post_json, json, poll_until, prom_sample, EngineSim, Sidecar};

const NS: &str = "llm";
const POOL: &str = "prefill-pool";
const LABELS: &[(&str, &str)] = &[("llm-d.ai/role", "prefill"), ("app", "qwen")];

fn body() -> serde_json::Value {
    json!({"model": "sim-model", "prompt": "The quick brown fox jumps over the lazy dog. ".repeat(40), "max_tokens": 3})
}

async fn post(sidecar: &Sidecar, target: &str) -> (StatusCode, serde_json::Value) {
    let (status, _, bytes) = http_post_json(
        &sidecar.url("/v1/completions"),
        &body(),
        &[("x-prefiller-host-port", target)],
    )
    .await;
    (status, json(&bytes))
}

async fn gauge(sidecar: &Sidecar, name: &str) -> Option<f64> {
    let text = sidecar.metrics().await.ok()?;
    prom_sample(&text, name)
}

/// Waits until the sidecar reports `endpoints` allowed endpoints, synced.
async fn wait_endpoints(sidecar: &Sidecar, endpoints: f64) {
    poll_until(
        Duration::from_secs(60),
        &format!("{endpoints} allowed endpoints"),
        || async {
            let synced = gauge(sidecar, "pd_sidecar_prefill_allowlist_synced").await;
            let n = gauge(sidecar, "pd_sidecar_prefill_allowlist_endpoints").await;
            (synced == Some(1.0) && n == Some(endpoints)).then_some(())
        },
    )
    .await
}

/// A sidecar in front of `decode` that reads the API through `kubeconfig`,
/// with `flags` beside the test defaults and INFERENCE_POOL_NAMESPACE set.
async fn sidecar(decode: &EngineSim, kubeconfig: &std::path::Path, flags: &[String]) -> Sidecar {
    let mut args = vec!["--prefill-threshold-tokens=0".to_string()];
    args.extend_from_slice(flags);
    let kubeconfig = kubeconfig.to_str().unwrap();
    Sidecar::try_start(
        decode.port(),
        &args,
        &[("KUBECONFIG", kubeconfig), ("INFERENCE_POOL_NAMESPACE", NS)],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn pool_spec(port: u16) -> serde_json::Value {
    json!({
        "selector": {"matchLabels": {"llm-d.ai/role": "prefill", "app": "qwen"}},
        "targetPorts": [{"number": port}],
        "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
    })
}

#[tokio::test]
async fn ssrf_allow_list_follows_the_inference_pool() {
    let dir = tempdir();
    let mut kube = FakeKube::start().await;
    let kubeconfig = kube.kubeconfig(&dir);
    // The API server is down when the sidecar starts.
    kube.down().await;

    let allowed = EngineSim::start(&[]).await;
    let other = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    let sidecar = sidecar(
        &decode,
        &kubeconfig,
        &[
            "--on-prefill-failure=fail".into(),
            "--enable-ssrf-protection=true".into(),
            "--pool-group=inference.networking.k8s.io".into(),
            format!("--inference-pool={NS}/{POOL}"),
        ],
    )
    .await;
    let a = allowed.host_port();
    let b = other.host_port();

    // 1. No list yet: refused, and nothing reaches the prefill engine.
    let (status, err) = post(&sidecar, &a).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not been listed"),
        "{err}"
    );
    assert_eq!(
        gauge(&sidecar, "pd_sidecar_prefill_allowlist_synced").await,
        Some(0.0)
    );

    // 2. The API comes up with the pool and one ready pod on 127.0.0.1.
    kube.apply_pool(
        NS,
        POOL,
        "inference.networking.k8s.io/v1",
        pool_spec(allowed.port()),
    );
    kube.apply_pod(NS, "prefill-0", LABELS, "127.0.0.1", true);
    // A ready pod of another pool, and one in another namespace: not ours.
    kube.apply_pod(
        NS,
        "decode-0",
        &[("llm-d.ai/role", "decode"), ("app", "qwen")],
        "127.0.0.2",
        true,
    );
    kube.apply_pod("elsewhere", "prefill-x", LABELS, "127.0.0.3", true);
    kube.back_up().await;
    wait_endpoints(&sidecar, 1.0).await;
    let (status, resp) = post(&sidecar, &a).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(allowed.inference_requests().await.len(), 1);
    // The same pod on a port the pool does not list: refused.
    let (status, err) = post(&sidecar, &b).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{err}");
    assert!(other.inference_requests().await.is_empty());
    for target in ["127.0.0.2:8000", "127.0.0.3:8000", "localhost:1"] {
        let (status, _) = post(&sidecar, target).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{target}");
    }

    // 3. Not ready, ready again, deleted.
    kube.apply_pod(NS, "prefill-0", LABELS, "127.0.0.1", false);
    wait_endpoints(&sidecar, 0.0).await;
    assert_eq!(post(&sidecar, &a).await.0, StatusCode::FORBIDDEN);
    kube.apply_pod(NS, "prefill-0", LABELS, "127.0.0.1", true);
    wait_endpoints(&sidecar, 1.0).await;
    assert_eq!(post(&sidecar, &a).await.0, StatusCode::OK);
    kube.delete_pod(NS, "prefill-0");
    wait_endpoints(&sidecar, 0.0).await;
    assert_eq!(post(&sidecar, &a).await.0, StatusCode::FORBIDDEN);

    // 4. The pool's port moves: the new one is allowed, the old one not.
    kube.apply_pod(NS, "prefill-0", LABELS, "127.0.0.1", true);
    wait_endpoints(&sidecar, 1.0).await;
    kube.apply_pool(
        NS,
        POOL,
        "inference.networking.k8s.io/v1",
        pool_spec(other.port()),
    );
    poll_until(Duration::from_secs(60), "the new port allowed", || async {
        (post(&sidecar, &b).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    assert_eq!(post(&sidecar, &a).await.0, StatusCode::FORBIDDEN);
    let before = allowed.inference_requests().await.len();

    // 5. The API server goes down; the pod goes away meanwhile; it comes back.
    kube.down().await;
    kube.delete_pod(NS, "prefill-0");
    // While it is down, the last list holds.
    assert_eq!(post(&sidecar, &b).await.0, StatusCode::OK);
    kube.back_up().await;
    wait_endpoints(&sidecar, 0.0).await;
    assert_eq!(post(&sidecar, &b).await.0, StatusCode::FORBIDDEN);

    // 6. The pool is deleted: nothing of it is allowed.
    kube.apply_pod(NS, "prefill-0", LABELS, "127.0.0.1", true);
    wait_endpoints(&sidecar, 1.0).await;
    kube.delete_pool(NS, POOL);
    wait_endpoints(&sidecar, 0.0).await;
    assert_eq!(post(&sidecar, &b).await.0, StatusCode::FORBIDDEN);
    assert_eq!(allowed.inference_requests().await.len(), before);

    let seen = kube.seen();
    assert!(
        seen.iter().any(|l| l
            .contains("/apis/inference.networking.k8s.io/v1/namespaces/llm/inferencepools")
            && l.contains("fieldSelector=metadata.name%3Dprefill-pool")),
        "{seen:#?}"
    );
    assert!(seen
        .iter()
        .any(|l| l.contains("/api/v1/namespaces/llm/pods") && l.contains("watch=true")));
}

#[tokio::test]
async fn v1alpha2_pools_and_static_entries() {
    let dir = tempdir();
    let kube = FakeKube::start().await;
    let kubeconfig = kube.kubeconfig(&dir);
    let pooled = EngineSim::start(&[]).await;
    let listed = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    kube.apply_pool(
        NS,
        POOL,
        "inference.networking.x-k8s.io/v1alpha2",
        json!({"selector": {"app": "qwen"}, "targetPortNumber": pooled.port(),
               "extensionRef": {"name": "epp"}}),
    );
    kube.apply_pod(NS, "p", &[("app", "qwen")], "127.0.0.1", true);
    // Same name and namespace in the v1 group: not the pool asked for.
    kube.apply_pool(NS, POOL, "inference.networking.k8s.io/v1", pool_spec(1));
    let sidecar = sidecar(
        &decode,
        &kubeconfig,
        &[
            "--enable-ssrf-protection".into(),
            "--pool-group=inference.networking.x-k8s.io".into(),
            format!("--inference-pool={POOL}"),
            format!("--prefill-allowlist=127.0.0.0/8:{}", listed.port()),
        ],
    )
    .await;
    wait_endpoints(&sidecar, 1.0).await;
    assert_eq!(post(&sidecar, &pooled.host_port()).await.0, StatusCode::OK);
    assert_eq!(pooled.inference_requests().await.len(), 1);
    // The static CIDR entry with its port.
    assert_eq!(post(&sidecar, &listed.host_port()).await.0, StatusCode::OK);
    assert_eq!(listed.inference_requests().await.len(), 1);
    // Fallback policy (the default): a refused target is served with local
    // prefill, and the refusal counted.
    let (status, _) = post(&sidecar, "127.0.0.1:1").await;
    assert_eq!(status, StatusCode::OK);
    let text = sidecar.metrics().await.unwrap();
    assert_eq!(
        prom_sample(
            &text,
            r#"pd_sidecar_errors_total{class="prefill_forbidden"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_pod_selector_without_a_pool() {
    let dir = tempdir();
    let kube = FakeKube::start().await;
    let kubeconfig = kube.kubeconfig(&dir);
    let prefill = EngineSim::start(&[]).await;
    let decode = EngineSim::start(&[]).await;
    kube.apply_pod(NS, "p", LABELS, "127.0.0.1", true);
    kube.apply_pod(NS, "q", &[("app", "qwen")], "127.0.0.2", true);
    let sidecar = sidecar(
        &decode,
        &kubeconfig,
        &[
            "--on-prefill-failure=fail".into(),
            "--enable-ssrf-protection".into(),
            "--prefill-pod-selector=llm-d.ai/role=prefill,app=qwen".into(),
            format!("--prefill-pod-ports={}", prefill.port()),
        ],
    )
    .await;
    wait_endpoints(&sidecar, 1.0).await;
    assert_eq!(post(&sidecar, &prefill.host_port()).await.0, StatusCode::OK);
    let other = format!("127.0.0.2:{}", prefill.port());
    assert_eq!(post(&sidecar, &other).await.0, StatusCode::FORBIDDEN);
    assert!(kube.seen().iter().all(|l| !l.contains("inferencepools")));
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-kube-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
