//! How a policy is delivered to Envoy: the `envoy.extensions.filters.http.wasm.v3.Wasm`
//! message that carries it, and the ECDS `DiscoveryResponse` around that. Shared by the
//! controller's sinks (ECDS file, Istio EnvoyFilter) and the end-to-end tests, so every
//! Envoy sees the same configuration shape.

use std::path::Path;

use serde_json::{json, Value};

/// What Envoy does with a worker's requests once the filter's Wasm VM has failed (a trap,
/// a panic inside the module or the SDK, memory exhaustion): Envoy's
/// `envoy.extensions.wasm.v3.FailurePolicy` (Envoy ≥ 1.33).
///
/// Envoy's own default is `FAIL_CLOSED`: every later request through that worker is
/// answered 503 until the proxy restarts. meshcanary never leaves it to that default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// `FAIL_RELOAD` (meshcanary's default): the next request after a failure starts a
    /// fresh VM (spaced by [`RELOAD_BACKOFF_BASE`], growing to [`RELOAD_BACKOFF_MAX`] while
    /// reloads keep failing). The fresh VM re-reads the policy; what it loses are the
    /// counters the failed VM had not flushed yet (at most [`FLUSH_PERIOD_MS`] of them).
    #[default]
    Reload,
    /// `FAIL_OPEN`: requests bypass the failed filter and take Envoy's default route
    /// (no decision header: the route that matches without it, usually stable).
    Open,
    /// `FAIL_CLOSED`: requests through the failed worker are answered 503.
    Closed,
}

/// The filter's counters reach Envoy at most this long after they were counted (the
/// filter's flush period), so a failed VM loses at most this much of its counting.
pub const FLUSH_PERIOD_MS: u64 = 100;

/// First wait between two reloads of a failed VM under [`FailurePolicy::Reload`]. Short,
/// because until the reload every request through that worker fails; not zero, so a module
/// that fails on every request does not spend the proxy's CPU starting VMs in a loop.
pub const RELOAD_BACKOFF_BASE: &str = "0.1s";

/// Longest wait between two reloads while reloads keep failing.
pub const RELOAD_BACKOFF_MAX: &str = "1s";

impl FailurePolicy {
    /// Every policy, by its Envoy name.
    pub const ALL: [FailurePolicy; 3] = [
        FailurePolicy::Reload,
        FailurePolicy::Open,
        FailurePolicy::Closed,
    ];

    /// Envoy's name for it (`FAIL_RELOAD`, `FAIL_OPEN`, `FAIL_CLOSED`).
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Reload => "FAIL_RELOAD",
            FailurePolicy::Open => "FAIL_OPEN",
            FailurePolicy::Closed => "FAIL_CLOSED",
        }
    }

    /// The policy Envoy calls `name`.
    pub fn from_name(name: &str) -> Option<FailurePolicy> {
        FailurePolicy::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// Istio's `WasmPlugin.failStrategy` for it (Istio spells the closed one `FAIL_CLOSE`).
    pub fn istio_fail_strategy(self) -> &'static str {
        match self {
            FailurePolicy::Reload => "FAIL_RELOAD",
            FailurePolicy::Open => "FAIL_OPEN",
            FailurePolicy::Closed => "FAIL_CLOSE",
        }
    }
}

/// The ECDS `DiscoveryResponse` carrying the filter configuration for `policy`.
pub fn ecds_document(
    filter_name: &str,
    wasm: &Path,
    policy: &Value,
    failure: FailurePolicy,
    version: &str,
) -> Value {
    json!({
        "version_info": version,
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": filter_name,
            "typed_config": wasm_filter_config(filter_name, wasm, policy, failure),
        }]
    })
}

/// The `envoy.extensions.filters.http.wasm.v3.Wasm` message for a policy, with the
/// module read from a file on the proxy.
pub fn wasm_filter_config(
    filter_name: &str,
    wasm: &Path,
    policy: &Value,
    failure: FailurePolicy,
) -> Value {
    wasm_filter_config_with_code(
        filter_name,
        json!({"local": {"filename": wasm}}),
        policy,
        failure,
    )
}

/// The same message with any `vm_config.code` (an `envoy.config.core.v3.AsyncDataSource`:
/// `{"local": …}` or `{"remote": …}`).
pub fn wasm_filter_config_with_code(
    filter_name: &str,
    code: Value,
    policy: &Value,
    failure: FailurePolicy,
) -> Value {
    let mut config = json!({
        "name": filter_name,
        "root_id": filter_name,
        "vm_config": {
            "vm_id": filter_name,
            "runtime": "envoy.wasm.runtime.v8",
            "code": code
        },
        "configuration": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": policy.to_string()
        },
        "failure_policy": failure.as_str(),
    });
    if failure == FailurePolicy::Reload {
        config["reload_config"] = json!({
            "backoff": {"base_interval": RELOAD_BACKOFF_BASE, "max_interval": RELOAD_BACKOFF_MAX}
        });
    }
    json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": config
    })
}
