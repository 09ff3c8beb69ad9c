//! `fleet-bench`: how many rollouts one controller process drives on one CPU core.
//!
//! Each measured size (100, 300, 1,000 rollouts by default) runs in a child process of
//! its own (so its CPU time and peak memory are its own), on a tokio current-thread
//! runtime (one core by construction). Every rollout is the real thing above the I/O: a
//! [`Fleet`] task running `rollout::run_release` — the verdict engine, the record saved
//! every tick, the progress events formatted — against an in-memory metric source and
//! config sink. The source makes synthetic cumulative counters from a traffic profile
//! and the weight the sink last applied: 8 in 10 canaries are healthy (promoted step by
//! step), 1 in 10 fails 30 % of its requests (rolled back), 1 in 10 has no traffic
//! (held). A finished rollout is started again as a new release, so the fleet stays at
//! its size. Starts are spread over the first interval, as real releases are. Each
//! rollout: steps 5 → 10 → 25 → 50 → 100 %, two intervals minimum per step, at least 100
//! canary requests per step, `--rps` requests/s per service (100 by default).
//!
//! Measured per size: each tick's lateness (when the source was read, against the
//! previous read plus one interval — the schedule the rollout loop's ticker keeps), its
//! drift (against the release's first read plus whole intervals), process CPU seconds (from
//! /proc/self/stat), CPU per tick and per rollout, and peak RSS (VmHWM). Printed as a
//! table; written as JSON (`--out`, default target/bench/controller.json).
//!
//! `cargo run --release -p meshcanary --example fleet-bench -- [--sizes 100,300,1000]
//! [--duration-s 150] [--interval-s 10] [--rps 100] [--aligned] [--out FILE]`; `--aligned`
//! starts every rollout at once (all tick in the same instant); `--smoke` is 50
//! rollouts, 0.5 s ticks, 400 requests/s each, 8 s (it checks that ticks were measured
//! and rollouts ended).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshcanary_controller::fleet::{EventHook, Fleet, FleetOptions, Launcher};
use meshcanary_controller::output::{Format, Output};
use meshcanary_controller::rollout;
use meshcanary_controller::sink::{ConfigSink, Record, SinkError};
use meshcanary_controller::source::{MetricSource, Query, Snapshot, SourceError, VariantCounts};
use meshcanary_controller::spec::RolloutSpec;
use serde_json::{json, Value};

const POLICY: &str = r#"{"name": "bench", "variants": ["stable", "canary"], "rules": [
  {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "bench",
   "weights": [{"variant": "canary", "weight": 0}, {"variant": "stable", "weight": 100}]}}]}"#;

/// What one run measures.
#[derive(Clone, Debug)]
struct Settings {
    sizes: Vec<usize>,
    duration: Duration,
    interval: Duration,
    rps: f64,
    out: PathBuf,
    smoke: bool,
    /// Start every rollout at once, so that all tick in the same instant (the worst case).
    aligned: bool,
}

