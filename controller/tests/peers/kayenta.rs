//! Kayenta's NetflixACAJudge, run as a standalone canary analysis per traffic step.
//!
//! Sources (spinnaker/kayenta):
//! - `kayenta-judge/src/main/scala/com/netflix/kayenta/judge/NetflixACAJudge.scala`: per metric,
//!   NaN handling (`nanStrategy` defaults to remove), then the Mann-Whitney classifier with
//!   `tolerance = 0.25` and `confLevel = 0.98`; effect size "meanRatio" with allowed increase
//!   1.0 by default; a classifier exception becomes the classification Error.
//! - `kayenta-judge/.../classifiers/metric/MannWhitneyClassifier.scala`: no data on either side
//!   → Nodata; identical sorted samples → Pass; one distinct value over both → Pass; both sides
//!   constant (but different) → tiny Gaussian noise (sd = value × 1e-5) before the test; High
//!   when (direction increase or either) the lower confidence bound is above `tolerance ×
//!   |estimate|` and the mean ratio (canary / baseline, NaN when either mean is 0, then ignored)
//!   is at least the allowed increase.
//! - `kayenta-mannwhitney/src/main/scala/com/netflix/kayenta/mannwhitney/MannWhitney.scala`: the
//!   Hodges–Lehmann shift and its confidence interval by inverting the Wilcoxon rank-sum statistic
//!   with its normal approximation (average ranks, tie correction in σ, continuity correction
//!   0.5·sign), roots searched between min(x) − max(y) and max(x) − min(y), an endpoint taken
//!   when the root is not bracketed; σ = 0 (all tied) throws. Its root finder
//!   (`BrentSolver.java`, R's zeroin) stops at an absolute tolerance of 1e-4; ours bisects
//!   further, which only sharpens roots on the small scale of error rates.
//! - `kayenta-judge/.../scorers/WeightedSumScorer.scala`: group score = 100 × Pass / (Pass +
//!   High + Low + NodataFail) (0 metrics counted → the group counts as 100); 50 % or more of the
//!   metrics Nodata → score 0; a critical metric not Pass → 0.
//! - `kayenta-judge/.../classifiers/score/ThresholdScoreClassifier.scala`: Pass ≥ pass,
//!   Marginal ≥ marginal, else Fail.
//! - `kayenta-standalone-canary-analysis/.../orca/task/MonitorCanaryTask.java` and
//!   `GenerateCanaryAnalysisResultTask.java`: a judgement whose score is ≤ marginal ends the
//!   analysis as failed at once; the last judgement must reach the pass threshold. Without
//!   `lookbackMins`, judgement k covers a growing window from the start to start + k·interval
//!   (`domain/CanaryAnalysisExecutionRequest.java`).
//!
//! Setup here: steps of 10, 25 and 50 %, one analysis per step of 30 minutes with a judgement
//! every 10 minutes (Spinnaker's help recommends intervals of at least 30 minutes; this is
//! already shorter), samples every 60 s (each the ratio over that minute: NaN without
//! requests), thresholds pass 75 / marginal 50; two metrics, the error rate and the share of
//! requests above 500 ms, both `direction: increase`, neither critical, in one group. The
//! baseline is the stable side of the same mesh (Kayenta's docs advise a separate baseline
//! cluster of the canary's size; here it is simply bigger, so less noisy).

use super::{Decision, History, Judge};

/// A metric's classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    /// No significant increase.
    Pass,
    /// The canary is higher.
    High,
    /// No data on a side after NaN removal.
    Nodata,
    /// The classifier threw (all values tied after noise).
    Error,
}

/// The Mann-Whitney test's output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    /// Lower confidence bound of the shift (canary − baseline).
    pub lower: f64,
    /// Upper confidence bound.
    pub upper: f64,
    /// Hodges–Lehmann estimate of the shift.
    pub estimate: f64,
}

/// Average ranks (1-based) of `values`, and the sizes of the tie groups.
fn average_ranks(values: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut ties = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        ties.push((j - i + 1) as f64);
        i = j + 1;
    }
    (ranks, ties)
}

