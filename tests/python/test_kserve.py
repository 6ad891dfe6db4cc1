"""The KServe example (charts/tandem/examples/kserve-llminferenceservice.yaml): an
LLMInferenceService as KServe's API defines it (serving.kserve.io/v1alpha2: model, the decode
WorkloadSpec inline, prefill, router), whose decode template names KServe's routing-sidecar init
container with Tandem's image and nothing else (KServe supplies the command line), with pod
templates valid as Kubernetes pod specs; and pd-sidecar accepting the command line KServe renders
for that container, SSRF protection from its InferencePool included."""

import kubernetes_validate
import yaml

from conftest import ROOT, binary
import subprocess

EXAMPLE = ROOT / "charts" / "tandem" / "examples" / "kserve-llminferenceservice.yaml"
K8S = kubernetes_validate.latest_version()
# What KServe's LLMInferenceService renders for the llm-d-routing-sidecar container (its
# well-known decode template, TLS between the sidecar and vLLM, SSRF protection on the pool).
KSERVE_SIDECAR_ARGS = [
    "--port=8000",
    "--vllm-port=8001",
    "--kv-connector=nixlv2",
    "--secure-proxy=true",
    "--cert-path=/var/run/kserve/tls",
    "--enable-tls=decoder",
    "--enable-tls=prefiller",
    "--enable-ssrf-protection=true",
    "--pool-group=inference.networking.x-k8s.io",
    "--inference-pool=llm/qwen3-pd-inference-pool",
]


def doc():
    return yaml.safe_load(EXAMPLE.read_text())


def test_an_llminferenceservice_with_our_sidecar_image():
    d = doc()
    assert d["apiVersion"] == "serving.kserve.io/v1alpha2"
    assert d["kind"] == "LLMInferenceService"
    spec = d["spec"]
    assert set(spec) <= {"model", "replicas", "parallelism", "template", "worker", "router", "prefill",
                         "baseRefs", "storageInitializer"}
    assert spec["model"]["uri"].startswith("hf://")
    sidecars = spec["template"]["initContainers"]
    assert [c["name"] for c in sidecars] == ["llm-d-routing-sidecar"]
    assert set(sidecars[0]) == {"name", "image"}, "only the image: KServe's command line stays"
    assert sidecars[0]["image"].endswith("/tandem:0.1.0")
    assert "initContainers" not in spec["prefill"]["template"], "prefill pods have no sidecar"
    assert set(spec["router"]) <= {"route", "gateway", "ingress", "scheduler"}
    for workload in (spec, spec["prefill"]):
        assert set(workload["parallelism"]) <= {"tensor", "pipeline", "data", "dataLocal", "dataRPCPort", "expert"}
        assert workload["replicas"] >= 1


def test_pod_templates_are_valid_pod_specs():
    spec = doc()["spec"]
    for template in (spec["template"], spec["prefill"]["template"]):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "t"}, "spec": template}
        # The template is merged onto KServe's; alone it still has to be a pod spec's shape
        # (the images KServe adds are what strict validation would miss).
        for c in pod["spec"].get("containers", []):
            c.setdefault("image", "vllm/vllm-openai")
        kubernetes_validate.validate(pod, K8S, strict=True)


def test_pd_sidecar_takes_kserves_command_line():
    res = subprocess.run([str(binary("pd-sidecar")), "--check-config", *KSERVE_SIDECAR_ARGS],
                         capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stderr
    for line in ["port: 8000,", "decode_port: 8001,", "secure_proxy: true,", "Nixlv2"]:
        assert line in res.stdout, line
    assert "qwen3-pd-inference-pool" in res.stdout and "inference.networking.x-k8s.io" in res.stdout, res.stdout
