//! `meshcanary render SPEC --target gateway-api | envoy-gateway`: the filter and its
//! routing for a Gateway API `Gateway`, as documents to commit (GitOps). Offline and
//! deterministic, like `render --sink kubernetes`; nothing here talks to a cluster.
//!
//! # What is rendered
//!
//! Both targets print an `HTTPRoute` (`gateway.networking.k8s.io/v1`) in the spec's
//! `sink.kubernetes.namespace`, attached to the Gateway named on the command line, with
//! one rule per variant other than the policy's fallback (the first variant): a `PathPrefix
//! /` match plus an `Exact` match of the policy's decision header on the variant's name,
//! to that variant's Service. A last rule without a header match sends everything else to
//! the fallback variant's Service: a request the filter did not decide (the filter failing
//! open, or not attached) lands on stable. Gateway API ranks a match with more header
//! matches above one with fewer, so the order of the rules is not what decides, and the
//! rules are printed in the order they are meant anyway.
//!
//! * `gateway-api`: an Istio `WasmPlugin` (`extensions.istio.io/v1alpha1`) in the
//!   Gateway's namespace with `targetRefs: [{group: gateway.networking.k8s.io, kind:
//!   Gateway, name}]` (Istio ≥ 1.22; a WasmPlugin may only target objects in its own
//!   namespace). The module comes from `sink.kubernetes.wasm` (`file://`, `https://` with
//!   `sha256`, or `oci://…@sha256:…` with the image digest as `sha256`), `pluginConfig` is
//!   the policy and `failStrategy` is the sink's `failure_policy` in Istio's words. Istio
//!   inserts it before the router of the Gateway's listeners, so it decides for every route
//!   of that Gateway: give rules meant for one service an `:authority` condition.
//! * `envoy-gateway`: an Envoy Gateway `EnvoyExtensionPolicy`
//!   (`gateway.envoyproxy.io/v1alpha1`) targeting the rendered HTTPRoute, with one `wasm`
//!   entry: the module from the OCI image (`code.type: Image`, the URL without `oci://`,
//!   `sha256` = the image digest, which Envoy Gateway compares with the pulled image's) or
//!   from `https://` (`code.type: HTTP`), `config` = the policy, `failOpen` from
//!   [`envoy_gateway_fail_open`]. Envoy Gateway adds the filter to the listener disabled
//!   and enables it on the targeted route's rules only, so the filter decides for this
//!   service's traffic and no other.
//!
//! The policy is the one the controller's first apply writes (the first step's weight).

use std::fmt;
use std::str::FromStr;

use meshcanary_policy::envoy::FailurePolicy;
use serde_json::{json, Value};

use crate::sink::kubernetes::{to_yaml, MANAGED_BY, STEP_ANNOTATION, WEIGHT_ANNOTATION};
use crate::spec::{KubernetesSpec, RolloutSpec, SinkSpec, WasmCode};

/// The Gateway API's group (HTTPRoute, Gateway).
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
/// The HTTPRoute's `apiVersion`.
pub const HTTP_ROUTE_API_VERSION: &str = "gateway.networking.k8s.io/v1";
/// The Istio WasmPlugin's `apiVersion`.
pub const WASM_PLUGIN_API_VERSION: &str = "extensions.istio.io/v1alpha1";
/// The Envoy Gateway EnvoyExtensionPolicy's `apiVersion`.
pub const ENVOY_EXTENSION_POLICY_API_VERSION: &str = "gateway.envoyproxy.io/v1alpha1";

/// The most rules an HTTPRoute may have (Gateway API's `maxItems`).
const MAX_ROUTE_RULES: usize = 16;

/// Which gateway implementation the documents are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Istio serving a Gateway API `Gateway`: a `WasmPlugin` with `targetRefs` + HTTPRoute.
    GatewayApi,
    /// Envoy Gateway: an `EnvoyExtensionPolicy` on the HTTPRoute + HTTPRoute.
    EnvoyGateway,
}

impl Target {
    /// The `--target` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::GatewayApi => "gateway-api",
            Target::EnvoyGateway => "envoy-gateway",
        }
    }
}

/// A Gateway API `Gateway`, `NAMESPACE/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRef {
    /// The Gateway's namespace.
    pub namespace: String,
    /// The Gateway's name.
    pub name: String,
}

