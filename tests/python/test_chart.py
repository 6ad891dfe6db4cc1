"""The Helm chart (charts/tandem), rendered by real Helm (helm-python-sdk) for four value sets:
linted, every object validated against Kubernetes' own schemas (kubernetes-validate, strict), the
structure checked against the values, and the rendered pd-sidecar and pd-router arguments parsed by
the binaries themselves (`--check-config`), so a flag the binary does not know fails here."""

import copy
import json
import re
import subprocess

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, binary

CHART = ROOT / "charts" / "tandem"
RELEASE, NAMESPACE = "tandem", "llm"
FULL = "tandem"  # the release name contains the chart name
# The newest Kubernetes kubernetes-validate ships schemas for.
K8S = kubernetes_validate.latest_version()

MS_PD = yaml.safe_load((CHART / "examples" / "ms-pd-values.yaml").read_text())
CASES = {
    "defaults": None,
    "ms-pd": MS_PD,
    "no-proxy": {"routing": {"proxy": {"enabled": False}}},
    "tls": {
        "routing": {
            "proxy": {"secure": True, "certPath": "/etc/tandem/tls", "certSecretName": "tandem-sidecar-tls"}
        }
    },
    "cuda-ipc": {"kvTransfer": {"cudaIpc": {"enabled": True}}},
    "ssrf-pool": {
        "routing": {
            "proxy": {
                "ssrfProtection": {
                    "inferencePool": "qwen-prefill",
                    "poolGroup": "inference.networking.x-k8s.io",
                    "allowlist": ["10.20.0.0/16:8000-8001", "prefill.example:8000"],
                }
            }
        }
    },
}
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())


def merged(values):
    """The chart's defaults with `values` on top (maps merge, lists replace), as Helm does."""

    def merge(base, over):
        out = copy.deepcopy(base)
        for k, v in (over or {}).items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return merge(DEFAULTS, values)


_renders: dict = {}


def render(values, name=RELEASE):
    with helm.Chart.load(CHART) as chart:
        return chart.render(values=values, name=name, namespace=NAMESPACE)


def objects(case):
    """(objects by (kind, name), NOTES.txt) of one case, rendered once."""
    if case not in _renders:
        out = render(CASES[case])
        objs = {}
        for path, text in out.items():
            if path.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    key = (doc["kind"], doc["metadata"]["name"])
                    assert key not in objs, f"{key} rendered twice"
                    objs[key] = doc
        notes = next(t for p, t in out.items() if p.endswith("NOTES.txt"))
        _renders[case] = (objs, notes)
    return _renders[case]


