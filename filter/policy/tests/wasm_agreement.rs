//! The policy core gives the same numbers on wasm32 as natively.
//!
//! One source, two platforms: every check below is a plain `#[test]` natively and a
//! `#[wasm_bindgen_test]` on wasm32 (run under Node by `wasm-bindgen-test-runner`, see
//! `scripts/test-wasm-core.sh`). Both read the same committed table,
//! `testdata/bucketing_table.json`, whose expected values are literal numbers written
//! once, natively, by the ignored generator at the bottom of this file. Agreement of both
//! platforms with that table is agreement of the platforms with each other.
//!
//! The table covers, for both hash kinds: ASCII, empty, multi-byte UTF-8, 300-byte and
//! non-UTF-8 keys, salts and keys whose lengths cross the CBOR length-head boundaries
//! (23/24, 255/256 bytes), and weight sets with zero weights and the maximum total. A
//! representative policy document, compiled by `Policy::from_json`, must also make the
//! same decisions for a list of requests on both platforms.
//!
//! To change the cases: edit `case_inputs` / `decision_requests` / `DECISION_POLICY`, then
//! regenerate natively and review the diff of the table:
//!
//! ```text
//! cd filter && cargo test -p meshcanary-policy --test wasm_agreement -- --ignored regenerate_table
//! ```

use meshcanary_policy::bucket::{flagd_hash, fnv_position};
use meshcanary_policy::{Action, Decision, HashKind, Placement, Policy};
use serde_json::{json, Value};

// Each check carries both attributes through `cfg_attr`: `#[test]` natively,
// `#[wasm_bindgen_test]` on wasm32. Without `wasm_bindgen_test_configure!(run_in_browser)`
// wasm-bindgen-test runs the tests in Node.js, which is what we want.
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test;

/// The committed table (inputs and expected outputs), embedded at compile time so the
/// wasm test needs no file system.
const TABLE: &str = include_str!("../testdata/bucketing_table.json");

/// Variant names the bucketing cases split between, in policy order.
const CASE_VARIANTS: [&str; 3] = ["stable", "canary", "shadow"];

/// The policy whose decisions are checked. Covers variant rules on header, cookie and
/// query conditions, a cookie-keyed flagd split with `missing: fallback`, a random split
/// and a header-keyed FNV split with the default salt and `missing: random`.
const DECISION_POLICY: &str = r#"{
  "name": "checkout",
  "decision_header": "X-Checkout-Variant",
  "variants": ["stable", "canary", "shadow"],
  "rules": [
    {"name": "qa", "when": [{"header": "X-QA", "equals": "1"}], "variant": "canary"},
    {"name": "beta-cookie", "when": [{"cookie": "beta", "in": ["yes", "on"]}], "variant": "shadow"},
    {"name": "preview", "when": [{"query": "preview", "equals": "h\u00e9llo world"}], "variant": "canary"},
    {"name": "mobile",
     "when": [{"header": "user-agent", "prefix": "Mobile"}],
     "split": {"by": {"cookie": "uid"}, "salt": "mobile-2026", "hash": "flagd", "missing": "fallback",
               "weights": [{"variant": "canary", "weight": 30}, {"variant": "stable", "weight": 70}]}},
    {"name": "api-random",
     "when": [{"header": ":path", "prefix": "/api/random"}],
     "split": {"by": "random",
               "weights": [{"variant": "canary", "weight": 1}, {"variant": "stable", "weight": 3}]}},
    {"name": "rollout",
     "split": {"by": {"header": "x-user-id"},
               "weights": [{"variant": "canary", "weight": 10}, {"variant": "shadow", "weight": 5},
                           {"variant": "stable", "weight": 85}]}}
  ]
}"#;

/// Random value handed to `decide` when a request's row does not name one.
const DEFAULT_RANDOM: u64 = 0x0123_4567_89ab_cdef;

// ---------------------------------------------------------------------------------------
// Inputs (the generator writes them into the table with their expected outputs)
// ---------------------------------------------------------------------------------------

