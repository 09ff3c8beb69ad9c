//! The rollout spec (YAML): which policy and split rule to drive, the steps, the
//! analysis limits, where metrics come from and where the policy goes.
//!
//! Like the policy, the spec is read through a JSON value and validated by a walker that
//! reports every problem with its path, unknown fields included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshcanary_policy::envoy::FailurePolicy;
use meshcanary_policy::walk::{join, kind};
use meshcanary_policy::{Action, ConfigErrors, Policy, Walker};
use serde_json::{Map, Value};

use crate::verdict::{self, Analysis, OnNoData};

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
    /// Where metrics are read.
    pub source: SourceSpec,
    /// Where the policy is written.
    pub sink: SinkSpec,
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

const KUBERNETES_FIELDS: &[&str] = &[
    "namespace",
    "name",
    "workload_selector",
    "filter_name",
    "wasm",
    "context",
    "kubeconfig",
    "failure_policy",
];

const SPEC_FIELDS: &[&str] = &[
    "policy",
    "split_rule",
    "canary",
    "steps",
    "step_min_duration",
    "interval",
    "analysis",
    "source",
    "sink",
];
const ANALYSIS_FIELDS: &[&str] = &[
    "error_ceiling",
    "max_error_rate",
    "latency_threshold_ms",
    "max_slow_rate",
    "min_requests",
    "alpha",
    "relative_risk",
    "no_data_timeout",
    "on_no_data",
];

impl RolloutSpec {
    /// Reads and validates a spec file, reporting every problem at once.
    pub fn load(file: &Path) -> Result<RolloutSpec, ConfigErrors> {
        let mut walker = Walker::default();
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                walker.error("", format!("cannot read {}: {}", file.display(), e));
                return Err(walker.errors);
            }
        };
        RolloutSpec::parse(&text, file)
    }

    /// Validates spec text; `file` anchors relative paths and is read for nothing else
    /// (the base policy is read from disk).
    pub fn parse(text: &str, file: &Path) -> Result<RolloutSpec, ConfigErrors> {
        let mut walker = Walker::default();
        let value: Value = match serde_saphyr::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                walker.error("", format!("not valid YAML: {}", e));
                return Err(walker.errors);
            }
        };
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut reader = Reader { w: walker, base };
        let spec = reader.spec(&value, file).map(|mut spec| {
            let mut content = text.as_bytes().to_vec();
            content.extend_from_slice(spec.policy_document.to_string().as_bytes());
            spec.revision = format!(
                "{:016x}",
                meshcanary_policy::bucket::fnv_position(b"meshcanary/revision", &content)
            );
            spec
        });
        reader.w.finish(spec)
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
}

struct Reader {
    w: Walker,
    base: PathBuf,
}

