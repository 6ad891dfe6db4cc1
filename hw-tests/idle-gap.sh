#!/usr/bin/env bash
# Does a pull that follows idle time cost more than one of a back-to-back series? An engine
# pulls one request's KV now and then; kvbench normally runs them back to back. Same shapes as
# the vLLM hw-test's small pulls (tiny model, 8B-like), separate region allocations as vLLM's
# per-layer tensors, cuda-ipc between two processes on one GPU; --gap-ms 0 vs 200 vs 1000.
# Runs on the GPU host from the repository root with hw-tests/bundle carried (scripts/hw-test pack).
set -uo pipefail
HW=/tmp/tandem-hw
rm -rf "$HW"; xz -dc hw-tests/bundle/tandem-hw.tar.xz | tar -C /tmp -xf -
export TANDEM_NIXL_LIB_DIR=$HW/.nixl_cu13.mesonpy.libs UCX_NET_DEVICES=lo
K=$HW/bin/kvbench
echo "cpus: $(nproc); governor: $(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null || echo n/a); cpu.max: $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo n/a)"
grep -m1 "model name" /proc/cpuinfo
for shape in "layers=2,kv_heads=2,head_dim=64,dtype=bf16" "layers=32,kv_heads=8,head_dim=128,dtype=bf16"; do
  L=(--model "$shape" --regions fused --kv-format hnd --num-blocks 1024 --mem gpu:0 --region-alloc separate)
  "$K" serve --listen 127.0.0.1:7731 "${L[@]}" --backend cuda-ipc > /tmp/serve.log 2>&1 &
  pid=$!
  for i in $(seq 1 100); do grep -q "kvbench serve:" /tmp/serve.log 2>/dev/null && break; sleep 0.1; done
  echo "== $shape, regions: separate"
  for gap in 0 200 1000; do
    for t in 96 608; do
      echo "-- gap ${gap} ms, $t tokens"
      "$K" run --peer 127.0.0.1:7731 "${L[@]}" --backend cuda-ipc --copy auto --op read \
        --tokens $t --plan coalesced --placement contiguous --gap-ms $gap \
        --reps 8 --warmup 2 --png none 2>&1 | grep -E "^cuda-ipc" | tail -2
    done
  done
  kill $pid; wait $pid 2>/dev/null
done
