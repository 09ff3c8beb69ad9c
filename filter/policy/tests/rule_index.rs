//! The rule index (`index.rs`) finds the rule the ordered scan finds.
//!
//! Policies of 1 to 200 rules (several 64-rule words) are drawn over a small universe of
//! request parts and values, so that rules share parts, values repeat across rules and
//! `in` lists, conditions contradict each other, and `present: false` mixes with value
//! tests; each is asked thousands of requests drawn over the same universe, and every
//! decision must name the first rule whose conditions all hold (`Condition::matches`,
//! rule by rule), or none.

use meshcanary_policy::{Policy, RequestInputs};
use serde_json::{json, Value};

/// splitmix64: a fixed, seedable sequence, so a failure reproduces.
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const VALUES: &[&str] = &["a", "b", "ab", "abc", "", "tenant-1", "tenant-10", "x y"];
const HEADERS: &[&str] = &["x-tenant", "x-user", "x-canary"];
const NAMES: &[&str] = &["tenant", "plan", "t"];

fn condition(draws: &mut Draws) -> Value {
    let mut condition = serde_json::Map::new();
    let (kind, name) = match draws.below(3) {
        0 => ("header", draws.pick(HEADERS)),
        1 => ("cookie", draws.pick(NAMES)),
        _ => ("query", draws.pick(NAMES)),
    };
    condition.insert(kind.into(), json!(name));
    match draws.below(5) {
        0 => condition.insert("equals".into(), json!(draws.pick(VALUES))),
        1 => condition.insert("prefix".into(), json!(draws.pick(VALUES))),
        2 => {
            let n = 1 + draws.below(4);
            let list: Vec<&str> = (0..n).map(|_| draws.pick(VALUES)).collect();
            condition.insert("in".into(), json!(list))
        }
        3 => condition.insert("present".into(), json!(true)),
        _ => condition.insert("present".into(), json!(false)),
    };
    Value::Object(condition)
}

fn policy(draws: &mut Draws, rules: usize) -> Policy {
    let rules: Vec<Value> = (0..rules)
        .map(|i| {
            let when: Vec<Value> = (0..1 + draws.below(3)).map(|_| condition(draws)).collect();
            json!({"name": format!("r{i}"), "when": when, "variant": "canary"})
        })
        .collect();
    let doc = json!({"name": "p", "variants": ["stable", "canary"], "rules": rules});
    match Policy::from_value(&doc) {
        Ok(policy) => policy,
        Err(errors) => panic!("invalid drawn policy: {errors}\n{doc}"),
    }
}

/// A request's inputs: each header absent, or one of the values; the cookie header with
/// some of the names; the path with some of the names as parameters.
fn request(draws: &mut Draws, policy: &Policy) -> Vec<Option<Vec<u8>>> {
    policy
        .inputs
        .iter()
        .map(|input| match input.as_str() {
            "cookie" => Some(pairs(draws, "; ").into_bytes()),
            ":path" => Some(format!("/p?{}", pairs(draws, "&")).into_bytes()),
            _ if draws.below(3) == 0 => None,
            _ => Some(draws.pick(VALUES).as_bytes().to_vec()),
        })
        .collect()
}

/// Some of the names with values; a name may come twice (the first pair counts), and
/// cookie pairs may be set apart by more or less white space.
fn pairs(draws: &mut Draws, separator: &str) -> String {
    let mut pairs = Vec::new();
    for _ in 0..2 {
        for name in NAMES {
            if draws.below(3) == 0 {
                pairs.push(format!("{name}={}", draws.pick(VALUES).replace(' ', "+")));
            }
        }
    }
    let separator = match (separator, draws.below(3)) {
        ("; ", 0) => ";",
        ("; ", 1) => " ;  ",
        _ => separator,
    };
    pairs.join(separator)
}

fn ordered_scan<R: RequestInputs + ?Sized>(policy: &Policy, request: &R) -> Option<usize> {
    policy
        .rules
        .iter()
        .position(|rule| rule.when.iter().all(|c| c.matches(request)))
}

#[test]
fn indexed_decision_is_the_first_matching_rule() {
    let mut draws = Draws(12);
    let mut decided_by_rule = 0;
    for size in [1, 2, 3, 7, 63, 64, 65, 100, 128, 129, 200] {
        for _ in 0..20 {
            let policy = policy(&mut draws, size);
            for _ in 0..300 {
                let request = request(&mut draws, &policy);
                let decided = policy.decide(request.as_slice(), || 0).rule;
                assert_eq!(
                    decided,
                    ordered_scan(&policy, request.as_slice()),
                    "{size} rules, request {request:?}, rules {:#?}",
                    policy.rules
                );
                decided_by_rule += usize::from(decided.is_some());
            }
        }
    }
    // The drawn requests must exercise both outcomes, or the comparison proves little.
    assert!(decided_by_rule > 10_000, "{decided_by_rule}");
    assert!(decided_by_rule < 66_000, "{decided_by_rule}");
}

