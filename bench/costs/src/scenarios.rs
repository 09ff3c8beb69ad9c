//! The policies and requests measured: `make bench`'s policy and request mix, one
//! policy per kind of rule, and the policies that must not cost more as they grow.

use serde_json::{json, Value};

use crate::Request;

/// One measured case.
pub struct Scenario {
    /// Stable identifier (JSON key, baseline key).
    pub id: &'static str,
    /// What is measured, for the table.
    pub title: &'static str,
    /// The policy JSON given as the plugin configuration.
    pub policy: Value,
    /// The requests, each run once to warm up and once measured.
    pub requests: Vec<Request>,
}

/// The policy of `make bench` (tests/src/bin/meshcanary-bench/setups.rs): three
/// header/cookie rules, then a sticky 10 % split on a header key.
pub fn bench_policy() -> Value {
    json!({
        "name": "bench",
        "decision_header": "x-meshcanary-variant",
        "variants": ["stable", "canary"],
        "rules": bench_rules(),
    })
}

fn bench_rules() -> Value {
    json!([
        {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
        {"name": "beta", "when": [{"cookie": "plan", "in": ["beta", "internal"]}], "variant": "canary"},
        {"name": "staff", "when": [{"header": "x-user-id", "prefix": "staff-"}], "variant": "canary"},
        {"name": "rollout", "split": {
            "by": {"header": "x-user-id"}, "salt": "checkout-v2",
            "weights": [{"variant": "canary", "weight": 10}, {"variant": "stable", "weight": 90}]
        }}
    ])
}

/// `policy` with every GET copied to a shadow cluster (the defaults: 100 % of GET, HEAD
/// and OPTIONS requests, compared by status), as `make bench`'s row 4 mirrors.
fn mirrored(mut policy: Value) -> Value {
    policy["mirror"] = json!({"cluster": "shadow"});
    policy
}

/// A request as Envoy hands wrk's request to the filter: pseudo-headers, the client's
/// headers, then the two Envoy adds (`x-forwarded-proto`, `x-request-id`).
fn request(path: &str, extra: &[(&str, String)]) -> Request {
    let mut headers: Vec<(String, String)> = vec![
        (":authority".into(), "127.0.0.1:10000".into()),
        (":path".into(), path.into()),
        (":method".into(), "GET".into()),
        (":scheme".into(), "http".into()),
        ("user-agent".into(), "meshcanary-bench".into()),
        ("accept".into(), "application/json".into()),
    ];
    headers.extend(extra.iter().map(|(n, v)| (n.to_string(), v.clone())));
    headers.push(("x-forwarded-proto".into(), "http".into()));
    headers.push((
        "x-request-id".into(),
        "8c1e4f2a-5b7d-4c3e-9f1a-2d6b8e0c4a71".into(),
    ));
    Request { headers }
}

fn cookie(i: usize, plan: &str) -> String {
    format!(
        "session={:06}; plan={plan}; theme=dark",
        (i * 7907) % 1_000_000
    )
}

fn user(i: usize) -> String {
    format!("user-{}", (i * 7919) % 100_000)
}

/// Request `i` of `make bench`'s mix (requests.lua; keep them in step): 5 % `x-canary:
/// always`, 10 % a `plan=beta` cookie, 5 % a `staff-` user, 5 % no user id, 75 % one of
/// many user ids.
pub fn bench_request(i: usize) -> Request {
    let kind = i % 20;
    let plan = if kind == 1 || kind == 2 {
        "beta"
    } else {
        "free"
    };
    let mut extra = vec![("cookie", cookie(i, plan))];
    if kind == 0 {
        extra.push(("x-canary", "always".into()));
    }
    if kind == 3 {
        extra.push(("x-user-id", format!("staff-{i}")));
    } else if kind != 4 {
        extra.push(("x-user-id", user(i)));
    }
    request(&format!("/shop/cart?item={i}"), &extra)
}

/// The bench mix, 1,000 requests.
pub fn bench_mix() -> Vec<Request> {
    (0..1000).map(bench_request).collect()
}

fn one_rule(rule: Value) -> Value {
    policy_with(json!([rule]), json!(["stable", "canary"]))
}

fn policy_with(rules: Value, variants: Value) -> Value {
    json!({"name": "costs", "variants": variants, "rules": rules})
}

fn split(by: Value, hash: &str) -> Value {
    json!({"name": "rollout", "split": {
        "by": by, "salt": "checkout-v2", "hash": hash,
        "weights": [{"variant": "canary", "weight": 10}, {"variant": "stable", "weight": 90}]
    }})
}

/// Requests of the bench's shape that the case's rule decides (100 of each).
fn shaped(extra: impl Fn(usize) -> Vec<(&'static str, String)>) -> Vec<Request> {
    (0..100)
        .map(|i| {
            let mut headers = vec![("cookie", cookie(i, "free"))];
            headers.extend(extra(i));
            request(&format!("/shop/cart?item={i}"), &headers)
        })
        .collect()
}

/// Every scenario, in table order.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            id: "bench_mix",
            title: "bench policy, the `make bench` request mix",
            policy: bench_policy(),
            requests: bench_mix(),
        },
        Scenario {
            id: "mirror_bench_mix",
            title: "bench policy + every GET mirrored (the copy handed over, sent and answered)",
            policy: mirrored(bench_policy()),
            requests: bench_mix(),
        },
        Scenario {
            id: "header_equals",
            title: "header equals",
            policy: one_rule(
                json!({"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"}),
            ),
            requests: shaped(|_| vec![("x-canary", "always".into())]),
        },
        Scenario {
            id: "cookie_in",
            title: "cookie in (3-pair cookie header)",
            policy: one_rule(
                json!({"name": "beta", "when": [{"cookie": "plan", "in": ["beta", "internal"]}], "variant": "canary"}),
            ),
            requests: (0..100)
                .map(|i| {
                    request(
                        &format!("/shop/cart?item={i}"),
                        &[("cookie", cookie(i, "beta"))],
                    )
                })
                .collect(),
        },
        Scenario {
            id: "query_prefix",
            title: "query prefix (decoded parameter)",
            policy: one_rule(
                json!({"name": "exp", "when": [{"query": "exp", "prefix": "new-"}], "variant": "canary"}),
            ),
            requests: (0..100)
                .map(|i| {
                    request(
                        &format!("/shop/cart?item={i}&exp=new-checkout"),
                        &[("cookie", cookie(i, "free"))],
                    )
                })
                .collect(),
        },
        Scenario {
            id: "split_sticky_fnv",
            title: "sticky cohort: split by header, fnv",
            policy: one_rule(split(json!({"header": "x-user-id"}), "fnv")),
            requests: shaped(|i| vec![("x-user-id", user(i))]),
        },
        Scenario {
            id: "split_sticky_flagd",
            title: "sticky cohort: split by header, flagd",
            policy: one_rule(split(json!({"header": "x-user-id"}), "flagd")),
            requests: shaped(|i| vec![("x-user-id", user(i))]),
        },
        Scenario {
            id: "split_random",
            title: "split, random per request",
            policy: one_rule(split(json!("random"), "fnv")),
            requests: shaped(|_| Vec::new()),
        },
        Scenario {
            id: "fallback",
            title: "fallback (3 rules tried, none matches)",
            policy: policy_with(
                json!(bench_rules().as_array().map(|r| r[..3].to_vec())),
                json!(["stable", "canary"]),
            ),
            requests: shaped(|i| vec![("x-user-id", user(i))]),
        },
        Scenario {
            id: "rules_100",
            title: "100 rules: 96 that never match, then the bench policy's 4",
            policy: rules_100(),
            requests: bench_mix(),
        },
        Scenario {
            id: "rules_100_same_inputs",
            title: "100 rules on the bench policy's own inputs: 96 that never match, then its 4",
            policy: rules_100_same_inputs(),
            requests: bench_mix(),
        },
        Scenario {
            id: "variants_50",
            title: "50 variants: the bench rules, split over 50",
            policy: variants_50(),
            requests: bench_mix(),
        },
        Scenario {
            id: "in_1000",
            title: "bench policy with 1,000 values in the cookie's `in` list (match at the end)",
            policy: in_1000(),
            requests: bench_mix(),
        },
    ]
}