impl FromStr for GatewayRef {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('/') {
            Some((namespace, name)) if is_dns_label(namespace) && is_object_name(name) => {
                Ok(GatewayRef {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!(
                "--gateway {:?}: expected NAMESPACE/NAME (a DNS label, then a lower-case object name)",
                text
            )),
        }
    }
}

impl fmt::Display for GatewayRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where one variant's requests go: `VARIANT=SERVICE:PORT`, a Service in the HTTPRoute's
/// namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The policy variant.
    pub variant: String,
    /// The Service's name.
    pub service: String,
    /// The Service's port.
    pub port: u16,
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "--backend {:?}: expected VARIANT=SERVICE:PORT ({})",
                text, why
            )
        };
        let (variant, target) = text.split_once('=').ok_or_else(|| bad("no '='"))?;
        let (service, port) = target.rsplit_once(':').ok_or_else(|| bad("no ':PORT'"))?;
        if variant.is_empty() {
            return Err(bad("no variant"));
        }
        if !is_dns_label(service) {
            return Err(bad("the Service name must be a DNS label"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("the port must be 1 to 65535"))?;
        Ok(Backend {
            variant: variant.to_string(),
            service: service.to_string(),
            port,
        })
    }
}

/// What `render --target` needs besides the spec.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Which documents.
    pub target: Target,
    /// The Gateway the HTTPRoute (and for `gateway-api` the WasmPlugin) attaches to.
    pub gateway: GatewayRef,
    /// One backend per policy variant.
    pub backends: Vec<Backend>,
    /// The HTTPRoute's `hostnames` (none: every hostname the Gateway's listeners accept).
    pub hostnames: Vec<String>,
}

/// Why `render --target` cannot print the documents.
#[derive(Debug, thiserror::Error)]
pub enum GatewayRenderError {
    /// The spec or the flags do not allow it (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The policy or a document could not be rendered (exit 1).
    #[error("cannot render the documents: {0}")]
    Render(String),
}

/// Envoy Gateway's `failOpen` for the sink's `failure_policy`, decided knowingly.
///
/// Envoy Gateway's default is `false`: a Wasm extension that fails to load (the image
/// cannot be pulled, the configuration is refused) or whose VM fails makes the route
/// answer 5xx. meshcanary's filter only *chooses* a backend, and a request it did not
/// decide still has a safe place to go: the HTTPRoute's last rule, the fallback variant
/// (stable). So failing open keeps traffic flowing on the safe side of the rollout,
/// exactly as the Kubernetes sink's `FAIL_OPEN` default does for a downloaded module.
/// Envoy Gateway has no reload policy, so `FAIL_RELOAD` (keep routing) maps to fail open
/// too; only an explicit `FAIL_CLOSED` renders `failOpen: false`.
pub fn envoy_gateway_fail_open(failure: FailurePolicy) -> bool {
    match failure {
        FailurePolicy::Open | FailurePolicy::Reload => true,
        FailurePolicy::Closed => false,
    }
}

/// The documents for `options.target`, as one YAML stream (documents separated by `---`),
/// with a comment header saying what they are. Same spec and flags, same bytes.
pub fn render_gateway(
    spec: &RolloutSpec,
    options: &GatewayOptions,
) -> Result<String, GatewayRenderError> {
    let kubernetes = match &spec.sink {
        SinkSpec::Kubernetes(k) => k,
        SinkSpec::EcdsFile(_) => {
            return Err(GatewayRenderError::Usage(format!(
                "--target {} needs a sink.kubernetes section in the spec (namespace, name, wasm, and optionally filter_name, failure_policy); this spec's sink is ecds_file",
                options.target.as_str()
            )))
        }
    };
    let backends = backends_by_variant(spec, &options.backends)?;
    if let Some(bad) = options
        .hostnames
        .iter()
        .find(|h| !is_object_name(h.strip_prefix("*.").unwrap_or(h)))
    {
        return Err(GatewayRenderError::Usage(format!(
            "--hostname {:?}: expected a lower-case DNS name, optionally prefixed with \"*.\" (no port)",
            bad
        )));
    }
    let weight = spec.judge.steps.first().copied().unwrap_or(0);
    let policy = spec.policy_at(weight).map_err(GatewayRenderError::Render)?;
    let step = format!("1/{}", spec.judge.steps.len());
    let route = http_route(kubernetes, options, &spec.policy.decision_header, &backends);
    let extension = match options.target {
        Target::GatewayApi => wasm_plugin(kubernetes, &options.gateway, &policy),
        Target::EnvoyGateway => envoy_extension_policy(kubernetes, &policy)?,
    };
    let mut documents = Vec::new();
    for mut document in [extension, route] {
        document["metadata"]["annotations"] = json!({
            STEP_ANNOTATION: step,
            WEIGHT_ANNOTATION: weight.to_string(),
        });
        let mut yaml = to_yaml(&document).map_err(GatewayRenderError::Render)?;
        if !yaml.ends_with('\n') {
            yaml.push('\n');
        }
        documents.push(yaml);
    }
    let what = match options.target {
        Target::GatewayApi => format!(
            "an Istio WasmPlugin attached to Gateway {} (targetRefs)",
            options.gateway
        ),
        Target::EnvoyGateway => {
            "an Envoy Gateway EnvoyExtensionPolicy on the HTTPRoute below".to_string()
        }
    };
    Ok(format!(
        "# meshcanary: rollout {policy:?}, split rule {rule:?}, canary {canary:?}, for Gateway {gateway}:\n\
         # {what},\n\
         # and an HTTPRoute routing on {header} (no header: {fallback}).\n\
         # The canary starts at {weight} %. Generated by `meshcanary render SPEC --target {target}`:\n\
         # edit the spec or the flags, not this file.\n{docs}",
        policy = spec.policy.name,
        rule = spec.split_rule,
        canary = spec.canary,
        gateway = options.gateway,
        header = spec.policy.decision_header,
        fallback = spec.policy.variants.first().map(String::as_str).unwrap_or(""),
        weight = weight,
        target = options.target.as_str(),
        docs = documents.join("---\n"),
    ))
}