def flag_value(args, flag):
    """The last value of `--flag value` or `--flag=value` in args (None if absent)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1 :]
    return value


def count_flag(args, flag):
    return sum(1 for a in args if a == flag or a.startswith(flag + "="))


def pod(objs, role):
    return objs[("Deployment", f"{FULL}-{role}")]["spec"]["template"]


def vllm(objs, role):
    return pod(objs, role)["spec"]["containers"][0]


def proxy(objs):
    inits = pod(objs, "decode")["spec"].get("initContainers", [])
    found = [c for c in inits if c["name"] == "routing-proxy"]
    return found[0] if found else None


def router_args(objs):
    return objs[("Deployment", f"{FULL}-router")]["spec"]["template"]["spec"]["containers"][0]["args"]


def run(name, args, env=None):
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(binary(name)), *args], capture_output=True, text=True, timeout=20, env=full_env)


def container_env(c):
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


# ---------------------------------------------------------------------------
# Helm and Kubernetes validity


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_is_clean(case):
    report = helm.lint(CHART, CASES[case], strict=True, namespace=NAMESPACE, kube_version=f"v{K8S}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_helm_lint_can_fail():
    # Lint mode turns the templates' `fail` into a log line, so use a schema violation.
    report = helm.lint(CHART, {"decode": {"replicas": -1}}, strict=True)
    assert any(m["severity"] == 3 for m in report["messages"]), report
    # A real render does fail on what the chart cannot serve.
    with pytest.raises(helm.HelmRenderError, match="only hf:// and pvc://"):
        render({"modelArtifacts": {"uri": "oci://registry/model", "name": "m"}})


PODMONITOR_SPEC_KEYS = {
    "attachMetadata", "bodySizeLimit", "jobLabel", "keepDroppedTargets", "labelLimit",
    "labelNameLengthLimit", "labelValueLengthLimit", "namespaceSelector", "podMetricsEndpoints",
    "podTargetLabels", "sampleLimit", "scrapeClass", "scrapeProtocols", "selector", "targetLimit",
}
PODMONITOR_ENDPOINT_KEYS = {
    "port", "portNumber", "path", "scheme", "interval", "scrapeTimeout", "relabelings",
    "metricRelabelings", "honorLabels", "honorTimestamps", "tlsConfig", "params", "enableHttp2",
    "filterRunning", "followRedirects", "proxyUrl",
}
PROM_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def check_podmonitor(pm, objs):
    """What the monitoring.coreos.com/v1 PodMonitor CRD requires (spec, spec.selector), the keys
    and formats it allows, and that it selects pods that declare the ports it scrapes."""
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", pm["metadata"]["name"])
    spec = pm["spec"]
    assert set(spec) <= PODMONITOR_SPEC_KEYS, set(spec) - PODMONITOR_SPEC_KEYS
    selector = spec["selector"]["matchLabels"]
    assert selector and all(isinstance(v, str) for v in selector.values())
    targets = [
        o["spec"]["template"]
        for (kind, _), o in objs.items()
        if kind == "Deployment" and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(targets) == 1, f"{pm['metadata']['name']} selects {len(targets)} Deployments"
    spec_pod = targets[0]["spec"]
    ports = {
        p["name"]
        for c in spec_pod["containers"] + spec_pod.get("initContainers", [])
        for p in c.get("ports", [])
        if "name" in p
    }
    assert spec["podMetricsEndpoints"]
    for ep in spec["podMetricsEndpoints"]:
        assert set(ep) <= PODMONITOR_ENDPOINT_KEYS, set(ep) - PODMONITOR_ENDPOINT_KEYS
        assert ep["port"] in ports, f"port {ep['port']!r} not declared by the pods ({ports})"
        assert ep["path"].startswith("/")
        assert PROM_DURATION.match(ep["interval"])


@pytest.mark.parametrize("case", CASES)
def test_every_object_is_valid_kubernetes(case):
    objs, _ = objects(case)
    for (kind, name), obj in objs.items():
        if kind == "PodMonitor":
            check_podmonitor(obj, objs)
        else:
            # Raises ValidationError (with the path) on any unknown or mistyped field.
            kubernetes_validate.validate(obj, K8S, strict=True)
    kinds = sorted(kind for kind, _ in objs)
    # The router's config and the Grafana dashboard (on by default) are the ConfigMaps.
    expected = ["ConfigMap", "ConfigMap", "Deployment", "Deployment", "Deployment", "Service", "Service", "Service", "ServiceAccount"]
    if case == "ms-pd":
        expected += ["PodMonitor"] * 3
    if case != "no-proxy":
        # pd-sidecar's read access to the prefill pods (SSRF protection, on by default).
        expected += ["ServiceAccount", "Role", "RoleBinding"]
    assert kinds == sorted(expected)


def test_schema_rejects_typos_in_our_keys_and_accepts_llm_d_keys():
    with pytest.raises(helm.HelmValuesError, match="replica"):
        render({"router": {"replica": 2}})
    with pytest.raises(helm.HelmValuesError, match="connector"):
        render({"routing": {"proxy": {"connector": "nixl3"}}})
    # Keys from llm-d-modelservice's own values.yaml that this chart does not use.
    out = render(
        {
            "multinode": False,
            "requester": {"enable": False},
            "accelerator": {"type": "nvidia", "dra": False},
            "modelArtifacts": {"uri": "hf://{{ .Values.modelArtifacts.name }}", "name": "org/m"},
            "routing": {"proxy": {"zapEncoder": "json", "zapLogLevel": "debug"}},
            "decode": {"autoscaling": {"enabled": False}, "acceleratorTypes": {"labelKey": ""}},
        }
    )
    args = yaml.safe_load(out["tandem/templates/decode-deployment.yaml"])["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "org/m", "the templated URI is rendered like llm-d does"


# ---------------------------------------------------------------------------
# Structure


def expected_model_label(values):
    labels = values["modelArtifacts"].get("labels") or {}
    if "llm-d.ai/model" in labels:
        return labels["llm-d.ai/model"]
    name = re.sub(r"[^a-z0-9_.-]", "-", values["modelArtifacts"]["name"].lower())
    return re.sub(r"[^a-z0-9]+$", "", re.sub(r"^[^a-z0-9]+", "", name[:63]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_model_pods_follow_the_values(case, role):
    objs, _ = objects(case)
    values = merged(CASES[case])
    spec = values[role]
    with_proxy = role == "decode" and values["routing"]["proxy"]["enabled"]
    deployment = objs[("Deployment", f"{FULL}-{role}")]
    template = pod(objs, role)
    labels = template["metadata"]["labels"]
    assert labels["llm-d.ai/role"] == role
    assert labels["llm-d.ai/inferenceServing"] == "true"
    assert labels["llm-d.ai/model"] == expected_model_label(values)
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] == spec["replicas"]

    # The headless Service selects this role's pods only.
    svc = objs[("Service", f"{FULL}-{role}")]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"]["llm-d.ai/role"] == role
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["port"] == values["routing"]["servicePort"]

    c = vllm(objs, role)
    args = c["args"]
    tp = spec["parallelism"]["tensor"]
    port = values["routing"]["proxy"]["targetPort"] if with_proxy else values["routing"]["servicePort"]
    assert c["command"] == ["vllm", "serve"]
    assert args[0] == values["modelArtifacts"]["uri"].removeprefix("hf://")
    assert flag_value(args, "--port") == str(port)
    assert flag_value(args, "--served-model-name") == values["modelArtifacts"]["name"]
    assert flag_value(args, "--tensor-parallel-size") == str(tp)
    assert count_flag(args, "--kv-transfer-config") == 1, "added only when the user gave none"
    kv = json.loads(flag_value(args, "--kv-transfer-config"))
    assert kv["kv_connector"] == "NixlConnector"
    # vLLM 0.26: producer for prefill, consumer for decode, unless the values name a role.
    default_role = {"prefill": "kv_producer", "decode": "kv_consumer"}[role]
    given = [str(a) for a in spec["containers"][0].get("args", [])]
    if "--kv-transfer-config" in given:  # the user's own, as written (llm-d's guide: kv_both)
        assert kv == json.loads(given[given.index("--kv-transfer-config") + 1])
    else:
        assert kv["kv_role"] == (json.loads(values["kvTransfer"]["config"] or "{}").get("kv_role") or default_role)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(tp * spec["parallelism"].get("dataLocal", 1))
    user_args = [str(a) for a in spec["containers"][0].get("args", [])]
    if user_args:
        assert args[-len(user_args) :] == user_args, "the user's args come last, unchanged"

    env = {}
    for e in c["env"]:
        assert e["name"] not in env, f"{e['name']} set twice"
        env[e["name"]] = e
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"] == "5600"
    probe = c["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/health", port)
    ports = {p["containerPort"] for p in c["ports"]}
    assert port in ports

    inits = template["spec"].get("initContainers", [])
    if with_proxy:
        assert [i["name"] for i in inits] == ["routing-proxy"]
    else:
        assert not [i for i in inits if i["name"] == "routing-proxy"], "the sidecar is decode-only"


def test_ms_pd_example_mirrors_llm_d_guide():
    objs, notes = objects("ms-pd")
    model = "RedHatAI/Llama-3.3-70B-Instruct-FP8-dynamic"
    for role, replicas, tp in [("decode", 4, 1), ("prefill", 1, 4)]:
        d = objs[("Deployment", f"{FULL}-{role}")]
        assert d["spec"]["replicas"] == replicas
        c = vllm(objs, role)
        assert c["args"][0] == model
        assert flag_value(c["args"], "--tensor-parallel-size") == str(tp)
        assert flag_value(c["args"], "--block-size") == "128"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == str(tp)
        env = {e["name"]: e for e in c["env"]}
        assert env["UCX_TLS"]["value"]
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "llm-d-hf-token", "key": "HF_TOKEN"}
    assert proxy(objs)["image"] == MS_PD["routing"]["proxy"]["image"]
    cfg = yaml.safe_load(objs[("ConfigMap", f"{FULL}-router")]["data"]["config.yaml"])
    prefix = next(p for p in cfg["plugins"] if p["type"] == "prefix-cache-scorer")
    assert prefix["parameters"]["blockSize"] == 128, "the router's blocks match vLLM's --block-size"
    assert model in notes


@pytest.mark.parametrize("case", ["defaults", "ms-pd", "tls"])
def test_routing_proxy_is_a_hardened_native_sidecar(case):
    objs, _ = objects(case)
    values = merged(CASES[case])
    p = proxy(objs)
    secure = values["routing"]["proxy"]["secure"]
    scheme = "HTTPS" if secure else "HTTP"
    assert p["restartPolicy"] == "Always"
    ports = {x["name"]: x["containerPort"] for x in p["ports"]}
    assert ports == {"http": values["routing"]["servicePort"], "metrics": values["routing"]["proxy"]["metricsPort"]}
    # startupProbe gates vLLM's start, so it checks the sidecar alone (/health); /ready needs vLLM.
    for probe, path in [("startupProbe", "/health"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")]:
        get = p[probe]["httpGet"]
        assert (get["path"], get["port"], get["scheme"]) == (path, "http", scheme), probe
    sc = p["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert p["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    args = p["args"]
    assert flag_value(args, "--port") == str(values["routing"]["servicePort"])
    assert flag_value(args, "--model-server-port") == str(values["routing"]["proxy"]["targetPort"])
    assert flag_value(args, "--kv-connector") == "nixlv2"
    assert flag_value(args, "--secure-proxy") == str(secure).lower()
    assert flag_value(args, "--prefiller-use-tls") == "false"


def test_tls_mounts_the_certificate_and_the_router_speaks_https():
    objs, _ = objects("tls")
    p = proxy(objs)
    assert flag_value(p["args"], "--cert-path") == "/etc/tandem/tls"
    mount = next(m for m in p["volumeMounts"] if m["mountPath"] == "/etc/tandem/tls")
    assert mount["readOnly"] is True
    volume = next(v for v in pod(objs, "decode")["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "tandem-sidecar-tls"
    args = router_args(objs)
    assert flag_value(args, "--decode-dns") == f"https://{FULL}-decode.{NAMESPACE}.svc:8000"
    assert flag_value(args, "--tls-insecure-skip-verify") == "true"


def test_without_the_proxy_vllm_serves_the_service_port_and_the_router_never_disaggregates():
    objs, _ = objects("no-proxy")
    assert proxy(objs) is None
    assert "initContainers" not in pod(objs, "decode")["spec"]
    assert flag_value(vllm(objs, "decode")["args"], "--port") == "8000"
    args = router_args(objs)
    assert flag_value(args, "--threshold-tokens") == "0"
    assert flag_value(args, "--prefill-dns") is None


@pytest.mark.parametrize("case", CASES)
def test_router_objects_fit_together(case):
    objs, notes = objects(case)
    values = merged(CASES[case])
    d = objs[("Deployment", f"{FULL}-router")]
    spec = d["spec"]["template"]["spec"]
    labels = d["spec"]["template"]["metadata"]["labels"]
    c = spec["containers"][0]
    sa = objs[("ServiceAccount", spec["serviceAccountName"])]
    assert sa["automountServiceAccountToken"] is False
    svc = objs[("Service", f"{FULL}-router")]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in c["ports"]}
    cm = objs[("ConfigMap", f"{FULL}-router")]
    assert yaml.safe_load(cm["data"]["config.yaml"]) == values["router"]["config"]
    volume = next(v for v in spec["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"])
    mount = next(m for m in c["volumeMounts"] if m["name"] == volume["name"])
    assert flag_value(c["args"], "--config") == mount["mountPath"] + "/config.yaml"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    scheme = "https" if values["routing"]["proxy"]["secure"] else "http"
    # Every ready pod behind the headless Services is an endpoint of its own.
    assert flag_value(c["args"], "--decode-dns") == f"{scheme}://{FULL}-decode.{NAMESPACE}.svc:8000"
    assert flag_value(c["args"], "--decode") is None
    if values["routing"]["proxy"]["enabled"]:
        assert flag_value(c["args"], "--prefill-dns") == f"{FULL}-prefill.{NAMESPACE}.svc:8000"
    assert flag_value(c["args"], "--dns-refresh-interval") == "5s"
    for role in ("decode", "prefill"):
        svc = objs[("Service", f"{FULL}-{role}")]
        assert svc["spec"]["clusterIP"] == "None"
        assert not svc["spec"].get("publishNotReadyAddresses", False), "only ready pods resolve"
    assert "scores each ready pod" in notes


# ---------------------------------------------------------------------------
# The binaries parse what the chart renders


def cert_dir(tmp_path):
    d = tmp_path / "certs"
    d.mkdir()
    (d / "tls.crt").write_text("placeholder: --check-config only checks that the files exist\n")
    (d / "tls.key").write_text("placeholder\n")
    return d


@pytest.mark.parametrize("case", ["defaults", "ms-pd", "tls", "ssrf-pool"])
def test_pd_sidecar_accepts_the_rendered_args(case, tmp_path):
    objs, _ = objects(case)
    args = proxy(objs)["args"]
    # The Secret is mounted in the pod; here the files the check looks for stand in for it.
    args = [f"--cert-path={cert_dir(tmp_path)}" if a.startswith("--cert-path=") else a for a in args]
    res = run("pd-sidecar", ["--check-config", *args], env=container_env(proxy(objs)))
    assert res.returncode == 0, res.stderr
    values = merged(CASES[case])
    assert f"port: {values['routing']['servicePort']}," in res.stdout
    assert f"decode_port: {values['routing']['proxy']['targetPort']}," in res.stdout
    assert "connector: Nixlv2," in res.stdout
    assert f"secure_proxy: {str(values['routing']['proxy']['secure']).lower()}," in res.stdout


@pytest.mark.parametrize("case", CASES)
def test_pd_router_accepts_the_rendered_args_and_config(case, tmp_path):
    objs, _ = objects(case)
    config = tmp_path / "config.yaml"
    config.write_text(objs[("ConfigMap", f"{FULL}-router")]["data"]["config.yaml"])
    args = [f"--config={config}" if a.startswith("--config=") else a for a in router_args(objs)]
    res = run("pd-router", ["--check-config", *args])
    assert res.returncode == 0, res.stderr
    hosts = re.findall(r'host: "([^"]+)",\s+port: (\d+),', res.stdout)
    want = [(f"{FULL}-decode.{NAMESPACE}.svc", "8000")]
    if case != "no-proxy":
        want.append((f"{FULL}-prefill.{NAMESPACE}.svc", "8000"))
    assert hosts == want, res.stdout


def test_check_config_fails_on_an_unknown_flag():
    res = run("pd-sidecar", ["--check-config", "--port=8000", "--no-such-flag=1"])
    assert res.returncode == 2 and "--no-such-flag" in res.stderr
    res = run("pd-router", ["--check-config", "--decode=http://a:8000", "--no-such-flag"])
    assert res.returncode == 2 and "--no-such-flag" in res.stderr
    # A flag slipped in through the chart's values fails the same way.
    out = render({"routing": {"proxy": {"extraArgs": ["--no-such-flag=1"]}}})
    inits = yaml.safe_load(out["tandem/templates/decode-deployment.yaml"])["spec"]["template"]["spec"]["initContainers"]
    res = run("pd-sidecar", ["--check-config", *inits[0]["args"]])
    assert res.returncode == 2 and "--no-such-flag" in res.stderr


@pytest.mark.parametrize(
    "args",
    [
        # llm-d-modelservice's routing proxy (legacy names, klog verbosity from the ms-pd guide).
        ["--port=8000", "--vllm-port=8200", "--connector=nixlv2", "-v=5", "--secure-proxy=false"],
        # Its newer spelling.
        ["--port=8000", "--kv-connector=nixlv2", "--zap-log-level=1", "--secure-proxy=false"],
        # llm-d-router's YAML configuration, inline (flags given beside it win).
        ["--configuration={port: 8000, vllm-port: 8200, kv-connector: nixlv2, secure-proxy: false}"],
    ],
    ids=["legacy", "current", "configuration"],
)
def test_pd_sidecar_accepts_llm_d_modelservice_args(args):
    res = run("pd-sidecar", ["--check-config", *args])
    assert res.returncode == 0, res.stderr
    for line in ["port: 8000,", "decode_port: 8200,", "connector: Nixlv2,", "secure_proxy: false,"]:
        assert line in res.stdout


def test_cuda_ipc_mounts_one_node_folder_in_every_model_container():
    """kvTransfer.cudaIpc: prefill and decode pods on a node share a hostPath folder for the
    agent's descriptor and notification sockets, and the agent is told where it is."""
    objs, _ = objects("cuda-ipc")
    for role in ("decode", "prefill"):
        spec = pod(objs, role)["spec"]
        vols = [v for v in spec["volumes"] if v["name"] == "tandem-kv-ipc"]
        assert vols == [
            {"name": "tandem-kv-ipc", "hostPath": {"path": "/var/run/tandem-kv", "type": "DirectoryOrCreate"}}
        ]
        c = vllm(objs, role)
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["TANDEM_CUDA_IPC_DIR"] == "/var/run/tandem-kv"
        assert env["TANDEM_CUDA_SHARE"] == "fd"
        assert env["TANDEM_KV_BACKEND"] == "auto"
        assert {"name": "tandem-kv-ipc", "mountPath": "/var/run/tandem-kv"} in c["volumeMounts"]
    # Off by default: nothing of it rendered.
    objs, _ = objects("defaults")
    for role in ("decode", "prefill"):
        spec = pod(objs, role)["spec"]
        assert all(v["name"] != "tandem-kv-ipc" for v in spec.get("volumes", []))
        names = {e["name"] for e in vllm(objs, role)["env"]}
        assert not any(n.startswith("TANDEM_") for n in names)