/// One bucketing case: which key, under which salt, split how.
struct CaseInput {
    label: &'static str,
    salt: String,
    key: Vec<u8>,
    /// (variant name from [`CASE_VARIANTS`], weight), in split order.
    weights: Vec<(&'static str, u64)>,
    hash: HashKind,
}

// A table reads best as one row per line.
#[rustfmt::skip]
fn case_inputs() -> Vec<CaseInput> {
    // 300 bytes of each flavour.
    let long_ascii: Vec<u8> = (0..300u32)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789-_"[(i % 38) as usize])
        .collect();
    let long_utf8 = "é€𝄞".repeat(300 / 9 + 1).into_bytes()[..297].to_vec(); // 33 × 9 = 297 bytes, whole chars
    let mut long_utf8_300 = long_utf8;
    long_utf8_300.extend_from_slice(b"abc"); // 300 bytes, valid UTF-8
    let long_binary: Vec<u8> = (0..300u32).map(|i| (i * 167 + 13) as u8).collect();

    let two = vec![("canary", 10), ("stable", 90)];
    let half = vec![("stable", 1), ("canary", 1)];
    let three = vec![("canary", 10), ("shadow", 30), ("stable", 60)];
    let zeroes = vec![("shadow", 0), ("canary", 3), ("stable", 0), ("stable2", 0)];
    let max_total = vec![("canary", 1), ("stable", (1 << 31) - 2)];
    let odd = vec![("stable", 999_983), ("canary", 17), ("shadow", 1_000_003)];

    let text = |s: &str| s.as_bytes().to_vec();
    type Row = (&'static str, String, Vec<u8>, Vec<(&'static str, u64)>);
    let mut keyed: Vec<Row> = vec![
        ("ascii, flagd example", "checkout-v2".into(), text("user-42"), two.clone()),
        ("ascii", "checkout-v2".into(), text("user-1"), two.clone()),
        ("ascii, 3 variants", "checkout-v2".into(), text("alice@example.com"), three.clone()),
        ("ascii, even split", "fractional-flag-shorthand".into(), text("jon@company.com"), half.clone()),
        ("empty key", "checkout-v2".into(), Vec::new(), two.clone()),
        ("empty key and salt", String::new(), Vec::new(), three.clone()),
        ("empty salt", String::new(), text("user-42"), half.clone()),
        ("multi-byte utf-8 key", "checkout-v2".into(), text("üser-Ω-日本-🦀"), three.clone()),
        ("multi-byte utf-8 salt and key", "größe/ランプ".into(), text("客户-7"), two.clone()),
        ("long ascii key (300 bytes)", "checkout-v2".into(), long_ascii.clone(), three.clone()),
        ("long utf-8 key (300 bytes)", "checkout-v2".into(), long_utf8_300.clone(), two.clone()),
        ("long non-utf-8 key (300 bytes)", "checkout-v2".into(), long_binary.clone(), three.clone()),
        ("long salt (300 bytes)", String::from_utf8(long_ascii.clone()).unwrap_or_default(), text("user-42"), two.clone()),
        ("non-utf-8 key (latin-1)", "checkout-v2".into(), vec![b'j', 0xf6, b'r', b'g'], two.clone()),
        ("non-utf-8 key (lone continuation, nul, 0xff)", "checkout-v2".into(), vec![0x80, 0x00, 0xff, 0xfe, 0xc0], three.clone()),
        ("non-utf-8 key (truncated sequence)", "größe/ランプ".into(), vec![0xe6, 0x97], half.clone()),
        ("key of 23 bytes", "s".into(), vec![b'k'; 23], two.clone()),
        ("key of 24 bytes", "s".into(), vec![b'k'; 24], two.clone()),
        ("key of 255 bytes", "s".into(), vec![b'k'; 255], three.clone()),
        ("key of 256 bytes", "s".into(), vec![b'k'; 256], three.clone()),
        ("zero weights around one positive", "checkout-v2".into(), text("user-9"), zeroes.clone()),
        ("maximum total weight", "checkout-v2".into(), text("user-77"), max_total.clone()),
        ("large odd weights", "checkout-v2".into(), text("user-77"), odd.clone()),
        ("large odd weights, non-utf-8 key", "checkout-v2".into(), vec![0xde, 0xad, 0xbe, 0xef], odd.clone()),
    ];
    // Ten more ordinary users so more than a handful of FNV second draws are exercised.
    for i in 0..10 {
        keyed.push(("ascii user", "checkout-v2/rollout".into(), format!("user-{}", 1000 + i * 7919).into_bytes(), three.clone()));
    }
    let mut out = Vec::new();
    for (label, salt, key, weights) in keyed {
        for hash in [HashKind::Fnv, HashKind::Flagd] {
            out.push(CaseInput {
                label,
                salt: salt.clone(),
                key: key.clone(),
                weights: weights.clone(),
                hash,
            });
        }
    }
    out
}

