//! The verdict engine: a pure function from (spec, state, observation) to (new state, verdict).
//!
//! [`judge`] does no I/O and reads no clock: time arrives in [`Observation::now`], counters are
//! whatever the metric source read, and everything the engine remembers between two calls is in
//! [`State`], which serializes with serde so that a controller killed mid-rollout resumes where
//! it was. The controller's loop is: read an [`Observation`], call [`judge`], persist the new
//! [`State`], act on the [`Verdict`] (see [`Verdict::target_weight`]).
//!
//! # The rules, in the order they are applied at each evaluation
//!
//! 1. **Hard guard.** The Wilson lower bound (z = [`Analysis::guard_z`], 3.09 by default) of the
//!    canary's error rate, over the current step and over the last [`Analysis::guard_window`], is
//!    above [`Analysis::error_ceiling`] → roll back at once. Needs only canary counters, so it
//!    works even when the baseline cannot be read and when the canary takes 100 % of traffic.
//! 2. **Relative regression.** For errors, and separately for slow requests, an anytime-valid
//!    sequential test (see [`llr_increment`]) accumulates Λ over the whole rollout; Λ ≥
//!    ln(2/α) → roll back. Under "canary as good as baseline", exp(Λ) is a non-negative
//!    martingale, so by Ville's inequality P(Λ ever reaches ln(2/α)) ≤ α/2 per test — however
//!    often it is evaluated — and ≤ α for the two together. That is why α is split in two.
//! 3. **No data is never a pass.** When this evaluation brought no usable canary data (a side
//!    unreadable or not finite, the first reading, a counter reset, no canary requests), hold;
//!    once [`Analysis::no_data_timeout`] has passed since the last data, act as
//!    [`Analysis::on_no_data`] says.
//! 4. **Promotion needs positive evidence**, all of: at least [`Analysis::min_requests`] canary
//!    requests in the step, at least [`Spec::step_min_duration`] in the step, and for errors AND
//!    for slow requests either the test's accept boundary (this step's Λ ≤ ln β) or the canary's
//!    Wilson upper bound (z = [`Analysis::promote_z`]) at or below the limit — the latter only
//!    while the relative test does not lean towards a regression (step and rollout Λ below
//!    −ln β), so that "under the absolute limit" cannot outrun a relative regression signal.
//! 5. Otherwise hold, saying what is missing.
//!
//! # Decisions worth knowing
//!
//! - **Counters are cumulative**, so the engine takes deltas. The first reading only sets the
//!   reference. When any counter of a side goes *down* (an Envoy restart), that interval is
//!   skipped and the new value becomes the reference. Skipping, rather than counting the new
//!   value as a delta from zero, is deliberate: the source sums several Envoys, and when one of
//!   them restarts the sum drops by that Envoy's history while the others keep counting, so
//!   "new value − 0" would be a huge and wrong delta. One lost interval costs a second of
//!   evidence; a wrong delta could cost a false verdict. (A source that sums several proxies
//!   should also track resets per proxy, since a restart hidden inside a growing sum cannot be
//!   seen here.) Errors and slow counts above the requests of the same interval (counters read a
//!   moment apart) are clamped to the requests.
//! - **Two references.** The canary's own counters feed the hard guard and the step's canary
//!   tally whenever the canary side is readable; the relative test only uses intervals where
//!   *both* sides were read together, so that s = canary share is measured over the same time
//!   for both. Promotion and "data seen" need both sides.
//! - **Weight changes** reset the step's tallies, the step's Λ (the accept side), and the step
//!   clock, but not the rollout-wide Λ (the rollback side): each interval's increment conditions
//!   on that interval's measured share s, so the test stays valid across weights, and carrying
//!   it keeps one α for the whole rollout instead of one per step. The price is that healthy
//!   evidence gathered early (negative Λ) slows the detection of a regression that only appears
//!   at a later step by a few events.
//! - **Canary traffic without baseline traffic** (the baseline readable but idle) is data: the hard guard and the absolute (Wilson) promotion path still work, while the
//!   relative test learns nothing (s = 1 gives ΔΛ = 0). **Baseline traffic without canary
//!   traffic** is no data: nothing can be said about the canary.
//! - **The end.** Passing a step whose next weight is 100 (or the last step) completes the
//!   rollout: the canary goes to 100 % and the phase becomes [`Phase::Promoted`]. A 100 % step
//!   is not judged on its own because nothing is left to compare against there, and an absolute
//!   bound alone cannot pass a healthy canary whose error rate sits at the limit; positive
//!   evidence must be earned while a baseline still exists.
//! - A finished rollout judged again returns its final verdict again (idempotent), so a
//!   controller that crashed between persisting the state and applying the weight re-applies it.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod stats;

pub use stats::{llr_increment, wilson, Bounds};

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// What to do once [`Analysis::no_data_timeout`] has passed without data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNoData {
    /// Roll the canary back to 0 %.
    Rollback,
    /// Keep holding at the current weight (and keep reporting it).
    Hold,
}

