"""The tables of a hw-tests/vllm run: per model, prompt length and connector, whether the P/D
answer matched the reference (the prefill engine computing the prompt afresh) and the other
connector's P/D answer, and the KV transfer's bytes, time and GB/s, with the TandemConnector /
NixlConnector ratio. `python3 report.py RESULTS_DIR` prints Markdown."""

import json
import sys
from pathlib import Path

res = Path(sys.argv[1])
rows = {}
for f in sorted(res.glob("*-*.json")):
    if f.name == "precise-routing.json" or f.name.startswith("load-"):
        continue
    model, conn = f.stem.rsplit("-", 1)
    for i, r in enumerate(json.loads(f.read_text())):
        rows.setdefault((model, i), {})[conn] = r

print("| model | prompt tokens | connector | P/D == reference | tandem == nixl (P/D) | external-KV tokens | KV bytes | KV ms | GB/s | backend | plan+submit us | device us |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for (model, i), by in sorted(rows.items()):
    t, n = by.get("tandem"), by.get("nixl")
    cross = "-" if not (t and n) else ("yes" if t["pd_text"] == n["pd_text"] else "NO")
    for conn in ("tandem", "nixl"):
        r = by.get(conn)
        if not r:
            continue
        ms = r["kv_seconds"] * 1e3
        host = f"{(r.get('plan_s', 0) + r.get('submit_s', 0)) * 1e6:.0f}" if conn == "tandem" else "-"
        dev = f"{r['device_s'] * 1e6:.0f}" if r.get("device_s") else "-"
        label = f"{r['prompt_tokens']}{' (warm-up)' if r.get('warmup') else ''}"
        print(f"| {model} | {label} | {conn} | {'yes' if r['same_text'] else 'NO'} | {cross} | "
              f"{int(r['external_kv_tokens'])} | {int(r['kv_bytes']):,} | {ms:.3f} | {r['kv_gbps']} | "
              f"{r['kv_backend']} | {host} | {dev} |")
print()
print("| model | prompt tokens | KV bytes | TandemConnector ms | NixlConnector ms | speed-up |")
print("|---|---|---|---|---|---|")
for (model, i), by in sorted(rows.items()):
    t, n = by.get("tandem"), by.get("nixl")
    if t and n and t["kv_seconds"] and n["kv_seconds"] and not t.get("warmup"):
        print(f"| {model} | {t['prompt_tokens']} | {int(t['kv_bytes']):,} | {t['kv_seconds'] * 1e3:.3f} | "
              f"{n['kv_seconds'] * 1e3:.3f} | {n['kv_seconds'] / t['kv_seconds']:.1f}x |")

load = {}
for f in sorted(res.glob("load-*-*.json")):
    model, conn = f.stem[len("load-"):].rsplit("-", 1)
    for r in json.loads(f.read_text()):
        load.setdefault((model, r["round"]), {})[conn] = r
if load:
    print()
    print("Under load (HWV_LOAD): each round's requests sent at once; KV ms is the mean pull from "
          "vLLM's own histogram (_sum / _count), p50 from TandemConnector's per-pull stats:")
    print()
    print("| model | round | requests at once | prompt tokens (mean) | pulls (tandem, nixl) | "
          "TandemConnector ms (mean, p50) | NixlConnector ms (mean) | speed-up (means) |")
    print("|---|---|---|---|---|---|---|---|")
    for (model, rnd), by in sorted(load.items()):
        t, n = by.get("tandem"), by.get("nixl")
        if not (t and n and t["kv_seconds_mean"] and n["kv_seconds_mean"]):
            continue
        p50 = t.get("kv_seconds_p50")
        print(f"| {model} | {rnd} | {t['concurrency']} | {t['prompt_tokens_mean']:.0f} | "
              f"{t['pulls']:.0f}, {n['pulls']:.0f} | {t['kv_seconds_mean'] * 1e3:.3f}, "
              f"{p50 * 1e3 if p50 else float('nan'):.3f} | {n['kv_seconds_mean'] * 1e3:.3f} | "
              f"{n['kv_seconds_mean'] / t['kv_seconds_mean']:.1f}x |")

precise = res / "precise-routing.json"
if precise.exists():
    doc = json.loads(precise.read_text())
    print()
    print("Precise prefix-cache routing (two engines' KV events into pd-router):")
    print()
    print("| prompt | tokens | computed first on | routed to | right engine |")
    print("|---|---|---|---|---|")
    for r in doc["rows"]:
        print(f"| {r['prompt']} | {r['tokens']} | {r['computed_on']} | {', '.join(r['routed_to'])} | "
              f"{'yes' if r['routed_right'] else 'NO'} |")
