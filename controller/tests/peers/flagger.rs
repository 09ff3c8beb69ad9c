//! Flagger's canary analysis (progressive traffic shifting), from its documented rules.
//!
//! Sources (fluxcd/flagger):
//! - `pkg/controller/scheduler.go`: one analysis per `interval` tick. At the start of a tick,
//!   `failedChecks >= threshold` → rollback. At weight 0 with no iteration yet, the analysis is
//!   skipped and the weight advances to `stepWeight`. Otherwise the metric checks run: any
//!   failing check adds one to `failedChecks` and the weight stays (failed checks are never
//!   reset during an analysis); all passing → `runCanary` raises the weight by `stepWeight`
//!   while below `maxWeight`, and at `maxWeight` promotes (phase Promoting; traffic returns to
//!   the primary, now running the new version, at the next tick).
//! - `pkg/controller/scheduler_metrics.go` (`runBuiltinMetricChecks`): `request-success-rate`
//!   fails below `thresholdRange.min`, `request-duration` above `thresholdRange.max` (ms); a
//!   query error or "no values found" is a failed check too ("Halt advancement no values
//!   found …", return false).
//! - `pkg/metrics/providers/prometheus.go` (`RunQuery`): an empty result or NaN is
//!   `ErrNoValuesFound` — so a window without canary requests (0/0) fails the check.
//! - `pkg/metrics/observers/istio.go`: success rate = 100 × non-5xx rate / all rate over
//!   `[interval]` of the canary workload only; duration = `histogram_quantile(0.99, …)`.
//! - `pkg/apis/flagger/v1beta1/canary.go`: metric interval default 1m, analysis interval
//!   default 60 s. The threshold's code default is 1; the documented examples (and issue #14)
//!   use 5, as here.
//!
//! Thresholds are those of Flagger's documented examples: success rate ≥ 99 %, P99 ≤ 500 ms.
//! The simulation counts requests slower than 500 ms (a histogram bucket boundary), and
//! `histogram_quantile(0.99)` is above 500 ms exactly when more than 1 % of the window's
//! requests are above it, so the P99 check is "slow share ≤ 1 %". Both checks are ratios, so
//! `rate()`'s extrapolation cancels out.

use super::{Decision, History, Judge};

/// A Canary's `analysis` section, as far as the decision goes.
#[derive(Debug, Clone)]
pub struct Config {
    /// `interval`, seconds.
    pub interval: u64,
    /// `threshold`: failed checks before rollback.
    pub threshold: u32,
    /// `stepWeight`, percent.
    pub step_weight: u32,
    /// `maxWeight`, percent.
    pub max_weight: u32,
    /// `request-success-rate` `thresholdRange.min`, percent.
    pub min_success_percent: f64,
    /// `request-duration` `thresholdRange.max` as the share of requests allowed above the
    /// latency threshold (P99 ≤ threshold ⇔ at most 1 % slower).
    pub max_slow_share: f64,
    /// The metrics' `interval` (query window), seconds.
    pub metric_window: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            interval: 60,
            threshold: 5,
            step_weight: 10,
            max_weight: 50,
            min_success_percent: 99.0,
            max_slow_share: 0.01,
            metric_window: 60,
        }
    }
}

/// One Canary's analysis state (`status.canaryWeight`, `failedChecks`, `iterations`).
#[derive(Debug, Clone)]
pub struct Flagger {
    cfg: Config,
    weight: u32,
    failed_checks: u32,
    started: bool,
}

impl Flagger {
    /// A new analysis at weight 0.
    pub fn new(cfg: Config) -> Self {
        Flagger {
            cfg,
            weight: 0,
            failed_checks: 0,
            started: false,
        }
    }

    /// The failed checks so far.
    pub fn failed_checks(&self) -> u32 {
        self.failed_checks
    }

    /// The built-in metric checks at second `t`: all pass → true.
    fn checks_pass(&self, t: u64, h: &History) -> bool {
        if !h.readable(t) {
            return false; // "Prometheus query failed"
        }
        let w = h.canary(t.saturating_sub(self.cfg.metric_window), t);
        if w.requests <= 0.0 {
            return false; // 0/0 = NaN: "no values found"
        }
        let success_percent = 100.0 * (w.requests - w.errors) / w.requests;
        if success_percent < self.cfg.min_success_percent {
            return false;
        }
        w.slow / w.requests <= self.cfg.max_slow_share
    }
}

impl Judge for Flagger {
    fn weight(&self) -> u32 {
        self.weight
    }

