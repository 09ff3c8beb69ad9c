//! The two statistics the verdict rests on, as plain functions of counts.
//!
//! - [`wilson`]: the Wilson score interval of a binomial rate. Used for the hard guard (its lower
//!   bound against `error_ceiling`) and for positive evidence (its upper bound against
//!   `max_error_rate` / `max_slow_rate`). Chosen over the normal ("Wald") interval because it stays
//!   inside [0, 1] and is honest at zero or few events, which is exactly where a canary starts.
//! - [`llr_increment`]: one interval's increment of the log-likelihood ratio of the
//!   anytime-valid sequential test that conditions on events (errors, or slow requests).
//!
//! Both are total functions: counts that are negative, not finite, or inconsistent give the
//! "no information" answer (the widest interval, a zero increment), never NaN and never a panic.

use serde::{Deserialize, Serialize};

/// A two-sided confidence interval of a rate, both ends in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bounds {
    /// The lower end of the interval.
    pub lower: f64,
    /// The upper end of the interval.
    pub upper: f64,
}

impl Bounds {
    /// The interval that says nothing: [0, 1]. What no data proves.
    pub const UNKNOWN: Bounds = Bounds {
        lower: 0.0,
        upper: 1.0,
    };
}

/// The Wilson score interval for `events` out of `trials` at normal quantile `z`
/// (z = 3.09: one-sided 0.1 %; z = 2.326: one-sided 1 %).
///
/// `events` is clamped to `[0, trials]`: a source read a moment apart can report slightly more
/// errors than requests, and clamping keeps that from turning into a rate above 1.
/// With no trials, or any input not finite, the answer is [`Bounds::UNKNOWN`].
pub fn wilson(events: f64, trials: f64, z: f64) -> Bounds {
    if !(trials.is_finite() && events.is_finite() && z.is_finite()) || trials <= 0.0 || z < 0.0 {
        return Bounds::UNKNOWN;
    }
    let k = events.clamp(0.0, trials);
    let n = trials;
    let p = k / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    // Rounding can push an end a hair outside [0, 1] (at p = 0 the lower end is 0 exactly
    // in real arithmetic); clamp so that "0 errors" never reads as a tiny positive rate.
    Bounds {
        lower: (center - half).clamp(0.0, 1.0),
        upper: (center + half).clamp(0.0, 1.0),
    }
}

