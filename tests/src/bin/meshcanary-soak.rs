//! `make soak`: the filter under load for a long time, with everything that changes its
//! state at once — mirroring on, one policy update a second through ECDS, a shadow that is
//! slow, erroring and sometimes resets — and checks that nothing builds up and nothing is
//! lost:
//!
//! * no request fails because of the filter (every answer 2xx, no socket error);
//! * Envoy's memory (VmRSS, sampled every few seconds) grows by at most 5 % after the
//!   first minute (or the first quarter of a shorter run);
//! * the shadow never holds more copies at once than `max_in_flight` per worker;
//! * counters are conserved: per variant, requests = responses by class + `no_response`.
//!
//! Everything runs on 127.0.0.1 and stops by itself after `--seconds` (default 600).
//! Exit 0 when every check held, 1 otherwise; the table and a JSON report
//! (`target/soak/report.json`) say why.

#[path = "meshcanary-bench/wrk.rs"]
mod wrk;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use meshcanary_e2e::envoy::rss_kib;
use meshcanary_e2e::{
    paths, write_ecds, Behaviour, Cluster, Envoy, EnvoyConfig, FilterSource, Upstream,
};
use serde_json::{json, Value};

/// The soak test (see the module documentation).
#[derive(Parser)]
#[command(name = "meshcanary-soak")]
struct Args {
    /// How long load runs, in seconds (`make soak`: 600; `make test`: 60).
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Policy updates per second through ECDS.
    #[arg(long, default_value_t = 1.0)]
    updates_per_second: f64,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// Largest allowed RSS growth after the warm-up, percent.
    #[arg(long, default_value_t = 5.0)]
    max_rss_growth_percent: f64,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/soak/report.json")]
    out: PathBuf,
}

/// Copies a worker may have in flight (the policy's `max_in_flight`).
const MAX_IN_FLIGHT: u64 = 20;

/// How often Envoy's RSS is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The soak policy: a sticky split whose canary weight moves with every update (so each
/// update is a real change), and GETs mirrored at 50 %.
fn policy(version: u64) -> Value {
    let canary = 5 + version % 20;
    json!({
        "name": "soak",
        "variants": ["stable", "canary"],
        "rules": [
            {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
            {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "soak",
                "weights": [{"variant": "canary", "weight": canary}, {"variant": "stable", "weight": 100 - canary}]}}
        ],
        "mirror": {"cluster": "shadow", "percent": 50, "timeout_ms": 300,
                   "max_in_flight": MAX_IN_FLIGHT, "compare": "status"}
    })
}

