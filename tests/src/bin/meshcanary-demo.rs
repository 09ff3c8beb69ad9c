//! `meshcanary-demo`: the project's main job, live, in one command (`make demo`).
//!
//! Everything runs on 127.0.0.1 with ports the kernel chooses:
//!
//! * Envoy (2 workers, stats flushed every second) with the real filter module, whose
//!   policy arrives by ECDS from a file in a temporary folder;
//! * two `meshcanary-upstream` processes, `stable` and `canary`, each failing 1 % of
//!   requests (a realistic background the canary is judged against);
//! * `meshcanary-load`, 300 requests/s from 5,000 users (`x-user-id`), one run per rollout;
//!
//! and then two rollouts, each driven by the real controller, `meshcanary run SPEC`:
//!
//! 1. `healthy` — the canary is as good as stable: promoted step by step (exit 0);
//! 2. `faulty` — the policy goes back to 0 % canary, the first rollout's record is
//!    removed, the canary is switched to 10 % errors (ten times stable's) through its
//!    control endpoint, and a new rollout starts: rolled back automatically (exit 3).
//!
//! The controller's events are streamed as they come (`[healthy] …`, `[faulty] …`); a
//! closing summary gives the steps applied, the verdicts with their numbers, the faulty
//! rollout's detection time and time to rollback, and the load generator's totals. Each
//! rollout's event stream is saved as `<label>-events.jsonl` in `--report-dir` (default
//! `target/demo/`) and turned into `<label>-report.html` by `meshcanary report`; the
//! paths are printed at the end.
//!
//! Where the programs come from: `meshcanary-upstream` and `meshcanary-load` from
//! `--bin-dir`, by default the folder this program runs from (cargo builds a workspace's
//! binaries into one folder, `target/debug`); the controller from `--meshcanary`, else
//! `meshcanary` in that folder, else `$MESHCANARY_BIN` or `target/debug/meshcanary`.
//! Envoy and the module: `$MESHCANARY_ENVOY` and `$MESHCANARY_WASM`, else the
//! repository's `.venv/bin/envoy` (`make envoy`) and `target/wasm/meshcanary_filter.wasm`
//! (`make wasm`).
//!
//! Exit codes: 0 the healthy canary was promoted and the faulty one rolled back; 1
//! anything else (another outcome, a program that would not start); 2 usage; 124 the
//! deadline (`--deadline-s`) passed; 130 SIGINT (Ctrl-C); 143 SIGTERM. On every path,
//! every process it started is stopped: each is started with `kill_on_drop`, and the
//! deadline and the signals end the demo by dropping it.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use meshcanary_e2e::controller::{Controller, Event};
use meshcanary_e2e::programs::{LoadProgram, UpstreamProgram};
use meshcanary_e2e::upstream::parse_rate;
use meshcanary_e2e::{paths, try_write_ecds, Envoy, EnvoyConfig, FilterSource};
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};

/// The project's main job in one command: Envoy with the filter, a stable and a canary
/// upstream and a load generator on 127.0.0.1, then two rollouts driven by the real
/// controller — a healthy canary promoted, a faulty one rolled back — with a summary.
#[derive(Debug, Parser)]
#[command(
    name = "meshcanary-demo",
    version,
    after_help = "Exit codes: 0 the healthy canary promoted and the faulty one rolled back; \
                  1 anything else; 2 usage; 124 deadline passed; 130 SIGINT; 143 SIGTERM. \
                  Every process it starts is stopped on every path.\n\
                  Envoy and the filter: $MESHCANARY_ENVOY and $MESHCANARY_WASM, else the \
                  repository's .venv/bin/envoy and target/wasm/meshcanary_filter.wasm."
)]
struct Args {
    /// Folder holding `meshcanary-upstream` and `meshcanary-load` [default: the folder
    /// this program runs from].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The controller [default: `meshcanary` in --bin-dir, else $MESHCANARY_BIN, else
    /// target/debug/meshcanary].
    #[arg(long)]
    meshcanary: Option<PathBuf>,
    /// Shorter rollouts (steps 20/50/100 %, 2 s each, judged every 0.5 s), for the smoke test.
    #[arg(long)]
    fast: bool,
    /// Requests per second from the load generator.
    #[arg(long, default_value_t = 300)]
    rps: u32,
    /// Distinct users (`x-user-id`) the load cycles through.
    #[arg(long, default_value_t = 5000)]
    users: u32,
    /// Share of requests stable (and the healthy canary) answer with 500.
    #[arg(long, default_value_t = 0.01, value_parser = parse_rate)]
    error_rate: f64,
    /// Share of requests the faulty canary answers with 500.
    #[arg(long, default_value_t = 0.10, value_parser = parse_rate)]
    fault_error_rate: f64,
    /// Where each rollout's events (`<label>-events.jsonl`) and report
    /// (`<label>-report.html`) are written [default: target/demo in the repository].
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// Stop everything and exit 124 after this many seconds.
    #[arg(long, default_value_t = 170)]
    deadline_s: u64,
}

