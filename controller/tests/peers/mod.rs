//! Peer judges for the verdict simulation: our own Rust renderings of the documented decision
//! rules of Flagger, Argo Rollouts and Kayenta's NetflixACAJudge, driven over the same
//! simulated traffic as meshcanary's engine (`simulation.rs`, `peer_table`).
//!
//! Facts (rules, defaults, formulas) come from each project's public source, cited per file;
//! no code is taken from them. What a peer reads is modelled on what its usual metric source
//! would answer: Prometheus `rate()` over a window, which follows counter resets on its own,
//! so a proxy restart costs the Prometheus-based peers nothing here (meshcanary's engine reads
//! raw cumulative counters and skips the interval of a reset); a metrics outage makes a query
//! made during it fail (Flagger, Argo) or leaves the samples taken during it missing (Kayenta).

pub mod argo;
pub mod flagger;
pub mod kayenta;

use meshcanary_controller::verdict::Tally;

/// What a judge decides at one second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep going (possibly at a new weight: see [`Judge::weight`]).
    Continue,
    /// Roll the canary back, for this reason.
    Rollback(&'static str),
    /// Promote the canary (the decision; traffic moves after it).
    Promote,
}

/// One judge driven second by second over a simulated rollout.
pub trait Judge {
    /// The canary's traffic weight, percent, for the coming second.
    fn weight(&self) -> u32;
    /// Called at the end of every simulated second `t` (1, 2, …) once its traffic is in `h`,
    /// and once at t = 0 before any traffic.
    fn tick(&mut self, t: u64, h: &History) -> Decision;
}

/// Per-second traffic of both sides, as prefix sums, plus whether the metric source could be
/// read at each second. Second `t` (1-based) covers the interval (t − 1, t].
#[derive(Debug, Clone)]
pub struct History {
    canary: Vec<Tally>,
    baseline: Vec<Tally>,
    readable: Vec<bool>,
    first_canary_request: Option<u64>,
}

impl Default for History {
    fn default() -> Self {
        History {
            canary: vec![Tally::default()],
            baseline: vec![Tally::default()],
            readable: vec![true],
            first_canary_request: None,
        }
    }
}

fn add(a: &Tally, b: &Tally) -> Tally {
    Tally {
        requests: a.requests + b.requests,
        errors: a.errors + b.errors,
        slow: a.slow + b.slow,
    }
}

fn sub(a: &Tally, b: &Tally) -> Tally {
    Tally {
        requests: a.requests - b.requests,
        errors: a.errors - b.errors,
        slow: a.slow - b.slow,
    }
}

impl History {
    /// Appends the next second's counts.
    pub fn push(&mut self, canary: Tally, baseline: Tally, readable: bool) {
        let t = self.canary.len() as u64;
        if canary.requests > 0.0 && self.first_canary_request.is_none() {
            self.first_canary_request = Some(t);
        }
        let c = add(self.canary.last().unwrap_or(&Tally::default()), &canary);
        let b = add(self.baseline.last().unwrap_or(&Tally::default()), &baseline);
        self.canary.push(c);
        self.baseline.push(b);
        self.readable.push(readable);
    }

    /// The canary's counts over seconds (from, to] (clamped to what exists).
    pub fn canary(&self, from: u64, to: u64) -> Tally {
        Self::window(&self.canary, from, to)
    }

    /// The baseline's counts over seconds (from, to].
    pub fn baseline(&self, from: u64, to: u64) -> Tally {
        Self::window(&self.baseline, from, to)
    }

    fn window(cum: &[Tally], from: u64, to: u64) -> Tally {
        let last = cum.len() - 1;
        let to = (to as usize).min(last);
        let from = (from as usize).min(to);
        sub(&cum[to], &cum[from])
    }

    /// Whether the metric source answered at second `t`.
    pub fn readable(&self, t: u64) -> bool {
        self.readable.get(t as usize).copied().unwrap_or(true)
    }

    /// The second in which the canary got its first request (its series exist from then on).
    pub fn first_canary_request(&self) -> Option<u64> {
        self.first_canary_request
    }
}