/// The standardized rank-sum statistic of `x − mu` against `y`, minus `quantile`; `None` when
/// every value is tied (σ = 0: Kayenta throws).
pub fn wilcoxon_diff(mu: f64, quantile: f64, x: &[f64], y: &[f64]) -> Option<f64> {
    let (nx, ny) = (x.len() as f64, y.len() as f64);
    let all: Vec<f64> = x.iter().map(|v| v - mu).chain(y.iter().copied()).collect();
    let (ranks, ties) = average_ranks(&all);
    let dz = ranks[..x.len()].iter().sum::<f64>() - nx * (nx + 1.0) / 2.0 - nx * ny / 2.0;
    let correction = if dz > 0.0 {
        0.5
    } else if dz < 0.0 {
        -0.5
    } else {
        0.0
    };
    let tie_sum: f64 = ties.iter().map(|t| t * t * t - t).sum();
    let sigma =
        ((nx * ny / 12.0) * ((nx + ny + 1.0) - tie_sum / ((nx + ny) * (nx + ny - 1.0)))).sqrt();
    if sigma == 0.0 || !sigma.is_finite() {
        return None;
    }
    Some((dz - correction) / sigma - quantile)
}

/// The root of the (non-increasing) `f` on [lo, hi], given f(lo) > 0 > f(hi).
fn bisect(mut lo: f64, mut hi: f64, f: impl Fn(f64) -> Option<f64>) -> Option<f64> {
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        let v = f(mid)?;
        if v == 0.0 {
            return Some(mid);
        }
        if v > 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(0.5 * (lo + hi))
}

/// Mann-Whitney U: the shift of `x` (experiment) over `y` (control) with its two-sided
/// confidence interval, as Kayenta computes it; `z` is the normal quantile of the confidence
/// level ([`Z_98`] for Kayenta's 0.98). `None` when Kayenta would throw.
pub fn mann_whitney(x: &[f64], y: &[f64], z: f64) -> Option<MannWhitney> {
    let fold = |acc: (f64, f64), v: &f64| (acc.0.min(*v), acc.1.max(*v));
    let (x_min, x_max) = x.iter().fold((f64::INFINITY, f64::NEG_INFINITY), fold);
    let (y_min, y_max) = y.iter().fold((f64::INFINITY, f64::NEG_INFINITY), fold);
    let (mu_min, mu_max) = (x_min - y_max, x_max - y_min);
    let root = |q: f64| -> Option<f64> {
        let f_lower = wilcoxon_diff(mu_min, q, x, y)?;
        let f_upper = wilcoxon_diff(mu_max, q, x, y)?;
        if f_lower <= 0.0 {
            Some(mu_min)
        } else if f_upper >= 0.0 {
            Some(mu_max)
        } else {
            bisect(mu_min, mu_max, |mu| wilcoxon_diff(mu, q, x, y))
        }
    };
    Some(MannWhitney {
        lower: root(z)?,
        upper: root(-z)?,
        estimate: root(0.0)?,
    })
}

/// The standard normal quantile of 1 − (1 − 0.98)/2: Kayenta's `confLevel = 0.98`.
pub const Z_98: f64 = 2.326_347_874_040_841;
/// `tolerance` of the classifier.
pub const TOLERANCE: f64 = 0.25;

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Classifies one metric (`direction: increase`, `nanStrategy: remove`, not critical).
/// `noise` draws a standard normal, for the both-constant case.
pub fn classify(
    canary: &[f64],
    baseline: &[f64],
    noise: &mut dyn FnMut() -> f64,
) -> Classification {
    let x: Vec<f64> = canary.iter().copied().filter(|v| !v.is_nan()).collect();
    let y: Vec<f64> = baseline.iter().copied().filter(|v| !v.is_nan()).collect();
    if x.is_empty() || y.is_empty() {
        return Classification::Nodata;
    }
    let sorted = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s
    };
    if sorted(&x) == sorted(&y) {
        return Classification::Pass;
    }
    let distinct = |v: &[f64]| {
        let s = sorted(v);
        let mut d = s.clone();
        d.dedup();
        d
    };
    let union: Vec<f64> = x.iter().chain(y.iter()).copied().collect();
    if distinct(&union).len() == 1 {
        return Classification::Pass;
    }
    let (x, y) = if distinct(&x).len() == 1 && distinct(&y).len() == 1 {
        let jitter = |v: &[f64], noise: &mut dyn FnMut() -> f64| {
            let sd = v[0] * 1e-5;
            v.iter().map(|a| a + sd * noise()).collect::<Vec<f64>>()
        };
        (jitter(&x, noise), jitter(&y, noise))
    } else {
        (x, y)
    };
    let Some(mw) = mann_whitney(&x, &y, Z_98) else {
        return Classification::Error;
    };
    let (mx, my) = (mean(&x), mean(&y));
    let ratio = if mx == 0.0 || my == 0.0 {
        f64::NAN
    } else {
        mx / my
    };
    if is_high(&mw, ratio) {
        Classification::High
    } else {
        Classification::Pass
    }
}