/// Exit code when the deadline passed (as `timeout(1)` uses).
const EXIT_DEADLINE: u8 = 124;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Listening before anything starts: a Ctrl-C during start-up must also stop it all.
    let (mut interrupt, mut terminate) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("meshcanary-demo: cannot listen for signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let deadline = Duration::from_secs(args.deadline_s);
    // Leaving this `select!` drops the demo future, and with it every process handle:
    // each was started with `kill_on_drop`, so each gets SIGKILL on every path out.
    let code = tokio::select! {
        biased;
        _ = interrupt.recv() => {
            say("\nmeshcanary-demo: interrupted (SIGINT): stopping everything it started");
            130
        }
        _ = terminate.recv() => {
            say("\nmeshcanary-demo: terminated (SIGTERM): stopping everything it started");
            143
        }
        () = tokio::time::sleep(deadline) => {
            say(format!(
                "\nmeshcanary-demo: deadline of {} s passed: stopping everything it started",
                args.deadline_s
            ));
            EXIT_DEADLINE
        }
        result = demo(&args, started + deadline) => match result {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("meshcanary-demo: {e}");
                1
            }
        },
    };
    say(format!(
        "meshcanary-demo: all processes stopped; {:.1} s in all; exit {code}",
        started.elapsed().as_secs_f64()
    ));
    ExitCode::from(code)
}

/// Prints one line; a closed stdout loses the line but never stops the demo (which
/// must still stop what it started).
fn say(text: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", text.as_ref());
    let _ = out.flush();
}

/// The programs the demo runs.
struct Programs {
    upstream: PathBuf,
    load: PathBuf,
    meshcanary: PathBuf,
}

impl Programs {
    /// Finds them (see the module docs) and checks each exists, naming the fix if not.
    fn locate(args: &Args) -> Result<Programs, String> {
        let bin_dir = match &args.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()
                .map_err(|e| format!("cannot tell where this program is ({e}); pass --bin-dir"))?
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        let meshcanary = args.meshcanary.clone().unwrap_or_else(|| {
            let beside = bin_dir.join("meshcanary");
            if beside.exists() {
                beside
            } else {
                paths::meshcanary_bin()
            }
        });
        let programs = Programs {
            upstream: bin_dir.join("meshcanary-upstream"),
            load: bin_dir.join("meshcanary-load"),
            meshcanary,
        };
        for (path, built_by) in [
            (&programs.upstream, "cargo build -p meshcanary-e2e --bins"),
            (&programs.load, "cargo build -p meshcanary-e2e --bins"),
            (&programs.meshcanary, "cargo build -p meshcanary"),
            (&paths::envoy(), "make envoy"),
            (&paths::wasm(), "make wasm"),
        ] {
            if !path.exists() {
                return Err(format!(
                    "{} not found: run `make demo` (or `{built_by}`)",
                    path.display()
                ));
            }
        }
        Ok(programs)
    }
}

