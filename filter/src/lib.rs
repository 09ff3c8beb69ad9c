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

// Natively only its unit tests use it: the native tests are multi-threaded, and the
// free lists are for a single-threaded VM.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod alloc;
mod host;
mod metrics;
mod shadow;
#[cfg(feature = "test-trap")]
mod test_trap;

use std::cell::Cell;
use std::rc::Rc;

use meshcanary_policy::mirror::BodyDigest;
use meshcanary_policy::{Compare, Marker, MirrorChoice, Placement, Policy, SkipReason};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use metrics::{parse_status, response_class, FilterError, Metrics, NO_RESPONSE};
use shadow::{CopyInProgress, Shadow, Skip};

/// Per-request allocations come from size-class free lists (see `alloc.rs`): in the
/// module only, the native unit tests keep the system allocator.
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: alloc::Pools = alloc::Pools::new();

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> { Box::new(PolicyRoot::default()) });
}}

/// What every request of one configuration shares (per worker).
struct Configured {
    /// The routing policy (its `mirror` section moved into `shadow`).
    policy: Policy,
    metrics: Metrics,
    /// Shadowing, when the policy has a `mirror` section.
    shadow: Option<Shadow>,
    /// State of the per-VM generator for random splits and sampling (splitmix64).
    random_state: Cell<u64>,
    /// Read all request headers in one host call rather than one call per input; decided
    /// once, in `on_configure` (see [`WHOLE_MAP_FROM_INPUTS`]).
    read_whole_map: bool,
}

/// From this many inputs on, one read of the whole header map is cheaper than one read
/// per input. A read that finds a value costs two host crossings (the read, and Envoy's
/// call back into the module to allocate the copy): 0.83–0.89 µs in Envoy 1.40, against
/// 0.31 µs for a header that is absent; the whole map of the `make bench` request (11
/// headers) costs 1.04 µs. (Each measured as 20 reads a request, in real Envoy, against
/// the empty filter.) So two inputs that are usually present already cost more one by
/// one. Mirroring always reads the whole map: it copies every header anyway.
const WHOLE_MAP_FROM_INPUTS: usize = 2;

// Policies below the threshold have at most one input, which `on_http_request_headers`
// reads by itself. (Old clippy takes a compile-time check for a runtime one.)
#[allow(clippy::assertions_on_constants)]
const _: () = assert!(WHOLE_MAP_FROM_INPUTS <= 2);

impl Configured {
    /// A uniformly distributed 64-bit value; not cryptographic, which a traffic split
    /// does not need. Each VM starts from its own random seed, so workers draw differently.
    fn next_random(&self) -> u64 {
        let state = self.random_state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.random_state.set(state);
        meshcanary_policy::bucket::fmix64(state)
    }
}

/// A value no other VM draws: the host's randomness (WASI `random_get`, where std's
/// hash-map keys come from) mixed with the clock. Workers run identical module instances,
/// so an address tells them nothing, and the clock is not enough either: seeded from
/// clock and address, 2 of 25 two-worker Envoy starts left one worker's copies unsent.
/// The shadow queue's name must differ per worker: Envoy wakes only the last root that
/// registered a name, so a worker sharing it never sends its copies
/// (`every_worker_sends_its_own_copies` in tests/tests/shadow.rs).
fn vm_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(host::now_ns().unwrap_or(0));
    hasher.finish()
}

/// The root context: parses and compiles the policy on every (re)configuration, and
/// sends shadow copies (see `shadow.rs` for why the root does).
#[derive(Default)]
struct PolicyRoot {
    configured: Option<Rc<Configured>>,
    /// Envoy asked this root to finish (a newer configuration replaced it) while copies
    /// were still on their way: it goes once they are answered.
    finishing: bool,
}

impl PolicyRoot {
    fn shadow(&self) -> Option<&Shadow> {
        self.configured.as_ref().and_then(|c| c.shadow.as_ref())
    }

    /// A finishing root whose last copy was answered tells Envoy it may go.
    fn finish_if_idle(&mut self) {
        if self.finishing && self.shadow().map_or(true, Shadow::idle) {
            self.finishing = false;
            metrics::flush();
            if !host::done() {
                log::warn!("meshcanary: the host refused proxy_done for a finished root");
            }
        }
    }
}