/// The classifier's High rule for `direction: increase`: the interval's lower bound above
/// `tolerance × |estimate|`, and the mean ratio (ignored when NaN) at least the allowed 1.0.
pub fn is_high(mw: &MannWhitney, mean_ratio: f64) -> bool {
    mw.lower > TOLERANCE * mw.estimate.abs() && (mean_ratio.is_nan() || mean_ratio >= 1.0)
}

/// The summary score of a judgement from its metrics' classifications (one group).
pub fn score(classes: &[Classification]) -> f64 {
    let nodata = classes
        .iter()
        .filter(|c| **c == Classification::Nodata)
        .count();
    if nodata as f64 / classes.len() as f64 * 100.0 >= 50.0 {
        return 0.0;
    }
    let pass = classes
        .iter()
        .filter(|c| **c == Classification::Pass)
        .count();
    let high = classes
        .iter()
        .filter(|c| **c == Classification::High)
        .count();
    let total = pass + high;
    if total == 0 {
        return 100.0;
    }
    100.0 * pass as f64 / total as f64
}

/// The analysis setup.
#[derive(Debug, Clone)]
pub struct Config {
    /// Canary weight per step, percent; passing the last step promotes.
    pub steps: Vec<u32>,
    /// Judgements per step (lifetime / interval).
    pub judgements: u64,
    /// Seconds between judgements.
    pub interval: u64,
    /// Seconds per metric sample.
    pub sample_step: u64,
    /// Pass threshold.
    pub pass: f64,
    /// Marginal threshold.
    pub marginal: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            steps: vec![10, 25, 50],
            judgements: 3,
            interval: 600,
            sample_step: 60,
            pass: 75.0,
            marginal: 50.0,
        }
    }
}

/// The analysis of a rollout, step by step.
pub struct Kayenta {
    cfg: Config,
    step: usize,
    step_started: u64,
    judged: u64,
    noise: Box<dyn FnMut() -> f64>,
    /// The scores of the judgements so far, for the tests.
    pub scores: Vec<f64>,
}

impl Kayenta {
    /// A rollout at its first step at t = 0; `noise` draws standard normals.
    pub fn new(cfg: Config, noise: Box<dyn FnMut() -> f64>) -> Self {
        Kayenta {
            cfg,
            step: 0,
            step_started: 0,
            judged: 0,
            noise,
            scores: Vec::new(),
        }
    }

    /// The samples of both metrics on both sides over (from, to]: (canary errors, baseline
    /// errors, canary slow, baseline slow), NaN where the source was down or no requests came.
    fn samples(&self, from: u64, to: u64, h: &History) -> [Vec<f64>; 4] {
        let mut out: [Vec<f64>; 4] = Default::default();
        let mut t = from;
        while t + self.cfg.sample_step <= to {
            let end = t + self.cfg.sample_step;
            let (c, b) = (h.canary(t, end), h.baseline(t, end));
            let up = h.readable(end);
            let ratio = |num: f64, den: f64| if up { num / den } else { f64::NAN };
            out[0].push(ratio(c.errors, c.requests));
            out[1].push(ratio(b.errors, b.requests));
            out[2].push(ratio(c.slow, c.requests));
            out[3].push(ratio(b.slow, b.requests));
            t = end;
        }
        out
    }
}