/// How the rollouts are paced.
struct Pace {
    steps: Vec<u32>,
    step_min_duration: &'static str,
    interval: &'static str,
    min_requests: u64,
}

impl Pace {
    fn new(fast: bool) -> Pace {
        if fast {
            Pace {
                steps: vec![20, 50, 100],
                step_min_duration: "2s",
                interval: "500ms",
                min_requests: 100,
            }
        } else {
            Pace {
                steps: vec![10, 25, 50, 100],
                step_min_duration: "5s",
                interval: "1s",
                min_requests: 100,
            }
        }
    }
}

/// The base policy: canary at 0 % in the `rollout` split until the controller moves it.
fn base_policy() -> Value {
    json!({
        "name": "checkout",
        "variants": ["stable", "canary"],
        "rules": [
            {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
            {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "checkout-v2",
                "weights": [{"variant": "canary", "weight": 0}, {"variant": "stable", "weight": 100}]}}
        ]
    })
}

/// The rollout spec, as a person would write it. Paths are JSON strings, which YAML reads
/// as double-quoted strings whatever characters the temporary folder has.
fn spec_yaml(label: &str, pace: &Pace, admin: &str, ecds: &Path) -> String {
    let quoted = |p: &Path| Value::from(p.display().to_string()).to_string();
    let steps: Vec<String> = pace.steps.iter().map(u32::to_string).collect();
    format!(
        "# meshcanary-demo: the {label} rollout\n\
         policy: policy.json\n\
         split_rule: rollout\n\
         canary: canary\n\
         steps: [{steps}]\n\
         step_min_duration: {step_min}\n\
         interval: {interval}\n\
         analysis:\n\
         \x20 error_ceiling: 0.2\n\
         \x20 max_error_rate: 0.05\n\
         \x20 latency_threshold_ms: 500\n\
         \x20 max_slow_rate: 0.05\n\
         \x20 min_requests: {min_requests}\n\
         \x20 alpha: 0.001\n\
         \x20 no_data_timeout: 10s\n\
         \x20 on_no_data: rollback\n\
         source:\n\
         \x20 envoy_admin: [{admin}]\n\
         sink:\n\
         \x20 ecds_file: {{path: {ecds}, wasm: {wasm}}}\n",
        steps = steps.join(", "),
        step_min = pace.step_min_duration,
        interval = pace.interval,
        min_requests = pace.min_requests,
        admin = Value::from(admin),
        ecds = quoted(ecds),
        wasm = quoted(&paths::wasm()),
    )
}

/// What one rollout left behind, for the summary.
struct RolloutRun {
    label: &'static str,
    /// The controller's exit code (`None`: killed by a signal).
    exit: Option<i32>,
    events: Vec<Event>,
    began: Instant,
    ended: Instant,
    /// The load generator's summary for this rollout.
    load: Value,
    /// When the demo first saw a failed request in the canary's counts (faulty rollout).
    first_failure: Option<Instant>,
    /// Requests that reached the canary in the second after a rollback.
    canary_after_rollback: Option<u64>,
}

impl RolloutRun {
    fn of_kind<'a>(&'a self, kinds: &'a [&str]) -> impl Iterator<Item = &'a Event> + 'a {
        self.events
            .iter()
            .filter(move |e| kinds.contains(&e.kind()))
    }

    fn outcome(&self) -> String {
        match self.exit {
            Some(0) => "promoted".into(),
            Some(3) => "rolled back".into(),
            Some(code) => format!("failed (exit {code})"),
            None => "killed".into(),
        }
    }
}

/// Everything the rollouts share; processes stop when it is dropped.
struct Bench {
    programs: Programs,
    pace: Pace,
    /// Load: requests per second, and distinct users.
    rps: u32,
    users: u32,
    /// Holds the policy and the specs; `envoy/` in it holds the ECDS file and, next to
    /// it, the controller's record and lock.
    dir: tempfile::TempDir,
    /// The ECDS file Envoy watches and the controller writes.
    ecds: PathBuf,
    envoy: Envoy,
    stable: UpstreamProgram,
    canary: UpstreamProgram,
    /// When the demo must be over: the load generator is never asked to run past it.
    deadline: Instant,
}