/// One request for the decision check: header (lower-case name) → raw value bytes.
struct RequestInput {
    label: &'static str,
    headers: Vec<(&'static str, Vec<u8>)>,
    random: Option<u64>,
}

#[rustfmt::skip]
fn decision_requests() -> Vec<RequestInput> {
    let h = |name: &'static str, value: &[u8]| (name, value.to_vec());
    let mut out = vec![
        RequestInput { label: "no headers: rollout split, key missing, random draw", headers: vec![], random: None },
        RequestInput { label: "qa header wins over everything", headers: vec![h("x-qa", b"1"), h("x-user-id", b"user-1"), h("cookie", b"beta=yes")], random: None },
        RequestInput { label: "qa header with another value does not match", headers: vec![h("x-qa", b"2"), h("x-user-id", b"user-1")], random: None },
        RequestInput { label: "beta cookie", headers: vec![h("cookie", b"a=1; beta=on"), h("x-user-id", b"user-1")], random: None },
        RequestInput { label: "beta cookie, quoted", headers: vec![h("cookie", b"beta=\"yes\"")], random: None },
        RequestInput { label: "preview query, percent-encoded utf-8 and '+'", headers: vec![h(":path", b"/cart?x=1&preview=h%C3%A9llo+world")], random: None },
        RequestInput { label: "preview query, wrong value", headers: vec![h(":path", b"/cart?preview=hello"), h("x-user-id", b"user-5")], random: None },
        RequestInput { label: "mobile with uid cookie: flagd sticky", headers: vec![h("user-agent", b"Mobile Safari"), h("cookie", b"uid=u-1001")], random: None },
        RequestInput { label: "mobile with multi-byte uid", headers: vec![h("user-agent", b"Mobile"), h("cookie", "uid=ユーザー7".as_bytes())], random: None },
        RequestInput { label: "mobile without uid: fallback", headers: vec![h("user-agent", b"Mobile"), h("x-user-id", b"user-1")], random: None },
        RequestInput { label: "mobile with empty uid: fallback", headers: vec![h("user-agent", b"Mobile"), h("cookie", b"uid=")], random: None },
        RequestInput { label: "random split, low draw", headers: vec![h(":path", b"/api/random/x")], random: Some(1) },
        RequestInput { label: "random split, high draw", headers: vec![h(":path", b"/api/random/x")], random: Some(u64::MAX) },
        RequestInput { label: "random split, middle draw", headers: vec![h(":path", b"/api/random")], random: Some(1 << 62) },
        RequestInput { label: "rollout, empty user id: random draw", headers: vec![h("x-user-id", b"")], random: Some(0xfedc_ba98_7654_3210) },
        RequestInput { label: "rollout, non-utf-8 user id", headers: vec![h("x-user-id", &[0xff, 0x00, 0xc3, 0x28])], random: None },
        RequestInput { label: "rollout, multi-byte user id", headers: vec![h("x-user-id", "пользователь-1".as_bytes())], random: None },
        RequestInput { label: "rollout, 300-byte user id", headers: vec![h("x-user-id", &[b'u'; 300])], random: None },
        RequestInput { label: "non-utf-8 user-agent does not match the prefix", headers: vec![h("user-agent", &[0x4d, 0xff]), h("x-user-id", b"user-8")], random: None },
    ];
    for i in 0..24u32 {
        out.push(RequestInput {
            label: "rollout, ordinary user",
            headers: vec![("x-user-id", format!("user-{}", 31 * i + 3).into_bytes())],
            random: None,
        });
    }
    out
}

// ---------------------------------------------------------------------------------------
// Computation (the same code produces the table natively and checks it everywhere)
// ---------------------------------------------------------------------------------------

fn hash_name(hash: HashKind) -> &'static str {
    match hash {
        HashKind::Fnv => "fnv",
        HashKind::Flagd => "flagd",
    }
}

