//! Prometheus with Istio's standard metrics as a metric source: for a mesh whose sidecars
//! already report `istio_requests_total` and `istio_request_duration_milliseconds` and a
//! Prometheus that already scrapes them, so the filter's own metrics need not be scraped.
//!
//! Variants are told apart by the `destination_version` label (the `version` label of the
//! pods behind the service, as Istio reports it), one Kubernetes service at a time
//! (`destination_service`, matched exactly), as seen by one reporter (`source` by
//! default: the caller's sidecar, which is where meshcanary routes). Per variant a read
//! returns raw cumulative sums over every pod, not rates: the controller takes differences
//! itself and handles resets (a pod restarting, or leaving the sum, is a drop it handles).
//!
//! One instant query per read. For service `S`, reporter `R`, versions `v1`, `v2.1` it is
//!
//! ```text
//! sum by (destination_version, response_code) (istio_requests_total{destination_service="S",reporter="R",destination_version=~"v1|v2\\.1",response_code=~"[1-5][0-9][0-9]"})
//! or sum by (destination_version, le) (istio_request_duration_milliseconds_bucket{destination_service="S",reporter="R",destination_version=~"v1|v2\\.1",response_code=~"[1-5][0-9][0-9]"})
//! ```
//!
//! on one line, with [`IstioPrometheus::matchers`] appended inside both pairs of braces
//! (see [`IstioPrometheus::promql`]). The two halves never collide under `or`: every
//! element of the first has a `response_code` label and no `le`, every element of the
//! second the reverse. One query rather than two means both halves are evaluated at the
//! same instant, so a read never pairs new counters with an older histogram.
//!
//! - `responses` is the sum over response codes 100–599 (Istio also reports code `0` for
//!   requests that got no response; those are not responses) and `errors` the 5xx part.
//!   gRPC failures answered with HTTP 200 are not errors here (their status is in
//!   `grpc_response_status`), the same as in the filter's own metrics.
//! - `latency_samples` is the `le="+Inf"` bucket and `slow` is that minus the bucket whose
//!   upper bound equals the threshold. The histogram is read with the same response-code
//!   matcher, so its samples are the same requests as `responses`.
//!
//! Why every bucket is read rather than only the threshold's and `+Inf`: the `le` label's
//! text depends on who ingested it. Envoy exposes `le="500"`; Prometheus 3 normalizes it
//! to `le="500.0"` (and `3600000` to `3.6e+06`) on ingestion, and Prometheus 2 did the
//! same when scraping protobuf (<https://prometheus.io/docs/prometheus/latest/migration/>,
//! "`le` and `quantile` label values"). An exact `le="500"` matcher would silently find
//! nothing on one of them, so bounds are compared as numbers here instead, equal bounds
//! spelt differently are added together, and the boundaries seen are at hand for the
//! error when the threshold is not one of them. It costs about twenty series per version.
//!
//! Istio's duration buckets are Envoy's defaults unless a pod sets the
//! `sidecar.istio.io/statsHistogramBuckets` annotation: 0.5, 1, 5, 10, 25, 50, 100, 250,
//! 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000 ms
//! (Envoy's `HistogramSettingsImpl::defaultBuckets()` in
//! `source/common/stats/histogram_impl.cc`; Istio's bootstrap template sets
//! `histogram_bucket_settings` only from that annotation, and the annotation's reference
//! states the same default list).
//!
//! Limits:
//! - every pod summed must use the same buckets; a sum whose cumulative counts decrease is
//!   refused as [`SourceError::Malformed`], but a mix can also go unnoticed, so keep the
//!   annotation the same on every version;
//! - two variants mapped to the same `destination_version` cannot be told apart and are
//!   refused with [`SourceError::Ambiguous`];
//! - a sidecar scraped by two jobs is counted twice unless [`IstioPrometheus::matchers`]
//!   picks one;
//! - [`Query::policy`] is not used: Istio's metrics do not know the filter's policy.
//!
//! Freshness: values are as of each pod's last scrape, and Envoy updates histograms in
//! `/stats/prometheus` only at a stats flush (`stats_flush_interval`, 5 s by default),
//! so `latency_samples` can trail `responses` by that much.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;

