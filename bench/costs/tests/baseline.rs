//! The filter module's cost per request against the committed baseline
//! (`bench/costs/baseline.json`): fuel within 10 %, no more host calls than committed
//! (which also holds the grown policies to their committed cost). Deterministic: the real module under
//! the wasmi interpreter, so a failure is the module's doing, never the machine's load.
//! Needs the module (`make wasm`; `MESHCANARY_WASM` or target/wasm/meshcanary_filter.wasm).

use std::path::PathBuf;

use meshcanary_costs::{baseline, measure, scenarios, FilterModule};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn filter_cost_per_request_stays_within_the_committed_baseline() {
    let wasm = std::env::var_os("MESHCANARY_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/wasm/meshcanary_filter.wasm"));
    let bytes = std::fs::read(&wasm)
        .unwrap_or_else(|e| panic!("{}: {e}; build it with `make wasm`", wasm.display()));
    let module = FilterModule::new(&bytes).expect("the module compiles");
    let costs: Vec<_> = scenarios::all()
        .into_iter()
        .map(|s| {
            let cost = measure(&module, &s.policy.to_string(), &s.requests)
                .unwrap_or_else(|e| panic!("{}: {e}", s.id));
            (s.id.to_string(), cost)
        })
        .collect();
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("bench/costs/baseline.json"))
            .expect("bench/costs/baseline.json is committed"),
    )
    .expect("the baseline is JSON");
    for (id, cost) in &costs {
        println!(
            "{id}: {:.0} fuel, {:.2} host calls per request",
            cost.fuel_per_request,
            cost.host_calls_total()
        );
    }
    let problems = baseline::problems(&committed, &costs);
    assert!(
        problems.is_empty(),
        "the filter costs more than committed (if on purpose, run `make bench-costs` \
         and commit bench/costs/baseline.json with the reason):\n{}",
        problems.join("\n")
    );
}
