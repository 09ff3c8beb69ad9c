//! The native microbenchmark of the policy core's decision: nanoseconds per
//! [`Policy::decide`] for each kind of rule, on values prepared the way the filter
//! prepares them (one `Option<Vec<u8>>` per policy input, read once per request).
//!
//! Each kind gets a one-purpose policy and requests that the kind decides (checked
//! before timing, so a typo cannot time the wrong path). Timing: a calibrated number of
//! decisions per batch, several batches, median and min–max of ns per decision;
//! `black_box` keeps the compiler from hoisting or dropping the work.

use std::hint::black_box;
use std::time::{Duration, Instant};

use meshcanary_policy::Policy;
use serde_json::{json, Value};

/// Timing of one kind of decision.
pub struct Timing {
    /// Stable identifier (JSON key).
    pub id: &'static str,
    /// What is decided, for the table.
    pub title: &'static str,
    /// ns per decision: median over batches, min, max.
    pub ns: [f64; 3],
}

/// Batches per kind; the median is reported.
const BATCHES: usize = 7;

/// Runs every kind, spending about `budget` on each (bounded: calibration stops at
/// 2²⁴ decisions per batch, whatever the clock says).
pub fn run(budget: Duration) -> Result<Vec<Timing>, String> {
    let user = |i: usize| format!("user-{}", (i * 7919) % 100_000);
    let cookie = |i: usize, plan: &str| {
        format!(
            "session={:06}; plan={plan}; theme=dark",
            (i * 7907) % 1_000_000
        )
    };
    let split = |hash: &str| {
        json!({"name": "rollout", "split": {
            "by": {"header": "x-user-id"}, "salt": "checkout-v2", "hash": hash,
            "weights": [{"variant": "canary", "weight": 10}, {"variant": "stable", "weight": 90}]
        }})
    };
    let three_rules = crate::setups::policy(false)["rules"]
        .as_array()
        .map(|rules| rules[..3].to_vec())
        .unwrap_or_default();

    let cases: Vec<(&'static str, &'static str, Value, Vec<Headers>, Expect)> = vec![
        (
            "header_equals",
            "header equals",
            one_rule(
                json!({"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"}),
            ),
            (0..64)
                .map(|_| vec![("x-canary", "always".to_string())])
                .collect(),
            Expect::Rule(0),
        ),
        (
            "cookie_in",
            "cookie in (3-pair cookie header)",
            one_rule(
                json!({"name": "beta", "when": [{"cookie": "plan", "in": ["beta", "internal"]}], "variant": "canary"}),
            ),
            (0..64)
                .map(|i| vec![("cookie", cookie(i, "beta"))])
                .collect(),
            Expect::Rule(0),
        ),
        (
            "query_prefix",
            "query prefix (decoded parameter)",
            one_rule(
                json!({"name": "exp", "when": [{"query": "exp", "prefix": "new-"}], "variant": "canary"}),
            ),
            (0..64)
                .map(|i| vec![(":path", format!("/shop/cart?item={i}&exp=new-checkout"))])
                .collect(),
            Expect::Rule(0),
        ),
        (
            "split_fnv",
            "sticky split, fnv",
            one_rule(split("fnv")),
            (0..64).map(|i| vec![("x-user-id", user(i))]).collect(),
            Expect::Rule(0),
        ),
        (
            "split_flagd",
            "sticky split, flagd",
            one_rule(split("flagd")),
            (0..64).map(|i| vec![("x-user-id", user(i))]).collect(),
            Expect::Rule(0),
        ),
        (
            "fallback",
            "fallback (3 rules tried, none matches)",
            policy_with(Value::Array(three_rules)),
            (0..64)
                .map(|i| vec![("x-user-id", user(i)), ("cookie", cookie(i, "free"))])
                .collect(),
            Expect::Fallback,
        ),
        (
            "bench_mix",
            "bench policy, the wrk request mix",
            crate::setups::policy(false),
            (0..1000).map(wrk_mix).collect(),
            // Mixed on purpose: every rule decides some of these.
            Expect::Mixed,
        ),
    ];

    let mut timings = Vec::with_capacity(cases.len());
    for (id, title, policy_json, requests, expect) in cases {
        let policy = Policy::from_value(&policy_json)
            .map_err(|e| format!("micro-benchmark policy {id} is invalid: {e:?}"))?;
        let inputs: Vec<Vec<Option<Vec<u8>>>> =
            requests.iter().map(|r| inputs_for(&policy, r)).collect();
        match expect {
            Expect::Rule(rule) => check_rule(&policy, &inputs, Some(rule), id)?,
            Expect::Fallback => check_rule(&policy, &inputs, None, id)?,
            Expect::Mixed => {}
        }
        timings.push(Timing {
            id,
            title,
            ns: time_decisions(&policy, &inputs, budget),
        });
    }
    Ok(timings)
}

