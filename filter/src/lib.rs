//! meshcanary's proxy-wasm HTTP filter: decides which version of a service gets each
//! request, writes the decision into a request header Envoy routes on, and counts
//! requests, responses and latency per version.
//!
//! All decisions come from the pure `meshcanary-policy` crate; this crate only moves
//! values between Envoy and it. It never panics on its own (clippy denies unwrap,
//! expect and panic), and counts what fails.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod host;
mod metrics;

use std::cell::Cell;
use std::rc::Rc;

use meshcanary_policy::{Placement, Policy};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

use metrics::{bump, record, FilterError, Metrics, NO_RESPONSE};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> { Box::new(PolicyRoot::default()) });
}}

/// What every request of one configuration shares.
struct Configured {
    policy: Policy,
    metrics: Metrics,
    /// State of the per-VM generator for random splits (splitmix64).
    random_state: Cell<u64>,
}

impl Configured {
    /// A uniformly distributed 64-bit value; not cryptographic, which a traffic split
    /// does not need. Each VM starts from the clock, so workers draw differently.
    fn next_random(&self) -> u64 {
        let state = self.random_state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.random_state.set(state);
        meshcanary_policy::bucket::fmix64(state)
    }
}

/// The root context: parses and compiles the policy on every (re)configuration.
#[derive(Default)]
struct PolicyRoot {
    configured: Option<Rc<Configured>>,
}

impl Context for PolicyRoot {}

impl RootContext for PolicyRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = host::plugin_configuration().unwrap_or_default();
        let outcome = if bytes.is_empty() {
            Err(
                "no policy configured: set the filter's configuration to the policy JSON"
                    .to_string(),
            )
        } else {
            Policy::from_json(&bytes).map_err(|errors| {
                for error in errors.iter() {
                    log::error!("meshcanary: invalid policy: {}", error);
                }
                format!(
                    "{} problem(s) in the policy; configuration refused (Envoy keeps the previous one, if any)",
                    errors.len()
                )
            })
        };
        let config_metric = |name: &str| host::define_metric(MetricType::Counter, name);
        match outcome {
            Ok(policy) => {
                bump(config_metric("meshcanary.config.accepted"));
                log::info!(
                    "meshcanary: policy {:?} configured: {} variants, {} rules",
                    policy.name,
                    policy.variants.len(),
                    policy.rules.len()
                );
                let metrics = Metrics::define(&policy);
                let seed = host::now_ns().unwrap_or(0) ^ (self as *const Self as u64);
                self.configured = Some(Rc::new(Configured {
                    policy,
                    metrics,
                    random_state: Cell::new(seed),
                }));
                true
            }
            Err(summary) => {
                bump(config_metric("meshcanary.config.rejected"));
                log::error!("meshcanary: policy rejected: {}", summary);
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // A root that never accepted a policy still has to hand out a context (the SDK
        // panics on None); it lets requests through untouched.
        Some(Box::new(RoutingStream {
            configured: self.configured.clone(),
            decided: None,
            started_ns: None,
            responded: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP stream: decides on request headers, counts on response headers and at the end.
struct RoutingStream {
    configured: Option<Rc<Configured>>,
    /// The variant chosen for this request, once decided.
    decided: Option<usize>,
    /// Host time of the request headers, for latency.
    started_ns: Option<u64>,
    /// Whether response headers were seen (otherwise the stream ended without a response).
    responded: bool,
}

impl Context for RoutingStream {}

impl HttpContext for RoutingStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let configured = match &self.configured {
            Some(c) => Rc::clone(c),
            None => return Action::Continue,
        };
        let (policy, metrics) = (&configured.policy, &configured.metrics);
        let inputs: Vec<Option<Vec<u8>>> = policy
            .inputs
            .iter()
            .map(|name| {
                host::request_header(name).unwrap_or_else(|_| {
                    metrics.error(FilterError::ReadHeader);
                    None
                })
            })
            .collect();
        let decision = policy.decide(&inputs, || configured.next_random());
        let variant = &policy.variants[decision.variant];
        // Replaces any value the client sent: the header is ours to set.
        if host::set_request_header(&policy.decision_header, variant.as_bytes()).is_err() {
            metrics.error(FilterError::SetHeader);
        }
        host::clear_route_cache();

        self.decided = Some(decision.variant);
        self.started_ns = host::now_ns();
        if self.started_ns.is_none() {
            metrics.error(FilterError::Clock);
        }
        bump(metrics.variants[decision.variant].requests);
        match decision.rule {
            Some(rule) => {
                let rule_metrics = &metrics.rules[rule];
                bump(rule_metrics.matches);
                if decision.placement.map_or(false, Placement::key_missing) {
                    bump(rule_metrics.key_missing);
                }
            }
            None => bump(metrics.fallback),
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let (configured, variant) = match (&self.configured, self.decided) {
            (Some(c), Some(v)) => (c, v),
            _ => return Action::Continue,
        };
        self.responded = true;
        let metrics = &configured.metrics.variants[variant];
        let status = match host::response_header(":status") {
            Ok(Some(bytes)) => parse_status(&bytes),
            _ => None,
        };
        match status {
            Some(code) => bump(metrics.responses[metrics::response_class(code)]),
            None => {
                configured.metrics.error(FilterError::ReadStatus);
                bump(metrics.responses[metrics::response_class(0)]);
            }
        }
        if let (Some(start), Some(now)) = (self.started_ns, host::now_ns()) {
            record(metrics.latency_ms, now.saturating_sub(start) / 1_000_000);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let (Some(configured), Some(variant), false) =
            (&self.configured, self.decided, self.responded)
        {
            bump(configured.metrics.variants[variant].responses[NO_RESPONSE]);
        }
    }
}

/// Parses a `:status` value; `None` for anything that is not a 3-digit code.
fn parse_status(bytes: &[u8]) -> Option<u32> {
    if bytes.len() != 3 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        bytes
            .iter()
            .fold(0, |acc, b| acc * 10 + u32::from(b - b'0')),
    )
}
