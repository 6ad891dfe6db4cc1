# Tandem: the two commands a user needs are `make demo` and `make test`.
CARGO ?= cargo
VENV_PY := .venv/bin/python

.PHONY: all setup build build-release test unit-test e2e-test python-test lint fmt demo bench bench-proxy clean

all: build

setup:
	@bash scripts/setup

build:
	$(CARGO) build --workspace --bins

build-release:
	$(CARGO) build --release --workspace --bins

## Everything CI runs: formatting, lints, unit and end-to-end tests, the openai-client test.
test: setup lint build
	$(CARGO) nextest run --workspace --no-fail-fast
	$(VENV_PY) -m pytest -q tests/python

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## A local P/D cluster on loopback: simulator engines, sidecar, real requests, a table.
demo: setup build-release
	./target/release/pd-demo

bench: bench-proxy

## Added latency of pd-sidecar vs direct and nginx; writes bench-out/proxy-bench.json.
bench-proxy: setup build-release
	./target/release/proxy-bench --out bench-out/proxy-bench.json

clean:
	$(CARGO) clean
	rm -rf .venv demo-out bench-out
