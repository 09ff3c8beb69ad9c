//! `meshcanary-bench`: what the filter costs, measured side by side in one run (`make bench`).
//!
//! ```text
//! meshcanary-bench                 # the full run: prints the tables, writes target/bench/results.json
//! meshcanary-bench --smoke         # tiny durations; only checks that every row produced numbers
//! meshcanary-bench --host-calls    # what each kind of host call costs: target/bench/host-calls.json
//! meshcanary-bench --instructions  # Envoy's instructions per request under valgrind (callgrind):
//!                                  # target/bench/instructions.json
//! ```
//!
//! One Envoy per configuration (one worker each) is started up front, then every round
//! runs wrk against each configuration in turn (A B C …, A B C …), so slow drift of a
//! shared machine hits every configuration alike; ratios are taken within a round. The
//! configurations are in `setups.rs`, the request mix in `requests.lua`, the native
//! decision microbenchmark in `micro.rs`. Everything it starts (Envoys, wrk, the
//! in-process upstreams) is stopped before it returns, and every loop is bounded in
//! count and time.

mod host_calls;
mod instructions;
mod micro;
mod report;
mod setups;
mod wrk;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use meshcanary_e2e::{paths, Behaviour, Envoy, Options, Upstream};
use serde_json::{json, Value};

use report::{Measured, Spread, Target};
use setups::{Addresses, Family, Setup, WORKERS};

/// The shadow of row 4c is this many times slower than the primary upstream.
const SHADOW_FACTOR: u64 = 20;

