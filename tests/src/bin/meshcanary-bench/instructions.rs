//! `--instructions`: how many instructions Envoy executes per request, counted by
//! valgrind's callgrind, for the throughput rows.
//!
//! Wall-clock numbers on a shared two-CPU machine move with everything else it runs; an
//! instruction count does not. Each row gets a fresh Envoy (the same bootstrap `make
//! bench` uses) started under `valgrind --tool=callgrind`, V8 and the Wasm module
//! included (`--smc-check=all-non-file`, for the code V8 writes at run time). The harness
//! sends the `make bench` request mix one request at a time on one keep-alive
//! connection: first `warmup` requests (V8 compiles the module's hot functions again, in
//! its optimizing tier, while they run), then callgrind's counters are zeroed
//! (`callgrind_control -z`), `requests` more are sent and the counters dumped
//! (`callgrind_control -d`). Instructions per request are the dump's total over
//! `requests`: every thread of Envoy counts, so the main thread's timers in that window
//! do too (the same for every row, and small).
//!
//! What the count leaves out is what an instruction costs: a cache miss or a branch
//! mispredicted weighs more in time than in this count. It is the measurement that can
//! say which of two rows does more work, run after run; the time tables say how much
//! that is worth on this machine.

use std::path::Path;
use std::time::{Duration, Instant};

use meshcanary_e2e::Envoy;
use serde_json::{json, Value};

use crate::setups::{Family, Setup, SHADOW_CLUSTER, WORKERS};

/// How long Envoy may take to start under valgrind (V8 compiles the module first).
const READY_WITHIN: Duration = Duration::from_secs(300);

/// How long `callgrind_control` may wait for valgrind to take a command: it is taken when
/// one of Envoy's threads next runs, and the main thread wakes at least every few seconds.
const CONTROL_WITHIN: Duration = Duration::from_secs(60);

/// What one row measured.
pub struct Counted {
    pub setup: Setup,
    /// Instructions per request, one per round.
    pub per_request: Vec<f64>,
    /// With `--cache-sim`: every event callgrind counted (`Ir`, `I1mr`, `Bcm` …), per
    /// request, one map per round.
    pub events: Vec<Vec<(String, f64)>>,
}

/// The rows counted by default: the throughput family (Envoy answers itself), without
/// mirroring (a copy is a second request, which this one-connection client would count
/// as the primary's). `--rows` names any row, the mirroring ones included: then what is
/// counted is the primary and its copy together, which is what comparing two ways of
/// mirroring needs.
pub fn rows(all: Vec<Setup>) -> Vec<Setup> {
    all.into_iter()
        .filter(|s| s.family == Family::Throughput && s.id != "meshcanary_mirror")
        .collect()
}