/// Which rule must decide every request of a case.
#[derive(Clone, Copy)]
enum Expect {
    /// This rule (index).
    Rule(usize),
    /// None: the fallback applies.
    Fallback,
    /// Any: the case mixes paths on purpose.
    Mixed,
}

/// Request headers as (lower-case name, value).
pub type Headers = Vec<(&'static str, String)>;

/// Request `i` of `requests.lua`'s mix (same formulas; keep them in step).
pub fn wrk_mix(i: usize) -> Headers {
    let kind = i % 20;
    let plan = if kind == 1 || kind == 2 {
        "beta"
    } else {
        "free"
    };
    let mut headers = vec![
        (":path", format!("/shop/cart?item={i}")),
        (
            "cookie",
            format!(
                "session={:06}; plan={plan}; theme=dark",
                (i * 7907) % 1_000_000
            ),
        ),
    ];
    if kind == 0 {
        headers.push(("x-canary", "always".into()));
    }
    if kind == 3 {
        headers.push(("x-user-id", format!("staff-{i}")));
    } else if kind != 4 {
        headers.push(("x-user-id", format!("user-{}", (i * 7919) % 100_000)));
    }
    headers
}

fn one_rule(rule: Value) -> Value {
    policy_with(json!([rule]))
}

fn policy_with(rules: Value) -> Value {
    json!({"name": "micro", "variants": ["stable", "canary"], "rules": rules})
}

/// The values the filter would read for `policy` (one per input, `None` when absent).
fn inputs_for(policy: &Policy, headers: &Headers) -> Vec<Option<Vec<u8>>> {
    policy
        .inputs
        .iter()
        .map(|name| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_bytes().to_vec())
        })
        .collect()
}

fn check_rule(
    policy: &Policy,
    inputs: &[Vec<Option<Vec<u8>>>],
    expected: Option<usize>,
    id: &str,
) -> Result<(), String> {
    for request in inputs {
        let decision = policy.decide(request, || 0);
        if decision.rule != expected {
            return Err(format!(
                "micro-benchmark {id}: a request was decided by rule {:?}, expected {expected:?}",
                decision.rule
            ));
        }
    }
    Ok(())
}

/// ns per decision over `BATCHES` batches: [median, min, max].
fn time_decisions(policy: &Policy, inputs: &[Vec<Option<Vec<u8>>>], budget: Duration) -> [f64; 3] {
    let per_batch = budget / BATCHES as u32;
    // Calibrate: double the count until one batch takes a tenth of its share (bounded).
    let mut count: u64 = 1_000;
    while count < (1 << 24) {
        if batch(policy, inputs, count) * 10 >= per_batch {
            break;
        }
        count *= 2;
    }
    let elapsed = batch(policy, inputs, count).max(Duration::from_nanos(1));
    let count = ((count as f64) * per_batch.as_secs_f64() / elapsed.as_secs_f64())
        .clamp(1_000.0, (1u64 << 26) as f64) as u64;
    let mut ns: Vec<f64> = (0..BATCHES)
        .map(|_| batch(policy, inputs, count).as_nanos() as f64 / count as f64)
        .collect();
    ns.sort_by(f64::total_cmp);
    [ns[BATCHES / 2], ns[0], ns[BATCHES - 1]]
}

/// Time of `count` decisions, cycling through `inputs`.
fn batch(policy: &Policy, inputs: &[Vec<Option<Vec<u8>>>], count: u64) -> Duration {
    let mut random = 0x243f_6a88_85a3_08d3u64;
    let mut next = 0;
    let started = Instant::now();
    for _ in 0..count {
        // A wrapping index rather than `%`: a division would cost as much as some decisions.
        let request = black_box(&inputs[next]);
        next = if next + 1 == inputs.len() {
            0
        } else {
            next + 1
        };
        let decision = policy.decide(request.as_slice(), || {
            random = random.wrapping_add(0x9e37_79b9_7f4a_7c15);
            random
        });
        black_box(decision);
    }
    started.elapsed()
}