fn placement_name(placement: Option<Placement>) -> Value {
    match placement {
        None => Value::Null,
        Some(Placement::Sticky) => json!("sticky"),
        Some(Placement::Random) => json!("random"),
        Some(Placement::KeyMissingRandom) => json!("key-missing-random"),
        Some(Placement::KeyMissingFallback) => json!("key-missing-fallback"),
    }
}

/// The variant `Policy::from_json` + `Split::variant_for_key` choose for a case, checked
/// against `Policy::decide` for keys a request can carry.
fn variant_for_case(salt: &str, key: &[u8], weights: &[(String, u64)], hash: &str) -> String {
    let mut variants: Vec<&str> = CASE_VARIANTS.to_vec();
    for (name, _) in weights {
        if !variants.contains(&name.as_str()) {
            variants.push(name);
        }
    }
    let weights_json: Vec<Value> = weights
        .iter()
        .map(|(variant, weight)| json!({ "variant": variant, "weight": weight }))
        .collect();
    let doc = json!({
        "name": "agreement",
        "variants": variants,
        "rules": [{
            "name": "split",
            "split": { "by": { "header": "x-key" }, "salt": salt, "hash": hash, "weights": weights_json }
        }]
    });
    let policy = match Policy::from_json(doc.to_string().as_bytes()) {
        Ok(policy) => policy,
        Err(e) => panic!("case policy rejected: {}\n{}", e, doc),
    };
    let split = match &policy.rules[0].action {
        Action::Split(split) => split,
        Action::Variant(_) => panic!("case policy compiled to a variant rule"),
    };
    let chosen = split.variant_for_key(key);
    if !key.is_empty() {
        // The request path must agree with the direct call.
        let request = vec![Some(key.to_vec())];
        let decision = policy.decide(&request, || panic!("a keyed request must not draw"));
        assert_eq!(
            decision,
            Decision {
                variant: chosen,
                rule: Some(0),
                placement: Some(Placement::Sticky)
            }
        );
    }
    policy.variants[chosen].clone()
}

/// The expected-output part of a case row, computed on this platform.
fn case_outputs(salt: &str, key: &[u8], weights: &[(String, u64)], hash: &str) -> Value {
    json!({
        "fnv_position": fnv_position(salt.as_bytes(), key),
        "flagd_hash": flagd_hash(salt.as_bytes(), key),
        "variant": variant_for_case(salt, key, weights, hash),
    })
}

fn decision_outputs(policy: &Policy, headers: &[(String, Vec<u8>)], random: Option<u64>) -> Value {
    let request: Vec<Option<Vec<u8>>> = policy
        .inputs
        .iter()
        .map(|input| {
            headers
                .iter()
                .find(|(name, _)| name == input)
                .map(|(_, v)| v.clone())
        })
        .collect();
    let mut drew = false;
    let decision = policy.decide(&request, || {
        drew = true;
        random.unwrap_or(DEFAULT_RANDOM)
    });
    json!({
        "variant": policy.variants[decision.variant],
        "rule": decision.rule.map(|r| policy.rules[r].name.clone()),
        "placement": placement_name(decision.placement),
        "drew_random": drew,
    })
}