/// A rule that no drawn request satisfies, in one of the ways the index handles
/// differently: ruled out by its sets (a value never listed, a part always present
/// tested absent) or only by trying it (a prefix never sent).
fn miss(draws: &mut Draws, i: usize) -> Value {
    let header = draws.pick(HEADERS);
    let when = match draws.below(3) {
        0 => json!([{"header": header, "equals": format!("never-{i}")}]),
        1 => {
            json!([{"cookie": draws.pick(NAMES), "present": true}, {"header": "cookie", "present": false}])
        }
        _ => json!([condition(draws), {"header": header, "prefix": "never"}]),
    };
    json!({"name": format!("m{i}"), "when": when, "variant": "canary"})
}

#[test]
fn matches_past_the_first_256_rules_are_found_in_order() {
    // Rule sets hold 256 rules each: long runs of rules no request satisfies, with a
    // drawn rule now and then and the last rules drawn, put the first match in every
    // block, at and around the blocks' edges.
    let mut draws = Draws(21);
    let mut blocks_seen = [0usize; 3];
    for size in [255, 256, 257, 300, 511, 512, 513, 700] {
        for _ in 0..10 {
            let rules: Vec<Value> = (0..size)
                .map(|i| {
                    if i + 12 >= size || draws.below(40) == 0 {
                        let when: Vec<Value> = (0..1 + draws.below(3))
                            .map(|_| condition(&mut draws))
                            .collect();
                        json!({"name": format!("r{i}"), "when": when, "variant": "canary"})
                    } else {
                        miss(&mut draws, i)
                    }
                })
                .collect();
            let doc = json!({"name": "p", "variants": ["stable", "canary"], "rules": rules});
            let policy = Policy::from_value(&doc).expect("valid drawn policy");
            for _ in 0..200 {
                let request = request(&mut draws, &policy);
                let decided = policy.decide(request.as_slice(), || 0).rule;
                assert_eq!(
                    decided,
                    ordered_scan(&policy, request.as_slice()),
                    "{size} rules, request {request:?}"
                );
                if let Some(rule) = decided {
                    blocks_seen[(rule / 256).min(2)] += 1;
                }
            }
        }
    }
    // Every block must decide some requests, or the blocks past the first go untested.
    assert!(blocks_seen.iter().all(|n| *n > 200), "{blocks_seen:?}");
}

#[test]
fn policies_testing_many_parts_decide_like_the_ordered_scan() {
    // Past eight parts the presence table is not built, and the parts' presence is
    // applied rule set by rule set: 70 headers, each tested by two rules.
    let rules: Vec<Value> = (0..140)
        .map(|i| {
            let when = match i % 2 {
                0 => json!([{"header": format!("x-h{}", i / 2), "equals": "on"}]),
                _ => json!([{"header": format!("x-h{}", i / 2), "present": false},
                            {"header": "x-h0", "prefix": "o"}]),
            };
            json!({"name": format!("r{i}"), "when": when, "variant": "canary"})
        })
        .collect();
    let doc = json!({"name": "p", "variants": ["stable", "canary"], "rules": rules});
    let policy = Policy::from_value(&doc).expect("valid policy");
    assert_eq!(policy.inputs.len(), 70);
    let mut draws = Draws(5);
    for _ in 0..2_000 {
        let request: Vec<Option<Vec<u8>>> = (0..70)
            .map(|_| match draws.below(4) {
                0 => Some(b"on".to_vec()),
                1 => Some(b"off".to_vec()),
                _ => None,
            })
            .collect();
        assert_eq!(
            policy.decide(request.as_slice(), || 0).rule,
            ordered_scan(&policy, request.as_slice()),
            "{request:?}"
        );
    }
}

#[test]
fn a_hundred_tenant_rules_on_one_header_find_the_tenant() {
    let rules: Vec<Value> = (0..100)
        .map(|i| {
            json!({"name": format!("t{i}"),
                   "when": [{"header": "x-tenant", "equals": format!("tenant-{i}")}],
                   "variant": if i % 2 == 0 { "canary" } else { "stable" }})
        })
        .collect();
    let doc = json!({"name": "p", "variants": ["stable", "canary"], "rules": rules});
    let policy = Policy::from_value(&doc).expect("valid policy");
    for i in 0..100 {
        let request = vec![Some(format!("tenant-{i}").into_bytes())];
        assert_eq!(policy.decide(request.as_slice(), || 0).rule, Some(i));
    }
    let unknown = vec![Some(b"tenant-100".to_vec())];
    assert_eq!(policy.decide(unknown.as_slice(), || 0).rule, None);
    let absent: Vec<Option<Vec<u8>>> = vec![None];
    assert_eq!(policy.decide(absent.as_slice(), || 0).rule, None);
}
