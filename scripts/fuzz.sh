#!/usr/bin/env bash
# Runs the libFuzzer targets of fuzz/ (cargo fuzz), each for a bounded time, and prints
# one table: executions, executions per second, coverage (libFuzzer's `cov:` edges and
# `ft:` features) and corpus size per target. Fails if any target found a crash, a
# failed property, a timeout or an out-of-memory input (kept under target/fuzz/artifacts/).
#
#   scripts/fuzz.sh                 every target, FUZZ_SECONDS each (default 600)
#   scripts/fuzz.sh decide          only these targets
#
# Environment:
#   FUZZ_SECONDS   seconds per target (libFuzzer -max_total_time); default 600
#   FUZZ_BUILD     release (default: optimized, with debug assertions and overflow checks)
#                  or dev (unoptimized: builds in about half the CPU time, runs several
#                  times slower; what `make test`'s short runs use)
#   FUZZ_TARGETS   targets to run when none are given; default: all of fuzz/Cargo.toml
#   CARGO          the modern cargo (rustup's stable is enough: nightly-only compiler
#                  flags are unlocked with RUSTC_BOOTSTRAP=1, as cargo-fuzz needs them)
#
# The committed seeds (fuzz/seeds/<target>/) are only read; the growing corpus lives in
# target/fuzz/corpus/<target>/ and is reused by the next run, so the tree stays clean.
# cargo-fuzz itself is installed once into .tools/ (a debug build: about 45 s of CPU).
set -euo pipefail

# The whole script is one function, read before it runs, and the file is not read after
# it: a run of an hour is not disturbed by edits to this file in the meantime.
main() {

    repo=$(cd "$(dirname "$0")/.." && pwd)
    cd "$repo"

    CARGO_FUZZ_VERSION=0.13.2
    cargo_bin=${CARGO:-$(command -v cargo)}
    seconds=${FUZZ_SECONDS:-600}
    tools="$repo/.tools"
    out="$repo/target/fuzz"

    die() {
        echo "fuzz: $*" >&2
        exit 1
    }

    [[ "$seconds" =~ ^[0-9]+$ && "$seconds" -gt 0 ]] || die "FUZZ_SECONDS must be a whole number of seconds, got '$seconds'"

    targets=("$@")
    if [[ ${#targets[@]} -eq 0 ]]; then
        if [[ -n "${FUZZ_TARGETS:-}" ]]; then
            read -r -a targets <<<"$FUZZ_TARGETS"
        else
            mapfile -t targets < <(awk '/^\[\[bin\]\]/ { getline; gsub(/name = |"/, ""); print }' fuzz/Cargo.toml)
        fi
    fi
    for t in "${targets[@]}"; do
        [[ -f "fuzz/fuzz_targets/$t.rs" ]] || die "no target '$t' (fuzz/fuzz_targets/$t.rs)"
    done

    command -v c++ >/dev/null || die "libFuzzer needs a C++ compiler: 'apt-get install g++' (make toolchain installs it)"

    if ! "$tools/bin/cargo-fuzz" --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\$"; then
        echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION into .tools/"
        start=$(date +%s)
        # A debug build: a third of the compile time, and its speed does not matter.
        "$cargo_bin" install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --debug --root "$tools" --quiet
        echo "fuzz: cargo-fuzz installed in $(($(date +%s) - start)) s"
    fi

    # Debug assertions and overflow checks in both builds: arithmetic that would wrap
    # silently in the wasm module fails here. No sanitizer: the code under test is safe
    # Rust (the policy core forbids unsafe), and ASan would only halve the executions.
    case "${FUZZ_BUILD:-release}" in
    release) flags=(-O --debug-assertions --sanitizer none) ;;
    dev)
        flags=(--dev --sanitizer none)
        # No debug info: a third less to compile and link (the controller's dependency
        # graph dominates); a panic still names its file and line.
        export CARGO_PROFILE_DEV_DEBUG=0
        ;;
    *) die "FUZZ_BUILD must be release or dev, got '$FUZZ_BUILD'" ;;
    esac
    export RUSTC_BOOTSTRAP=1
    export CARGO="$cargo_bin"
    mkdir -p "$out/logs"
    start=$(date +%s)
    if ! "$tools/bin/cargo-fuzz" build "${flags[@]}" >"$out/logs/build.log" 2>&1; then
        tail -n 40 "$out/logs/build.log" >&2
        die "build failed (log: target/fuzz/logs/build.log)"
    fi
    echo "fuzz: targets built in $(($(date +%s) - start)) s"

    rows=()
    failed=()
    for t in "${targets[@]}"; do
        corpus="$out/corpus/$t"
        artifacts="$out/artifacts/$t/"
        log="$out/logs/$t.log"
        mkdir -p "$corpus" "$artifacts"
        echo "fuzz: $t for ${seconds} s (log: ${log#"$repo"/})"
        status=ok
        # -timeout: one input taking over 10 s is a bug (counted as a failure);
        # -rss_limit_mb bounds memory; the dictionary and the seeds are committed.
        if ! "$tools/bin/cargo-fuzz" run "${flags[@]}" "$t" "$corpus" "fuzz/seeds/$t" -- \
            -dict="fuzz/dict/$t.dict" -max_total_time="$seconds" -timeout=10 \
            -rss_limit_mb=2048 -artifact_prefix="$artifacts" -print_final_stats=1 \
            >"$log" 2>&1; then
            status=FAILED
            failed+=("$t")
        fi
        # The last progress line has the coverage; the final stats have the totals.
        last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
        cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
        ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
        corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' <<<"$last")
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
        rows+=("$(printf '%-18s %6s %12s %9s %6s %7s %12s  %s' "$t" "$seconds" "${execs:--}" "${rate:--}" "${cov:--}" "${ft:--}" "${corp:--}" "$status")")
        if [[ $status != ok ]]; then
            grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written to' "$log" | head -n 6 | sed 's/^/    /' >&2 || true
        fi
    done

    echo
    printf '%-18s %6s %12s %9s %6s %7s %12s  %s\n' target seconds executions exec/s cov ft corpus result
    printf '%s\n' "${rows[@]}"
    if [[ ${#failed[@]} -gt 0 ]]; then
        die "failing targets: ${failed[*]} (inputs under target/fuzz/artifacts/; reproduce with: RUSTC_BOOTSTRAP=1 .tools/bin/cargo-fuzz run ${flags[*]} <target> <input>)"
    fi
}

main "$@"; exit