/// What compiling the decision policy produced, in a platform-neutral form.
fn compiled_facts(policy: &Policy) -> Value {
    let rules: Vec<Value> = policy
        .rules
        .iter()
        .map(|rule| match &rule.action {
            Action::Variant(v) => json!({ "name": rule.name, "variant": policy.variants[*v] }),
            Action::Split(split) => json!({
                "name": rule.name,
                "salt": split.salt,
                "hash": hash_name(split.hash),
                "split_variants": split.variants.iter().map(|v| policy.variants[*v].clone()).collect::<Vec<_>>(),
                "weights": split.weights.as_slice(),
                "total": split.weights.total(),
            }),
        })
        .collect();
    json!({
        "inputs": policy.inputs,
        "decision_header": policy.decision_header,
        "variants": policy.variants,
        "rules": rules,
    })
}

fn decision_policy() -> Policy {
    match Policy::from_json(DECISION_POLICY.as_bytes()) {
        Ok(policy) => policy,
        Err(e) => panic!("the decision policy is rejected: {}", e),
    }
}

// ---------------------------------------------------------------------------------------
// Table (JSON) helpers
// ---------------------------------------------------------------------------------------

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{:02x}", b)).collect()
}

fn from_hex(hex: &str) -> Vec<u8> {
    assert!(hex.len() % 2 == 0, "odd hex length: {}", hex);
    (0..hex.len())
        .step_by(2)
        .map(|i| match u8::from_str_radix(&hex[i..i + 2], 16) {
            Ok(b) => b,
            Err(e) => panic!("bad hex {:?}: {}", hex, e),
        })
        .collect()
}

fn table() -> Value {
    match serde_json::from_str(TABLE) {
        Ok(v) => v,
        Err(e) => panic!("testdata/bucketing_table.json is not valid JSON: {}", e),
    }
}

fn field<'v>(row: &'v Value, name: &str) -> &'v Value {
    match row.get(name) {
        Some(v) => v,
        None => panic!("table row lacks {:?}: {}", name, row),
    }
}

fn str_field<'v>(row: &'v Value, name: &str) -> &'v str {
    match field(row, name).as_str() {
        Some(s) => s,
        None => panic!("table field {:?} is not a string: {}", name, row),
    }
}

fn rows<'v>(table: &'v Value, name: &str) -> &'v [Value] {
    match field(table, name).as_array() {
        Some(rows) => rows,
        None => panic!("table field {:?} is not a list", name),
    }
}

fn row_weights(row: &Value) -> Vec<(String, u64)> {
    match field(row, "weights").as_array() {
        Some(items) => items
            .iter()
            .map(|pair| match (pair[0].as_str(), pair[1].as_u64()) {
                (Some(name), Some(w)) => (name.to_string(), w),
                _ => panic!("bad weight pair {} in {}", pair, row),
            })
            .collect(),
        None => panic!("weights is not a list: {}", row),
    }
}

fn row_headers(row: &Value) -> Vec<(String, Vec<u8>)> {
    match field(row, "headers_hex").as_array() {
        Some(items) => items
            .iter()
            .map(|pair| match (pair[0].as_str(), pair[1].as_str()) {
                (Some(name), Some(hex)) => (name.to_string(), from_hex(hex)),
                _ => panic!("bad header pair {} in {}", pair, row),
            })
            .collect(),
        None => panic!("headers_hex is not a list: {}", row),
    }
}

fn case_row(input: &CaseInput) -> Value {
    let weights: Vec<(String, u64)> = input
        .weights
        .iter()
        .map(|(n, w)| (n.to_string(), *w))
        .collect();
    let hash = hash_name(input.hash);
    let mut row = json!({
        "label": input.label,
        "salt": input.salt,
        "key_hex": to_hex(&input.key),
        "weights": weights.iter().map(|(n, w)| json!([n, w])).collect::<Vec<_>>(),
        "hash": hash,
    });
    if let Ok(text) = std::str::from_utf8(&input.key) {
        row["key_text"] = json!(text);
    }
    row["expected"] = case_outputs(&input.salt, &input.key, &weights, hash);
    row
}

