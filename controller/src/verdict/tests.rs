//! Pure tables for each rule of the verdict engine.

use super::*;

const S: fn(u64) -> Duration = Duration::from_secs;

fn spec() -> Spec {
    Spec {
        steps: vec![5, 25, 50, 100],
        step_min_duration: S(10),
        analysis: Analysis::default(),
    }
}

fn c(requests: u64, errors: u64, slow: u64) -> Option<Counters> {
    Some(Counters::new(requests, errors, slow))
}

fn obs(t: u64, canary: Option<Counters>, baseline: Option<Counters>) -> Observation {
    Observation {
        now: S(t),
        canary,
        baseline,
    }
}

/// Cumulative counters growing by fixed amounts per second, read every second.
struct Feed {
    t: u64,
    canary: Counters,
    baseline: Counters,
}

impl Feed {
    fn new() -> Self {
        Feed {
            t: 0,
            canary: Counters::new(0, 0, 0),
            baseline: Counters::new(0, 0, 0),
        }
    }

    fn tick(&mut self, canary: (u64, u64, u64), baseline: (u64, u64, u64)) -> Observation {
        self.t += 1;
        let add = |c: &mut Counters, (n, e, s): (u64, u64, u64)| {
            c.requests += n as f64;
            c.errors += e as f64;
            c.slow += s as f64;
        };
        add(&mut self.canary, canary);
        add(&mut self.baseline, baseline);
        self.now()
    }

    fn now(&self) -> Observation {
        obs(self.t, Some(self.canary), Some(self.baseline))
    }
}

/// A state past its first reading at t = 0 (zero counters).
fn started(spec: &Spec) -> State {
    let (st, v) = judge(spec, &State::start(S(0)), &obs(0, c(0, 0, 0), c(0, 0, 0)));
    assert!(matches!(
        v,
        Verdict::Hold {
            reason: HoldReason::NoData {
                cause: NoDataCause::FirstReading,
                ..
            },
            ..
        }
    ));
    st
}

fn is_rollback(v: &Verdict, want: RollbackReason) -> bool {
    matches!(v, Verdict::Rollback { reason, .. } if *reason == want)
}

fn is_hold(v: &Verdict) -> bool {
    matches!(v, Verdict::Hold { .. })
}

#[test]
fn first_reading_only_sets_the_reference() {
    let spec = spec();
    // Pre-existing counts (an earlier canary) are not this rollout's evidence.
    let (st, v) = judge(
        &spec,
        &State::start(S(0)),
        &obs(0, c(5000, 4000, 0), c(9000, 0, 0)),
    );
    assert!(is_hold(&v), "{v}");
    assert_eq!(st.canary, Tally::default());
    assert_eq!(st.errors, Evidence::default());
    assert_eq!(st.canary_ref, c(5000, 4000, 0));
}

#[test]
fn hard_guard_table() {
    // (canary requests, errors in the first second, rolled back by the guard?)
    // The baseline has the same error rate, so that only the guard can act.
    let table = [
        (20, 10, true), // ≥ 50 % at 20 rps: caught in the first second (lower bound 21.6 %)
        (20, 20, true),
        (20, 4, false), // 20 %: not clearly above the ceiling
        (3, 3, true),   // three of three is already enough
        (2, 2, false),  // two of two is not (lower bound 17 %)
        (10, 10, true),
        (1000, 150, false),
        (1000, 260, true),
    ];
    let spec = spec();
    for (n, e, want) in table {
        let st = started(&spec);
        let (st2, v) = judge(&spec, &st, &obs(1, c(n, e, 0), c(19 * n, 19 * e, 0)));
        if want {
            assert!(is_rollback(&v, RollbackReason::HardGuard), "{e}/{n}: {v}");
            assert_eq!(st2.current_weight(&spec.steps), 0);
        } else {
            assert!(is_hold(&v), "{e}/{n}: {v}");
            assert_eq!(st2.current_weight(&spec.steps), 5);
        }
    }
}