/// The spec's `analysis:` section: the limits and the statistics' parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    /// Absolute error-rate ceiling of the hard guard, in (0, 1]: when the canary's error rate is
    /// above it with confidence (Wilson lower bound at [`Analysis::guard_z`]), roll back at once.
    pub error_ceiling: f64,
    /// Error-rate limit for promotion, in (0, 1): the canary's Wilson upper bound at or below it
    /// is positive evidence (the relative test's accept boundary is the other way to pass).
    pub max_error_rate: f64,
    /// The latency, in ms, above which a request counts as slow. Not read by the engine: the
    /// source counts slow requests at this histogram bucket boundary. Kept here so the analysis
    /// section is one type.
    pub latency_threshold_ms: u32,
    /// Slow-share limit for promotion, in (0, 1); same role as [`Analysis::max_error_rate`].
    pub max_slow_rate: f64,
    /// Minimum canary requests in a step before it can be promoted (at least 1).
    pub min_requests: u64,
    /// Bound on the probability that a canary as good as its baseline is ever rolled back by the
    /// relative tests during the whole rollout, in (0, 1). Split equally between the error test
    /// and the slow test: each rolls back at Λ ≥ ln(2/α).
    pub alpha: f64,
    /// How long without canary data (or with an unreadable source) before acting as
    /// [`Analysis::on_no_data`] says. Must be positive.
    pub no_data_timeout: Duration,
    /// What to do after [`Analysis::no_data_timeout`] without data.
    pub on_no_data: OnNoData,
    /// The relative risk r1 > 1 of the tests' alternative ("the canary's rate is r1 × the
    /// baseline's"). Default 3: regressions of about 2× and more push Λ up; 10× fast.
    pub relative_risk: f64,
    /// The accept side of the relative tests, in (0, 1): a step's own Λ at or below ln β is
    /// positive evidence. A canary really r1 × worse passes a step this way with probability
    /// at most β (Ville's inequality again, under the alternative). Mirrored, Λ ≥ −ln β vetoes
    /// promotion on the absolute (Wilson) path. Default 0.05.
    pub accept_beta: f64,
    /// Normal quantile of the hard guard's Wilson lower bound. Default 3.09 (one-sided 0.1 %).
    pub guard_z: f64,
    /// Normal quantile of the promotion's Wilson upper bounds. Default 2.326 (one-sided 1 %):
    /// less strict than the guard because a wrong promotion costs less than a wrong rollback:
    /// before the last judged step it is judged again at the next weight, where the rollback
    /// test keeps running, and the relative test's veto applies throughout.
    pub promote_z: f64,
    /// The hard guard also looks at the canary's counts over this recent window (besides the
    /// whole step), so that a canary breaking late in a long step is not diluted by its past.
    /// Default 10 s. Must be positive.
    pub guard_window: Duration,
}

impl Default for Analysis {
    /// The example values and the documented statistical defaults.
    fn default() -> Self {
        Analysis {
            error_ceiling: 0.2,
            max_error_rate: 0.01,
            latency_threshold_ms: 500,
            max_slow_rate: 0.01,
            min_requests: 300,
            alpha: 0.001,
            no_data_timeout: Duration::from_secs(60),
            on_no_data: OnNoData::Rollback,
            relative_risk: 3.0,
            accept_beta: 0.05,
            guard_z: 3.09,
            promote_z: 2.326,
            guard_window: Duration::from_secs(10),
        }
    }
}

/// The part of a rollout spec the verdict depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Canary weight per step, percent: strictly increasing, each in 1..=100, at least one
    /// below 100 (only steps with a baseline are judged; see the module docs).
    pub steps: Vec<u32>,
    /// Minimum time in a step before it can be promoted.
    pub step_min_duration: Duration,
    /// The limits and statistics.
    pub analysis: Analysis,
}

