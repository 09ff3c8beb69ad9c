//! Argo Rollouts: a canary with steps and a background AnalysisRun, from its documented rules.
//!
//! Sources (argoproj/argo-rollouts):
//! - `analysis/analysis.go` (`assessMetricStatus`, `assessMetricFailureInconclusiveOrError`):
//!   a metric fails when `failed > failureLimit` (so `failureLimit: 2` fails on the 3rd failed
//!   measurement, failures counted over the whole run, not consecutively), is inconclusive when
//!   `inconclusive > inconclusiveLimit` (default 0), errors when `consecutiveError >
//!   consecutiveErrorLimit`; a measurement that is not an error resets `ConsecutiveError`.
//! - `utils/defaults/defaults.go`: `DefaultConsecutiveErrorLimit = 4`.
//! - `utils/evaluate/evaluate.go` (`EvaluateResult`): with only a `successCondition`, a
//!   measurement whose condition is false is Failed (never Inconclusive); a condition that
//!   cannot be evaluated is an Error.
//! - `metricproviders/prometheus/prometheus.go`: a query error is an Error measurement; a
//!   vector result is passed as a list, hence `result[0]` in the documented templates; an
//!   empty vector (no series yet) makes `result[0]` fail to evaluate → Error; a NaN (0/0 over
//!   a window without requests) compares false → Failed.
//! - `docs/features/analysis.md` (Background Analysis): the run measures every `interval` while
//!   the rollout walks its steps; a Failed or Errored run aborts the rollout (canary weight back
//!   to 0); a rollout that completes its steps is promoted and the run stopped as successful.
//!   Its example steps are setWeight 20/40/60/80 with a 10-minute pause each, as here, but the
//!   run starts with the rollout (the example's `startingStep: 2` would delay detection).
//!
//! The template (issue #14): `success-rate`, `successCondition: result[0] >= 0.99` on
//! `sum(rate(non-5xx[2m])) / sum(rate(all[2m]))` of the canary, `interval: 1m`,
//! `failureLimit: 2`; and the same for latency, `p99-latency`, `result[0] <= 500` on
//! `histogram_quantile(0.99, …[2m])` (≤ 500 ms ⇔ at most 1 % of requests above 500 ms).

use super::{Decision, History, Judge};

/// A measurement's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The success condition held.
    Successful,
    /// It did not (or compared NaN).
    Failed,
    /// The query failed or the condition could not be evaluated.
    Error,
}

/// One metric's running tally in the AnalysisRun.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricResult {
    /// Failed measurements.
    pub failed: u32,
    /// Consecutive errors.
    pub consecutive_error: u32,
}

impl MetricResult {
    fn record(&mut self, phase: Phase) {
        match phase {
            Phase::Successful => self.consecutive_error = 0,
            Phase::Failed => {
                self.failed += 1;
                self.consecutive_error = 0;
            }
            Phase::Error => self.consecutive_error += 1,
        }
    }
}

/// The rollout's steps and the template's metric settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// (setWeight, pause seconds) per step.
    pub steps: Vec<(u32, u64)>,
    /// The metrics' `interval`, seconds.
    pub interval: u64,
    /// The `rate()` window, seconds.
    pub window: u64,
    /// `failureLimit`.
    pub failure_limit: u32,
    /// `consecutiveErrorLimit`.
    pub consecutive_error_limit: u32,
    /// `result[0] >= …` for the success rate.
    pub min_success_rate: f64,
    /// Share of requests allowed above the latency threshold (P99 ≤ threshold).
    pub max_slow_share: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            steps: vec![(20, 600), (40, 600), (60, 600), (80, 600)],
            interval: 60,
            window: 120,
            failure_limit: 2,
            consecutive_error_limit: 4,
            min_success_rate: 0.99,
            max_slow_share: 0.01,
        }
    }
}

/// A rollout with its background AnalysisRun.
#[derive(Debug, Clone)]
pub struct Argo {
    cfg: Config,
    step: usize,
    step_started: u64,
    success_rate: MetricResult,
    latency: MetricResult,
}

impl Argo {
    /// A rollout starting at its first step at t = 0.
    pub fn new(cfg: Config) -> Self {
        Argo {
            cfg,
            step: 0,
            step_started: 0,
            success_rate: MetricResult::default(),
            latency: MetricResult::default(),
        }
    }

    /// The two metrics' tallies (success rate, latency).
    pub fn results(&self) -> (MetricResult, MetricResult) {
        (self.success_rate, self.latency)
    }