#[test]
fn hard_guard_needs_no_baseline() {
    let spec = spec();
    let st = started(&spec);
    let (_, v) = judge(&spec, &st, &obs(1, c(20, 12, 0), None));
    assert!(is_rollback(&v, RollbackReason::HardGuard), "{v}");
}

#[test]
fn hard_guard_window_catches_late_breakage() {
    let mut spec = spec();
    spec.step_min_duration = S(100_000); // stay in the step
    let mut st = started(&spec);
    let mut feed = Feed::new();
    for _ in 0..600 {
        let (s, v) = judge(&spec, &st, &feed.tick((20, 0, 0), (380, 0, 0)));
        assert!(is_hold(&v), "{v}");
        st = s;
    }
    // Everything breaks (a shared dependency): every answer a 5xx on both sides, so the
    // relative test sees nothing. 12 000 good requests dilute the step's rate; the 10 s
    // window does not: 60 errors in its 200 requests after 3 s bound the rate above 21 %.
    for second in 1..=5 {
        let (s, v) = judge(&spec, &st, &feed.tick((20, 20, 0), (380, 380, 0)));
        st = s;
        if is_rollback(&v, RollbackReason::HardGuard) {
            assert_eq!(second, 3);
            return;
        }
        assert!(is_hold(&v), "{v}");
    }
    panic!("late breakage not caught");
}

#[test]
fn relative_error_regression_rolls_back() {
    let mut spec = spec();
    spec.step_min_duration = S(100_000);
    let mut st = started(&spec);
    let mut feed = Feed::new();
    // Canary 2 %, baseline ~0.1 %: far below the hard guard's ceiling.
    for second in 1..=60 {
        let (s, v) = judge(&spec, &st, &feed.tick((50, 1, 0), (950, 1, 0)));
        st = s;
        if let Verdict::Rollback { reason, numbers } = &v {
            assert_eq!(*reason, RollbackReason::ErrorRegression);
            assert!(numbers.errors_llr.llr >= numbers.rollback_at);
            // Each second adds ln 3 − 2·ln 1.1 ≈ 0.908; ln(2000) ≈ 7.6 → 9 s.
            assert_eq!(second, 9);
            return;
        }
    }
    panic!("regression not caught");
}

#[test]
fn relative_slow_regression_rolls_back() {
    let mut spec = spec();
    spec.step_min_duration = S(100_000);
    let mut st = started(&spec);
    let mut feed = Feed::new();
    for _ in 1..=60 {
        let (s, v) = judge(&spec, &st, &feed.tick((50, 0, 1), (950, 0, 1)));
        st = s;
        if !is_hold(&v) {
            assert!(is_rollback(&v, RollbackReason::SlowRegression), "{v}");
            return;
        }
    }
    panic!("latency regression not caught");
}

#[test]
fn baseline_errors_drift_does_not_move_the_test() {
    // Canary and baseline share one rate that jumps 10× mid-way: Λ goes down, not up.
    let mut spec = spec();
    spec.step_min_duration = S(100_000);
    let mut st = started(&spec);
    let mut feed = Feed::new();
    for second in 0..200 {
        let (ce, be) = if second < 100 { (0, 1) } else { (1, 19) };
        let (s, v) = judge(&spec, &st, &feed.tick((100, ce, 0), (1900, be, 0)));
        assert!(is_hold(&v), "{v}");
        st = s;
    }
    assert!(st.errors.llr < 0.0, "{}", st.errors.llr);
}