/// One thing wrong with a [`Spec`], with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path of the field in the spec, e.g. `analysis.alpha` or `steps[2]`.
    pub path: String,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl Spec {
    /// Every problem of the spec (empty when it is valid), each with its field path.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |path: String, message: &str| {
            out.push(Problem {
                path,
                message: message.to_string(),
            })
        };
        if self.steps.is_empty() {
            bad("steps".into(), "needs at least one step");
        }
        for (i, &w) in self.steps.iter().enumerate() {
            if !(1..=100).contains(&w) {
                bad(format!("steps[{i}]"), "must be a percentage in 1..=100");
            }
            if i > 0 && self.steps.get(i - 1).is_some_and(|&prev| w <= prev) {
                bad(
                    format!("steps[{i}]"),
                    "must be greater than the step before",
                );
            }
        }
        if !self.steps.is_empty() && self.steps.iter().all(|&w| w >= 100) {
            bad(
                "steps".into(),
                "needs a step below 100: the canary is judged against a baseline",
            );
        }
        let a = &self.analysis;
        let open_unit = |x: f64| x.is_finite() && x > 0.0 && x < 1.0;
        if !(a.error_ceiling.is_finite() && a.error_ceiling > 0.0 && a.error_ceiling <= 1.0) {
            bad("analysis.error_ceiling".into(), "must be in (0, 1]");
        }
        if !open_unit(a.max_error_rate) {
            bad("analysis.max_error_rate".into(), "must be in (0, 1)");
        } else if a.error_ceiling.is_finite() && a.max_error_rate >= a.error_ceiling {
            bad(
                "analysis.max_error_rate".into(),
                "must be below analysis.error_ceiling",
            );
        }
        if a.latency_threshold_ms == 0 {
            bad("analysis.latency_threshold_ms".into(), "must be positive");
        }
        if !open_unit(a.max_slow_rate) {
            bad("analysis.max_slow_rate".into(), "must be in (0, 1)");
        }
        if a.min_requests == 0 {
            bad(
                "analysis.min_requests".into(),
                "must be at least 1: promotion needs evidence",
            );
        }
        if !open_unit(a.alpha) {
            bad("analysis.alpha".into(), "must be in (0, 1)");
        }
        if a.no_data_timeout.is_zero() {
            bad("analysis.no_data_timeout".into(), "must be positive");
        }
        if !(a.relative_risk.is_finite() && a.relative_risk > 1.0) {
            bad(
                "analysis.relative_risk".into(),
                "must be a finite number above 1",
            );
        }
        if !open_unit(a.accept_beta) {
            bad("analysis.accept_beta".into(), "must be in (0, 1)");
        }
        if !(a.guard_z.is_finite() && a.guard_z > 0.0) {
            bad("analysis.guard_z".into(), "must be a positive number");
        }
        if !(a.promote_z.is_finite() && a.promote_z > 0.0) {
            bad("analysis.promote_z".into(), "must be a positive number");
        }
        if a.guard_window.is_zero() {
            bad("analysis.guard_window".into(), "must be positive");
        }
        out
    }

    /// Λ at or above which a relative test rolls back: ln(2/α) (α split over two tests).
    pub fn rollback_threshold(&self) -> f64 {
        (2.0 / self.analysis.alpha).ln()
    }

    /// A step's Λ at or below which a relative test counts as positive evidence: ln β (< 0).
    pub fn accept_threshold(&self) -> f64 {
        self.analysis.accept_beta.ln()
    }

    /// Whether passing step `step` ends the rollout (the next weight is 100, or there is none).
    fn completes_after(&self, step: usize) -> bool {
        self.steps.get(step + 1).is_none_or(|&w| w >= 100)
    }
}

/// Cumulative counters of one side (canary, or baseline = the sum of the split's other
/// variants), as read from the metric source. Floats because Prometheus answers in floats;
/// a side whose values are not finite or are negative counts as unreadable.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Requests answered.
    pub requests: f64,
    /// Of those, answered with a 5xx.
    pub errors: f64,
    /// Of those, slower than [`Analysis::latency_threshold_ms`].
    pub slow: f64,
}

impl Counters {
    /// Counters from integer readings (the Envoy admin source).
    pub fn new(requests: u64, errors: u64, slow: u64) -> Self {
        // u64 → f64 is exact below 2^53 requests, far beyond any real counter.
        Counters {
            requests: requests as f64,
            errors: errors as f64,
            slow: slow as f64,
        }
    }

    /// Finite and non-negative: usable at all.
    fn is_valid(&self) -> bool {
        [self.requests, self.errors, self.slow]
            .iter()
            .all(|v| v.is_finite() && *v >= 0.0)
    }

    /// The counts since `earlier`, or `None` when any counter went down (a reset).
    /// Errors and slow are clamped to the interval's requests.
    fn since(&self, earlier: &Counters) -> Option<Tally> {
        let requests = self.requests - earlier.requests;
        let errors = self.errors - earlier.errors;
        let slow = self.slow - earlier.slow;
        if requests < 0.0 || errors < 0.0 || slow < 0.0 {
            return None;
        }
        Some(Tally {
            requests,
            errors: errors.min(requests),
            slow: slow.min(requests),
        })
    }
}

/// One evaluation's input: the time and what the source read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// The time of the reading, since a fixed epoch. Use wall-clock time since the UNIX epoch
    /// when the state is persisted, so that step clocks survive a restart.
    pub now: Duration,
    /// The canary's cumulative counters, `None` when the source could not read them.
    pub canary: Option<Counters>,
    /// The baseline's cumulative counters, `None` when the source could not read them.
    pub baseline: Option<Counters>,
}

/// Counts over some span (an interval, a step, a window).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Requests.
    pub requests: f64,
    /// Requests answered with a 5xx.
    pub errors: f64,
    /// Requests slower than the latency threshold.
    pub slow: f64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.slow += other.slow;
    }

    /// errors / requests, `None` without requests.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0.0).then(|| self.errors / self.requests)
    }

    /// slow / requests, `None` without requests.
    pub fn slow_rate(&self) -> Option<f64> {
        (self.requests > 0.0).then(|| self.slow / self.requests)
    }
}