/// Side-by-side benchmark of native Envoy, an empty wasm filter and meshcanary.
#[derive(Debug, Parser)]
#[command(name = "meshcanary-bench")]
struct Args {
    /// Tiny durations, one round; fails unless every row produced numbers and the JSON
    /// was written (what `make test` runs).
    #[arg(long)]
    smoke: bool,
    /// Instead of the main run: the price of each kind of host call the filter makes
    /// (`filter/bench-probe`, see `host_calls.rs`).
    #[arg(long)]
    host_calls: bool,
    /// Instead of the main run: Envoy's instructions per request for the throughput
    /// rows, counted by valgrind's callgrind (see `instructions.rs`); a measurement the
    /// machine's load does not move. Writes target/bench/instructions.json.
    #[arg(long)]
    instructions: bool,
    /// With --instructions: requests counted per row and round, 100–100,000 (default
    /// 2,000; smoke 100), after as many again of warm-up.
    #[arg(long)]
    requests: Option<usize>,
    /// With --instructions: only these rows (comma-separated labels: `2,3`).
    #[arg(long, value_delimiter = ',')]
    rows: Vec<String>,
    /// With --instructions: callgrind also simulates the caches and branch prediction
    /// (`--cache-sim=yes --branch-sim=yes`, several times slower) and a second table
    /// gives cache misses and mispredicted branches per request: the costs an
    /// instruction count leaves out.
    #[arg(long)]
    cache_sim: bool,
    /// With --instructions: keep each callgrind dump in this folder
    /// (`row-<row>.round-<n>.callgrind`), for `callgrind_annotate`.
    #[arg(long)]
    keep_dumps: Option<PathBuf>,
    /// Rounds (each runs every configuration once), 1–20. Default 5 (smoke: 1;
    /// --instructions: 2).
    #[arg(long)]
    rounds: Option<u32>,
    /// Seconds per wrk run, 1–30. Default 3, with --host-calls 2 (smoke: 1).
    #[arg(long)]
    duration_s: Option<u64>,
    /// Seconds of discarded warm-up per configuration before the rounds, 0–10.
    /// Default 1 (smoke: 0).
    #[arg(long)]
    warmup_s: Option<u64>,
    /// wrk connections for the throughput rows (1–5).
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// wrk connections for the latency rows (4b, 4c, 5b).
    #[arg(long, default_value_t = 16)]
    latency_connections: u32,
    /// Delay of the primary upstream in the latency rows, ms (the shadow waits 20× as long).
    #[arg(long, default_value_t = 5)]
    primary_ms: u64,
    /// Instead of the main run: only the rows the mirroring targets compare (4b, 4c, 5b,
    /// 5c), 20 rounds unless --rounds says otherwise, each target judged by the median's
    /// 95 % interval over the rounds. Writes target/bench/mirroring.json.
    #[arg(long)]
    mirroring: bool,
    /// The empty module (`scripts/build-wasm.sh bench-empty`).
    #[arg(long)]
    empty_wasm: Option<PathBuf>,
    /// Instead of the main run: row 3 once per module given (comma-separated paths), next
    /// to the empty filter, measured alternately — two builds of the filter side by side.
    /// Writes target/bench/compare.json unless --out says otherwise.
    #[arg(long, value_delimiter = ',')]
    compare: Vec<PathBuf>,
    /// With --instructions: row 3 once per policy file given (comma-separated paths to
    /// policy JSON), next to the empty filter and row 3 with the bench policy — what a
    /// longer policy costs Envoy per request (`make bench-growth`).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<PathBuf>,
    /// The probe module: row 2b and --host-calls (`scripts/build-wasm.sh bench-probe`).
    #[arg(long)]
    probe_wasm: Option<PathBuf>,
    /// Where the JSON record goes. Default target/bench/results.json, with --host-calls
    /// target/bench/host-calls.json.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The run's parameters, checked.
struct Plan {
    smoke: bool,
    rounds: u32,
    duration: Duration,
    warmup: Duration,
    micro_budget: Duration,
    connections: u32,
    latency_connections: u32,
    primary_delay: Duration,
    meshcanary_wasm: PathBuf,
    empty_wasm: PathBuf,
    /// `filter/bench-probe`'s module: row 2b, and every row of `--host-calls`.
    probe_wasm: PathBuf,
    /// Instead of the main run, `--host-calls`.
    host_calls: bool,
    /// Instead of the main run, `--instructions`, with this many requests counted.
    instructions: Option<usize>,
    /// With `--instructions`: simulate the caches and branch prediction too.
    cache_sim: bool,
    /// With `--instructions`: where to keep the callgrind dumps.
    keep_dumps: Option<PathBuf>,
    /// With `--instructions`: the rows counted (empty: every throughput row).
    rows: Vec<String>,
    /// Instead of the main run, `--mirroring`: only the mirroring targets' rows.
    mirroring: bool,
    /// Instead of the main run, `--compare`: the modules to compare.
    compare: Vec<PathBuf>,
    /// With `--instructions`: the policies to count row 3 with (file name, policy),
    /// each valid.
    policies: Vec<(String, Value)>,
    out: PathBuf,
}

impl Plan {
    fn from_args(args: Args) -> Result<Plan, String> {
        let rounds = args
            .rounds
            .unwrap_or(match (args.smoke, args.instructions, args.mirroring) {
                (true, _, _) => 1,
                (false, true, _) => 2,
                (false, false, true) => 20,
                (false, false, false) => 5,
            });
        let modes = [args.host_calls, args.instructions, args.mirroring];
        if modes.iter().filter(|on| **on).count() > 1
            || (args.mirroring && !args.compare.is_empty())
        {
            return Err(
                "--host-calls, --instructions and --mirroring: one at a time \
                        (and --mirroring without --compare)"
                    .into(),
            );
        }
        let requests = args
            .requests
            .unwrap_or(if args.smoke { 100 } else { 2_000 });
        if !(100..=100_000).contains(&requests) {
            return Err(format!("--requests {requests}: expected 100–100,000"));
        }
        let full_duration_s = if args.host_calls { 2 } else { 3 };
        let duration_s = args
            .duration_s
            .unwrap_or(if args.smoke { 1 } else { full_duration_s });
        let warmup_s = args.warmup_s.unwrap_or(if args.smoke { 0 } else { 1 });
        if !(1..=20).contains(&rounds) {
            return Err(format!("--rounds {rounds}: expected 1–20"));
        }
        if !(1..=30).contains(&duration_s) {
            return Err(format!("--duration-s {duration_s}: expected 1–30"));
        }
        if warmup_s > 10 {
            return Err(format!("--warmup-s {warmup_s}: expected 0–10"));
        }
        for (flag, n) in [
            ("--connections", args.connections),
            ("--latency-connections", args.latency_connections),
        ] {
            if !(1..=1000).contains(&n) {
                return Err(format!("{flag} {n}: expected 1–1000"));
            }
        }
        if !(1..=100).contains(&args.primary_ms) {
            return Err(format!("--primary-ms {}: expected 1–100", args.primary_ms));
        }
        let out = args.out.unwrap_or_else(|| {
            PathBuf::from(if args.host_calls {
                "target/bench/host-calls.json"
            } else if args.instructions {
                "target/bench/instructions.json"
            } else if !args.compare.is_empty() {
                "target/bench/compare.json"
            } else if args.mirroring {
                "target/bench/mirroring.json"
            } else {
                "target/bench/results.json"
            })
        });
        let out = if out.is_absolute() {
            out
        } else {
            paths::repo().join(out)
        };
        if args.cache_sim && !args.instructions {
            return Err("--cache-sim: only with --instructions".into());
        }
        if !args.policies.is_empty() && (!args.instructions || !args.compare.is_empty()) {
            return Err("--policies: only with --instructions, and not with --compare".into());
        }
        let policies = args
            .policies
            .iter()
            .map(|path| read_policy(path))
            .collect::<Result<Vec<_>, String>>()?;
        let probe_wasm = args
            .probe_wasm
            .unwrap_or_else(|| paths::repo().join("target/wasm/bench_probe.wasm"));
        Ok(Plan {
            smoke: args.smoke,
            rounds,
            duration: Duration::from_secs(duration_s),
            warmup: Duration::from_secs(warmup_s),
            micro_budget: if args.smoke {
                Duration::from_millis(20)
            } else {
                Duration::from_millis(350)
            },
            connections: args.connections,
            latency_connections: args.latency_connections,
            primary_delay: Duration::from_millis(args.primary_ms),
            meshcanary_wasm: paths::wasm(),
            empty_wasm: args
                .empty_wasm
                .unwrap_or_else(|| paths::repo().join("target/wasm/bench_empty.wasm")),
            probe_wasm,
            host_calls: args.host_calls,
            instructions: args.instructions.then_some(requests),
            keep_dumps: args.keep_dumps,
            cache_sim: args.cache_sim,
            rows: args.rows,
            mirroring: args.mirroring,
            compare: args.compare,
            policies,
            out,
        })
    }

