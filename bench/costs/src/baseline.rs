//! The committed numbers (`bench/costs/baseline.json`) and the comparison a commit must
//! pass: no scenario's fuel per request above its baseline by more than [`MARGIN`], and
//! no host call made more often than in the baseline. The grown policies' target
//! ([`GROWTH_LIMIT`] × the bench policy) is reported by [`growth`], met or not.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::Cost;

/// Allowed growth of fuel per request over the committed baseline.
pub const MARGIN: f64 = 0.10;

/// A grown policy (100 rules, 50 variants, 1,000 `in` values) may cost at most this
/// many times the bench policy per request.
pub const GROWTH_LIMIT: f64 = 1.2;

/// Scenarios that must stay within [`GROWTH_LIMIT`] of `bench_mix`.
pub const GROWN: [&str; 3] = ["rules_100", "variants_50", "in_1000"];

/// The baseline file's JSON for `costs` (scenario id → cost).
pub fn to_json(costs: &[(String, Cost)]) -> Value {
    let scenarios: serde_json::Map<String, Value> = costs
        .iter()
        .map(|(id, cost)| {
            (
                id.clone(),
                json!({
                    "fuel_per_request": round(cost.fuel_per_request),
                    "host_calls": cost.host_calls.iter()
                        .map(|(k, v)| (k.clone(), json!(round(*v))))
                        .collect::<serde_json::Map<_, _>>(),
                }),
            )
        })
        .collect();
    json!({
        "interpreter": concat!("wasmi ", "0.51.5"),
        "margin": MARGIN,
        "scenarios": scenarios,
    })
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Every way `costs` fails the baseline; empty when it passes.
pub fn problems(baseline: &Value, costs: &[(String, Cost)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (id, cost) in costs {
        let Some(base) = baseline["scenarios"].get(id) else {
            problems.push(format!(
                "{id}: not in the baseline (add it with --write-baseline)"
            ));
            continue;
        };
        let Some(base_fuel) = base["fuel_per_request"].as_f64() else {
            problems.push(format!("{id}: the baseline has no fuel_per_request"));
            continue;
        };
        if cost.fuel_per_request > base_fuel * (1.0 + MARGIN) {
            problems.push(format!(
                "{id}: {:.0} fuel per request, more than {:.0} % over the baseline's {:.0}",
                cost.fuel_per_request,
                MARGIN * 100.0,
                base_fuel
            ));
        }
        let base_calls: BTreeMap<String, f64> = base["host_calls"]
            .as_object()
            .map(|calls| {
                calls
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default();
        for (call, count) in &cost.host_calls {
            let before = base_calls.get(call).copied().unwrap_or(0.0);
            if *count > before + 1e-3 {
                problems.push(format!(
                    "{id}: {count:.3} {call} per request, the baseline makes {before:.3}"
                ));
            }
        }
    }
    problems
}

/// For each grown policy: its fuel per request over the bench policy's, and whether
/// that is within [`GROWTH_LIMIT`].
pub fn growth(costs: &[(String, Cost)]) -> Vec<(String, f64, bool)> {
    let Some(bench) = costs
        .iter()
        .find(|(id, _)| id == "bench_mix")
        .map(|(_, c)| c.fuel_per_request)
    else {
        return Vec::new();
    };
    costs
        .iter()
        .filter(|(id, _)| GROWN.contains(&id.as_str()))
        .map(|(id, cost)| {
            let ratio = cost.fuel_per_request / bench;
            (id.clone(), ratio, ratio <= GROWTH_LIMIT)
        })
        .collect()
}
