//! The rollout spec: which policy and split rule to drive, the steps, the analysis
//! limits, where metrics come from and where the policy goes.
//!
//! One definition, two places it is written: a YAML file (`meshcanary run SPEC`) and the
//! `spec` of a `Rollout` resource. Both are the types of [`document`]; validation is one
//! pass that reports every problem with its path: first the schema's (the CRD's own
//! schema, so the API server and the file reader agree: types, unknown fields, required
//! fields; see [`schema_check`]), then the meaning on the typed value (ranges, durations,
//! the split rule and canary in the policy, …). A value the schema refused is left out
//! of the typed read, so the rest is still checked in the same pass. The result is a
//! [`RolloutSpec`], what the controller drives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use meshcanary_policy::envoy::FailurePolicy;
use meshcanary_policy::walk::{join, kind};
use meshcanary_policy::{Action, ConfigErrors, Policy};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::render::with_canary_weight;
use crate::verdict::{self, Analysis, OnNoData};

pub mod document;
pub mod schema_check;
pub mod webhooks;

use document::{
    AnalysisDocument, ContextDocument, EcdsFileDocument, FailurePolicyDocument, KubernetesDocument,
    MetricsDocument, OnNoDataDocument, PrometheusDocument, ReporterDocument, RolloutDocument,
    SinkDocument, SourceDocument, WasmDocument,
};

/// Envoy's default histogram bucket boundaries (milliseconds for the filter's latency
/// histograms). The slow-request test reads the histogram at one of them.
pub const ENVOY_DEFAULT_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// A validated rollout spec.
#[derive(Debug, Clone)]
pub struct RolloutSpec {
    /// Where the spec was read from; relative paths in it are relative to its folder.
    pub file: PathBuf,
    /// Content hash (hex) of the spec text and the base policy file: names the release.
    pub revision: String,
    /// The base policy (as written, so fields the controller does not touch are kept).
    pub policy_document: Value,
    /// The base policy, validated.
    pub policy: Policy,
    /// Name of the split rule whose weights the controller drives.
    pub split_rule: String,
    /// The variant under test; the split's other variants are the baseline.
    pub canary: String,
    /// What the verdict depends on: steps (canary percent, increasing, the last 100),
    /// minimum step time and the analysis limits.
    pub judge: verdict::Spec,
    /// Time between two evaluations.
    pub interval: Duration,
    /// `analysis.dry_run`: rollback verdicts are reported and recorded, never applied
    /// (the driver's decision, [`crate::rollout`]; the verdict engine does not know it).
    pub dry_run: bool,
    /// Where metrics are read.
    pub source: SourceSpec,
    /// Where the policy is written.
    pub sink: SinkSpec,
    /// The webhooks, in the spec's order (see [`crate::hooks`]).
    pub webhooks: Vec<webhooks::WebhookSpec>,
    /// The notification targets, in the spec's order (see [`crate::notify`]).
    pub notify: Vec<webhooks::NotifyTarget>,
}

/// Where metrics are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// Envoy admin endpoints, summed.
    EnvoyAdmin(Vec<String>),
    /// A Prometheus server's HTTP API.
    Prometheus {
        /// Base URL, e.g. `http://127.0.0.1:9090`.
        url: String,
        /// Extra label matchers (PromQL, without braces) picking the series that count.
        matchers: String,
        /// Which metrics: the filter's own, or Istio's standard ones.
        metrics: PrometheusMetrics,
    },
}

/// Which metrics a Prometheus source reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrometheusMetrics {
    /// The filter's per-variant metrics (`meshcanary_<policy>_variant_<variant>_…`).
    Filter,
    /// Istio's `istio_requests_total` and `istio_request_duration_milliseconds_bucket`,
    /// by `destination_version`.
    Istio {
        /// The service's `destination_service` label, e.g. `checkout.shop.svc.cluster.local`.
        destination_service: String,
        /// The `reporter` label: `source` (the caller's sidecar, default) or `destination`.
        reporter: String,
        /// `destination_version` per variant, when it differs from the variant's name.
        versions: std::collections::BTreeMap<String, String>,
    },
}

/// Where the policy is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    /// An ECDS file a standalone Envoy watches.
    EcdsFile(EcdsFileSpec),
    /// An Istio EnvoyFilter, written through the Kubernetes API.
    Kubernetes(KubernetesSpec),
}

/// The ECDS file sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcdsFileSpec {
    /// The file Envoy watches (`path_config_source.path`).
    pub path: PathBuf,
    /// Name of the HTTP filter / ECDS resource (`meshcanary` by default).
    pub filter_name: String,
    /// The filter module Envoy loads.
    pub wasm: PathBuf,
    /// Envoy admin endpoints that confirm each update (default: the envoy_admin source's).
    pub admin: Vec<String>,
    /// What Envoy does with requests once the filter's VM failed (`FAIL_RELOAD` by default).
    pub failure_policy: FailurePolicy,
}