#[test]
fn equal_rates_at_the_limit_promote_through_the_accept_boundary() {
    // 1 % errors on both sides = max_error_rate: the Wilson bound can never pass,
    // the relative test's accept boundary does.
    let spec = spec();
    let mut st = started(&spec);
    let mut feed = Feed::new();
    let mut promoted_at = None;
    for second in 1..=400 {
        let (s, v) = judge(&spec, &st, &feed.tick((100, 1, 0), (1900, 19, 0)));
        st = s;
        if let Verdict::Promote {
            from_step,
            to_step,
            numbers,
        } = &v
        {
            assert_eq!((*from_step, *to_step), (0, 1));
            assert!(numbers.errors_llr.step_llr <= numbers.accept_at);
            assert!(numbers.error_bounds.upper > spec.analysis.max_error_rate);
            promoted_at = Some(second);
            break;
        }
        assert!(is_hold(&v), "{v}");
    }
    let at = promoted_at.unwrap_or(0);
    // 20 events/s, −ln β / (per-event drift at s = 5 %) ≈ 3.0 / 0.0404 ≈ 74 events ≈ 4 s,
    // but the step also needs 10 s.
    assert_eq!(at, 10);
    assert_eq!(st.current_weight(&spec.steps), 25);
    assert_eq!(st.canary, Tally::default());
    assert_eq!(st.errors.step_llr, 0.0);
    assert!(st.errors.llr < 0.0, "the rollout-wide Λ carries over");
}

#[test]
fn promotion_needs_requests_time_and_evidence() {
    // Per second: canary requests; seconds run; canary errors per second. Baseline 0.5 %.
    // (canary rps, seconds, canary errors each second, expect promotion)
    let table = [
        (100, 9, 0, false),  // 900 requests, no errors, but only 9 s
        (100, 10, 0, true),  // 1000 requests, 10 s, 0 errors: Wilson upper 0.54 % ≤ 1 %
        (25, 11, 0, false),  // 10 s reached, but 275 < 300 requests
        (25, 12, 0, false),  // 300 requests, 0 errors: upper 1.77 % > 1 %; few events for the test
        (25, 22, 0, true),   // 550 requests: upper 0.98 %
        (100, 60, 5, false), // canary 5 % vs baseline 0.5 %: never (and soon rolled back)
    ];
    let spec = spec();
    for (rps, seconds, errs, want) in table {
        let mut st = started(&spec);
        let mut feed = Feed::new();
        let mut promoted = false;
        for _ in 0..seconds {
            let (s, v) = judge(&spec, &st, &feed.tick((rps, errs, 0), (2000, 10, 0)));
            st = s;
            if matches!(v, Verdict::Promote { .. }) {
                promoted = true;
                break;
            }
            if !is_hold(&v) {
                break;
            }
        }
        assert_eq!(promoted, want, "{rps} rps × {seconds} s, {errs} err/s");
    }
}

#[test]
fn absolute_bound_does_not_outrun_a_relative_regression() {
    // Canary 0.2 % (under max_error_rate 1 %), baseline 0.074 %: about 2.7× worse. By 10 s the
    // Wilson upper bound is well under 1 %, but Λ ≈ 0.34/s already leans towards a regression,
    // so the absolute path is vetoed, and the relative test rolls back later.
    let spec = spec();
    let mut st = started(&spec);
    let mut feed = Feed::new();
    for second in 1..=40 {
        let (s, v) = judge(&spec, &st, &feed.tick((500, 1, 0), (9500, 7, 0)));
        st = s;
        match &v {
            Verdict::Hold {
                reason: HoldReason::Gathering { errors_proven, .. },
                numbers,
            } if second >= 10 => {
                assert!(numbers.error_bounds.upper <= spec.analysis.max_error_rate);
                assert!(numbers.errors_llr.llr >= -numbers.accept_at);
                assert!(!errors_proven);
            }
            Verdict::Hold { .. } => {}
            Verdict::Rollback {
                reason: RollbackReason::ErrorRegression,
                ..
            } => {
                assert!(second > 10, "{second}");
                return;
            }
            other => panic!("{second}: {other}"),
        }
    }
    panic!("not rolled back");
}