def test_cuda_ipc_values_are_checked_by_the_schema():
    with pytest.raises(Exception, match="share"):
        render({"kvTransfer": {"cudaIpc": {"enabled": True, "share": "shm"}}})
    with pytest.raises(Exception, match="hostPath"):
        render({"kvTransfer": {"cudaIpc": {"enabled": True, "hostPath": "relative/dir"}}})


def rbac(objs):
    return {k: v for k, v in objs.items() if k[0] in ("ServiceAccount", "Role", "RoleBinding")}


def test_ssrf_protection_is_on_by_default_for_the_prefill_pods():
    """pd-sidecar only sends prefill requests to the prefill Deployment's ready pods: it watches
    them with the prefill pods' own labels, on the port they serve, under a ServiceAccount that may
    read pods and nothing else."""
    objs, _ = objects("defaults")
    c = proxy(objs)
    args = c["args"]
    assert flag_value(args, "--enable-ssrf-protection") == "true"
    selector = dict(kv.split("=", 1) for kv in flag_value(args, "--prefill-pod-selector").split(","))
    prefill_labels = pod(objs, "prefill")["metadata"]["labels"]
    decode_labels = pod(objs, "decode")["metadata"]["labels"]
    assert all(prefill_labels.get(k) == v for k, v in selector.items()), (selector, prefill_labels)
    assert not all(decode_labels.get(k) == v for k, v in selector.items())
    assert flag_value(args, "--prefill-pod-ports") == str(DEFAULTS["routing"]["servicePort"])
    assert container_env(c)["INFERENCE_POOL_NAMESPACE"] == NAMESPACE
    assert pod(objs, "decode")["spec"]["serviceAccountName"] == f"{FULL}-decode"
    assert "serviceAccountName" not in pod(objs, "prefill")["spec"]
    r = rbac(objs)
    role = r[("Role", f"{FULL}-decode-prefill-reader")]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = r[("RoleBinding", f"{FULL}-decode-prefill-reader")]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{FULL}-decode", "namespace": NAMESPACE}]
    assert ("ServiceAccount", f"{FULL}-decode") in r


