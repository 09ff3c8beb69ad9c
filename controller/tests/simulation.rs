//! Simulation: the pure verdict engine over seeded synthetic rollouts.
//!
//! Each rollout starts at t = 0 with zero counters, then every simulated second draws the
//! requests, 5xx and slow requests of the canary and of the baseline from the current weight,
//! traffic and rates (Poisson / binomial counts), adds them to cumulative counters as Envoy
//! would, and calls `judge` once — the controller's 1 s interval. A rollout ends at its first
//! rollback, at completion, or at the horizon.
//!
//! Classes (all seeded, so every run is reproducible):
//! - healthy: canary = baseline, error rate 0.1 %–1 % and slow share 0.2 %–1 % at t = 0,
//!   both drifting up to 3× either way (a slow sine per run), traffic 50–1000 rps drifting ±30 %;
//!   a fifth of the runs also see an Envoy restart (counters reset) and a fifth a 10–40 s
//!   metrics outage;
//! - errors ×10: the canary's error rate is 10× the (drifting) baseline's;
//! - errors ≥ 50 %: at exactly 20 canary requests per second (400 rps at the 5 % step);
//! - latency: the canary's slow share is 10× the baseline's, errors equal.
//!
//! Run with `cargo test -p meshcanary --test simulation -- --nocapture` to see the figures.
//! `MESHCANARY_SIM_RUNS=N` changes the number of runs per class (default 1000).
//!
//! `peer_table` runs meshcanary's engine (with its spec's default 10 s interval and 60 s
//! step minimum) beside our renderings of Flagger, Argo Rollouts and Kayenta's NetflixACAJudge
//! (`peers/`, each with its own tool's schedule) on the same worlds and the same random
//! streams: healthy canaries (drift, low traffic, counter resets, outages, and a quiet
//! baseline), 2×/5×/10× error and 3×/10× latency regressions, and broken canaries. It prints
//! one table; `MESHCANARY_PEER_RUNS=N` runs per scenario (default 20; `make simulate-peers`).

use meshcanary_controller::verdict::{
    judge, Analysis, Counters, Observation, RollbackReason, Spec, State, Verdict,
};
use std::time::{Duration, Instant};

/// xoshiro256** seeded through splitmix64: small, fast, and good enough for simulation.
/// Cloned to give every judge of the peer table the same random stream.
#[derive(Clone)]
struct Rng {
    s: [u64; 4],
    spare_normal: Option<f64>,
}

impl Rng {
    fn seeded(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
            spare_normal: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo.ln() + (hi.ln() - lo.ln()) * self.unit()).exp()
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Standard normal (Box–Muller, both values used).
    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        let u1 = 1.0 - self.unit(); // (0, 1]: ln is finite
        let u2 = self.unit();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        self.spare_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// Poisson(mean): exact inversion below 30, normal approximation above (where the
    /// difference is far below what the verdict can notice).
    fn poisson(&mut self, mean: f64) -> f64 {
        if mean <= 0.0 {
            return 0.0;
        }
        if mean >= 30.0 {
            return (mean + mean.sqrt() * self.normal()).round().max(0.0);
        }
        let u = self.unit();
        let mut k = 0.0;
        let mut p = (-mean).exp();
        let mut cdf = p;
        while u > cdf && k < 1000.0 {
            k += 1.0;
            p *= mean / k;
            cdf += p;
        }
        k
    }

    /// Binomial(n, p): exact inversion while n·min(p, 1−p) < 30, normal approximation above.
    fn binomial(&mut self, n: f64, p: f64) -> f64 {
        if n <= 0.0 || p <= 0.0 {
            return 0.0;
        }
        if p >= 1.0 {
            return n;
        }
        if p > 0.5 {
            return n - self.binomial(n, 1.0 - p);
        }
        let q = 1.0 - p;
        let mean = n * p;
        if mean >= 30.0 {
            return (mean + (mean * q).sqrt() * self.normal())
                .round()
                .clamp(0.0, n);
        }
        let u = self.unit();
        let ratio = p / q;
        let mut k = 0.0;
        let mut pmf = (n * q.ln()).exp();
        let mut cdf = pmf;
        while u > cdf && k < n {
            pmf *= (n - k) / (k + 1.0) * ratio;
            k += 1.0;
            cdf += pmf;
        }
        k
    }
}

/// A slow multiplicative drift: exp(a·sin(2πt/T + φ)), between e^−a and e^a.
#[derive(Clone, Copy)]
struct Drift {
    amplitude: f64,
    period: f64,
    phase: f64,
}

