#!/usr/bin/env bash
# Does another process's recent GPU work delay a small pull? With real vLLM the prefill engine
# (its own process, so its own CUDA context) computes the prompt a millisecond or two before the
# decode engine pulls it, and in the vLLM hw-test a 98 KB pull's copies (6 us of GPU time) landed
# 90-120 us after their submission, against 13-17 us in kvbench after idling. This measures a
# small pull (the tiny model's shape, as submit-profile.sh) after idling, without and with a
# third process that runs a short kernel every 2 ms on the same GPU, then the same under CUDA MPS
# (one shared GPU context for all processes) when the host has it.
# CS_COPY (default "auto"): the copy methods to compare, e.g. "kernel memcpy" (does a copy on the
# copy engines wait for the compute engine's context switch as a kernel does?); CS_TOKENS (default
# "96"): the pull sizes in tokens; CS_MPS=0 skips the MPS half.
# Runs on the GPU host from the repository root with hw-tests/bundle/kvbench.xz carried
# (scripts/hw-test pack-kvbench).
set -uo pipefail
HW=/tmp/tandem-hw
rm -rf "$HW"; mkdir -p "$HW/bin"
xz -dc hw-tests/bundle/kvbench.xz > "$HW/bin/kvbench"; chmod +x "$HW/bin/kvbench"
K=$HW/bin/kvbench
L=(--model "layers=2,kv_heads=2,head_dim=64,dtype=bf16" --regions fused --kv-format hnd --num-blocks 1024 --mem gpu:0 --region-alloc separate)
noise_pid=
noise() {
  timeout 120 python3 -c '
import time, torch
x = torch.ones(1 << 20, device="cuda")
print("noise: running", flush=True)
while True:
    x.mul_(1.0001)
    torch.cuda.synchronize()
    time.sleep(0.002)
' > /tmp/noise.log 2>&1 &
  noise_pid=$!
  for _ in $(seq 1 300); do grep -q "noise: running" /tmp/noise.log 2>/dev/null && return 0; sleep 0.1; done
  echo "noise process did not start:"; cat /tmp/noise.log; return 1
}
measure() { # $1: label
  timeout 60 "$K" serve --listen 127.0.0.1:7731 "${L[@]}" --backend cuda-ipc > /tmp/serve.log 2>&1 &
  local pid=$!
  for _ in $(seq 1 200); do grep -q "kvbench serve:" /tmp/serve.log 2>/dev/null && break; sleep 0.1; done
  grep -q "kvbench serve:" /tmp/serve.log || { echo "serve did not start:"; cat /tmp/serve.log; kill $pid; return; }
  for with_noise in 0 1; do
    [ $with_noise = 1 ] && { noise || { kill $pid; return; }; }
    for copy in ${CS_COPY:-auto}; do
      for tokens in ${CS_TOKENS:-96}; do
        local run=(run --peer 127.0.0.1:7731 "${L[@]}" --backend cuda-ipc --copy "$copy" --op read
          --tokens "$tokens" --plan coalesced --placement contiguous --gap-ms 200 --warmup 2 --png none)
        echo "-- $1, noise $with_noise, copy $copy: p50/p99 of a $tokens-token pull after 200 ms idle (device timing off)"
        TANDEM_KV_DEVICE_TIMING=0 timeout 60 "$K" "${run[@]}" --reps 12 2>&1 | grep -E "^cuda-ipc" | tail -1
        echo "-- $1, noise $with_noise, copy $copy: profile (when the copies landed after their submission)"
        TANDEM_KV_PROFILE=1 timeout 60 "$K" "${run[@]}" --reps 8 2>&1 \
          | grep -E "^cuda-ipc|done at query|transfer profile" | tail -12
      done
    done
    [ -n "$noise_pid" ] && { kill $noise_pid 2>/dev/null; wait $noise_pid 2>/dev/null; noise_pid=; }
  done
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
}
measure "time-sliced contexts"
if [ "${CS_MPS:-1}" = 0 ]; then
  echo "CS_MPS=0: MPS not measured"
elif command -v nvidia-cuda-mps-control > /dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    measure "CUDA MPS"
    echo quit | nvidia-cuda-mps-control
    tail -5 "$CUDA_MPS_LOG_DIRECTORY"/control.log 2>/dev/null
  else
    echo "nvidia-cuda-mps-control -d failed"
  fi
else
  echo "no nvidia-cuda-mps-control on this host: MPS not measured"
fi