impl Context for PolicyRoot {
    fn on_done(&mut self) -> bool {
        // The root is going away: what was counted must not be lost.
        metrics::flush();
        // Copies still queued or in flight would be cut off with it, uncounted (Envoy
        // cancels a context's calls when it deletes it): stay until they are answered.
        // Each has a timeout, so this ends.
        if self.shadow().map_or(true, Shadow::idle) {
            return true;
        }
        self.finishing = true;
        false
    }

    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some(shadow) = self.shadow() {
            shadow.on_response(token_id, num_headers, body_size);
        }
        self.finish_if_idle();
    }
}

impl RootContext for PolicyRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        // One per VM: Envoy's base VM, one per worker, and one for every VM Envoy starts
        // again after a failure (`failure_policy: FAIL_RELOAD`). Under FAIL_OPEN and
        // FAIL_CLOSED Envoy counts no VM failure at all; this is the filter's own record
        // that VMs were replaced.
        metrics::count_now("meshcanary.vm.started");
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        host::set_tick_period(metrics::FLUSH_PERIOD);
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
        match outcome {
            Ok(mut policy) => {
                metrics::count_now("meshcanary.config.accepted");
                log::info!(
                    "meshcanary: policy {:?} configured: {} variants, {} rules, mirror {}",
                    policy.name,
                    policy.variants.len(),
                    policy.rules.len(),
                    policy.mirror.as_ref().map_or("off", |m| m.cluster.as_str()),
                );
                let metrics = Metrics::define(&policy);
                let seed = vm_seed();
                let random_state = Cell::new(seed);
                let shadow = policy.mirror.take().map(|mirror| {
                    let unique = meshcanary_policy::bucket::fmix64(seed ^ 0x5eed);
                    let token = shadow::copy_token(&policy.name, &bytes, vm_seed);
                    Shadow::new(&policy.name, mirror, unique, token)
                });
                let read_whole_map =
                    shadow.is_some() || policy.inputs.len() >= WHOLE_MAP_FROM_INPUTS;
                self.configured = Some(Rc::new(Configured {
                    policy,
                    metrics,
                    shadow,
                    random_state,
                    read_whole_map,
                }));
                true
            }
            Err(summary) => {
                metrics::count_now("meshcanary.config.rejected");
                log::error!("meshcanary: policy rejected: {}", summary);
                false
            }
        }
    }

    fn on_tick(&mut self) {
        metrics::flush();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Some(shadow) = self.shadow() {
            shadow.dispatch_ready(queue_id);
        }
        self.finish_if_idle();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // A root that never accepted a policy still has to hand out a context (the SDK
        // panics on None); it lets requests through untouched.
        Some(Box::new(RoutingStream {
            configured: self.configured.clone(),
            decided: None,
            counted: false,
            started_ns: None,
            responded: false,
            copy: None,
            copy_id: None,
            primary_class: None,
            response_digest: None,
            primary_recorded: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP stream: decides on request headers, builds the shadow copy while the body
/// streams past, counts on response headers and at the end.
struct RoutingStream {
    configured: Option<Rc<Configured>>,
    /// The variant chosen for this request, once decided.
    decided: Option<usize>,
    /// False for shadow copies arriving here: they are routed but never counted as live.
    counted: bool,
    /// Host time of the request headers, for latency.
    started_ns: Option<u64>,
    /// Whether response headers were seen (otherwise the stream ended without a response).
    responded: bool,
    /// The shadow copy being built while the request body streams past.
    copy: Option<CopyInProgress>,
    /// The copy's id, for the shadow-vs-primary comparison.
    copy_id: Option<u64>,
    /// The primary's status class, once its response headers were seen.
    primary_class: Option<usize>,
    /// Running digest of the primary's body, for `compare: "body"`.
    response_digest: Option<BodyDigest>,
    /// Whether the primary's outcome was handed to the comparison.
    primary_recorded: bool,
}

impl Context for RoutingStream {}

impl HttpContext for RoutingStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        #[cfg(feature = "test-trap")]
        test_trap::on_request();
        let configured = match &self.configured {
            Some(c) => Rc::clone(c),
            None => return Action::Continue,
        };
        let (policy, metrics) = (&configured.policy, &configured.metrics);
        // The policy's inputs, read once: slices of the whole header map, or one host
        // call each (whichever is cheaper for this policy). A failed read leaves the
        // input absent, and the request goes where that leads.
        let map = if configured.read_whole_map {
            let map = host::request_headers();
            if map.is_none() {
                metrics.error(FilterError::ReadHeader);
            }
            map
        } else {
            None
        };
        // Below `WHOLE_MAP_FROM_INPUTS` (two) inputs there is at most one, read by
        // itself and owned here; `inputs` borrows it or the map. Up to eight inputs live
        // on the stack, so that a request allocates nothing for them.
        let only: Option<Vec<u8>>;
        let mut on_stack: [Option<&[u8]>; 8] = [None; 8];
        let mut on_heap: Vec<Option<&[u8]>> = Vec::new();
        let inputs: &mut [Option<&[u8]>] = match on_stack.get_mut(..policy.inputs.len()) {
            Some(inputs) => inputs,
            None => {
                on_heap.resize(policy.inputs.len(), None);
                &mut on_heap
            }
        };
        match &map {
            Some(map) => map.select_into(&policy.inputs, inputs),
            None if configured.read_whole_map => {}
            None => {
                only = policy.inputs.first().and_then(|name| {
                    host::request_header(name).unwrap_or_else(|_| {
                        metrics.error(FilterError::ReadHeader);
                        None
                    })
                });
                if let Some(first) = inputs.first_mut() {
                    *first = only.as_deref();
                }
            }
        }
        let inputs: &[Option<&[u8]>] = inputs;
        // Routing comes first, so a copy carries the primary's decision header too.
        let decision = policy.decide(inputs, || configured.next_random());
        let variant = &policy.variants[decision.variant];
        // Replaces any value the client sent: the header is ours to set. Envoy clears the
        // route cache on this change for modules of ABI 0.2.1 (every proxy-wasm 0.2.x SDK,
        // pinned in Cargo.toml), so the route is recomputed with the decision; the
        // routing e2e tests prove it. (Envoy ≥ 1.33 also has a `clear_route_cache`
        // foreign function, needed only by newer ABIs; calling it cost ~0.5 µs a request.)
        if host::set_request_header(&policy.decision_header, variant.as_bytes()).is_err() {
            metrics.error(FilterError::SetHeader);
        }
        self.decided = Some(decision.variant);

        let marker = configured.shadow.as_ref().map_or(Marker::Absent, |s| {
            s.mirror.marker(inputs, s.copy_token.as_bytes())
        });
        // Only this proxy's own copies are left out of the counts: a marker anyone can set
        // must not hide live requests from the analysis.
        self.counted = marker != Marker::Genuine;
        if self.counted {
            self.count_decision(&configured, decision);
        }
        if let Some(shadow) = &configured.shadow {
            if marker == Marker::Forged {
                shadow.forged_marker();
                // Nor does it travel on: upstream services never see a marker we did not set.
                if !host::remove_request_header(&shadow.mirror.marker_header) {
                    metrics.error(FilterError::SetHeader);
                }
            }
            match shadow
                .mirror
                .choose(inputs, marker, || configured.next_random())
            {
                MirrorChoice::Send => {
                    let decision = (policy.decision_header.as_str(), variant.as_str());
                    if let Some(copy) = shadow.begin(map.as_ref(), decision) {
                        self.copy_id = Some(copy.id);
                        if end_of_stream {
                            self.copy_id = shadow.submit(copy, Vec::new());
                        } else {
                            self.copy = Some(copy);
                        }
                    }
                }
                MirrorChoice::Skip(reason) => shadow.skipped(match reason {
                    SkipReason::Marked => Skip::Marked,
                    SkipReason::Method => Skip::Method,
                    SkipReason::SampledOut => Skip::SampledOut,
                }),
                MirrorChoice::NotEligible => {}
            }
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        // The primary is never paused: each chunk is copied as it passes through.
        let (configured, mut copy) = match (&self.configured, self.copy.take()) {
            (Some(c), Some(copy)) => (Rc::clone(c), copy),
            _ => return Action::Continue,
        };
        let shadow = match &configured.shadow {
            Some(s) => s,
            None => return Action::Continue,
        };
        let chunk = if body_size > 0 {
            host::request_body_chunk(body_size).unwrap_or_default()
        } else {
            Vec::new()
        };
        if !copy.append(&chunk, shadow.mirror.max_body_bytes) {
            shadow.abandon(copy, Skip::BodyTooLarge);
            self.copy_id = None;
        } else if end_of_stream {
            self.copy_id = shadow.submit(copy, Vec::new());
        } else {
            self.copy = Some(copy);
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let (configured, copy) = match (&self.configured, self.copy.take()) {
            (Some(c), Some(copy)) => (Rc::clone(c), copy),
            _ => return Action::Continue,
        };
        if let Some(shadow) = &configured.shadow {
            match host::request_trailers().ok().and_then(shadow::utf8_pairs) {
                Some(trailers) => self.copy_id = shadow.submit(copy, trailers),
                None => {
                    shadow.abandon(copy, Skip::NonUtf8Header);
                    self.copy_id = None;
                }
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let (configured, variant) = match (&self.configured, self.decided) {
            (Some(c), Some(v)) => (Rc::clone(c), v),
            _ => return Action::Continue,
        };
        self.responded = true;
        let status = match host::response_header(":status") {
            Ok(Some(bytes)) => parse_status(&bytes),
            _ => None,
        };
        if status.is_none() {
            configured.metrics.error(FilterError::ReadStatus);
        }
        let class = response_class(status.unwrap_or(0));
        if self.counted {
            let metrics = &configured.metrics.variants[variant];
            metrics.responses[class].bump();
            if let (Some(start), Some(now)) = (self.started_ns, host::now_ns()) {
                metrics
                    .latency_ms
                    .record(now.saturating_sub(start) / 1_000_000);
            }
        }
        if let (Some(shadow), Some(_)) = (&configured.shadow, self.copy_id) {
            self.primary_class = Some(class);
            match shadow.mirror.compare {
                Compare::Off => {}
                Compare::Body if !end_of_stream => {
                    self.response_digest = Some(BodyDigest::new(shadow.mirror.max_body_bytes));
                }
                Compare::Body => self.record_primary(Some(BodyDigest::new(0).finish())),
                Compare::Status => self.record_primary(None),
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(digest) = self.response_digest.as_mut() {
            if body_size > 0 {
                digest.update(&host::response_body_chunk(body_size).unwrap_or_default());
            }
            if end_of_stream {
                let finished = digest.finish();
                self.record_primary(Some(finished));
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let configured = match &self.configured {
            Some(c) => Rc::clone(c),
            None => return,
        };
        if let (Some(variant), false, true) = (self.decided, self.responded, self.counted) {
            configured.metrics.variants[variant].responses[NO_RESPONSE].bump();
        }
        if let Some(shadow) = &configured.shadow {
            if let Some(copy) = self.copy.take() {
                shadow.abandon(copy, Skip::Incomplete);
                self.copy_id = None;
            }
            if let (Some(id), false) = (self.copy_id, self.primary_recorded) {
                // The primary never finished answering: nothing to compare against.
                shadow.primary_outcome(id, None, None);
            }
        }
    }
}

impl RoutingStream {
    /// Counts a live request's decision: variant, rule and split placement.
    fn count_decision(&mut self, configured: &Configured, decision: meshcanary_policy::Decision) {
        let metrics = &configured.metrics;
        self.started_ns = host::now_ns();
        if self.started_ns.is_none() {
            metrics.error(FilterError::Clock);
        }
        metrics.variants[decision.variant].requests.bump();
        match decision.rule {
            Some(rule) => {
                let rule_metrics = &metrics.rules[rule];
                rule_metrics.matches.bump();
                if decision.placement.map_or(false, Placement::key_missing) {
                    rule_metrics.key_missing.bump();
                }
            }
            None => metrics.fallback.bump(),
        }
    }

    /// Hands the primary's outcome to the comparison (`body`: the digest, for
    /// `compare: "body"`; `Some(None)` when the body exceeded the limit).
    fn record_primary(&mut self, body: Option<Option<(u64, usize)>>) {
        let (configured, id) = match (&self.configured, self.copy_id) {
            (Some(c), Some(id)) => (Rc::clone(c), id),
            _ => return,
        };
        if let Some(shadow) = &configured.shadow {
            self.primary_recorded = true;
            self.response_digest = None;
            shadow.primary_outcome(id, self.primary_class, body.flatten());
        }
    }
}
