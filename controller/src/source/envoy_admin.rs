//! Envoy's admin endpoint as a metric source (the embedded default: nothing to run besides
//! Envoy). It reads `/stats?format=json` from one or more Envoys and sums them.
//!
//! Per variant `V` of policy `P` it reads the filter's (see the README's "Metrics"):
//! - counters `wasmcustom.meshcanary.P.variant.V.responses.{1xx,2xx,3xx,4xx,5xx}`:
//!   `responses` is their sum and `errors` is `5xx` (`no_response` is not a response);
//! - histogram `wasmcustom.meshcanary.P.variant.V.latency_ms`, asked for with
//!   `histogram_buckets=cumulative`, which Envoy 1.40 answers as
//!   `{"histograms": [{"name": …, "buckets": [{"upper_bound": 0.5, "interval": 0, "cumulative": 2}, …]}]}`
//!   inside the `stats` list (bounds may be printed as `300000.0` or `3e+05`).
//!   `latency_samples` is the cumulative count of the largest bucket and `slow` is that
//!   minus the cumulative count at the bucket whose upper bound is the threshold.
//!
//! Two things to know when reading these numbers:
//! - **Histograms lag counters.** Counters are read live, but Envoy merges its workers'
//!   histograms into what the admin endpoint shows only at a stats flush, every
//!   `stats_flush_interval` (a top-level bootstrap field, 5 s by default). So
//!   `latency_samples` can trail `responses` by up to one interval. To shorten it, set for
//!   example `stats_flush_interval: 1s` at the top level of Envoy's bootstrap configuration.
//! - **One-hour ceiling.** The cumulative view has no `+Inf` bucket, so samples above the
//!   largest boundary (3,600,000 ms with Envoy's default buckets) are in neither
//!   `latency_samples` nor `slow`. The Prometheus source counts them (it reads `le="+Inf"`).
//!
//! A counter or histogram that is absent (no traffic yet, or a variant the policy does not
//! have) reads as zero. An endpoint that cannot be read fails the whole read: a partial sum
//! would look like a drop in traffic.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::{
    cumulative_at, excerpt, fetch, MetricSource, Query, Snapshot, SourceError, VariantCounts,
};

/// How long one read of one admin endpoint may take unless [`EnvoyAdmin::timeout`] says
/// otherwise: well above a loopback or in-cluster round trip, and short enough that an
/// unreachable Envoy turns into a "hold" within a couple of controller ticks.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads the filter's per-variant counters from Envoy admin endpoints and sums them.
#[derive(Debug, Clone)]
pub struct EnvoyAdmin {
    /// Admin base URLs, e.g. `http://127.0.0.1:9901`, one per Envoy whose traffic counts.
    pub urls: Vec<String>,
    /// HTTP client; pass the controller's shared one so connections are reused.
    pub client: reqwest::Client,
    /// Limit for reading one endpoint, connection included.
    pub timeout: Duration,
}