/// The Kubernetes sink: an Istio `EnvoyFilter` (`networking.istio.io/v1alpha3`) that
/// installs the filter before `envoy.filters.http.router` and delivers the policy by
/// ECDS, written by server-side apply (see [`crate::sink::kubernetes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSpec {
    /// Namespace of the EnvoyFilter (and of the controller's Lease).
    pub namespace: String,
    /// Name of the EnvoyFilter; the Lease is `meshcanary-<name>`.
    pub name: String,
    /// `workloadSelector.labels`: the proxies that get the filter (the callers' sidecars
    /// and the gateways, since routing happens on the caller's side). `None`: every
    /// workload in the namespace (every workload in the mesh in Istio's root namespace).
    pub workload_selector: Option<BTreeMap<String, String>>,
    /// Name of the HTTP filter and of its ECDS resource (`meshcanary` by default).
    pub filter_name: String,
    /// Where the proxies get the module.
    pub wasm: WasmCode,
    /// The patch contexts the filter is installed for (default both, in this order).
    pub context: Vec<PatchContext>,
    /// A kubeconfig file (relative to the spec); default: in-cluster, then `KUBECONFIG`,
    /// then `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// What Envoy does with requests once the filter's VM failed. Default `FAIL_RELOAD`
    /// for a module on the proxy's disk; `FAIL_OPEN` for one the Istio agent downloads
    /// (`wasm.http`, `wasm.oci`), because the agent answers a failed download with a
    /// deny-all filter under any other policy.
    pub failure_policy: FailurePolicy,
}

/// `vm_config.code` of the Wasm filter in the EnvoyFilter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WasmCode {
    /// `local.filename`: an absolute path on the proxy (mounted into `istio-proxy`).
    Local(String),
    /// `remote.http_uri`: the Istio agent downloads the module and checks its sha256.
    Http {
        /// `http://` or `https://` URL of the module.
        url: String,
        /// Lower-case hex SHA-256 of the module.
        sha256: String,
    },
    /// `remote.http_uri` with an `oci://` URL: the Istio agent pulls the image (the
    /// compat-variant shape `make oci` builds) and checks `sha256` against the image's
    /// manifest digest. Always pinned by digest: a tag alone can move.
    Oci {
        /// `oci://REGISTRY/REPOSITORY[:TAG]@sha256:DIGEST`, as written in the spec.
        url: String,
        /// The image's manifest digest from `url`, lower-case hex without `sha256:`.
        digest: String,
    },
}

/// An EnvoyFilter `match.context` the filter is installed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchContext {
    /// The outbound listeners of sidecars: the caller's proxy routes.
    SidecarOutbound,
    /// Gateways.
    Gateway,
}

impl PatchContext {
    /// The name Istio uses.
    pub fn as_str(self) -> &'static str {
        match self {
            PatchContext::SidecarOutbound => "SIDECAR_OUTBOUND",
            PatchContext::Gateway => "GATEWAY",
        }
    }
}

/// Names one rollout; a record of another rollout is never resumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutId {
    /// The policy's `name`.
    pub policy: String,
    /// The split rule driven.
    pub split_rule: String,
    /// The variant under test.
    pub canary: String,
    /// Content hash of the spec and base policy: a changed spec is a new release, so a
    /// finished record of another revision does not stop a new rollout.
    #[serde(default)]
    pub revision: String,
}

impl RolloutId {
    /// Same policy, rule and canary (the revision may differ).
    pub fn same_target(&self, other: &RolloutId) -> bool {
        self.policy == other.policy
            && self.split_rule == other.split_rule
            && self.canary == other.canary
    }
}

/// Where a spec document was written, which decides how its policy is found and which
/// sinks it may name.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// A spec file; relative paths in it are relative to its folder.
    File(&'a Path),
    /// The `spec` of a `Rollout` resource.
    Rollout(&'a RolloutOrigin),
}

/// What a `Rollout` resource's spec is read with.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutOrigin {
    /// The Rollout's namespace: the EnvoyFilter's too.
    pub namespace: String,
    /// The Rollout's name: the EnvoyFilter's by default.
    pub name: String,
    /// The text of `policy_from`'s ConfigMap key, as read by the caller (the watcher), or
    /// why it could not be read; `None` when the spec has no `policy_from`.
    pub referenced_policy: Option<Result<String, String>>,
}

impl RolloutOrigin {
    /// Where the spec "is", for messages: `namespace/name`.
    pub fn location(&self) -> PathBuf {
        PathBuf::from(format!("{}/{}", self.namespace, self.name))
    }
}

/// The schema of a Rollout's `spec`, as the generated CRD has it.
pub fn document_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(document::Rollout::crd()).unwrap_or(Value::Null);
        crd.pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec")
            .cloned()
            .unwrap_or(Value::Null)
    })
}

/// Better words than the schema's for a few values.
fn wording(path: &str) -> Option<&'static str> {
    match path {
        "steps[]" => Some("a whole percentage"),
        "sink.kubernetes.context[]" => {
            Some("SIDECAR_OUTBOUND or GATEWAY (routing happens on the caller's proxy)")
        }
        _ => None,
    }
}