    fn connections_for(&self, setup: &Setup) -> u32 {
        match setup.family {
            Family::Throughput => self.connections,
            Family::Latency => self.latency_connections,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let plan = match Plan::from_args(Args::parse()) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("meshcanary-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&plan).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshcanary-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(plan: &Plan) -> Result<(), String> {
    let started = Instant::now();
    let bench_dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let script = bench_dir.path().join("requests.lua");
    std::fs::write(&script, include_str!("requests.lua"))
        .map_err(|e| format!("cannot write {}: {e}", script.display()))?;
    if let Some(requests) = plan.instructions {
        return count_instructions(plan, requests).await;
    }
    if plan.host_calls {
        return host_calls::run(plan, &plan.probe_wasm, &script).await;
    }
    // --- what is measured, and on what ------------------------------------------------
    let wrk_version = wrk::version().await?;
    let envoy_version = envoy_version()?;
    let module = |path: &Path| {
        std::fs::metadata(path).map(|m| m.len()).map_err(|e| {
            format!(
                "{}: {e} (make bench-deps builds every module)",
                path.display()
            )
        })
    };
    let meshcanary_bytes = module(&plan.meshcanary_wasm)?;
    let empty_bytes = module(&plan.empty_wasm)?;
    module(&plan.probe_wasm)?;
    let machine = machine();

    println!(
        "meshcanary bench ({}): {} rounds × {} s per configuration, configurations measured alternately; warm-up {} s each",
        if plan.smoke { "smoke" } else { "full" },
        plan.rounds,
        plan.duration.as_secs(),
        plan.warmup.as_secs()
    );
    println!(
        "machine: {} CPUs (nproc), {}; Envoy {} with {} worker (--concurrency {}); {} -t{} -c{} (rows 1–5), -c{} (rows 4b–5c)",
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        envoy_version,
        WORKERS,
        WORKERS,
        wrk_version,
        wrk::THREADS,
        plan.connections,
        plan.latency_connections
    );

    // --- 1. the native microbenchmark, before anything else competes for the CPU -------
    let timings = if plan.compare.is_empty() && !plan.mirroring {
        micro::run(plan.micro_budget)?
    } else {
        Vec::new()
    };

    // --- 2. upstreams (in this process) and one Envoy per configuration ----------------
    let shadow_delay = plan.primary_delay * SHADOW_FACTOR as u32;
    let upstream = |name: &'static str, delay: Duration| async move {
        let behaviour = Behaviour {
            delay,
            ..Behaviour::default()
        };
        let options = Options {
            record: false,
            ..Options::default()
        };
        Upstream::start_with_options(name, behaviour, options)
            .await
            .map_err(|e| format!("upstream {name}: {e}"))
    };
    let primary = upstream("stable", plan.primary_delay).await?;
    let fast_shadow = upstream("shadow", Duration::ZERO).await?;
    let slow_shadow = upstream("shadow", shadow_delay).await?;
    let addrs = Addresses {
        primary: primary.addr,
        fast_shadow: fast_shadow.addr,
        slow_shadow: slow_shadow.addr,
    };
    let setups = if !plan.compare.is_empty() {
        setups::compare(&addrs, &plan.empty_wasm, &plan.compare)
    } else if plan.mirroring {
        setups::all(&addrs, &plan.empty_wasm, &plan.probe_wasm)
            .into_iter()
            .filter(|s| MIRRORING_ROWS.contains(&s.id.as_str()))
            .collect()
    } else {
        setups::all(&addrs, &plan.empty_wasm, &plan.probe_wasm)
    };
    let measured = alternate(plan, &script, setups, started).await?;

    // --- 4. stop the upstreams ------------------------------------------------------------
    drop((primary, fast_shadow, slow_shadow));

    // --- 5. the report ------------------------------------------------------------------
    if !plan.compare.is_empty() {
        return report_comparison(plan, &measured);
    }
    if plan.mirroring {
        return report_mirroring(plan, &measured, started);
    }
    let find = |id: &str| configuration(&measured, id);
    let (native, empty) = (find("native")?, find("empty_wasm")?);
    let routed = find("meshcanary")?;

    println!("\nThroughput: Envoy answers itself (direct response); median (min–max) over the rounds; ratios are per round, then the median.\n");
    print!("{}", report::throughput_table(&measured, native, empty));
    println!(
        "\nPrimary latency with a slow shadow: upstream answers after {} ms, the shadow after {} ms ({}×).\n",
        plan.primary_delay.as_millis(),
        shadow_delay.as_millis(),
        SHADOW_FACTOR
    );
    print!("{}", report::latency_table(&measured));
    println!();
    for m in &measured {
        if !m.counters.is_empty() {
            let list: Vec<String> = m.counters.iter().map(|(n, v)| format!("{n} {v}")).collect();
            println!("row {} counters: {}", m.setup.row, list.join(", "));
        }
    }
    let failed: Vec<String> = measured
        .iter()
        .filter(|m| m.failed() > 0)
        .map(|m| format!("row {}: {}", m.setup.row, m.failed()))
        .collect();
    println!(
        "failed requests (socket errors, timeouts, non-2xx): {}",
        if failed.is_empty() {
            "none".to_string()
        } else {
            failed.join(", ")
        }
    );
    println!(
        "\nModule size: meshcanary_filter.wasm {} bytes, bench_empty.wasm {} bytes",
        report::thousands(meshcanary_bytes),
        report::thousands(empty_bytes)
    );
    let rss: Vec<String> = measured
        .iter()
        .map(|m| {
            let mib = m
                .rss_kib
                .map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0));
            format!("row {} {} MiB", m.setup.row, mib)
        })
        .collect();
    println!("Envoy RSS after load (VmRSS): {}", rss.join(", "));
    println!("\nPolicy decision, native (release build of the policy core; median (min–max) of 7 batches):\n");
    print!("{}", report::micro_table(&timings));