    fn tick(&mut self, t: u64, h: &History) -> Decision {
        if !t.is_multiple_of(self.cfg.interval) {
            return Decision::Continue;
        }
        if self.failed_checks >= self.cfg.threshold {
            return Decision::Rollback("failed checks threshold reached");
        }
        if !self.started {
            // canaryWeight == 0 && iterations == 0: no analysis, first step.
            self.started = true;
            self.weight = self.cfg.step_weight.min(self.cfg.max_weight);
            return Decision::Continue;
        }
        if !self.checks_pass(t, h) {
            self.failed_checks += 1;
            return Decision::Continue;
        }
        if self.weight < self.cfg.max_weight {
            self.weight = (self.weight + self.cfg.step_weight).min(100);
            Decision::Continue
        } else {
            Decision::Promote
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcanary_controller::verdict::Tally;

    fn second(requests: f64, errors: f64, slow: f64) -> Tally {
        Tally {
            requests,
            errors,
            slow,
        }
    }

    /// Drives `f` for `seconds` seconds, the canary answering `canary` each second.
    fn drive(
        f: &mut Flagger,
        h: &mut History,
        from: u64,
        to: u64,
        canary: Tally,
        readable: bool,
    ) -> Vec<(u64, Decision)> {
        let mut out = Vec::new();
        for t in from..=to {
            if t > 0 {
                h.push(canary, second(100.0, 0.0, 0.0), readable);
            }
            let d = f.tick(t, h);
            if d != Decision::Continue {
                out.push((t, d));
                break;
            }
        }
        out
    }

    #[test]
    fn flagger_healthy_canary_steps_10_to_50_then_promotes_after_the_analysis_at_50() {
        let mut f = Flagger::new(Config::default());
        let mut h = History::default();
        let mut weights = Vec::new();
        let mut end = None;
        for t in 0..=600 {
            if t > 0 {
                h.push(second(10.0, 0.0, 0.0), second(90.0, 0.0, 0.0), true);
            }
            let d = f.tick(t, &h);
            if t % 60 == 0 {
                weights.push(f.weight());
            }
            if d != Decision::Continue {
                end = Some((t, d));
                break;
            }
        }
        assert_eq!(weights, vec![10, 20, 30, 40, 50, 50]);
        assert_eq!(end, Some((300, Decision::Promote)));
        assert_eq!(f.failed_checks(), 0);
    }

    #[test]
    fn flagger_no_values_is_a_failed_check_and_the_fifth_rolls_back_at_the_next_tick() {
        // The canary takes no requests at all: every check finds no values.
        let mut f = Flagger::new(Config::default());
        let mut h = History::default();
        let end = drive(&mut f, &mut h, 0, 1000, second(0.0, 0.0, 0.0), true);
        assert_eq!(f.failed_checks(), 5);
        assert_eq!(f.weight(), 10, "a failed check never advances the weight");
        // Checks at 60..300 fail; the tick at 360 sees failedChecks = 5 = threshold.
        assert_eq!(
            end,
            vec![(360, Decision::Rollback("failed checks threshold reached"))]
        );
    }

    #[test]
    fn flagger_a_query_during_an_outage_fails_and_failed_checks_are_never_reset() {
        let mut f = Flagger::new(Config::default());
        let mut h = History::default();
        // Two failing checks (source unreadable at 60 and 120), then healthy traffic.
        drive(&mut f, &mut h, 0, 120, second(10.0, 0.0, 0.0), false);
        assert_eq!(f.failed_checks(), 2);
        let end = drive(&mut f, &mut h, 121, 1000, second(10.0, 0.0, 0.0), true);
        assert_eq!(
            f.failed_checks(),
            2,
            "passing checks do not reset the count"
        );
        // 10 → 20 → 30 → 40 → 50, then the analysis at 50 promotes: 5 ticks after 120.
        assert_eq!(end, vec![(420, Decision::Promote)]);
    }

    #[test]
    fn flagger_success_rate_below_99_or_more_than_1_percent_slow_fails_a_check() {
        let cfg = Config::default();
        let mut h = History::default();
        for _ in 0..60 {
            h.push(second(100.0, 1.0, 1.0), second(0.0, 0.0, 0.0), true);
        }
        let f = Flagger::new(cfg.clone());
        assert!(
            f.checks_pass(60, &h),
            "exactly 99 % success and 1 % slow pass"
        );
        let mut h2 = History::default();
        for _ in 0..60 {
            h2.push(second(100.0, 1.1, 0.0), second(0.0, 0.0, 0.0), true);
        }
        assert!(!f.checks_pass(60, &h2), "98.9 % success fails");
        let mut h3 = History::default();
        for _ in 0..60 {
            h3.push(second(100.0, 0.0, 1.1), second(0.0, 0.0, 0.0), true);
        }
        assert!(!f.checks_pass(60, &h3), "P99 above the threshold fails");
    }
}
