//! The rollout spec as written: one set of types for the YAML file and for the `spec` of
//! the `Rollout` custom resource (`meshcanary.io/v1alpha1`). Serde reads them, schemars
//! describes them (each field's doc comment is its description in the CRD), and
//! [`crate::spec`] validates them in one pass: the schema's problems (types, unknown
//! fields, required fields) and then the meaning (ranges, cross-field rules), every
//! problem with its path.
//!
//! Fields that are required are still `Option` here, marked required in the schema: a
//! document with a missing field is still read, so the meaning of the rest is checked
//! in the same pass and the user fixes everything in one round.
//!
//! A few values take more than one shape in the file format (a duration is `10s` or a
//! number of seconds, a URL list is one URL or a list, the policy is a file path or an
//! inline object). The API server's structural schemas cannot say "a string or a list",
//! so those fields are typed loosely in the schema ([`Loose`]) and checked by
//! [`crate::spec`] alone.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The rollout spec: which policy and split rule to drive, the steps, the analysis
/// limits, where metrics come from and where the policy goes.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "meshcanary.io",
    version = "v1alpha1",
    kind = "Rollout",
    namespaced,
    status = "crate::kubernetes::status::RolloutStatus",
    shortname = "mcr",
    category = "meshcanary",
    doc = "A canary release driven by meshcanary: the spec is the rollout spec (the same fields as a spec file), the status says where it stands and why.",
    // Raw JSON (not `printcolumn(...)`): clippy reads repeated `type_ = …` in the
    // structured form as duplicated attributes.
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Progressing, Paused, Promoted, RolledBack, Aborted or Invalid"}"#,
    printcolumn = r#"{"name": "Canary", "type": "integer", "jsonPath": ".status.canaryWeight", "description": "Canary weight applied, percent"}"#,
    printcolumn = r#"{"name": "Step", "type": "string", "jsonPath": ".status.stepText", "description": "The step being judged, of how many"}"#,
    printcolumn = r#"{"name": "Reason", "type": "string", "jsonPath": ".status.lastVerdict.reason", "priority": 1, "description": "The last verdict's reason"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
pub struct RolloutDocument {
    /// The base policy. In a file: the path of its JSON file, relative to the spec's
    /// folder, or the policy inline as an object. In a Rollout: the policy inline as an
    /// object (or use `policy_from`). Exactly one of `policy`, `policy_from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "loose")]
    pub policy: Option<Value>,
    /// Where to read the base policy from instead of `policy` (Rollouts only): a key of
    /// a ConfigMap in the Rollout's namespace holding the policy JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_from: Option<PolicySource>,
    /// Name of the policy's split rule whose weights the controller drives.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split_rule: Option<String>,
    /// The variant under test; it must be one of the split rule's variants, and the
    /// others are the baseline.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
    /// Canary weight per step, in percent: strictly increasing, the last one 100.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<u32>>,
    /// Minimum time in a step before it can be promoted (`500ms`, `10s`, `2m`, `1h` or a
    /// number of seconds). Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration")]
    pub step_min_duration: Option<Value>,
    /// Time between two evaluations, at least `100ms`. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration")]
    pub interval: Option<Value>,
    /// The limits and statistics of the verdict; every field has a default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisDocument>,
    /// Where metrics are read (exactly one of `envoy_admin`, `prometheus`). Default: the
    /// Envoy admin at `http://127.0.0.1:9901`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceDocument>,
    /// Where the policy is written (exactly one of `ecds_file`, `kubernetes`). Required
    /// in a file; a Rollout always writes an EnvoyFilter (`kubernetes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<SinkDocument>,
    /// HTTP hooks called during the rollout: gates before the first weight and before
    /// every promotion, calls at every interval, and calls after a rollback and at the end
    /// (see the README's "Webhooks").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<Vec<WebhookDocument>>,
    /// Notifications of step changes, verdicts and outcomes to JSON webhooks and
    /// Slack-compatible incoming webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifyDocument>,
}

/// One webhook: an HTTP POST with a JSON body at one moment of the rollout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookDocument {
    /// Names the hook in progress lines, events and payloads; unique in the spec.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When it is called, and what its answer does.
    #[schemars(required)]
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<WebhookTypeDocument>,
    /// Where the POST goes: an `http://` URL.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// How long one attempt may take (`500ms`, `10s`; at most `60s`). Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration")]
    pub timeout: Option<Value>,
    /// Extra attempts after a failed one (no answer, a timeout, 5xx or 429; never after a
    /// refusal such as 403), 0 to 5. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// `pre-rollout` and `rollout` hooks only: intervals failed in a row (one count per
    /// interval, however often it was retried) before the rollout is rolled back. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u32>,
    /// Passed as is in the payload's `metadata`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// When a webhook is called, and what its answer does (the controller's