    let worst_decision = timings
        .iter()
        .filter(|t| t.id != "bench_mix")
        .map(|t| t.ns[0])
        .fold(0.0, f64::max);
    let routing_ratio = routed.ratio(empty, wrk::Run::rps);
    let cpu_over_empty = routed.difference(empty, |r| r.cpu_us_per_request().unwrap_or(f64::NAN));
    let [mirror_p99_target, mirror_p50_target] = mirroring_targets(&measured)?;
    let rss_over_empty_mib = match (routed.rss_kib, empty.rss_kib) {
        (Some(a), Some(b)) => (a as f64 - b as f64) / 1024.0,
        _ => f64::NAN,
    };
    let targets = [
        Target {
            name: "full routing policy, requests/s × empty filter (row 3 / row 2)",
            value: routing_ratio.median,
            limit: 0.85,
            at_least: true,
            unit: "",
            per_round: Some(routing_ratio),
        },
        Target {
            name:
                "full routing policy, Envoy CPU per request over the empty filter (row 3 − row 2)",
            value: cpu_over_empty.median,
            limit: 5.0,
            at_least: false,
            unit: " µs",
            per_round: Some(cpu_over_empty),
        },
        Target {
            name: "slowest decision kind, native",
            value: worst_decision,
            limit: 300.0,
            at_least: false,
            unit: " ns",
            per_round: None,
        },
        mirror_p99_target,
        mirror_p50_target,
        Target {
            name: "meshcanary module size",
            value: meshcanary_bytes as f64 / 1000.0,
            limit: 300.0,
            at_least: false,
            unit: " KB",
            per_round: None,
        },
        Target {
            name: "Envoy RSS after the load, meshcanary − empty filter (row 3 − row 2)",
            value: rss_over_empty_mib,
            limit: 8.0,
            at_least: false,
            unit: " MiB",
            per_round: None,
        },
    ];
    // Context for the verdicts: row 3's cost by Envoy's CPU time per request (immune to
    // wrk sharing the machine), the slow shadow against a fast one, and what Envoy's own
    // mirroring does to p99 on the same machine.
    let cpu = |m: &Measured| m.cpu_us().median;
    let rps_ratio = |a: &Measured, b: &Measured| a.ratio(b, wrk::Run::rps).median;
    let p99_ratio = |a: &str, b: &str| -> Result<f64, String> {
        Ok(find(a)?.ratio(find(b)?, |r| r.p99_us as f64).median)
    };
    let one_header = find("one_header_wasm")?;
    let host_call_floor = find("host_call_floor_wasm")?;
    let context = json!({
        "cpu_ratio_empty_to_meshcanary": cpu(empty) / cpu(routed),
        "rps_one_header_to_empty": rps_ratio(one_header, empty),
        "rps_meshcanary_to_one_header": rps_ratio(routed, one_header),
        "rps_host_call_floor_to_empty": rps_ratio(host_call_floor, empty),
        "rps_meshcanary_to_host_call_floor": rps_ratio(routed, host_call_floor),
        "cpu_us_meshcanary_over_host_call_floor": cpu(routed) - cpu(host_call_floor),
        "p99_slow_shadow_to_fast_shadow": p99_ratio("upstream_meshcanary_slow_shadow", "upstream_meshcanary_fast_shadow")?,
        "p99_native_mirror_to_native": p99_ratio("upstream_native_slow_mirror", "upstream_native_weighted")?,
    });
    print_targets(plan, "Targets (issue 12):", &targets);
    if !plan.smoke {
        println!(
            "  context: by Envoy CPU per request, row 2 / row 3 = {:.3}; p99 with the slow shadow / \
             the fast one (row 4c / row 4d) = {:.3}; Envoy's own mirroring, p99 row 5c / row 5b = {:.3}",
            context["cpu_ratio_empty_to_meshcanary"].as_f64().unwrap_or(f64::NAN),
            context["p99_slow_shadow_to_fast_shadow"].as_f64().unwrap_or(f64::NAN),
            context["p99_native_mirror_to_native"].as_f64().unwrap_or(f64::NAN),
        );
        println!(
            "  context: the one-header floor, requests/s row 2b / row 2 = {:.3}; row 3 / row 2b = {:.3}",
            context["rps_one_header_to_empty"].as_f64().unwrap_or(f64::NAN),
            context["rps_meshcanary_to_one_header"].as_f64().unwrap_or(f64::NAN),
        );
        println!(
            "  context: the host-call floor, requests/s row 2c / row 2 = {:.3}; row 3 / row 2c = {:.3} \
             ({:.2} µs of Envoy CPU per request in the module's own work)",
            context["rps_host_call_floor_to_empty"].as_f64().unwrap_or(f64::NAN),
            context["rps_meshcanary_to_host_call_floor"].as_f64().unwrap_or(f64::NAN),
            context["cpu_us_meshcanary_over_host_call_floor"].as_f64().unwrap_or(f64::NAN),
        );
    }