/// The backends in the policy's variant order; every variant must have exactly one, and
/// every backend must name a variant.
fn backends_by_variant<'a>(
    spec: &RolloutSpec,
    backends: &'a [Backend],
) -> Result<Vec<&'a Backend>, GatewayRenderError> {
    let variants = &spec.policy.variants;
    let mut problems = Vec::new();
    for (i, backend) in backends.iter().enumerate() {
        if !variants.contains(&backend.variant) {
            problems.push(format!(
                "--backend {}=…: the policy has no variant {:?} (its variants: {})",
                backend.variant,
                backend.variant,
                variants.join(", ")
            ));
        } else if backends[..i].iter().any(|b| b.variant == backend.variant) {
            problems.push(format!(
                "--backend {}=…: given more than once",
                backend.variant
            ));
        }
    }
    if variants.len() > MAX_ROUTE_RULES {
        problems.push(format!(
            "the policy has {} variants, and an HTTPRoute holds at most {} rules (one per variant)",
            variants.len(),
            MAX_ROUTE_RULES
        ));
    }
    let mut ordered = Vec::new();
    for variant in variants {
        match backends.iter().find(|b| &b.variant == variant) {
            Some(backend) => ordered.push(backend),
            None => problems.push(format!(
                "no --backend {}=SERVICE:PORT: every variant of the policy needs its Service",
                variant
            )),
        }
    }
    if problems.is_empty() {
        Ok(ordered)
    } else {
        Err(GatewayRenderError::Usage(problems.join("; ")))
    }
}

fn metadata(name: &str, namespace: &str) -> Value {
    json!({
        "name": name,
        "namespace": namespace,
        "labels": {MANAGED_BY.0: MANAGED_BY.1},
    })
}

/// The HTTPRoute: a rule per non-fallback variant matching the decision header, then the
/// fallback variant's rule without a header match. `backends` are in variant order (the
/// first is the fallback).
pub fn http_route(
    kubernetes: &KubernetesSpec,
    options: &GatewayOptions,
    decision_header: &str,
    backends: &[&Backend],
) -> Value {
    let backend_ref =
        |b: &Backend| json!([{"group": "", "kind": "Service", "name": b.service, "port": b.port}]);
    let mut rules: Vec<Value> = backends
        .iter()
        .skip(1)
        .map(|b| {
            named_rule(
                b,
                json!({
                    "matches": [{
                        "path": {"type": "PathPrefix", "value": "/"},
                        "headers": [{"type": "Exact", "name": decision_header, "value": b.variant}]
                    }],
                    "backendRefs": backend_ref(b),
                }),
            )
        })
        .collect();
    if let Some(fallback) = backends.first() {
        rules.push(named_rule(
            fallback,
            json!({
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "backendRefs": backend_ref(fallback),
            }),
        ));
    }
    let mut spec = json!({
        "parentRefs": [{
            "group": GATEWAY_API_GROUP,
            "kind": "Gateway",
            "namespace": options.gateway.namespace,
            "name": options.gateway.name,
        }],
        "rules": rules,
    });
    if !options.hostnames.is_empty() {
        spec["hostnames"] = json!(options.hostnames);
    }
    json!({
        "apiVersion": HTTP_ROUTE_API_VERSION,
        "kind": "HTTPRoute",
        "metadata": metadata(&kubernetes.name, &kubernetes.namespace),
        "spec": spec,
    })
}

/// A rule named after its variant, when the variant's name is a valid rule name (a
/// variant may contain `_`, a rule name may not; such a rule stays unnamed rather than
/// renamed, so two variants can never end up with one name).
fn named_rule(backend: &Backend, mut rule: Value) -> Value {
    if is_object_name(&backend.variant) {
        rule["name"] = json!(backend.variant);
    }
    rule
}