/// The whole demo; `Ok(true)` when both rollouts ended as they should.
async fn demo(args: &Args, deadline: Instant) -> Result<bool, String> {
    let programs = Programs::locate(args)?;
    let pace = Pace::new(args.fast);
    let rate_arg = |rate: f64| vec!["--error-rate".to_string(), rate.to_string()];
    let stable =
        UpstreamProgram::start(&programs.upstream, "stable", &rate_arg(args.error_rate)).await?;
    let canary =
        UpstreamProgram::start(&programs.upstream, "canary", &rate_arg(args.error_rate)).await?;
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temporary folder: {e}"))?;
    // Envoy watches the ECDS file's whole folder; the specs and the policy live one level
    // up so that writing them does not make Envoy re-read its filter configuration.
    let ecds_dir = dir.path().join("envoy");
    std::fs::create_dir(&ecds_dir)
        .map_err(|e| format!("cannot create {}: {e}", ecds_dir.display()))?;
    let ecds = ecds_dir.join("checkout.ecds.json");
    // Envoy needs the file at start-up: the filter's first configuration comes from it.
    try_write_ecds(&ecds, "initial", &base_policy())?;
    let mut config =
        EnvoyConfig::stable_canary(FilterSource::Ecds(ecds.clone()), stable.addr, canary.addr);
    config.concurrency = 2;
    // Histograms (slow requests) only move at a flush; 1 s keeps the controller's view fresh.
    config.stats_flush_interval = Some(Duration::from_secs(1));
    let envoy = Envoy::start(&config)
        .await
        .map_err(|e| format!("Envoy did not start: {e}"))?;
    let policy_path = dir.path().join("policy.json");
    std::fs::write(&policy_path, base_policy().to_string())
        .map_err(|e| format!("cannot write {}: {e}", policy_path.display()))?;
    let bench = Bench {
        programs,
        pace,
        rps: args.rps,
        users: args.users,
        dir,
        ecds,
        envoy,
        stable,
        canary,
        deadline,
    };
    introduce(&bench, args);

    // 1. A healthy canary.
    let healthy = bench.rollout("healthy", false).await?;

    // 2. A faulty one, as a new release: the promoted release counts as done, the policy
    //    goes back to 0 % canary, and the old record is removed so the controller starts
    //    afresh instead of answering "already finished".
    try_write_ecds(&bench.ecds, "reset-before-faulty", &base_policy())?;
    bench
        .envoy
        .wait_ecds_version("reset-before-faulty", Duration::from_secs(10))
        .await?;
    say("[faulty]  setup: policy reset to 0 % canary (ECDS version \"reset-before-faulty\", confirmed by Envoy)");
    for suffix in [".state.json", ".abort"] {
        let mut name = bench.ecds.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "cannot remove {}: {e}",
                    PathBuf::from(name).display()
                ))
            }
            _ => {}
        }
    }
    say("[faulty]  setup: the healthy rollout's record removed: the next `meshcanary run` starts a new rollout");
    bench
        .canary
        .control(&format!("error_rate={}", args.fault_error_rate))
        .await?;
    say(format!(
        "[faulty]  setup: canary upstream now fails {} of requests (PUT /_control?error_rate={}), stable still {}",
        percent(args.fault_error_rate),
        args.fault_error_rate,
        percent(args.error_rate)
    ));
    let faulty = bench.rollout("faulty", true).await?;

    let runs = [healthy, faulty];
    summary(&runs);
    let report_dir = args
        .report_dir
        .clone()
        .unwrap_or_else(|| paths::repo().join("target/demo"));
    write_reports(&runs, &report_dir, &bench.programs.meshcanary).await?;
    let as_expected = runs[0].exit == Some(0) && runs[1].exit == Some(3);
    if !as_expected {
        say(format!(
            "meshcanary-demo: expected the healthy rollout promoted (exit 0) and the faulty one \
             rolled back (exit 3); got {} and {}",
            runs[0].outcome(),
            runs[1].outcome()
        ));
    }
    // Stopped here, explicitly, so the closing line is true; drops would do it too.
    bench.stop().await;
    Ok(as_expected)
}