#[test]
fn slow_share_must_be_proven_too() {
    // Errors are fine everywhere (0); the slow share decides. Canary 100 rps, baseline 1900 rps.
    // (canary slow/s, baseline slow/s, what happens within 30 s)
    #[derive(Debug, PartialEq)]
    enum Want {
        PromoteAt(u64),
        SlowRollback,
        HoldUnproven,
    }
    let table = [
        // 3 % on both sides, above max_slow_rate: the Wilson bound cannot pass, the accept
        // boundary does (60 events/s), so the step's 10 s decide.
        (3, 57, Want::PromoteAt(10)),
        // 3 % on the canary, none on the baseline: a clear regression.
        (3, 0, Want::SlowRollback),
        // 1 % vs 0.53 %: neither proven good nor clearly regressed yet.
        (1, 10, Want::HoldUnproven),
    ];
    let spec = spec();
    for (cs, bs, want) in table {
        let mut st = started(&spec);
        let mut feed = Feed::new();
        let mut got = Want::HoldUnproven;
        for second in 1..=30 {
            let (s, v) = judge(&spec, &st, &feed.tick((100, 0, cs), (1900, 0, bs)));
            st = s;
            match v {
                Verdict::Promote { .. } => {
                    got = Want::PromoteAt(second);
                    break;
                }
                Verdict::Rollback {
                    reason: RollbackReason::SlowRegression,
                    ..
                } => {
                    got = Want::SlowRollback;
                    break;
                }
                Verdict::Hold {
                    reason:
                        HoldReason::Gathering {
                            errors_proven,
                            slow_proven,
                            ..
                        },
                    ..
                } if second == 30 => {
                    assert!(errors_proven && !slow_proven);
                }
                Verdict::Hold { .. } => {}
                other => panic!("{other}"),
            }
        }
        assert_eq!(got, want, "{cs} vs {bs}");
    }
}

#[test]
fn unreadable_or_nan_is_never_a_pass() {
    let spec = spec();
    let mut st = started(&spec);
    let mut feed = Feed::new();
    // Plenty of good evidence, but the step is short of time.
    for _ in 0..9 {
        st = judge(&spec, &st, &feed.tick((1000, 0, 0), (1000, 0, 0))).0;
    }
    let nan = Counters {
        requests: f64::NAN,
        errors: 0.0,
        slow: 0.0,
    };
    let inf = Counters {
        requests: 1e6,
        errors: f64::INFINITY,
        slow: 0.0,
    };
    let neg = Counters {
        requests: -1.0,
        errors: 0.0,
        slow: 0.0,
    };
    let bad = [
        (None, Some(feed.baseline)),
        (Some(feed.canary), None),
        (None, None),
        (Some(nan), Some(feed.baseline)),
        (Some(feed.canary), Some(inf)),
        (Some(neg), Some(feed.baseline)),
    ];
    for (canary, baseline) in bad {
        let (s, v) = judge(&spec, &st, &obs(20, canary, baseline));
        match &v {
            Verdict::Hold {
                reason:
                    HoldReason::NoData {
                        cause: NoDataCause::Unreadable { .. },
                        timed_out: false,
                    },
                ..
            } => {}
            other => panic!("{canary:?} {baseline:?}: {other}"),
        }
        // Nothing non-finite leaks into the state.
        assert!(
            serde_json::from_str::<State>(&serde_json::to_string(&s).unwrap_or_default()).is_ok()
        );
    }
}