/// Where the rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Judging the canary at [`State::step`].
    Progressing,
    /// Finished: the canary takes 100 %.
    Promoted,
    /// Finished: the canary was rolled back to 0 %, for this reason.
    RolledBack {
        /// Why.
        reason: RollbackReason,
    },
    /// Finished: an operator aborted the rollout; the canary is at 0 %.
    Aborted,
}

/// The accumulated evidence of one relative test (errors, or slow requests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Λ over the whole rollout: the rollback side.
    pub llr: f64,
    /// Λ over the current step only: the accept side.
    pub step_llr: f64,
}

impl Evidence {
    fn add(&mut self, delta: f64) {
        self.llr += delta;
        self.step_llr += delta;
    }
}

/// The canary's counts in one recent interval, kept for the hard guard's window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slice {
    /// When the interval ended.
    pub at: Duration,
    /// Canary requests in the interval.
    pub requests: f64,
    /// Canary errors in the interval.
    pub errors: f64,
}

/// The last readings of both sides taken together: the relative test's reference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairReading {
    /// The canary's cumulative counters.
    pub canary: Counters,
    /// The baseline's cumulative counters.
    pub baseline: Counters,
}

/// Everything the engine remembers between evaluations; persisted by the controller.
/// Contains only finite numbers, so it round-trips through JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Where the rollout is.
    pub phase: Phase,
    /// Index into [`Spec::steps`] of the step being judged (the last judged one once finished).
    pub step: usize,
    /// When the rollout started.
    pub started_at: Duration,
    /// When the current step started (its clock; see [`State::restart_step_clock`]).
    pub step_started_at: Duration,
    /// When usable canary data (both sides read, canary requests > 0) was last seen.
    pub last_data_at: Duration,
    /// The canary's last cumulative counters (reference for the guard and the canary tally).
    pub canary_ref: Option<Counters>,
    /// Both sides' last cumulative counters read together (reference for the relative test).
    pub pair_ref: Option<PairReading>,
    /// The canary's counts in the current step.
    pub canary: Tally,
    /// The baseline's counts in the current step (from intervals where both sides were read).
    pub baseline: Tally,
    /// The error test's evidence.
    pub errors: Evidence,
    /// The slow-request test's evidence.
    pub slow: Evidence,
    /// The canary's recent intervals, newest last, for the hard guard's window.
    pub window: Vec<Slice>,
    /// The last verdict's reason, in words (for `status`).
    pub reason: String,
}

/// At most this many intervals are kept for the guard window, whatever its length: a bound on
/// the persisted state when evaluations are very frequent.
const MAX_WINDOW_SLICES: usize = 256;

impl State {
    /// A rollout starting now, at the first step.
    pub fn start(now: Duration) -> Self {
        State {
            phase: Phase::Progressing,
            step: 0,
            started_at: now,
            step_started_at: now,
            last_data_at: now,
            canary_ref: None,
            pair_ref: None,
            canary: Tally::default(),
            baseline: Tally::default(),
            errors: Evidence::default(),
            slow: Evidence::default(),
            window: Vec::new(),
            reason: "started".to_string(),
        }
    }

    /// The canary weight, percent, this state stands for: the step's weight while progressing,
    /// 100 once promoted, 0 once rolled back or aborted (and 0 for a step index out of range,
    /// which only a state from another spec can have).
    pub fn current_weight(&self, steps: &[u32]) -> u32 {
        match self.phase {
            Phase::Progressing => steps.get(self.step).copied().unwrap_or(0),
            Phase::Promoted => 100,
            Phase::RolledBack { .. } | Phase::Aborted => 0,
        }
    }

    /// Whether the rollout is over (promoted, rolled back or aborted).
    pub fn is_finished(&self) -> bool {
        self.phase != Phase::Progressing
    }

    /// Abort the rollout (an operator's `meshcanary abort`): the canary goes to 0 %.
    /// A finished rollout stays as it finished.
    pub fn abort(&mut self) {
        if !self.is_finished() {
            self.phase = Phase::Aborted;
            self.reason = RollbackReason::Aborted.to_string();
        }
    }

    /// Restart the current step's clock and tallies at `now`. For the controller to call once
    /// the sink confirmed the step's weight is live, so that neither the time before that nor
    /// the traffic at the old weight counts towards the step. The rollout-wide Λ is kept.
    pub fn restart_step_clock(&mut self, now: Duration) {
        self.step_started_at = now;
        self.canary = Tally::default();
        self.baseline = Tally::default();
        self.errors.step_llr = 0.0;
        self.slow.step_llr = 0.0;
    }

    fn enter_step(&mut self, step: usize, now: Duration) {
        self.step = step;
        self.restart_step_clock(now);
    }