fn request_row(policy: &Policy, input: &RequestInput) -> Value {
    let headers: Vec<(String, Vec<u8>)> = input
        .headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    json!({
        "label": input.label,
        "headers_hex": headers.iter().map(|(n, v)| json!([n, to_hex(v)])).collect::<Vec<_>>(),
        "random": input.random,
        "expected": decision_outputs(policy, &headers, input.random),
    })
}

// ---------------------------------------------------------------------------------------
// The checks (native and wasm32)
// ---------------------------------------------------------------------------------------

/// Every bucketing row: FNV position, flagd hash and chosen variant equal the literal
/// numbers in the table.
#[cfg_attr(not(target_arch = "wasm32"), test)]
#[cfg_attr(target_arch = "wasm32", wasm_bindgen_test)]
fn bucketing_matches_the_committed_table() {
    let table = table();
    let cases = rows(&table, "cases");
    let mut failures = Vec::new();
    for (i, row) in cases.iter().enumerate() {
        let salt = str_field(row, "salt");
        let key = from_hex(str_field(row, "key_hex"));
        let weights = row_weights(row);
        let hash = str_field(row, "hash");
        let actual = case_outputs(salt, &key, &weights, hash);
        let expected = field(row, "expected");
        if &actual != expected {
            failures.push(format!(
                "cases[{}] ({}, {}): expected {}, got {}",
                i,
                str_field(row, "label"),
                hash,
                expected,
                actual
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bucketing rows differ on this platform:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The representative policy compiles to the same thing and decides every request of
/// the table the same way.
#[cfg_attr(not(target_arch = "wasm32"), test)]
#[cfg_attr(target_arch = "wasm32", wasm_bindgen_test)]
fn decisions_match_the_committed_table() {
    let table = table();
    assert_eq!(
        str_field(&table, "decision_policy"),
        DECISION_POLICY,
        "the table was generated from another policy: regenerate it"
    );
    let policy = decision_policy();
    // Compilation itself must agree too: request inputs, decision header, split salts.
    assert_eq!(
        &compiled_facts(&policy),
        field(&table, "decision_policy_compiled"),
        "the policy compiles differently on this platform"
    );
    let requests = rows(&table, "requests");
    let mut failures = Vec::new();
    for (i, row) in requests.iter().enumerate() {
        let headers = row_headers(row);
        let random = field(row, "random").as_u64();
        let actual = decision_outputs(&policy, &headers, random);
        let expected = field(row, "expected");
        if &actual != expected {
            failures.push(format!(
                "requests[{}] ({}): expected {}, got {}",
                i,
                str_field(row, "label"),
                expected,
                actual
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} decisions differ on this platform:\n{}",
        failures.len(),
        requests.len(),
        failures.join("\n")
    );
}

/// The table holds exactly the inputs this file defines (so it was not hand-edited or
/// left stale), and those cover the key shapes the agreement is about.
#[cfg_attr(not(target_arch = "wasm32"), test)]
#[cfg_attr(target_arch = "wasm32", wasm_bindgen_test)]
fn table_holds_the_defined_cases() {
    let table = table();
    let policy = decision_policy();
    let strip = |row: &Value| {
        let mut row = row.clone();
        if let Some(map) = row.as_object_mut() {
            map.remove("expected");
        }
        row
    };
    let defined: Vec<Value> = case_inputs().iter().map(|c| strip(&case_row(c))).collect();
    let stored: Vec<Value> = rows(&table, "cases").iter().map(strip).collect();
    assert_eq!(stored, defined, "case inputs changed: regenerate the table");
    let defined: Vec<Value> = decision_requests()
        .iter()
        .map(|r| strip(&request_row(&policy, r)))
        .collect();
    let stored: Vec<Value> = rows(&table, "requests").iter().map(strip).collect();
    assert_eq!(
        stored, defined,
        "decision requests changed: regenerate the table"
    );

    let keys: Vec<Vec<u8>> = case_inputs().into_iter().map(|c| c.key).collect();
    assert!(keys.iter().any(|k| k.is_empty()), "no empty key");
    assert!(keys.iter().any(|k| k.len() >= 300), "no long key");
    assert!(
        keys.iter().any(|k| std::str::from_utf8(k).is_err()),
        "no non-UTF-8 key"
    );
    assert!(
        keys.iter()
            .any(|k| std::str::from_utf8(k).map_or(false, |s| s.chars().any(|c| c.len_utf8() > 1))),
        "no multi-byte UTF-8 key"
    );
    assert!(
        keys.iter().any(|k| !k.is_empty() && k.is_ascii()),
        "no ASCII key"
    );
}

/// Anchors the table to values published outside this project, on both platforms.
#[cfg_attr(not(target_arch = "wasm32"), test)]
#[cfg_attr(target_arch = "wasm32", wasm_bindgen_test)]
fn known_flagd_vectors() {
    // From the flagd notes: ["checkout-v2","user-42"] hashes to 947885791 → "stable" at 10/90.
    assert_eq!(flagd_hash(b"checkout-v2", b"user-42"), 947_885_791);
    assert_eq!(
        variant_for_case(
            "checkout-v2",
            b"user-42",
            &[("canary".to_string(), 10), ("stable".to_string(), 90)],
            "flagd"
        ),
        "stable"
    );
    // flagd-testbed's fractional shorthand scenario (see testdata/flagd_fractional.json).
    assert_eq!(
        flagd_hash(b"fractional-flag-shorthand", b"jon@company.com"),
        3_783_143_057
    );
}

// ---------------------------------------------------------------------------------------
// Generator (native only, run on purpose)
// ---------------------------------------------------------------------------------------

/// A row as one line of JSON, inputs first and `expected` last (serde_json alone would
/// sort the keys).
#[cfg(not(target_arch = "wasm32"))]
fn ordered(row: &Value) -> String {
    const ORDER: [&str; 9] = [
        "label",
        "hash",
        "salt",
        "key_text",
        "key_hex",
        "weights",
        "headers_hex",
        "random",
        "expected",
    ];
    let map = match row.as_object() {
        Some(map) => map,
        None => panic!("row is not an object: {}", row),
    };
    assert!(
        map.keys().all(|k| ORDER.contains(&k.as_str())),
        "unordered key in {}",
        row
    );
    let fields: Vec<String> = ORDER
        .iter()
        .filter_map(|k| map.get(*k).map(|v| format!("{}: {}", json!(k), v)))
        .collect();
    format!("{{{}}}", fields.join(", "))
}

/// Writes `testdata/bucketing_table.json` from the inputs above and this platform's
/// outputs. Run natively, then commit the table; never regenerate to make wasm pass.
#[cfg(not(target_arch = "wasm32"))]
#[test]
#[ignore = "writes testdata/bucketing_table.json; run on purpose after changing the inputs"]
fn regenerate_table() {
    let policy = decision_policy();
    let cases: Vec<String> = case_inputs()
        .iter()
        .map(|c| ordered(&case_row(c)))
        .collect();
    let requests: Vec<String> = decision_requests()
        .iter()
        .map(|r| ordered(&request_row(&policy, r)))
        .collect();
    // One row per line keeps review diffs readable.
    let text = format!(
        "{{\n\"about\": {},\n\"decision_policy\": {},\n\"decision_policy_compiled\": {},\n\"cases\": [\n{}\n],\n\"requests\": [\n{}\n]\n}}\n",
        json!("Expected outputs of the policy core, generated natively once by tests/wasm_agreement.rs (regenerate_table) and checked on native and wasm32. Keys and header values are hex bytes; key_text repeats keys that are UTF-8."),
        json!(DECISION_POLICY),
        compiled_facts(&policy),
        cases.join(",\n"),
        requests.join(",\n")
    );
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/bucketing_table.json");
    if let Err(e) = std::fs::write(path, text) {
        panic!("cannot write {}: {}", path, e);
    }
    eprintln!(
        "wrote {} ({} cases, {} requests)",
        path,
        cases.len(),
        requests.len()
    );
}
