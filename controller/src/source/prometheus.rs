//! Prometheus as a metric source (the production one: it already scrapes every Envoy).
//!
//! One instant query (`GET /api/v1/query`) per read returns, per variant, the raw
//! cumulative counters summed over every scraped Envoy, not rates: the controller takes
//! differences itself, which is what makes it robust to missed reads and to counter
//! resets (an Envoy restarting, or leaving the sum, shows up as a drop it already handles).
//!
//! Envoy's `/stats/prometheus` drops the filter's `wasmcustom.` prefix and replaces every
//! character other than `[a-zA-Z0-9_]` with `_`, so without `stats_tags` the policy and
//! variant live in the metric name (`meshcanary.shop-front.variant.canary.responses.5xx`
//! becomes `meshcanary_shop_front_variant_canary_responses_5xx`, a counter without a
//! `_total` suffix). For policy `P` and variants `V1`, `V2` the query is
//!
//! ```text
//! sum by (__name__, le) ({__name__=~"meshcanary_P_variant_(?:V1|V2)_(?:responses_[1-5]xx|latency_ms_bucket)"})
//! ```
//!
//! with `P` and `V…` so sanitized and [`Prometheus::matchers`] appended inside the braces.
//! `responses` is the sum of the `1xx`–`5xx` series and `errors` the `5xx` one;
//! `latency_samples` is the `le="+Inf"` bucket and `slow` is that minus the bucket whose
//! `le` equals the threshold. A series that is absent (no traffic yet) reads as zero.
//!
//! Limits that follow from the names:
//! - two variants that differ only in characters Envoy folds into `_` (`new-api`,
//!   `new_api`) cannot be told apart: such a query fails with [`SourceError::Ambiguous`];
//!   two *policies* that collide that way (`shop-front`, `shop_front`) cannot be detected
//!   and would be summed, so give policies names that differ in letters or digits;
//! - every Envoy summed must use the same histogram buckets (Envoy's defaults do);
//! - an Envoy scraped by two jobs is counted twice unless [`Prometheus::matchers`] picks one.
//!
//! Freshness: values are as of each Envoy's last scrape, and histograms additionally lag
//! by Envoy's `stats_flush_interval` (see [`super::envoy_admin`]).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::{
    cumulative_at, excerpt, fetch, MetricSource, Query, Snapshot, SourceError, VariantCounts,
};

/// How long one query may take unless [`Prometheus::timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the filter's per-variant counters from a Prometheus server's HTTP API.
#[derive(Debug, Clone)]
pub struct Prometheus {
    /// Base URL of the server, e.g. `http://127.0.0.1:9090` (the API is under `/api/v1/`).
    pub url: String,
    /// Extra label matchers in PromQL syntax without braces, added to the selector as they
    /// are, e.g. `namespace="shop",job="envoy-stats"`; empty for none. Use them to pick the
    /// Envoys whose traffic counts.
    pub matchers: String,
    /// HTTP client; pass the controller's shared one so connections are reused.
    pub client: reqwest::Client,
    /// Limit for one query, connection included.
    pub timeout: Duration,
}

