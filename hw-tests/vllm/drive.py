"""Drives one P/D setup (two vLLM engines, pd-sidecar, pd-router, all started by run.sh) and
writes what it saw as JSON: per prompt, the P/D answer through the router, the reference
answer, whether they are identical, and the KV transfer (TandemConnector: its per-pull stats
file; NixlConnector: vLLM's vllm:nixl_* metrics, read before and after each request).

    python3 drive.py CONNECTOR MODEL_DIR OUT_JSON LENGTHS...

The reference is the prefill engine computing the prompt from scratch: the request carries a
`cache_salt` no other request used, so none of the prompt's blocks (not the ones its prefill
leg left in its cache) are reused. The prompts depend on the model and the lengths only, so both
connectors get the same ones (report.py compares their P/D answers too), and none was seen by
the decode engine before. One warm-up request first (the first pull includes the handshake and
opening the peer's memory); it is recorded apart."""

import json
import os
import random
import sys
import time
import urllib.request

connector, model_dir, out_json = sys.argv[1], sys.argv[2], sys.argv[3]
lengths = [int(x) for x in sys.argv[4:]]
STATS = os.environ.get("TANDEM_KV_STATS_FILE", "/tmp/pd/tandem-stats.jsonl")


def post(url, body, headers=None, timeout=300):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    t = time.monotonic()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        doc = json.loads(r.read())
    return doc, time.monotonic() - t


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("vllm:") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            key = name.split("{")[0]
            if "external_kv_transfer" in name:
                key += "{external_kv_transfer}"
            try:
                out[key] = out.get(key, 0.0) + float(value)
            except ValueError:
                pass
    return out


def stats_lines():
    try:
        with open(STATS) as f:
            return [json.loads(l) for l in f if l.strip()]
    except FileNotFoundError:
        return []


ROUTER = "http://127.0.0.1:8080/v1/completions"
words = open(os.path.join(model_dir, "prompt.txt")).read().split()
rng = random.Random(7)


def body_of(head, n):
    """A greedy request: `head` (unique), then words until the prompt has about n tokens (the
    tokenizer is BPE on these words: ~2.3 tokens per word)."""
    prompt = " ".join([head] + [rng.choice(words) for _ in range(max(1, int(n / 2.3)))])
    return {"model": "m", "prompt": prompt, "max_tokens": 24, "temperature": 0}


def diff_metrics(before, after):
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


rows = []
for i, n in enumerate([48] + lengths):
    body = body_of(f"prompt {i} {rng.random():.12f}", n)
    before, seen = metrics(8200), len(stats_lines())
    pd, pd_s = post(ROUTER, body, {"x-request-id": f"hw-{connector}-{i}"})
    time.sleep(0.5)  # let the decode engine's counters and the stats file catch up
    after, pulls = metrics(8200), stats_lines()[seen:]
    ref, _ = post("http://127.0.0.1:8100/v1/completions", dict(body, cache_salt=f"reference-{i}"))
    delta = diff_metrics(before, after)
    row = {
        "connector": connector,
        "warmup": i == 0,
        "prompt_tokens": pd["usage"]["prompt_tokens"],
        "same_text": pd["choices"][0]["text"] == ref["choices"][0]["text"],
        "pd_text": pd["choices"][0]["text"],
        "ref_text": ref["choices"][0]["text"],
        "pd_seconds": round(pd_s, 4),
        "external_kv_tokens": delta.get("vllm:prompt_tokens_by_source_total{external_kv_transfer}", 0.0),
    }
    if connector == "tandem":
        row["kv_bytes"] = sum(p["bytes"] for p in pulls)
        row["kv_seconds"] = sum(p["seconds"] for p in pulls)
        row["kv_backend"] = ",".join(sorted({p["backend"] for p in pulls}))
        row["kv_descriptors"] = sum(p["descriptors"] for p in pulls)
        for k in ("plan_s", "submit_s", "device_s"):
            row[k] = sum(p.get(k) or 0.0 for p in pulls)
        # The same pulls through vLLM's KV-connector stats, as NixlConnector's are reported.
        row["kv_seconds_vllm_metric"] = delta.get("vllm:tandem_kv_xfer_time_seconds_sum", 0.0)
    else:
        row["kv_bytes"] = delta.get("vllm:nixl_bytes_transferred_sum", 0.0)
        row["kv_seconds"] = delta.get("vllm:nixl_xfer_time_seconds_sum", 0.0)
        row["kv_backend"] = "nixl (UCX)"
        row["kv_descriptors"] = delta.get("vllm:nixl_num_descriptors_sum", 0.0)
    row["kv_gbps"] = round(row["kv_bytes"] / row["kv_seconds"] / 1e9, 3) if row["kv_seconds"] else None
    print(json.dumps(row), flush=True)
    rows.append(row)
json.dump(rows, open(out_json, "w"), indent=1)

# HWV_LOAD="CONCURRENCY:TOKENS:ROUNDS": then rounds of CONCURRENCY new prompts of about TOKENS
# tokens sent at once, so pulls land in a busy engine. Each round's KV time is the mean over its
# pulls from vLLM's own histogram for both connectors (vllm:<connector>_xfer_time_seconds
# _sum / _count), plus the median of TandemConnector's per-pull stats.
LOAD = os.environ.get("HWV_LOAD", "")
if LOAD:
    from concurrent.futures import ThreadPoolExecutor
    from statistics import median

    conc, tokens, rounds = (int(x) for x in LOAD.split(":"))
    key = "vllm:tandem_kv" if connector == "tandem" else "vllm:nixl"
    load = []
    for r in range(rounds):
        bodies = [(body_of(f"load {r} {j} {rng.random():.12f}", tokens),
                   {"x-request-id": f"hw-{connector}-load-{r}-{j}"}) for j in range(conc)]
        before, seen = metrics(8200), len(stats_lines())
        with ThreadPoolExecutor(conc) as ex:
            outs = list(ex.map(lambda b: post(ROUTER, *b), bodies))
        time.sleep(0.5)  # as above: counters and stats file catch up
        after, pulls = metrics(8200), stats_lines()[seen:]
        d = diff_metrics(before, after)
        n = d.get(f"{key}_xfer_time_seconds_count", 0.0)
        row = {
            "connector": connector,
            "round": r,
            "concurrency": conc,
            "prompt_tokens_mean": sum(o["usage"]["prompt_tokens"] for o, _ in outs) / conc,
            "pd_seconds_mean": round(sum(t for _, t in outs) / conc, 4),
            "external_kv_tokens": d.get("vllm:prompt_tokens_by_source_total{external_kv_transfer}", 0.0),
            "pulls": n,
            "kv_bytes": d.get(f"{key}_bytes_transferred_sum", 0.0),
            "kv_seconds_mean": d.get(f"{key}_xfer_time_seconds_sum", 0.0) / n if n else None,
        }
        if connector == "tandem" and pulls:
            row["kv_seconds_p50"] = median(p["seconds"] for p in pulls)
        print(json.dumps(row), flush=True)
        load.append(row)
    out = os.path.join(os.path.dirname(out_json), "load-" + os.path.basename(out_json))
    json.dump(load, open(out, "w"), indent=1)