/// The Istio WasmPlugin attached to the Gateway by `targetRefs`, in the Gateway's
/// namespace (a WasmPlugin cannot target another namespace).
pub fn wasm_plugin(kubernetes: &KubernetesSpec, gateway: &GatewayRef, policy: &Value) -> Value {
    let mut spec = json!({
        "targetRefs": [{"group": GATEWAY_API_GROUP, "kind": "Gateway", "name": gateway.name}],
        "pluginName": kubernetes.filter_name,
        "type": "HTTP",
        "failStrategy": kubernetes.failure_policy.istio_fail_strategy(),
        "pluginConfig": policy,
    });
    match &kubernetes.wasm {
        WasmCode::Local(path) => spec["url"] = json!(format!("file://{}", path)),
        WasmCode::Http { url, sha256 } => {
            spec["url"] = json!(url);
            spec["sha256"] = json!(sha256);
        }
        // Istio requires `sha256` to equal the pulled image's manifest digest.
        WasmCode::Oci { url, digest } => {
            spec["url"] = json!(url);
            spec["sha256"] = json!(digest);
        }
    }
    json!({
        "apiVersion": WASM_PLUGIN_API_VERSION,
        "kind": "WasmPlugin",
        "metadata": metadata(&kubernetes.name, &gateway.namespace),
        "spec": spec,
    })
}

/// The Envoy Gateway EnvoyExtensionPolicy on the rendered HTTPRoute (same namespace and
/// name). A module on the proxy's disk cannot be named there: Envoy Gateway fetches
/// every module itself, from an image or an HTTP URL.
pub fn envoy_extension_policy(
    kubernetes: &KubernetesSpec,
    policy: &Value,
) -> Result<Value, GatewayRenderError> {
    let code = match &kubernetes.wasm {
        WasmCode::Local(path) => {
            return Err(GatewayRenderError::Usage(format!(
                "--target envoy-gateway: sink.kubernetes.wasm.local {:?} is a file on the proxy, which Envoy Gateway cannot load; use wasm.oci (an image `make oci` built, pinned by digest) or wasm.http",
                path
            )))
        }
        WasmCode::Http { url, sha256 } => {
            json!({"type": "HTTP", "http": {"url": url, "sha256": sha256}})
        }
        // Envoy Gateway takes the image reference without the scheme and compares
        // `sha256` with the pulled image's digest (not the module's checksum).
        WasmCode::Oci { url, digest } => json!({"type": "Image", "image": {
            "url": url.strip_prefix("oci://").unwrap_or(url),
            "sha256": digest,
        }}),
    };
    Ok(json!({
        "apiVersion": ENVOY_EXTENSION_POLICY_API_VERSION,
        "kind": "EnvoyExtensionPolicy",
        "metadata": metadata(&kubernetes.name, &kubernetes.namespace),
        "spec": {
            "targetRefs": [{"group": GATEWAY_API_GROUP, "kind": "HTTPRoute", "name": kubernetes.name}],
            "wasm": [{
                "name": kubernetes.filter_name,
                "rootID": kubernetes.filter_name,
                "code": code,
                "config": policy,
                "failOpen": envoy_gateway_fail_open(kubernetes.failure_policy),
            }],
        },
    }))
}

/// A DNS-1123 label: what a namespace or a Service name must be.
fn is_dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// A DNS-1123 subdomain: what most object names must be.
fn is_object_name(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_refs_and_backends_parse_or_say_why() {
        assert_eq!(
            "infra/edge".parse::<GatewayRef>(),
            Ok(GatewayRef {
                namespace: "infra".into(),
                name: "edge".into()
            })
        );
        for bad in ["edge", "/edge", "infra/", "Infra/edge", "a/b/c"] {
            assert!(bad.parse::<GatewayRef>().is_err(), "{bad}");
        }
        assert_eq!(
            "canary=checkout-canary:8080".parse::<Backend>(),
            Ok(Backend {
                variant: "canary".into(),
                service: "checkout-canary".into(),
                port: 8080
            })
        );
        for (bad, why) in [
            ("canary", "no '='"),
            ("canary=svc", "no ':PORT'"),
            ("=svc:80", "no variant"),
            ("canary=Svc:80", "DNS label"),
            ("canary=svc:0", "1 to 65535"),
            ("canary=svc:http", "1 to 65535"),
        ] {
            let error = bad.parse::<Backend>().expect_err(bad);
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn only_an_explicit_fail_closed_renders_fail_open_false() {
        assert!(envoy_gateway_fail_open(FailurePolicy::Open));
        assert!(envoy_gateway_fail_open(FailurePolicy::Reload));
        assert!(!envoy_gateway_fail_open(FailurePolicy::Closed));
    }
}
