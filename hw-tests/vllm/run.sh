#!/usr/bin/env bash
# Real vLLM 0.26.0 with TandemConnector, then with vLLM's NixlConnector, on one GPU host:
# prefill engine :8100 and decode engine :8200 (two processes on the GPU), pd-sidecar :8000 in
# front of the decode engine, pd-router :8080 in front of the sidecar naming the prefill engine
# for every request. For each model and each connector, drive.py sends new prompts of several
# lengths through the router and compares the greedy answers with the prefill engine computing
# the same prompt itself, and records each request's KV transfer.
#
# Runs on the GPU machine from the repository root, after the recipe's (../shared/vllm-gpu) first
# calls parked the first chunks in /tmp/pd (`bash .gpu-vllm/1/probe.sh stage1`, then `park` for
# the middle ones), carrying the last .gpu-vllm folder and hw-tests/bundle/vllm (scripts/hw-test-vllm
# pack makes both). Results: $OUT (the device tool's
# output folder) and HWV_OUT (default hw-tests/results/<date>-<gpu>/vllm/).
set -uo pipefail
REPO=$PWD
PD=/tmp/pd
OUT=${OUT:-/tmp/hwv-out}; mkdir -p "$OUT"
LIMIT=${HWV_TIME_LIMIT:-560}
MODELS=${HWV_MODELS:-"tiny large"}
CONNECTORS=${HWV_CONNECTORS:-"tandem nixl"}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(el)s] $*" | tee -a "$OUT/run.txt"; }
fatal() { say "FATAL: $*"; exit 1; }
save_logs() { local f; for f in "$PD"/hwv-*.log; do [ -f "$f" ] && tail -c 8000000 "$f" > "$OUT/${f##*/}"; done; }
trap save_logs EXIT