/// Counts every row `rounds` times, rows alternated within a round.
pub async fn count(
    setups: Vec<Setup>,
    rounds: u32,
    warmup: usize,
    requests: usize,
    keep_dumps: Option<&Path>,
    cache_sim: bool,
) -> Result<Vec<Counted>, String> {
    let started = Instant::now();
    let mut counted: Vec<Counted> = setups
        .into_iter()
        .map(|setup| Counted {
            setup,
            per_request: Vec::new(),
            events: Vec::new(),
        })
        .collect();
    for round in 1..=rounds {
        for c in counted.iter_mut() {
            let keep = keep_dumps
                .map(|dir| dir.join(format!("row-{}.round-{round}.callgrind", c.setup.row)));
            let events = count_one(&c.setup, warmup, requests, keep.as_deref(), cache_sim)
                .await
                .map_err(|e| format!("round {round}, row {}: {e}", c.setup.row))?;
            let per_request: Vec<(String, f64)> = events
                .into_iter()
                .map(|(name, total)| (name, total as f64 / requests as f64))
                .collect();
            // `read_events` returns only dumps that count `Ir`.
            let instructions = per_request
                .iter()
                .find(|(name, _)| name == "Ir")
                .map_or(0.0, |(_, v)| *v);
            c.per_request.push(instructions);
            if cache_sim {
                c.events.push(per_request);
            }
            eprintln!(
                "meshcanary-bench: round {round}, row {}: {instructions:.0} instructions per request ({:.0} s)",
                c.setup.row,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(counted)
}

/// One row, one round: what Envoy executed for `requests` requests, event by event
/// (`Ir`, instructions, always; with `cache_sim` the simulated misses too).
async fn count_one(
    setup: &Setup,
    warmup: usize,
    requests: usize,
    keep: Option<&Path>,
    cache_sim: bool,
) -> Result<Vec<(String, u64)>, String> {
    let out_dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let out_file = out_dir.path().join("callgrind.out");
    let mut wrapper: Vec<String> = vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--smc-check=all-non-file".into(),
        // `.venv/bin/envoy` is a launcher that execs the real binary: follow it.
        "--trace-children=yes".into(),
        format!("--callgrind-out-file={}", out_file.display()),
    ];
    if cache_sim {
        wrapper.push("--cache-sim=yes".into());
        wrapper.push("--branch-sim=yes".into());
    }
    let text = serde_json::to_string_pretty(&setup.bootstrap).map_err(|e| e.to_string())?;
    let envoy = Envoy::start_under(&wrapper, &text, "envoy.json", WORKERS, READY_WITHIN)
        .await
        .map_err(|e| format!("Envoy did not start under valgrind: {e}"))?;
    let outcome = async {
        let pid = envoy.pid().ok_or("Envoy exited before it was measured")?;
        send(&envoy, 0, warmup).await?;
        control(pid, "-z").await?;
        send(&envoy, warmup, requests).await?;
        control(pid, "-d").await?;
        let (events, dump) = read_events(out_dir.path())?;
        if let Some(keep) = keep {
            if let Some(dir) = keep.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            std::fs::copy(&dump, keep).map_err(|e| format!("{}: {e}", keep.display()))?;
        }
        let stats = envoy.stats().await;
        let sent = (warmup + requests) as u64;
        if setup.id.contains("mirror") || setup.id.ends_with("_shadow") {
            // Every request was copied (the last copies may still be on their way).
            let copies_stat = format!("cluster.{SHADOW_CLUSTER}.upstream_rq_total");
            let copies = stats
                .iter()
                .find(|(name, _)| *name == &copies_stat)
                .map_or(0, |(_, value)| *value);
            if copies < sent * 99 / 100 {
                return Err(format!(
                    "the shadow received {copies} copies of {sent} requests"
                ));
            }
        }
        if setup.id.contains("meshcanary")
            || setup.id.starts_with("module_")
            || setup.id.starts_with("policy_")
        {
            // The filter decided every request it saw: the counted path is the real one.
            // (One policy per Envoy, whatever its name.)
            let decided: u64 = stats
                .iter()
                .filter(|(name, _)| {
                    name.starts_with("wasmcustom.meshcanary.")
                        && name.contains(".variant.")
                        && name.ends_with(".requests")
                })
                .map(|(_, value)| value)
                .sum();
            if decided < sent {
                return Err(format!("the filter decided {decided} of {sent} requests"));
            }
        }
        Ok(events)
    }
    .await;
    let log = envoy.log();
    envoy.stop().await;
    if let Some(line) = meshcanary_e2e::wasm_failure(&log) {
        return Err(format!("the module failed in Envoy: {line}"));
    }
    outcome
}

/// Sends requests `first..first + n` of the mix, one at a time, each answered 200.
async fn send(envoy: &Envoy, first: usize, n: usize) -> Result<(), String> {
    for i in first..first + n {
        let headers = crate::micro::wrk_mix(i);
        let path = headers
            .iter()
            .find(|(name, _)| *name == ":path")
            .map_or("/", |(_, path)| path.as_str());
        let mut request = envoy
            .client()
            .get(envoy.url(path))
            .header("user-agent", "meshcanary-bench")
            .header("accept", "application/json")
            .timeout(Duration::from_secs(60));
        for (name, value) in &headers {
            if !name.starts_with(':') {
                request = request.header(*name, value);
            }
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("request {i}: {e}"))?;
        let status = response.status();
        response
            .bytes()
            .await
            .map_err(|e| format!("request {i}: {e}"))?;
        if status != 200 {
            return Err(format!("request {i}: answered {status}"));
        }
    }
    Ok(())
}

/// Runs `callgrind_control FLAG PID`.
async fn control(pid: u32, flag: &str) -> Result<(), String> {
    let run = tokio::process::Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .output();
    let output = tokio::time::timeout(CONTROL_WITHIN, run)
        .await
        .map_err(|_| format!("callgrind_control {flag} took over {CONTROL_WITHIN:?}"))?
        .map_err(|e| format!("callgrind_control: {e} (apt-get install valgrind)"))?;
    if !output.status.success() {
        return Err(format!(
            "callgrind_control {flag} {pid}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// The totals of the dump `callgrind_control -d` wrote (`callgrind.out.1`: its `events:`
/// line names what its `summary:` line counts), and the dump's path.
fn read_events(dir: &Path) -> Result<(Vec<(String, u64)>, std::path::PathBuf), String> {
    let deadline = Instant::now() + CONTROL_WITHIN;
    loop {
        for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // The first dump of this run (the file at exit has no suffix).
            if name != "callgrind.out.1" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let line = |prefix: &str| text.lines().find_map(|l| l.strip_prefix(prefix));
            if let (Some(names), Some(totals)) = (line("events:"), line("summary:")) {
                let totals: Option<Vec<u64>> =
                    totals.split_whitespace().map(|v| v.parse().ok()).collect();
                let events: Vec<(String, u64)> = names
                    .split_whitespace()
                    .map(str::to_string)
                    .zip(totals.unwrap_or_default())
                    .collect();
                if events.iter().any(|(name, _)| name == "Ir") {
                    return Ok((events, path));
                }
            }
        }
        if Instant::now() > deadline {
            let listing: Vec<String> = std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            return Err(format!(
                "no callgrind dump in {} (found: {})",
                dir.display(),
                listing.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The record `--instructions` writes.
pub fn record(counted: &[Counted], warmup: usize, requests: usize) -> Value {
    json!({
        "schema": "meshcanary-bench-instructions/1",
        "tool": "valgrind --tool=callgrind",
        "warmup_requests": warmup,
        "requests": requests,
        "rows": counted.iter().map(|c| json!({
            "id": c.setup.id,
            "row": c.setup.row,
            "title": c.setup.title,
            "instructions_per_request": c.per_request,
            "events_per_request": c.events.iter().map(|round| round.iter().map(|(name, v)| (name.clone(), json!(v))).collect::<serde_json::Map<String, Value>>()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