impl Prometheus {
    /// A source on the server at `url`, without extra matchers, with [`DEFAULT_TIMEOUT`].
    pub fn new(url: impl Into<String>, client: reqwest::Client) -> Self {
        Prometheus {
            url: url.into(),
            matchers: String::new(),
            client,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same source with extra label matchers (see [`Prometheus::matchers`]).
    pub fn with_matchers(mut self, matchers: impl Into<String>) -> Self {
        self.matchers = matchers.into();
        self
    }

    /// The PromQL this source sends for `query`, and which metric name is which. Public so
    /// that users can paste the exact query into Prometheus when numbers look wrong.
    pub fn promql(&self, query: &Query) -> Result<String, SourceError> {
        Ok(Plan::new(query, &self.matchers, &self.url)?.promql)
    }
}

impl MetricSource for Prometheus {
    async fn read(&self, query: &Query) -> Result<Snapshot, SourceError> {
        let plan = Plan::new(query, &self.matchers, &self.url)?;
        let result = instant_query(&self.client, &self.url, self.timeout, &plan.promql).await?;
        let counts = plan.counts(&self.url, &result)?;
        Ok(Snapshot {
            variants: query.variants.iter().cloned().zip(counts).collect(),
        })
    }

    fn describe(&self) -> String {
        if self.matchers.is_empty() {
            format!("Prometheus at {}", self.url)
        } else {
            format!("Prometheus at {} {{{}}}", self.url, self.matchers)
        }
    }
}

/// Runs one instant query (`GET /api/v1/query`) on the Prometheus at `base_url`; returns
/// its `data.result` vector. Shared by both Prometheus sources (filter and Istio metrics).
pub(crate) async fn instant_query(
    client: &reqwest::Client,
    base_url: &str,
    timeout: Duration,
    promql: &str,
) -> Result<Vec<Value>, SourceError> {
    let unreachable = |reason: String| SourceError::Unreachable {
        endpoint: base_url.to_string(),
        reason,
    };
    let malformed = |reason: String| SourceError::Malformed {
        endpoint: base_url.to_string(),
        reason,
    };
    let mut url = reqwest::Url::parse(&format!("{}/api/v1/query", base_url.trim_end_matches('/')))
        .map_err(|e| unreachable(format!("not a URL: {e}")))?;
    url.query_pairs_mut().append_pair("query", promql);
    let (status, body) = fetch(client, url, timeout, base_url).await?;
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    if !status.is_success() {
        // Prometheus explains refusals in the body (`errorType`, `error`): a bad extra
        // matcher shows up here as `bad_data: parse error …`.
        let why = json
            .as_ref()
            .and_then(api_error)
            .unwrap_or_else(|| excerpt(&body));
        return Err(unreachable(format!(
            "answered HTTP {} to {promql}: {why}",
            status.as_u16()
        )));
    }
    let json = json.ok_or_else(|| malformed(format!("not JSON: {}", excerpt(&body))))?;
    if json.get("status").and_then(Value::as_str) != Some("success") {
        let why = api_error(&json).unwrap_or_else(|| excerpt(&body));
        return Err(unreachable(format!("refused {promql}: {why}")));
    }
    let data = json
        .get("data")
        .ok_or_else(|| malformed("no \"data\" in the answer".to_string()))?;
    if data.get("resultType").and_then(Value::as_str) != Some("vector") {
        return Err(malformed(format!(
            "expected an instant vector, got resultType {}",
            data.get("resultType").unwrap_or(&Value::Null)
        )));
    }
    data.get("result")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| malformed("no \"result\" list in the answer".to_string()))
}

/// `errorType: error` from a Prometheus API error answer.
fn api_error(json: &Value) -> Option<String> {
    let error = json.get("error")?.as_str()?;
    let kind = json
        .get("errorType")
        .and_then(Value::as_str)
        .unwrap_or("error");
    Some(format!("{kind}: {error}"))
}

/// What one of the series read counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Series {
    /// `responses_<class>xx`, with the class's first digit.
    Responses(u8),
    /// `latency_ms_bucket` (one series per `le`).
    LatencyBucket,
}

/// The query for one read, and how to map its answer back to variants.
#[derive(Debug)]
struct Plan {
    /// The PromQL text.
    promql: String,
    /// Metric name → (index into the query's variants, what it counts).
    names: HashMap<String, (usize, Series)>,
    /// Number of variants asked for.
    variants: usize,
    /// Per variant, its histogram's bucket series name (for error messages).
    histograms: Vec<String>,
    /// The query's threshold.
    threshold_ms: u64,
}