#[test]
fn no_data_timeout_table() {
    // (on_no_data, seconds without data, expect rollback, expect timed_out hold)
    let table = [
        (OnNoData::Rollback, 59, false, false),
        (OnNoData::Rollback, 60, true, false),
        (OnNoData::Hold, 60, false, true),
        (OnNoData::Hold, 600, false, true),
    ];
    for (policy, quiet, want_rollback, want_timed_out) in table {
        let mut spec = spec();
        spec.analysis.on_no_data = policy;
        let st = started(&spec);
        // The source cannot be read at all (also no first reading matters: t = 0 was it).
        let (_, v) = judge(&spec, &st, &obs(quiet, None, None));
        match v {
            Verdict::Rollback {
                reason: RollbackReason::NoData { .. },
                ..
            } => assert!(want_rollback),
            Verdict::Hold {
                reason: HoldReason::NoData { timed_out, .. },
                ..
            } => {
                assert!(!want_rollback, "{policy:?} {quiet}");
                assert_eq!(timed_out, want_timed_out);
            }
            other => panic!("{other}"),
        }
    }
}

#[test]
fn no_traffic_never_promotes_and_times_out() {
    let spec = spec();
    let mut st = started(&spec);
    for t in 1..=60 {
        let (s, v) = judge(&spec, &st, &obs(t, c(0, 0, 0), c(0, 0, 0)));
        st = s;
        if t < 60 {
            assert!(
                matches!(
                    v,
                    Verdict::Hold {
                        reason: HoldReason::NoData {
                            cause: NoDataCause::NoCanaryTraffic,
                            ..
                        },
                        ..
                    }
                ),
                "{v}"
            );
        } else {
            assert!(matches!(
                v,
                Verdict::Rollback {
                    reason: RollbackReason::NoData { .. },
                    ..
                }
            ));
        }
    }
}

#[test]
fn baseline_traffic_alone_is_no_data() {
    let spec = spec();
    let mut st = started(&spec);
    let mut feed = Feed::new();
    for _ in 0..30 {
        let (s, v) = judge(&spec, &st, &feed.tick((0, 0, 0), (1000, 10, 0)));
        st = s;
        assert!(
            matches!(
                v,
                Verdict::Hold {
                    reason: HoldReason::NoData {
                        cause: NoDataCause::NoCanaryTraffic,
                        ..
                    },
                    ..
                }
            ),
            "{v}"
        );
    }
    assert_eq!(st.errors.llr, 0.0);
}

#[test]
fn canary_traffic_alone_promotes_only_on_absolute_bounds() {
    let spec = spec();
    // (canary errors per second of 100, expect promotion within 30 s)
    for (errs, want) in [(0, true), (1, false)] {
        let mut st = started(&spec);
        let mut feed = Feed::new();
        let mut promoted = false;
        for _ in 0..30 {
            let (s, v) = judge(&spec, &st, &feed.tick((100, errs, 0), (0, 0, 0)));
            st = s;
            assert_eq!(
                st.errors.llr, 0.0,
                "no baseline: the relative test learns nothing"
            );
            if matches!(v, Verdict::Promote { .. }) {
                promoted = true;
                break;
            }
            assert!(is_hold(&v), "{v}");
        }
        assert_eq!(promoted, want, "{errs} err/s");
    }
}

#[test]
fn counter_reset_skips_the_interval_without_a_verdict() {
    let spec = spec();
    let mut st = started(&spec);
    let mut feed = Feed::new();
    for _ in 0..5 {
        st = judge(&spec, &st, &feed.tick((20, 0, 0), (380, 1, 0))).0;
    }
    let before = st.clone();
    // An Envoy restarted: both sides' counters start over (with the odd error right away).
    let cases = [
        (c(3, 1, 0), c(50, 0, 0)),         // both down
        (c(3, 1, 0), Some(feed.baseline)), // only the canary down
        (
            Some(Counters {
                errors: feed.canary.errors,
                slow: feed.canary.slow,
                requests: feed.canary.requests - 1.0,
            }),
            Some(feed.baseline),
        ), // one counter down
    ];
    for (canary, baseline) in cases {
        let (s, v) = judge(&spec, &before, &obs(6, canary, baseline));
        assert!(
            matches!(
                v,
                Verdict::Hold {
                    reason: HoldReason::NoData {
                        cause: NoDataCause::CounterReset,
                        ..
                    },
                    ..
                }
            ),
            "{v}"
        );
        assert_eq!(s.errors, before.errors);
        assert_eq!(s.canary, before.canary);
        // And counting resumes from the new reference.
        let next_c = canary.map(|x| Counters {
            requests: x.requests + 20.0,
            ..x
        });
        let next_b = baseline.map(|x| Counters {
            requests: x.requests + 380.0,
            ..x
        });
        let (s2, v2) = judge(&spec, &s, &obs(7, next_c, next_b));
        assert!(is_hold(&v2), "{v2}");
        assert_eq!(s2.canary.requests, before.canary.requests + 20.0);
    }
}