    /// The canary's counts over the guard window.
    fn window_tally(&self) -> Tally {
        let mut t = Tally::default();
        for s in &self.window {
            t.requests += s.requests;
            t.errors += s.errors;
        }
        t
    }
}

/// Why no usable data came with an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NoDataCause {
    /// The source could not read a side (or read something not finite or negative).
    Unreadable {
        /// The canary side could not be read.
        canary: bool,
        /// The baseline side could not be read.
        baseline: bool,
    },
    /// The first reading: it only sets the reference counters.
    FirstReading,
    /// A counter went down (a proxy restarted): the interval is skipped.
    CounterReset,
    /// Both sides were read but the canary got no requests in the interval.
    NoCanaryTraffic,
}

impl fmt::Display for NoDataCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoDataCause::Unreadable { canary, baseline } => {
                let which = match (canary, baseline) {
                    (true, true) => "canary and baseline",
                    (true, false) => "canary",
                    _ => "baseline",
                };
                write!(f, "source unreadable ({which})")
            }
            NoDataCause::FirstReading => f.write_str("first reading (reference counters)"),
            NoDataCause::CounterReset => f.write_str("counter reset, interval skipped"),
            NoDataCause::NoCanaryTraffic => f.write_str("no canary requests"),
        }
    }
}

/// Why the engine holds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HoldReason {
    /// The spec is invalid (see [`Spec::problems`]); the engine never acts on it.
    InvalidSpec,
    /// The state's step does not exist in the spec (a state from another spec).
    InvalidState,
    /// No usable data in this evaluation.
    NoData {
        /// Why.
        cause: NoDataCause,
        /// [`Analysis::no_data_timeout`] has passed and [`Analysis::on_no_data`] is `hold`.
        timed_out: bool,
    },
    /// Data is coming but does not yet prove the canary good enough to promote.
    Gathering {
        /// Canary requests still needed in this step (0 when enough).
        requests_needed: f64,
        /// Seconds still needed in this step (0 when enough).
        seconds_needed: f64,
        /// Errors: the accept boundary or the Wilson upper bound already passed.
        errors_proven: bool,
        /// Slow requests: the accept boundary or the Wilson upper bound already passed.
        slow_proven: bool,
    },
}

impl fmt::Display for HoldReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HoldReason::InvalidSpec => f.write_str("invalid spec"),
            HoldReason::InvalidState => f.write_str("state's step is not in the spec"),
            HoldReason::NoData { cause, timed_out } => {
                write!(f, "no data: {cause}")?;
                if *timed_out {
                    f.write_str(" (past no_data_timeout, on_no_data=hold)")?;
                }
                Ok(())
            }
            HoldReason::Gathering {
                requests_needed,
                seconds_needed,
                errors_proven,
                slow_proven,
            } => {
                let mut needs = Vec::new();
                if *requests_needed > 0.0 {
                    needs.push(format!("{requests_needed:.0} more canary requests"));
                }
                if *seconds_needed > 0.0 {
                    needs.push(format!("{seconds_needed:.0} s more"));
                }
                if !errors_proven {
                    needs.push("evidence on errors".to_string());
                }
                if !slow_proven {
                    needs.push("evidence on latency".to_string());
                }
                write!(f, "gathering: needs {}", needs.join(", "))
            }
        }
    }
}

/// Why the canary is (or was) rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RollbackReason {
    /// The canary's error rate is above `error_ceiling` with confidence.
    HardGuard,
    /// The relative error test crossed its rollback boundary.
    ErrorRegression,
    /// The relative slow-request test crossed its rollback boundary.
    SlowRegression,
    /// No data for `no_data_timeout`, and `on_no_data` is `rollback`.
    NoData {
        /// What the last evaluation saw.
        cause: NoDataCause,
    },
    /// An operator aborted the rollout.
    Aborted,
    /// A `pre-rollout` or `rollout` webhook failed `max_failures` intervals in a row (set
    /// by the driver, never by [`judge`]; see `crate::hooks`).
    Webhook,
}

impl fmt::Display for RollbackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RollbackReason::HardGuard => f.write_str("hard guard: error rate above ceiling"),
            RollbackReason::ErrorRegression => f.write_str("error rate regressed vs baseline"),
            RollbackReason::SlowRegression => f.write_str("latency regressed vs baseline"),
            RollbackReason::NoData { cause } => {
                write!(f, "no data for no_data_timeout (last: {cause})")
            }
            RollbackReason::Aborted => f.write_str("aborted by operator"),
            RollbackReason::Webhook => {
                f.write_str("a webhook failed max_failures intervals in a row")
            }
        }
    }
}

