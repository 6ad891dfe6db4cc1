"""The Grafana dashboard the chart ships (charts/tandem/dashboards/tandem.json): rendered as a
ConfigMap with Grafana's sidecar label, valid dashboard JSON, and every metric its queries name is
one our running binaries export (read from their /metrics) or one vLLM exports (read from
engine-sim, which speaks vLLM's names, plus the NixlConnector's metrics as vLLM 0.26 documents
them)."""

import json
import re
import urllib.request

import helm_python as helm
import pytest
import yaml

from conftest import ROOT, Proc, Sim, free_port, wait_ready

CHART = ROOT / "charts" / "tandem"
DASHBOARD = json.loads((CHART / "dashboards" / "tandem.json").read_text())
# vLLM's NixlConnector metrics (vLLM 0.26 docs), which engine-sim does not simulate.
VLLM_NIXL = {
    "vllm:nixl_xfer_time_seconds",
    "vllm:nixl_post_time_seconds",
    "vllm:nixl_bytes_transferred",
    "vllm:nixl_num_descriptors",
    "vllm:nixl_num_failed_transfers",
    "vllm:nixl_num_failed_notifications",
    "vllm:nixl_num_kv_expired_reqs",
}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "rate", "increase", "histogram_quantile", "by", "without", "on",
    "ignoring", "group_left", "group_right", "and", "or", "unless", "count", "irate", "offset",
}


def render(values=None):
    with helm.Chart.load(CHART) as chart:
        return chart.render(values=values, name="tandem", namespace="llm")


def exported(text):
    """Sample names a Prometheus text exposition can hold, from its TYPE lines."""
    names = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\w+)", line)
        if not m:
            continue
        name, kind = m.groups()
        base = name.removesuffix("_total")
        names.add(name)
        if kind == "counter":
            names |= {base, base + "_total"}
        elif kind == "histogram":
            names |= {name + "_bucket", name + "_sum", name + "_count"}
    return names


def scrape(url):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


@pytest.fixture(scope="module")
def metric_names():
    sim = Sim([])
    names = exported(scrape(sim.url + "/metrics"))
    sim.proc.stop()
    for name, args in [
        ("pd-sidecar", ["--secure-proxy=false", f"--model-server-port={free_port()}"]),
        ("pd-router", [f"--decode=http://127.0.0.1:{free_port()}"]),
    ]:
        port, mport = free_port(), free_port()
        p = Proc(name, [f"--port={port}", f"--metrics-port={mport}", *args])
        try:
            wait_ready(f"http://127.0.0.1:{mport}/metrics")
            names |= exported(scrape(f"http://127.0.0.1:{mport}/metrics"))
        finally:
            p.stop()
    for n in VLLM_NIXL:
        names |= {n, n + "_bucket", n + "_sum", n + "_count", n + "_total"}
    return names


def queried_metrics(expr):
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, or
    label names in by (...) / {...}."""
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r'"[^"]*"', " ", expr)
    tokens = re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
    return {t for t in tokens if t not in PROMQL_WORDS}


def test_the_dashboard_is_a_configmap_grafana_loads():
    out = render()
    cm = yaml.safe_load(out["tandem/templates/grafana-dashboard.yaml"])
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["tandem.json"]) == DASHBOARD
    off = render({"grafanaDashboard": {"enabled": False}})
    assert not out_has(off, "grafana-dashboard")
    custom = render({"grafanaDashboard": {"label": "dashboards", "labelValue": "llm", "namespace": "monitoring",
                                          "annotations": {"grafana_folder": "LLM"}}})
    cm = yaml.safe_load(custom["tandem/templates/grafana-dashboard.yaml"])
    assert cm["metadata"]["labels"]["dashboards"] == "llm"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}


def out_has(out, name):
    return any(name in path and text.strip() for path, text in out.items())


def test_dashboard_json_is_well_formed():
    assert DASHBOARD["uid"] and DASHBOARD["title"]
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for p in DASHBOARD["panels"]:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
    titles = " ".join(p["title"] for p in DASHBOARD["panels"]).lower()
    for topic in ["decision", "time to first token", "prefill", "errors", "picks", "circuit", "kv transfer",
                  "queue", "kv-cache usage"]:
        assert topic in titles, topic


def test_every_queried_metric_is_exported(metric_names):
    queried = set()
    for p in DASHBOARD["panels"]:
        for t in p["targets"]:
            queried |= queried_metrics(t["expr"])
    assert any(q.startswith("pd_router_") for q in queried)
    assert any(q.startswith("pd_sidecar_") for q in queried)
    assert any(q.startswith("vllm:") for q in queried)
    missing = sorted(q for q in queried if q not in metric_names)
    assert not missing, missing


def test_the_metric_check_can_fail(metric_names):
    assert queried_metrics("sum by (decision) (rate(pd_sidecar_requests_total{a=\"b\"}[5m]))") == {
        "pd_sidecar_requests_total"
    }
    assert "pd_sidecar_no_such_metric_total" not in metric_names
