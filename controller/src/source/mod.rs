//! Metric sources: where the controller reads the filter's per-variant counters.
//!
//! A source returns *cumulative* counters (as Envoy and Prometheus keep them); the
//! verdict engine takes differences itself, which is what makes it robust to missed
//! reads and to counter resets.

use std::collections::BTreeMap;
use std::future::Future;

pub mod envoy_admin;
pub mod istio;
pub mod prometheus;

/// Cumulative counters of one variant, summed over every proxy the source reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VariantCounts {
    /// Responses of any class `1xx`–`5xx` (Envoy's own local replies included).
    pub responses: u64,
    /// `5xx` responses.
    pub errors: u64,
    /// Samples in the variant's latency histogram (it can lag `responses` by a stats flush).
    pub latency_samples: u64,
    /// Of those, samples slower than the query's latency threshold.
    pub slow: u64,
}

/// Counters of every variant asked for, by variant name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Per variant; a variant with no data yet is present with zeros.
    pub variants: BTreeMap<String, VariantCounts>,
}

/// What to read.
#[derive(Debug, Clone)]
pub struct Query {
    /// The policy's `name` (metrics live under `meshcanary.<policy>.`).
    pub policy: String,
    /// The variants to read.
    pub variants: Vec<String>,
    /// Latency threshold in milliseconds; must be a histogram bucket boundary.
    pub latency_threshold_ms: u64,
}

/// Why a source could not be read. Never a verdict: the engine holds on it.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The endpoint could not be reached or answered with an error.
    #[error("cannot read {endpoint}: {reason}")]
    Unreachable {
        /// URL that failed.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// The endpoint answered something this source does not understand.
    #[error("unexpected answer from {endpoint}: {reason}")]
    Malformed {
        /// URL that answered.
        endpoint: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The query's latency threshold is not an upper bound of the latency histogram's
    /// buckets, so the number of slower requests cannot be read exactly. Added because this
    /// is a configuration mistake, not a passing outage: retrying will not fix it, and the
    /// fix is to pick one of `boundaries` (or configure the histogram's buckets).
    #[error(
        "cannot count requests slower than {threshold_ms} ms from {endpoint}: {histogram} has no \
         bucket boundary at {threshold_ms}; its boundaries (ms) are {}",
        format_boundaries(.boundaries)
    )]
    ThresholdNotABucketBoundary {
        /// URL that answered.
        endpoint: String,
        /// The histogram (as the source names it) that lacks the boundary.
        histogram: String,
        /// The threshold asked for.
        threshold_ms: u64,
        /// The boundaries the histogram does have, ascending.
        boundaries: Vec<f64>,
    },
    /// The source cannot tell the query's variants apart. Added for Prometheus, where
    /// Envoy folds every character other than `[a-zA-Z0-9_]` into `_`, so variants such as
    /// `new-api` and `new_api` share one metric name; summing them silently would judge the
    /// wrong traffic.
    #[error("{endpoint} cannot answer this query: {reason}")]
    Ambiguous {
        /// URL of the source.
        endpoint: String,
        /// Which names collide, and why.
        reason: String,
    },
}

/// `0.5, 1, 5, …` for error messages.
fn format_boundaries(boundaries: &[f64]) -> String {
    if boundaries.is_empty() {
        return "(none)".to_string();
    }
    boundaries
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A place the controller reads metrics from.
pub trait MetricSource {
    /// Reads the current cumulative counters for `query`.
    fn read(&self, query: &Query) -> impl Future<Output = Result<Snapshot, SourceError>> + Send;

    /// One line naming the source, for logs.
    fn describe(&self) -> String;
}

/// The cumulative count at the bucket whose upper bound is `threshold_ms`, from cumulative
/// buckets `(upper bound, samples at or below it)`; shared by the sources. `Err` carries the
/// boundaries there are (ascending) when none equals the threshold.
fn cumulative_at(buckets: &[(f64, u64)], threshold_ms: u64) -> Result<u64, Vec<f64>> {
    // Thresholds are whole milliseconds and bounds are exact in f64 up to 2^53, so an exact
    // comparison is the right one: "close to a boundary" would silently count the wrong bucket.
    let threshold = threshold_ms as f64;
    match buckets.iter().find(|(bound, _)| *bound == threshold) {
        Some((_, count)) => Ok(*count),
        None => {
            let mut bounds: Vec<f64> = buckets.iter().map(|(bound, _)| *bound).collect();
            bounds.sort_by(f64::total_cmp);
            bounds.dedup();
            Err(bounds)
        }
    }
}

/// GETs `url` within `timeout`: its status and body. A failure to connect, send or read
/// is `Unreachable`, naming `endpoint`.
async fn fetch(
    client: &reqwest::Client,
    url: reqwest::Url,
    timeout: std::time::Duration,
    endpoint: &str,
) -> Result<(reqwest::StatusCode, bytes::Bytes), SourceError> {
    let unreachable = |reason: String| SourceError::Unreachable {
        endpoint: endpoint.to_string(),
        reason,
    };
    let response = client
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| unreachable(error_chain(&e)))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| unreachable(format!("reading the answer: {}", error_chain(&e))))?;
    Ok((status, body))
}

/// An error with its causes, which is where reqwest puts "connection refused".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The start of an answer, for error messages.
fn excerpt(body: &[u8]) -> String {
    const LIMIT: usize = 300;
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}
