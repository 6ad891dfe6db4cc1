"""Precise prefix-cache routing with real vLLM: two engines (tiny model, no P/D) publish their KV
events to pd-router's bound ZMQ socket (llm-d's centralized mode, topic kv@<ip>:<port>@m), and
pd-router (precise-prefix-cache-scorer) routes each prompt to the engine whose events say it holds
the prompt. Each prompt is first computed directly on one engine (the router never routed it), then
sent through the router; which engine served it is read from the engines' request counters.
Prompts are token-id lists, so the router's blocks are the engine's without a tokenizer.

    python3 precise.py OUT_JSON ROUTER_URL ROUTER_METRICS_URL ENGINE_URL...

Writes per prompt: the engine that computed it first, the engine the router picked, and the
router's index size for each engine at that point."""

import json
import sys
import time
import urllib.request

out, router, router_metrics, engines = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, r.read()


def scrape(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def sample(text, prefix):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


def served(e):
    return sample(scrape(e + "/metrics"), "vllm:request_success_total")


def addr(e):
    return e.split("://", 1)[1]


def wait(what, cond, deadline_s=60):
    end = time.time() + deadline_s
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.1)
    print(f"timed out waiting for {what}", flush=True)
    return False


# A PUB socket drops what it sends before its subscriber is connected: reset each engine's
# (empty) prefix cache until the router has counted its AllBlocksCleared.
for e in engines:
    series = f'pd_router_kv_events_total{{endpoint="{addr(e)}",type="AllBlocksCleared"}}'

    def seen():
        try:
            post(e + "/reset_prefix_cache", {})
        except Exception as ex:  # noqa: BLE001 - reported and retried
            print(f"reset {e}: {ex}", flush=True)
        return sample(scrape(router_metrics), series) >= 1

    wait(f"{e}'s events at the router", seen)

rows = []
for i, holder in enumerate([1, 0, 1, 0]):
    e = engines[holder]
    prompt = [1000 * (i + 1) + k for k in range(4 * 16 + 5)]
    body = {"model": "m", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    post(e + "/v1/completions", body)
    series = f'pd_router_kv_index_blocks{{endpoint="{addr(e)}"}}'
    held = 4 * (i // 2 + 1)
    ok = wait(f"{held} blocks of {e} in the index", lambda: sample(scrape(router_metrics), series) >= held)
    before = [served(x) for x in engines]
    post(router + "/v1/completions", body)
    after = [served(x) for x in engines]
    picked = [k for k in range(len(engines)) if after[k] > before[k]]
    index = {addr(x): sample(scrape(router_metrics), f'pd_router_kv_index_blocks{{endpoint="{addr(x)}"}}')
             for x in engines}
    row = {"prompt": i, "tokens": len(prompt), "computed_on": addr(e), "index_ready": ok,
           "routed_to": [addr(engines[k]) for k in picked], "routed_right": picked == [holder],
           "index_blocks": index}
    print(json.dumps(row), flush=True)
    rows.append(row)
json.dump({"rows": rows, "router_kv_metrics": [l for l in scrape(router_metrics).splitlines()
                                                 if "_kv_" in l and not l.startswith("#")]},
          open(out, "w"), indent=1)
