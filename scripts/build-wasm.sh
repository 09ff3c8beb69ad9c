#!/usr/bin/env bash
# Builds the filter module to target/wasm/meshcanary_filter.wasm.
#
# Two toolchains can do it, and both are scripted:
#  1. a rustup toolchain with the wasm32-wasip1 target installed (the usual setup);
#  2. Debian's rustc 1.63 + cargo 1.65 with libstd-rust-dev-wasm32, offline, against
#     crates vendored by the modern cargo (Debian's cargo cannot read today's crates index).
# The filter's workspace keeps its own version-3 lockfile so that both can build it.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
out=target/wasm
mkdir -p "$out"

if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    echo "build-wasm: rustup toolchain, target wasm32-wasip1"
    cargo build --release --locked --target wasm32-wasip1 \
        --manifest-path filter/Cargo.toml --target-dir target/filter-wasm -p meshcanary-filter
    built=target/filter-wasm/wasm32-wasip1/release/meshcanary_filter.wasm
elif [ -x /usr/bin/cargo ] && [ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/wasm32-wasi ]; then
    echo "build-wasm: Debian toolchain ($(/usr/bin/rustc --version)), target wasm32-wasi, offline"
    "$repo/scripts/vendor-filter.sh"
    RUSTC=/usr/bin/rustc /usr/bin/cargo build --offline --locked --release --target wasm32-wasi \
        --manifest-path filter/Cargo.toml --target-dir target/filter-wasm -p meshcanary-filter \
        --config 'source.crates-io.replace-with="vendored"' \
        --config "source.vendored.directory=\"$repo/target/vendor-filter\""
    built=target/filter-wasm/wasm32-wasi/release/meshcanary_filter.wasm
else
    echo "build-wasm: no wasm32 toolchain. Either 'rustup target add wasm32-wasip1', or on Debian:" >&2
    echo "  apt-get install rustc cargo libstd-rust-dev-wasm32   (or: make toolchain)" >&2
    exit 1
fi

cp "$built" "$out/meshcanary_filter.wasm"
echo "build-wasm: $out/meshcanary_filter.wasm ($(stat -c %s "$out/meshcanary_filter.wasm") bytes)"
