//! `meshcanary-bench --host-calls` (`make bench-host-calls`): what each kind of host call
//! the filter makes costs in real Envoy — the numbers behind "where row 3's time goes".
//!
//! One Envoy per call kind runs `filter/bench-probe`, which makes that call [`REPEAT`]
//! times per request and nothing else; one more makes no call. Every round runs wrk
//! against each in turn, like the main run. A call's price is the extra Envoy CPU time
//! per request over the no-call probe in the same round, divided by [`REPEAT`]: twenty
//! calls lift the difference well above a shared machine's noise.

use std::net::SocketAddr;
use std::path::Path;

use std::time::Instant;

use serde_json::{json, Value};

use crate::report::{self, Spread};
use crate::setups::{self, Addresses, Family, Setup};
use crate::{wrk, Plan};

/// Calls per request in every probe.
pub const REPEAT: u32 = 20;

/// What the call is, for the table (same order as `bench-probe`'s `Call::ALL`).
const CALLS: [(&str, &str); 9] = [
    ("none", "no call (the baseline)"),
    (
        "request_header_present",
        "read a request header that is present",
    ),
    (
        "request_header_absent",
        "read a request header that is absent",
    ),
    (
        "request_headers_whole_map",
        "read the whole request header map (11 headers)",
    ),
    ("set_request_header", "replace a request header"),
    ("response_status", "read the response's :status"),
    ("counter_increment", "add one to a counter"),
    ("histogram_record", "record a histogram value"),
    ("clock", "read the host clock"),
];

/// One probe configuration per call kind, `REPEAT` calls a request.
pub fn probes(probe_wasm: &Path) -> Vec<Setup> {
    // Nothing is routed upstream: the clusters only have to exist.
    let nowhere = SocketAddr::from(([127, 0, 0, 1], 9));
    let addrs = Addresses {
        primary: nowhere,
        fast_shadow: nowhere,
        slow_shadow: nowhere,
    };
    CALLS
        .iter()
        .map(|(call, what)| Setup {
            id: (*call).into(),
            row: (*call).into(),
            title: (*what).into(),
            family: Family::Throughput,
            bootstrap: setups::probe(&addrs, probe_wasm, &format!("{call} {REPEAT}")),
            baseline: "none".into(),
        })
        .collect()
}

/// Runs the probes and prints the table; writes the JSON record to `plan.out`.
pub async fn run(plan: &Plan, probe_wasm: &Path, script: &Path) -> Result<(), String> {
    if !probe_wasm.is_file() {
        return Err(format!(
            "{}: not built (scripts/build-wasm.sh bench-probe)",
            probe_wasm.display()
        ));
    }
    println!(
        "meshcanary bench, host calls ({}): {} rounds × {} s per call kind, {} calls per request, measured alternately",
        if plan.smoke { "smoke" } else { "full" },
        plan.rounds,
        plan.duration.as_secs(),
        REPEAT
    );
    let probes = probes(probe_wasm);
    let measured = crate::alternate(plan, script, probes, Instant::now()).await?;
    for m in &measured {
        for (round, run) in m.runs.iter().enumerate() {
            if run.socket_errors + run.status_errors > 0 || run.requests == 0 {
                return Err(format!(
                    "round {}, probe {}: {} requests, {} failed",
                    round + 1,
                    m.setup.id,
                    run.requests,
                    run.socket_errors + run.status_errors
                ));
            }
        }
    }

    // Per round: (CPU per request with the call − without) / REPEAT, and the same for
    // wall time per request (1 / requests per second).
    let baseline = &measured[0].runs;
    let per_call = |runs: &[wrk::Run], metric: &dyn Fn(&wrk::Run) -> Option<f64>| {
        let values: Vec<f64> = runs
            .iter()
            .zip(baseline)
            .filter_map(|(run, base)| Some((metric(run)? - metric(base)?) / f64::from(REPEAT)))
            .collect();
        Spread::of(&values)
    };
    let cpu = |r: &wrk::Run| r.cpu_us_per_request();
    let wall = |r: &wrk::Run| (r.rps() > 0.0).then(|| 1e6 / r.rps());
    let mut table = String::from(
        "| host call | µs per call, by Envoy CPU | µs per call, by requests/s | Envoy CPU µs/request |\n|---|---|---|---|\n",
    );
    let mut record = Vec::new();
    for ((call, what), m) in CALLS.iter().zip(&measured) {
        let (by_cpu, by_wall) = (per_call(&m.runs, &cpu), per_call(&m.runs, &wall));
        let cpu_per_request = m.cpu_us();
        let cell = |s: &Spread| {
            if *call == "none" {
                "—".to_string()
            } else {
                s.cell(2)
            }
        };
        table.push_str(&format!(
            "| {what} (`{call}`) | {} | {} | {} |\n",
            cell(&by_cpu),
            cell(&by_wall),
            cpu_per_request.cell(1)
        ));
        record.push(json!({
            "call": call,
            "us_per_call_by_cpu": by_cpu.json(),
            "us_per_call_by_rps": by_wall.json(),
            "envoy_cpu_us_per_request": cpu_per_request.json(),
            "rps": m.rps().json(),
        }));
    }
    println!("\nEach call made {REPEAT} times per request by filter/bench-probe; median (min–max) over the rounds.\n");
    print!("{table}");
    let value = json!({
        "schema": "meshcanary-bench-host-calls/1",
        "mode": if plan.smoke { "smoke" } else { "full" },
        "rounds": plan.rounds,
        "duration_s": plan.duration.as_secs(),
        "calls_per_request": REPEAT,
        "calls": Value::Array(record),
    });
    report::write_json(&plan.out, &value)?;
    println!("\nResults written to {}", plan.out.display());
    Ok(())
}
