//! Shadow traffic on the host side: building copies as requests stream past, sending
//! them from the root context, and comparing shadow and primary responses.
//!
//! Why the root context sends the copies: Envoy cancels an HTTP call when the context
//! that made it goes away, and a fast primary would take its stream context (and the
//! copy) with it. So a stream hands its finished copy to worker-local memory and wakes
//! the root through a shared queue registered by that root; the root dispatches, owns
//! the call, and receives the shadow's response whenever it comes. The primary never
//! waits for any of it: every stream callback returns `Continue`.
//!
//! A policy update gives the worker a new root (and a new `Shadow`) while the old one may
//! still have copies queued or in flight. The old root then stays until they are answered
//! (`on_done` returns false until [`Shadow::idle`]; see `lib.rs`), so no copy is cut off
//! and none goes uncounted; `max_in_flight` counts the copies of every root of the worker
//! together ([`IN_FLIGHT`]); and a wake-up queue whose root is gone is handed to the next
//! `Shadow` ([`FREE_QUEUES`]) instead of a new one being registered with every update
//! (Envoy keeps every queue ever registered).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use meshcanary_policy::mirror::BodyDigest;
use meshcanary_policy::{Compare, Mirror};

use crate::host::{self, HeaderMap};
use crate::metrics::{parse_status, response_class, Counter, Histogram, RESPONSE_CLASSES};

/// Why an eligible request was not copied, as counted in `shadow.skipped.<reason>`.
#[derive(Clone, Copy)]
pub enum Skip {
    /// The request is itself a copy (loop guard).
    Marked = 0,
    /// Its method is not listed in `methods`.
    Method = 1,
    /// `percent` sampling left it out.
    SampledOut = 2,
    /// Its body is larger than `max_body_bytes`.
    BodyTooLarge = 3,
    /// `max_in_flight` copies were already in flight on this worker.
    InFlightLimit = 4,
    /// A header or trailer value is not UTF-8 and cannot be handed to Envoy's HTTP call.
    NonUtf8Header = 5,
    /// The request ended (reset) before its body was complete.
    Incomplete = 6,
}

const SKIP_NAMES: [&str; 7] = [
    "marked",
    "method",
    "sampled_out",
    "body_too_large",
    "in_flight_limit",
    "non_utf8_header",
    "incomplete",
];

/// Metrics under `meshcanary.<policy>.shadow.`.
pub struct ShadowMetrics {
    sent: Counter,
    failed: Counter,
    timed_out: Counter,
    skipped: [Counter; 7],
    responses: [Counter; 6],
    status_match: Counter,
    status_mismatch: Counter,
    body_match: Counter,
    body_mismatch: Counter,
    compare_skipped: Counter,
    forged_marker: Counter,
    latency_ms: Histogram,
}

impl ShadowMetrics {
    fn define(policy: &str) -> ShadowMetrics {
        let base = format!("meshcanary.{}.shadow", policy);
        let counter = |name: &str| Counter::define(&format!("{}.{}", base, name));
        ShadowMetrics {
            sent: counter("sent"),
            failed: counter("failed"),
            timed_out: counter("timed_out"),
            skipped: SKIP_NAMES.map(|reason| counter(&format!("skipped.{}", reason))),
            responses: RESPONSE_CLASSES.map(|class| counter(&format!("responses.{}", class))),
            status_match: counter("status_match"),
            status_mismatch: counter("status_mismatch"),
            body_match: counter("body_match"),
            body_mismatch: counter("body_mismatch"),
            compare_skipped: counter("compare_skipped"),
            forged_marker: counter("forged_marker"),
            latency_ms: Histogram::define(&format!("{}.latency_ms", base)),
        }
    }
}

/// A response as far as comparison cares: its status class and, for `compare: "body"`,
/// the body's digest (`None` when it was longer than `max_body_bytes`).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Outcome {
    class: usize,
    body: Option<(u64, usize)>,
}

/// Both sides of one comparison; whichever arrives second settles it.
#[derive(Default)]
struct Pending {
    primary: Option<Option<Outcome>>,
    shadow: Option<Option<Outcome>>,
}