def test_ssrf_protection_from_an_inference_pool():
    objs, _ = objects("ssrf-pool")
    args = proxy(objs)["args"]
    assert flag_value(args, "--inference-pool") == "qwen-prefill"
    assert flag_value(args, "--pool-group") == "inference.networking.x-k8s.io"
    assert count_flag(args, "--prefill-pod-selector") == 0
    assert flag_value(args, "--prefill-allowlist") == "10.20.0.0/16:8000-8001,prefill.example:8000"
    rules = rbac(objs)[("Role", f"{FULL}-decode-prefill-reader")]["rules"]
    assert {"apiGroups": ["inference.networking.x-k8s.io"], "resources": ["inferencepools"],
            "verbs": ["get", "list", "watch"]} in rules


def test_ssrf_protection_off_and_misconfigured():
    out = render({"routing": {"proxy": {"ssrfProtection": {"enabled": False}}}})
    assert "decode-rbac" not in "".join(p for p, t in out.items() if t.strip())
    d = yaml.safe_load(out["tandem/templates/decode-deployment.yaml"])["spec"]["template"]["spec"]
    assert count_flag(d["initContainers"][0]["args"], "--enable-ssrf-protection") == 0
    assert "serviceAccountName" not in d
    # No prefill pods here and nothing named: refuse to render rather than allow everything.
    with pytest.raises(Exception, match="ssrfProtection"):
        render({"prefill": {"create": False}})
    out = render({"prefill": {"create": False}, "routing": {"proxy": {"ssrfProtection": {"allowlist": ["10.0.0.0/8:8000"]}}}})
    d = yaml.safe_load(out["tandem/templates/decode-deployment.yaml"])["spec"]["template"]["spec"]
    args = d["initContainers"][0]["args"]
    assert flag_value(args, "--prefill-allowlist") == "10.0.0.0/8:8000"
    assert "serviceAccountName" not in d
    with pytest.raises(Exception, match="poolGroup"):
        render({"routing": {"proxy": {"ssrfProtection": {"poolGroup": "example.com"}}}})