#[test]
fn errors_above_requests_are_clamped() {
    let spec = spec();
    let st = started(&spec);
    // Counters read a moment apart: more errors than requests in the interval.
    let (s, _) = judge(&spec, &st, &obs(1, c(10, 12, 11), c(100, 0, 0)));
    assert_eq!(s.canary.errors, 10.0);
    assert_eq!(s.canary.slow, 10.0);
}

#[test]
fn baseline_outage_keeps_the_shares_honest() {
    // The baseline cannot be read for 30 s while the canary can; when it returns, the relative
    // test sees both sides over the same 31 s, so equal rates stay equal (no jump in Λ).
    let mut spec = spec();
    spec.step_min_duration = S(100_000);
    let mut st = started(&spec);
    let mut feed = Feed::new();
    for _ in 0..30 {
        feed.tick((50, 1, 0), (950, 19, 0));
        let (s, v) = judge(&spec, &st, &obs(feed.t, Some(feed.canary), None));
        assert!(is_hold(&v), "{v}");
        st = s;
    }
    assert_eq!(st.canary.requests, 1500.0, "the canary is still counted");
    let (s, v) = judge(&spec, &st, &feed.tick((50, 1, 0), (950, 19, 0)));
    assert!(is_hold(&v), "{v}");
    assert!(s.errors.llr < 0.0, "{}", s.errors.llr);
    assert_eq!(s.baseline.requests, 950.0 * 31.0);
}

#[test]
fn completes_after_the_last_step_with_a_baseline() {
    let spec = spec();
    let mut st = started(&spec);
    st.step = 2; // at 50 %
    st.restart_step_clock(S(0));
    let mut feed = Feed::new();
    let mut done = None;
    for _ in 0..20 {
        let (s, v) = judge(&spec, &st, &feed.tick((1000, 0, 0), (1000, 0, 0)));
        st = s;
        if !is_hold(&v) {
            done = Some(v);
            break;
        }
    }
    assert!(matches!(done, Some(Verdict::Complete { from_step: 2, .. })));
    assert_eq!(st.phase, Phase::Promoted);
    assert_eq!(st.current_weight(&spec.steps), 100);
    // Idempotent: judged again, the same final verdict, whatever is observed.
    let (st2, again) = judge(&spec, &st, &obs(99, None, None));
    assert!(matches!(again, Verdict::Complete { from_step: 2, .. }));
    assert_eq!(again.target_weight(&spec.steps), Some(100));
    assert_eq!(st2.phase, Phase::Promoted);
    // A last step below 100 completes too.
    let short = Spec {
        steps: vec![10, 50],
        ..spec.clone()
    };
    assert!(short.completes_after(1) && !short.completes_after(0));
}

#[test]
fn finished_rollouts_repeat_their_verdict_and_abort_works() {
    let spec = spec();
    let mut st = started(&spec);
    st.abort();
    assert_eq!(st.current_weight(&spec.steps), 0);
    let (_, v) = judge(&spec, &st, &obs(1, c(100, 0, 0), c(100, 0, 0)));
    assert!(is_rollback(&v, RollbackReason::Aborted));
    assert_eq!(v.target_weight(&spec.steps), Some(0));

    let st = started(&spec);
    let (rolled, v) = judge(&spec, &st, &obs(1, c(20, 20, 0), c(380, 0, 0)));
    assert!(is_rollback(&v, RollbackReason::HardGuard));
    let mut again = rolled.clone();
    again.abort(); // no effect once finished
    let (_, v2) = judge(&spec, &again, &obs(2, c(20, 0, 0), c(400, 0, 0)));
    assert!(is_rollback(&v2, RollbackReason::HardGuard), "{v2}");
}

