#!/usr/bin/env bash
# Lints the filter for the wasm target with warnings denied. Uses Debian's clippy (same
# rustc 1.63 that builds the module) when the rustup toolchain has no wasm32 target.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    cargo clippy --locked --target wasm32-wasip1 --manifest-path filter/Cargo.toml \
        --target-dir target/filter-wasm --workspace -- -D warnings
elif [ -x /usr/bin/cargo-clippy ]; then
    "$repo/scripts/vendor-filter.sh"
    # Debian's cargo must find Debian's clippy-driver, not rustup's proxies.
    PATH=/usr/bin:$PATH RUSTC=/usr/bin/rustc /usr/bin/cargo clippy --offline --locked --target wasm32-wasi \
        --manifest-path filter/Cargo.toml --target-dir target/filter-wasm-clippy --workspace \
        --config 'source.crates-io.replace-with="vendored"' \
        --config "source.vendored.directory=\"$repo/target/vendor-filter\"" \
        -- -D warnings
else
    echo "clippy-wasm: no clippy for a wasm32 toolchain (make toolchain)" >&2
    exit 1
fi
