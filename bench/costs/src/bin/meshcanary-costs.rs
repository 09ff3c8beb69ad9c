//! `make bench-costs`: fuel (wasmi instructions) and host calls per request of the real
//! filter module, for `make bench`'s mix, each kind of rule and the grown policies; a
//! table on stdout, JSON in `--out`, and with `--check` a comparison against the
//! committed baseline (exit 1 when it fails).

use std::path::PathBuf;
use std::process::ExitCode;

use meshcanary_costs::{baseline, measure, measure_other, scenarios, Cost, FilterModule};

struct Args {
    wasm: PathBuf,
    empty: Option<PathBuf>,
    out: PathBuf,
    baseline: PathBuf,
    check: bool,
    write_baseline: bool,
    /// Instead of measuring: write the grown policies here, one JSON file each.
    write_policies: Option<PathBuf>,
    /// Instead of measuring: where these scenarios' fuel goes, function by function
    /// (a module with its names: `make bench-profile`).
    profile: Vec<String>,
}

/// Functions listed per profiled scenario.
const PROFILE_ROWS: usize = 30;

const USAGE: &str = "usage: meshcanary-costs [--wasm PATH] [--empty PATH] [--out PATH] \
[--baseline PATH] [--check] [--write-baseline] [--write-policies DIR] [--profile SCENARIO,…]";