def test_one_image_value_names_the_sidecar_and_the_router():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    objs, _ = objects("defaults")
    want = f"tandem:{chart['appVersion']}"
    assert proxy(objs)["image"] == want
    assert objs[("Deployment", f"{FULL}-router")]["spec"]["template"]["spec"]["containers"][0]["image"] == want
    out = render({"image": {"repository": "ghcr.io/me/tandem", "tag": "9.9"}})
    dec = yaml.safe_load(out["tandem/templates/decode-deployment.yaml"])
    rou = yaml.safe_load(out["tandem/templates/router-deployment.yaml"])
    assert dec["spec"]["template"]["spec"]["initContainers"][0]["image"] == "ghcr.io/me/tandem:9.9"
    assert rou["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/me/tandem:9.9"
    # llm-d's key still wins for the sidecar.
    out = render({"routing": {"proxy": {"image": "ghcr.io/llm-d/llm-d-routing-sidecar:v0.3"}}})
    dec = yaml.safe_load(out["tandem/templates/decode-deployment.yaml"])
    assert dec["spec"]["template"]["spec"]["initContainers"][0]["image"] == "ghcr.io/llm-d/llm-d-routing-sidecar:v0.3"


def test_kv_roles_follow_the_values():
    out = render({"kvTransfer": {"roles": {"prefill": "kv_both", "decode": "kv_both"}}})
    for role in ("prefill", "decode"):
        d = yaml.safe_load(out[f"tandem/templates/{role}-deployment.yaml"])
        args = d["spec"]["template"]["spec"]["containers"][0]["args"]
        assert json.loads(flag_value(args, "--kv-transfer-config"))["kv_role"] == "kv_both"
    out = render({"kvTransfer": {"config": '{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cuda"}'}})
    d = yaml.safe_load(out["tandem/templates/prefill-deployment.yaml"])
    kv = json.loads(flag_value(d["spec"]["template"]["spec"]["containers"][0]["args"], "--kv-transfer-config"))
    assert kv == {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cuda"}
    with pytest.raises(Exception, match="not a JSON object"):
        render({"kvTransfer": {"config": "NixlConnector"}})


def test_tracing_turns_on_both_binaries_with_the_collector_and_sampler():
    objs, _ = objects("defaults")
    assert "--tracing=true" not in proxy(objs)["args"]
    out = render({"tracing": {"enabled": True, "otlpEndpoint": "http://otel.obs:4317", "samplerArg": "1"}})
    dec = yaml.safe_load(out["tandem/templates/decode-deployment.yaml"])
    rou = yaml.safe_load(out["tandem/templates/router-deployment.yaml"])
    side = dec["spec"]["template"]["spec"]["initContainers"][0]
    router = rou["spec"]["template"]["spec"]["containers"][0]
    for c in (side, router):
        assert "--tracing=true" in c["args"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel.obs:4317"
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "1"
    with pytest.raises(Exception, match="sampler"):
        render({"tracing": {"enabled": True, "sampler": "sometimes"}})


def test_the_tandem_connector_value_switches_vllm_to_tandem_kv():
    out = render({"kvTransfer": {"connector": "tandem", "tandemPort": 5800}})
    for role in ("prefill", "decode"):
        d = yaml.safe_load(out[f"tandem/templates/{role}-deployment.yaml"])
        c = d["spec"]["template"]["spec"]["containers"][0]
        kv = json.loads(flag_value(c["args"], "--kv-transfer-config"))
        assert kv["kv_connector"] == "TandemConnector"
        assert kv["kv_connector_module_path"] == "tandem_kv.vllm"
        assert kv["kv_load_failure_policy"] == "recompute", "a failed pull is recomputed, not an error"
        assert kv["kv_role"] == {"prefill": "kv_producer", "decode": "kv_consumer"}[role]
        env = {e["name"]: e for e in c["env"]}
        assert env["TANDEM_KV_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["TANDEM_KV_PORT"]["value"] == "5800"
        assert {"name": "tandem-kv", "containerPort": 5800, "protocol": "TCP"} in c["ports"]
    # The default stays vLLM's NixlConnector, and an explicit config wins over the connector.
    objs = render({})
    d = yaml.safe_load(objs["tandem/templates/prefill-deployment.yaml"])
    c = d["spec"]["template"]["spec"]["containers"][0]
    assert json.loads(flag_value(c["args"], "--kv-transfer-config"))["kv_connector"] == "NixlConnector"
    assert "TANDEM_KV_PORT" not in {e["name"] for e in c["env"]}
    with pytest.raises(Exception, match="connector"):
        render({"kvTransfer": {"connector": "mooncake"}})