use super::prometheus::{sample_value, samples_and_slow};
use super::{MetricSource, Query, Snapshot, SourceError, VariantCounts};

/// How long one query may take unless [`IstioPrometheus::timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The reporter read unless [`IstioPrometheus::reporter`] says otherwise: the caller's
/// sidecar, where meshcanary's filter routes, so it sees exactly the traffic it split.
pub const DEFAULT_REPORTER: &str = "source";

/// Istio's request counter.
const REQUESTS: &str = "istio_requests_total";
/// Istio's request duration histogram (bucket series).
const DURATION_BUCKETS: &str = "istio_request_duration_milliseconds_bucket";
/// HTTP status codes that are responses: Istio reports `0` when there was none.
const RESPONSE_CODES: &str = "[1-5][0-9][0-9]";

/// Reads per-variant counters from Istio's standard metrics in a Prometheus server.
#[derive(Debug, Clone)]
pub struct IstioPrometheus {
    /// Base URL of the server, e.g. `http://prometheus.istio-system:9090` (the API is
    /// under `/api/v1/`).
    pub url: String,
    /// The service whose versions are compared, as Istio's `destination_service` label
    /// spells it, e.g. `checkout.shop.svc.cluster.local`; matched exactly.
    pub destination_service: String,
    /// Which proxy's report to read: `source` (the caller's sidecar, [`DEFAULT_REPORTER`]),
    /// `destination` (the callee's) or `waypoint`. Each request is reported once per
    /// reporter, so reading more than one would count it twice.
    pub reporter: String,
    /// Variant name → its `destination_version` label value; a variant not listed here is
    /// looked up under its own name.
    pub version_labels: BTreeMap<String, String>,
    /// Extra label matchers in PromQL syntax without braces, added to both selectors as
    /// they are, e.g. `job="kubernetes-pods",source_workload_namespace="shop"`; empty for
    /// none.
    pub matchers: String,
    /// HTTP client; pass the controller's shared one so connections are reused.
    pub client: reqwest::Client,
    /// Limit for one query, connection included.
    pub timeout: Duration,
}

