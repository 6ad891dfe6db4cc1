"""The table of a hw-tests/vllm run: per model, prompt length and connector, whether the P/D
answer matched the prefill engine's own, and the KV transfer's bytes, time and GB/s, with the
TandemConnector / NixlConnector ratio. `python3 report.py RESULTS_DIR` prints Markdown."""

import json
import sys
from pathlib import Path

res = Path(sys.argv[1])
rows = {}
for f in sorted(res.glob("*-*.json")):
    model, conn = f.stem.rsplit("-", 1)
    for i, r in enumerate(json.loads(f.read_text())):
        rows.setdefault((model, i), {})[conn] = r

print("| model | prompt tokens | connector | same greedy text | external-KV tokens | KV bytes | KV ms | GB/s | backend |")
print("|---|---|---|---|---|---|---|---|---|")
for (model, i), by in sorted(rows.items()):
    for conn in ("tandem", "nixl"):
        r = by.get(conn)
        if not r:
            continue
        ms = r["kv_seconds"] * 1e3
        print(f"| {model} | {r['prompt_tokens']} | {conn} | {'yes' if r['same_text'] else 'NO'} | "
              f"{int(r['external_kv_tokens'])} | {int(r['kv_bytes']):,} | {ms:.3f} | {r['kv_gbps']} | {r['kv_backend']} |")
print()
print("| model | prompt tokens | TandemConnector GB/s | NixlConnector GB/s | ratio |")
print("|---|---|---|---|---|")
for (model, i), by in sorted(rows.items()):
    t, n = by.get("tandem"), by.get("nixl")
    if t and n and t.get("kv_gbps") and n.get("kv_gbps"):
        print(f"| {model} | {t['prompt_tokens']} | {t['kv_gbps']} | {n['kv_gbps']} | {t['kv_gbps'] / n['kv_gbps']:.1f}x |")