/// Whether `inner` is the value at `outer` or inside it.
fn inside(outer: &str, inner: &str) -> bool {
    !outer.is_empty()
        && inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// Reads a spec document: the schema's problems (each refused value left out), then the
/// typed document.
pub fn read_document(mut value: Value, errors: &mut ConfigErrors) -> Option<RolloutDocument> {
    if !value.is_object() {
        errors.push(
            "",
            format!(
                "expected a map of the spec's fields, found {}",
                kind(&value)
            ),
        );
        return None;
    }
    schema_check::check(&mut value, document_schema(), "", wording, errors);
    match serde_json::from_value(value) {
        Ok(document) => Some(document),
        Err(e) => {
            errors.push("", format!("cannot read the spec: {}", e));
            None
        }
    }
}

impl RolloutSpec {
    /// Reads and validates a spec file, reporting every problem at once.
    pub fn load(file: &Path) -> Result<RolloutSpec, ConfigErrors> {
        match std::fs::read_to_string(file) {
            Ok(text) => RolloutSpec::parse(&text, file),
            Err(e) => {
                let mut errors = ConfigErrors::default();
                errors.push("", format!("cannot read {}: {}", file.display(), e));
                Err(errors)
            }
        }
    }

    /// Validates spec text; `file` anchors relative paths and is read for nothing else
    /// (the base policy is read from disk).
    pub fn parse(text: &str, file: &Path) -> Result<RolloutSpec, ConfigErrors> {
        let value: Value = match serde_saphyr::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                let mut errors = ConfigErrors::default();
                errors.push("", format!("not valid YAML: {}", e));
                return Err(errors);
            }
        };
        RolloutSpec::from_value(value, Origin::File(file), text.as_bytes())
    }

    /// Validates a Rollout resource's `spec`.
    pub fn from_rollout(spec: &Value, origin: &RolloutOrigin) -> Result<RolloutSpec, ConfigErrors> {
        let content = spec.to_string();
        RolloutSpec::from_value(spec.clone(), Origin::Rollout(origin), content.as_bytes())
    }

    /// Validates a spec document written at `origin`; `content` (the text as written)
    /// and the base policy name the release.
    pub fn from_value(
        value: Value,
        origin: Origin<'_>,
        content: &[u8],
    ) -> Result<RolloutSpec, ConfigErrors> {
        let mut schema_errors = ConfigErrors::default();
        let document = read_document(value, &mut schema_errors);
        let mut meaning = ConfigErrors::default();
        let spec = document.and_then(|d| {
            Checker {
                origin,
                errors: &mut meaning,
                schema_errors: &schema_errors,
            }
            .spec(&d)
        });
        let mut errors = schema_errors.clone();
        for problem in meaning.iter() {
            let repeated = schema_errors
                .iter()
                .any(|s| inside(&s.path, &problem.path) || s == problem);
            if !repeated {
                errors.push(&problem.path, problem.message.clone());
            }
        }
        match spec {
            Some(mut spec) if errors.is_empty() => {
                let mut content = content.to_vec();
                content.extend_from_slice(spec.policy_document.to_string().as_bytes());
                spec.revision = format!(
                    "{:016x}",
                    meshcanary_policy::bucket::fnv_position(b"meshcanary/revision", &content)
                );
                Ok(spec)
            }
            _ => Err(errors),
        }
    }

    /// The split rule's variants other than the canary (the baseline), in listing order.
    pub fn baseline(&self) -> Vec<String> {
        let rule = self
            .policy
            .rule_index(&self.split_rule)
            .map(|i| &self.policy.rules[i]);
        match rule.map(|r| &r.action) {
            Some(Action::Split(split)) => split
                .variants
                .iter()
                .map(|v| self.policy.variants[*v].clone())
                .filter(|v| *v != self.canary)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The rollout's identity.
    pub fn id(&self) -> RolloutId {
        RolloutId {
            policy: self.policy.name.clone(),
            split_rule: self.split_rule.clone(),
            canary: self.canary.clone(),
            revision: self.revision.clone(),
        }
    }

    /// The policy document with the canary at `weight` percent.
    pub fn policy_at(&self, weight: u32) -> Result<Value, String> {
        with_canary_weight(
            &self.policy_document,
            &self.split_rule,
            &self.canary,
            weight,
        )
    }
}

/// The meaning of a typed document: ranges, formats, cross-field rules, the policy.
struct Checker<'a, 'e> {
    origin: Origin<'a>,
    errors: &'e mut ConfigErrors,
    /// The schema's problems: a list item reported at exactly its path was left out of
    /// the typed read, which [`Checker::original_index`] undoes for messages.
    schema_errors: &'e ConfigErrors,
}

impl Checker<'_, '_> {
    /// The index, as written, of item `index` of the list at `path` after the items the
    /// schema refused were left out.
    fn original_index(&self, path: &str, index: usize) -> usize {
        let removed = |k: usize| {
            let item = format!("{}[{}]", path, k);
            self.schema_errors.iter().any(|e| e.path == item)
        };
        (0..).filter(|k| !removed(*k)).nth(index).unwrap_or(index)
    }

    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(path, message);
    }

    fn base(&self) -> PathBuf {
        match self.origin {
            Origin::File(file) => file.parent().map(Path::to_path_buf).unwrap_or_default(),
            Origin::Rollout(_) => PathBuf::new(),
        }
    }

    fn required<'v, T>(&mut self, value: &'v Option<T>, path: &str) -> Option<&'v T> {
        if value.is_none() {
            self.error(path, "required field is missing");
        }
        value.as_ref()
    }

    fn spec(&mut self, d: &RolloutDocument) -> Option<RolloutSpec> {
        let policy_read = self.policy(d);
        let split_rule = self.required(&d.split_rule, "split_rule").cloned();
        let canary = self.required(&d.canary, "canary").cloned();
        if let (Some((_, policy)), Some(rule), Some(canary)) = (&policy_read, &split_rule, &canary)
        {
            self.check_split(policy, rule, canary);
        }
        let steps = self.required(&d.steps, "steps").and_then(|s| self.steps(s));
        let step_min_duration = self.duration(
            d.step_min_duration.as_ref(),
            "step_min_duration",
            Duration::from_secs(60),
        );
        let interval = self.duration(d.interval.as_ref(), "interval", Duration::from_secs(10));
        if let Some(i) = interval {
            if i < Duration::from_millis(100) {
                self.error("interval", "must be at least 100ms");
            }
        }
        let analysis = self.analysis(d.analysis.as_ref().unwrap_or(&AnalysisDocument::default()));
        let source = match &d.source {
            None => Some(SourceSpec::EnvoyAdmin(vec![
                "http://127.0.0.1:9901".to_string()
            ])),
            Some(s) => self.source(s),
        };
        let sink = self.sink(d.sink.as_ref(), source.as_ref());
        let hooks = self.webhooks(d.webhooks.as_ref());
        let notify = self.notify(d.notify.as_ref());
        // Ranges and cross-field rules belong to the verdict's own spec; run them on what
        // could be read (defaults standing in for unreadable fields, whose problems were
        // already reported) so that every problem shows at once.
        let judge = verdict::Spec {
            steps: steps.clone().unwrap_or_else(|| vec![1, 100]),
            step_min_duration: step_min_duration.unwrap_or(Duration::from_secs(1)),
            analysis: analysis.clone().map(|(a, _)| a).unwrap_or_default(),
        };
        let reported: Vec<String> = self.errors.iter().map(|e| e.path.clone()).collect();
        for problem in judge.problems() {
            if !reported.iter().any(|p| p.starts_with(&problem.path)) {
                self.error(&problem.path, problem.message);
            }
        }
        let (policy_document, policy) = policy_read?;
        steps?;
        step_min_duration?;
        if !analysis?.1 {
            return None;
        }
        let file = match self.origin {
            Origin::File(file) => file.to_path_buf(),
            Origin::Rollout(r) => r.location(),
        };
        Some(RolloutSpec {
            file,
            revision: String::new(),
            policy_document,
            policy,
            split_rule: split_rule?,
            canary: canary?,
            judge,
            interval: interval?,
            dry_run: d.analysis.as_ref().and_then(|a| a.dry_run).unwrap_or(false),
            source: source?,
            sink: sink?,
            webhooks: hooks?,
            notify: notify?,
        })
    }

    /// The base policy, from `policy` (a file path, or inline) or `policy_from`; its own
    /// errors are reported under `policy`.
    fn policy(&mut self, d: &RolloutDocument) -> Option<(Value, Policy)> {
        let (text, origin) = match (&d.policy, &d.policy_from, self.origin) {
            (Some(_), Some(_), _) => {
                self.error("policy_from", "give either policy or policy_from, not both");
                return None;
            }
            (None, None, _) => {
                self.error("policy", "required field is missing");
                return None;
            }
            (Some(Value::Object(_)), None, _) => {
                let document = d.policy.clone().unwrap_or_default();
                return self.policy_document(document, "the inline policy");
            }
            (Some(Value::String(path)), None, Origin::File(_)) => {
                let path = self.base().join(path);
                match std::fs::read(&path) {
                    Ok(bytes) => (bytes, path.display().to_string()),
                    Err(e) => {
                        self.error("policy", format!("cannot read {}: {}", path.display(), e));
                        return None;
                    }
                }
            }
            (Some(Value::String(path)), None, Origin::Rollout(_)) => {
                self.error(
                    "policy",
                    format!("{:?}: a Rollout cannot name a file; write the policy inline as an object, or use policy_from.config_map_key_ref", path),
                );
                return None;
            }
            (Some(other), None, _) => {
                self.error(
                    "policy",
                    format!(
                        "expected a file path or the policy as an object, found {}",
                        kind(other)
                    ),
                );
                return None;
            }
            (None, Some(from), Origin::Rollout(rollout)) => {
                let key_ref =
                    self.required(&from.config_map_key_ref, "policy_from.config_map_key_ref")?;
                let name = self.required(&key_ref.name, "policy_from.config_map_key_ref.name");
                let key = self.required(&key_ref.key, "policy_from.config_map_key_ref.key");
                let (name, key) = (name?.clone(), key?.clone());
                match &rollout.referenced_policy {
                    Some(Ok(text)) => (
                        text.clone().into_bytes(),
                        format!("ConfigMap {}/{} key {}", rollout.namespace, name, key),
                    ),
                    Some(Err(why)) => {
                        self.error("policy_from", why.clone());
                        return None;
                    }
                    None => {
                        self.error(
                            "policy_from",
                            format!("ConfigMap {} key {} was not read", name, key),
                        );
                        return None;
                    }
                }
            }
            (None, Some(_), Origin::File(_)) => {
                self.error(
                    "policy_from",
                    "only a Rollout reads its policy from a ConfigMap; in a file, give policy: PATH.json",
                );
                return None;
            }
        };
        let document: Value = match serde_json::from_slice(&text) {
            Ok(v) => v,
            Err(e) => {
                self.error("policy", format!("{} is not valid JSON: {}", origin, e));
                return None;
            }
        };
        self.policy_document(document, &origin)
    }

    fn policy_document(&mut self, document: Value, origin: &str) -> Option<(Value, Policy)> {
        match Policy::from_value(&document) {
            Ok(policy) => Some((document, policy)),
            Err(errors) => {
                for e in errors.iter() {
                    self.error("policy", format!("{}: {}", origin, e));
                }
                None
            }
        }
    }

    fn check_split(&mut self, policy: &Policy, rule: &str, canary: &str) {
        let index = match policy.rule_index(rule) {
            Some(i) => i,
            None => {
                let names: Vec<&str> = policy.rules.iter().map(|r| r.name.as_str()).collect();
                self.error(
                    "split_rule",
                    format!(
                        "the policy has no rule {:?} (rules: {})",
                        rule,
                        names.join(", ")
                    ),
                );
                return;
            }
        };
        match &policy.rules[index].action {
            Action::Split(split) => {
                let in_split = split.variants.iter().any(|v| policy.variants[*v] == canary);
                if !in_split {
                    self.error(
                        "canary",
                        format!(
                            "{:?} is not one of the variants of split rule {:?}",
                            canary, rule
                        ),
                    );
                } else if split.variants.len() < 2 {
                    self.error(
                        "split_rule",
                        "the split needs at least one baseline variant besides the canary",
                    );
                }
            }
            Action::Variant(_) => {
                self.error("split_rule", format!("rule {:?} is not a split", rule));
            }
        }
    }

    fn steps(&mut self, steps: &[u32]) -> Option<Vec<u32>> {
        // A step the schema refused is left out: what remains is not the list as written.
        if self
            .schema_errors
            .iter()
            .any(|e| e.path.starts_with("steps["))
        {
            return None;
        }
        if steps.is_empty() {
            self.error(
                "steps",
                "expected a non-empty list of canary weights in percent",
            );
            return None;
        }
        if steps.last() != Some(&100) {
            self.error("steps", "the last step must be 100 (a full promotion)");
            return None;
        }
        Some(steps.to_vec())
    }

    fn duration(
        &mut self,
        value: Option<&Value>,
        path: &str,
        default: Duration,
    ) -> Option<Duration> {
        match value {
            None => Some(default),
            Some(v) => match parse_duration(v) {
                Ok(d) => Some(d),
                Err(message) => {
                    self.error(path, message);
                    None
                }
            },
        }
    }

    /// The analysis section, and whether every field of it could be read.
    fn analysis(&mut self, a: &AnalysisDocument) -> Option<(Analysis, bool)> {
        let d = Analysis::default();
        let latency_threshold_ms = match a.latency_threshold_ms {
            None => Some(d.latency_threshold_ms),
            Some(ms) if ENVOY_DEFAULT_BUCKETS_MS.contains(&f64::from(ms)) => Some(ms),
            Some(ms) => {
                let bounds: Vec<String> = ENVOY_DEFAULT_BUCKETS_MS
                    .iter()
                    .filter(|b| **b >= 1.0)
                    .map(|b| b.to_string())
                    .collect();
                self.error(
                    "analysis.latency_threshold_ms",
                    format!(
                        "{} is not a latency histogram bucket boundary; use one of {}",
                        ms,
                        bounds.join(", ")
                    ),
                );
                None
            }
        };
        let no_data_timeout = self.duration(
            a.no_data_timeout.as_ref(),
            "analysis.no_data_timeout",
            d.no_data_timeout,
        );
        let ok = latency_threshold_ms.is_some() && no_data_timeout.is_some();
        // Unreadable fields (already reported) stand in as defaults, so the range checks
        // on the readable ones still run in this pass.
        let analysis = Analysis {
            error_ceiling: a.error_ceiling.unwrap_or(d.error_ceiling),
            max_error_rate: a.max_error_rate.unwrap_or(d.max_error_rate),
            latency_threshold_ms: latency_threshold_ms.unwrap_or(d.latency_threshold_ms),
            max_slow_rate: a.max_slow_rate.unwrap_or(d.max_slow_rate),
            min_requests: a.min_requests.unwrap_or(d.min_requests),
            alpha: a.alpha.unwrap_or(d.alpha),
            relative_risk: a.relative_risk.unwrap_or(d.relative_risk),
            no_data_timeout: no_data_timeout.unwrap_or(d.no_data_timeout),
            on_no_data: match a.on_no_data {
                None => d.on_no_data,
                Some(OnNoDataDocument::Rollback) => OnNoData::Rollback,
                Some(OnNoDataDocument::Hold) => OnNoData::Hold,
            },
            ..d
        };
        Some((analysis, ok))
    }

    fn urls(&mut self, value: &Value, path: &str) -> Option<Vec<String>> {
        let items: Vec<&Value> = match value {
            Value::String(_) => vec![value],
            Value::Array(items) if !items.is_empty() => items.iter().collect(),
            _ => {
                self.error(
                    path,
                    format!(
                        "expected a URL or a non-empty list of URLs, found {}",
                        kind(value)
                    ),
                );
                return None;
            }
        };
        let mut urls = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let item_path = if value.is_array() {
                format!("{}[{}]", path, i)
            } else {
                path.to_string()
            };
            match item.as_str() {
                Some(u) if u.starts_with("http://") => {
                    urls.push(u.trim_end_matches('/').to_string())
                }
                // The metrics client is built without TLS (admin endpoints and in-cluster
                // Prometheus are plain HTTP); say so now rather than fail at every read.
                Some(u) if u.starts_with("https://") => {
                    self.error(
                        &item_path,
                        format!("{:?}: https is not supported for metric sources; use http:// (in-cluster or via a local port-forward)", u),
                    );
                    ok = false;
                }
                _ => {
                    self.error(
                        &item_path,
                        format!("expected an http:// URL, found {}", item),
                    );
                    ok = false;
                }
            }
        }
        if ok {
            Some(urls)
        } else {
            None
        }
    }

    fn prometheus(&mut self, p: &PrometheusDocument) -> Option<SourceSpec> {
        let path = "source.prometheus";
        let url = self
            .required(&p.url, "source.prometheus.url")
            .and_then(|u| self.urls(u, "source.prometheus.url"))
            .map(|mut urls| urls.remove(0));
        let matchers = Some(p.matchers.clone().unwrap_or_default());
        let metrics = match p.metrics {
            None | Some(MetricsDocument::Filter) => {
                let istio_only = [
                    ("destination_service", p.destination_service.is_some()),
                    ("reporter", p.reporter.is_some()),
                    ("versions", p.versions.is_some()),
                ];
                for (field, given) in istio_only {
                    if given {
                        self.error(&join(path, field), "only with metrics: istio");
                    }
                }
                Some(PrometheusMetrics::Filter)
            }
            Some(MetricsDocument::Istio) => self.istio_metrics(p),
        };
        Some(SourceSpec::Prometheus {
            url: url?,
            matchers: matchers?,
            metrics: metrics?,
        })
    }

    fn istio_metrics(&mut self, p: &PrometheusDocument) -> Option<PrometheusMetrics> {
        let destination_service = self
            .required(
                &p.destination_service,
                "source.prometheus.destination_service",
            )
            .cloned();
        let reporter = match p.reporter {
            None | Some(ReporterDocument::Source) => "source",
            Some(ReporterDocument::Destination) => "destination",
        };
        let mut versions = BTreeMap::new();
        let mut ok = true;
        for (variant, label) in p.versions.iter().flatten() {
            if label.is_empty() {
                self.error(
                    &format!("source.prometheus.versions.{}", variant),
                    "expected a non-empty destination_version label",
                );
                ok = false;
            } else {
                versions.insert(variant.clone(), label.clone());
            }
        }
        if !ok {
            return None;
        }
        Some(PrometheusMetrics::Istio {
            destination_service: destination_service?,
            reporter: reporter.to_string(),
            versions,
        })
    }

    fn source(&mut self, s: &SourceDocument) -> Option<SourceSpec> {
        match (&s.envoy_admin, &s.prometheus) {
            (Some(v), None) => self
                .urls(v, "source.envoy_admin")
                .map(SourceSpec::EnvoyAdmin),
            (None, Some(p)) => self.prometheus(p),
            _ => {
                self.error("source", "expected exactly one of envoy_admin, prometheus");
                None
            }
        }
    }

    fn sink(
        &mut self,
        sink: Option<&SinkDocument>,
        source: Option<&SourceSpec>,
    ) -> Option<SinkSpec> {
        let rollout = match self.origin {
            Origin::Rollout(r) => Some(r),
            Origin::File(_) => None,
        };
        let empty = SinkDocument::default();
        let sink = match (sink, rollout) {
            (Some(s), _) => s,
            (None, None) => {
                self.error("sink", "required field is missing");
                return None;
            }
            // A Rollout writes an EnvoyFilter; without a sink section it still needs the
            // module's location, reported below.
            (None, Some(_)) => &empty,
        };
        match (&sink.ecds_file, &sink.kubernetes, rollout) {
            (Some(ecds), None, None) => self.ecds_file(ecds, source),
            (None, Some(kubernetes), None) => self.kubernetes(kubernetes),
            (None, Some(kubernetes), Some(r)) => self.rollout_kubernetes(kubernetes, r),
            (Some(_), _, Some(_)) => {
                self.error(
                    "sink.ecds_file",
                    "a Rollout writes an Istio EnvoyFilter: use sink.kubernetes",
                );
                None
            }
            (None, None, Some(_)) => {
                self.error(
                    "sink.kubernetes",
                    "required field is missing (a Rollout needs at least sink.kubernetes.wasm: where the proxies get the module)",
                );
                None
            }
            _ => {
                self.error("sink", "expected ecds_file or kubernetes (exactly one)");
                None
            }
        }
    }

    fn ecds_file(
        &mut self,
        ecds: &EcdsFileDocument,
        source: Option<&SourceSpec>,
    ) -> Option<SinkSpec> {
        let base = self.base();
        let path = self
            .required(&ecds.path, "sink.ecds_file.path")
            .map(|s| base.join(s));
        if let Some(path) = &path {
            let folder_ok = path
                .parent()
                .is_some_and(|d| d.as_os_str().is_empty() || d.is_dir());
            if !folder_ok {
                self.error(
                    "sink.ecds_file.path",
                    format!("folder of {} does not exist", path.display()),
                );
            }
        }
        let filter_name = ecds
            .filter_name
            .clone()
            .unwrap_or_else(|| "meshcanary".to_string());
        let wasm = self
            .required(&ecds.wasm, "sink.ecds_file.wasm")
            .map(|s| base.join(s));
        let admin = match (&ecds.admin, source) {
            (Some(v), _) => self.urls(v, "sink.ecds_file.admin"),
            (None, Some(SourceSpec::EnvoyAdmin(urls))) => Some(urls.clone()),
            (None, Some(SourceSpec::Prometheus { .. })) => {
                self.error(
                    "sink.ecds_file.admin",
                    "required when the source is not envoy_admin: each update is confirmed through Envoy's admin",
                );
                None
            }
            (None, None) => None,
        };
        Some(SinkSpec::EcdsFile(EcdsFileSpec {
            path: path?,
            filter_name,
            wasm: wasm?,
            admin: admin?,
            failure_policy: ecds
                .failure_policy
                .map_or(FailurePolicy::Reload, Self::failure_policy),
        }))
    }

    /// The sink of a Rollout: its EnvoyFilter lives in the Rollout's namespace (so the
    /// Rollout can own it) and is named after it unless `name` says otherwise.
    fn rollout_kubernetes(
        &mut self,
        k: &KubernetesDocument,
        r: &RolloutOrigin,
    ) -> Option<SinkSpec> {
        if let Some(ns) = &k.namespace {
            if *ns != r.namespace {
                self.error(
                    "sink.kubernetes.namespace",
                    format!("{:?}: a Rollout's EnvoyFilter is in the Rollout's own namespace {:?} (omit the field)", ns, r.namespace),
                );
            }
        }
        if k.kubeconfig.is_some() {
            self.error(
                "sink.kubernetes.kubeconfig",
                "a Rollout is driven with the controller's own credentials (omit the field)",
            );
        }
        let with_defaults = KubernetesDocument {
            namespace: Some(r.namespace.clone()),
            name: Some(k.name.clone().unwrap_or_else(|| r.name.clone())),
            kubeconfig: None,
            ..k.clone()
        };
        self.kubernetes(&with_defaults)
    }

    fn kubernetes(&mut self, k: &KubernetesDocument) -> Option<SinkSpec> {
        let namespace = self
            .required(&k.namespace, "sink.kubernetes.namespace")
            .cloned()
            .and_then(|s| self.dns_name(&s, "sink.kubernetes.namespace", 63, false));
        // The Lease is `meshcanary-<name>` and must be a valid name too.
        let name = self
            .required(&k.name, "sink.kubernetes.name")
            .cloned()
            .and_then(|s| self.dns_name(&s, "sink.kubernetes.name", 253 - 11, true));
        let workload_selector = match &k.workload_selector {
            None => Some(None),
            Some(w) => self.workload_selector(w.labels.as_ref()).map(Some),
        };
        let filter_name = match &k.filter_name {
            None => Some("meshcanary".to_string()),
            Some(s) if !s.is_empty() && !s.chars().any(char::is_whitespace) => Some(s.clone()),
            Some(_) => {
                self.error(
                    "sink.kubernetes.filter_name",
                    "must be a non-empty name without spaces",
                );
                None
            }
        };
        let wasm = self
            .required(&k.wasm, "sink.kubernetes.wasm")
            .and_then(|w| self.wasm_code(w));
        let context = match &k.context {
            None => Some(vec![PatchContext::SidecarOutbound, PatchContext::Gateway]),
            Some(v) => self.contexts(v),
        };
        let base = self.base();
        let kubeconfig = k.kubeconfig.as_ref().map(|s| base.join(s));
        let failure_policy = match (k.failure_policy, &wasm) {
            (Some(chosen), _) => Self::failure_policy(chosen),
            (None, Some(WasmCode::Http { .. } | WasmCode::Oci { .. })) => FailurePolicy::Open,
            (None, _) => FailurePolicy::Reload,
        };
        Some(SinkSpec::Kubernetes(KubernetesSpec {
            namespace: namespace?,
            name: name?,
            workload_selector: workload_selector?,
            filter_name: filter_name?,
            wasm: wasm?,
            context: context?,
            kubeconfig,
            failure_policy,
        }))
    }

    /// The policy core's failure policy for the document's name of it.
    fn failure_policy(document: FailurePolicyDocument) -> FailurePolicy {
        match document {
            FailurePolicyDocument::FailReload => FailurePolicy::Reload,
            FailurePolicyDocument::FailOpen => FailurePolicy::Open,
            FailurePolicyDocument::FailClosed => FailurePolicy::Closed,
        }
    }

    /// A Kubernetes object name: a DNS-1123 label (namespaces) or subdomain.
    fn dns_name(&mut self, s: &str, path: &str, max: usize, dots: bool) -> Option<String> {
        if kubernetes_name_ok(s, max, dots) {
            Some(s.to_string())
        } else {
            self.error(
                path,
                format!(
                    "{:?} is not a valid Kubernetes name (lower-case letters, digits and '-'{}, at most {} characters, starting and ending with a letter or digit)",
                    s,
                    if dots { ", '.'" } else { "" },
                    max
                ),
            );
            None
        }
    }

    fn workload_selector(
        &mut self,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Option<BTreeMap<String, String>> {
        let lp = "sink.kubernetes.workload_selector.labels";
        let labels = match labels {
            Some(l) if !l.is_empty() => l,
            Some(_) => {
                self.error(
                    lp,
                    "expected a non-empty map of labels (omit workload_selector to select every workload in the namespace)",
                );
                return None;
            }
            // Reported by the schema (required).
            None => return None,
        };
        let mut ok = true;
        for (key, value) in labels {
            let path = join(lp, key);
            if !label_key_ok(key) {
                self.error(&path, "not a valid label key");
                ok = false;
            }
            if !label_value_ok(value) {
                self.error(&path, format!("{:?} is not a valid label value", value));
                ok = false;
            }
        }
        if ok {
            Some(labels.clone())
        } else {
            None
        }
    }

    fn wasm_code(&mut self, w: &WasmDocument) -> Option<WasmCode> {
        match (&w.local, &w.http, &w.oci) {
            (Some(path), None, None) => {
                if path.starts_with('/') {
                    Some(WasmCode::Local(path.clone()))
                } else {
                    self.error(
                        "sink.kubernetes.wasm.local",
                        format!("{:?}: expected an absolute path on the proxy (inside the istio-proxy container)", path),
                    );
                    None
                }
            }
            (None, Some(h), None) => {
                // Fetched by the Istio agent on each proxy, not by the controller.
                let url = self
                    .required(&h.url, "sink.kubernetes.wasm.http.url")
                    .and_then(|s| {
                        let ok = ["http://", "https://"].iter().any(|scheme| {
                            s.strip_prefix(scheme).is_some_and(|rest| {
                                !rest.is_empty() && !rest.chars().any(char::is_whitespace)
                            })
                        });
                        ok.then(|| s.clone())
                    });
                if let (None, Some(s)) = (&url, &h.url) {
                    self.error(
                        "sink.kubernetes.wasm.http.url",
                        format!("expected an http:// or https:// URL, found {:?}", s),
                    );
                }
                // Istio's agent verifies the download against it; without it, the module
                // is downloaded again and again (Istio's "Distributing WebAssembly Modules").
                let sha256 = self
                    .required(&h.sha256, "sink.kubernetes.wasm.http.sha256")
                    .and_then(|s| {
                        if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
                            Some(s.to_ascii_lowercase())
                        } else {
                            None
                        }
                    });
                if let (None, Some(_)) = (&sha256, &h.sha256) {
                    self.error(
                        "sink.kubernetes.wasm.http.sha256",
                        "expected the module's SHA-256 as 64 hex digits (sha256sum)",
                    );
                }
                Some(WasmCode::Http {
                    url: url?,
                    sha256: sha256?,
                })
            }
            (None, None, Some(o)) => {
                let up = "sink.kubernetes.wasm.oci.url";
                let url = self.required(&o.url, up)?.clone();
                match oci_digest(&url) {
                    Ok(digest) => Some(WasmCode::Oci { url, digest }),
                    Err(why) => {
                        self.error(up, format!("{url:?}: {why}"));
                        None
                    }
                }
            }
            _ => {
                self.error(
                    "sink.kubernetes.wasm",
                    "expected exactly one of local, http, oci",
                );
                None
            }
        }
    }

    fn contexts(&mut self, items: &[ContextDocument]) -> Option<Vec<PatchContext>> {
        let p = "sink.kubernetes.context";
        if items.is_empty() {
            self.error(p, "expected a non-empty list of SIDECAR_OUTBOUND, GATEWAY");
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let context = match item {
                ContextDocument::SidecarOutbound => PatchContext::SidecarOutbound,
                ContextDocument::Gateway => PatchContext::Gateway,
            };
            if out.contains(&context) {
                self.error(
                    &format!("{}[{}]", p, self.original_index(p, i)),
                    format!("{} is listed twice", context.as_str()),
                );
                ok = false;
            }
            out.push(context);
        }
        if ok {
            Some(out)
        } else {
            None
        }
    }
}