impl Plan {
    fn new(query: &Query, matchers: &str, endpoint: &str) -> Result<Plan, SourceError> {
        let policy = sanitize(&query.policy);
        let mut names: HashMap<String, (usize, Series)> = HashMap::new();
        let mut owners: HashMap<String, &str> = HashMap::new();
        let mut alternatives = Vec::new();
        let mut histograms = Vec::new();
        for (index, variant) in query.variants.iter().enumerate() {
            let sanitized = sanitize(variant);
            if let Some(other) = owners.insert(sanitized.clone(), variant) {
                if other != variant {
                    return Err(SourceError::Ambiguous {
                        endpoint: endpoint.to_string(),
                        reason: format!(
                            "variants {other:?} and {variant:?} both become {sanitized:?} in \
                             Prometheus metric names (Envoy replaces every character other \
                             than a-z, A-Z, 0-9 and _ with _)"
                        ),
                    });
                }
            }
            let prefix = format!("meshcanary_{policy}_variant_{sanitized}_");
            for class in 1..=5u8 {
                names.insert(
                    format!("{prefix}responses_{class}xx"),
                    (index, Series::Responses(class)),
                );
            }
            let histogram = format!("{prefix}latency_ms_bucket");
            names.insert(histogram.clone(), (index, Series::LatencyBucket));
            histograms.push(histogram);
            alternatives.push(sanitized);
        }
        // Sanitized names are `[a-zA-Z0-9_]` only, so they need no regex escaping. A
        // variant listed twice maps to its last index, the one the snapshot keeps.
        let extra = matchers.trim().trim_matches(',');
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(",{extra}")
        };
        let promql = format!(
            "sum by (__name__, le) ({{__name__=~\"meshcanary_{policy}_variant_(?:{})_(?:responses_[1-5]xx|latency_ms_bucket)\"{extra}}})",
            alternatives.join("|")
        );
        Ok(Plan {
            promql,
            names,
            variants: query.variants.len(),
            histograms,
            threshold_ms: query.latency_threshold_ms,
        })
    }

    /// Per variant (in query order), its counts from the query's result vector.
    fn counts(&self, endpoint: &str, result: &[Value]) -> Result<Vec<VariantCounts>, SourceError> {
        let malformed = |reason: String| SourceError::Malformed {
            endpoint: endpoint.to_string(),
            reason,
        };
        let mut counts = vec![VariantCounts::default(); self.variants];
        let mut buckets: Vec<Vec<(f64, u64)>> = vec![Vec::new(); self.variants];
        for sample in result {
            let labels = sample.get("metric");
            let Some(name) = labels
                .and_then(|m| m.get("__name__"))
                .and_then(Value::as_str)
            else {
                return Err(malformed(format!("a series without __name__: {sample}")));
            };
            let Some(&(index, series)) = self.names.get(name) else {
                continue;
            };
            let value = sample_value(sample).map_err(|why| malformed(format!("{name}: {why}")))?;
            match series {
                Series::Responses(class) => {
                    if let Some(variant) = counts.get_mut(index) {
                        variant.responses = variant.responses.saturating_add(value);
                        if class == 5 {
                            variant.errors = variant.errors.saturating_add(value);
                        }
                    }
                }
                Series::LatencyBucket => {
                    let le = labels
                        .and_then(|m| m.get("le"))
                        .and_then(Value::as_str)
                        .ok_or_else(|| malformed(format!("{name} without an le label")))?;
                    // Compared as numbers: Envoy prints `0.5`, `300000`, `+Inf`.
                    let bound: f64 = le
                        .parse()
                        .map_err(|_| malformed(format!("{name} has le={le:?}, not a number")))?;
                    if let Some(list) = buckets.get_mut(index) {
                        list.push((bound, value));
                    }
                }
            }
        }
        for (index, list) in buckets.iter().enumerate() {
            if list.is_empty() {
                // No histogram series yet (no traffic): zeros, like the counters.
                continue;
            }
            let histogram = self.histograms.get(index).cloned().unwrap_or_default();
            let (total, slow) = samples_and_slow(list, self.threshold_ms, endpoint, &histogram)?;
            if let Some(variant) = counts.get_mut(index) {
                variant.latency_samples = total;
                variant.slow = slow;
            }
        }
        Ok(counts)
    }
}