fn parse() -> Result<Args, String> {
    let mut args = Args {
        wasm: std::env::var_os("MESHCANARY_WASM")
            .map(PathBuf::from)
            .unwrap_or_else(|| "target/wasm/meshcanary_filter.wasm".into()),
        empty: Some("target/wasm/bench_empty.wasm".into()),
        out: "target/bench/costs.json".into(),
        baseline: "bench/costs/baseline.json".into(),
        check: false,
        write_baseline: false,
        write_policies: None,
        profile: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value; {USAGE}"));
        match arg.as_str() {
            "--wasm" => args.wasm = value("--wasm")?.into(),
            "--empty" => args.empty = Some(value("--empty")?.into()),
            "--out" => args.out = value("--out")?.into(),
            "--baseline" => args.baseline = value("--baseline")?.into(),
            "--check" => args.check = true,
            "--write-baseline" => args.write_baseline = true,
            "--write-policies" => args.write_policies = Some(value("--write-policies")?.into()),
            "--profile" => {
                args.profile = value("--profile")?.split(',').map(str::to_string).collect()
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("meshcanary-costs: {e}");
            ExitCode::from(2)
        }
    }
}

fn load(path: &PathBuf) -> Result<FilterModule, String> {
    let bytes = std::fs::read(path).map_err(|e| {
        format!(
            "cannot read {} ({e}); build it with `make wasm`",
            path.display()
        )
    })?;
    FilterModule::new(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The grown policies as files, `<id>.json`: `make bench-growth` counts what each costs
/// Envoy per request, on the same request mix.
fn write_policies(dir: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for scenario in scenarios::all() {
        if !scenarios::GROWN_ON_BENCH_MIX.contains(&scenario.id) {
            continue;
        }
        let path = dir.join(format!("{}.json", scenario.id));
        let text = serde_json::to_string_pretty(&scenario.policy).map_err(|e| e.to_string())?;
        std::fs::write(&path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// Prints, for each scenario, the functions that spend the most fuel per request.
fn profile(wasm: &std::path::Path, ids: &[String]) -> Result<(), String> {
    let bytes = std::fs::read(wasm).map_err(|e| {
        format!(
            "cannot read {} ({e}); build it with `make bench-profile`",
            wasm.display()
        )
    })?;
    let all = scenarios::all();
    for id in ids {
        let scenario = all.iter().find(|s| s.id == id.as_str()).ok_or_else(|| {
            let known: Vec<&str> = all.iter().map(|s| s.id).collect();
            format!("no scenario {id:?}; the scenarios are {}", known.join(", "))
        })?;
        let (cost, rows) = meshcanary_costs::profile::profile(
            &bytes,
            &scenario.policy.to_string(),
            &scenario.requests,
        )
        .map_err(|e| format!("{id}: {e}"))?;
        println!(
            "\n{id} ({}): {:.0} fuel per request, instrumented; the {PROFILE_ROWS} functions \
             spending the most\n",
            scenario.title, cost.fuel_per_request
        );
        println!("| self | inclusive | calls | function |");
        println!("|---|---|---|---|");
        for row in rows.iter().take(PROFILE_ROWS) {
            println!(
                "| {:.0} | {:.0} | {:.2} | `{}` |",
                row.self_fuel, row.inclusive, row.calls, row.name
            );
        }
    }
    Ok(())
}

fn run() -> Result<bool, String> {
    let args = parse()?;
    if let Some(dir) = &args.write_policies {
        write_policies(dir)?;
        return Ok(true);
    }
    if !args.profile.is_empty() {
        return profile(&args.wasm, &args.profile).map(|()| true);
    }
    let module = load(&args.wasm)?;
    let mut costs: Vec<(String, Cost)> = Vec::new();
    let mut titles = Vec::new();
    for scenario in scenarios::all() {
        let cost = measure(&module, &scenario.policy.to_string(), &scenario.requests)
            .map_err(|e| format!("{}: {e}", scenario.id))?;
        titles.push(scenario.title);
        costs.push((scenario.id.to_string(), cost));
    }
    let empty = match &args.empty {
        Some(path) if path.exists() => {
            let empty = load(path)?;
            Some(measure_other(&empty, "{}", &scenarios::bench_mix()).map_err(|e| e.to_string())?)
        }
        _ => None,
    };

    let bench = costs[0].1.fuel_per_request;
    println!(
        "Module {} ({} bytes); fuel = wasmi 0.51.5 instructions, per request (mean)\n",
        args.wasm.display(),
        std::fs::metadata(&args.wasm).map(|m| m.len()).unwrap_or(0)
    );
    println!("| scenario | fuel / request | request · response · end · copy | × bench mix | host calls / request | allocation callbacks |");
    println!("|---|---|---|---|---|---|");
    let row = |title: &str, c: &Cost, ratio: String| {
        println!(
            "| {title} | {:.0} | {:.0} · {:.0} · {:.0} · {:.0} | {ratio} | {:.2} | {:.2} |",
            c.fuel_per_request,
            c.request_phase,
            c.response_phase,
            c.end_phase,
            c.copy_phase,
            c.host_calls_total(),
            c.host_calls
                .get(meshcanary_costs::host::ALLOCATE_CALLBACK)
                .copied()
                .unwrap_or(0.0),
        )
    };
    if let Some(empty) = &empty {
        row(
            "empty filter (bench_empty.wasm), the bench mix",
            empty,
            "—".into(),
        );
    }
    for ((_, cost), title) in costs.iter().zip(&titles) {
        row(title, cost, format!("{:.2}", cost.fuel_per_request / bench));
    }
    println!("\nHost calls per request:\n");
    for (id, cost) in &costs {
        let calls: Vec<String> = cost
            .host_calls
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect();
        println!("- {id}: {}", calls.join(", "));
    }
    println!(
        "\nGrown policies (target: at most {}× the bench policy per request):\n",
        baseline::GROWTH_LIMIT
    );
    for (id, ratio, met) in baseline::growth(&costs) {
        println!(
            "- {id}: {ratio:.2}× — {}",
            if met { "met" } else { "missed" }
        );
    }
    if let Some(tick) = costs.first().map(|(_, c)| c.tick) {
        println!(
            "\nOne metrics flush (proxy_on_tick, every 100 ms) after the bench mix: {tick} fuel"
        );
    }

    let mut report = baseline::to_json(&costs);
    if let Some(empty) = &empty {
        report["empty_filter_bench_mix"] = serde_json::json!({
            "fuel_per_request": empty.fuel_per_request,
            "host_calls": empty.host_calls,
        });
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(&args.out, text + "\n").map_err(|e| format!("{}: {e}", args.out.display()))?;
    println!("\nWrote {}", args.out.display());
    if args.write_baseline {
        let text =
            serde_json::to_string_pretty(&baseline::to_json(&costs)).map_err(|e| e.to_string())?;
        std::fs::write(&args.baseline, text + "\n")
            .map_err(|e| format!("{}: {e}", args.baseline.display()))?;
        println!("Wrote the baseline {}", args.baseline.display());
    }
    if args.check {
        let text = std::fs::read_to_string(&args.baseline)
            .map_err(|e| format!("{}: {e}", args.baseline.display()))?;
        let base: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", args.baseline.display()))?;
        let problems = baseline::problems(&base, &costs);
        if !problems.is_empty() {
            for p in &problems {
                println!("FAIL {p}");
            }
            return Ok(false);
        }
        let growth = baseline::growth(&costs);
        let missed: Vec<&str> = growth
            .iter()
            .filter(|(_, _, met)| !met)
            .map(|(id, _, _)| id.as_str())
            .collect();
        println!(
            "Within {:.0} % of the baseline; grown policies within {}× the bench policy: {} of {}{}",
            baseline::MARGIN * 100.0,
            baseline::GROWTH_LIMIT,
            growth.len() - missed.len(),
            growth.len(),
            if missed.is_empty() {
                String::new()
            } else {
                format!(" (missed: {})", missed.join(", "))
            }
        );
    }
    Ok(true)
}