/// The numbers behind a verdict, for one printed line or one JSON object.
/// Counts and bounds are for the step being judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Numbers {
    /// Index of the step judged.
    pub step: usize,
    /// Its canary weight, percent (100 or 0 once finished).
    pub weight: u32,
    /// The canary's counts in the step.
    pub canary: Tally,
    /// The baseline's counts in the step.
    pub baseline: Tally,
    /// Wilson interval (at `promote_z`) of the canary's error rate in the step.
    pub error_bounds: Bounds,
    /// Wilson interval (at `promote_z`) of the canary's slow share in the step.
    pub slow_bounds: Bounds,
    /// The hard guard's statistic: the larger Wilson lower bound (at `guard_z`) of the canary's
    /// error rate over the step and over the guard window.
    pub guard_lower: f64,
    /// The canary's counts over the guard window (requests and errors).
    pub window: Tally,
    /// The error test's Λ (rollout-wide and this step).
    pub errors_llr: Evidence,
    /// The slow test's Λ (rollout-wide and this step).
    pub slow_llr: Evidence,
    /// Λ at which a test rolls back: ln(2/α).
    pub rollback_at: f64,
    /// A step's Λ at which a test accepts: ln β.
    pub accept_at: f64,
    /// Seconds in the step.
    pub step_seconds: f64,
    /// Seconds since usable data was last seen.
    pub seconds_since_data: f64,
}

impl fmt::Display for Numbers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.2}%", v * 100.0));
        write!(
            f,
            "step {} ({}%) {:.0}s | canary {:.0} req, {:.0} err ({}, ≤{:.2}%), {:.0} slow ({}, ≤{:.2}%) \
             | baseline {:.0} req, {:.0} err ({}), {:.0} slow ({}) \
             | guard lower {:.1}% | Λerr {:.2} (step {:.2}) Λslow {:.2} (step {:.2}), rollback ≥ {:.2}, accept ≤ {:.2}",
            self.step,
            self.weight,
            self.step_seconds,
            self.canary.requests,
            self.canary.errors,
            pct(self.canary.error_rate()),
            self.error_bounds.upper * 100.0,
            self.canary.slow,
            pct(self.canary.slow_rate()),
            self.slow_bounds.upper * 100.0,
            self.baseline.requests,
            self.baseline.errors,
            pct(self.baseline.error_rate()),
            self.baseline.slow,
            pct(self.baseline.slow_rate()),
            self.guard_lower * 100.0,
            self.errors_llr.llr,
            self.errors_llr.step_llr,
            self.slow_llr.llr,
            self.slow_llr.step_llr,
            self.rollback_at,
            self.accept_at,
        )
    }
}

/// What the controller should do after an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Keep the current weight.
    Hold {
        /// Why.
        reason: HoldReason,
        /// The numbers behind it.
        numbers: Numbers,
    },
    /// Move the canary to the next step's weight.
    Promote {
        /// The step passed.
        from_step: usize,
        /// The step entered.
        to_step: usize,
        /// The numbers behind it (of the step passed).
        numbers: Numbers,
    },
    /// The canary passed its last judged step: move it to 100 %; the rollout is over.
    Complete {
        /// The last step passed.
        from_step: usize,
        /// The numbers behind it (of the step passed).
        numbers: Numbers,
    },
    /// Move the canary to 0 %; the rollout is over.
    Rollback {
        /// Why.
        reason: RollbackReason,
        /// The numbers behind it.
        numbers: Numbers,
    },
}

impl Verdict {
    /// The numbers behind the verdict.
    pub fn numbers(&self) -> &Numbers {
        match self {
            Verdict::Hold { numbers, .. }
            | Verdict::Promote { numbers, .. }
            | Verdict::Complete { numbers, .. }
            | Verdict::Rollback { numbers, .. } => numbers,
        }
    }

    /// The canary weight the sink should now carry, or `None` to leave it as it is.
    pub fn target_weight(&self, steps: &[u32]) -> Option<u32> {
        match self {
            Verdict::Hold { .. } => None,
            // A to_step out of range cannot come from `judge`; 0 is the safe reading anyway.
            Verdict::Promote { to_step, .. } => Some(steps.get(*to_step).copied().unwrap_or(0)),
            Verdict::Complete { .. } => Some(100),
            Verdict::Rollback { .. } => Some(0),
        }
    }

    /// The reason in words, without the numbers.
    pub fn reason_text(&self) -> String {
        match self {
            Verdict::Hold { reason, .. } => reason.to_string(),
            Verdict::Promote {
                from_step, to_step, ..
            } => format!("step {from_step} passed, entering step {to_step}"),
            Verdict::Complete { from_step, .. } => {
                format!("step {from_step} passed, canary promoted to 100%")
            }
            Verdict::Rollback { reason, .. } => reason.to_string(),
        }
    }
}

impl fmt::Display for Verdict {
    /// One human line: the verdict, its reason and the numbers behind it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self {
            Verdict::Hold { .. } => "HOLD",
            Verdict::Promote { .. } => "PROMOTE",
            Verdict::Complete { .. } => "COMPLETE",
            Verdict::Rollback { .. } => "ROLLBACK",
        };
        write!(f, "{word}: {} | {}", self.reason_text(), self.numbers())
    }
}