impl Reader {
    fn spec(&mut self, value: &Value, file: &Path) -> Option<RolloutSpec> {
        let map = self.w.object(value, "", SPEC_FIELDS)?;
        let policy_path = self
            .w
            .required(map, "", "policy")
            .and_then(|v| self.w.string(v, "policy"))
            .map(|p| self.base.join(p));
        let policy_read = policy_path.and_then(|p| self.policy(&p));
        let split_rule = self
            .w
            .required(map, "", "split_rule")
            .and_then(|v| self.w.string(v, "split_rule"));
        let canary = self
            .w
            .required(map, "", "canary")
            .and_then(|v| self.w.string(v, "canary"));
        if let (Some((_, policy)), Some(rule), Some(canary)) = (&policy_read, split_rule, canary) {
            self.check_split(policy, rule, canary);
        }
        let steps = self
            .w
            .required(map, "", "steps")
            .and_then(|v| self.steps(v));
        let step_min_duration =
            self.duration_field(map, "", "step_min_duration", Some(Duration::from_secs(60)));
        let interval = self.duration_field(map, "", "interval", Some(Duration::from_secs(10)));
        if let Some(i) = interval {
            if i < Duration::from_millis(100) {
                self.w.error("interval", "must be at least 100ms");
            }
        }
        let analysis = match map.get("analysis") {
            Some(v) => self.analysis(v),
            None => self.analysis(&Value::Object(Map::new())),
        };
        let source = match map.get("source") {
            None => Some(SourceSpec::EnvoyAdmin(vec![
                "http://127.0.0.1:9901".to_string()
            ])),
            Some(v) => self.source(v),
        };
        let sink = self
            .w
            .required(map, "", "sink")
            .and_then(|v| self.sink(v, source.as_ref()));
        // Ranges and cross-field rules belong to the verdict's own spec; run them on what
        // could be read (defaults standing in for unreadable fields, whose problems were
        // already reported) so that every problem shows at once.
        let judge = verdict::Spec {
            steps: steps.clone().unwrap_or_else(|| vec![1, 100]),
            step_min_duration: step_min_duration.unwrap_or(Duration::from_secs(1)),
            analysis: analysis.clone().map(|(a, _)| a).unwrap_or_default(),
        };
        let reported: Vec<String> = self.w.errors.iter().map(|e| e.path.clone()).collect();
        for problem in judge.problems() {
            if !reported.iter().any(|p| p.starts_with(&problem.path)) {
                self.w.error(&problem.path, problem.message);
            }
        }
        let (policy_document, policy) = policy_read?;
        steps?;
        step_min_duration?;
        if !analysis?.1 {
            return None;
        }
        Some(RolloutSpec {
            file: file.to_path_buf(),
            revision: String::new(),
            policy_document,
            policy,
            split_rule: split_rule?.to_string(),
            canary: canary?.to_string(),
            judge,
            interval: interval?,
            source: source?,
            sink: sink?,
        })
    }