/// What the shadow does in phase `n` of its cycle: slow and erroring most of the time,
/// resetting connections some of the time.
fn shadow_behaviour(n: u64) -> Behaviour {
    if n % 4 == 3 {
        Behaviour {
            reset: true,
            ..Behaviour::default()
        }
    } else {
        Behaviour {
            status: 503,
            delay: Duration::from_millis(200),
            ..Behaviour::default()
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match soak(&args).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("meshcanary-soak: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn soak(args: &Args) -> Result<bool, String> {
    wrk::version().await?;
    let quiet = meshcanary_e2e::Options {
        record: false,
        ..meshcanary_e2e::Options::default()
    };
    let start = |name: &'static str, behaviour: Behaviour| {
        let options = quiet.clone();
        async move {
            Upstream::start_with_options(name, behaviour, options)
                .await
                .map_err(|e| format!("{name}: {e}"))
        }
    };
    let stable = start("stable", Behaviour::default()).await?;
    let canary = start("canary", Behaviour::default()).await?;
    let shadow = start("shadow", shadow_behaviour(0)).await?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ecds = dir.path().join("meshcanary.ecds.json");
    let mut config =
        EnvoyConfig::stable_canary(FilterSource::Ecds(ecds.clone()), stable.addr, canary.addr);
    config.clusters.push(Cluster {
        name: "shadow".into(),
        addr: shadow.addr,
    });
    config.concurrency = args.workers;
    write_ecds(&ecds, "0", &policy(0).to_string());
    let envoy = Envoy::start(&config).await?;
    envoy
        .wait_ecds_version("0", Duration::from_secs(10))
        .await?;
    let pid = envoy.pid().ok_or("Envoy has no pid")?;
    let script = paths::repo().join("tests/src/bin/meshcanary-bench/requests.lua");
    let duration = Duration::from_secs(args.seconds);
    let warm_up = Duration::from_secs(60).min(duration / 4);
    println!(
        "soak: {} s of wrk -c{} against Envoy {} ({} workers), mirroring 50 % of GETs to a slow/erroring/resetting shadow, {} policy update(s)/s; module {}",
        args.seconds,
        args.connections,
        paths::envoy().display(),
        args.workers,
        args.updates_per_second,
        paths::wasm().display()
    );

    let (listener, connections) = (envoy.listener, args.connections);
    let load =
        tokio::spawn(
            async move { wrk::run(&script, listener, Some(pid), connections, duration).await },
        );
    let started = Instant::now();
    let update_every = Duration::from_secs_f64(1.0 / args.updates_per_second.max(0.01));
    let mut next_update = started + update_every;
    let mut next_sample = started;
    let mut version = 0u64;
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut update_failures = 0u64;
    while started.elapsed() < duration {
        let now = Instant::now();
        if now >= next_sample {
            if let Some(rss) = rss_kib(pid) {
                samples.push((started.elapsed().as_secs_f64(), rss));
            }
            next_sample += SAMPLE_EVERY;
        }
        if now >= next_update {
            version += 1;
            write_ecds(&ecds, &version.to_string(), &policy(version).to_string());
            shadow.set_behaviour(shadow_behaviour(version));
            next_update += update_every;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let run = load.await.map_err(|e| format!("wrk task: {e}"))??;
    if envoy
        .wait_ecds_version(&version.to_string(), Duration::from_secs(10))
        .await
        .is_err()
    {
        update_failures += 1;
    }
    if let Some(rss) = rss_kib(pid) {
        samples.push((started.elapsed().as_secs_f64(), rss));
    }

    // Let in-flight copies finish and the counters flush before reading them.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stats = envoy.stats().await;
    let prefix = "wasmcustom.meshcanary.soak.variant.";
    let mut conservation = Vec::new();
    for variant in ["stable", "canary"] {
        let get = |what: &str| {
            stats
                .get(&format!("{prefix}{variant}.{what}"))
                .copied()
                .unwrap_or(0)
        };
        let requests = get("requests");
        let answered: u64 = ["1xx", "2xx", "3xx", "4xx", "5xx", "no_response"]
            .iter()
            .map(|class| get(&format!("responses.{class}")))
            .sum();
        conservation.push((variant, requests, answered, get("responses.2xx")));
    }
    let shadow_stat = |name: &str| {
        stats
            .get(&format!("wasmcustom.meshcanary.soak.shadow.{name}"))
            .copied()
            .unwrap_or(0)
    };

    let base = samples
        .iter()
        .find(|(t, _)| *t >= warm_up.as_secs_f64())
        .or(samples.first())
        .map_or(0, |(_, rss)| *rss);
    let last = samples.last().map_or(0, |(_, rss)| *rss);
    let growth = if base > 0 {
        (last as f64 - base as f64) * 100.0 / base as f64
    } else {
        f64::INFINITY
    };
    let shadow_peak = shadow.max_in_flight() as u64;
    let counted: u64 = conservation.iter().map(|(_, r, _, _)| r).sum();

    let mut checks: Vec<(String, bool)> = vec![
        (
            format!(
                "no failed request: {} requests, {} non-2xx, {} socket errors",
                run.requests, run.status_errors, run.socket_errors
            ),
            run.status_errors == 0 && run.socket_errors == 0 && run.requests > 0,
        ),
        (
            format!(
                "Envoy RSS after {:.0} s: {:.1} → {:.1} MiB ({:+.2} %, limit {:+.1} %)",
                warm_up.as_secs_f64(),
                base as f64 / 1024.0,
                last as f64 / 1024.0,
                growth,
                args.max_rss_growth_percent
            ),
            growth <= args.max_rss_growth_percent,
        ),
        (
            format!(
                "copies in flight at the shadow at most {} (max_in_flight {} × {} workers)",
                shadow_peak, MAX_IN_FLIGHT, args.workers
            ),
            shadow_peak <= MAX_IN_FLIGHT * u64::from(args.workers),
        ),
        (
            format!(
                "{} policy updates, the last one applied",
                version
            ),
            update_failures == 0,
        ),
        (
            // wrk does not count the requests its connections still had open when it
            // stopped; the filter does (as `no_response` when wrk hung up).
            format!(
                "every request counted once: {} counted, {} completed by wrk (+ at most {} cut off at the end)",
                counted, run.requests, args.connections
            ),
            counted >= run.requests && counted <= run.requests + u64::from(args.connections),
        ),
    ];
    for (variant, requests, answered, ok) in &conservation {
        checks.push((
            format!(
                "{variant}: requests {requests} = responses by class + no_response {answered} ({ok} 2xx)"
            ),
            requests == answered,
        ));
    }
    // Every copy sent ends counted: answered (by class), failed or timed out. A copy cut
    // off when a policy update replaced its root would be in none of them.
    let copies_ended: u64 = ["1xx", "2xx", "3xx", "4xx", "5xx"]
        .iter()
        .map(|class| shadow_stat(&format!("responses.{class}")))
        .sum::<u64>()
        + shadow_stat("failed")
        + shadow_stat("timed_out");
    checks.push((
        format!(
            "every copy sent ended counted: {} sent, {} answered, failed or timed out",
            shadow_stat("sent"),
            copies_ended
        ),
        shadow_stat("sent") == copies_ended && shadow_stat("sent") > 0,
    ));
    let log = envoy.log();
    let failure = meshcanary_e2e::wasm_failure(&log).map(str::to_string);
    checks.push((
        format!(
            "no trap or panic in Envoy's log{}",
            failure
                .as_deref()
                .map(|l| format!(": {l}"))
                .unwrap_or_default()
        ),
        failure.is_none(),
    ));

    println!("\nRSS (MiB) every {} s:", SAMPLE_EVERY.as_secs());
    let curve: Vec<String> = samples
        .iter()
        .map(|(t, rss)| format!("{:.0}s {:.1}", t, *rss as f64 / 1024.0))
        .collect();
    println!("  {}", curve.join(", "));
    println!(
        "shadow: sent {}, failed {}, timed out {}, skipped in_flight_limit {}, sampled_out {}",
        shadow_stat("sent"),
        shadow_stat("failed"),
        shadow_stat("timed_out"),
        shadow_stat("skipped.in_flight_limit"),
        shadow_stat("skipped.sampled_out"),
    );
    println!(
        "load: {:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms, Envoy CPU {:.1} µs/request\n",
        run.rps(),
        run.p50_us as f64 / 1000.0,
        run.p99_us as f64 / 1000.0,
        run.cpu_us_per_request().unwrap_or(f64::NAN)
    );
    let mut all = true;
    for (text, ok) in &checks {
        println!("  {} {}", if *ok { "ok  " } else { "FAIL" }, text);
        all &= *ok;
    }
    let report = json!({
        "seconds": args.seconds,
        "workers": args.workers,
        "updates": version,
        "requests": run.requests,
        "rps": run.rps(),
        "status_errors": run.status_errors,
        "socket_errors": run.socket_errors,
        "rss_kib": samples.iter().map(|(t, r)| json!([t, r])).collect::<Vec<_>>(),
        "rss_growth_percent": growth,
        "shadow_max_in_flight": shadow_peak,
        "checks": checks.iter().map(|(t, ok)| json!({"check": t, "ok": ok})).collect::<Vec<_>>(),
        "passed": all,
    });
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    std::fs::write(
        &args.out,
        serde_json::to_vec_pretty(&report).unwrap_or_default(),
    )
    .map_err(|e| format!("{}: {e}", args.out.display()))?;
    let passed = checks.iter().filter(|(_, ok)| *ok).count();
    println!(
        "\nsoak: {} passed, {} failed",
        passed,
        checks.len() - passed
    );
    Ok(all)
}