impl Drift {
    fn random(rng: &mut Rng, max_factor: f64) -> Self {
        Drift {
            amplitude: rng.uniform(0.0, max_factor.ln()),
            period: rng.uniform(120.0, 1200.0),
            phase: rng.uniform(0.0, std::f64::consts::TAU),
        }
    }

    fn at(&self, t: f64) -> f64 {
        (self.amplitude * (std::f64::consts::TAU * t / self.period + self.phase).sin()).exp()
    }
}

/// One synthetic rollout's world.
#[derive(Clone, Copy)]
struct World {
    /// Mean total requests per second (before drift).
    rps: f64,
    /// Traffic drift (±30 %).
    traffic: Drift,
    /// Baseline error rate at t = 0, and its drift.
    base_error: f64,
    error_drift: Drift,
    /// Baseline slow share at t = 0, and its drift.
    base_slow: f64,
    slow_drift: Drift,
    /// The canary's error rate: `factor` × the baseline's, or a fixed rate.
    canary_error: CanaryRate,
    /// The canary's slow share, same.
    canary_slow: CanaryRate,
    /// At this second, one Envoy restarts: every counter starts over.
    reset_at: Option<u64>,
    /// The metric source cannot be read during [start, start + len).
    outage: Option<(u64, u64)>,
}

#[derive(Clone, Copy)]
enum CanaryRate {
    Factor(f64),
    Fixed(f64),
}