/// Saves each rollout's event stream and its `meshcanary report` page in `dir`, and
/// prints the pages' paths.
async fn write_reports(runs: &[RolloutRun], dir: &Path, meshcanary: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    say("");
    for run in runs {
        let events = dir.join(format!("{}-events.jsonl", run.label));
        let mut lines = String::new();
        for event in &run.events {
            // Lines that were not JSON were kept as strings: written back as they came.
            match &event.json {
                Value::String(line) => lines.push_str(line),
                json => lines.push_str(&json.to_string()),
            }
            lines.push('\n');
        }
        std::fs::write(&events, lines)
            .map_err(|e| format!("cannot write {}: {e}", events.display()))?;
        let page = dir.join(format!("{}-report.html", run.label));
        let output = tokio::process::Command::new(meshcanary)
            .arg("report")
            .arg(&events)
            .output()
            .await
            .map_err(|e| format!("cannot run {} report: {e}", meshcanary.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} report {} failed ({}): {}",
                meshcanary.display(),
                events.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        std::fs::write(&page, &output.stdout)
            .map_err(|e| format!("cannot write {}: {e}", page.display()))?;
        say(format!("report: {:<8} {}", run.label, page.display()));
    }
    Ok(())
}

/// What runs where, and the spec, before the first rollout.
fn introduce(bench: &Bench, args: &Args) {
    let admin = bench.envoy.admin.trim_start_matches("http://");
    say("meshcanary demo: a healthy canary promoted, then a faulty one rolled back — live, on 127.0.0.1");
    say(format!(
        "  envoy     {} (2 workers), listener {}, admin {admin}",
        paths::envoy().display(),
        bench.envoy.listener
    ));
    say(format!(
        "  filter    {}, policy by ECDS from {}",
        paths::wasm().display(),
        bench.ecds.display()
    ));
    for upstream in [&bench.stable, &bench.canary] {
        say(format!(
            "  {:<9} meshcanary-upstream on {} (fails {} of requests)",
            upstream.name,
            upstream.addr,
            percent(args.error_rate)
        ));
    }
    say(format!(
        "  load      meshcanary-load, {} requests/s from {} users (x-user-id), one run per rollout",
        bench.rps, bench.users
    ));
    say(format!(
        "  control   {} run SPEC (exit 0 promoted, 3 rolled back)",
        bench.programs.meshcanary.display()
    ));
    say("  spec (the faulty rollout's differs only in its first line):");
    let spec = spec_yaml("healthy", &bench.pace, &bench.envoy.admin, &bench.ecds);
    for line in spec.lines() {
        say(format!("    {line}"));
    }
    say("");
}

impl Bench {
    /// Runs one rollout: its own load run, `meshcanary run SPEC` with its events streamed,
    /// then the load's totals. `faulty` also watches the canary for its first failure and,
    /// after a rollback, counts what still reaches it.
    async fn rollout(&self, label: &'static str, faulty: bool) -> Result<RolloutRun, String> {
        // Padded so that both rollouts' lines line up.
        let prefix = format!("{:<10}", format!("[{label}]"));
        let spec = self.dir.path().join(format!("{label}.yaml"));
        let text = spec_yaml(label, &self.pace, &self.envoy.admin, &self.ecds);
        std::fs::write(&spec, text).map_err(|e| format!("cannot write {}: {e}", spec.display()))?;

        let failures_before = if faulty {
            errors_of(&self.canary.stats().await?)
        } else {
            0
        };
        let load = self.start_load()?;
        let began = Instant::now();
        say(format!(
            "{prefix}{} run {} --output json",
            self.programs.meshcanary.display(),
            spec.display()
        ));
        let spec_arg = spec.display().to_string();
        let mut controller = Controller::start(&self.programs.meshcanary, &["run", &spec_arg])
            .map_err(|e| format!("cannot start {}: {e}", self.programs.meshcanary.display()))?;
        let mut shown = Shown::default();
        let mut first_failure = None;
        let status = loop {
            shown.print_new(&prefix, &controller);
            if faulty && first_failure.is_none() {
                // Polled with the events: good to the tick (50 ms) — the canary's counts
                // have no timestamps of their own.
                if let Ok(stats) = self.canary.stats().await {
                    if errors_of(&stats) > failures_before {
                        first_failure = Some(Instant::now());
                    }
                }
            }
            match controller.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => return Err(format!("{label}: cannot watch the controller: {e}")),
            }
        };
        let ended = Instant::now();
        // The readers may still hold the last lines (the `finished` event).
        tokio::time::sleep(Duration::from_millis(200)).await;
        shown.print_new(&prefix, &controller);

        let mut canary_after_rollback = None;
        if status.code() == Some(3) {
            // Requests already on their way when Envoy switched may still land; then nothing.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let before = self.canary.stats().await?["requests"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = self.canary.stats().await?["requests"].as_u64().unwrap_or(0);
            canary_after_rollback = Some(after.saturating_sub(before));
            say(format!(
                "{prefix}after the rollback: {} requests reached the canary in the next second (load still running)",
                after.saturating_sub(before)
            ));
        }
        let load = load.stop(Duration::from_secs(10)).await?;
        say(format!("{prefix}load: {}", load_line(&load)));
        say("");
        Ok(RolloutRun {
            label,
            exit: status.code(),
            events: controller.events(),
            began,
            ended,
            load,
            first_failure,
            canary_after_rollback,
        })
    }

    /// Starts a load run bounded by the demo's deadline (it is stopped early anyway).
    fn start_load(&self) -> Result<LoadProgram, String> {
        let seconds = self
            .deadline
            .saturating_duration_since(Instant::now())
            .as_secs()
            .max(1);
        let args: Vec<String> = [
            "--url",
            &self.envoy.url("/"),
            "--rps",
            &self.rps.to_string(),
            "--duration-s",
            &seconds.to_string(),
            "--max-requests",
            &(u64::from(self.rps) * seconds).to_string(),
            "--concurrency",
            "16",
            "--user-ids",
            &self.users.to_string(),
            "--timeout-ms",
            "2000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        LoadProgram::start(&self.programs.load, &args)
    }

    async fn stop(self) {
        self.envoy.stop().await;
        self.stable.stop().await;
        self.canary.stop().await;
    }
}

/// The canary's 500s so far, from its `/_stats`.
fn errors_of(stats: &Value) -> u64 {
    stats["by_status"]["500"].as_u64().unwrap_or(0)
}

/// How much of the controller's output has been printed.
#[derive(Default)]
struct Shown {
    events: usize,
    stderr: usize,
}

impl Shown {
    fn print_new(&mut self, prefix: &str, controller: &Controller) {
        let events = controller.events();
        for event in events.iter().skip(self.events) {
            say(format!("{prefix}{}", describe(&event.json)));
        }
        self.events = events.len();
        let stderr = controller.stderr();
        for line in stderr.get(self.stderr..).unwrap_or_default().lines() {
            say(format!("{prefix}(stderr) {line}"));
        }
        self.stderr = stderr.len();
    }
}

/// One controller event as a line for people.
fn describe(event: &Value) -> String {
    let t = event["t"].as_f64().unwrap_or(0.0);
    let kind = event["event"].as_str().unwrap_or("output");
    let message = event["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| event.to_string());
    let text = match kind {
        "start" => format!(
            "steps {} %, canary {} judged against {}",
            join_weights(&event["steps"]),
            event["canary"],
            event["baseline"]
        ),
        "applied" => format!(
            "canary at {} % — Envoy confirmed version {} in {} ms",
            event["weight"], event["generation"], event["confirm_ms"]
        ),
        "hold" | "promote" | "complete" | "rollback" => {
            // The message is "VERDICT: reason | numbers"; the reason is kept, the numbers
            // are shortened to what a person follows.
            let reason = message
                .split(" | ")
                .next()
                .unwrap_or_default()
                .split_once(": ")
                .map_or(message.as_str(), |(_, r)| r);
            format!("{} — {reason}", numbers_line(&event["numbers"]))
        }
        _ => message,
    };
    let word = match kind {
        "promote" | "complete" | "rollback" => kind.to_uppercase(),
        _ => kind.to_string(),
    };
    format!("{t:>6.1}s {word:<9}{text}")
}

/// `at 10 %, 3.0 s in: canary 95 req / 1 err, baseline 870 req / 9 err, Λ 0.4 (≥ 7.6 rolls back)`.
fn numbers_line(n: &Value) -> String {
    let count = |side: &str, field: &str| n[side][field].as_f64().unwrap_or(0.0);
    format!(
        "at {} %, {:.1} s in: canary {:.0} req / {:.0} err, baseline {:.0} req / {:.0} err, \
         Λerr {:.2} (rollback at {:.2})",
        n["weight"],
        n["step_seconds"].as_f64().unwrap_or(0.0),
        count("canary", "requests"),
        count("canary", "errors"),
        count("baseline", "requests"),
        count("baseline", "errors"),
        n["errors_llr"]["llr"].as_f64().unwrap_or(0.0),
        n["rollback_at"].as_f64().unwrap_or(0.0),
    )
}

fn join_weights(weights: &Value) -> String {
    weights
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(" → ")
        })
        .unwrap_or_default()
}