    /// Reads the base policy; its own errors are reported under `policy`.
    fn policy(&mut self, path: &Path) -> Option<(Value, Policy)> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                self.w
                    .error("policy", format!("cannot read {}: {}", path.display(), e));
                return None;
            }
        };
        let document: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                self.w.error(
                    "policy",
                    format!("{} is not valid JSON: {}", path.display(), e),
                );
                return None;
            }
        };
        match Policy::from_value(&document) {
            Ok(policy) => Some((document, policy)),
            Err(errors) => {
                for e in errors.iter() {
                    self.w.error("policy", format!("{}: {}", path.display(), e));
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
                self.w.error(
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
                    self.w.error(
                        "canary",
                        format!(
                            "{:?} is not one of the variants of split rule {:?}",
                            canary, rule
                        ),
                    );
                } else if split.variants.len() < 2 {
                    self.w.error(
                        "split_rule",
                        "the split needs at least one baseline variant besides the canary",
                    );
                }
            }
            Action::Variant(_) => {
                self.w
                    .error("split_rule", format!("rule {:?} is not a split", rule));
            }
        }
    }

    fn steps(&mut self, value: &Value) -> Option<Vec<u32>> {
        let items = match value.as_array() {
            Some(items) if !items.is_empty() => items,
            _ => {
                self.w.error(
                    "steps",
                    "expected a non-empty list of canary weights in percent",
                );
                return None;
            }
        };
        let mut steps = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match item.as_u64().and_then(|s| u32::try_from(s).ok()) {
                Some(s) => steps.push(s),
                None => {
                    self.w.error(
                        &format!("steps[{}]", i),
                        format!("expected a whole percentage, found {}", item),
                    );
                    ok = false;
                }
            }
        }
        if ok && steps.last() != Some(&100) {
            self.w
                .error("steps", "the last step must be 100 (a full promotion)");
            ok = false;
        }
        if ok {
            Some(steps)
        } else {
            None
        }
    }

    fn duration_field(
        &mut self,
        map: &Map<String, Value>,
        path: &str,
        field: &str,
        default: Option<Duration>,
    ) -> Option<Duration> {
        let path = join(path, field);
        match map.get(field) {
            None => {
                if default.is_none() {
                    self.w.error(&path, "required field is missing");
                }
                default
            }
            Some(v) => match parse_duration(v) {
                Ok(d) => Some(d),
                Err(message) => {
                    self.w.error(&path, message);
                    None
                }
            },
        }
    }

    fn number(&mut self, map: &Map<String, Value>, field: &str, default: f64) -> Option<f64> {
        match map.get(field) {
            None => Some(default),
            Some(v) => match v.as_f64() {
                Some(x) => Some(x),
                None => {
                    self.w.error(
                        &join("analysis", field),
                        format!("expected a number, found {}", kind(v)),
                    );
                    None
                }
            },
        }
    }

    /// The analysis section, and whether every field of it could be read.
    fn analysis(&mut self, value: &Value) -> Option<(Analysis, bool)> {
        let map = self.w.object(value, "analysis", ANALYSIS_FIELDS)?;
        let d = Analysis::default();
        let error_ceiling = self.number(map, "error_ceiling", d.error_ceiling);
        let max_error_rate = self.number(map, "max_error_rate", d.max_error_rate);
        let max_slow_rate = self.number(map, "max_slow_rate", d.max_slow_rate);
        let alpha = self.number(map, "alpha", d.alpha);
        let relative_risk = self.number(map, "relative_risk", d.relative_risk);
        let latency_threshold_ms = match map.get("latency_threshold_ms") {
            None => Some(d.latency_threshold_ms),
            Some(v) => match v.as_u64().and_then(|ms| u32::try_from(ms).ok()) {
                Some(ms) if ENVOY_DEFAULT_BUCKETS_MS.contains(&f64::from(ms)) => Some(ms),
                _ => {
                    let bounds: Vec<String> = ENVOY_DEFAULT_BUCKETS_MS
                        .iter()
                        .filter(|b| **b >= 1.0)
                        .map(|b| b.to_string())
                        .collect();
                    self.w.error(
                        "analysis.latency_threshold_ms",
                        format!(
                            "{} is not a latency histogram bucket boundary; use one of {}",
                            v,
                            bounds.join(", ")
                        ),
                    );
                    None
                }
            },
        };
        let min_requests = match map.get("min_requests") {
            None => Some(d.min_requests),
            Some(v) => match v.as_u64() {
                Some(n) => Some(n),
                None => {
                    self.w.error(
                        "analysis.min_requests",
                        format!("expected a whole number, found {}", v),
                    );
                    None
                }
            },
        };
        let no_data_timeout =
            self.duration_field(map, "analysis", "no_data_timeout", Some(d.no_data_timeout));
        let on_no_data = match map.get("on_no_data") {
            None => Some(d.on_no_data),
            Some(v) => match v.as_str() {
                Some("rollback") => Some(OnNoData::Rollback),
                Some("hold") => Some(OnNoData::Hold),
                _ => {
                    self.w.error(
                        "analysis.on_no_data",
                        format!("expected \"rollback\" or \"hold\", found {}", v),
                    );
                    None
                }
            },
        };
        // Unreadable fields (already reported) stand in as defaults, so the range checks
        // on the readable ones still run in this pass.
        let ok = [
            error_ceiling,
            max_error_rate,
            max_slow_rate,
            alpha,
            relative_risk,
        ]
        .iter()
        .all(Option::is_some)
            && latency_threshold_ms.is_some()
            && min_requests.is_some()
            && no_data_timeout.is_some()
            && on_no_data.is_some();
        let analysis = Analysis {
            error_ceiling: error_ceiling.unwrap_or(d.error_ceiling),
            max_error_rate: max_error_rate.unwrap_or(d.max_error_rate),
            latency_threshold_ms: latency_threshold_ms.unwrap_or(d.latency_threshold_ms),
            max_slow_rate: max_slow_rate.unwrap_or(d.max_slow_rate),
            min_requests: min_requests.unwrap_or(d.min_requests),
            alpha: alpha.unwrap_or(d.alpha),
            relative_risk: relative_risk.unwrap_or(d.relative_risk),
            no_data_timeout: no_data_timeout.unwrap_or(d.no_data_timeout),
            on_no_data: on_no_data.unwrap_or(d.on_no_data),
            ..d
        };
        Some((analysis, ok))
    }

    fn urls(&mut self, value: &Value, path: &str) -> Option<Vec<String>> {
        let items: Vec<&Value> = match value {
            Value::String(_) => vec![value],
            Value::Array(items) if !items.is_empty() => items.iter().collect(),
            _ => {
                self.w.error(
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
                    self.w.error(
                        &item_path,
                        format!("{:?}: https is not supported for metric sources; use http:// (in-cluster or via a local port-forward)", u),
                    );
                    ok = false;
                }
                _ => {
                    self.w.error(
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

    fn prometheus(&mut self, value: &Value) -> Option<SourceSpec> {
        let path = "source.prometheus";
        let fields = [
            "url",
            "metrics",
            "matchers",
            "destination_service",
            "reporter",
            "versions",
        ];
        let p = self.w.object(value, path, &fields)?;
        let url = self
            .w
            .required(p, path, "url")
            .and_then(|u| self.urls(u, "source.prometheus.url"))
            .map(|mut urls| urls.remove(0));
        let matchers = match p.get("matchers") {
            None => Some(String::new()),
            Some(m) => self
                .w
                .string(m, "source.prometheus.matchers")
                .map(str::to_string),
        };
        let metrics = match p.get("metrics").map(Value::as_str) {
            None | Some(Some("filter")) => {
                for field in ["destination_service", "reporter", "versions"] {
                    if p.contains_key(field) {
                        self.w.error(&join(path, field), "only with metrics: istio");
                    }
                }
                Some(PrometheusMetrics::Filter)
            }
            Some(Some("istio")) => self.istio_metrics(p),
            Some(_) => {
                self.w.error(
                    "source.prometheus.metrics",
                    "expected \"filter\" or \"istio\"",
                );
                None
            }
        };
        Some(SourceSpec::Prometheus {
            url: url?,
            matchers: matchers?,
            metrics: metrics?,
        })
    }

    fn istio_metrics(&mut self, p: &Map<String, Value>) -> Option<PrometheusMetrics> {
        let path = "source.prometheus";
        let destination_service = self
            .w
            .required(p, path, "destination_service")
            .and_then(|v| self.w.string(v, "source.prometheus.destination_service"))
            .map(str::to_string);
        let reporter = match p.get("reporter").map(Value::as_str) {
            None => Some("source".to_string()),
            Some(Some(r)) if r == "source" || r == "destination" => Some(r.to_string()),
            Some(_) => {
                self.w.error(
                    "source.prometheus.reporter",
                    "expected \"source\" or \"destination\"",
                );
                None
            }
        };
        let versions = match p.get("versions") {
            None => Some(std::collections::BTreeMap::new()),
            Some(Value::Object(map)) => {
                let mut versions = std::collections::BTreeMap::new();
                let mut ok = true;
                for (variant, label) in map {
                    match label.as_str() {
                        Some(l) if !l.is_empty() => {
                            versions.insert(variant.clone(), l.to_string());
                        }
                        _ => {
                            self.w.error(
                                &format!("source.prometheus.versions.{}", variant),
                                "expected a non-empty destination_version label",
                            );
                            ok = false;
                        }
                    }
                }
                if ok {
                    Some(versions)
                } else {
                    None
                }
            }
            Some(other) => {
                self.w.error(
                    "source.prometheus.versions",
                    format!(
                        "expected a map of variant to destination_version, found {}",
                        kind(other)
                    ),
                );
                None
            }
        };
        Some(PrometheusMetrics::Istio {
            destination_service: destination_service?,
            reporter: reporter?,
            versions: versions?,
        })
    }

    fn source(&mut self, value: &Value) -> Option<SourceSpec> {
        let map = self
            .w
            .object(value, "source", &["envoy_admin", "prometheus"])?;
        match (map.get("envoy_admin"), map.get("prometheus")) {
            (Some(v), None) => self
                .urls(v, "source.envoy_admin")
                .map(SourceSpec::EnvoyAdmin),
            (None, Some(v)) => self.prometheus(v),
            _ => {
                self.w
                    .error("source", "expected exactly one of envoy_admin, prometheus");
                None
            }
        }
    }

    fn sink(&mut self, value: &Value, source: Option<&SourceSpec>) -> Option<SinkSpec> {
        let map = self.w.object(value, "sink", &["ecds_file", "kubernetes"])?;
        match (map.get("ecds_file"), map.get("kubernetes")) {
            (Some(ecds), None) => self.ecds_file(ecds, source),
            (None, Some(kubernetes)) => self.kubernetes(kubernetes),
            _ => {
                self.w
                    .error("sink", "expected ecds_file or kubernetes (exactly one)");
                None
            }
        }
    }

    fn ecds_file(&mut self, ecds: &Value, source: Option<&SourceSpec>) -> Option<SinkSpec> {
        let p = "sink.ecds_file";
        let m = self.w.object(
            ecds,
            p,
            &["path", "filter_name", "wasm", "admin", "failure_policy"],
        )?;
        let path = self
            .w
            .required(m, p, "path")
            .and_then(|v| self.w.string(v, "sink.ecds_file.path"))
            .map(|s| self.base.join(s));
        if let Some(path) = &path {
            let folder_ok = path
                .parent()
                .is_some_and(|d| d.as_os_str().is_empty() || d.is_dir());
            if !folder_ok {
                self.w.error(
                    "sink.ecds_file.path",
                    format!("folder of {} does not exist", path.display()),
                );
            }
        }
        let filter_name = match m.get("filter_name") {
            None => Some("meshcanary".to_string()),
            Some(v) => self
                .w
                .string(v, "sink.ecds_file.filter_name")
                .map(str::to_string),
        };
        let wasm = self
            .w
            .required(m, p, "wasm")
            .and_then(|v| self.w.string(v, "sink.ecds_file.wasm"))
            .map(|s| self.base.join(s));
        let admin = match (m.get("admin"), source) {
            (Some(v), _) => self.urls(v, "sink.ecds_file.admin"),
            (None, Some(SourceSpec::EnvoyAdmin(urls))) => Some(urls.clone()),
            (None, Some(SourceSpec::Prometheus { .. })) => {
                self.w.error(
                    "sink.ecds_file.admin",
                    "required when the source is not envoy_admin: each update is confirmed through Envoy's admin",
                );
                None
            }
            (None, None) => None,
        };
        let failure_policy = self.failure_policy(m, p, FailurePolicy::Reload);
        Some(SinkSpec::EcdsFile(EcdsFileSpec {
            path: path?,
            filter_name: filter_name?,
            wasm: wasm?,
            admin: admin?,
            failure_policy: failure_policy?,
        }))
    }

    fn kubernetes(&mut self, value: &Value) -> Option<SinkSpec> {
        let p = "sink.kubernetes";
        let m = self.w.object(value, p, KUBERNETES_FIELDS)?;
        let namespace = self
            .w
            .required(m, p, "namespace")
            .and_then(|v| self.w.string(v, "sink.kubernetes.namespace"))
            .and_then(|s| self.dns_name(s, "sink.kubernetes.namespace", 63, false));
        // The Lease is `meshcanary-<name>` and must be a valid name too.
        let name = self
            .w
            .required(m, p, "name")
            .and_then(|v| self.w.string(v, "sink.kubernetes.name"))
            .and_then(|s| self.dns_name(s, "sink.kubernetes.name", 253 - 11, true));
        let workload_selector = match m.get("workload_selector") {
            None => Some(None),
            Some(v) => self.workload_selector(v).map(Some),
        };
        let filter_name = match m.get("filter_name") {
            None => Some("meshcanary".to_string()),
            Some(v) => match self.w.string(v, "sink.kubernetes.filter_name") {
                Some(s) if !s.is_empty() && !s.chars().any(char::is_whitespace) => {
                    Some(s.to_string())
                }
                Some(_) => {
                    self.w.error(
                        "sink.kubernetes.filter_name",
                        "must be a non-empty name without spaces",
                    );
                    None
                }
                None => None,
            },
        };
        let wasm = self
            .w
            .required(m, p, "wasm")
            .and_then(|v| self.wasm_code(v));
        let context = match m.get("context") {
            None => Some(vec![PatchContext::SidecarOutbound, PatchContext::Gateway]),
            Some(v) => self.contexts(v),
        };
        let kubeconfig = match m.get("kubeconfig") {
            None => Some(None),
            Some(v) => self
                .w
                .string(v, "sink.kubernetes.kubeconfig")
                .map(|s| Some(self.base.join(s))),
        };
        let default_failure = match &wasm {
            Some(WasmCode::Http { .. } | WasmCode::Oci { .. }) => FailurePolicy::Open,
            _ => FailurePolicy::Reload,
        };
        let failure_policy = self.failure_policy(m, p, default_failure);
        Some(SinkSpec::Kubernetes(KubernetesSpec {
            namespace: namespace?,
            name: name?,
            workload_selector: workload_selector?,
            filter_name: filter_name?,
            wasm: wasm?,
            context: context?,
            kubeconfig: kubeconfig?,
            failure_policy: failure_policy?,
        }))
    }

    /// A sink's `failure_policy`: one of Envoy's names, `default` when absent.
    fn failure_policy(
        &mut self,
        m: &Map<String, Value>,
        sink_path: &str,
        default: FailurePolicy,
    ) -> Option<FailurePolicy> {
        let path = join(sink_path, "failure_policy");
        let v = match m.get("failure_policy") {
            None => return Some(default),
            Some(v) => v,
        };
        match v.as_str().and_then(FailurePolicy::from_name) {
            Some(policy) => Some(policy),
            None => {
                let names: Vec<&str> = FailurePolicy::ALL.iter().map(|p| p.as_str()).collect();
                self.w.error(
                    &path,
                    format!("expected one of {}, found {}", names.join(", "), v),
                );
                None
            }
        }
    }

    /// A Kubernetes object name: a DNS-1123 label (namespaces) or subdomain.
    fn dns_name(&mut self, s: &str, path: &str, max: usize, dots: bool) -> Option<String> {
        let part_ok = |part: &str| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        };
        let ok = s.len() <= max
            && if dots {
                s.split('.').all(part_ok)
            } else {
                part_ok(s)
            };
        if ok {
            Some(s.to_string())
        } else {
            self.w.error(
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

    fn workload_selector(&mut self, value: &Value) -> Option<BTreeMap<String, String>> {
        let p = "sink.kubernetes.workload_selector";
        let m = self.w.object(value, p, &["labels"])?;
        let labels = self.w.required(m, p, "labels")?;
        let lp = "sink.kubernetes.workload_selector.labels";
        let labels = match labels.as_object() {
            Some(l) if !l.is_empty() => l,
            _ => {
                self.w.error(
                    lp,
                    "expected a non-empty map of labels (omit workload_selector to select every workload in the namespace)",
                );
                return None;
            }
        };
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (key, v) in labels {
            let path = join(lp, key);
            if !label_key_ok(key) {
                self.w.error(&path, "not a valid label key");
                ok = false;
            }
            match v.as_str() {
                Some(s) if label_value_ok(s) => {
                    out.insert(key.clone(), s.to_string());
                }
                Some(s) => {
                    self.w
                        .error(&path, format!("{:?} is not a valid label value", s));
                    ok = false;
                }
                None => {
                    self.w.error(
                        &path,
                        format!("expected a string (quote it), found {}", kind(v)),
                    );
                    ok = false;
                }
            }
        }
        if ok {
            Some(out)
        } else {
            None
        }
    }

    fn wasm_code(&mut self, value: &Value) -> Option<WasmCode> {
        let p = "sink.kubernetes.wasm";
        let m = self.w.object(value, p, &["local", "http", "oci"])?;
        match (m.get("local"), m.get("http"), m.get("oci")) {
            (Some(v), None, None) => {
                let path = self.w.string(v, "sink.kubernetes.wasm.local")?;
                if path.starts_with('/') {
                    Some(WasmCode::Local(path.to_string()))
                } else {
                    self.w.error(
                        "sink.kubernetes.wasm.local",
                        format!("{:?}: expected an absolute path on the proxy (inside the istio-proxy container)", path),
                    );
                    None
                }
            }
            (None, Some(v), None) => {
                let hp = "sink.kubernetes.wasm.http";
                let h = self.w.object(v, hp, &["url", "sha256"])?;
                // Fetched by the Istio agent on each proxy, not by the controller.
                let url = self
                    .w
                    .required(h, hp, "url")
                    .and_then(|u| match u.as_str() {
                        Some(s)
                            if ["http://", "https://"].iter().any(|scheme| {
                                s.strip_prefix(scheme).is_some_and(|rest| {
                                    !rest.is_empty() && !rest.chars().any(char::is_whitespace)
                                })
                            }) =>
                        {
                            Some(s.to_string())
                        }
                        _ => {
                            self.w.error(
                                "sink.kubernetes.wasm.http.url",
                                format!("expected an http:// or https:// URL, found {}", u),
                            );
                            None
                        }
                    });
                // Istio's agent verifies the download against it; without it, the module
                // is downloaded again and again (Istio's "Distributing WebAssembly Modules").
                let sha256 = self
                    .w
                    .required(h, hp, "sha256")
                    .and_then(|s| self.w.string(s, "sink.kubernetes.wasm.http.sha256"))
                    .and_then(|s| {
                        if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
                            Some(s.to_ascii_lowercase())
                        } else {
                            self.w.error(
                                "sink.kubernetes.wasm.http.sha256",
                                "expected the module's SHA-256 as 64 hex digits (sha256sum)",
                            );
                            None
                        }
                    });
                Some(WasmCode::Http {
                    url: url?,
                    sha256: sha256?,
                })
            }
            (None, None, Some(v)) => {
                let op = "sink.kubernetes.wasm.oci";
                let o = self.w.object(v, op, &["url"])?;
                let url = self.w.required(o, op, "url")?;
                let up = "sink.kubernetes.wasm.oci.url";
                let url = self.w.string(url, up)?;
                match oci_digest(url) {
                    Ok(digest) => Some(WasmCode::Oci {
                        url: url.to_string(),
                        digest,
                    }),
                    Err(why) => {
                        self.w.error(up, format!("{url:?}: {why}"));
                        None
                    }
                }
            }
            _ => {
                self.w.error(p, "expected exactly one of local, http, oci");
                None
            }
        }
    }

    fn contexts(&mut self, value: &Value) -> Option<Vec<PatchContext>> {
        let p = "sink.kubernetes.context";
        let items = match value.as_array() {
            Some(items) if !items.is_empty() => items,
            _ => {
                self.w
                    .error(p, "expected a non-empty list of SIDECAR_OUTBOUND, GATEWAY");
                return None;
            }
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("{}[{}]", p, i);
            let context = match item.as_str() {
                Some("SIDECAR_OUTBOUND") => PatchContext::SidecarOutbound,
                Some("GATEWAY") => PatchContext::Gateway,
                _ => {
                    self.w.error(
                        &path,
                        format!(
                            "expected SIDECAR_OUTBOUND or GATEWAY (routing happens on the caller's proxy), found {}",
                            item
                        ),
                    );
                    ok = false;
                    continue;
                }
            };
            if out.contains(&context) {
                self.w
                    .error(&path, format!("{} is listed twice", context.as_str()));
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