/// [`crate::spec::webhooks::WebhookKind`] too).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum WebhookTypeDocument {
    /// Before the first weight is applied; the rollout waits until it answers 2xx, and
    /// rolls back after `max_failures` failed intervals in a row.
    PreRollout,
    /// Before every promotion (and the completion): without a 2xx, no promotion.
    ConfirmPromotion,
    /// At every interval while progressing: a failure holds promotion for that interval,
    /// `max_failures` in a row roll back.
    Rollout,
    /// After a rollback or an abort is applied; its answer changes nothing.
    Rollback,
    /// After the rollout ended, either way; its answer changes nothing.
    PostRollout,
    /// Every event, fire-and-forget.
    Event,
}

/// Where notifications go, and from which severity on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NotifyDocument {
    /// The least severity sent to a target without its own: `info`, `warning` or
    /// `error`. Default `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<SeverityDocument>,
    /// The receivers (at least one).
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<NotifyTargetDocument>>,
}

/// One notification receiver.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NotifyTargetDocument {
    /// Names the target in logs; unique among the targets.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The payload: `json` (meshcanary's notification object) or `slack` (a
    /// Slack-compatible incoming-webhook message).
    #[schemars(required)]
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<NotifyTypeDocument>,
    /// Where the POST goes: an `http://` URL.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The least severity sent here. Default `notify.severity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<SeverityDocument>,
    /// `slack` only: the message's `channel` (for receivers that honour it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// `slack` only: the message's `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// How long one attempt may take (at most `60s`). Default `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration")]
    pub timeout: Option<Value>,
    /// Extra attempts after a failed one (no answer, a timeout, 5xx or 429), 0 to 5.
    /// Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

/// A notification payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NotifyTypeDocument {
    /// meshcanary's notification object.
    Json,
    /// A Slack-compatible incoming-webhook message (`text`, `channel`, `username`).
    Slack,
}

/// How much a notification matters.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SeverityDocument {
    /// Step changes, the start, a completion.
    Info,
    /// A gate or failing hook holding the rollout, unreadable metrics, a write retried.
    Warning,
    /// A rollback or an abort.
    Error,
}

/// Where a Rollout's base policy is read from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PolicySource {
    /// A key of a ConfigMap in the Rollout's namespace whose value is the policy JSON.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<ConfigMapKeyRef>,
}

/// A key of a ConfigMap in the Rollout's namespace.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConfigMapKeyRef {
    /// The ConfigMap's name.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The key whose value is the policy JSON.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The verdict's limits and statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AnalysisDocument {
    /// Hard guard: roll back at once when the canary's error rate is above this with
    /// confidence, in (0, 1]. Default 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_ceiling: Option<f64>,
    /// Error-rate limit for promotion, in (0, 1). Default 0.01.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// The latency, in ms, above which a request counts as slow; one of Envoy's
    /// histogram bucket boundaries. Default 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_threshold_ms: Option<u32>,
    /// Slow-share limit for promotion, in (0, 1). Default 0.01.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_slow_rate: Option<f64>,
    /// Minimum canary requests in a step before it can be promoted. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
    /// Bound on the probability that a canary as good as its baseline is ever rolled
    /// back by the relative tests, in (0, 1). Default 0.001.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// The relative risk the tests look for (> 1). Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative_risk: Option<f64>,
    /// How long without canary data before acting as `on_no_data` says. Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration")]
    pub no_data_timeout: Option<Value>,
    /// What to do after `no_data_timeout` without data. Default `rollback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_no_data: Option<OnNoDataDocument>,
    /// Dry run: every verdict is computed and reported, but a rollback verdict is never
    /// applied. It is reported as `would roll back: <reason>` and recorded, the canary
    /// keeps its weight and traffic, and the rollout goes on; promotion still needs the
    /// usual evidence. For trying the analysis on a live service before trusting it.
    /// Default `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

/// What to do when no data arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnNoDataDocument {
    /// Roll the canary back.
    Rollback,
    /// Keep holding at the current step.
    Hold,
}

/// Where metrics are read: exactly one of the fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SourceDocument {
    /// Envoy admin endpoints (`http://` URLs, one or a list), summed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "loose")]
    pub envoy_admin: Option<Value>,
    /// A Prometheus server's HTTP API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusDocument>,
}