/// `0.1` → `10 %` (to a tenth of a percent, without float noise such as 10.000000000000002).
fn percent(rate: f64) -> String {
    format!("{} %", (rate * 1000.0).round() / 10.0)
}

/// `stable 2xx 4410 5xx 45 · canary 2xx 1203 5xx 12 · no answer 0 · 5673 sent in 19.6 s`.
fn load_line(load: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(upstreams) = load["by_upstream"].as_object() {
        for (upstream, classes) in upstreams {
            let mut part = upstream.clone();
            if let Some(classes) = classes.as_object() {
                for (class, n) in classes {
                    let _ = write!(part, " {class} {n}");
                }
            }
            parts.push(part);
        }
    }
    parts.push(format!("no answer {}", load["errors"]));
    format!(
        "{} · {} sent in {:.1} s",
        parts.join(" · "),
        load["sent"],
        load["elapsed_s"].as_f64().unwrap_or(0.0)
    )
}

/// The closing summary.
fn summary(runs: &[RolloutRun]) {
    let rule = "=".repeat(100);
    say(&rule);
    say("summary");
    say(&rule);
    say(format!(
        "{:<9}{:<14}{:<6}{:<28}{}",
        "rollout", "outcome", "exit", "steps applied (canary %)", "total"
    ));
    for run in runs {
        let weights: Vec<String> = run
            .of_kind(&["applied"])
            .map(|e| e.json["weight"].to_string())
            .collect();
        say(format!(
            "{:<9}{:<14}{:<6}{:<28}{:.1} s",
            run.label,
            run.outcome(),
            run.exit.map_or("-".into(), |c| c.to_string()),
            weights.join(" → "),
            (run.ended - run.began).as_secs_f64()
        ));
    }

    say("");
    say("verdicts (counts within the step judged, at the moment of the decision)");
    say(format!(
        "{:<9}{:<10}{:<7}{:<22}{:<22}{:<16}{}",
        "rollout", "verdict", "at", "canary req / err", "baseline req / err", "Λerr / limit", "why"
    ));
    for run in runs {
        let steps = run
            .of_kind(&["start"])
            .next()
            .map(|e| e.json["steps"].clone())
            .unwrap_or(Value::Null);
        for event in run.of_kind(&["promote", "complete", "rollback"]) {
            let n = &event.json["numbers"];
            let side = |name: &str| {
                let requests = n[name]["requests"].as_f64().unwrap_or(0.0);
                let errors = n[name]["errors"].as_f64().unwrap_or(0.0);
                let rate = if requests > 0.0 {
                    format!(" ({:.1} %)", 100.0 * errors / requests)
                } else {
                    String::new()
                };
                format!("{requests:.0} / {errors:.0}{rate}")
            };
            let why = match event.kind() {
                "rollback" => event.json["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                "complete" => "last judged step passed: canary to 100 %".to_string(),
                _ => match event.json["to_step"].as_u64() {
                    Some(to) => format!("step passed: canary to {} %", steps[to as usize]),
                    None => "step passed".to_string(),
                },
            };
            say(format!(
                "{:<9}{:<10}{:<7}{:<22}{:<22}{:<16}{}",
                run.label,
                event.kind(),
                format!("{} %", n["weight"]),
                side("canary"),
                side("baseline"),
                format!(
                    "{:.2} / {:.2}",
                    n["errors_llr"]["llr"].as_f64().unwrap_or(0.0),
                    n["rollback_at"].as_f64().unwrap_or(0.0)
                ),
                why
            ));
        }
    }

    say(
        "Λerr: the error test's evidence of a regression against the baseline, over the whole \
         rollout; it rolls back at the limit ln(2/α)",
    );

    for run in runs.iter().filter(|r| r.label == "faulty") {
        say("");
        say("faulty rollout");
        let first_step = run
            .of_kind(&["applied"])
            .find(|e| e.json["weight"].as_u64().unwrap_or(0) > 0);
        let rollback = run.of_kind(&["rollback"]).next();
        match (first_step, rollback) {
            (Some(step), Some(rollback)) => {
                say(format!(
                    "  detection          {:.1} s from the start of its first step (Envoy confirmed canary at {} %) to the rollback verdict",
                    rollback.at.saturating_duration_since(step.at).as_secs_f64(),
                    step.json["weight"]
                ));
                if let Some(failure) = run.first_failure {
                    say(format!(
                        "                     {:.1} s from the canary's first failed request (seen in its counts, polled every 50 ms)",
                        rollback.at.saturating_duration_since(failure).as_secs_f64()
                    ));
                }
            }
            _ => say("  detection          - (no rollback verdict)"),
        }
        let back_to_zero = rollback.and_then(|r| {
            run.of_kind(&["applied"])
                .find(|e| e.at >= r.at && e.json["weight"] == 0)
        });
        match back_to_zero {
            Some(applied) => say(format!(
                "  time to rollback   {} ms from the rollback verdict to Envoy's confirmation of 0 % (confirm_ms)",
                applied.json["confirm_ms"]
            )),
            None => say("  time to rollback   - (0 % never confirmed)"),
        }
        if let Some(n) = run.canary_after_rollback {
            say(format!(
                "  after rollback     {n} requests reached the canary in the following second"
            ));
        }
    }

    say("");
    say("load generator (answers per upstream, by status class)");
    say(format!(
        "{:<9}{:<10}{:>8}{:>8}{:>11}{:>8}{:>10}",
        "rollout", "upstream", "2xx", "5xx", "no answer", "sent", "seconds"
    ));
    for run in runs {
        let upstreams = run.load["by_upstream"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for (upstream, classes) in &upstreams {
            say(format!(
                "{:<9}{:<10}{:>8}{:>8}",
                run.label,
                upstream,
                classes["2xx"].as_u64().unwrap_or(0),
                classes["5xx"].as_u64().unwrap_or(0)
            ));
        }
        say(format!(
            "{:<9}{:<10}{:>8}{:>8}{:>11}{:>8}{:>10.1}",
            run.label,
            "(all)",
            run.load["by_class"]["2xx"].as_u64().unwrap_or(0),
            run.load["by_class"]["5xx"].as_u64().unwrap_or(0),
            run.load["errors"].as_u64().unwrap_or(0),
            run.load["sent"].as_u64().unwrap_or(0),
            run.load["elapsed_s"].as_f64().unwrap_or(0.0)
        ));
    }
    say(&rule);
}
