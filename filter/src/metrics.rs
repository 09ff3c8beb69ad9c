//! The filter's metrics: names, definition and the handles used per request.
//!
//! Every name lives under `meshcanary.<policy>.` so it is easy to find in `/stats`
//! (Envoy shows it as `wasmcustom.meshcanary.…`) and in Prometheus. Names are built once
//! per configuration, never per request.

use meshcanary_policy::Policy;
use proxy_wasm::types::MetricType;

use crate::host;

/// A metric handle; `None` when the host refused to define it (counted nowhere, since
/// the counter for it would be a metric too: the configuration log says so).
pub type Handle = Option<u32>;

/// Response classes counted per variant, in index order.
pub const RESPONSE_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "no_response"];

/// Index in [`RESPONSE_CLASSES`] of a stream that ended without response headers.
pub const NO_RESPONSE: usize = 5;

/// Metrics of one variant.
pub struct VariantMetrics {
    /// Requests decided for this variant.
    pub requests: Handle,
    /// Responses by class ([`RESPONSE_CLASSES`]).
    pub responses: [Handle; 6],
    /// Milliseconds from request headers to response headers.
    pub latency_ms: Handle,
}

/// Metrics of one rule.
pub struct RuleMetrics {
    /// Requests this rule decided.
    pub matches: Handle,
    /// Requests a split rule placed randomly or at the fallback because the key was absent.
    pub key_missing: Handle,
}

/// Why the filter could not do something it meant to do.
#[derive(Clone, Copy)]
pub enum FilterError {
    /// Reading a request header failed.
    ReadHeader = 0,
    /// Writing the decision header failed (the request continues unrouted).
    SetHeader = 1,
    /// Reading the response status failed.
    ReadStatus = 2,
    /// The host clock could not be read (latency not recorded).
    Clock = 3,
}

const ERROR_NAMES: [&str; 4] = ["read_header", "set_header", "read_status", "clock"];

/// All metric handles of one configured policy.
pub struct Metrics {
    /// Per variant, aligned with the policy's variants.
    pub variants: Vec<VariantMetrics>,
    /// Per rule, aligned with the policy's rules.
    pub rules: Vec<RuleMetrics>,
    /// Requests no rule decided (sent to the fallback variant).
    pub fallback: Handle,
    /// Filter errors by [`FilterError`].
    errors: [Handle; 4],
}

impl Metrics {
    /// Defines every metric of `policy`; safe to call again on reconfiguration (the host
    /// returns handles to the same stats).
    pub fn define(policy: &Policy) -> Metrics {
        let base = format!("meshcanary.{}", policy.name);
        let counter = |name: String| host::define_metric(MetricType::Counter, &name);
        let variants = policy
            .variants
            .iter()
            .map(|v| {
                let prefix = format!("{}.variant.{}", base, v);
                VariantMetrics {
                    requests: counter(format!("{}.requests", prefix)),
                    responses: RESPONSE_CLASSES
                        .map(|class| counter(format!("{}.responses.{}", prefix, class))),
                    latency_ms: host::define_metric(
                        MetricType::Histogram,
                        &format!("{}.latency_ms", prefix),
                    ),
                }
            })
            .collect();
        let rules = policy
            .rules
            .iter()
            .map(|r| {
                let prefix = format!("{}.rule.{}", base, r.name);
                RuleMetrics {
                    matches: counter(format!("{}.matches", prefix)),
                    key_missing: counter(format!("{}.key_missing", prefix)),
                }
            })
            .collect();
        Metrics {
            variants,
            rules,
            fallback: counter(format!("{}.fallback", base)),
            errors: ERROR_NAMES.map(|e| counter(format!("{}.errors.{}", base, e))),
        }
    }

    /// Counts a filter error.
    pub fn error(&self, kind: FilterError) {
        bump(self.errors[kind as usize]);
    }
}

/// Adds one to a counter, if it exists.
pub fn bump(handle: Handle) {
    if let Some(id) = handle {
        host::increment(id);
    }
}

/// Records a histogram value, if the histogram exists.
pub fn record(handle: Handle, value: u64) {
    if let Some(id) = handle {
        host::record(id, value);
    }
}

/// Index in [`RESPONSE_CLASSES`] for an HTTP status code.
pub fn response_class(status: u32) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        // Anything else (5xx or nonsense) counts as a server-side failure.
        _ => 4,
    }
}

/// Parses a `:status` value; `None` for anything that is not a 3-digit code.
pub fn parse_status(bytes: &[u8]) -> Option<u32> {
    if bytes.len() != 3 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        bytes
            .iter()
            .fold(0, |acc, b| acc * 10 + u32::from(b - b'0')),
    )
}
