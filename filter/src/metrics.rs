//! The filter's metrics: names, definition and the handles used per request.
//!
//! Every name lives under `meshcanary.<policy>.` so it is easy to find in `/stats`
//! (Envoy shows it as `wasmcustom.meshcanary.…`) and in Prometheus. Names are built once
//! per configuration, never per request.
//!
//! Counters are counted in the module and added to Envoy's stats by [`flush`], which
//! the root context runs every [`FLUSH_PERIOD`] and when it shuts down. A host call
//! costs about as much as the rest of a request's work in the module, and a request
//! bumps three or four counters: batching them is what keeps the filter close to the
//! cost of an empty one (`make bench`). Histograms cannot be batched (Envoy records one
//! value per call), so they are recorded at once.

use std::cell::RefCell;
use std::time::Duration;

use meshcanary_policy::Policy;
use proxy_wasm::types::MetricType;

use crate::host;

/// How often counted increments reach Envoy: the longest a counter in `/stats` lags
/// behind the requests it counts, and the most counting a failed VM can lose.
pub const FLUSH_PERIOD: Duration = Duration::from_millis(meshcanary_policy::envoy::FLUSH_PERIOD_MS);

/// A counter: an index into this VM's pending increments; `None` when the host
/// refused to define it (counted nowhere, since the counter for that would be a
/// metric too: the configuration log says so).
#[derive(Clone, Copy)]
pub struct Counter(Option<usize>);

/// A histogram's host metric id; `None` when the host refused to define it.
#[derive(Clone, Copy)]
pub struct Histogram(Option<u32>);

thread_local! {
    /// Per counter defined in this VM: its host metric id and the increments not yet
    /// flushed. A VM is single-threaded; counters are never removed, and defining the
    /// same metric again (a reconfiguration) reuses its entry, so this stays as long
    /// as the set of metric names ever configured.
    // (Clippy 1.63 mistakes the macro's expansion for an interior-mutable `const`.)
    #[allow(clippy::declare_interior_mutable_const)]
    static PENDING: RefCell<Vec<(u32, u64)>> = const { RefCell::new(Vec::new()) };
}

thread_local! {
    /// Every metric this VM defined, by name, with Envoy's id for it. Envoy hands out a new
    /// id (and keeps a new entry) for every `define_metric` call, even for a name it knows:
    /// defining the policy's metrics again at every reconfiguration grew Envoy's memory by
    /// about 7 KiB per policy update (`make soak`). So each name is defined once per VM.
    // (A list, not a hash map: it is searched only when a policy is configured, and one
    // more hash map type costs the module about 2 KB.)
    #[allow(clippy::declare_interior_mutable_const)]
    static DEFINED: RefCell<Vec<(String, u32)>> = const { RefCell::new(Vec::new()) };
}

/// Envoy's id for metric `name`, defining it on first use in this VM.
fn define(kind: MetricType, name: &str) -> Option<u32> {
    let known = DEFINED.with(|defined| {
        let defined = defined.try_borrow().ok()?;
        defined
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, id)| *id)
    });
    if known.is_some() {
        return known;
    }
    let id = host::define_metric(kind, name)?;
    DEFINED.with(|defined| {
        if let Ok(mut defined) = defined.try_borrow_mut() {
            defined.push((name.to_string(), id));
        }
    });
    Some(id)
}

impl Counter {
    /// Defines (or finds) counter `name`.
    pub fn define(name: &str) -> Counter {
        let id = match define(MetricType::Counter, name) {
            Some(id) => id,
            None => return Counter(None),
        };
        Counter(PENDING.with(|pending| {
            let mut pending = pending.try_borrow_mut().ok()?;
            Some(match pending.iter().position(|(known, _)| *known == id) {
                Some(index) => index,
                None => {
                    pending.push((id, 0));
                    pending.len() - 1
                }
            })
        }))
    }

    /// Adds one; Envoy sees it at the next [`flush`].
    pub fn bump(self) {
        if let Some(index) = self.0 {
            PENDING.with(|pending| {
                if let Ok(mut pending) = pending.try_borrow_mut() {
                    if let Some((_, count)) = pending.get_mut(index) {
                        *count += 1;
                    }
                }
            });
        }
    }
}

impl Histogram {
    /// Defines (or finds) histogram `name`.
    pub fn define(name: &str) -> Histogram {
        Histogram(define(MetricType::Histogram, name))
    }

    /// Records one value, at once.
    pub fn record(self, value: u64) {
        if let Some(id) = self.0 {
            host::record(id, value);
        }
    }
}

/// Adds every pending increment to its Envoy counter.
pub fn flush() {
    PENDING.with(|pending| {
        if let Ok(mut pending) = pending.try_borrow_mut() {
            for (id, count) in pending.iter_mut().filter(|(_, count)| *count > 0) {
                host::increment_by(*id, *count);
                *count = 0;
            }
        }
    });
}

/// Adds one to counter `name` at once, bypassing the batch: for rare events that
/// operators (and tests) look for right away, such as a refused configuration.
pub fn count_now(name: &str) {
    if let Some(id) = define(MetricType::Counter, name) {
        host::increment_by(id, 1);
    }
}

/// Response classes counted per variant, in index order.
pub const RESPONSE_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "no_response"];

/// Index in [`RESPONSE_CLASSES`] of a stream that ended without response headers.
pub const NO_RESPONSE: usize = 5;

/// Metrics of one variant.
pub struct VariantMetrics {
    /// Requests decided for this variant.
    pub requests: Counter,
    /// Responses by class ([`RESPONSE_CLASSES`]).
    pub responses: [Counter; 6],
    /// Milliseconds from request headers to response headers.
    pub latency_ms: Histogram,
}

/// Metrics of one rule.
pub struct RuleMetrics {
    /// Requests this rule decided.
    pub matches: Counter,
    /// Requests a split rule placed randomly or at the fallback because the key was absent.
    pub key_missing: Counter,
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
    pub fallback: Counter,
    /// Filter errors by [`FilterError`].
    errors: [Counter; 4],
}

impl Metrics {
    /// Defines every metric of `policy`; safe to call again on reconfiguration (the host
    /// returns handles to the same stats).
    pub fn define(policy: &Policy) -> Metrics {
        let base = format!("meshcanary.{}", policy.name);
        let counter = |name: String| Counter::define(&name);
        let variants = policy
            .variants
            .iter()
            .map(|v| {
                let prefix = format!("{}.variant.{}", base, v);
                VariantMetrics {
                    requests: counter(format!("{}.requests", prefix)),
                    responses: RESPONSE_CLASSES
                        .map(|class| counter(format!("{}.responses.{}", prefix, class))),
                    latency_ms: Histogram::define(&format!("{}.latency_ms", prefix)),
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
        self.errors[kind as usize].bump();
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