impl Judge for Kayenta {
    fn weight(&self) -> u32 {
        self.cfg.steps.get(self.step).copied().unwrap_or(100)
    }

    fn tick(&mut self, t: u64, h: &History) -> Decision {
        let due = self.step_started + (self.judged + 1) * self.cfg.interval;
        // A judgement runs once its window has passed and the source answers (the stage retries).
        if t < due || !h.readable(t) {
            return Decision::Continue;
        }
        let [ce, be, cs, bs] = self.samples(self.step_started, due, h);
        let errors = classify(&ce, &be, &mut *self.noise);
        let slow = classify(&cs, &bs, &mut *self.noise);
        let s = score(&[errors, slow]);
        self.scores.push(s);
        self.judged += 1;
        if s <= self.cfg.marginal {
            return Decision::Rollback("canary score not above the marginal threshold");
        }
        if self.judged < self.cfg.judgements {
            return Decision::Continue;
        }
        if s < self.cfg.pass {
            return Decision::Rollback("final canary score below the pass threshold");
        }
        self.step += 1;
        self.step_started = t;
        self.judged = 0;
        if self.step >= self.cfg.steps.len() {
            Decision::Promote
        } else {
            Decision::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcanary_controller::verdict::Tally;

    fn no_noise() -> f64 {
        0.0
    }

    #[test]
    fn kayenta_mann_whitney_matches_r_on_a_known_sample() {
        // R: wilcox.test(c(10,20,30,40), c(1,2,3,4), conf.int = TRUE, exact = FALSE)
        // gives the 95 % interval (6, 39) and the estimate 22.5 (the values Kayenta's own
        // test suite checks its port against).
        let z95 = 1.959_963_984_540_054;
        let mw = mann_whitney(&[10.0, 20.0, 30.0, 40.0], &[1.0, 2.0, 3.0, 4.0], z95).unwrap();
        assert!((mw.lower - 6.0).abs() < 1e-6, "{mw:?}");
        assert!((mw.upper - 39.0).abs() < 1e-6, "{mw:?}");
        assert!((mw.estimate - 22.5).abs() < 1e-6, "{mw:?}");
    }

    #[test]
    fn kayenta_estimate_of_a_pure_shift_is_the_shift() {
        // By hand: x − 10 equals y, so the rank sums balance (dz = 0) exactly at mu = 10;
        // the Hodges–Lehmann estimate (median of the 25 pairwise differences) is 10 too.
        let y = [1.0, 2.0, 3.0, 4.0, 5.0];
        let x: Vec<f64> = y.iter().map(|v| v + 10.0).collect();
        assert_eq!(wilcoxon_diff(10.0, 0.0, &x, &y), Some(0.0));
        let mw = mann_whitney(&x, &y, Z_98).unwrap();
        assert!((mw.estimate - 10.0).abs() < 1e-6, "{mw:?}");
        assert!(
            mw.lower > 0.0 && mw.lower < 10.0 && mw.upper > 10.0,
            "{mw:?}"
        );
    }

    #[test]
    fn kayenta_classifier_rules() {
        let mut n = no_noise;
        // NaN samples are removed; nothing left on a side → Nodata.
        assert_eq!(
            classify(&[f64::NAN, f64::NAN], &[0.1], &mut n),
            Classification::Nodata
        );
        // Identical samples → Pass; one distinct value over both sides → Pass.
        assert_eq!(
            classify(&[0.1, 0.2], &[0.2, 0.1], &mut n),
            Classification::Pass
        );
        assert_eq!(
            classify(&[0.0, 0.0, 0.0], &[0.0, 0.0], &mut n),
            Classification::Pass
        );
        // A clear increase over ten samples each → High; a decrease is no failure for
        // `direction: increase`.
        let base: Vec<f64> = (0..10).map(|i| 0.01 + 0.001 * f64::from(i)).collect();
        let canary: Vec<f64> = base.iter().map(|v| v * 5.0).collect();
        assert_eq!(classify(&canary, &base, &mut n), Classification::High);
        assert_eq!(classify(&base, &canary, &mut n), Classification::Pass);
        // Both sides constant: without noise every value ties at the search's ends (σ = 0,
        // Kayenta throws) → Error; with the noise Kayenta adds (sd = value × 1e-5, none for a
        // value of 0) the canary's 0.5 against 0 is High.
        assert_eq!(
            classify(&[0.5, 0.5], &[0.0, 0.0], &mut n),
            Classification::Error
        );
        let mut k = 0.0;
        let mut alternating = move || {
            k += 1.0;
            if k % 2.0 == 0.0 {
                1.0
            } else {
                -1.0
            }
        };
        assert_eq!(
            classify(&[0.5, 0.5], &[0.0, 0.0], &mut alternating),
            Classification::High
        );
    }

    #[test]
    fn kayenta_high_needs_the_lower_bound_above_a_quarter_of_the_estimate_and_a_ratio_of_1() {
        let mw = |lower: f64, estimate: f64| MannWhitney {
            lower,
            upper: 2.0 * estimate,
            estimate,
        };
        assert!(!is_high(&mw(2.5, 10.0), 2.0), "2.5 is not above 0.25 × 10");
        assert!(is_high(&mw(2.6, 10.0), 2.0));
        assert!(!is_high(&mw(2.6, 10.0), 0.99), "mean ratio below 1");
        assert!(is_high(&mw(2.6, 10.0), f64::NAN), "NaN ratio ignored");
        assert!(!is_high(&mw(-0.1, 10.0), 2.0));
    }

    #[test]
    fn kayenta_scores_with_one_group_and_the_nodata_rule() {
        use Classification::*;
        assert_eq!(score(&[Pass, Pass]), 100.0);
        assert_eq!(score(&[Pass, High]), 50.0);
        assert_eq!(
            score(&[Pass, Nodata]),
            0.0,
            "50 % of the metrics Nodata → 0"
        );
        assert_eq!(
            score(&[Pass, Error]),
            100.0,
            "an Error metric is not counted"
        );
        assert_eq!(
            score(&[Error, Error]),
            100.0,
            "nothing counted → the group counts as 100"
        );
    }

    /// Runs a Kayenta analysis where each 10th second brings the errors `errors(t)` of
    /// 200 canary and 1,800 baseline requests.
    fn run(
        canary_errors: impl Fn(u64) -> f64,
        baseline_errors: impl Fn(u64) -> f64,
    ) -> (Option<(u64, Decision)>, Vec<f64>) {
        let mut k = Kayenta::new(Config::default(), Box::new(no_noise));
        let mut h = History::default();
        for t in 0..=7200u64 {
            if t > 0 {
                let tally = |requests: f64, errors: f64| Tally {
                    requests,
                    errors: if t % 10 == 0 { errors } else { 0.0 },
                    slow: 0.0,
                };
                h.push(
                    tally(20.0, canary_errors(t)),
                    tally(180.0, baseline_errors(t)),
                    true,
                );
            }
            let d = k.tick(t, &h);
            if d != Decision::Continue {
                return (Some((t, d)), k.scores);
            }
        }
        (None, k.scores)
    }

    #[test]
    fn kayenta_a_high_metric_fails_the_first_judgement_and_a_healthy_canary_passes_three_steps() {
        // The rate moves by minute, 1.0 / 1.1 / 1.2 × its level, the two sides out of phase.
        let level = |t: u64, phase: u64| 1.0 + 0.1 * ((t / 60 + phase) % 3) as f64;
        // Canary 5 % errors, baseline 1 %: High at the first judgement (score 50 ≤ marginal).
        let (end, scores) = run(|t| 10.0 * level(t, 0), |t| 18.0 * level(t, 1));
        assert_eq!(
            end,
            Some((
                600,
                Decision::Rollback("canary score not above the marginal threshold")
            ))
        );
        assert_eq!(scores, vec![50.0]);
        // Both 1 %: nine judgements of 100, promoted after the third 30-minute step.
        let (end, scores) = run(|t| 2.0 * level(t, 0), |t| 18.0 * level(t, 1));
        assert_eq!(end, Some((5400, Decision::Promote)));
        assert_eq!(scores, vec![100.0; 9]);
    }
}