/// Judge one observation: the new state and the verdict. Pure: same inputs, same outputs.
///
/// See the module docs for the rules and the decisions behind them.
pub fn judge(spec: &Spec, state: &State, obs: &Observation) -> (State, Verdict) {
    let mut st = state.clone();
    let verdict = judge_in_place(spec, &mut st, obs);
    st.reason = verdict.reason_text();
    (st, verdict)
}

/// An operator's promotion (`meshcanary promote`): the current step is passed now,
/// whatever its remaining wait, with the numbers of the last evaluation. Like a
/// promotion of [`judge`], passing the last judged step completes the rollout. Whether
/// the operator may do this (never past a failing verdict without `--force`) is the
/// caller's decision ([`crate::control::promote_allowed`]). A finished rollout, or a
/// state whose step is not in the spec, is returned unchanged with a hold.
pub fn skip_step(spec: &Spec, state: &State, now: Duration) -> (State, Verdict) {
    let mut st = state.clone();
    let nums = numbers(spec, &st, now);
    let verdict = if st.is_finished() || spec.steps.get(st.step).is_none() {
        Verdict::Hold {
            reason: HoldReason::InvalidState,
            numbers: nums,
        }
    } else if spec.completes_after(st.step) {
        st.phase = Phase::Promoted;
        Verdict::Complete {
            from_step: st.step,
            numbers: nums,
        }
    } else {
        let from_step = st.step;
        st.enter_step(from_step + 1, now);
        Verdict::Promote {
            from_step,
            to_step: from_step + 1,
            numbers: nums,
        }
    };
    st.reason = match &verdict {
        Verdict::Promote {
            from_step, to_step, ..
        } => format!("step {from_step} skipped by an operator, entering step {to_step}"),
        Verdict::Complete { from_step, .. } => {
            format!("step {from_step} skipped by an operator, canary promoted to 100%")
        }
        other => other.reason_text(),
    };
    (st, verdict)
}

fn judge_in_place(spec: &Spec, st: &mut State, obs: &Observation) -> Verdict {
    let now = obs.now;
    // A finished rollout answers with its final verdict again.
    match st.phase {
        Phase::Progressing => {}
        Phase::Promoted => {
            return Verdict::Complete {
                from_step: st.step,
                numbers: numbers(spec, st, now),
            }
        }
        Phase::RolledBack { reason } => {
            return Verdict::Rollback {
                reason,
                numbers: numbers(spec, st, now),
            }
        }
        Phase::Aborted => {
            return Verdict::Rollback {
                reason: RollbackReason::Aborted,
                numbers: numbers(spec, st, now),
            }
        }
    }
    if !spec.problems().is_empty() {
        return Verdict::Hold {
            reason: HoldReason::InvalidSpec,
            numbers: numbers(spec, st, now),
        };
    }
    if spec.steps.get(st.step).is_none() {
        return Verdict::Hold {
            reason: HoldReason::InvalidState,
            numbers: numbers(spec, st, now),
        };
    }
    let a = &spec.analysis;

    let canary_now = obs.canary.filter(Counters::is_valid);
    let baseline_now = obs.baseline.filter(Counters::is_valid);
    let mut first = false;
    let mut reset = false;

    // The canary on its own: feeds the step's canary tally and the guard window.
    if let Some(c) = canary_now {
        match st.canary_ref.as_ref().map(|r| c.since(r)) {
            Some(Some(delta)) => {
                st.canary.add(&delta);
                st.window.push(Slice {
                    at: now,
                    requests: delta.requests,
                    errors: delta.errors,
                });
            }
            Some(None) => reset = true,
            None => first = true,
        }
        st.canary_ref = Some(c);
    }
    // Keep the window to `guard_window` (and bounded in size).
    let horizon = now.saturating_sub(a.guard_window);
    st.window.retain(|s| s.at > horizon);
    if st.window.len() > MAX_WINDOW_SLICES {
        let excess = st.window.len() - MAX_WINDOW_SLICES;
        st.window.drain(..excess);
    }

    // Both sides together: feeds the relative tests and the baseline tally.
    let mut canary_requests_in_pair = 0.0;
    let mut paired = false;
    if let (Some(c), Some(b)) = (canary_now, baseline_now) {
        let deltas = st
            .pair_ref
            .as_ref()
            .map(|r| (c.since(&r.canary), b.since(&r.baseline)));
        match deltas {
            Some((Some(dc), Some(db))) => {
                paired = true;
                canary_requests_in_pair = dc.requests;
                st.baseline.add(&db);
                let total = dc.requests + db.requests;
                if total > 0.0 {
                    let share = dc.requests / total;
                    let r1 = a.relative_risk;
                    st.errors
                        .add(llr_increment(dc.errors, db.errors, share, r1));
                    st.slow.add(llr_increment(dc.slow, db.slow, share, r1));
                }
                if dc.requests > 0.0 {
                    st.last_data_at = now;
                }
            }
            Some(_) => reset = true,
            None => first = true,
        }
        st.pair_ref = Some(PairReading {
            canary: c,
            baseline: b,
        });
    }

    let nums = numbers(spec, st, now);

    // 1. Hard guard: canary counts alone.
    if nums.guard_lower > a.error_ceiling {
        return rollback(st, RollbackReason::HardGuard, nums);
    }
    // 2. Relative regression.
    let rollback_at = spec.rollback_threshold();
    if st.errors.llr >= rollback_at {
        return rollback(st, RollbackReason::ErrorRegression, nums);
    }
    if st.slow.llr >= rollback_at {
        return rollback(st, RollbackReason::SlowRegression, nums);
    }
    // 3. No usable data: never a pass.
    if !paired || canary_requests_in_pair <= 0.0 {
        let cause = if canary_now.is_none() || baseline_now.is_none() {
            NoDataCause::Unreadable {
                canary: canary_now.is_none(),
                baseline: baseline_now.is_none(),
            }
        } else if reset {
            NoDataCause::CounterReset
        } else if first {
            NoDataCause::FirstReading
        } else {
            NoDataCause::NoCanaryTraffic
        };
        let timed_out = now.saturating_sub(st.last_data_at) >= a.no_data_timeout;
        if timed_out && a.on_no_data == OnNoData::Rollback {
            return rollback(st, RollbackReason::NoData { cause }, nums);
        }
        return Verdict::Hold {
            reason: HoldReason::NoData { cause, timed_out },
            numbers: nums,
        };
    }
    // 4. Promotion on positive evidence.
    let accept_at = spec.accept_threshold();
    let errors_proven = proven(&st.errors, nums.error_bounds, a.max_error_rate, accept_at);
    let slow_proven = proven(&st.slow, nums.slow_bounds, a.max_slow_rate, accept_at);
    let requests_needed = (a.min_requests as f64 - st.canary.requests).max(0.0);
    let elapsed = now.saturating_sub(st.step_started_at);
    let seconds_needed = spec.step_min_duration.saturating_sub(elapsed).as_secs_f64();
    if errors_proven && slow_proven && requests_needed <= 0.0 && seconds_needed <= 0.0 {
        let from_step = st.step;
        if spec.completes_after(from_step) {
            st.phase = Phase::Promoted;
            return Verdict::Complete {
                from_step,
                numbers: nums,
            };
        }
        let to_step = from_step + 1;
        st.enter_step(to_step, now);
        return Verdict::Promote {
            from_step,
            to_step,
            numbers: nums,
        };
    }
    Verdict::Hold {
        reason: HoldReason::Gathering {
            requests_needed,
            seconds_needed,
            errors_proven,
            slow_proven,
        },
        numbers: nums,
    }
}

