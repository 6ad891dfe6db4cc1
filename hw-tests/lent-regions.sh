#!/usr/bin/env bash
# Where a small pull's time goes with lent, separately allocated regions (vLLM's per-layer
# tensors), measured by kvbench between two processes on one GPU with nothing else running:
# the vLLM hw-test (hw-tests/vllm/) saw ~230-310 us for pulls whose copies took ~8 us.
# Runs on the GPU host from the repository root with the bundle of `scripts/hw-test pack`
# carried (hw-tests/bundle); prints kvbench's tables (plan+post us, elapsed, dev GB/s).
set -uo pipefail
HW=/tmp/tandem-hw
rm -rf "$HW"; xz -dc hw-tests/bundle/tandem-hw.tar.xz | tar -C /tmp -xf -
export TANDEM_NIXL_LIB_DIR=$HW/.nixl_cu13.mesonpy.libs UCX_NET_DEVICES=lo
K=$HW/bin/kvbench
for shape in "layers=2,kv_heads=2,head_dim=64,dtype=bf16" "layers=32,kv_heads=8,head_dim=128,dtype=bf16"; do
  for alloc in separate one; do
    L=(--model "$shape" --regions fused --kv-format hnd --num-blocks 1024 --mem gpu:0 --region-alloc "$alloc")
    "$K" serve --listen 127.0.0.1:7731 "${L[@]}" --backend cuda-ipc > /tmp/serve.log 2>&1 &
    pid=$!
    for i in $(seq 1 100); do grep -q "kvbench serve:" /tmp/serve.log 2>/dev/null && break; sleep 0.1; done
    echo "== $shape, regions: $alloc"
    for t in 96 608 1904 4096; do
      "$K" run --peer 127.0.0.1:7731 "${L[@]}" --backend cuda-ipc --copy auto --op read \
        --tokens $t --plan coalesced,blocks --placement contiguous,fragmented \
        --reps 30 --warmup 3 --png none 2>&1 | grep -E "^cuda-ipc|tokens =|ceiling" | tail -6
    done
    kill $pid; wait $pid 2>/dev/null
  done
done