/// From one histogram's `le` buckets (bounds as numbers, counts cumulative): all samples
/// (the `+Inf` bucket) and those slower than `threshold_ms`, which must be a bound.
/// Shared with the Istio-metrics source.
pub(crate) fn samples_and_slow(
    buckets: &[(f64, u64)],
    threshold_ms: u64,
    endpoint: &str,
    histogram: &str,
) -> Result<(u64, u64), SourceError> {
    let malformed = |reason: String| SourceError::Malformed {
        endpoint: endpoint.to_string(),
        reason,
    };
    let total = buckets
        .iter()
        .find(|(bound, _)| bound.is_infinite() && bound.is_sign_positive())
        .map(|(_, count)| *count)
        .ok_or_else(|| malformed(format!("{histogram} has no le=\"+Inf\" bucket")))?;
    let finite: Vec<(f64, u64)> = buckets
        .iter()
        .copied()
        .filter(|(b, _)| b.is_finite())
        .collect();
    let at_threshold = cumulative_at(&finite, threshold_ms).map_err(|boundaries| {
        SourceError::ThresholdNotABucketBoundary {
            endpoint: endpoint.to_string(),
            histogram: histogram.to_string(),
            threshold_ms,
            boundaries,
        }
    })?;
    let slow = total.checked_sub(at_threshold).ok_or_else(|| {
        malformed(format!(
            "{histogram} counts {at_threshold} samples at or below {threshold_ms} ms but only \
             {total} in all"
        ))
    })?;
    Ok((total, slow))
}

/// The value of one instant-vector sample (`"value": [time, "12"]`) as a count (shared
/// with the Istio-metrics source).
pub(crate) fn sample_value(sample: &Value) -> Result<u64, String> {
    let text = sample
        .get("value")
        .and_then(|v| v.get(1))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("no [time, \"value\"] pair in {sample}"))?;
    let value: f64 = text
        .parse()
        .map_err(|_| format!("value {text:?} is not a number"))?;
    // Sums of counters are whole numbers, exact in f64 up to 2^53; anything else (NaN, a
    // negative) means the series is not what this source expects.
    if !value.is_finite() || value < 0.0 {
        return Err(format!("value {text:?} is not a count"));
    }
    Ok(value.round() as u64)
}

/// A name as Envoy's `/stats/prometheus` writes it: every character other than
/// `[a-zA-Z0-9_]` becomes `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(variants: &[&str]) -> Query {
        Query {
            policy: "shop-front_v2".into(),
            variants: variants.iter().map(|v| v.to_string()).collect(),
            latency_threshold_ms: 500,
        }
    }

    #[test]
    fn promql_names_the_sanitized_series_and_adds_matchers() {
        let plan =
            Plan::new(&query(&["stable", "canary-x_1"]), "job=\"envoy\"", "p").expect("plan");
        assert_eq!(
            plan.promql,
            "sum by (__name__, le) ({__name__=~\"meshcanary_shop_front_v2_variant_(?:stable|canary_x_1)_(?:responses_[1-5]xx|latency_ms_bucket)\",job=\"envoy\"})"
        );
    }

    #[test]
    fn variants_that_sanitize_alike_are_refused() {
        let error = Plan::new(&query(&["new-api", "new_api"]), "", "p").expect_err("ambiguous");
        assert!(matches!(error, SourceError::Ambiguous { .. }), "{error}");
    }

    #[test]
    fn counts_from_a_result_vector() {
        let plan = Plan::new(&query(&["canary", "dark"]), "", "p").expect("plan");
        let series = |name: &str, le: Option<&str>, value: &str| {
            let mut metric = serde_json::json!({"__name__": name});
            if let Some(le) = le {
                metric["le"] = le.into();
            }
            serde_json::json!({"metric": metric, "value": [1.5, value]})
        };
        let p = "meshcanary_shop_front_v2_variant_canary_";
        let result = vec![
            series(&format!("{p}responses_2xx"), None, "7"),
            series(&format!("{p}responses_5xx"), None, "3"),
            series(&format!("{p}latency_ms_bucket"), Some("0.5"), "1"),
            series(&format!("{p}latency_ms_bucket"), Some("500"), "8"),
            series(&format!("{p}latency_ms_bucket"), Some("1000"), "9"),
            series(&format!("{p}latency_ms_bucket"), Some("+Inf"), "10"),
        ];
        let counts = plan.counts("p", &result).expect("counts");
        assert_eq!(
            counts,
            vec![
                VariantCounts {
                    responses: 10,
                    errors: 3,
                    latency_samples: 10,
                    slow: 2
                },
                VariantCounts::default()
            ]
        );
    }
}
