//! How a policy is delivered to Envoy: the `envoy.extensions.filters.http.wasm.v3.Wasm`
//! message that carries it, and the ECDS `DiscoveryResponse` around that. Shared by the
//! controller's sinks (ECDS file, Istio EnvoyFilter) and the end-to-end tests, so every
//! Envoy sees the same configuration shape.

use std::path::Path;

use serde_json::{json, Value};

/// The ECDS `DiscoveryResponse` carrying the filter configuration for `policy`.
pub fn ecds_document(filter_name: &str, wasm: &Path, policy: &Value, version: &str) -> Value {
    json!({
        "version_info": version,
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": filter_name,
            "typed_config": wasm_filter_config(filter_name, wasm, policy),
        }]
    })
}

/// The `envoy.extensions.filters.http.wasm.v3.Wasm` message for a policy, with the
/// module read from a file on the proxy.
pub fn wasm_filter_config(filter_name: &str, wasm: &Path, policy: &Value) -> Value {
    wasm_filter_config_with_code(filter_name, json!({"local": {"filename": wasm}}), policy)
}

/// The same message with any `vm_config.code` (an `envoy.config.core.v3.AsyncDataSource`:
/// `{"local": …}` or `{"remote": …}`).
pub fn wasm_filter_config_with_code(filter_name: &str, code: Value, policy: &Value) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {
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
            }
        }
    })
}