#[test]
fn spec_problems_name_every_field() {
    let bad = Spec {
        steps: vec![50, 25, 0, 100],
        step_min_duration: S(0),
        analysis: Analysis {
            error_ceiling: 0.0,
            max_error_rate: f64::NAN,
            latency_threshold_ms: 0,
            max_slow_rate: 1.0,
            min_requests: 0,
            alpha: 0.0,
            no_data_timeout: S(0),
            on_no_data: OnNoData::Hold,
            relative_risk: 1.0,
            accept_beta: 1.0,
            guard_z: -1.0,
            promote_z: f64::INFINITY,
            guard_window: S(0),
        },
    };
    let paths: Vec<String> = bad.problems().into_iter().map(|p| p.path).collect();
    for want in [
        "steps[1]",
        "steps[2]",
        "analysis.error_ceiling",
        "analysis.max_error_rate",
        "analysis.latency_threshold_ms",
        "analysis.max_slow_rate",
        "analysis.min_requests",
        "analysis.alpha",
        "analysis.no_data_timeout",
        "analysis.relative_risk",
        "analysis.accept_beta",
        "analysis.guard_z",
        "analysis.promote_z",
        "analysis.guard_window",
    ] {
        assert!(
            paths.iter().any(|p| p == want),
            "{want} missing in {paths:?}"
        );
    }
    assert!(spec().problems().is_empty());
    let only_full = Spec {
        steps: vec![100],
        ..spec()
    };
    assert_eq!(only_full.problems().len(), 1);
    let ceiling_below_max = Spec {
        analysis: Analysis {
            max_error_rate: 0.3,
            ..Analysis::default()
        },
        ..spec()
    };
    assert_eq!(
        ceiling_below_max.problems()[0].path,
        "analysis.max_error_rate"
    );
    // The engine never acts on an invalid spec.
    let st = State::start(S(0));
    let (_, v) = judge(&bad, &st, &obs(0, c(0, 0, 0), c(0, 0, 0)));
    assert!(matches!(
        v,
        Verdict::Hold {
            reason: HoldReason::InvalidSpec,
            ..
        }
    ));
}

#[test]
fn state_from_another_spec_holds() {
    let spec = spec();
    let mut st = started(&spec);
    st.step = 7;
    let (_, v) = judge(&spec, &st, &obs(1, c(20, 0, 0), c(380, 0, 0)));
    assert!(matches!(
        v,
        Verdict::Hold {
            reason: HoldReason::InvalidState,
            ..
        }
    ));
    assert_eq!(st.current_weight(&spec.steps), 0);
}

#[test]
fn state_round_trips_through_json_and_resumes_identically() {
    let spec = spec();
    let mut st = started(&spec);
    let mut feed = Feed::new();
    for _ in 0..7 {
        st = judge(&spec, &st, &feed.tick((30, 1, 2), (570, 3, 4))).0;
    }
    let json = serde_json::to_string(&st).unwrap();
    let back: State = serde_json::from_str(&json).unwrap();
    assert_eq!(back, st);
    // Resumed after a SIGKILL: the same next verdict as if it had never stopped.
    let next = feed.tick((30, 1, 2), (570, 3, 4));
    assert_eq!(judge(&spec, &st, &next), judge(&spec, &back, &next));
    // A finished phase round-trips too.
    let (rolled, _) = judge(&spec, &st, &obs(9, c(10_000, 9_000, 0), c(0, 0, 0)));
    let back: State = serde_json::from_str(&serde_json::to_string(&rolled).unwrap()).unwrap();
    assert_eq!(back.phase, rolled.phase);
}