fn settings() -> Result<Settings, String> {
    let mut s = Settings {
        sizes: vec![100, 300, 1000],
        duration: Duration::from_secs(150),
        interval: Duration::from_secs(10),
        rps: 100.0,
        out: PathBuf::from("target/bench/controller.json"),
        smoke: false,
        aligned: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--sizes" => {
                s.sizes = value()?
                    .split(',')
                    .map(|n| n.trim().parse().map_err(|e| format!("--sizes {n}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--duration-s" => s.duration = Duration::from_secs_f64(number(&value()?)?),
            "--interval-s" => s.interval = Duration::from_secs_f64(number(&value()?)?),
            "--rps" => s.rps = number(&value()?)?,
            "--out" => s.out = PathBuf::from(value()?),
            "--smoke" => {
                s.smoke = true;
                s.sizes = vec![50];
                s.duration = Duration::from_secs(8);
                s.interval = Duration::from_millis(500);
                s.rps = 400.0;
                s.out = PathBuf::from("target/bench/controller-smoke.json");
            }
            "--aligned" => s.aligned = true,
            "--child" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if s.interval.is_zero() || s.duration < s.interval {
        return Err("--interval-s must be > 0 and at most --duration-s".into());
    }
    Ok(s)
}

fn number(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0)
        .ok_or(format!("{text:?} is not a non-negative number"))
}

/// The traffic a rollout's canary sees.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Profile {
    /// As good as the baseline: promoted.
    Healthy,
    /// Fails 30 % of its requests: rolled back.
    Broken,
    /// No traffic at all: held.
    Quiet,
}

fn profile(index: usize) -> Profile {
    match index % 10 {
        0 => Profile::Broken,
        1 => Profile::Quiet,
        _ => Profile::Healthy,
    }
}

/// A small deterministic generator (xorshift64*), one per rollout.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A count with mean `mean` (normal approximation of a Poisson count).
    fn count(&mut self, mean: f64) -> u64 {
        let (u1, u2) = (self.next_f64().max(1e-12), self.next_f64());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        (mean + z * mean.sqrt()).round().max(0.0) as u64
    }
}

/// Tick lateness and drift samples, microseconds.
#[derive(Default)]
struct Samples {
    late: Vec<u64>,
    drift: Vec<u64>,
}

type Lateness = Arc<Mutex<Samples>>;

/// One rollout's in-memory world: the weight its sink applied, its counters.
struct Sim {
    profile: Profile,
    rps: f64,
    interval: Duration,
    weight: AtomicU32,
    record: Mutex<Option<Record>>,
    aborted: AtomicBool,
    traffic: Mutex<Traffic>,
    lateness: Lateness,
}

struct Traffic {
    rng: Rng,
    last: Instant,
    canary: VariantCounts,
    stable: VariantCounts,
    /// This release's schedule: its first read, its last and the reads since the first.
    first_read: Option<Instant>,
    last_read: Option<Instant>,
    reads: u32,
}

/// The in-memory source and sink of one rollout.
#[derive(Clone)]
struct Memory(Arc<Sim>);

impl Memory {
    fn new(index: usize, rps: f64, interval: Duration, lateness: Lateness) -> Memory {
        Memory(Arc::new(Sim {
            profile: profile(index),
            rps,
            interval,
            weight: AtomicU32::new(0),
            record: Mutex::new(None),
            aborted: AtomicBool::new(false),
            traffic: Mutex::new(Traffic {
                rng: Rng(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1)),
                last: Instant::now(),
                canary: VariantCounts::default(),
                stable: VariantCounts::default(),
                first_read: None,
                last_read: None,
                reads: 0,
            }),
            lateness,
        }))
    }

    /// A new release: a new schedule.
    fn new_release(&self) {
        let mut t = lock(&self.0.traffic);
        t.first_read = None;
        t.last_read = None;
        t.reads = 0;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MetricSource for Memory {
    async fn read(&self, _query: &Query) -> Result<Snapshot, SourceError> {
        let sim = &self.0;
        let now = Instant::now();
        let mut t = lock(&sim.traffic);
        // Lateness: against the previous tick plus one interval (the schedule tokio's
        // `MissedTickBehavior::Delay`, which the rollout loop uses, keeps after a late
        // tick); drift: against the release's first tick plus whole intervals (lateness
        // summed up over the release).
        match (t.first_read, t.last_read) {
            (Some(first), Some(last)) => {
                t.reads += 1;
                let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
                let late = now.saturating_duration_since(last + sim.interval);
                let drift = now.saturating_duration_since(first + sim.interval * t.reads);
                let mut samples = lock(&sim.lateness);
                samples.late.push(micros(late));
                samples.drift.push(micros(drift));
            }
            _ => t.first_read = Some(now),
        }
        t.last_read = Some(now);
        let dt = now.duration_since(t.last).as_secs_f64();
        t.last = now;
        let rps = if sim.profile == Profile::Quiet {
            0.0
        } else {
            sim.rps
        };
        let share = f64::from(sim.weight.load(Ordering::Relaxed)) / 100.0;
        let canary_rate = match sim.profile {
            Profile::Broken => 0.30,
            _ => 0.005,
        };
        let requests = rps * dt;
        let (c, s) = (requests * share, requests * (1.0 - share));
        let canary_n = t.rng.count(c);
        let canary_e = t.rng.count(c * canary_rate).min(canary_n);
        let canary_slow = t.rng.count(c * 0.01).min(canary_n);
        let stable_n = t.rng.count(s);
        let stable_e = t.rng.count(s * 0.005).min(stable_n);
        let stable_slow = t.rng.count(s * 0.01).min(stable_n);
        let add = |v: &mut VariantCounts, n: u64, e: u64, slow: u64| {
            v.responses += n;
            v.errors += e;
            v.latency_samples += n;
            v.slow += slow;
        };
        add(&mut t.canary, canary_n, canary_e, canary_slow);
        add(&mut t.stable, stable_n, stable_e, stable_slow);
        let mut variants = BTreeMap::new();
        variants.insert("canary".to_string(), t.canary);
        variants.insert("stable".to_string(), t.stable);
        Ok(Snapshot { variants })
    }

    fn describe(&self) -> String {
        format!("in-memory counters ({:?})", self.0.profile)
    }
}

impl ConfigSink for Memory {
    type Claim = ();

    async fn claim(&self) -> Result<(), SinkError> {
        Ok(())
    }

    async fn load(&self) -> Result<Option<Record>, SinkError> {
        Ok(lock(&self.0.record).clone())
    }

    async fn apply(&self, policy: &Value, record: &Record) -> Result<(), SinkError> {
        // What a real sink serializes, so that the cost is in the numbers.
        let text = policy.to_string();
        std::hint::black_box(text.len());
        self.0
            .weight
            .store(record.applied_weight, Ordering::Relaxed);
        *lock(&self.0.record) = Some(record.clone());
        Ok(())
    }

    async fn save(&self, record: &Record) -> Result<(), SinkError> {
        let text = serde_json::to_vec(record).map_err(|e| SinkError::Io {
            path: "memory".into(),
            reason: e.to_string(),
        })?;
        std::hint::black_box(text.len());
        *lock(&self.0.record) = Some(record.clone());
        Ok(())
    }

    async fn set_abort_mark(&self, on: bool) -> Result<(), SinkError> {
        self.0.aborted.store(on, Ordering::Relaxed);
        Ok(())
    }

    async fn abort_marked(&self) -> Result<bool, SinkError> {
        Ok(self.0.aborted.load(Ordering::Relaxed))
    }

    fn render(&self, policy: &Value, _record: &Record) -> Result<String, SinkError> {
        Ok(policy.to_string())
    }

    fn describe(&self) -> String {
        "in-memory sink".to_string()
    }
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / clock_ticks_per_second()
}

/// `getconf CLK_TCK`; 100 on Linux everywhere this runs.
fn clock_ticks_per_second() -> f64 {
    100.0
}

/// A line of /proc/self/status in KiB (VmRSS, VmHWM).
fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// One size, in this process (the child).
fn measure(size: usize, s: &Settings) -> Result<Value, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        std::fs::write(dir.path().join("policy.json"), POLICY).map_err(|e| e.to_string())?;
        let step_time = s.interval * 2;
        let text = format!(
            "policy: policy.json\nsplit_rule: rollout\ncanary: canary\nsteps: [5, 10, 25, 50, 100]\n\
             step_min_duration: {}ms\ninterval: {}ms\n\
             analysis: {{error_ceiling: 0.2, max_error_rate: 0.02, latency_threshold_ms: 500, \
             max_slow_rate: 0.05, min_requests: 100, alpha: 0.001, no_data_timeout: 1h, on_no_data: hold}}\n\
             source: {{envoy_admin: [\"http://127.0.0.1:1\"]}}\n\
             sink: {{ecds_file: {{path: bench.ecds.json, wasm: f.wasm}}}}\n",
            step_time.as_millis(),
            s.interval.as_millis()
        );
        let base = RolloutSpec::parse(&text, &dir.path().join("bench.yaml"))
            .map_err(|e| format!("bench spec: {e}"))?;
        let lateness: Lateness = Arc::new(Mutex::new(Samples::default()));
        let worlds: Arc<Vec<Memory>> = Arc::new(
            (0..size)
                .map(|i| Memory::new(i, s.rps, s.interval, Arc::clone(&lateness)))
                .collect(),
        );
        let launch_worlds = Arc::clone(&worlds);
        let launcher: Launcher = Arc::new(move |spec: RolloutSpec, mut out, stop| {
            let index = index_of(&spec.file);
            let world = launch_worlds.get(index).cloned();
            Box::pin(async move {
                let Some(world) = world else {
                    return Err(rollout::RunError::Render(format!("no world {index}")));
                };
                world.new_release();
                rollout::run_release(&spec, &world, &world, &mut out, stop.stopped()).await
            })
        });
        let (finished_tx, mut finished_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let outcomes = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
        let hook_outcomes = Arc::clone(&outcomes);
        let verdicts = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
        let hook_verdicts = Arc::clone(&verdicts);
        let hook: EventHook = Arc::new(move |key, kind, data| {
            if matches!(kind, "hold" | "promote" | "complete" | "rollback") {
                *lock(&hook_verdicts).entry(kind.to_string()).or_default() += 1;
            }
            if kind == "finished" {
                if let Some(outcome) = data["outcome_kind"].as_str() {
                    let profile = profile(index_of(Path::new(key)));
                    let name = format!("{profile:?} {outcome}").to_lowercase();
                    *lock(&hook_outcomes).entry(name).or_default() += 1;
                    let _ = finished_tx.send(key.to_string());
                }
            }
        });
        let out = Output::new(Format::Json).silent();
        let mut fleet = Fleet::new(
            launcher,
            &out,
            FleetOptions {
                hook: Some(hook),
                ..FleetOptions::default()
            },
        );
        let rss_before = status_kib("VmRSS:");
        let cpu_start = cpu_seconds();
        let started = Instant::now();
        let spec_for = |index: usize, release: u64| {
            let mut spec = base.clone();
            spec.file = PathBuf::from(format!("r{index:05}.yaml"));
            spec.revision = format!("{}-{}", base.revision, release);
            spec
        };
        let mut releases = vec![0u64; size];
        // Starts spread over the first interval (or all at once with --aligned).
        let spread = if s.aligned {
            Duration::ZERO
        } else {
            s.interval.div_f64(size.max(1) as f64)
        };
        for (index, release) in releases.iter().enumerate() {
            fleet.apply(&format!("r{index:05}.yaml"), spec_for(index, *release));
            if !spread.is_zero() {
                tokio::time::sleep(spread).await;
            }
        }
        let deadline = started + s.duration;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let key = tokio::select! {
                key = finished_rx.recv() => key,
                _ = tokio::time::sleep(deadline - now) => None,
            };
            if let Some(key) = key {
                let index = index_of(Path::new(&key));
                if let Some(release) = releases.get_mut(index) {
                    *release += 1;
                    fleet.apply(&key, spec_for(index, *release));
                }
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu_start;
        let rss_end = status_kib("VmRSS:");
        let snapshot = fleet.snapshot();
        fleet.shutdown().await;
        let Samples {
            late: mut samples,
            mut drift,
        } = std::mem::take(&mut *lock(&lateness));
        samples.sort_unstable();
        drift.sort_unstable();
        let ticks = samples.len() as f64 + size as f64; // every release's first read too
        let late_1s = samples.iter().filter(|l| **l > 1_000_000).count();
        let outcomes = lock(&outcomes).clone();
        let verdicts = lock(&verdicts).clone();
        Ok(json!({
            "rollouts": size,
            "runtime": "tokio current_thread (one core)",
            "interval_s": s.interval.as_secs_f64(),
            "wall_s": wall,
            "ticks": ticks,
            "lateness_ms": {
                "p50": percentile(&samples, 50.0) as f64 / 1000.0,
                "p99": percentile(&samples, 99.0) as f64 / 1000.0,
                "max": samples.last().copied().unwrap_or(0) as f64 / 1000.0,
                "samples": samples.len(),
                "over_1s": late_1s,
            },
            "drift_ms": {
                "p50": percentile(&drift, 50.0) as f64 / 1000.0,
                "p99": percentile(&drift, 99.0) as f64 / 1000.0,
                "max": drift.last().copied().unwrap_or(0) as f64 / 1000.0,
            },
            "cpu_s": cpu,
            "cpu_share_of_one_core": cpu / wall,
            "cpu_us_per_tick": cpu / ticks * 1e6,
            "cpu_ms_per_rollout_per_minute": cpu / size as f64 / wall * 60.0 * 1000.0,
            "rss_kib_before_fleet": rss_before,
            "rss_kib_end": rss_end,
            "peak_rss_kib": status_kib("VmHWM:"),
            "outcomes": outcomes,
            "verdicts": verdicts,
            "driven_at_end": snapshot.len(),
        }))
    })
}

/// `r00042.yaml` → 42.
fn index_of(file: &Path) -> usize {
    file.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.strip_prefix('r'))
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX)
}