/// A Kubernetes object name: a DNS-1123 label (`dots` false) or subdomain of at most
/// `max` characters.
pub fn kubernetes_name_ok(s: &str, max: usize, dots: bool) -> bool {
    let part_ok = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !part.starts_with('-')
            && !part.ends_with('-')
    };
    s.len() <= max
        && if dots {
            s.split('.').all(part_ok)
        } else {
            part_ok(s)
        }
}

/// The manifest digest pinned in an `oci://REGISTRY/REPOSITORY[:TAG]@sha256:DIGEST`
/// reference (lower-case hex), or why the reference is not one. Istio's agent pulls
/// `REGISTRY/REPOSITORY…` and compares the digest of the manifest it gets with the one
/// given, so the digest must be there: a tag alone can be moved to another image.
fn oci_digest(url: &str) -> Result<String, String> {
    const EXPECTED: &str =
        "expected oci://REGISTRY/REPOSITORY@sha256:DIGEST (`make oci` prints it)";
    let Some(rest) = url.strip_prefix("oci://") else {
        return Err(EXPECTED.to_string());
    };
    if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("contains a space or control character; {EXPECTED}"));
    }
    let Some((name, digest)) = rest.split_once('@') else {
        return Err(format!(
            "a tag alone is mutable, pin the image by its digest: {EXPECTED}"
        ));
    };
    let hex = match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) =>
        {
            hex
        }
        _ => {
            return Err(format!(
                "the digest must be sha256: and 64 lower-case hex digits; {EXPECTED}"
            ))
        }
    };
    let Some((registry, path)) = name.split_once('/') else {
        return Err(format!("no repository after the registry; {EXPECTED}"));
    };
    // A tag may stand before the digest (it is ignored); a ':' in the last path element
    // starts it.
    let (repository, tag) = match path.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') => (repository, Some(tag)),
        _ => (path, None),
    };
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.chars().all(|ch| {
                ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '_' | '-')
            })
            && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
    };
    let tag_ok = |t: &str| {
        t.len() <= 128
            && t.starts_with(|ch: char| ch.is_ascii_alphanumeric() || ch == '_')
            && t.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
    };
    if registry.is_empty() {
        return Err(format!("no registry host; {EXPECTED}"));
    }
    if !repository.split('/').all(component_ok) {
        return Err(format!(
            "{repository:?} is not a repository name (lower-case letters, digits, '.', '_', '-', separated by '/'); {EXPECTED}"
        ));
    }
    if let Some(tag) = tag.filter(|t| !tag_ok(t)) {
        return Err(format!("{tag:?} is not a tag; {EXPECTED}"));
    }
    Ok(hex.to_string())
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters (letters, digits, `-`, `_`, `.`, starting and ending alphanumeric).
fn label_key_ok(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    prefix_ok && !name.is_empty() && label_value_ok(name)
}

/// A label value: empty, or at most 63 letters, digits, `-`, `_`, `.`, starting and
/// ending alphanumeric.
fn label_value_ok(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// Parses `500ms`, `10s`, `2m`, `1h` (or a bare number of seconds).
pub fn parse_duration(value: &Value) -> Result<Duration, String> {
    if let Some(secs) = value.as_f64() {
        return if secs.is_finite() && secs >= 0.0 {
            Ok(Duration::from_secs_f64(secs))
        } else {
            Err(format!("expected a duration such as 10s, found {}", value))
        };
    }
    let text = value
        .as_str()
        .ok_or_else(|| format!("expected a duration such as 10s, found {}", kind(value)))?;
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{:?} is not a duration such as 500ms, 10s, 2m or 1h", text))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" | "" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "{:?}: unknown unit {:?} (use ms, s, m or h)",
                text, unit
            ))
        }
    };
    Ok(Duration::from_secs_f64(number * scale))
}