#[test]
fn restart_step_clock_keeps_the_rollout_wide_evidence() {
    let spec = spec();
    let mut st = started(&spec);
    let mut feed = Feed::new();
    for _ in 0..5 {
        st = judge(&spec, &st, &feed.tick((50, 1, 0), (950, 1, 0))).0;
    }
    let llr = st.errors.llr;
    assert!(llr > 0.0);
    st.restart_step_clock(S(5));
    assert_eq!(st.errors.llr, llr);
    assert_eq!(st.errors.step_llr, 0.0);
    assert_eq!(st.canary, Tally::default());
    assert_eq!(st.step_started_at, S(5));
}

#[test]
fn verdict_line_carries_the_numbers() {
    let spec = spec();
    let st = started(&spec);
    let (_, v) = judge(&spec, &st, &obs(1, c(20, 10, 0), c(380, 1, 0)));
    let line = v.to_string();
    assert!(line.starts_with("ROLLBACK: hard guard"), "{line}");
    for needle in [
        "canary 20 req, 10 err (50.00%",
        "baseline 380 req, 1 err",
        "guard lower 21.6%",
    ] {
        assert!(line.contains(needle), "{needle} not in {line}");
    }
    assert!(!line.contains('\n'));
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["verdict"], "rollback");
    assert_eq!(json["reason"]["kind"], "hard_guard");
    assert_eq!(json["numbers"]["canary"]["errors"], 10.0);
}

#[test]
fn window_stays_bounded() {
    let mut spec = spec();
    spec.analysis.guard_window = S(1_000_000);
    spec.step_min_duration = S(1_000_000);
    let mut st = started(&spec);
    let mut feed = Feed::new();
    for _ in 0..(MAX_WINDOW_SLICES + 50) {
        st = judge(&spec, &st, &feed.tick((20, 0, 0), (380, 0, 0))).0;
    }
    assert_eq!(st.window.len(), MAX_WINDOW_SLICES);
}

#[test]
fn skip_step_passes_the_step_now_and_keeps_the_rollout_wide_evidence() {
    let spec = spec();
    let mut feed = Feed::new();
    let mut st = started(&spec);
    // 2 s into a 10 s step with 40 of 300 requests: the engine holds.
    for _ in 0..2 {
        let (next, v) = judge(&spec, &st, &feed.tick((20, 0, 0), (380, 0, 0)));
        assert!(is_hold(&v));
        st = next;
    }
    let llr = st.errors.llr;
    let (skipped, v) = skip_step(&spec, &st, S(3));
    assert!(
        matches!(
            v,
            Verdict::Promote {
                from_step: 0,
                to_step: 1,
                ..
            }
        ),
        "{v:?}"
    );
    assert_eq!(skipped.step, 1);
    assert_eq!(
        skipped.step_started_at,
        S(3),
        "the new step's clock starts now"
    );
    assert_eq!(
        skipped.canary.requests, 0.0,
        "the new step's tallies start empty"
    );
    assert_eq!(skipped.errors.llr, llr, "the rollout-wide Λ is kept");
    assert!(
        skipped.reason.contains("skipped by an operator"),
        "{}",
        skipped.reason
    );
    // Skipping the last judged step (next weight 100) completes the rollout.
    let mut last = skipped.clone();
    last.step = 2;
    let (done, v) = skip_step(&spec, &last, S(4));
    assert!(matches!(v, Verdict::Complete { from_step: 2, .. }), "{v:?}");
    assert_eq!(done.phase, Phase::Promoted);
    // A finished rollout stays as it is.
    let (same, v) = skip_step(&spec, &done, S(5));
    assert!(is_hold(&v));
    assert_eq!(same.phase, Phase::Promoted);
}