# --- the vLLM bundle: chunk 1 parked by stage1, chunk 2 carried now (the recipe's format) ---
CHUNK=$(ls -d .gpu-vllm/*/ | sort | tail -1)
[ -f "$PD/bundle.id" ] || fatal "no chunk 1 in $PD: run 'bash .gpu-vllm/1/probe.sh stage1' first (carrying .gpu-vllm/1), then this at once"
cmp -s "$CHUNK/bundle.id" "$PD/bundle.id" || fatal "chunk 1 in $PD comes from another prep: redo stage1"
cp -f "$CHUNK"/part.* "$CHUNK/bin.tar.xz" "$PD"/ 2>/dev/null
read -r SITE_SHA BIN_SHA < "$PD/bundle.id"; N=$(cat "$PD/bundle.parts")
if [ "$(cat "$PD/site.unpacked" 2>/dev/null)" != "$SITE_SHA" ]; then
  for i in $(seq 0 $((N - 1))); do [ -f "$PD/part.$i" ] || fatal "chunk part.$i missing: redo stage1 and this call"; done
  [ "$(for i in $(seq 0 $((N - 1))); do cat "$PD/part.$i"; done | sha256sum | cut -c1-64)" = "$SITE_SHA" ] || fatal "chunks do not match bundle.id"
  rm -rf "$PD/site"; for i in $(seq 0 $((N - 1))); do cat "$PD/part.$i"; done | xz -dc -T0 | tar -xf - -C "$PD" || fatal "unpack failed"
  echo "$SITE_SHA" > "$PD/site.unpacked"
fi
rm -rf "$PD/bin"; xz -dc "$PD/bin.tar.xz" | tar -xf - -C "$PD" || fatal "unpack of the binaries failed"
B=$REPO/hw-tests/bundle/vllm
[ -f "$B/libtandem_kv.so.xz" ] || fatal "hw-tests/bundle/vllm/libtandem_kv.so.xz missing: scripts/hw-test-vllm pack, and carry hw-tests/bundle/vllm"
xz -dc "$B/libtandem_kv.so.xz" > "$PD/libtandem_kv.so" || fatal "unpacking libtandem_kv.so failed"
say "bundle unpacked: $(du -sh "$PD/site" | cut -f1); revision $(cat "$B/REVISION" 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee -a "$OUT/run.txt"

export PYTHONPATH=$REPO/python:$PD/site PYTHONUNBUFFERED=1
export TANDEM_KV_LIB=$PD/libtandem_kv.so TANDEM_KV_STATS_FILE=$PD/tandem-stats.jsonl
# HWV_PROFILE=1: each pull's driver-call times in the decode engine's log (TANDEM_KV_PROFILE).
[ "${HWV_PROFILE:-0}" = 1 ] && export TANDEM_KV_PROFILE=1
# The agent's NIXL (backend auto: cuda-ipc on this host, NIXL for other hosts) from vLLM's bundle.
[ -d "$PD/site/.nixl_cu13.mesonpy.libs" ] && export TANDEM_NIXL_LIB_DIR=$PD/site/.nixl_cu13.mesonpy.libs
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export VLLM_HOST_IP=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 TANDEM_KV_HOST=127.0.0.1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_USE_FLASHINFER_SAMPLER=0 TVM_FFI_DISABLE_TORCH_C_DLPACK=1 VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-INFO}
export UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}

# --- models: the recipe's tiny one, and one with an 8B-like KV cache (32 layers x 8 x 128) ---
[ -f /tmp/tiny/model.safetensors ] || python3 "$PD/tiny_model.py" /tmp/tiny | tail -1 | tee -a "$OUT/run.txt"
[ -f /tmp/large/model.safetensors ] || python3 "$REPO/hw-tests/vllm/model.py" /tmp/large 32 8 128 | tail -1 | tee -a "$OUT/run.txt"

stop() { local n; for n in "$@"; do [ -f "$PD/hwv-$n.pid" ] && { kill -- -"$(cat "$PD/hwv-$n.pid")" 2>/dev/null; rm -f "$PD/hwv-$n.pid"; }; done; }
start() { # name port side kv model maxlen events-port
  local name=$1 port=$2 side=$3 kv=$4 model=$5 maxlen=$6 ev=$7
  # vLLM's KV events (ZMQ PUB + replay ROUTER), recorded by capture_events.py for the decoder's fixtures.
  local events="{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://*:$ev\",\"replay_endpoint\":\"tcp://*:$((ev + 1))\",\"topic\":\"kv@127.0.0.1:$port@m\"}"
  echo "===== $name $(date -u +%T) kv=$kv model=$model" >> "$PD/hwv-$name.log"
  # One host, two engines: each its own NIXL side channel and Tandem agent port.
  VLLM_NIXL_SIDE_CHANNEL_PORT=$side TANDEM_KV_PORT=$((side + 100)) setsid python3 -m vllm.entrypoints.cli.main serve "$model" \
    --served-model-name m --host 127.0.0.1 --port "$port" --enforce-eager \
    --gpu-memory-utilization 0.25 --kv-cache-memory-bytes 2147483648 --max-model-len "$maxlen" \
    --kv-transfer-config "$kv" --kv-events-config "$events" >> "$PD/hwv-$name.log" 2>&1 < /dev/null &
  echo $! > "$PD/hwv-$name.pid"
}
healthy() { # port name deadline
  while [ "$(el)" -lt "$3" ]; do
    curl -sf -m 2 "http://127.0.0.1:$1/health" >/dev/null && return 0
    kill -0 "$(cat "$PD/hwv-$2.pid")" 2>/dev/null || return 2
    sleep 2
  done
  return 1
}
kvjson() { # connector role
  case $1 in
    tandem) echo "{\"kv_connector\":\"TandemConnector\",\"kv_connector_module_path\":\"tandem_kv.vllm\",\"kv_role\":\"$2\",\"kv_load_failure_policy\":\"recompute\",\"kv_connector_extra_config\":{\"backend\":\"${HWV_BACKEND:-auto}\"}}";;
    nixl) echo "{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"$2\"}";;
  esac
}

RES=${HWV_OUT:-hw-tests/results/$(date -u +%F)-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')/vllm}
mkdir -p "$RES"
# HWV_MPS=1: the engines share the GPU through CUDA MPS (one GPU context for every process)
# instead of time-sliced contexts, as engines on GPUs of their own do not switch contexts.
if [ "${HWV_MPS:-0}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d || fatal "HWV_MPS=1 but the MPS control daemon did not start"
  trap 'echo quit | nvidia-cuda-mps-control; save_logs' EXIT
  say "CUDA MPS on"
fi
for model in $MODELS; do
  case $model in
    tiny) dir=/tmp/tiny; maxlen=2048; lengths=${HWV_TINY_LENGTHS:-"64 600 1900"};;
    large) dir=/tmp/large; maxlen=8192; lengths=${HWV_LARGE_LENGTHS:-"64 1000 4000 7000"};;
  esac
  for conn in $CONNECTORS; do
    [ "$(el)" -lt $((LIMIT - 150)) ] || { say "skipping $model/$conn: no time left"; continue; }
    stop prefill decode sidecar router; sleep 2; rm -f "$TANDEM_KV_STATS_FILE"
    start prefill 8100 5600 "$(kvjson "$conn" kv_producer)" "$dir" "$maxlen" 5557
    start decode 8200 5601 "$(kvjson "$conn" kv_consumer)" "$dir" "$maxlen" 5567
    healthy 8100 prefill $((LIMIT - 60)); a=$?; healthy 8200 decode $((LIMIT - 60)); b=$?
    say "$model/$conn: engines prefill rc=$a decode rc=$b (0 up, 1 timeout, 2 died)"
    if [ $a != 0 ] || [ $b != 0 ]; then
      grep -ahE "Error|Traceback|tandem" "$PD/hwv-prefill.log" "$PD/hwv-decode.log" | tail -20 | cut -c1-300 | tee -a "$OUT/run.txt"
      continue
    fi
    grep -ah "TandemConnector rank" "$PD/hwv-prefill.log" "$PD/hwv-decode.log" | tail -2 | cut -c1-300 | tee -a "$OUT/run.txt"
    setsid "$PD/bin/pd-sidecar" --port=8000 --bind=127.0.0.1 --vllm-port=8200 --kv-connector=nixlv2 \
      --secure-proxy=false --metrics-port=9091 --prefill-threshold-tokens=0 --on-prefill-failure=fail \
      >> "$PD/hwv-sidecar.log" 2>&1 < /dev/null & echo $! > "$PD/hwv-sidecar.pid"
    setsid "$PD/bin/pd-router" --bind=127.0.0.1 --port=8080 --metrics-port=9092 --decode=http://127.0.0.1:8000 \
      --prefill=127.0.0.1:8100 --threshold-tokens=1 >> "$PD/hwv-router.log" 2>&1 < /dev/null & echo $! > "$PD/hwv-router.pid"
    for i in $(seq 1 40); do curl -sf -m 1 -o /dev/null http://127.0.0.1:8080/ready && break; sleep 0.5; done
    python3 "$REPO/hw-tests/vllm/capture_events.py" "$OUT/kv-events-$model-$conn.jsonl" \
      tcp://127.0.0.1:5557=tcp://127.0.0.1:5558 tcp://127.0.0.1:5567=tcp://127.0.0.1:5568 2>> "$OUT/capture.log" &
    cap=$!
    python3 "$REPO/hw-tests/vllm/drive.py" "$conn" "$dir" "$RES/$model-$conn.json" $lengths 2>&1 | tee -a "$OUT/run.txt"
    kill -TERM $cap 2>/dev/null; wait $cap 2>/dev/null
    curl -s -m 5 http://127.0.0.1:8200/metrics | grep -E '^vllm:(prompt_tokens_by_source|nixl_|tandem_kv_)' | grep -v _created > "$OUT/metrics-$model-$conn.txt"
    grep -ahE "KV pull failed|computing it locally|Traceback" "$PD/hwv-decode.log" | tail -5 | cut -c1-300 | tee -a "$OUT/run.txt"
  done
done
stop prefill decode sidecar router
[ "${HWV_PROFILE:-0}" = 1 ] && grep -ahE "tandem (submit|transfer) profile" "$PD/hwv-decode.log" > "$RES/submit-profile-decode.txt"

# --- precise prefix-cache routing: two engines' KV events into pd-router (no P/D) ---
if [ "${HWV_PRECISE:-1}" = 1 ] && [ "$(el)" -lt $((LIMIT - 120)) ]; then
  cat > "$PD/precise.yaml" <<'YAML'
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: precise-prefix-cache-scorer
    parameters:
      tokenProcessorConfig: {blockSize: 16}
      kvEventsConfig: {zmqEndpoint: "tcp://127.0.0.1:5590", topicFilter: "kv@", discoverPods: false}
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: precise-prefix-cache-scorer
        weight: 3
      - pluginRef: max-score-picker
YAML
  setsid "$PD/bin/pd-router" --bind=127.0.0.1 --port=8080 --metrics-port=9092 --decode=http://127.0.0.1:8100 \
    --decode=http://127.0.0.1:8200 --config="$PD/precise.yaml" >> "$PD/hwv-router.log" 2>&1 < /dev/null & echo $! > "$PD/hwv-router.pid"
  for name_port in prefill:8100 decode:8200; do
    n=${name_port%%:*}; p=${name_port##*:}
    echo "===== $n $(date -u +%T) precise" >> "$PD/hwv-$n.log"
    VLLM_SERVER_DEV_MODE=1 setsid python3 -m vllm.entrypoints.cli.main serve /tmp/tiny --served-model-name m \
      --host 127.0.0.1 --port "$p" --enforce-eager --gpu-memory-utilization 0.25 --kv-cache-memory-bytes 2147483648 \
      --max-model-len 2048 --kv-events-config "{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://127.0.0.1:5590\",\"topic\":\"kv@127.0.0.1:$p@m\"}" \
      >> "$PD/hwv-$n.log" 2>&1 < /dev/null &
    echo $! > "$PD/hwv-$n.pid"
  done
  healthy 8100 prefill $((LIMIT - 30)); a=$?; healthy 8200 decode $((LIMIT - 30)); b=$?
  say "precise: engines rc=$a,$b"
  if [ $a = 0 ] && [ $b = 0 ]; then
    python3 "$REPO/hw-tests/vllm/precise.py" "$RES/precise-routing.json" http://127.0.0.1:8080 \
      http://127.0.0.1:9092/metrics http://127.0.0.1:8100 http://127.0.0.1:8200 2>&1 | tee -a "$OUT/run.txt"
  fi
  stop prefill decode router
fi
python3 "$REPO/hw-tests/vllm/report.py" "$RES" | tee "$RES/README.md" | tee -a "$OUT/run.txt"
# One archive: the device tool brings back only a few files per call.
mv -f "$OUT"/kv-events-*.jsonl "$OUT"/metrics-*.txt "$RES"/ 2>/dev/null
tar czf "$OUT/results${HWV_TAG:+-$HWV_TAG}.tgz" -C "$RES" .
say "done in $(el) s"