    /// Both measurements taken at second `t`.
    pub fn measure(&self, t: u64, h: &History) -> (Phase, Phase) {
        if !h.readable(t) {
            return (Phase::Error, Phase::Error);
        }
        if h.first_canary_request().is_none_or(|first| first > t) {
            // No canary series yet: an empty vector, `result[0]` cannot be evaluated.
            return (Phase::Error, Phase::Error);
        }
        let w = h.canary(t.saturating_sub(self.cfg.window), t);
        // NaN (no requests in the window) compares false: Failed.
        let success = (w.requests - w.errors) / w.requests;
        let slow_share = w.slow / w.requests;
        let phase = |ok: bool| if ok { Phase::Successful } else { Phase::Failed };
        (
            phase(success >= self.cfg.min_success_rate),
            phase(slow_share <= self.cfg.max_slow_share),
        )
    }

    fn run_failed(&self) -> Option<&'static str> {
        for m in [&self.success_rate, &self.latency] {
            if m.failed > self.cfg.failure_limit {
                return Some("analysis run failed: failed > failureLimit");
            }
            if m.consecutive_error > self.cfg.consecutive_error_limit {
                return Some("analysis run errored: consecutiveErrors > consecutiveErrorLimit");
            }
        }
        None
    }
}

impl Judge for Argo {
    fn weight(&self) -> u32 {
        self.cfg.steps.get(self.step).map_or(100, |s| s.0)
    }

    fn tick(&mut self, t: u64, h: &History) -> Decision {
        if t.is_multiple_of(self.cfg.interval) {
            let (success, latency) = self.measure(t, h);
            self.success_rate.record(success);
            self.latency.record(latency);
            if let Some(reason) = self.run_failed() {
                return Decision::Rollback(reason);
            }
        }
        let Some(&(_, pause)) = self.cfg.steps.get(self.step) else {
            return Decision::Promote;
        };
        if t >= self.step_started + pause {
            self.step += 1;
            self.step_started = t;
            if self.step >= self.cfg.steps.len() {
                return Decision::Promote;
            }
        }
        Decision::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcanary_controller::verdict::Tally;

    fn second(requests: f64, errors: f64) -> Tally {
        Tally {
            requests,
            errors,
            slow: 0.0,
        }
    }

    fn run(canary: impl Fn(u64) -> Tally, readable: impl Fn(u64) -> bool) -> (u64, Decision, Argo) {
        let mut a = Argo::new(Config::default());
        let mut h = History::default();
        for t in 0..=4000 {
            if t > 0 {
                h.push(canary(t), second(100.0, 0.0), readable(t));
            }
            let d = a.tick(t, &h);
            if d != Decision::Continue {
                return (t, d, a);
            }
        }
        (4000, Decision::Continue, a)
    }

    #[test]
    fn argo_failure_limit_2_means_the_third_failed_measurement_fails_the_run() {
        // 2 % errors from the start: measurements at 60, 120, 180 fail (t = 0 has no series).
        let (t, d, a) = run(|_| second(50.0, 1.0), |_| true);
        assert_eq!(
            d,
            Decision::Rollback("analysis run failed: failed > failureLimit")
        );
        assert_eq!(t, 180);
        assert_eq!(a.results().0.failed, 3);
        assert_eq!(a.results().1.failed, 0);
    }

    #[test]
    fn argo_two_failures_then_healthy_is_promoted_after_its_four_steps() {
        // Errors only during the first 120 s: the measurements at 60 and 120 fail, the one at
        // 180 sees a window (60, 180] still half bad (1 % errors) and passes at exactly 0.99.
        let (t, d, a) = run(
            |t| {
                if t <= 120 {
                    second(50.0, 1.0)
                } else {
                    second(50.0, 0.0)
                }
            },
            |_| true,
        );
        assert_eq!(a.results().0.failed, 2);
        assert_eq!((t, d), (2400, Decision::Promote));
    }

    #[test]
    fn argo_errors_count_only_when_consecutive_and_the_fifth_in_a_row_errors_the_run() {
        // The source answers nothing from 100 s on: errors at 120, 180, 240, 300 (4 = limit),
        // the 5th at 360 is over consecutiveErrorLimit 4.
        let (t, d, a) = run(|_| second(50.0, 0.0), |t| t < 100);
        assert_eq!(t, 360);
        assert_eq!(
            d,
            Decision::Rollback("analysis run errored: consecutiveErrors > consecutiveErrorLimit")
        );
        assert_eq!(a.results().0.failed, 0);
        // Four errors in a row, then a good measurement: reset, no failure.
        let (t, d, _) = run(|_| second(50.0, 0.0), |t| !(100..=300).contains(&t));
        assert_eq!((t, d), (2400, Decision::Promote));
    }

    #[test]
    fn argo_a_window_without_canary_requests_is_nan_and_fails() {
        let mut h = History::default();
        h.push(second(5.0, 0.0), second(5.0, 0.0), true);
        for _ in 0..200 {
            h.push(second(0.0, 0.0), second(5.0, 0.0), true);
        }
        let a = Argo::new(Config::default());
        assert_eq!(a.measure(201, &h), (Phase::Failed, Phase::Failed));
        assert_eq!(a.measure(60, &h), (Phase::Successful, Phase::Successful));
    }
}