/// A Prometheus source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PrometheusDocument {
    /// Base URL (`http://`), e.g. `http://prometheus.istio-system:9090`.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "loose")]
    pub url: Option<Value>,
    /// `filter` (the filter's own metrics, default) or `istio` (Istio's standard ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsDocument>,
    /// Extra PromQL label matchers, without braces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matchers: Option<String>,
    /// With `metrics: istio`: the service's `destination_service` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<String>,
    /// With `metrics: istio`: the `reporter` label, `source` (default) or `destination`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporter: Option<ReporterDocument>,
    /// With `metrics: istio`: `destination_version` per variant, when it differs from the
    /// variant's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<BTreeMap<String, String>>,
}

/// Which metrics a Prometheus source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MetricsDocument {
    /// The filter's own per-variant metrics.
    Filter,
    /// Istio's standard metrics, by `destination_version`.
    Istio,
}

/// Istio's `reporter` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReporterDocument {
    /// The caller's sidecar.
    Source,
    /// The callee's sidecar.
    Destination,
}

/// Where the policy is written: exactly one of the fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SinkDocument {
    /// An ECDS file a standalone Envoy watches (files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecds_file: Option<EcdsFileDocument>,
    /// An Istio EnvoyFilter written through the Kubernetes API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesDocument>,
}

/// The ECDS file sink.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EcdsFileDocument {
    /// The file Envoy watches, relative to the spec's folder.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Name of the HTTP filter / ECDS resource. Default `meshcanary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_name: Option<String>,
    /// The filter module Envoy loads, relative to the spec's folder.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wasm: Option<String>,
    /// Envoy admin endpoints that confirm each update (one URL or a list). Default: the
    /// `envoy_admin` source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "loose")]
    pub admin: Option<Value>,
    /// What Envoy does with requests once the filter's VM failed. Default `FAIL_RELOAD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_policy: Option<FailurePolicyDocument>,
}

/// What Envoy does with requests once the filter's Wasm VM failed (a trap, a panic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FailurePolicyDocument {
    /// The next request starts a fresh VM with the same policy (backoff 0.1 s to 1 s).
    #[serde(rename = "FAIL_RELOAD")]
    FailReload,
    /// Requests bypass the failed filter and take Envoy's default route (stable).
    #[serde(rename = "FAIL_OPEN")]
    FailOpen,
    /// Requests through the failed worker are answered 503 (Envoy's own default).
    #[serde(rename = "FAIL_CLOSED")]
    FailClosed,
}

/// The Kubernetes sink: an Istio EnvoyFilter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KubernetesDocument {
    /// Namespace of the EnvoyFilter. Required in a file; in a Rollout, the Rollout's own
    /// namespace (may be omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the EnvoyFilter. Required in a file; in a Rollout, default the Rollout's
    /// name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The proxies that get the filter (the callers' sidecars and the gateways). Omit it
    /// for every workload in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelectorDocument>,
    /// Name of the HTTP filter and of its ECDS resource. Default `meshcanary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_name: Option<String>,
    /// Where the proxies get the module: exactly one of `local`, `http`.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmDocument>,
    /// The patch contexts the filter is installed for. Default both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Vec<ContextDocument>>,
    /// A kubeconfig file, relative to the spec (files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<String>,
    /// What Envoy does with requests once the filter's VM failed. Default `FAIL_RELOAD`
    /// for a `local` module, `FAIL_OPEN` for an `http` one (the Istio agent answers a
    /// failed download with a deny-all filter under the other two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_policy: Option<FailurePolicyDocument>,
}

/// `workloadSelector` of the EnvoyFilter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkloadSelectorDocument {
    /// Labels of the selected workloads (non-empty).
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

/// Where the proxies get the module.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WasmDocument {
    /// An absolute path on the proxy (inside the istio-proxy container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<String>,
    /// A module the Istio agent downloads and checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpWasmDocument>,
    /// An OCI image of the module (`make oci`), pulled by the Istio agent and checked
    /// against the digest the URL pins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciWasmDocument>,
}

/// A module shipped as an OCI image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OciWasmDocument {
    /// `oci://REGISTRY/REPOSITORY[:TAG]@sha256:DIGEST`: always pinned by digest.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// A module downloaded by the Istio agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HttpWasmDocument {
    /// `http://` or `https://` URL of the module.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The module's SHA-256, 64 hex digits.
    #[schemars(required)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// An EnvoyFilter `match.context`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ContextDocument {
    /// The outbound listeners of sidecars: the caller's proxy routes.
    #[serde(rename = "SIDECAR_OUTBOUND")]
    SidecarOutbound,
    /// Gateways.
    #[serde(rename = "GATEWAY")]
    Gateway,
}

/// A value of more than one shape (checked by the spec's validation, not the schema):
/// any JSON the API server keeps as written.
fn loose(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

/// A duration: `10s`-style text or a number of seconds.
fn duration(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "x-kubernetes-int-or-string": true })
}