/// One interval's increment ΔΛ of the log-likelihood ratio "canary's event rate is
/// `relative_risk` × the baseline's" (H1) against "equal" (H0), conditioned on the events seen.
///
/// Given the interval's canary request share `share` = s, each event is the canary's with
/// probability ρ = s·r / (s·r + 1 − s), so with ρ1 from r1 = `relative_risk` and ρ0 = s:
///
/// ΔΛ = e_c·ln(ρ1/s) + e_b·ln((1−ρ1)/(1−s)) = e_c·ln r1 − (e_c + e_b)·ln(1 + s·(r1 − 1)).
///
/// The second form is what is computed: it has no division by s or 1 − s, so s = 0 and s = 1
/// are ordinary points (and give 0 whenever the counts are consistent: no canary events without
/// canary requests, no baseline events without baseline requests). The baseline's own rate
/// cancels out, which is why a drifting baseline does not move the test.
///
/// Non-finite or negative inputs, a share of 0 or 1 (or outside), or r1 ≤ 0 give 0 (no evidence).
pub fn llr_increment(
    canary_events: f64,
    baseline_events: f64,
    share: f64,
    relative_risk: f64,
) -> f64 {
    let finite = canary_events.is_finite()
        && baseline_events.is_finite()
        && share.is_finite()
        && relative_risk.is_finite();
    // s = 0 or 1: one side had no requests, nothing to compare, no evidence either way
    // (exactly 0, rather than the formula's rounding residue).
    if !finite
        || canary_events < 0.0
        || baseline_events < 0.0
        || share <= 0.0
        || share >= 1.0
        || relative_risk <= 0.0
    {
        return 0.0;
    }
    let delta = canary_events * relative_risk.ln()
        - (canary_events + baseline_events) * (share * (relative_risk - 1.0)).ln_1p();
    if delta.is_finite() {
        delta
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn wilson_table() {
        // (events, trials, z, lower, upper) — reference values computed by hand from the formula.
        let table: &[(f64, f64, f64, f64, f64)] = &[
            // The field notes' example: 10 failures in 10 requests bound the rate above 51 %.
            (10.0, 10.0, 3.09, 0.5116, 1.0),
            // Half of 20: the lower end just clears a 20 % ceiling.
            (10.0, 20.0, 3.09, 0.2157, 0.7843),
            // Zero events: the lower end is 0 and the upper end is z²/(n + z²).
            (0.0, 300.0, 3.09, 0.0, 9.5481 / 309.5481),
            (0.0, 1000.0, 2.326, 0.0, 5.410276 / 1005.410276),
        ];
        for &(k, n, z, lo, hi) in table {
            let b = wilson(k, n, z);
            assert!(
                close(b.lower, lo, 1e-4),
                "{k}/{n} lower {} != {lo}",
                b.lower
            );
            assert!(
                close(b.upper, hi, 1e-4),
                "{k}/{n} upper {} != {hi}",
                b.upper
            );
        }
    }

    #[test]
    fn wilson_degenerate_inputs_say_nothing() {
        for (k, n) in [
            (0.0, 0.0),
            (1.0, 0.0),
            (f64::NAN, 10.0),
            (1.0, f64::NAN),
            (1.0, f64::INFINITY),
            (1.0, -5.0),
        ] {
            assert_eq!(wilson(k, n, 3.09), Bounds::UNKNOWN, "{k}/{n}");
        }
        // More events than trials is clamped, not a rate above 1.
        let b = wilson(12.0, 10.0, 3.09);
        assert!(b.upper <= 1.0 && b.lower > 0.5);
        // Negative events clamp to 0.
        assert_eq!(wilson(-3.0, 10.0, 3.09).lower, 0.0);
    }

    #[test]
    fn llr_matches_the_field_notes_form() {
        // ΔΛ = e_c·ln(ρ1/s) + e_b·ln((1−ρ1)/(1−s)), computed the long way.
        for &(ec, eb, s, r) in &[
            (1.0, 0.0, 0.05, 3.0),
            (0.0, 1.0, 0.05, 3.0),
            (3.0, 17.0, 0.25, 3.0),
            (5.0, 5.0, 0.5, 10.0),
        ] {
            let rho: f64 = s * r / (s * r + 1.0 - s);
            let long = ec * (rho / s).ln() + eb * ((1.0 - rho) / (1.0 - s)).ln();
            assert!(close(llr_increment(ec, eb, s, r), long, 1e-12));
        }
    }

    #[test]
    fn llr_edges_are_zero_or_finite() {
        // No events: no evidence.
        assert_eq!(llr_increment(0.0, 0.0, 0.05, 3.0), 0.0);
        // s = 0 with only baseline events, s = 1 with only canary events: no evidence.
        assert_eq!(llr_increment(0.0, 7.0, 0.0, 3.0), 0.0);
        assert_eq!(llr_increment(7.0, 0.0, 1.0, 3.0), 0.0);
        // Garbage in: zero out.
        for (ec, eb, s, r) in [
            (f64::NAN, 0.0, 0.1, 3.0),
            (1.0, f64::INFINITY, 0.1, 3.0),
            (1.0, 0.0, f64::NAN, 3.0),
            (1.0, 0.0, 1.5, 3.0),
            (1.0, 0.0, -0.1, 3.0),
            (-1.0, 0.0, 0.1, 3.0),
            (1.0, 0.0, 0.1, 0.0),
        ] {
            assert_eq!(llr_increment(ec, eb, s, r), 0.0, "{ec} {eb} {s} {r}");
        }
        // A canary error at a small share is strong evidence, a baseline error weak counter-evidence.
        assert!(llr_increment(1.0, 0.0, 0.05, 3.0) > 0.9);
        assert!(llr_increment(0.0, 1.0, 0.05, 3.0) < 0.0);
    }

    #[test]
    fn llr_is_a_martingale_increment_under_equal_rates() {
        // Under H0 the canary's share of e events is Binomial(e, s), and E[exp ΔΛ] must be 1:
        // that is what makes the test valid however often it is looked at (Ville's inequality).
        for &(e, s) in &[(1u32, 0.05f64), (3, 0.25), (10, 0.5), (4, 0.9)] {
            let mut expectation = 0.0;
            for ec in 0..=e {
                let binom = (0..ec).fold(1.0, |acc, i| acc * f64::from(e - i) / f64::from(i + 1));
                let p = binom * s.powi(ec as i32) * (1.0 - s).powi((e - ec) as i32);
                let delta = llr_increment(f64::from(ec), f64::from(e - ec), s, 3.0);
                expectation += p * delta.exp();
            }
            assert!(close(expectation, 1.0, 1e-12), "e={e} s={s}: {expectation}");
        }
    }
}