/// A copy's headers in one buffer: every name and value back to back in `text`, and
/// where each ends. One allocation for them all instead of two per header, and one
/// list of slices to hand to the HTTP call.
struct CopyHeaders {
    text: String,
    /// Per pair: where its name ends in `text`, and where its value ends.
    ends: Vec<(usize, usize)>,
}

impl CopyHeaders {
    fn with_capacity(bytes: usize, pairs: usize) -> CopyHeaders {
        CopyHeaders {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(pairs),
        }
    }

    fn push(&mut self, name: &str, value: &str) {
        self.text.push_str(name);
        let name_end = self.text.len();
        self.text.push_str(value);
        self.ends.push((name_end, self.text.len()));
    }

    /// The pairs as the HTTP call takes them.
    fn pairs(&self) -> Vec<(&str, &str)> {
        let mut start = 0;
        self.ends
            .iter()
            .map(|&(name_end, value_end)| {
                // Every end is where a pushed `str` ended: a char boundary, never `None`.
                let name = self.text.get(start..name_end).unwrap_or_default();
                let value = self.text.get(name_end..value_end).unwrap_or_default();
                start = value_end;
                (name, value)
            })
            .collect()
    }
}

/// `bytes` as text, or `None` when they are not UTF-8. Header names and values are
/// nearly always ASCII, which a word-at-a-time scan settles for a fraction of what the
/// full UTF-8 validation costs in the module.
fn text(bytes: &[u8]) -> Option<&str> {
    if meshcanary_policy::bytes::is_ascii(bytes) {
        // SAFETY: every byte is below 0x80, and ASCII is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

/// A finished copy, waiting for the root to send it.
struct ReadyCopy {
    id: u64,
    headers: CopyHeaders,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

/// A copy the root has sent and not yet heard back from.
struct Call {
    id: u64,
    sent_ns: Option<u64>,
}

/// The value this proxy's copies carry in the marker header, for the policy configured
/// now: a marker anyone could set (a client of a gateway, a buggy caller) would let them
/// hide requests from the analysis, so only this value makes a request a copy.
///
/// It is random (128 bits, from the host's randomness: `fresh_random` draws them), the
/// same for every worker of the proxy (kept in the proxy's shared data, which all VMs of
/// the filter share), and new whenever the policy's text changes — so a token that leaked
/// stops working with the next policy. One shared-data entry per policy name, replaced in
/// place (compare-and-swap), so policy updates do not grow the proxy's memory.
///
/// Workers configure one after another, so whichever writes the entry for a new policy
/// first sets the token and the others read it; two that race settle on the last write
/// (each reads back what is stored). If the host has no shared data, this VM keeps a token
/// of its own: its copies are then recognised by itself only.
pub fn copy_token(
    policy_name: &str,
    policy_text: &[u8],
    mut fresh_random: impl FnMut() -> u64,
) -> String {
    let key = format!("meshcanary.copy_token.{}", policy_name);
    let digest = format!(
        "{:016x}:",
        meshcanary_policy::bucket::fnv_position(b"meshcanary/copy-token", policy_text)
    );
    let mut fresh = || format!("{:016x}{:016x}", fresh_random(), fresh_random());
    for _ in 0..4 {
        let (stored, cas) = match host::shared_data(&key) {
            Some(found) => found,
            None => return fresh(),
        };
        if let Some(token) = stored
            .as_deref()
            .and_then(|v| v.strip_prefix(digest.as_bytes()))
            .and_then(|t| std::str::from_utf8(t).ok())
        {
            return token.to_string();
        }
        // No token for this policy yet: write one, then read back whatever is stored.
        let token = fresh();
        if !host::set_shared_data(&key, format!("{}{}", digest, token).as_bytes(), cas) {
            continue;
        }
    }
    fresh()
}

thread_local! {
    /// Copies being built, ready or in flight on this worker, across every root it has
    /// (old roots finishing their copies included): what `max_in_flight` bounds.
    // (Clippy 1.63 mistakes the macro's expansion for an interior-mutable `const`.)
    #[allow(clippy::declare_interior_mutable_const)]
    static IN_FLIGHT: Cell<u32> = const { Cell::new(0) };
    /// Names of wake-up queues registered by this worker whose root is gone: re-registering
    /// a name makes the current root its owner, so updates reuse queues rather than add one
    /// each.
    #[allow(clippy::declare_interior_mutable_const)]
    static FREE_QUEUES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Shadowing state of one configured policy on one worker.
pub struct Shadow {
    /// The policy's `mirror` section.
    pub mirror: Mirror,
    /// The marker header's value on this proxy's copies (see [`copy_token`]): the only
    /// value that makes a request a copy.
    pub copy_token: String,
    metrics: ShadowMetrics,
    /// The root's wake-up queue; `None` when it could not be registered (copies are
    /// then counted as failed rather than sent from a stream that may vanish).
    queue: Option<u32>,
    /// The queue's name, handed back to [`FREE_QUEUES`] when this `Shadow` goes.
    queue_name: String,
    /// This root's share of [`IN_FLIGHT`] (so that it can tell when it has none left).
    in_flight: Cell<u32>,
    ready: RefCell<VecDeque<ReadyCopy>>,
    calls: RefCell<HashMap<u32, Call>>,
    comparisons: RefCell<HashMap<u64, Pending>>,
    next_id: Cell<u64>,
}

impl Shadow {
    /// Defines the metrics and registers this root's wake-up queue under a name no other
    /// worker uses (shared-queue names are global to the VM id): one this worker used
    /// before whose root is gone, or a new one made from `unique`.
    pub fn new(policy: &str, mirror: Mirror, unique: u64, copy_token: String) -> Shadow {
        let queue_name = FREE_QUEUES
            .with(|free| free.borrow_mut().pop())
            .unwrap_or_else(|| format!("meshcanary.shadow.{:016x}", unique));
        let queue = host::register_queue(&queue_name);
        if queue.is_none() {
            log::warn!(
                "meshcanary: could not register the shadow queue; copies will be counted as failed"
            );
        }
        Shadow {
            mirror,
            copy_token,
            metrics: ShadowMetrics::define(policy),
            queue,
            queue_name,
            in_flight: Cell::new(0),
            ready: RefCell::new(VecDeque::new()),
            calls: RefCell::new(HashMap::new()),
            comparisons: RefCell::new(HashMap::new()),
            next_id: Cell::new(0),
        }
    }

    /// Counts a request that was eligible but not copied.
    pub fn skipped(&self, reason: Skip) {
        self.metrics.skipped[reason as usize].bump();
    }

    /// Counts a request whose marker header is not this proxy's token.
    pub fn forged_marker(&self) {
        self.metrics.forged_marker.bump();
    }

    /// Starts a copy of the current request from its headers (`request`, read in
    /// `on_http_request_headers` before the decision was written; `None` when that read
    /// failed) and the routing decision (`decision`: header name, value), which the copy
    /// carries in place of whatever the client sent. `None` when it cannot be copied;
    /// the reason has been counted.
    pub fn begin(
        &self,
        request: Option<&HeaderMap>,
        decision: (&str, &str),
    ) -> Option<CopyInProgress> {
        if IN_FLIGHT.with(Cell::get) >= self.mirror.max_in_flight {
            self.skipped(Skip::InFlightLimit);
            return None;
        }
        let request = match request {
            Some(r) => r,
            None => {
                self.metrics.failed.bump();
                return None;
            }
        };
        // The request's serialized map holds more than the names and values taken from
        // it; the rest is what the copy adds.
        let added = decision.0.len()
            + decision.1.len()
            + self.mirror.marker_header.len()
            + self.copy_token.len()
            + self.mirror.authority_suffix.as_ref().map_or(0, String::len);
        let mut headers = CopyHeaders::with_capacity(request.as_bytes().len() + added, 16);
        for (name, value) in request.pairs() {
            // Envoy's HTTP call interface takes text only; only what is copied must be text.
            let name = match text(name) {
                Some(n) => n,
                None => {
                    self.skipped(Skip::NonUtf8Header);
                    return None;
                }
            };
            let authority = name == ":authority";
            if name == decision.0 || (!authority && !self.mirror.copies_header(name)) {
                continue;
            }
            let value = match text(value) {
                Some(v) => v,
                None => {
                    self.skipped(Skip::NonUtf8Header);
                    return None;
                }
            };
            if authority {
                headers.push(name, &self.mirror.shadow_authority(value));
            } else {
                headers.push(name, value);
            }
        }
        if self.mirror.copies_header(decision.0) {
            headers.push(decision.0, decision.1);
        }
        headers.push(&self.mirror.marker_header, &self.copy_token);
        let id = self.next_id.get().wrapping_add(1);
        self.next_id.set(id);
        self.in_flight.set(self.in_flight.get() + 1);
        IN_FLIGHT.with(|n| n.set(n.get() + 1));
        if self.mirror.compare != Compare::Off {
            self.comparisons.borrow_mut().insert(id, Pending::default());
        }
        Some(CopyInProgress {
            id,
            headers,
            body: Vec::new(),
        })
    }

    /// Gives up a copy before it was sent (body too large, stream reset …).
    pub fn abandon(&self, copy: CopyInProgress, reason: Skip) {
        self.skipped(reason);
        self.forget(copy.id);
    }

    /// Hands a complete copy to the root and wakes it. Returns the copy's id for the
    /// comparison, or `None` if it could not be handed over (counted as failed).
    pub fn submit(&self, copy: CopyInProgress, trailers: Vec<(String, String)>) -> Option<u64> {
        let id = copy.id;
        // One wake-up per batch: the root sends every ready copy when it wakes, so a copy
        // that finds others waiting rides on their pending wake-up. Each wake-up costs
        // Envoy a posted callback and a call into the module; an empty message costs
        // no allocation in the module when it is taken off the queue.
        let wake_pending = !self.ready.borrow().is_empty();
        let woken = wake_pending || self.queue.map_or(false, |q| host::enqueue(q, b""));
        if !woken {
            self.metrics.failed.bump();
            self.forget(id);
            return None;
        }
        self.ready.borrow_mut().push_back(ReadyCopy {
            id,
            headers: copy.headers,
            body: copy.body,
            trailers,
        });
        Some(id)
    }

    /// Root side: sends every ready copy (call from `on_queue_ready`).
    pub fn dispatch_ready(&self, queue_id: u32) {
        if Some(queue_id) != self.queue {
            return;
        }
        // Drain the wake-ups; the ready list, not their number, says what to send.
        while host::dequeue(queue_id) {}
        let ready: Vec<ReadyCopy> = self.ready.borrow_mut().drain(..).collect();
        let timeout = Duration::from_millis(u64::from(self.mirror.timeout_ms));
        for copy in ready {
            let headers = copy.headers.pairs();
            let trailers: Vec<(&str, &str)> = copy
                .trailers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let body = if copy.body.is_empty() {
                None
            } else {
                Some(copy.body.as_slice())
            };
            match host::dispatch(&self.mirror.cluster, headers, body, trailers, timeout) {
                Ok(token) => {
                    self.metrics.sent.bump();
                    self.calls.borrow_mut().insert(
                        token,
                        Call {
                            id: copy.id,
                            sent_ns: host::now_ns(),
                        },
                    );
                }
                Err(status) => {
                    // Typically an unknown cluster: say so once per copy at debug, count always.
                    log::debug!(
                        "meshcanary: shadow call to {:?} refused: {:?}",
                        self.mirror.cluster,
                        status
                    );
                    self.metrics.failed.bump();
                    self.forget(copy.id);
                }
            }
        }
    }

    /// Root side: the shadow answered, failed or timed out (call from `on_http_call_response`).
    pub fn on_response(&self, token: u32, num_headers: usize, body_size: usize) {
        let call = match self.calls.borrow_mut().remove(&token) {
            Some(call) => call,
            None => return,
        };
        self.release();
        let now = host::now_ns();
        let elapsed_ms = match (call.sent_ns, now) {
            (Some(sent), Some(now)) => Some(now.saturating_sub(sent) / 1_000_000),
            _ => None,
        };
        if num_headers == 0 {
            // No response: Envoy gives no reason, so the clock tells a timeout from a failure.
            let timed_out =
                elapsed_ms.map_or(false, |ms| ms + 5 >= u64::from(self.mirror.timeout_ms));
            if timed_out {
                self.metrics.timed_out.bump();
            } else {
                self.metrics.failed.bump();
            }
            self.comparisons.borrow_mut().remove(&call.id);
            return;
        }
        if let Some(ms) = elapsed_ms {
            self.metrics.latency_ms.record(ms);
        }
        let status = host::call_response_header(":status").and_then(|s| parse_status(&s));
        let class = response_class(status.unwrap_or(0));
        self.metrics.responses[class].bump();
        if self.mirror.compare == Compare::Off {
            return;
        }
        let body =
            if self.mirror.compare == Compare::Body && body_size <= self.mirror.max_body_bytes {
                let mut digest = BodyDigest::new(self.mirror.max_body_bytes);
                digest.update(&host::call_response_body(body_size).unwrap_or_default());
                digest.finish()
            } else {
                None
            };
        self.settle(call.id, |p| p.shadow = Some(Some(Outcome { class, body })));
    }

    /// Stream side: the primary's outcome for copy `id` (`None`: it never answered).
    pub fn primary_outcome(&self, id: u64, class: Option<usize>, body: Option<(u64, usize)>) {
        let outcome = class.map(|class| Outcome { class, body });
        self.settle(id, |p| p.primary = Some(outcome));
    }

    /// Records one side and, once both are in, counts the comparison.
    fn settle(&self, id: u64, record_side: impl FnOnce(&mut Pending)) {
        let mut comparisons = self.comparisons.borrow_mut();
        let pending = match comparisons.get_mut(&id) {
            Some(p) => p,
            None => return,
        };
        record_side(pending);
        let (primary, shadow) = match (pending.primary, pending.shadow) {
            (Some(p), Some(s)) => (p, s),
            _ => return,
        };
        comparisons.remove(&id);
        drop(comparisons);
        let (primary, shadow) = match (primary, shadow) {
            (Some(p), Some(s)) => (p, s),
            _ => {
                self.metrics.compare_skipped.bump();
                return;
            }
        };
        if primary.class != shadow.class {
            self.metrics.status_mismatch.bump();
            return;
        }
        self.metrics.status_match.bump();
        if self.mirror.compare == Compare::Body {
            match (primary.body, shadow.body) {
                (Some(p), Some(s)) if p == s => self.metrics.body_match.bump(),
                (Some(_), Some(_)) => self.metrics.body_mismatch.bump(),
                _ => self.metrics.compare_skipped.bump(),
            }
        }
    }

    /// Drops copy `id` that will never be answered: its comparison, and its in-flight slot.
    fn forget(&self, id: u64) {
        self.comparisons.borrow_mut().remove(&id);
        self.release();
    }

    fn release(&self) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        IN_FLIGHT.with(|n| n.set(n.get().saturating_sub(1)));
    }

    /// True when this root has no copy being built, waiting or in flight: an old root may
    /// go.
    pub fn idle(&self) -> bool {
        self.in_flight.get() == 0
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        // Copies still counted here will never end: give their slots back.
        let left = self.in_flight.get();
        IN_FLIGHT.with(|n| n.set(n.get().saturating_sub(left)));
        if self.queue.is_some() {
            let name = std::mem::take(&mut self.queue_name);
            FREE_QUEUES.with(|free| free.borrow_mut().push(name));
        }
    }
}

/// A copy being built while its request streams past.
pub struct CopyInProgress {
    /// Identifies the copy for the comparison.
    pub id: u64,
    headers: CopyHeaders,
    body: Vec<u8>,
}

impl CopyInProgress {
    /// Appends a body chunk; false once the body exceeds `limit`.
    pub fn append(&mut self, chunk: &[u8], limit: usize) -> bool {
        if self.body.len() + chunk.len() > limit {
            return false;
        }
        self.body.extend_from_slice(chunk);
        true
    }
}

/// Converts trailers for the copy; `None` when one is not UTF-8.
pub fn utf8_pairs(pairs: Vec<(String, Vec<u8>)>) -> Option<Vec<(String, String)>> {
    pairs
        .into_iter()
        .map(|(n, v)| String::from_utf8(v).ok().map(|v| (n, v)))
        .collect()
}