/// Positive evidence on one metric: the step's Λ at the accept boundary, or the canary's
/// Wilson upper bound at or below the limit while the relative test does not lean towards a
/// regression (neither the step's nor the rollout's Λ at or above −ln β, the accept margin
/// mirrored). Without that veto a canary 10× worse than a very clean baseline but still under
/// the absolute limit could be promoted on the absolute bound alone while the relative test was
/// already half-way to rolling it back; in simulation the veto cost healthy rollouts no time.
fn proven(evidence: &Evidence, bounds: Bounds, limit: f64, accept_at: f64) -> bool {
    let accepted = evidence.step_llr <= accept_at;
    let leaning_bad = evidence.step_llr.max(evidence.llr) >= -accept_at;
    accepted || (bounds.upper <= limit && !leaning_bad)
}

fn rollback(st: &mut State, reason: RollbackReason, numbers: Numbers) -> Verdict {
    st.phase = Phase::RolledBack { reason };
    Verdict::Rollback { reason, numbers }
}

fn numbers(spec: &Spec, st: &State, now: Duration) -> Numbers {
    let a = &spec.analysis;
    let window = st.window_tally();
    let guard_step = wilson(st.canary.errors, st.canary.requests, a.guard_z).lower;
    let guard_window = wilson(window.errors, window.requests, a.guard_z).lower;
    Numbers {
        step: st.step,
        weight: st.current_weight(&spec.steps),
        canary: st.canary,
        baseline: st.baseline,
        error_bounds: wilson(st.canary.errors, st.canary.requests, a.promote_z),
        slow_bounds: wilson(st.canary.slow, st.canary.requests, a.promote_z),
        guard_lower: guard_step.max(guard_window),
        window,
        errors_llr: st.errors,
        slow_llr: st.slow,
        rollback_at: spec.rollback_threshold(),
        accept_at: spec.accept_threshold(),
        step_seconds: now.saturating_sub(st.step_started_at).as_secs_f64(),
        seconds_since_data: now.saturating_sub(st.last_data_at).as_secs_f64(),
    }
}

#[cfg(test)]
mod tests;
