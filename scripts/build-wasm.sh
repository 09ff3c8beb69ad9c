#!/usr/bin/env bash
# Builds the filter module to target/wasm/meshcanary_filter.wasm.
#
#   scripts/build-wasm.sh               the filter (package meshcanary-filter)
#   scripts/build-wasm.sh bench-empty   the empty filter `make bench` compares with,
#                                       to target/wasm/bench_empty.wasm
#   scripts/build-wasm.sh meshcanary-filter test-trap
#                                       the filter with a cargo feature, to
#                                       target/wasm/meshcanary_filter_test_trap.wasm (its
#                                       own target folder, so the two builds never
#                                       invalidate each other)
# Any package of the filter workspace works: the module is named after its library
# (`-` becomes `_`), built with the workspace's release profile.
#
#   MESHCANARY_WASM_NAMES=1 scripts/build-wasm.sh
#                                       the same code with its function names kept (the
#                                       release profile strips them), to
#                                       target/wasm/meshcanary_filter_names.wasm, in its
#                                       own target folder: what `make bench-profile` reads
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
package=${1:-meshcanary-filter}
feature=${2:-}
module=${package//-/_}.wasm
target_dir=target/filter-wasm
features=()
output=$module
if [ -n "$feature" ]; then
    target_dir=target/filter-wasm-$feature
    features=(--features "$feature")
    output=${package//-/_}_${feature//-/_}.wasm
fi
if [ "${MESHCANARY_WASM_NAMES:-}" = 1 ]; then
    export CARGO_PROFILE_RELEASE_STRIP=none
    target_dir=$target_dir-names
    output=${output%.wasm}_names.wasm
fi

if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    echo "build-wasm: rustup toolchain, target wasm32-wasip1"
    cargo build --release --locked --target wasm32-wasip1 \
        --manifest-path filter/Cargo.toml --target-dir "$target_dir" -p "$package" "${features[@]}"
    built=$target_dir/wasm32-wasip1/release/$module
elif [ -x /usr/bin/cargo ] && [ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/wasm32-wasi ]; then
    echo "build-wasm: Debian toolchain ($(/usr/bin/rustc --version)), target wasm32-wasi, offline"
    "$repo/scripts/vendor-filter.sh"
    RUSTC=/usr/bin/rustc /usr/bin/cargo build --offline --locked --release --target wasm32-wasi \
        --manifest-path filter/Cargo.toml --target-dir "$target_dir" -p "$package" "${features[@]}" \
        --config 'source.crates-io.replace-with="vendored"' \
        --config "source.vendored.directory=\"$repo/target/vendor-filter\""
    built=$target_dir/wasm32-wasi/release/$module
else
    echo "build-wasm: no wasm32 toolchain. Either 'rustup target add wasm32-wasip1', or on Debian:" >&2
    echo "  apt-get install rustc cargo libstd-rust-dev-wasm32   (or: make toolchain)" >&2
    exit 1
fi

cp "$built" "$out/$output"
echo "build-wasm: $out/$output ($(stat -c %s "$out/$output") bytes)"
