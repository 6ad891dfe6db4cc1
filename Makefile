# Tandem: the two commands a user needs are `make demo` and `make test`.
CARGO ?= cargo
VENV_PY := .venv/bin/python

.PHONY: all setup build build-release test unit-test e2e-test python-test lint fmt demo bench bench-proxy bench-router bench-kv bench-kv-2proc hw-test hw-pack hw-test-vllm soak fuzz image image-test clean

all: build

setup:
	@bash scripts/setup

build:
	$(CARGO) build --workspace --bins --lib

build-release:
	$(CARGO) build --release --workspace --bins

## Everything CI runs: formatting, lints, unit and end-to-end tests, the openai-client test.
test: setup lint build
	$(CARGO) nextest run --workspace --no-fail-fast
	$(VENV_PY) -m pytest -q tests/python

## The OCI image, built without a container engine (umoci): bench-out/image/oci, tagged with the
## chart's appVersion. IMAGE_PUSH=docker://<registry>/tandem:<tag> copies it there (skopeo).
image: setup
	$(CARGO) build --release -p sidecar -p transfer --bins
	bash scripts/image

## Builds the image and checks it: OCI layout and config, the binaries started from its rootfs
## with only its libraries, NIXL from the image moving KV. .ci/run runs it after make test.
image-test: image
	$(VENV_PY) -m pytest -q tests/image

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## A local P/D cluster on loopback: simulator engines, sidecar, real requests, a table.
demo: setup build-release
	./target/release/pd-demo

bench: bench-proxy bench-router bench-kv

## Added latency of pd-sidecar vs direct and nginx; writes bench-out/proxy-bench.json.
bench-proxy: setup build-release
	./target/release/proxy-bench --out bench-out/proxy-bench.json

## pd-router: the pick path in process (64+64 endpoints, 8k-token prompts; bench-out/router-pick.json),
## then what the router adds to a request vs direct (bench-out/router-bench.json).
bench-router: setup build-release
	$(CARGO) bench -p sidecar --bench pick
	./target/release/proxy-bench --targets direct,router,router-sidecar,sidecar-local,nginx --concurrency 1,64 --streams 0 --prompt-tokens 2000 --out bench-out/router-bench.json
	./target/release/proxy-bench --targets direct,router,router-sidecar,sidecar-local,nginx --concurrency 1,64 --streams 0 --prompt-tokens 2000 --engine-ttft-ms 20 --out bench-out/router-bench-inflight.json

## KV transfer: naive vs coalesced plans over NIXL (host memory), a 4096-token Llama-3.1-8B prompt;
## writes bench-out/kvbench.json and bench-out/kvbench.png.
bench-kv: setup build-release
	./target/release/kvbench run --backend nixl,tcp

## The same between two processes: `kvbench serve` as the prefill side, `kvbench run --peer` as the decode side.
bench-kv-2proc: setup build-release
	bash scripts/kvbench-2proc

## Minutes of load on a local P/D cluster with faults (prefill 5xx and hangs, clients leaving
## mid-stream, a prefill and a decode engine killed and restarted); prints a table, writes
## bench-out/soak.json, fails when a check does not hold. A 15 s version runs in `make test`.
soak: setup build-release
	./target/release/soak --duration 300 --concurrency 64

## cargo fuzz over the request-body rewriting (every connector), routing headers and allow-list
## entries, pd-router's config and endpoints files, SSE response rewriting and KV-transfer control
## messages (gRPC metadata and requests, notifications, plans); FUZZ_SECONDS each (default 60).
## RUSTC_BOOTSTRAP lets the stable toolchain take the sanitizer flags cargo fuzz passes.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := body_rewrite headers router_config sse_rewrite kv_control
fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t; \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run -O $$t corpus/$$t seeds/$$t -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

## GPU hardware tests (never in CI): pack the release binaries and the nixl-cu13 libraries into
## hw-tests/bundle/, then run the kvbench GPU matrix and pd-demo on GPU pools where a GPU is
## (hw-tests/README.md); results under hw-tests/results/<date>-<gpu>/.
hw-test: setup
	HW_GPUS=$(or $(GPUS),1) bash scripts/hw-test all

hw-pack: setup
	bash scripts/hw-test pack

## Real vLLM 0.26.0 with TandemConnector, then NixlConnector, on a GPU host (never in CI): packs
## libtandem_kv and the recipe's vLLM bundle (../shared/vllm-gpu) and prints the device calls.
hw-test-vllm: setup
	bash scripts/hw-test-vllm pack
	@echo "then, on the GPU host: bash .gpu-vllm/1/probe.sh stage1 (carrying .gpu-vllm/1), and at once"
	@echo "bash hw-tests/vllm/run.sh (carrying the last .gpu-vllm folder and hw-tests/bundle/vllm)"

clean:
	$(CARGO) clean
	rm -rf .venv demo-out bench-out
