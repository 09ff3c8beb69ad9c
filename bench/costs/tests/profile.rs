//! The profiler (`make bench-profile`) against the plain measurement: the instrumented
//! module must decide every request as the uninstrumented one does (the harness checks
//! each decision), close every call it opens, and charge to functions the fuel the
//! requests spend. Needs the module (`make wasm`; `MESHCANARY_WASM` or
//! target/wasm/meshcanary_filter.wasm); without its names, functions are numbered.

use std::path::PathBuf;

use meshcanary_costs::{measure, profile, scenarios, FilterModule};

#[test]
fn profile_charges_the_requests_fuel_to_functions_and_changes_no_decision() {
    let wasm = std::env::var_os("MESHCANARY_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/wasm/meshcanary_filter.wasm")
        });
    let bytes = std::fs::read(&wasm)
        .unwrap_or_else(|e| panic!("{}: {e}; build it with `make wasm`", wasm.display()));
    let plain = FilterModule::new(&bytes).expect("the module compiles");
    for scenario in scenarios::all()
        .into_iter()
        .filter(|s| ["bench_mix", "rules_100", "query_prefix"].contains(&s.id))
    {
        let policy = scenario.policy.to_string();
        let measured = measure(&plain, &policy, &scenario.requests).expect("measured");
        // Decisions and counters are checked inside, as for `measure`; open calls too.
        let (instrumented, rows) = profile::profile(&bytes, &policy, &scenario.requests)
            .unwrap_or_else(|e| panic!("{}: {e}", scenario.id));
        let charged: f64 = rows.iter().map(|r| r.self_fuel).sum();
        let id = scenario.id;
        // Every instruction of the requests runs inside some function, but for the few
        // around the `enter` and `exit` calls of the functions the host calls (about
        // ten a request): the charged fuel is the instrumented total, within 2 %.
        assert!(
            charged <= instrumented.fuel_per_request
                && charged > 0.98 * instrumented.fuel_per_request,
            "{id}: {charged} charged of {}",
            instrumented.fuel_per_request
        );
        // The instrumentation adds two calls per function call: more fuel, not much more.
        assert!(
            instrumented.fuel_per_request > measured.fuel_per_request
                && instrumented.fuel_per_request < 1.2 * measured.fuel_per_request,
            "{id}: instrumented {} against {}",
            instrumented.fuel_per_request,
            measured.fuel_per_request
        );
        assert_eq!(instrumented.host_calls, measured.host_calls, "{id}");
        // Inclusive fuel holds self fuel, and the entry points hold almost everything.
        assert!(rows
            .iter()
            .all(|r| r.inclusive >= r.self_fuel && r.calls > 0.0));
        let widest = rows.iter().map(|r| r.inclusive).fold(0.0, f64::max);
        assert!(
            widest > 0.3 * charged,
            "{id}: widest call {widest} of {charged}"
        );
    }
}