fn main() -> std::process::ExitCode {
    let s = match settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fleet-bench: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let child = std::env::args().any(|a| a == "--child");
    if child {
        // One size, measured in this process; one JSON line for the parent.
        let size = s.sizes.first().copied().unwrap_or(0);
        return match measure(size, &s) {
            Ok(result) => {
                println!("{result}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fleet-bench: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("fleet-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut results = Vec::new();
    for size in &s.sizes {
        eprintln!(
            "fleet-bench: {size} rollouts, {:?} interval, for {:?} …",
            s.interval, s.duration
        );
        let output = std::process::Command::new(&exe)
            .arg("--child")
            .args(["--sizes", &size.to_string()])
            .args(["--duration-s", &s.duration.as_secs_f64().to_string()])
            .args(["--interval-s", &s.interval.as_secs_f64().to_string()])
            .args(["--rps", &s.rps.to_string()])
            .args(s.aligned.then_some("--aligned"))
            .output();
        let parsed = output.map_err(|e| e.to_string()).and_then(|o| {
            if o.status.success() {
                serde_json::from_slice::<Value>(&o.stdout).map_err(|e| e.to_string())
            } else {
                Err(String::from_utf8_lossy(&o.stderr).into_owned())
            }
        });
        match parsed {
            Ok(result) => results.push(result),
            Err(e) => {
                eprintln!("fleet-bench: {size} rollouts failed: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    print_table(&results);
    let extrapolation = extrapolate(&results);
    if let Some(text) = extrapolation["text"].as_str() {
        println!("{text}");
    }
    let document = json!({
        "settings": {
            "sizes": s.sizes, "duration_s": s.duration.as_secs_f64(),
            "interval_s": s.interval.as_secs_f64(), "rps_per_rollout": s.rps, "smoke": s.smoke,
            "aligned_starts": s.aligned,
        },
        "results": results,
        "extrapolation": extrapolation,
    });
    if let Some(parent) = s.out.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    if let Err(e) = std::fs::write(&s.out, format!("{document:#}\n")) {
        eprintln!("fleet-bench: {}: {e}", s.out.display());
        return std::process::ExitCode::FAILURE;
    }
    println!("written: {}", s.out.display());
    // Smoke: every size produced ticks and finished some rollouts.
    let sane = results.iter().all(|r| {
        r["lateness_ms"]["samples"].as_u64().unwrap_or(0) > 0
            && r["outcomes"].as_object().is_some_and(|o| !o.is_empty())
    });
    if s.smoke && !sane {
        eprintln!("fleet-bench: smoke run produced no ticks or no outcomes");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

fn print_table(results: &[Value]) {
    println!(
        "{:>9} {:>8} {:>9} {:>9} {:>9} {:>6} {:>10} {:>9} {:>9} {:>13} {:>10}",
        "rollouts",
        "ticks",
        "late p50",
        "late p99",
        "late max",
        ">1 s",
        "drift p99",
        "CPU core",
        "CPU/tick",
        "CPU/rollout",
        "peak RSS"
    );
    for r in results {
        let ms = |k: &str| r["lateness_ms"][k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>9} {:>8} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>6} {:>8.1}ms {:>8.2}% {:>7.0}µs {:>7.1}ms/min {:>6.1} MiB",
            r["rollouts"].as_u64().unwrap_or(0),
            r["ticks"].as_f64().unwrap_or(0.0) as u64,
            ms("p50"),
            ms("p99"),
            ms("max"),
            r["lateness_ms"]["over_1s"].as_u64().unwrap_or(0),
            r["drift_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
            r["cpu_share_of_one_core"].as_f64().unwrap_or(f64::NAN) * 100.0,
            r["cpu_us_per_tick"].as_f64().unwrap_or(f64::NAN),
            r["cpu_ms_per_rollout_per_minute"].as_f64().unwrap_or(f64::NAN),
            r["peak_rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        );
    }
}

/// Memory per rollout from the smallest and largest sizes, and the sizes one core and
/// 256 MiB would hold at that rate.
fn extrapolate(results: &[Value]) -> Value {
    let (Some(small), Some(large)) = (results.first(), results.last()) else {
        return json!({});
    };
    let n = |r: &Value| r["rollouts"].as_f64().unwrap_or(0.0);
    let rss = |r: &Value| r["peak_rss_kib"].as_f64().unwrap_or(0.0);
    let cpu = |r: &Value| r["cpu_share_of_one_core"].as_f64().unwrap_or(0.0);
    if n(large) <= n(small) {
        return json!({});
    }
    let kib_per_rollout = (rss(large) - rss(small)) / (n(large) - n(small));
    let core_per_rollout = cpu(large) / n(large);
    let fixed_kib = rss(small) - kib_per_rollout * n(small);
    let by_memory = (256.0 * 1024.0 - fixed_kib) / kib_per_rollout.max(1e-9);
    let by_cpu = 1.0 / core_per_rollout.max(1e-12);
    let text = format!(
        "per rollout: {:.1} KiB of memory, {:.4} % of a core at this interval; fixed {:.1} MiB. \
         At that rate 256 MiB holds ~{:.0} rollouts and one core ~{:.0} (before lateness grows).",
        kib_per_rollout,
        core_per_rollout * 100.0,
        fixed_kib / 1024.0,
        by_memory,
        by_cpu
    );
    json!({
        "kib_per_rollout": kib_per_rollout,
        "core_share_per_rollout": core_per_rollout,
        "fixed_kib": fixed_kib,
        "rollouts_in_256_mib": by_memory,
        "rollouts_per_core": by_cpu,
        "text": text,
    })
}