impl CanaryRate {
    fn of(self, baseline: f64) -> f64 {
        match self {
            CanaryRate::Factor(f) => (baseline * f).min(1.0),
            CanaryRate::Fixed(p) => p,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// Rolled back at this second, this long after the canary's first request.
    RolledBack {
        at: u64,
        after_first_request: u64,
        reason: RollbackReason,
    },
    /// Promoted to 100 % at this second; the canary's highest true error rate until then.
    Completed { at: u64, max_canary_error: f64 },
    /// Neither within the horizon.
    Undecided,
}

const HORIZON: u64 = 3600;

fn spec() -> Spec {
    Spec {
        steps: vec![5, 25, 50, 100],
        step_min_duration: Duration::from_secs(10),
        analysis: Analysis::default(),
    }
}

/// One second of traffic at canary weight `weight` (0–1): the canary's and the baseline's
/// requests, 5xx and slow requests, and the canary's true error rate in that second.
fn draw_second(world: &World, t: u64, weight: f64, rng: &mut Rng) -> (Counters, Counters, f64) {
    let mid = t as f64 - 0.5;
    let rps = world.rps * world.traffic.at(mid);
    let p_b = (world.base_error * world.error_drift.at(mid)).min(1.0);
    let q_b = (world.base_slow * world.slow_drift.at(mid)).min(1.0);
    let p_c = world.canary_error.of(p_b);
    let q_c = world.canary_slow.of(q_b);
    let n_c = rng.poisson(rps * weight);
    let n_b = rng.poisson(rps * (1.0 - weight));
    let canary = Counters {
        requests: n_c,
        errors: rng.binomial(n_c, p_c),
        slow: rng.binomial(n_c, q_c),
    };
    let baseline = Counters {
        requests: n_b,
        errors: rng.binomial(n_b, p_b),
        slow: rng.binomial(n_b, q_b),
    };
    (canary, baseline, p_c)
}

fn simulate(spec: &Spec, world: &World, rng: &mut Rng) -> Outcome {
    let zero = Counters::new(0, 0, 0);
    let (mut canary, mut baseline) = (zero, zero);
    let mut state = State::start(Duration::ZERO);
    // The controller's first reading, before the canary takes traffic.
    state = judge(
        spec,
        &state,
        &Observation {
            now: Duration::ZERO,
            canary: Some(canary),
            baseline: Some(baseline),
        },
    )
    .0;
    let mut first_request: Option<u64> = None;
    let mut max_canary_error: f64 = 0.0;
    for t in 1..=HORIZON {
        let weight = f64::from(state.current_weight(&spec.steps)) / 100.0;
        let (interval_c, interval_b, p_c) = draw_second(world, t, weight, rng);
        max_canary_error = max_canary_error.max(p_c);
        let n_c = interval_c.requests;
        if n_c > 0.0 && first_request.is_none() {
            // The first request came somewhere in (t − 1, t]: count from t − 1, the worst case.
            first_request = Some(t - 1);
        }
        if world.reset_at == Some(t) {
            // Restarted during this interval: only what came after the restart is counted.
            canary = interval_c;
            baseline = interval_b;
        } else {
            for (cum, add) in [(&mut canary, interval_c), (&mut baseline, interval_b)] {
                cum.requests += add.requests;
                cum.errors += add.errors;
                cum.slow += add.slow;
            }
        }
        let readable = world
            .outage
            .is_none_or(|(start, len)| t < start || t >= start + len);
        let obs = Observation {
            now: Duration::from_secs(t),
            canary: readable.then_some(canary),
            baseline: readable.then_some(baseline),
        };
        let (next, verdict) = judge(spec, &state, &obs);
        state = next;
        match verdict {
            Verdict::Rollback { reason, .. } => {
                return Outcome::RolledBack {
                    at: t,
                    after_first_request: t - first_request.unwrap_or(0),
                    reason,
                }
            }
            Verdict::Complete { .. } => {
                return Outcome::Completed {
                    at: t,
                    max_canary_error,
                }
            }
            Verdict::Hold { .. } | Verdict::Promote { .. } => {}
        }
    }
    Outcome::Undecided
}

/// The healthy world: canary = baseline.
fn healthy_world(rng: &mut Rng) -> World {
    let reset = rng.chance(0.2);
    let outage = rng.chance(0.2);
    World {
        rps: rng.log_uniform(50.0, 1000.0),
        traffic: Drift::random(rng, 1.3),
        base_error: rng.log_uniform(0.001, 0.01),
        error_drift: Drift::random(rng, 3.0),
        base_slow: rng.log_uniform(0.002, 0.01),
        slow_drift: Drift::random(rng, 3.0),
        canary_error: CanaryRate::Factor(1.0),
        canary_slow: CanaryRate::Factor(1.0),
        reset_at: reset.then(|| rng.uniform(5.0, 300.0) as u64),
        outage: outage.then(|| {
            (
                rng.uniform(5.0, 300.0) as u64,
                rng.uniform(10.0, 40.0) as u64,
            )
        }),
    }
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn distribution(label: &str, mut xs: Vec<u64>) -> String {
    xs.sort_unstable();
    format!(
        "{label}: n={} p50={} s p90={} s p99={} s max={} s",
        xs.len(),
        percentile(&xs, 0.5),
        percentile(&xs, 0.9),
        percentile(&xs, 0.99),
        xs.last().copied().unwrap_or(0),
    )
}

fn runs() -> u64 {
    std::env::var("MESHCANARY_SIM_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

struct ClassResult {
    worlds: Vec<World>,
    outcomes: Vec<Outcome>,
}

fn run_class(seed: u64, n: u64, make: impl Fn(&mut Rng) -> World) -> ClassResult {
    let spec = spec();
    let mut worlds = Vec::new();
    let mut outcomes = Vec::new();
    for i in 0..n {
        let mut rng = Rng::seeded(seed.wrapping_mul(1_000_003).wrapping_add(i));
        let world = make(&mut rng);
        outcomes.push(simulate(&spec, &world, &mut rng));
        worlds.push(world);
    }
    ClassResult { worlds, outcomes }
}

fn report_regression(name: &str, r: &ClassResult) -> Vec<u64> {
    let mut times = Vec::new();
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    let (mut missed, mut undecided) = (0, 0);
    for o in &r.outcomes {
        match o {
            Outcome::RolledBack {
                after_first_request,
                reason,
                ..
            } => {
                times.push(*after_first_request);
                *reasons.entry(format!("{reason:?}")).or_default() += 1;
            }
            Outcome::Completed { .. } => missed += 1,
            Outcome::Undecided => undecided += 1,
        }
    }
    println!(
        "[{name}] runs={} caught={} promoted-anyway={} undecided-at-{}s={} by {:?}",
        r.outcomes.len(),
        times.len(),
        missed,
        HORIZON,
        undecided,
        reasons
    );
    println!(
        "  {}",
        distribution("detection after first canary request", times.clone())
    );
    times
}

#[test]
fn simulated_rollouts() {
    let started = Instant::now();
    let n = runs();
    // The false-rollback claim is the one that needs the most runs.
    let n_healthy = 5 * n;

    // Healthy: canary = baseline.
    let healthy = run_class(1, n_healthy, healthy_world);
    let mut false_rollbacks = Vec::new();
    let mut promoted = Vec::new();
    let mut undecided = 0;
    for (w, o) in healthy.worlds.iter().zip(&healthy.outcomes) {
        match o {
            Outcome::RolledBack { at, reason, .. } => false_rollbacks.push(format!(
                "{reason:?} at {at} s (rps {:.0}, errors {:.2}%, slow {:.2}%, reset {:?}, outage {:?})",
                w.rps,
                w.base_error * 100.0,
                w.base_slow * 100.0,
                w.reset_at,
                w.outage
            )),
            Outcome::Completed { at, .. } => promoted.push(*at),
            Outcome::Undecided => undecided += 1,
        }
    }
    println!(
        "[healthy] runs={} false-rollbacks={} ({:.3}%, bound α = 0.1%) {:?} promoted={} ({:.2}%) undecided-at-{}s={}",
        n_healthy,
        false_rollbacks.len(),
        100.0 * false_rollbacks.len() as f64 / n_healthy as f64,
        false_rollbacks,
        promoted.len(),
        100.0 * promoted.len() as f64 / n_healthy as f64,
        HORIZON,
        undecided
    );
    println!("  {}", distribution("time to 100%", promoted.clone()));

    // Errors ×10 (the baseline 0.1–1 %, drifting; the canary 10× whatever the baseline is).
    let tenfold = run_class(2, n, |rng| World {
        canary_error: CanaryRate::Factor(10.0),
        reset_at: None,
        outage: None,
        ..healthy_world(rng)
    });
    let tenfold_times = report_regression("errors x10, 50-1000 rps", &tenfold);
    // A 10× regression may only get through while the canary stays under max_error_rate
    // (promotion on the absolute bound); list those.
    let mut within_limit = Vec::new();
    for (w, o) in tenfold.worlds.iter().zip(&tenfold.outcomes) {
        if let Outcome::Completed {
            at,
            max_canary_error,
        } = o
        {
            println!(
                "  promoted: rps={:.0} baseline error at t=0 {:.3}% canary error at most {:.3}% completed at {at} s",
                w.rps,
                w.base_error * 100.0,
                max_canary_error * 100.0
            );
            within_limit.push(*max_canary_error);
        }
    }
    for (label, lo, hi) in [
        ("  50-200 rps", 50.0, 200.0),
        (" 200-1000 rps", 200.0, 1000.1),
    ] {
        let times: Vec<u64> = tenfold
            .worlds
            .iter()
            .zip(&tenfold.outcomes)
            .filter(|(w, _)| w.rps >= lo && w.rps < hi)
            .filter_map(|(_, o)| match o {
                Outcome::RolledBack {
                    after_first_request,
                    ..
                } => Some(*after_first_request),
                _ => None,
            })
            .collect();
        println!("  {}", distribution(label, times));
    }

    // ≥ 50 % errors at exactly 20 canary requests per second.
    let broken = run_class(3, n, |rng| World {
        rps: 400.0,
        traffic: Drift {
            amplitude: 0.0,
            period: 1.0,
            phase: 0.0,
        },
        canary_error: CanaryRate::Fixed(rng.uniform(0.5, 1.0)),
        reset_at: None,
        outage: None,
        ..healthy_world(rng)
    });
    let broken_times = report_regression("errors >=50% at 20 canary rps", &broken);

    // Latency: the canary's slow share 10× the baseline's; errors equal.
    let slow = run_class(4, n, |rng| World {
        canary_slow: CanaryRate::Factor(10.0),
        reset_at: None,
        outage: None,
        ..healthy_world(rng)
    });
    let slow_times = report_regression("slow share x10, 50-1000 rps", &slow);

    let elapsed = started.elapsed();
    println!(
        "simulated {} rollouts in {:.1} s",
        n_healthy + 3 * n,
        elapsed.as_secs_f64()
    );

    // False rollbacks: at most 0.1 % of healthy runs.
    assert!(
        false_rollbacks.len() as f64 <= 0.001 * n_healthy as f64,
        "false rollbacks: {false_rollbacks:?}"
    );
    // Healthy canaries get promoted within the horizon: all that were not rolled back.
    assert_eq!(undecided, 0, "healthy rollouts left undecided");
    // Every 10× error regression is caught at 50–1000 rps (≥ 2.5 canary rps at the 5 % step)
    // unless the canary stayed under max_error_rate all along (then the absolute bound may
    // promote it, as the spec allows) — and even that only rarely.
    let limit = spec().analysis.max_error_rate;
    assert!(
        within_limit.iter().all(|&p| p < limit),
        "a 10x regression above max_error_rate was promoted: {within_limit:?}"
    );
    assert!(
        within_limit.len() as f64 <= 0.005 * n as f64,
        "too many 10x regressions promoted: {}",
        within_limit.len()
    );
    assert_eq!(
        (tenfold_times.len() + within_limit.len()) as u64,
        n,
        "10x error regressions left undecided"
    );
    // Every 10× latency regression is caught.
    assert_eq!(slow_times.len() as u64, n, "10x latency regressions missed");
    // ≥ 50 % errors at 20 canary rps: rolled back within 5 s of the first canary request.
    assert_eq!(broken_times.len() as u64, n);
    assert!(
        broken_times.iter().all(|&t| t <= 5),
        "max {:?}",
        broken_times.iter().max()
    );
}

// ---------------------------------------------------------------------------------------------
// The peer table: meshcanary's engine beside Flagger, Argo Rollouts and Kayenta's judge
// (controller/tests/peers/), each with its own tool's schedule, on the same worlds and the same
// random streams.
// ---------------------------------------------------------------------------------------------

mod peers;

use meshcanary_controller::verdict::Tally;
use peers::{Decision, History, Judge};

/// meshcanary's engine with the spec's documented defaults (`interval: 10s`,
/// `step_min_duration: 60s`, the default `analysis`) and the README's steps, reading
/// cumulative counters as the Envoy admin source does (a restart resets them).
struct Meshcanary {
    spec: Spec,
    interval: u64,
    state: State,
    reset_at: Option<u64>,
}

impl Meshcanary {
    fn new(reset_at: Option<u64>) -> Self {
        Meshcanary {
            spec: Spec {
                steps: vec![5, 25, 50, 100],
                step_min_duration: Duration::from_secs(60),
                analysis: Analysis::default(),
            },
            interval: 10,
            state: State::start(Duration::ZERO),
            reset_at,
        }
    }
}

impl Judge for Meshcanary {
    fn weight(&self) -> u32 {
        self.state.current_weight(&self.spec.steps)
    }

    fn tick(&mut self, t: u64, h: &History) -> Decision {
        if !t.is_multiple_of(self.interval) {
            return Decision::Continue;
        }
        // Counters since the last restart (at second r they hold only second r's counts).
        let since = match self.reset_at {
            Some(r) if r <= t => r - 1,
            _ => 0,
        };
        let counters = |x: Tally| Counters {
            requests: x.requests,
            errors: x.errors,
            slow: x.slow,
        };
        let readable = h.readable(t);
        let obs = Observation {
            now: Duration::from_secs(t),
            canary: readable.then(|| counters(h.canary(since, t))),
            baseline: readable.then(|| counters(h.baseline(since, t))),
        };
        let (next, verdict) = judge(&self.spec, &self.state, &obs);
        self.state = next;
        match verdict {
            Verdict::Rollback { reason, .. } => Decision::Rollback(match reason {
                RollbackReason::HardGuard => "hard guard",
                RollbackReason::ErrorRegression => "error regression",
                RollbackReason::SlowRegression => "latency regression",
                RollbackReason::NoData { .. } => "no data",
                RollbackReason::Aborted => "aborted",
                // The simulation has no webhooks; the engine never says this itself.
                RollbackReason::Webhook => "webhook",
            }),
            Verdict::Complete { .. } => Decision::Promote,
            Verdict::Hold { .. } | Verdict::Promote { .. } => Decision::Continue,
        }
    }
}

/// How long a peer-table rollout may run: past Kayenta's 90 minutes of healthy steps.
const PEER_HORIZON: u64 = 7200;

#[derive(Debug, Clone, Copy, PartialEq)]
enum PeerOutcome {
    RolledBack {
        after_first_request: u64,
        reason: &'static str,
    },
    Promoted {
        at: u64,
    },
    Undecided,
}

/// Drives one judge through one world, second by second, with its own weights.
fn drive(world: &World, judge: &mut dyn Judge, rng: &mut Rng) -> PeerOutcome {
    let mut h = History::default();
    let decided = |d: Decision, t: u64, h: &History| match d {
        Decision::Continue => None,
        Decision::Rollback(reason) => Some(PeerOutcome::RolledBack {
            // The first request came somewhere in (first − 1, first]: count from first − 1.
            after_first_request: h.first_canary_request().map_or(0, |first| t + 1 - first),
            reason,
        }),
        Decision::Promote => Some(PeerOutcome::Promoted { at: t }),
    };
    if let Some(o) = decided(judge.tick(0, &h), 0, &h) {
        return o;
    }
    for t in 1..=PEER_HORIZON {
        let weight = f64::from(judge.weight()) / 100.0;
        let (c, b, _) = draw_second(world, t, weight, rng);
        let readable = world
            .outage
            .is_none_or(|(start, len)| t < start || t >= start + len);
        let tally = |x: Counters| Tally {
            requests: x.requests,
            errors: x.errors,
            slow: x.slow,
        };
        h.push(tally(c), tally(b), readable);
        if let Some(o) = decided(judge.tick(t, &h), t, &h) {
            return o;
        }
    }
    PeerOutcome::Undecided
}

const JUDGES: [&str; 4] = ["meshcanary", "Flagger", "Argo Rollouts", "Kayenta"];

fn make_judge(name: &str, world: &World, seed: u64) -> Box<dyn Judge> {
    match name {
        "Flagger" => Box::new(peers::flagger::Flagger::new(Default::default())),
        "Argo Rollouts" => Box::new(peers::argo::Argo::new(Default::default())),
        "Kayenta" => {
            // Kayenta's own noise for constant samples: a stream of its own, so that it does
            // not shift the traffic's.
            let mut rng = Rng::seeded(seed ^ 0x006B_6179_656E_7461);
            Box::new(peers::kayenta::Kayenta::new(
                Default::default(),
                Box::new(move || rng.normal()),
            ))
        }
        _ => Box::new(Meshcanary::new(world.reset_at)),
    }
}

/// One scenario: a name, whether its canary is healthy, and its worlds.
struct Scenario {
    name: &'static str,
    healthy: bool,
    seed: u64,
    make: fn(&mut Rng) -> World,
}

fn regressed(rng: &mut Rng, errors: f64, slow: f64) -> World {
    World {
        canary_error: CanaryRate::Factor(errors),
        canary_slow: CanaryRate::Factor(slow),
        reset_at: None,
        outage: None,
        ..healthy_world(rng)
    }
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "healthy: 50-1000 rps, drift, resets, outages",
            healthy: true,
            seed: 11,
            make: healthy_world,
        },
        Scenario {
            name: "healthy: 10-200 rps (1-20 canary rps at 10 %)",
            healthy: true,
            seed: 12,
            make: |rng| World {
                rps: rng.log_uniform(10.0, 200.0),
                ..healthy_world(rng)
            },
        },
        Scenario {
            name: "healthy: quiet baseline (0.05-0.3 %, drift <= 1.5x)",
            healthy: true,
            seed: 13,
            make: |rng| World {
                rps: rng.log_uniform(50.0, 1000.0),
                traffic: Drift::random(rng, 1.3),
                base_error: rng.log_uniform(0.0005, 0.003),
                error_drift: Drift::random(rng, 1.5),
                base_slow: rng.log_uniform(0.0005, 0.003),
                slow_drift: Drift::random(rng, 1.5),
                canary_error: CanaryRate::Factor(1.0),
                canary_slow: CanaryRate::Factor(1.0),
                reset_at: None,
                outage: None,
            },
        },
        Scenario {
            name: "errors x2",
            healthy: false,
            seed: 21,
            make: |rng| regressed(rng, 2.0, 1.0),
        },
        Scenario {
            name: "errors x5",
            healthy: false,
            seed: 22,
            make: |rng| regressed(rng, 5.0, 1.0),
        },
        Scenario {
            name: "errors x10",
            healthy: false,
            seed: 23,
            make: |rng| regressed(rng, 10.0, 1.0),
        },
        Scenario {
            name: "slow share x3",
            healthy: false,
            seed: 24,
            make: |rng| regressed(rng, 1.0, 3.0),
        },
        Scenario {
            name: "slow share x10",
            healthy: false,
            seed: 25,
            make: |rng| regressed(rng, 1.0, 10.0),
        },
        Scenario {
            name: "broken: 50-100 % errors, 400 rps",
            healthy: false,
            seed: 26,
            make: |rng| World {
                rps: 400.0,
                traffic: Drift {
                    amplitude: 0.0,
                    period: 1.0,
                    phase: 0.0,
                },
                canary_error: CanaryRate::Fixed(rng.uniform(0.5, 1.0)),
                reset_at: None,
                outage: None,
                ..healthy_world(rng)
            },
        },
    ]
}

/// Every outcome of one judge in one scenario.
struct Cell {
    outcomes: Vec<PeerOutcome>,
}

impl Cell {
    fn rolled_back(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .outcomes
            .iter()
            .filter_map(|o| match o {
                PeerOutcome::RolledBack {
                    after_first_request,
                    ..
                } => Some(*after_first_request),
                _ => None,
            })
            .collect();
        v.sort_unstable();
        v
    }

    fn promoted(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .outcomes
            .iter()
            .filter_map(|o| match o {
                PeerOutcome::Promoted { at } => Some(*at),
                _ => None,
            })
            .collect();
        v.sort_unstable();
        v
    }

    fn undecided(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| **o == PeerOutcome::Undecided)
            .count()
    }

    fn reasons(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut m = std::collections::BTreeMap::new();
        for o in &self.outcomes {
            if let PeerOutcome::RolledBack { reason, .. } = o {
                *m.entry(*reason).or_default() += 1;
            }
        }
        m
    }
}

fn percent(k: usize, n: usize) -> String {
    format!("{:.1} %", 100.0 * k as f64 / n.max(1) as f64)
}

fn times(sorted: &[u64]) -> String {
    if sorted.is_empty() {
        return "-".to_string();
    }
    format!(
        "{} / {} / {}",
        percentile(sorted, 0.5),
        percentile(sorted, 0.9),
        percentile(sorted, 0.99)
    )
}

fn peer_runs() -> u64 {
    std::env::var("MESHCANARY_PEER_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[test]
fn peer_table() {
    let started = Instant::now();
    let n = peer_runs();
    let scenarios = scenarios();
    // cells[scenario][judge], and each scenario's worlds
    let mut cells: Vec<Vec<Cell>> = Vec::new();
    let mut worlds: Vec<Vec<World>> = Vec::new();
    for sc in &scenarios {
        let mut these = Vec::new();
        let mut row: Vec<Cell> = JUDGES
            .iter()
            .map(|_| Cell {
                outcomes: Vec::new(),
            })
            .collect();
        for i in 0..n {
            let seed = sc.seed.wrapping_mul(1_000_003).wrapping_add(i);
            let mut rng = Rng::seeded(seed);
            let world = (sc.make)(&mut rng);
            for (j, name) in JUDGES.iter().enumerate() {
                // The same world and the same random stream for every judge.
                let mut stream = rng.clone();
                let mut judge = make_judge(name, &world, seed);
                row[j]
                    .outcomes
                    .push(drive(&world, judge.as_mut(), &mut stream));
            }
            these.push(world);
        }
        cells.push(row);
        worlds.push(these);
    }

    println!(
        "\npeer table: {n} runs per scenario, the same worlds and random streams for every judge, \
         horizon {PEER_HORIZON} s; times in seconds"
    );
    println!("\n| scenario | judge | rolled back | promoted | undecided | detection p50 / p90 / p99 | promotion p50 / p90 / p99 | rollbacks by reason |");
    println!("|---|---|---|---|---|---|---|---|");
    for (sc, row) in scenarios.iter().zip(&cells) {
        for (name, cell) in JUDGES.iter().zip(row) {
            let rb = cell.rolled_back();
            let pr = cell.promoted();
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {:?} |",
                sc.name,
                name,
                percent(rb.len(), cell.outcomes.len()),
                percent(pr.len(), cell.outcomes.len()),
                cell.undecided(),
                if sc.healthy {
                    "-".to_string()
                } else {
                    times(&rb)
                },
                times(&pr),
                cell.reasons()
            );
        }
    }

    // The summary: one row per judge.
    let healthy: Vec<usize> = (0..scenarios.len())
        .filter(|&s| scenarios[s].healthy)
        .collect();
    let regressions: Vec<usize> = (0..scenarios.len())
        .filter(|&s| !scenarios[s].healthy)
        .collect();
    print!("\n| judge | false rollbacks (healthy) | time to promote a healthy canary p50 / p90 / p99 |");
    for &s in &regressions {
        print!(" missed: {} |", scenarios[s].name);
    }
    println!(" detection, errors x10: p50 / p90 / p99 | detection, broken: p50 / p90 / p99 |");
    println!("|{}", "---|".repeat(5 + regressions.len()));
    let find = |name: &str| {
        scenarios
            .iter()
            .position(|s| s.name.starts_with(name))
            .unwrap_or(0)
    };
    let (tenfold, broken) = (find("errors x10"), find("broken"));
    let mut summary = Vec::new();
    for (j, name) in JUDGES.iter().enumerate() {
        let runs: usize = healthy.iter().map(|&s| cells[s][j].outcomes.len()).sum();
        let false_rb: usize = healthy
            .iter()
            .map(|&s| cells[s][j].rolled_back().len())
            .sum();
        let mut promote: Vec<u64> = healthy
            .iter()
            .flat_map(|&s| cells[s][j].promoted())
            .collect();
        promote.sort_unstable();
        print!(
            "| {name} | {} ({false_rb} of {runs}) | {} |",
            percent(false_rb, runs),
            times(&promote)
        );
        let mut missed = Vec::new();
        for &s in &regressions {
            let c = &cells[s][j];
            let m = c.promoted().len();
            missed.push(m);
            print!(" {} |", percent(m, c.outcomes.len()));
        }
        println!(
            " {} | {} |",
            times(&cells[tenfold][j].rolled_back()),
            times(&cells[broken][j].rolled_back())
        );
        summary.push((false_rb, runs, missed));
    }
    // Of the 2× error regressions promoted, how many kept the canary's true error rate under
    // 1 % (meshcanary's max_error_rate, Flagger's and Argo's 99 %) until the promotion.
    let twofold = find("errors x2");
    print!("\nerrors x2 promoted while the canary's true error rate stayed under 1 %:");
    for (j, name) in JUDGES.iter().enumerate() {
        let (mut under, mut all) = (0, 0);
        for (w, o) in worlds[twofold].iter().zip(&cells[twofold][j].outcomes) {
            if let PeerOutcome::Promoted { at } = o {
                all += 1;
                let peak = (1..=*at)
                    .map(|t| {
                        let p_b = w.base_error * w.error_drift.at(t as f64 - 0.5);
                        w.canary_error.of(p_b.min(1.0))
                    })
                    .fold(0.0, f64::max);
                if peak < 0.01 {
                    under += 1;
                }
            }
        }
        print!(" {name} {under} of {all};");
    }
    println!();
    println!(
        "\nmissed = promoted although regressed; a run neither rolled back nor promoted within \
         {PEER_HORIZON} s is undecided (detail table). {} rollouts simulated in {:.1} s",
        n as usize * scenarios.len() * JUDGES.len(),
        started.elapsed().as_secs_f64()
    );

    // meshcanary: the false-rollback bound. α = 0.1 % bounds the relative tests' false alarms
    // per rollout; allow twice its expectation plus one, for sampling noise on small runs.
    let (false_rb, runs, ref missed) = summary[0];
    assert!(
        false_rb as f64 <= 2.0 * 0.001 * runs as f64 + 1.0,
        "meshcanary: {false_rb} false rollbacks in {runs} healthy runs"
    );
    // Every healthy meshcanary rollout ends within the horizon.
    for &s in &healthy {
        assert_eq!(
            cells[s][0].undecided(),
            0,
            "meshcanary undecided in {}",
            scenarios[s].name
        );
    }
    // meshcanary misses at most 1 % of the 10× error regressions (promotion through the
    // absolute bound while the canary stays under max_error_rate), and no broken canary.
    let pos = |s: usize| regressions.iter().position(|&r| r == s).unwrap_or(0);
    assert!(
        missed[pos(tenfold)] as f64 <= (0.01 * n as f64).ceil(),
        "meshcanary missed {} of {n} 10x error regressions",
        missed[pos(tenfold)]
    );
    // Every judge rolls back every broken canary; meshcanary's hard guard does it at its first
    // evaluation with canary traffic (interval 10 s).
    for (j, name) in JUDGES.iter().enumerate() {
        assert_eq!(
            cells[broken][j].rolled_back().len() as u64,
            n,
            "{name} let a broken canary through"
        );
    }
    assert!(
        cells[broken][0].rolled_back().iter().all(|&t| t <= 20),
        "meshcanary: broken canary detection {:?}",
        cells[broken][0].rolled_back().last()
    );
    // The peers' schedules as their tools define them: a healthy quiet canary is promoted by
    // Flagger after 5 analyses (10 → 50 %, then the analysis at 50 %), by Argo after its four
    // 10-minute steps, by Kayenta after three 30-minute steps.
    let quiet = find("healthy: quiet");
    for (j, earliest) in [(1, 300), (2, 2400), (3, 5400)] {
        let p = cells[quiet][j].promoted();
        assert!(
            p.first().is_none_or(|&t| t >= earliest),
            "{} promoted before its schedule allows: {p:?}",
            JUDGES[j]
        );
    }
}
