//! Where the artifacts under test are: the repository's own build outputs, or what the
//! environment names (so the same tests can run against another Envoy or module).

use std::path::PathBuf;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The Envoy binary: `$MESHCANARY_ENVOY`, else the project venv's (`make envoy`).
pub fn envoy() -> PathBuf {
    std::env::var_os("MESHCANARY_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/envoy"))
}

/// The filter module: `$MESHCANARY_WASM`, else `target/wasm/meshcanary_filter.wasm` (`make wasm`).
pub fn wasm() -> PathBuf {
    std::env::var_os("MESHCANARY_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/wasm/meshcanary_filter.wasm"))
}

/// The filter built with its `test-trap` feature (traps on a request carrying
/// `x-meshcanary-test-trap`): `$MESHCANARY_TRAP_WASM`, else
/// `target/wasm/meshcanary_filter_test_trap.wasm` (`make wasm-test-trap`).
pub fn trap_wasm() -> PathBuf {
    std::env::var_os("MESHCANARY_TRAP_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/wasm/meshcanary_filter_test_trap.wasm"))
}

/// The controller binary: `$MESHCANARY_BIN`, else the workspace's debug build
/// (`cargo build -p meshcanary`, which `make test` runs first).
pub fn meshcanary_bin() -> PathBuf {
    std::env::var_os("MESHCANARY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/debug/meshcanary"))
}
