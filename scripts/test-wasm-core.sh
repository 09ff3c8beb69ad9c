#!/usr/bin/env bash
# Runs the policy core's platform-agreement test (filter/policy/tests/wasm_agreement.rs)
# on wasm32-unknown-unknown, under Node.js, and fails unless it ran and passed.
#
# The test compares bucketing (FNV position, flagd hash, chosen variant) and policy
# decisions with the literal numbers of filter/policy/testdata/bucketing_table.json,
# which were generated natively; the native run of the same file is part of
# `cargo test --workspace` in filter/.
#
# Toolchain: Debian's rustc 1.63 + cargo 1.65 (package libstd-rust-dev-wasm32 gives them
# std for wasm32-unknown-unknown), offline, against crates vendored by the modern cargo
# (Debian's cargo cannot read today's sparse crates index). The test binary is a .wasm
# file, so cargo hands it to `wasm-bindgen-test-runner` as the target's runner; that CLI
# must be exactly the version of the wasm-bindgen crate in filter/Cargo.lock:
#   cargo install wasm-bindgen-cli --version <that version> --locked
#
# Environment:
#   MESHCANARY_VENDOR_DIR   vendored crates (default: $repo/target/vendor-filter)
#   MESHCANARY_WASM_CARGO   cargo to drive the build (default: /usr/bin/cargo)
#   MESHCANARY_WASM_RUSTC   rustc with wasm32 std    (default: /usr/bin/rustc)
#   WASM_BINDGEN_TEST_RUNNER  the runner (default: from PATH, then ~/.cargo/bin)
# Extra arguments are passed to `cargo test` (e.g. `-- bucketing` to filter tests).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

target=wasm32-unknown-unknown
target_dir="$repo/target/policy-wasm-test"
vendor=${MESHCANARY_VENDOR_DIR:-$repo/target/vendor-filter}
cargo_bin=${MESHCANARY_WASM_CARGO:-/usr/bin/cargo}
rustc_bin=${MESHCANARY_WASM_RUSTC:-/usr/bin/rustc}

die() {
    echo "test-wasm-core: $*" >&2
    exit 1
}

# --- preconditions, each with the fix in its message --------------------------------

[ -x "$cargo_bin" ] && [ -x "$rustc_bin" ] \
    || die "no $cargo_bin / $rustc_bin (apt-get install rustc cargo libstd-rust-dev-wasm32, or make toolchain)"
sysroot=$("$rustc_bin" --print sysroot)
[ -d "$sysroot/lib/rustlib/$target" ] \
    || die "$rustc_bin has no std for $target (apt-get install libstd-rust-dev-wasm32)"
command -v node >/dev/null 2>&1 || die "node is not on PATH (wasm-bindgen-test-runner runs the tests in Node.js)"

# Vendor (or refresh) the crates when the default location is used and the helper
# exists; it is a no-op while the vendored set matches filter/Cargo.lock.
if [ -z "${MESHCANARY_VENDOR_DIR:-}" ] && [ -x "$repo/scripts/vendor-filter.sh" ]; then
    "$repo/scripts/vendor-filter.sh"
fi
[ -d "$vendor" ] || die "no vendored crates at $vendor (run scripts/vendor-filter.sh or set MESHCANARY_VENDOR_DIR)"

# The runner and the wasm-bindgen crate must be the same version, or the runner refuses
# the module (or worse, misreads it).
runner=${WASM_BINDGEN_TEST_RUNNER:-$(command -v wasm-bindgen-test-runner || true)}
if [ -z "$runner" ] && [ -x "$HOME/.cargo/bin/wasm-bindgen-test-runner" ]; then
    runner=$HOME/.cargo/bin/wasm-bindgen-test-runner
fi
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' filter/Cargo.lock)
[ -n "$want" ] || die "filter/Cargo.lock has no wasm-bindgen (is it a wasm32 dev-dependency of meshcanary-policy?)"
[ -n "$runner" ] && [ -x "$runner" ] \
    || die "wasm-bindgen-test-runner not found (cargo install wasm-bindgen-cli --version $want --locked)"
# The runner itself has no --version; its sibling from the same package does.
have=$("$(dirname "$runner")/wasm-bindgen" --version 2>/dev/null | awk '{ print $2 }' || true)
[ "$have" = "$want" ] \
    || die "wasm-bindgen-test-runner is ${have:-of unknown version}, filter/Cargo.lock wants $want (cargo install wasm-bindgen-cli --version $want --locked)"

# --- build and run -------------------------------------------------------------------

echo "test-wasm-core: $("$rustc_bin" --version), target $target, runner wasm-bindgen-test-runner $have, node $(node --version)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# RUSTC pins Debian's rustc (rustup's is first on PATH and has no wasm32 std); the runner
# is given through cargo's per-target environment variable; --locked keeps the lockfile
# as it is and --offline with source replacement uses only the vendored crates.
set +e
RUSTC="$rustc_bin" \
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER="$runner" \
    "$cargo_bin" test --offline --locked --target "$target" \
    --manifest-path filter/Cargo.toml -p meshcanary-policy --test wasm_agreement \
    --target-dir "$target_dir" \
    --config 'source.crates-io.replace-with="vendored"' \
    --config "source.vendored.directory=\"$vendor\"" \
    "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || die "cargo test on $target failed (exit $status)"

# A run that built but executed nothing must not pass: every `test result:` line must
# be ok, and together they must count at least one passed test.
if grep -q '^test result: FAILED' "$log"; then
    die "some tests failed on $target"
fi
passed=$(sed -n 's/^test result: ok\. \([0-9][0-9]*\) passed.*/\1/p' "$log" | awk '{ n += $1 } END { print n + 0 }')
[ "$passed" -gt 0 ] || die "no test ran on $target (0 passed): check the runner output above"
echo "test-wasm-core: $passed tests passed on $target"