    // --- 6. the JSON record --------------------------------------------------------------
    let record = json!({
        "schema": 1,
        "mode": if plan.smoke { "smoke" } else { "full" },
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "git_commit": git_commit(),
        "machine": machine,
        "envoy": {"version": envoy_version, "workers": WORKERS},
        "wrk": {"version": wrk_version, "threads": wrk::THREADS,
                "connections": plan.connections, "latency_connections": plan.latency_connections},
        "rounds": plan.rounds,
        "duration_s": plan.duration.as_secs(),
        "warmup_s": plan.warmup.as_secs(),
        "primary_delay_ms": plan.primary_delay.as_millis() as u64,
        "shadow_delay_ms": shadow_delay.as_millis() as u64,
        "configurations": measured.iter().map(|m| report::measured_json(m, native, empty)).collect::<Vec<_>>(),
        "module_bytes": {"meshcanary": meshcanary_bytes, "empty": empty_bytes},
        "decision_ns": timings.iter().map(|t| (t.id.to_string(), Spread::range(t.ns[0], t.ns[1], t.ns[2]).json())).collect::<serde_json::Map<_, _>>(),
        "targets": targets.iter().map(Target::json).collect::<Vec<_>>(),
        "context": context,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    report::write_json(&plan.out, &record)?;
    println!(
        "\nResults written to {} ({:.0} s in all)",
        plan.out.display(),
        started.elapsed().as_secs_f64()
    );

    if plan.smoke {
        smoke_check(&measured, &timings, &plan.out)?;
        println!("meshcanary-bench: smoke check passed (every row measured, JSON written)");
    }
    Ok(())
}

/// The configuration `id` among the measured ones.
fn configuration<'a>(measured: &'a [Measured], id: &str) -> Result<&'a Measured, String> {
    measured
        .iter()
        .find(|m| m.setup.id == id)
        .ok_or_else(|| format!("configuration {id} missing"))
}

/// An error naming the first row with failed requests, if any.
fn none_failed(measured: &[Measured]) -> Result<(), String> {
    match measured.iter().find(|m| m.failed() > 0) {
        Some(m) => Err(format!(
            "row {}: {} requests failed",
            m.setup.row,
            m.failed()
        )),
        None => Ok(()),
    }
}

/// The target verdicts under `heading`; in smoke mode only a line saying they are not
/// judged.
fn print_targets(plan: &Plan, heading: &str, targets: &[Target]) {
    if plan.smoke {
        println!(
            "\nTargets (issue 12): not judged in smoke mode (durations too short to mean anything)"
        );
        return;
    }
    println!("\n{heading}");
    for target in targets {
        println!("  {}", target.line());
    }
}

/// The rows `--mirroring` runs: meshcanary routing to a real upstream without and with
/// mirroring to the slow shadow (4b, 4c), and Envoy's own routing and mirroring (5b, 5c).
const MIRRORING_ROWS: [&str; 4] = [
    "upstream_meshcanary",
    "upstream_meshcanary_slow_shadow",
    "upstream_native_weighted",
    "upstream_native_slow_mirror",
];

/// The mirroring targets, from the rows of [`MIRRORING_ROWS`]: primary p99 with the slow
/// shadow over without, meshcanary's mirroring (4c / 4b) against Envoy's own (5c / 5b)
/// round by round; and primary p50 with the slow shadow over without (4c / 4b).
fn mirroring_targets(measured: &[Measured]) -> Result<[Target; 2], String> {
    let find = |id: &str| configuration(measured, id);
    let [plain, mirrored, native_plain, native_mirrored] = MIRRORING_ROWS;
    let (plain, mirrored) = (find(plain)?, find(mirrored)?);
    let (native_plain, native_mirrored) = (find(native_plain)?, find(native_mirrored)?);
    let p99 = |r: &wrk::Run| r.p99_us as f64;
    let per_round: Vec<f64> = mirrored
        .runs
        .iter()
        .zip(&plain.runs)
        .zip(native_mirrored.runs.iter().zip(&native_plain.runs))
        .map(|((m, p), (nm, np))| (p99(m) / p99(p)) / (p99(nm) / p99(np)))
        .collect();
    let p99_vs_envoy = Spread::of(&per_round);
    let p50_ratio = mirrored.ratio(plain, |r| r.p50_us as f64);
    Ok([
        Target {
            name: "primary p99 with every GET mirrored to a 20× slower shadow, meshcanary ÷ Envoy's own mirroring ((4c / 4b) ÷ (5c / 5b))",
            value: p99_vs_envoy.median,
            limit: 1.0,
            at_least: false,
            unit: "",
            per_round: Some(p99_vs_envoy),
        },
        Target {
            name: "primary p50 with every GET mirrored to the slow shadow × without (row 4c / row 4b), unchanged within 5 %",
            value: p50_ratio.median,
            limit: 1.05,
            at_least: false,
            unit: "",
            per_round: Some(p50_ratio),
        },
    ])
}

/// `--mirroring`'s report: the latency table, the two targets with the median's 95 %
/// interval, and the JSON record (every round's p99 per row).
fn report_mirroring(plan: &Plan, measured: &[Measured], started: Instant) -> Result<(), String> {
    println!(
        "\nPrimary latency with a slow shadow, {} rounds; median (min–max) over the rounds; ratios are per round, then the median.\n",
        plan.rounds
    );
    print!("{}", report::latency_table(measured));
    let targets = mirroring_targets(measured)?;
    print_targets(
        plan,
        "Targets (issue 12), judged by the median's 95 % interval over the rounds:",
        &targets,
    );
    let configurations: Vec<Value> = measured
        .iter()
        .map(|m| {
            json!({
                "row": m.setup.row,
                "id": m.setup.id,
                "title": m.setup.title,
                "rps": m.rps().json(),
                "p50_ms": m.p50_ms().json(),
                "p99_ms": m.p99_ms().json(),
                "envoy_cpu_us_per_request": m.cpu_us().json(),
                "failed_requests": m.failed(),
                "runs": m.runs.iter().map(|r| json!({"rps": r.rps(), "p50_us": r.p50_us, "p99_us": r.p99_us})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let record = json!({
        "schema": "meshcanary-bench-mirroring/1",
        "mode": if plan.smoke { "smoke" } else { "full" },
        "git_commit": git_commit(),
        "machine": machine(),
        "rounds": plan.rounds,
        "duration_s": plan.duration.as_secs(),
        "warmup_s": plan.warmup.as_secs(),
        "latency_connections": plan.latency_connections,
        "primary_delay_ms": plan.primary_delay.as_millis() as u64,
        "configurations": configurations,
        "targets": targets.iter().map(Target::json).collect::<Vec<_>>(),
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    report::write_json(&plan.out, &record)?;
    println!("\nResults written to {}", plan.out.display());
    if plan.smoke {
        smoke_check(measured, &[], &plan.out)?;
        println!(
            "meshcanary-bench: smoke check passed (every mirroring row measured, JSON written)"
        );
        return Ok(());
    }
    none_failed(measured)
}

/// `--compare`'s report: the table, and the JSON record.
fn report_comparison(plan: &Plan, measured: &[Measured]) -> Result<(), String> {
    let (empty, first) = match measured {
        [empty, first, ..] => (empty, first),
        _ => return Err("--compare: nothing measured".into()),
    };
    println!("\nrow 3's policy with each module, next to the empty filter; median (min–max) over the rounds; ratios are per round, then the median.\n");
    print!("{}", report::compare_table(measured, empty, first));
    let modules: Vec<Value> = measured
        .iter()
        .map(|m| {
            json!({
                "row": m.setup.row,
                "title": m.setup.title,
                "rps": m.rps().json(),
                "rps_to_empty": m.ratio(empty, wrk::Run::rps).json(),
                "rps_to_first": m.ratio(first, wrk::Run::rps).json(),
                "envoy_cpu_us_per_request": m.cpu_us().json(),
                "rss_kib": m.rss_kib,
                "failed": m.failed(),
            })
        })
        .collect();
    let record = json!({
        "schema": "meshcanary-bench-compare/1",
        "rounds": plan.rounds,
        "duration_s": plan.duration.as_secs(),
        "configurations": modules,
    });
    report::write_json(&plan.out, &record)?;
    println!("\nResults written to {}", plan.out.display());
    none_failed(measured)
}

/// A policy file for `--policies`, checked as the filter checks it: a row whose policy
/// the filter refused would count a request the filter lets through undecided.
fn read_policy(path: &std::path::Path) -> Result<(String, Value), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("--policies {}: {e}", path.display()))?;
    meshcanary_policy::Policy::from_json(&bytes)
        .map_err(|errors| format!("--policies {}: {errors}", path.display()))?;
    let policy = serde_json::from_slice(&bytes)
        .map_err(|e| format!("--policies {}: {e}", path.display()))?;
    let label = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Ok((label, policy))
}

/// Row `a`'s instructions per request ÷ row `b`'s, round by round.
fn ratio_per_round(a: &instructions::Counted, b: &instructions::Counted) -> Spread {
    let values: Vec<f64> = a
        .per_request
        .iter()
        .zip(&b.per_request)
        .map(|(a, b)| a / b)
        .collect();
    Spread::of(&values)
}

/// `--instructions`: the throughput rows under callgrind, and their table.
async fn count_instructions(plan: &Plan, requests: usize) -> Result<(), String> {
    println!(
        "meshcanary bench --instructions: {} round(s); per row and round a fresh Envoy under valgrind --tool=callgrind, {requests} requests of the bench mix counted after {requests} of warm-up, one at a time on one connection",
        plan.rounds
    );
    // The throughput rows answer by themselves. The rows that need an upstream or a
    // shadow (asked for by name: `--rows 4b,4c,5b,5c`) get ones that answer at once: a
    // slow shadow changes when a copy's answer comes, not what Envoy executes for it, and
    // would only pile copies up against `max_in_flight` between the one-at-a-time requests.
    let mut upstreams = Vec::new();
    let addrs = if !plan.rows.is_empty() {
        for name in ["stable", "shadow"] {
            let options = Options {
                record: false,
                ..Options::default()
            };
            upstreams.push(
                Upstream::start_with_options(name, Behaviour::default(), options)
                    .await
                    .map_err(|e| format!("upstream {name}: {e}"))?,
            );
        }
        Addresses {
            primary: upstreams[0].addr,
            fast_shadow: upstreams[1].addr,
            slow_shadow: upstreams[1].addr,
        }
    } else {
        let unused: std::net::SocketAddr = ([127, 0, 0, 1], 9).into();
        Addresses {
            primary: unused,
            fast_shadow: unused,
            slow_shadow: unused,
        }
    };
    // With --host-calls: the probes, one kind of call 20 times a request each; with
    // --compare: row 3 once per module, next to the empty filter.
    let (all, baseline, calls) = if plan.host_calls {
        (
            host_calls::probes(&plan.probe_wasm),
            "none",
            host_calls::REPEAT,
        )
    } else if !plan.compare.is_empty() {
        (
            instructions::rows(setups::compare(&addrs, &plan.empty_wasm, &plan.compare)),
            "empty_wasm",
            1,
        )
    } else if !plan.policies.is_empty() {
        // Against row 3: each row's "× row 3" is the growth the target bounds.
        (
            setups::policies(
                &addrs,
                &plan.empty_wasm,
                &plan.meshcanary_wasm,
                &plan.policies,
            ),
            "meshcanary",
            1,
        )
    } else if plan.rows.is_empty() {
        (
            instructions::rows(setups::all(&addrs, &plan.empty_wasm, &plan.probe_wasm)),
            "empty_wasm",
            1,
        )
    } else {
        // Rows asked for by name: any of them, mirroring rows included.
        (
            setups::all(&addrs, &plan.empty_wasm, &plan.probe_wasm),
            "empty_wasm",
            1,
        )
    };
    let rows: Vec<Setup> = all
        .into_iter()
        .filter(|s| plan.rows.is_empty() || plan.rows.contains(&s.row))
        .collect();
    if rows.is_empty() {
        return Err(format!("--rows {}: no such row", plan.rows.join(",")));
    }
    let counted = instructions::count(
        rows,
        plan.rounds,
        requests,
        requests,
        plan.keep_dumps.as_deref(),
        plan.cache_sim,
    )
    .await?;
    print!(
        "\n{}",
        report::instructions_table(&counted, baseline, calls)
    );
    if plan.cache_sim {
        print!("\n{}", report::cache_table(&counted));
    }
    let row = |id: &str| counted.iter().find(|c| c.setup.id == id);
    let [plain, mirrored, native_plain, native_mirrored] = MIRRORING_ROWS;
    if let (Some(plain), Some(mirrored), Some(native_plain), Some(native_mirrored)) = (
        row(plain),
        row(mirrored),
        row(native_plain),
        row(native_mirrored),
    ) {
        // What mirroring every GET adds to a request in Envoy: meshcanary's copy (the
        // stream's hand-over, the root's wake-up and HTTP call, the answer) against
        // Envoy's own `request_mirror_policies`, round by round.
        let added = |with: &instructions::Counted, without: &instructions::Counted| {
            with.per_request
                .iter()
                .zip(&without.per_request)
                .map(|(a, b)| a - b)
                .collect::<Vec<f64>>()
        };
        let (ours, envoys) = (added(mirrored, plain), added(native_mirrored, native_plain));
        let ratio: Vec<f64> = ours.iter().zip(&envoys).map(|(o, e)| o / e).collect();
        println!(
            "\nWhat a copy of every GET adds to a request: meshcanary (row {} − row {}) {} \
             instructions, Envoy's own mirroring (row {} − row {}) {}; meshcanary ÷ Envoy {}",
            mirrored.setup.row,
            plain.setup.row,
            Spread::of(&ours).cell(0),
            native_mirrored.setup.row,
            native_plain.setup.row,
            Spread::of(&envoys).cell(0),
            Spread::of(&ratio).cell(3),
        );
    }
    if let (Some(empty), Some(routed), false) =
        (row("empty_wasm"), row("meshcanary"), plan.host_calls)
    {
        // When Envoy's worker is the bottleneck, requests/s go as the inverse of the
        // work per request: the same verdict as `make bench`'s requests/s target,
        // without the noise.
        let bound = ratio_per_round(empty, routed);
        let target = Target {
            name:
                "full routing policy, requests/s bound × empty filter (row 2 ÷ row 3 instructions)",
            value: bound.median,
            limit: 0.85,
            at_least: true,
            unit: "",
            per_round: Some(bound),
        };
        println!(
            "\nTarget (issue 12), by instruction count:\n  {}",
            target.line()
        );
        if let Some(floor) = row("host_call_floor_wasm") {
            let own: Vec<f64> = routed
                .per_request
                .iter()
                .zip(&floor.per_request)
                .map(|(a, b)| a - b)
                .collect();
            println!(
                "  context: the host-call floor alone, row 2 ÷ row 2c = {:.3}; the module's own work, row 3 − row 2c = {:.0} instructions per request",
                ratio_per_round(empty, floor).median,
                Spread::of(&own).median
            );
        }
    }
    if let Some(routed) = row("meshcanary") {
        let grown: Vec<&instructions::Counted> = counted
            .iter()
            .filter(|c| c.setup.id.starts_with("policy_"))
            .collect();
        if !grown.is_empty() {
            println!("\nTargets (issue 12), cost per request in Envoy against row 3's:");
        }
        for policy in grown {
            let spread = ratio_per_round(policy, routed);
            let target = Target {
                name: "Envoy instructions per request × row 3",
                value: spread.median,
                limit: 1.2,
                at_least: false,
                unit: "",
                per_round: Some(spread),
            };
            println!(
                "  row {} ({}): {}",
                policy.setup.row,
                policy.setup.title,
                target.line()
            );
        }
    }
    let record = instructions::record(&counted, requests, requests);
    report::write_json(&plan.out, &record)?;
    println!("\nResults written to {}", plan.out.display());
    Ok(())
}

/// Runs the rounds: every configuration once per round, in order. Each measurement gets
/// an Envoy of its own, started from the configuration's bootstrap, checked with a first
/// request, warmed up, measured and stopped before the next one starts: no other Envoy
/// runs (idle, timers, memory) while one is measured, and no run inherits another's
/// state (V8's compiled tiers, connections, stats). The counters and memory reported are
/// the last round's, read after its load.
async fn alternate(
    plan: &Plan,
    script: &Path,
    setups: Vec<Setup>,
    started: Instant,
) -> Result<Vec<Measured>, String> {
    let mut measured: Vec<Measured> = setups
        .into_iter()
        .map(|setup| Measured {
            setup,
            runs: Vec::new(),
            rss_kib: None,
            counters: Vec::new(),
        })
        .collect();
    for round in 1..=plan.rounds {
        for m in measured.iter_mut() {
            let setup = &m.setup;
            let text = serde_json::to_string_pretty(&setup.bootstrap).map_err(|e| e.to_string())?;
            let envoy = Envoy::start_with_file(&text, "envoy.json", WORKERS)
                .await
                .map_err(|e| {
                    format!("row {} ({}): Envoy did not start: {e}", setup.row, setup.id)
                })?;
            let connections = plan.connections_for(setup);
            let outcome = async {
                check_answers(&envoy, setup).await?;
                if !plan.warmup.is_zero() {
                    wrk::run(script, envoy.listener, None, connections, plan.warmup).await?;
                }
                wrk::run(
                    script,
                    envoy.listener,
                    envoy.pid(),
                    connections,
                    plan.duration,
                )
                .await
                .map_err(|e| format!("round {round}, row {}: {e}", setup.row))
            }
            .await;
            let rss_kib = envoy.pid().and_then(meshcanary_e2e::envoy::rss_kib);
            let prefix = format!("wasmcustom.meshcanary.{}.", setups::POLICY_NAME);
            let mut counters: Vec<(String, u64)> = envoy
                .stats()
                .await
                .into_iter()
                .filter(|(name, value)| name.starts_with(&prefix) && *value > 0)
                .map(|(name, value)| (name[prefix.len()..].to_string(), value))
                .collect();
            counters.sort();
            let log = envoy.log();
            envoy.stop().await;
            if let Some(line) = meshcanary_e2e::wasm_failure(&log) {
                return Err(format!(
                    "round {round}, row {} ({}): the module failed in Envoy: {line}",
                    setup.row, setup.id
                ));
            }
            m.runs.push(outcome?);
            m.rss_kib = rss_kib;
            m.counters = counters;
        }
        eprintln!(
            "meshcanary-bench: round {round}/{} done ({:.0} s)",
            plan.rounds,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(measured)
}

/// One request through a fresh Envoy must be answered 200, or the configuration is wrong
/// and its numbers would measure an error path.
async fn check_answers(envoy: &Envoy, setup: &Setup) -> Result<(), String> {
    let answer = envoy
        .client()
        .get(envoy.url("/shop/cart"))
        .header("x-user-id", "user-1")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| format!("row {}: first request failed: {e}", setup.row))?;
    if answer.status().as_u16() != 200 {
        return Err(format!(
            "row {} ({}): first request answered {}; Envoy log:\n{}",
            setup.row,
            setup.id,
            answer.status(),
            envoy.log()
        ));
    }
    Ok(())
}

/// What the smoke mode promises: every row has numbers, nothing failed, the JSON is there.
fn smoke_check(measured: &[Measured], timings: &[micro::Timing], out: &Path) -> Result<(), String> {
    // A number that is NaN, zero or negative is not a measurement.
    let positive = |v: f64| v > 0.0;
    let mut problems = Vec::new();
    for m in measured {
        let (rps, p50, p99) = (m.rps().median, m.p50_ms().median, m.p99_ms().median);
        if !(positive(rps) && positive(p50) && positive(p99)) {
            problems.push(format!(
                "row {}: requests/s {rps}, p50 {p50}, p99 {p99}",
                m.setup.row
            ));
        }
        if m.failed() > 0 {
            problems.push(format!(
                "row {}: {} failed requests",
                m.setup.row,
                m.failed()
            ));
        }
        if m.rss_kib.unwrap_or(0) == 0 {
            problems.push(format!("row {}: no RSS reading", m.setup.row));
        }
    }
    for t in timings {
        if !positive(t.ns[0]) {
            problems.push(format!("decision {}: {} ns", t.id, t.ns[0]));
        }
    }
    let written: Option<Value> = std::fs::read(out)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let rows_in_json = written
        .as_ref()
        .and_then(|v| v["configurations"].as_array())
        .map_or(0, Vec::len);
    if rows_in_json != measured.len() {
        problems.push(format!(
            "{}: expected {} configurations in the JSON, found {rows_in_json}",
            out.display(),
            measured.len()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("smoke check failed:\n  {}", problems.join("\n  ")))
    }
}

/// `nproc` and the CPU model.
fn machine() -> Value {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    json!({"nproc": nproc, "cpu_model": cpu_model})
}

/// Envoy's release (`1.40.0/Clean/RELEASE/BoringSSL`) from `envoy --version`.
fn envoy_version() -> Result<String, String> {
    let output = std::process::Command::new(paths::envoy())
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e} (make envoy)", paths::envoy().display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let full = text.split("version:").nth(1).unwrap_or(&text).trim();
    // `<commit>/<version>/…`: the commit says little to a reader.
    Ok(full
        .split_once('/')
        .map_or(full, |(_, rest)| rest)
        .to_string())
}

/// The checked-out commit, for trend tracking (`null` outside a git checkout).
fn git_commit() -> Value {
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(paths::repo())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or(Value::Null, |o| {
            json!(String::from_utf8_lossy(&o.stdout).trim())
        })
}