/// The grown policies measured on the bench mix (`make bench-growth` counts them in Envoy).
pub const GROWN_ON_BENCH_MIX: [&str; 4] = [
    "rules_100",
    "rules_100_same_inputs",
    "variants_50",
    "in_1000",
];

/// 96 rules on a header, a cookie and a query parameter the mix never matches, then the
/// bench policy's rules: every request of the mix is decided by rule 97–100.
fn rules_100() -> Value {
    let mut rules: Vec<Value> = (0..96)
        .map(|i| {
            let when = match i % 3 {
                0 => json!([{"header": "x-tenant", "equals": format!("tenant-{i}")}]),
                1 => json!([{"cookie": "tenant", "equals": format!("tenant-{i}")}]),
                _ => json!([{"query": "tenant", "prefix": format!("tenant-{i}")}]),
            };
            json!({"name": format!("tenant-{i}"), "when": when, "variant": "canary"})
        })
        .collect();
    rules.extend(bench_rules().as_array().cloned().unwrap_or_default());
    let mut policy = bench_policy();
    policy["rules"] = Value::Array(rules);
    policy
}

/// 96 rules on the headers and cookie the bench policy reads (`x-canary`, `x-user-id`,
/// the `plan` cookie), with values the mix never sends, then the bench policy's rules:
/// what the rules themselves cost, when no new part of the request has to be read.
fn rules_100_same_inputs() -> Value {
    let mut rules: Vec<Value> = (0..96)
        .map(|i| {
            let when = match i % 3 {
                0 => json!([{"header": "x-canary", "equals": format!("tenant-{i}")}]),
                1 => {
                    json!([{"cookie": "plan", "in": [format!("tenant-{i}"), format!("team-{i}")]}])
                }
                _ => json!([{"header": "x-user-id", "prefix": format!("tenant-{i}-")}]),
            };
            json!({"name": format!("tenant-{i}"), "when": when, "variant": "canary"})
        })
        .collect();
    rules.extend(bench_rules().as_array().cloned().unwrap_or_default());
    let mut policy = bench_policy();
    policy["rules"] = Value::Array(rules);
    policy
}

/// 50 variants; the split gives canary 10 of 100 and spreads the rest.
fn variants_50() -> Value {
    let names: Vec<String> = std::iter::once("stable".to_string())
        .chain(std::iter::once("canary".to_string()))
        .chain((2..50).map(|i| format!("v{i}")))
        .collect();
    let mut weights = vec![
        json!({"variant": "canary", "weight": 10}),
        json!({"variant": "stable", "weight": 42}),
    ];
    weights.extend((2..50).map(|i| json!({"variant": format!("v{i}"), "weight": 1})));
    let mut policy = bench_policy();
    policy["variants"] = json!(names);
    policy["rules"][3]["split"]["weights"] = Value::Array(weights);
    policy
}

/// The beta rule's list grows to 1,000 values, `beta` and `internal` last.
fn in_1000() -> Value {
    let mut values: Vec<String> = (0..998).map(|i| format!("plan-{i}")).collect();
    values.push("beta".into());
    values.push("internal".into());
    let mut policy = bench_policy();
    policy["rules"][1]["when"][0]["in"] = json!(values);
    policy
}