impl EnvoyAdmin {
    /// A source over `urls` with [`DEFAULT_TIMEOUT`].
    pub fn new(urls: Vec<String>, client: reqwest::Client) -> Self {
        EnvoyAdmin {
            urls,
            client,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl MetricSource for EnvoyAdmin {
    async fn read(&self, query: &Query) -> Result<Snapshot, SourceError> {
        if self.urls.is_empty() {
            // Zeros here would read as "no traffic" rather than as a configuration mistake.
            return Err(SourceError::Unreachable {
                endpoint: "(none)".to_string(),
                reason: "no Envoy admin URL is configured".to_string(),
            });
        }
        let plan = Arc::new(Plan::new(query));
        // All endpoints are read at once so that one slow Envoy costs one timeout, not one
        // per URL, and so that the sum is as close to a single instant as it can be.
        let mut reads = tokio::task::JoinSet::new();
        for (index, base) in self.urls.iter().enumerate() {
            let client = self.client.clone();
            let base = base.clone();
            let plan = Arc::clone(&plan);
            let timeout = self.timeout;
            reads.spawn(async move { (index, read_one(&client, &base, &plan, timeout).await) });
        }
        let mut results: Vec<Option<Result<Vec<VariantCounts>, SourceError>>> =
            (0..self.urls.len()).map(|_| None).collect();
        while let Some(joined) = reads.join_next().await {
            match joined {
                Ok((index, result)) => {
                    if let Some(slot) = results.get_mut(index) {
                        *slot = Some(result);
                    }
                }
                Err(e) => {
                    return Err(SourceError::Unreachable {
                        endpoint: self.urls.join(", "),
                        reason: format!("the read task failed: {e}"),
                    })
                }
            }
        }
        let mut sums = vec![VariantCounts::default(); query.variants.len()];
        // Errors are reported in URL order so the same outage gives the same message.
        for (base, result) in self.urls.iter().zip(results) {
            let counts = result.ok_or_else(|| SourceError::Unreachable {
                endpoint: base.clone(),
                reason: "the read task ended without an answer".to_string(),
            })??;
            for (sum, one) in sums.iter_mut().zip(counts) {
                add(sum, &one);
            }
        }
        Ok(Snapshot {
            variants: query.variants.iter().cloned().zip(sums).collect(),
        })
    }

    fn describe(&self) -> String {
        format!("Envoy admin at {}", self.urls.join(", "))
    }
}

/// Adds `one` into `sum` (saturating: a counter near 2^64 is not something to crash on).
fn add(sum: &mut VariantCounts, one: &VariantCounts) {
    sum.responses = sum.responses.saturating_add(one.responses);
    sum.errors = sum.errors.saturating_add(one.errors);
    sum.latency_samples = sum.latency_samples.saturating_add(one.latency_samples);
    sum.slow = sum.slow.saturating_add(one.slow);
}

/// Which stat is which, prepared once per read and shared by the per-endpoint tasks.
#[derive(Debug)]
struct Plan {
    /// Full stat name → (index into the query's variants, what it counts).
    names: HashMap<String, (usize, Stat)>,
    /// The `filter=` regex that keeps Envoy's answer to exactly these stats.
    filter: String,
    /// Number of variants asked for.
    variants: usize,
    /// The query's threshold.
    threshold_ms: u64,
}

/// What one of the stats read counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stat {
    /// `responses.<class>xx`, with the class's first digit.
    Responses(u8),
    /// `latency_ms`.
    Latency,
}

impl Plan {
    fn new(query: &Query) -> Plan {
        let mut names = HashMap::new();
        for (index, variant) in query.variants.iter().enumerate() {
            let prefix = format!(
                "wasmcustom.meshcanary.{}.variant.{}.",
                query.policy, variant
            );
            for class in 1..=5u8 {
                names.insert(
                    format!("{prefix}responses.{class}xx"),
                    (index, Stat::Responses(class)),
                );
            }
            names.insert(format!("{prefix}latency_ms"), (index, Stat::Latency));
        }
        let alternatives: Vec<String> = query.variants.iter().map(|v| re2_escape(v)).collect();
        let filter = format!(
            r"^wasmcustom\.meshcanary\.{}\.variant\.(?:{})\.(?:responses\.[1-5]xx|latency_ms)$",
            re2_escape(&query.policy),
            alternatives.join("|")
        );
        Plan {
            names,
            filter,
            variants: query.variants.len(),
            threshold_ms: query.latency_threshold_ms,
        }
    }
}

/// Escapes `text` for a RE2 regex (Envoy's `filter=`). Policy and variant names are
/// `[a-z0-9_-]` today, but the query type does not promise it.
fn re2_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        // RE2 takes a backslash before any ASCII punctuation as that character itself;
        // `_` is a word character and is left alone.
        if c.is_ascii_punctuation() && c != '_' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Reads one endpoint: per variant (in query order), its counts.
async fn read_one(
    client: &reqwest::Client,
    base: &str,
    plan: &Plan,
    timeout: Duration,
) -> Result<Vec<VariantCounts>, SourceError> {
    let unreachable = |reason: String| SourceError::Unreachable {
        endpoint: base.to_string(),
        reason,
    };
    let mut url = reqwest::Url::parse(&format!("{}/stats", base.trim_end_matches('/')))
        .map_err(|e| unreachable(format!("not a URL: {e}")))?;
    url.query_pairs_mut()
        .append_pair("format", "json")
        .append_pair("filter", &plan.filter)
        .append_pair("histogram_buckets", "cumulative");
    let (status, body) = fetch(client, url, timeout, base).await?;
    if !status.is_success() {
        return Err(unreachable(format!(
            "answered HTTP {}: {}",
            status.as_u16(),
            excerpt(&body)
        )));
    }
    let json: Value = serde_json::from_slice(&body).map_err(|e| SourceError::Malformed {
        endpoint: base.to_string(),
        reason: format!("not JSON ({e}): {}", excerpt(&body)),
    })?;
    parse_stats(base, &json, plan)
}

/// Turns one `/stats?format=json&histogram_buckets=cumulative` answer into counts.
fn parse_stats(
    endpoint: &str,
    json: &Value,
    plan: &Plan,
) -> Result<Vec<VariantCounts>, SourceError> {
    let malformed = |reason: String| SourceError::Malformed {
        endpoint: endpoint.to_string(),
        reason,
    };
    let stats = json
        .get("stats")
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("no \"stats\" list in the answer".to_string()))?;
    let mut counts = vec![VariantCounts::default(); plan.variants];
    for stat in stats {
        if let Some(histograms) = stat.get("histograms") {
            // Other bucket modes answer with an object here; only the cumulative list
            // carries the counts at each boundary.
            let histograms = histograms.as_array().ok_or_else(|| {
                malformed(
                    "\"histograms\" is not a list of cumulative buckets (was \
                     histogram_buckets=cumulative ignored?)"
                        .to_string(),
                )
            })?;
            for histogram in histograms {
                let Some(name) = histogram.get("name").and_then(Value::as_str) else {
                    return Err(malformed(format!("histogram without a name: {histogram}")));
                };
                let Some(&(index, Stat::Latency)) = plan.names.get(name) else {
                    continue;
                };
                let (samples, slow) = latency(endpoint, name, histogram, plan.threshold_ms)?;
                if let Some(variant) = counts.get_mut(index) {
                    variant.latency_samples = variant.latency_samples.saturating_add(samples);
                    variant.slow = variant.slow.saturating_add(slow);
                }
            }
        } else if let Some(name) = stat.get("name").and_then(Value::as_str) {
            let Some(&(index, Stat::Responses(class))) = plan.names.get(name) else {
                continue;
            };
            let value = stat
                .get("value")
                .and_then(Value::as_u64)
                .ok_or_else(|| malformed(format!("counter {name} has no whole value: {stat}")))?;
            if let Some(variant) = counts.get_mut(index) {
                variant.responses = variant.responses.saturating_add(value);
                if class == 5 {
                    variant.errors = variant.errors.saturating_add(value);
                }
            }
        }
    }
    Ok(counts)
}

/// `(samples, slower than the threshold)` from one histogram's cumulative buckets.
fn latency(
    endpoint: &str,
    name: &str,
    histogram: &Value,
    threshold_ms: u64,
) -> Result<(u64, u64), SourceError> {
    let malformed = |reason: String| SourceError::Malformed {
        endpoint: endpoint.to_string(),
        reason,
    };
    let buckets = histogram
        .get("buckets")
        .and_then(Value::as_array)
        .ok_or_else(|| malformed(format!("histogram {name} has no \"buckets\" list")))?;
    let mut parsed = Vec::with_capacity(buckets.len());
    for bucket in buckets {
        let bound = bucket.get("upper_bound").and_then(Value::as_f64);
        let cumulative = bucket.get("cumulative").and_then(Value::as_u64);
        match (bound, cumulative) {
            (Some(bound), Some(cumulative)) => parsed.push((bound, cumulative)),
            _ => {
                return Err(malformed(format!(
                    "histogram {name} has a bucket without a numeric upper_bound and a whole \
                     cumulative count: {bucket}"
                )))
            }
        }
    }
    let at_threshold = cumulative_at(&parsed, threshold_ms).map_err(|boundaries| {
        SourceError::ThresholdNotABucketBoundary {
            endpoint: endpoint.to_string(),
            histogram: name.to_string(),
            threshold_ms,
            boundaries,
        }
    })?;
    // The largest bucket holds every sample up to the largest boundary: the total this
    // view can offer (see the module documentation for what lies beyond it).
    let samples = parsed
        .iter()
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, cumulative)| *cumulative)
        .unwrap_or(0);
    let slow = samples.checked_sub(at_threshold).ok_or_else(|| {
        malformed(format!(
            "histogram {name} counts {at_threshold} samples at or below {threshold_ms} ms but \
             only {samples} in all"
        ))
    })?;
    Ok((samples, slow))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(variants: &[&str], threshold_ms: u64) -> Query {
        Query {
            policy: "shop-front_v2".into(),
            variants: variants.iter().map(|v| v.to_string()).collect(),
            latency_threshold_ms: threshold_ms,
        }
    }

    #[test]
    fn filter_regex_is_anchored_and_escaped() {
        let plan = Plan::new(&query(&["stable", "canary-x_1"], 500));
        assert_eq!(
            plan.filter,
            r"^wasmcustom\.meshcanary\.shop\-front_v2\.variant\.(?:stable|canary\-x_1)\.(?:responses\.[1-5]xx|latency_ms)$"
        );
    }

    #[test]
    fn parses_counters_and_cumulative_buckets_as_envoy_prints_them() {
        let plan = Plan::new(&query(&["canary", "dark"], 500));
        let json = serde_json::json!({"stats": [
            {"name": "wasmcustom.meshcanary.shop-front_v2.variant.canary.responses.2xx", "value": 7},
            {"name": "wasmcustom.meshcanary.shop-front_v2.variant.canary.responses.4xx", "value": 1},
            {"name": "wasmcustom.meshcanary.shop-front_v2.variant.canary.responses.5xx", "value": 2},
            {"histograms": [{"name": "wasmcustom.meshcanary.shop-front_v2.variant.canary.latency_ms",
              "buckets": [
                {"upper_bound": 0.5, "interval": 0, "cumulative": 3},
                {"upper_bound": 500, "interval": 0, "cumulative": 8},
                {"upper_bound": 3e+05, "interval": 0, "cumulative": 10},
                {"upper_bound": 3600000, "interval": 0, "cumulative": 10}
              ]}]}
        ]});
        let counts = parse_stats("http://envoy", &json, &plan).expect("parses");
        assert_eq!(
            counts,
            vec![
                VariantCounts {
                    responses: 10,
                    errors: 2,
                    latency_samples: 10,
                    slow: 2
                },
                VariantCounts::default()
            ]
        );
    }

    #[test]
    fn a_threshold_off_the_boundaries_names_them() {
        let plan = Plan::new(&query(&["canary"], 600));
        let json = serde_json::json!({"stats": [{"histograms": [{
            "name": "wasmcustom.meshcanary.shop-front_v2.variant.canary.latency_ms",
            "buckets": [{"upper_bound": 500, "cumulative": 1}, {"upper_bound": 1000, "cumulative": 1}]}]}]});
        let error = parse_stats("http://envoy", &json, &plan).expect_err("600 is no boundary");
        let text = error.to_string();
        assert!(
            matches!(error, SourceError::ThresholdNotABucketBoundary { threshold_ms: 600, ref boundaries, .. } if boundaries == &[500.0, 1000.0]),
            "{text}"
        );
        assert!(text.contains("500, 1000"), "{text}");
    }

    #[test]
    fn other_bucket_modes_are_refused() {
        let plan = Plan::new(&query(&["canary"], 500));
        let json = serde_json::json!({"stats": [{"histograms": {"supported_quantiles": [0, 50]}}]});
        assert!(matches!(
            parse_stats("http://envoy", &json, &plan),
            Err(SourceError::Malformed { .. })
        ));
    }
}
