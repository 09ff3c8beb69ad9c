#!/usr/bin/env bash
# Vendors the filter workspace's crates into target/vendor-filter (once per lockfile), so
# Debian's older cargo can build offline. Needs the modern cargo and the crates registry.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
vendor=${MESHCANARY_VENDOR_DIR:-$repo/target/vendor-filter}
stamp="$vendor/.meshcanary-lock-sha256"
want=$(sha256sum "$repo/filter/Cargo.lock" | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
# The modern cargo is rustup's; make sure Debian's does not shadow it here.
modern_cargo=${MESHCANARY_MODERN_CARGO:-$(command -v cargo)}
if [ "$modern_cargo" = /usr/bin/cargo ] && [ -x "$HOME/.cargo/bin/cargo" ]; then
    modern_cargo=$HOME/.cargo/bin/cargo
fi
echo "vendor-filter: vendoring the filter's crates with $("$modern_cargo" --version)"
rm -rf "$vendor"
"$modern_cargo" vendor --locked --versioned-dirs --manifest-path "$repo/filter/Cargo.toml" "$vendor" >/dev/null
echo "$want" > "$stamp"