impl IstioPrometheus {
    /// A source for `destination_service` on the server at `url`, reading reporter
    /// [`DEFAULT_REPORTER`], each variant under its own name as `destination_version`,
    /// without extra matchers, with [`DEFAULT_TIMEOUT`].
    pub fn new(
        url: impl Into<String>,
        destination_service: impl Into<String>,
        client: reqwest::Client,
    ) -> Self {
        IstioPrometheus {
            url: url.into(),
            destination_service: destination_service.into(),
            reporter: DEFAULT_REPORTER.to_string(),
            version_labels: BTreeMap::new(),
            matchers: String::new(),
            client,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same source reading another reporter (see [`IstioPrometheus::reporter`]).
    pub fn with_reporter(mut self, reporter: impl Into<String>) -> Self {
        self.reporter = reporter.into();
        self
    }

    /// The same source reading `variant` from the pods whose `destination_version` is
    /// `version` (see [`IstioPrometheus::version_labels`]).
    pub fn with_version_label(
        mut self,
        variant: impl Into<String>,
        version: impl Into<String>,
    ) -> Self {
        self.version_labels.insert(variant.into(), version.into());
        self
    }

    /// The same source with extra label matchers (see [`IstioPrometheus::matchers`]).
    pub fn with_matchers(mut self, matchers: impl Into<String>) -> Self {
        self.matchers = matchers.into();
        self
    }

    /// The `destination_version` a variant is read under.
    pub fn version_of<'a>(&'a self, variant: &'a str) -> &'a str {
        self.version_labels
            .get(variant)
            .map(String::as_str)
            .unwrap_or(variant)
    }

    /// The exact PromQL this source sends for `query` (one instant query). Public so that
    /// users can paste it into Prometheus when numbers look wrong.
    pub fn promql(&self, query: &Query) -> Result<String, SourceError> {
        Ok(self.plan(query)?.promql)
    }

    fn plan(&self, query: &Query) -> Result<Plan, SourceError> {
        Plan::new(self, query)
    }
}

impl MetricSource for IstioPrometheus {
    async fn read(&self, query: &Query) -> Result<Snapshot, SourceError> {
        let plan = self.plan(query)?;
        let result =
            super::prometheus::instant_query(&self.client, &self.url, self.timeout, &plan.promql)
                .await?;
        plan.snapshot(&self.url, &result)
    }

    fn describe(&self) -> String {
        let extra = if self.matchers.trim().is_empty() {
            String::new()
        } else {
            format!(", {}", self.matchers.trim())
        };
        format!(
            "Prometheus at {} (Istio metrics of {}, reporter={}{extra})",
            self.url, self.destination_service, self.reporter
        )
    }
}

/// The query for one read, and how to map its answer back to variants.
#[derive(Debug)]
struct Plan {
    /// The PromQL text.
    promql: String,
    /// The query's variants, in its order, each with the index of its version in
    /// `versions`.
    variants: Vec<(String, usize)>,
    /// The distinct `destination_version` values read, in first-asked order.
    versions: Vec<String>,
    /// `destination_version` → index into `versions`.
    index: HashMap<String, usize>,
    /// The query's threshold.
    threshold_ms: u64,
}

impl Plan {
    fn new(source: &IstioPrometheus, query: &Query) -> Result<Plan, SourceError> {
        let mut versions: Vec<String> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        // version → the first variant read under it, to name both in an ambiguity error.
        let mut owners: HashMap<&str, &str> = HashMap::new();
        let mut variants = Vec::with_capacity(query.variants.len());
        for variant in &query.variants {
            let version = source.version_of(variant);
            if let Some(other) = owners.insert(version, variant) {
                if other != variant {
                    // Summing both would judge each variant on the other's traffic too.
                    return Err(SourceError::Ambiguous {
                        endpoint: source.url.clone(),
                        reason: format!(
                            "variants {other:?} and {variant:?} are both read under \
                             destination_version={version:?}; give each its own version label"
                        ),
                    });
                }
            }
            let slot = match index.get(version) {
                Some(&slot) => slot,
                None => {
                    versions.push(version.to_string());
                    index.insert(version.to_string(), versions.len() - 1);
                    versions.len() - 1
                }
            };
            variants.push((variant.clone(), slot));
        }
        let alternatives: Vec<String> = versions.iter().map(|v| regex_literal(v)).collect();
        let extra = source.matchers.trim().trim_matches(',');
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(",{extra}")
        };
        let selector = format!(
            "destination_service={},reporter={},destination_version=~{},response_code=~{}{extra}",
            promql_string(&source.destination_service),
            promql_string(&source.reporter),
            promql_string(&alternatives.join("|")),
            promql_string(RESPONSE_CODES),
        );
        let promql = format!(
            "sum by (destination_version, response_code) ({REQUESTS}{{{selector}}}) or \
             sum by (destination_version, le) ({DURATION_BUCKETS}{{{selector}}})"
        );
        Ok(Plan {
            promql,
            variants,
            versions,
            index,
            threshold_ms: query.latency_threshold_ms,
        })
    }

    /// The snapshot from the query's result vector.
    fn snapshot(&self, endpoint: &str, result: &[Value]) -> Result<Snapshot, SourceError> {
        let counts = self.counts(endpoint, result)?;
        let variants = self
            .variants
            .iter()
            .map(|(variant, slot)| {
                let counts = counts.get(*slot).copied().unwrap_or_default();
                (variant.clone(), counts)
            })
            .collect();
        Ok(Snapshot { variants })
    }

    /// Per version (in `versions` order), its counts.
    fn counts(&self, endpoint: &str, result: &[Value]) -> Result<Vec<VariantCounts>, SourceError> {
        let malformed = |reason: String| SourceError::Malformed {
            endpoint: endpoint.to_string(),
            reason,
        };
        let mut counts = vec![VariantCounts::default(); self.versions.len()];
        let mut buckets: Vec<Vec<(f64, u64)>> = vec![Vec::new(); self.versions.len()];
        for sample in result {
            let labels = sample.get("metric");
            let label = |name: &str| labels.and_then(|m| m.get(name)).and_then(Value::as_str);
            // Istio always sets the label ("unknown" when the pod has no `version`); a
            // series without it can only match an empty version label.
            let version = label("destination_version").unwrap_or("");
            let Some(&slot) = self.index.get(version) else {
                continue;
            };
            let value = sample_value(sample).map_err(|why| malformed(why.to_string()))?;
            if let Some(le) = label("le") {
                // Compared as numbers: `500`, `500.0` and `5e+02` are the same bound.
                let bound: f64 = le.parse().map_err(|_| {
                    malformed(format!("{DURATION_BUCKETS} has le={le:?}, not a number"))
                })?;
                if let Some(list) = buckets.get_mut(slot) {
                    list.push((bound, value));
                }
            } else if let Some(code) = label("response_code") {
                let code: u16 = code.parse().map_err(|_| {
                    malformed(format!(
                        "{REQUESTS} has response_code={code:?}, not a number"
                    ))
                })?;
                // The query already keeps only 100–599; checked again so that a
                // hand-edited query cannot make code 0 count as a response.
                if let (100..=599, Some(variant)) = (code, counts.get_mut(slot)) {
                    variant.responses = variant.responses.saturating_add(value);
                    if code >= 500 {
                        variant.errors = variant.errors.saturating_add(value);
                    }
                }
            } else {
                return Err(malformed(format!(
                    "a series with neither le nor response_code: {sample}"
                )));
            }
        }
        for (slot, list) in buckets.into_iter().enumerate() {
            if list.is_empty() {
                // No histogram series yet (no traffic): zeros, like the counters.
                continue;
            }
            let version = self.versions.get(slot).map(String::as_str).unwrap_or("");
            let histogram = format!("{DURATION_BUCKETS}{{destination_version={version:?}}}");
            let list = merge_equal_bounds(list);
            if let Some(pair) = list.windows(2).find(|pair| pair[1].1 < pair[0].1) {
                return Err(malformed(format!(
                    "{histogram} is not cumulative ({} at le={} but {} at le={}): pods with \
                     different buckets (sidecar.istio.io/statsHistogramBuckets) are summed \
                     together",
                    pair[0].1, pair[0].0, pair[1].1, pair[1].0
                )));
            }
            let (total, slow) = samples_and_slow(&list, self.threshold_ms, endpoint, &histogram)?;
            if let Some(variant) = counts.get_mut(slot) {
                variant.latency_samples = total;
                variant.slow = slow;
            }
        }
        Ok(counts)
    }
}

/// Buckets sorted by bound, with bounds that are equal as numbers added together (the
/// same bound spelt `500` by one ingestion path and `500.0` by another is two series).
fn merge_equal_bounds(mut list: Vec<(f64, u64)>) -> Vec<(f64, u64)> {
    list.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut merged: Vec<(f64, u64)> = Vec::with_capacity(list.len());
    for (bound, count) in list {
        match merged.last_mut() {
            Some(last) if last.0 == bound => last.1 = last.1.saturating_add(count),
            _ => merged.push((bound, count)),
        }
    }
    merged
}

/// `text` as a PromQL double-quoted string literal. PromQL strings take Go's escapes, so
/// a label value with `"` or `\` cannot end the string or change the matcher.
fn promql_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `text` as an RE2 pattern that matches exactly it (Go's `regexp.QuoteMeta`): version
/// labels such as `v2.1` must not also match `v2x1`. Prometheus anchors the whole pattern.
fn regex_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> IstioPrometheus {
        IstioPrometheus::new(
            "p",
            "checkout.shop.svc.cluster.local",
            reqwest::Client::new(),
        )
        .with_version_label("canary", "v2")
    }

    fn query(variants: &[&str], threshold_ms: u64) -> Query {
        Query {
            policy: "unused".into(),
            variants: variants.iter().map(|v| v.to_string()).collect(),
            latency_threshold_ms: threshold_ms,
        }
    }

    fn series(labels: &[(&str, &str)], value: &str) -> Value {
        let metric: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        serde_json::json!({"metric": metric, "value": [1.5, value]})
    }

    fn counts(threshold_ms: u64, result: &[Value]) -> Result<Snapshot, SourceError> {
        let plan = Plan::new(
            &source(),
            &query(&["stable", "canary", "dark"], threshold_ms),
        )
        .expect("plan");
        plan.snapshot("p", result)
    }

    #[test]
    fn literals_are_escaped_for_regex_then_for_promql() {
        assert_eq!(regex_literal("v2.1+b(x)"), "v2\\.1\\+b\\(x\\)");
        assert_eq!(promql_string("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(promql_string(&regex_literal("v2.1")), "\"v2\\\\.1\"");
    }

    #[test]
    fn counts_from_a_result_vector_with_mixed_le_spellings() {
        let v2 = ("destination_version", "v2");
        let result = vec![
            series(&[v2, ("response_code", "200")], "7"),
            series(&[v2, ("response_code", "503")], "3"),
            series(&[v2, ("response_code", "404")], "1"),
            // Prometheus 2 text scrape and a normalizing ingestion for the same bounds.
            series(&[v2, ("le", "500")], "6"),
            series(&[v2, ("le", "500.0")], "2"),
            series(&[v2, ("le", "3.6e+06")], "11"),
            series(&[v2, ("le", "+Inf")], "11"),
            // A version nobody asked for is ignored.
            series(
                &[("destination_version", "v9"), ("response_code", "500")],
                "4",
            ),
        ];
        let snapshot = counts(500, &result).expect("counts");
        assert_eq!(
            snapshot.variants.get("canary"),
            Some(&VariantCounts {
                responses: 11,
                errors: 3,
                latency_samples: 11,
                slow: 3
            })
        );
        assert_eq!(
            snapshot.variants.get("stable"),
            Some(&VariantCounts::default())
        );
        assert_eq!(snapshot.variants.len(), 3);
    }

    #[test]
    fn a_threshold_off_the_boundaries_names_the_boundaries_seen() {
        let v2 = ("destination_version", "v2");
        let result = vec![
            series(&[v2, ("le", "250")], "1"),
            series(&[v2, ("le", "500")], "2"),
            series(&[v2, ("le", "+Inf")], "3"),
        ];
        match counts(600, &result) {
            Err(SourceError::ThresholdNotABucketBoundary {
                boundaries,
                histogram,
                ..
            }) => {
                assert_eq!(boundaries, vec![250.0, 500.0]);
                assert!(histogram.contains("\"v2\""), "{histogram}");
            }
            other => panic!("expected a boundary error, got {other:?}"),
        }
    }

    #[test]
    fn a_sum_that_is_not_cumulative_is_refused() {
        let v2 = ("destination_version", "v2");
        let result = vec![
            series(&[v2, ("le", "500")], "5"),
            series(&[v2, ("le", "1000")], "4"),
            series(&[v2, ("le", "+Inf")], "6"),
        ];
        let error = counts(500, &result).expect_err("not cumulative");
        assert!(error.to_string().contains("not cumulative"), "{error}");
        let no_inf = vec![series(&[v2, ("le", "500")], "5")];
        let error = counts(500, &no_inf).expect_err("no +Inf");
        assert!(error.to_string().contains("+Inf"), "{error}");
    }

    #[test]
    fn two_variants_under_one_version_are_refused() {
        let source = source().with_version_label("stable", "v2");
        let error = Plan::new(&source, &query(&["stable", "canary"], 500)).expect_err("ambiguous");
        assert!(matches!(error, SourceError::Ambiguous { .. }), "{error}");
        // The same variant twice is not ambiguous.
        assert!(Plan::new(&source, &query(&["canary", "canary"], 500)).is_ok());
    }
}
