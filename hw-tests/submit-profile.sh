#!/usr/bin/env bash
# Where an isolated small pull's host time goes, call by call: kvbench with TANDEM_KV_PROFILE=1
# prints each submission's driver-call times and how many event queries it took to see the copy
# land, back to back (--gap-ms 0) and after idling (--gap-ms 200), for the vLLM hw-test's tiny
# model (separate region allocations, cuda-ipc, two processes on one GPU).
# Runs on the GPU host from the repository root with hw-tests/bundle carried: the whole bundle
# (scripts/hw-test pack) or kvbench alone (scripts/hw-test pack-kvbench, hw-tests/bundle/kvbench.xz).
set -uo pipefail
HW=/tmp/tandem-hw
rm -rf "$HW"; mkdir -p "$HW/bin"
if [ -f hw-tests/bundle/kvbench.xz ]; then
  xz -dc hw-tests/bundle/kvbench.xz > "$HW/bin/kvbench"; chmod +x "$HW/bin/kvbench"
else
  xz -dc hw-tests/bundle/tandem-hw.tar.xz | tar -C /tmp -xf -
fi
K=$HW/bin/kvbench
L=(--model "layers=2,kv_heads=2,head_dim=64,dtype=bf16" --regions fused --kv-format hnd --num-blocks 1024 --mem gpu:0 --region-alloc separate)
"$K" serve --listen 127.0.0.1:7731 "${L[@]}" --backend cuda-ipc > /tmp/serve.log 2>&1 &
pid=$!
for i in $(seq 1 100); do grep -q "kvbench serve:" /tmp/serve.log 2>/dev/null && break; sleep 0.1; done
# A pull's whole time (kvbench p50) with each change against its absence, back to back and after
# idling: the item list read in place or uploaded (TANDEM_KV_DIRECT_ITEMS_BYTES), GPU timing
# events on or off (TANDEM_KV_DEVICE_TIMING; libtandem_kv runs with them off).
for gap in 0 200; do
  for cfg in "4096 1" "0 1" "4096 0" "0 0"; do
    set -- $cfg
    echo "-- gap ${gap} ms, 96 tokens, TANDEM_KV_DIRECT_ITEMS_BYTES=$1 TANDEM_KV_DEVICE_TIMING=$2"
    TANDEM_KV_DIRECT_ITEMS_BYTES=$1 TANDEM_KV_DEVICE_TIMING=$2 "$K" run --peer 127.0.0.1:7731 "${L[@]}" \
      --backend cuda-ipc --copy auto --op read --tokens 96 --plan coalesced --placement contiguous \
      --gap-ms $gap --reps 12 --warmup 2 --png none 2>&1 | grep -E "^cuda-ipc" | tail -2
  done
done
# Where the time goes, call by call (TANDEM_KV_PROFILE=1 times on the GPU too).
for direct in 4096 0; do
  echo "-- profile: gap 200 ms, 96 tokens, TANDEM_KV_DIRECT_ITEMS_BYTES=$direct"
  TANDEM_KV_DIRECT_ITEMS_BYTES=$direct TANDEM_KV_PROFILE=1 "$K" run --peer 127.0.0.1:7731 "${L[@]}" \
    --backend cuda-ipc --copy auto --op read --tokens 96 --plan coalesced --placement contiguous \
    --gap-ms 200 --reps 6 --warmup 2 --png none 2>&1 | grep -E "^cuda-ipc|submit profile" | tail -30
done
kill $pid; wait $pid 2>/dev/null
