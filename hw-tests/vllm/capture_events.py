"""Records the KV events real vLLM publishes (--kv-events-config with publisher zmq), raw, for
the decoder's test fixtures: SUB sockets connected to each engine's PUB endpoint, every
multipart message written as one JSON line (endpoint, receive time, frames as base64). On
SIGTERM, asks each engine's replay ROUTER for everything from sequence 0 (a DEALER sends an
empty frame and the 8-byte start) and records those answers too, up to the end marker.

    python3 capture_events.py OUT_JSONL PUB_ENDPOINT=REPLAY_ENDPOINT ...

Uses pyzmq, which vLLM depends on."""

import base64
import json
import signal
import sys
import time

import zmq

out_path, pairs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
ctx = zmq.Context()
subs = {}
for pub, _ in pairs:
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(pub)
    subs[s] = pub
poller = zmq.Poller()
for s in subs:
    poller.register(s, zmq.POLLIN)
stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)


def line(f, kind, endpoint, frames):
    f.write(json.dumps({"kind": kind, "endpoint": endpoint, "t": time.time(),
                        "frames": [base64.b64encode(x).decode() for x in frames]}) + "\n")
    f.flush()


with open(out_path, "w") as f:
    while not stop:
        for s, _ in poller.poll(200):
            line(f, "pub", subs[s], s.recv_multipart())
    for pub, replay in pairs:
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(replay)
        d.send_multipart([b"", (0).to_bytes(8, "big")])
        deadline = time.time() + 5
        while time.time() < deadline:
            if not d.poll(500):
                continue
            frames = d.recv_multipart()
            line(f, "replay", replay, frames)
            if len(frames) >= 3 and frames[2] == (-1).to_bytes(8, "big", signed=True):
                break
        d.close()
