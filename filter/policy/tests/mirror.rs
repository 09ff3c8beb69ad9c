//! The policy's `mirror` section (shadow traffic).
//!
//! Proves that:
//! * the contract example from issue 3 parses as written; `"mirror": null` and an absent
//!   section mean no mirror; with only `cluster`, every default is the documented one;
//!   methods are upper-cased and de-duplicated, extra stripped headers lower-cased and
//!   never duplicate the credentials, fractional percents become parts per million;
//! * every kind of bad `mirror` section is refused with exactly the expected
//!   `path: message` list (a table), and a section with many problems gets all of them;
//! * `choose`: the marker wins over everything (loop guard), then `when`, then the
//!   method, then sampling; 0 % and 100 % never draw; sampling is sticky by the routing
//!   split's key (about the asked share of keys, independent of the split, monotonic
//!   when ramped) and uses the random source only without a key;
//! * `copies_header`, `shadow_authority` and `BodyDigest` at their edges.

use std::cell::Cell;

use meshcanary_policy::bucket::fmix64;
use meshcanary_policy::mirror::{BodyDigest, ALWAYS_STRIPPED};
use meshcanary_policy::{
    Compare, Condition, Marker, Mirror, MirrorChoice, Policy, SkipReason, SplitKey, Subject, Test,
};

/// The `mirror` section from issue 3's contract section, verbatim.
const CONTRACT_MIRROR: &str = r#"{
  "cluster": "shadow",
  "when": [{"header": "x-plan", "equals": "free"}],
  "percent": 100,
  "methods": ["GET", "HEAD", "OPTIONS"],
  "strip_headers": ["x-session-token"],
  "marker_header": "x-meshcanary-shadow",
  "authority_suffix": "-shadow",
  "max_body_bytes": 65536,
  "timeout_ms": 2000,
  "max_in_flight": 100,
  "compare": "status"
}"#;

/// The fields a `mirror` section may have, as the unknown-field message lists them.
const FIELDS: &str = "cluster, when, percent, methods, strip_headers, marker_header, \
                      authority_suffix, max_body_bytes, timeout_ms, max_in_flight, compare";

/// The message for a bad `authority_suffix`.
const SUFFIX_MESSAGE: &str = "must be null or a non-empty string of letters, digits, '-' and '.'";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn parse(doc: &str) -> Policy {
    match Policy::from_json(doc.as_bytes()) {
        Ok(policy) => policy,
        Err(errors) => panic!(
            "expected a valid policy, got:\n{}\n--- document:\n{}",
            errors, doc
        ),
    }
}

/// The problems of a document as `path: message` lines (`<accepted>` if it is valid).
fn error_lines(doc: &str) -> Vec<String> {
    match Policy::from_json(doc.as_bytes()) {
        Ok(_) => vec!["<accepted>".to_string()],
        Err(errors) => {
            // Display is the same list, one problem per line.
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            assert_eq!(errors.to_string(), lines.join("\n"));
            assert_eq!(errors.len(), lines.len());
            assert!(!errors.is_empty());
            lines
        }
    }
}

/// A policy named `checkout` with variants `stable` and `canary`, no rules, and this
/// `mirror` section (JSON).
fn with_mirror(mirror: &str) -> String {
    format!(
        r#"{{"name": "checkout", "variants": ["stable", "canary"], "mirror": {}}}"#,
        mirror
    )
}

/// Like [`with_mirror`], with these rules (JSON) too.
fn with_rules_and_mirror(rules: &str, mirror: &str) -> String {
    format!(
        r#"{{"name": "checkout", "variants": ["stable", "canary"], "rules": {},
            "mirror": {}}}"#,
        rules, mirror
    )
}

/// A `mirror` section with cluster `shadow` and these extra fields (JSON members).
fn mirror_with(fields: &str) -> String {
    with_mirror(&format!(r#"{{"cluster": "shadow", {}}}"#, fields))
}

/// The parsed policy's mirror, which must be there.
fn mirror_of(policy: &Policy) -> &Mirror {
    policy.mirror.as_ref().expect("the policy has a mirror")
}

/// A policy whose rules split 50/50 by `x-user-id`, mirroring GETs at this percent.
fn keyed(percent: &str) -> Policy {
    parse(&with_rules_and_mirror(
        r#"[{"name": "rollout", "split": {"by": {"header": "x-user-id"},
            "weights": [{"variant": "canary", "weight": 50}, {"variant": "stable", "weight": 50}]}}]"#,
        &format!(r#"{{"cluster": "shadow", "percent": {}}}"#, percent),
    ))
}

/// The request a policy sees: its inputs' values, from (header name, value) pairs.
/// Names are matched case-insensitively, the first pair of a name wins.
fn request(policy: &Policy, headers: &[(&str, &str)]) -> Vec<Option<Vec<u8>>> {
    policy
        .inputs
        .iter()
        .map(|input| {
            headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(input))
                .map(|(_, value)| value.as_bytes().to_vec())
        })
        .collect()
}

/// A random source for choices that must not draw.
fn no_draw() -> u64 {
    panic!("this choice must not draw a random number")
}

/// A random source that counts its draws and returns `value`.
fn counted(calls: &Cell<u32>, value: u64) -> impl FnOnce() -> u64 + '_ {
    move || {
        calls.set(calls.get() + 1);
        value
    }
}

/// The copy token the tests' proxy puts on its copies.
const TOKEN: &str = "3f9a1c0d5e7b2468a1b2c3d4e5f60718";

/// Chooses for a request with these headers (its marker checked against [`TOKEN`]),
/// without a random draw.
fn choice(policy: &Policy, headers: &[(&str, &str)]) -> MirrorChoice {
    let m = mirror_of(policy);
    let req = request(policy, headers);
    m.choose(&req, m.marker(&req, TOKEN.as_bytes()), no_draw)
}

const SEND: MirrorChoice = MirrorChoice::Send;
const MARKED: MirrorChoice = MirrorChoice::Skip(SkipReason::Marked);
const METHOD: MirrorChoice = MirrorChoice::Skip(SkipReason::Method);
const SAMPLED_OUT: MirrorChoice = MirrorChoice::Skip(SkipReason::SampledOut);

// ---------------------------------------------------------------------------------------
// Valid sections
// ---------------------------------------------------------------------------------------

#[test]
fn contract_example_parses_into_the_expected_mirror() {
    let policy = parse(&with_mirror(CONTRACT_MIRROR));
    // The section's `when` registers its header first, then `:method` and the marker.
    assert_eq!(policy.inputs, ["x-plan", ":method", "x-meshcanary-shadow"]);
    let m = mirror_of(&policy);
    assert_eq!(
        *m,
        Mirror {
            cluster: "shadow".into(),
            when: vec![Condition {
                subject: Subject::Header(0),
                test: Test::Equals("free".into()),
            }],
            percent_ppm: 1_000_000,
            methods: vec!["GET".into(), "HEAD".into(), "OPTIONS".into()],
            strip_headers: vec![
                "authorization".into(),
                "proxy-authorization".into(),
                "cookie".into(),
                "x-api-key".into(),
                "x-session-token".into(),
            ],
            marker_header: "x-meshcanary-shadow".into(),
            authority_suffix: Some("-shadow".into()),
            max_body_bytes: 65_536,
            timeout_ms: 2_000,
            max_in_flight: 100,
            compare: Compare::Status,
            method_input: 1,
            marker_input: 2,
            sample_key: None,
            listed_fingerprints: meshcanary_policy::mirror::name_fingerprints([
                "authorization",
                "proxy-authorization",
                "cookie",
                "x-api-key",
                "x-session-token",
                "x-meshcanary-shadow",
            ]),
        }
    );
    // from_value agrees.
    let value: serde_json::Value =
        serde_json::from_str(&with_mirror(CONTRACT_MIRROR)).expect("valid JSON");
    assert_eq!(Policy::from_value(&value), Ok(policy.clone()));
}

#[test]
fn null_or_absent_mirror_means_no_mirror() {
    for doc in [
        r#"{"name": "checkout", "variants": ["stable"]}"#,
        r#"{"name": "checkout", "variants": ["stable"], "mirror": null}"#,
    ] {
        let policy = parse(doc);
        assert_eq!(policy.mirror, None, "{}", doc);
        assert!(policy.inputs.is_empty(), "no mirror reads nothing: {}", doc);
    }
}

#[test]
fn only_a_cluster_gets_every_default() {
    let policy = parse(&with_mirror(
        r#"{"cluster": "outbound|8080|shadow|api.local"}"#,
    ));
    assert_eq!(policy.inputs, [":method", "x-meshcanary-shadow"]);
    let m = mirror_of(&policy);
    assert_eq!(m.cluster, "outbound|8080|shadow|api.local");
    assert!(m.when.is_empty());
    assert_eq!(m.percent_ppm, 1_000_000);
    assert_eq!(m.methods, ["GET", "HEAD", "OPTIONS"]);
    assert_eq!(m.strip_headers, ALWAYS_STRIPPED);
    assert_eq!(
        m.strip_headers,
        [
            "authorization",
            "proxy-authorization",
            "cookie",
            "x-api-key"
        ]
    );
    assert_eq!(m.marker_header, "x-meshcanary-shadow");
    assert_eq!(m.authority_suffix.as_deref(), Some("-shadow"));
    assert_eq!(m.max_body_bytes, 65_536);
    assert_eq!(m.timeout_ms, 2_000);
    assert_eq!(m.max_in_flight, 100);
    assert_eq!(m.compare, Compare::Status);
    assert_eq!(m.method_input, 0);
    assert_eq!(m.marker_input, 1);
    assert_eq!(m.sample_key, None);
}

#[test]
fn methods_are_upper_cased_and_duplicates_collapse() {
    let policy = parse(&mirror_with(
        r#""methods": ["get", "Get", "POST", "post", "GET", "purge", "M-SEARCH"]"#,
    ));
    assert_eq!(
        mirror_of(&policy).methods,
        ["GET", "POST", "PURGE", "M-SEARCH"]
    );
    let policy = parse(&mirror_with(r#""methods": ["delete"]"#));
    assert_eq!(mirror_of(&policy).methods, ["DELETE"]);
}

#[test]
fn strip_headers_are_lower_cased_and_do_not_duplicate_the_credentials() {
    let policy = parse(&mirror_with(
        r#""strip_headers": ["X-Session-Token", "Authorization", "COOKIE", "x-api-key",
                             "Proxy-Authorization", "x-trace-debug"]"#,
    ));
    assert_eq!(
        mirror_of(&policy).strip_headers,
        [
            "authorization",
            "proxy-authorization",
            "cookie",
            "x-api-key",
            "x-session-token",
            "x-trace-debug",
        ]
    );
    // An empty list adds nothing; the credentials are still there.
    let policy = parse(&mirror_with(r#""strip_headers": []"#));
    assert_eq!(mirror_of(&policy).strip_headers, ALWAYS_STRIPPED);
}

#[test]
fn percent_becomes_parts_per_million() {
    for (percent, ppm) in [
        ("12.5", 125_000),
        ("0", 0),
        ("0.0", 0),
        ("100", 1_000_000),
        ("100.0", 1_000_000),
        ("1e2", 1_000_000),
        ("50", 500_000),
        ("30", 300_000),
        ("0.0001", 1),
        ("33.3333", 333_333),
        ("99.9999", 999_999),
        // Below the resolution of one part per million: never mirrored.
        ("0.00001", 0),
    ] {
        let policy = parse(&mirror_with(&format!(r#""percent": {}"#, percent)));
        assert_eq!(mirror_of(&policy).percent_ppm, ppm, "percent {}", percent);
    }
}

#[test]
fn explicit_options_are_compiled() {
    let policy = parse(&mirror_with(
        r#""marker_header": "X-Dry-Run", "authority_suffix": null, "max_body_bytes": 0,
           "timeout_ms": 1, "max_in_flight": 1, "compare": "off", "when": []"#,
    ));
    assert_eq!(policy.inputs, [":method", "x-dry-run"]);
    let m = mirror_of(&policy);
    assert_eq!(m.marker_header, "x-dry-run");
    assert_eq!(m.authority_suffix, None);
    assert_eq!(m.max_body_bytes, 0);
    assert_eq!(m.timeout_ms, 1);
    assert_eq!(m.max_in_flight, 1);
    assert_eq!(m.compare, Compare::Off);
    assert!(m.when.is_empty());

    let policy = parse(&mirror_with(
        r#""authority_suffix": ".shadow.svc", "max_body_bytes": 16777216,
           "timeout_ms": 300000, "max_in_flight": 100000, "compare": "body""#,
    ));
    let m = mirror_of(&policy);
    assert_eq!(m.authority_suffix.as_deref(), Some(".shadow.svc"));
    assert_eq!(m.max_body_bytes, 16 * 1024 * 1024);
    assert_eq!(m.timeout_ms, 300_000);
    assert_eq!(m.max_in_flight, 100_000);
    assert_eq!(m.compare, Compare::Body);

    let policy = parse(&mirror_with(
        r#""compare": "status", "authority_suffix": "v2""#,
    ));
    assert_eq!(mirror_of(&policy).compare, Compare::Status);
    assert_eq!(mirror_of(&policy).authority_suffix.as_deref(), Some("v2"));
}

#[test]
fn mirror_inputs_are_shared_with_the_rules() {
    let policy = parse(&with_rules_and_mirror(
        r#"[{"name": "reads", "when": [{"header": ":Method", "equals": "GET"},
                                       {"header": "X-Plan", "present": true}], "variant": "canary"}]"#,
        r#"{"cluster": "shadow", "marker_header": "x-plan",
            "when": [{"header": "X-PLAN", "equals": "free"}, {"cookie": "beta", "present": false}]}"#,
    ));
    assert_eq!(policy.inputs, [":method", "x-plan", "cookie"]);
    let m = mirror_of(&policy);
    assert_eq!(m.method_input, 0);
    assert_eq!(m.marker_input, 1);
    assert_eq!(m.when[0].subject, Subject::Header(1));
    assert_eq!(
        m.when[1].subject,
        Subject::Cookie {
            name: "beta".into(),
            input: 2
        }
    );
}

#[test]
fn sampling_key_is_the_first_keyed_split() {
    // No rules, or only variant rules: no key.
    let policy = parse(&mirror_with(r#""percent": 30"#));
    assert_eq!(mirror_of(&policy).sample_key, None);
    let policy = parse(&with_rules_and_mirror(
        r#"[{"name": "qa", "when": [{"header": "x-qa", "present": true}], "variant": "canary"}]"#,
        r#"{"cluster": "shadow"}"#,
    ));
    assert_eq!(mirror_of(&policy).sample_key, None);

    // A random split is skipped; the first keyed one after it gives the key.
    let policy = parse(&with_rules_and_mirror(
        r#"[{"name": "mobile", "when": [{"header": "x-client", "prefix": "mobile"}],
             "split": {"by": "random", "weights": [{"variant": "canary", "weight": 1}]}},
            {"name": "beta", "when": [{"header": "x-beta", "present": true}],
             "split": {"by": {"cookie": "uid"}, "weights": [{"variant": "canary", "weight": 1}]}},
            {"name": "rollout", "split": {"by": {"header": "x-user-id"},
             "weights": [{"variant": "canary", "weight": 1}]}}]"#,
        r#"{"cluster": "shadow"}"#,
    ));
    assert_eq!(
        mirror_of(&policy).sample_key,
        Some(SplitKey::Cookie {
            name: "uid".into(),
            input: policy
                .inputs
                .iter()
                .position(|i| i == "cookie")
                .expect("cookie")
        })
    );

    // Only a random split: no key.
    let policy = parse(&with_rules_and_mirror(
        r#"[{"name": "r", "split": {"by": "random", "weights": [{"variant": "canary", "weight": 1}]}}]"#,
        r#"{"cluster": "shadow"}"#,
    ));
    assert_eq!(mirror_of(&policy).sample_key, None);

    let policy = keyed("30");
    assert_eq!(
        mirror_of(&policy).sample_key,
        Some(SplitKey::Header(
            policy
                .inputs
                .iter()
                .position(|i| i == "x-user-id")
                .expect("x-user-id")
        ))
    );
}

// ---------------------------------------------------------------------------------------
// Invalid sections: one row per kind of mistake, with the exact problems reported
// ---------------------------------------------------------------------------------------

struct Case {
    what: &'static str,
    doc: String,
    expected: Vec<String>,
}

fn case(what: &'static str, doc: impl Into<String>, expected: &[&str]) -> Case {
    Case {
        what,
        doc: doc.into(),
        expected: expected.iter().map(|e| e.to_string()).collect(),
    }
}

fn bad_sections() -> Vec<Case> {
    let unknown = |field: &str| {
        format!(
            "mirror.{}: unknown field; expected one of: {}",
            field, FIELDS
        )
    };
    vec![
        // --- not a section at all ------------------------------------------------------
        case("a string", with_mirror(r#""shadow""#), &["mirror: expected an object, found a string"]),
        case("a list", with_mirror(r#"["shadow"]"#), &["mirror: expected an object, found a list"]),
        case("a boolean", with_mirror("true"), &["mirror: expected an object, found a boolean"]),
        case("false", with_mirror("false"), &["mirror: expected an object, found a boolean"]),
        case("a number", with_mirror("100"), &["mirror: expected an object, found a number"]),
        // --- unknown fields -------------------------------------------------------------
        case(
            "unknown field",
            mirror_with(r#""timeout": 5"#),
            &[&unknown("timeout")],
        ),
        case(
            "several unknown fields are all named, alphabetically",
            mirror_with(r#""zone": "a", "Cluster": "x", "headers": []"#),
            &[&unknown("Cluster"), &unknown("headers"), &unknown("zone")],
        ),
        // --- cluster --------------------------------------------------------------------
        case("empty object", with_mirror("{}"), &["mirror.cluster: required field is missing"]),
        case(
            "missing cluster",
            with_mirror(r#"{"percent": 50, "methods": ["GET"]}"#),
            &["mirror.cluster: required field is missing"],
        ),
        case("empty cluster", with_mirror(r#"{"cluster": ""}"#), &["mirror.cluster: must not be empty"]),
        case(
            "cluster a number",
            with_mirror(r#"{"cluster": 7}"#),
            &["mirror.cluster: expected a string, found a number"],
        ),
        case(
            "cluster null",
            with_mirror(r#"{"cluster": null}"#),
            &["mirror.cluster: expected a string, found null"],
        ),
        case(
            "cluster a list",
            with_mirror(r#"{"cluster": ["a", "b"]}"#),
            &["mirror.cluster: expected a string, found a list"],
        ),
        // --- percent --------------------------------------------------------------------
        case(
            "percent negative",
            mirror_with(r#""percent": -1"#),
            &["mirror.percent: expected a number from 0 to 100, found -1"],
        ),
        case(
            "percent above 100",
            mirror_with(r#""percent": 100.5"#),
            &["mirror.percent: expected a number from 0 to 100, found 100.5"],
        ),
        case(
            "percent a string",
            mirror_with(r#""percent": "50""#),
            &[r#"mirror.percent: expected a number from 0 to 100, found "50""#],
        ),
        case(
            "percent 101",
            mirror_with(r#""percent": 101"#),
            &["mirror.percent: expected a number from 0 to 100, found 101"],
        ),
        case(
            "percent null",
            mirror_with(r#""percent": null"#),
            &["mirror.percent: expected a number from 0 to 100, found null"],
        ),
        // --- methods --------------------------------------------------------------------
        case(
            "methods empty",
            mirror_with(r#""methods": []"#),
            &["mirror.methods: must list at least one value"],
        ),
        case(
            "methods a string",
            mirror_with(r#""methods": "GET""#),
            &["mirror.methods: expected a list, found a string"],
        ),
        case(
            "methods an object",
            mirror_with(r#""methods": {"GET": true}"#),
            &["mirror.methods: expected a list, found an object"],
        ),
        case(
            "methods null",
            mirror_with(r#""methods": null"#),
            &["mirror.methods: expected a list, found null"],
        ),
        case(
            "method with a space",
            mirror_with(r#""methods": ["GET", "GE T"]"#),
            &[r#"mirror.methods[1]: "GE T" is not a valid HTTP method"#],
        ),
        case(
            "every bad method is reported",
            mirror_with(r#""methods": ["", 1, "POST", "PO/ST", "GÉT", null, "get "]"#),
            &[
                r#"mirror.methods[0]: "" is not a valid HTTP method"#,
                "mirror.methods[1]: expected a string, found a number",
                r#"mirror.methods[3]: "PO/ST" is not a valid HTTP method"#,
                r#"mirror.methods[4]: "GÉT" is not a valid HTTP method"#,
                "mirror.methods[5]: expected a string, found null",
                r#"mirror.methods[6]: "get " is not a valid HTTP method"#,
            ],
        ),
        // --- strip_headers --------------------------------------------------------------
        case(
            "strip_headers a string",
            mirror_with(r#""strip_headers": "x-session-token""#),
            &["mirror.strip_headers: expected a list, found a string"],
        ),
        case(
            "strip_headers null",
            mirror_with(r#""strip_headers": null"#),
            &["mirror.strip_headers: expected a list, found null"],
        ),
        case(
            "bad strip_headers names",
            mirror_with(r#""strip_headers": ["x session", "", 5, "x-ok", "x-a:b", "x-é", ":"]"#),
            &[
                r#"mirror.strip_headers[0]: "x session" is not a valid header name"#,
                r#"mirror.strip_headers[1]: "" is not a valid header name"#,
                "mirror.strip_headers[2]: expected a string, found a number",
                r#"mirror.strip_headers[4]: "x-a:b" is not a valid header name"#,
                r#"mirror.strip_headers[5]: "x-é" is not a valid header name"#,
                r#"mirror.strip_headers[6]: ":" is not a valid header name"#,
            ],
        ),
        case(
            // Stripping `:path`, `:method` or `:scheme` would make every copy unsendable.
            "pseudo-headers in strip_headers",
            mirror_with(r#""strip_headers": [":path", "x-ok", ":Method"]"#),
            &[
                "mirror.strip_headers[0]: must not be a pseudo-header",
                "mirror.strip_headers[2]: must not be a pseudo-header",
            ],
        ),
        // --- marker_header ------------------------------------------------------------
        case(
            "marker_header a pseudo-header",
            mirror_with(r#""marker_header": ":authority""#),
            &["mirror.marker_header: must not be a pseudo-header"],
        ),
        case(
            "marker_header with a space",
            mirror_with(r#""marker_header": "x shadow""#),
            &[r#"mirror.marker_header: "x shadow" is not a valid header name"#],
        ),
        case(
            "marker_header empty",
            mirror_with(r#""marker_header": """#),
            &[r#"mirror.marker_header: "" is not a valid header name"#],
        ),
        case(
            "marker_header a number",
            mirror_with(r#""marker_header": 1"#),
            &["mirror.marker_header: expected a string, found a number"],
        ),
        case(
            "marker_header null",
            mirror_with(r#""marker_header": null"#),
            &["mirror.marker_header: expected a string, found null"],
        ),
        case(
            // The filter sets the decision header on every request: as a marker it would
            // mark them all for the next hop.
            "marker_header the decision header",
            mirror_with(r#""marker_header": "X-Meshcanary-Variant""#),
            &[r#"mirror.marker_header: "x-meshcanary-variant" is the decision header; the marker needs a header of its own"#],
        ),
        // --- authority_suffix ---------------------------------------------------------
        case(
            "authority_suffix empty",
            mirror_with(r#""authority_suffix": """#),
            &[&format!("mirror.authority_suffix: {}", SUFFIX_MESSAGE)],
        ),
        case(
            "authority_suffix with a slash",
            mirror_with(r#""authority_suffix": "a/b""#),
            &[&format!("mirror.authority_suffix: {}", SUFFIX_MESSAGE)],
        ),
        case(
            "authority_suffix with a port",
            mirror_with(r#""authority_suffix": "-shadow:8080""#),
            &[&format!("mirror.authority_suffix: {}", SUFFIX_MESSAGE)],
        ),
        case(
            "authority_suffix with a space",
            mirror_with(r#""authority_suffix": " -shadow""#),
            &[&format!("mirror.authority_suffix: {}", SUFFIX_MESSAGE)],
        ),
        case(
            "authority_suffix a number",
            mirror_with(r#""authority_suffix": 3"#),
            &["mirror.authority_suffix: expected a string, found a number"],
        ),
        case(
            "authority_suffix false",
            mirror_with(r#""authority_suffix": false"#),
            &["mirror.authority_suffix: expected a string, found a boolean"],
        ),
        // --- limits ---------------------------------------------------------------------
        case(
            "max_body_bytes over 16 MiB",
            mirror_with(r#""max_body_bytes": 16777217"#),
            &["mirror.max_body_bytes: expected an integer from 0 to 16777216, found 16777217"],
        ),
        case(
            "max_body_bytes negative",
            mirror_with(r#""max_body_bytes": -1"#),
            &["mirror.max_body_bytes: expected an integer from 0 to 16777216, found -1"],
        ),
        case(
            "max_body_bytes a float",
            mirror_with(r#""max_body_bytes": 1024.5"#),
            &["mirror.max_body_bytes: expected an integer from 0 to 16777216, found 1024.5"],
        ),
        case(
            "max_body_bytes a whole float",
            mirror_with(r#""max_body_bytes": 1024.0"#),
            &["mirror.max_body_bytes: expected an integer from 0 to 16777216, found 1024.0"],
        ),
        case(
            "max_body_bytes a string",
            mirror_with(r#""max_body_bytes": "64k""#),
            &[r#"mirror.max_body_bytes: expected an integer from 0 to 16777216, found "64k""#],
        ),
        case(
            "timeout_ms 0",
            mirror_with(r#""timeout_ms": 0"#),
            &["mirror.timeout_ms: expected an integer from 1 to 300000, found 0"],
        ),
        case(
            "timeout_ms above five minutes",
            mirror_with(r#""timeout_ms": 300001"#),
            &["mirror.timeout_ms: expected an integer from 1 to 300000, found 300001"],
        ),
        case(
            "max_in_flight 0",
            mirror_with(r#""max_in_flight": 0"#),
            &["mirror.max_in_flight: expected an integer from 1 to 100000, found 0"],
        ),
        case(
            "max_in_flight too large",
            mirror_with(r#""max_in_flight": 100001"#),
            &["mirror.max_in_flight: expected an integer from 1 to 100000, found 100001"],
        ),
        // --- compare --------------------------------------------------------------------
        case(
            "compare unknown",
            mirror_with(r#""compare": "hash""#),
            &[r#"mirror.compare: expected "off", "status" or "body""#],
        ),
        case(
            "compare upper-case",
            mirror_with(r#""compare": "Status""#),
            &[r#"mirror.compare: expected "off", "status" or "body""#],
        ),
        case(
            "compare a boolean",
            mirror_with(r#""compare": false"#),
            &[r#"mirror.compare: expected "off", "status" or "body""#],
        ),
        case(
            "compare null",
            mirror_with(r#""compare": null"#),
            &[r#"mirror.compare: expected "off", "status" or "body""#],
        ),
        // --- when -----------------------------------------------------------------------
        case(
            "when an object",
            mirror_with(r#""when": {"header": "x-plan", "equals": "free"}"#),
            &["mirror.when: expected a list of conditions, found an object"],
        ),
        case(
            "when with a bad header name",
            mirror_with(r#""when": [{"header": "x plan", "equals": "free"}]"#),
            &[r#"mirror.when[0].header: "x plan" is not a valid header name"#],
        ),
        case(
            "when with an unknown condition field",
            mirror_with(r#""when": [{"header": "x-plan", "equals": "free", "negate": true}]"#),
            &["mirror.when[0].negate: unknown field; expected one of: header, cookie, query, equals, prefix, in, present"],
        ),
        case(
            "when with two subjects and no test",
            mirror_with(r#""when": [{"header": "x-plan", "equals": "free"}, {"header": "a", "cookie": "b"}]"#),
            &[
                "mirror.when[1]: a condition needs exactly one of header, cookie, query (found 2)",
                "mirror.when[1]: a condition needs exactly one of equals, prefix, in, present (found 0)",
            ],
        ),
        case(
            "when with bad tests",
            mirror_with(
                r#""when": [{"cookie": "plan", "in": []}, {"query": "", "present": "yes"},
                            {"cookie": "a b", "equals": 1}]"#,
            ),
            &[
                "mirror.when[0].in: must list at least one value",
                "mirror.when[1].query: query parameter name must not be empty",
                "mirror.when[1].present: expected true or false, found a string",
                r#"mirror.when[2].cookie: "a b" is not a valid cookie name"#,
                "mirror.when[2].equals: expected a string, found a number",
            ],
        ),
        case(
            "when a condition not an object",
            mirror_with(r#""when": ["x-plan == free"]"#),
            &["mirror.when[0]: expected an object, found a string"],
        ),
    ]
}

#[test]
fn bad_sections_are_refused_with_exactly_the_expected_problems() {
    let mut failures = Vec::new();
    for case in bad_sections() {
        let found = error_lines(&case.doc);
        if found != case.expected {
            failures.push(format!(
                "{}\n  expected: {:#?}\n  found:    {:#?}",
                case.what, case.expected, found
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_problem_of_a_section_is_reported_at_once() {
    // Every field is wrong, plus two unknown ones. Unknown fields come first (serde_json
    // keeps keys sorted), then the fields in the order they are checked.
    let doc = with_mirror(
        r#"{
          "cluster": "",
          "when": [{"header": "x plan", "equals": "free"}, {"query": "q", "prefix": 7}],
          "percent": 150,
          "methods": ["GET", "GE T", 3],
          "strip_headers": ["x-ok", "bad header", ":path"],
          "marker_header": ":shadow",
          "authority_suffix": "/shadow",
          "max_body_bytes": 16777217,
          "timeout_ms": 0,
          "max_in_flight": -5,
          "compare": "bytes",
          "sample": 0.5,
          "body": true
        }"#,
    );
    let expected = [
        format!("mirror.body: unknown field; expected one of: {}", FIELDS),
        format!("mirror.sample: unknown field; expected one of: {}", FIELDS),
        "mirror.cluster: must not be empty".to_string(),
        r#"mirror.when[0].header: "x plan" is not a valid header name"#.to_string(),
        "mirror.when[1].prefix: expected a string, found a number".to_string(),
        "mirror.percent: expected a number from 0 to 100, found 150".to_string(),
        r#"mirror.methods[1]: "GE T" is not a valid HTTP method"#.to_string(),
        "mirror.methods[2]: expected a string, found a number".to_string(),
        r#"mirror.strip_headers[1]: "bad header" is not a valid header name"#.to_string(),
        "mirror.strip_headers[2]: must not be a pseudo-header".to_string(),
        "mirror.marker_header: must not be a pseudo-header".to_string(),
        format!("mirror.authority_suffix: {}", SUFFIX_MESSAGE),
        "mirror.max_body_bytes: expected an integer from 0 to 16777216, found 16777217".to_string(),
        "mirror.timeout_ms: expected an integer from 1 to 300000, found 0".to_string(),
        "mirror.max_in_flight: expected an integer from 1 to 100000, found -5".to_string(),
        r#"mirror.compare: expected "off", "status" or "body""#.to_string(),
    ];
    assert_eq!(error_lines(&doc), expected);
}

#[test]
fn mirror_problems_are_reported_with_the_rest_of_the_policy() {
    // The mirror is checked even when the name, the variants and the rules are broken,
    // and its problems come last (the policy's fields are checked in their listed order).
    let doc = r#"{"name": "Checkout", "variants": ["stable", "stable"],
        "rules": [{"name": "r", "split": {"by": {"header": "x user"},
                   "weights": [{"variant": "canary", "weight": 1}]}}],
        "mirror": {"percent": 200, "methods": []}}"#;
    assert_eq!(
        error_lines(doc),
        [
            r#"name: "Checkout" may contain only a-z, 0-9, '_' and '-'"#,
            r#"variants[1]: duplicate variant "stable""#,
            r#"rules[0].split.by.header: "x user" is not a valid header name"#,
            "mirror.cluster: required field is missing",
            "mirror.percent: expected a number from 0 to 100, found 200",
            "mirror.methods: must list at least one value",
        ]
    );
    // A valid mirror does not hide the policy's own problems.
    assert_eq!(
        error_lines(r#"{"name": "p", "variants": [], "mirror": {"cluster": "shadow"}}"#),
        ["variants: must list at least one variant"]
    );
}

// ---------------------------------------------------------------------------------------
// choose: marker, when, method, sampling
// ---------------------------------------------------------------------------------------

#[test]
fn a_marked_request_is_skipped_before_anything_else() {
    let policy = parse(&with_mirror(CONTRACT_MIRROR));
    let m = mirror_of(&policy);
    // The genuine marker wins even when `when` fails and the method is not listed.
    for headers in [
        &[
            (":method", "GET"),
            ("x-plan", "free"),
            ("x-meshcanary-shadow", TOKEN),
        ][..],
        &[
            (":method", "GET"),
            ("x-plan", "paid"),
            ("x-meshcanary-shadow", TOKEN),
        ][..],
        &[(":method", "POST"), ("x-meshcanary-shadow", TOKEN)][..],
        &[("X-MeshCanary-Shadow", TOKEN)][..],
    ] {
        let req = request(&policy, headers);
        assert_eq!(
            m.marker(&req, TOKEN.as_bytes()),
            Marker::Genuine,
            "{:?}",
            headers
        );
        assert_eq!(choice(&policy, headers), MARKED, "{:?}", headers);
    }
    let req = request(&policy, &[(":method", "GET"), ("x-plan", "free")]);
    assert_eq!(m.marker(&req, TOKEN.as_bytes()), Marker::Absent);
    assert_eq!(
        choice(&policy, &[(":method", "GET"), ("x-plan", "free")]),
        SEND
    );

    // A custom marker replaces the default one.
    let custom = parse(&mirror_with(r#""marker_header": "X-Dry-Run""#));
    assert_eq!(
        choice(&custom, &[(":method", "GET"), ("x-dry-run", TOKEN)]),
        MARKED
    );
    assert_eq!(
        choice(
            &custom,
            &[(":method", "GET"), ("x-meshcanary-shadow", TOKEN)]
        ),
        SEND
    );
}

#[test]
fn a_forged_marker_is_live_traffic() {
    let policy = parse(&with_mirror(CONTRACT_MIRROR));
    let m = mirror_of(&policy);
    // Any value but the token — what a client would guess, a token of another proxy or of
    // an earlier policy, a prefix of it, an empty value — is forged: the request is chosen
    // like any live one.
    let prefix = &TOKEN[..31];
    let longer = format!("{TOKEN}0");
    let upper = TOKEN.to_ascii_uppercase();
    for (value, plan, method, expected) in [
        ("1", "free", "GET", SEND),
        ("", "free", "GET", SEND),
        (prefix, "free", "GET", SEND),
        (longer.as_str(), "free", "GET", SEND),
        (upper.as_str(), "free", "GET", SEND),
        ("1", "paid", "GET", MirrorChoice::NotEligible),
        ("1", "free", "POST", MirrorChoice::Skip(SkipReason::Method)),
    ] {
        let headers = [
            (":method", method),
            ("x-plan", plan),
            ("x-meshcanary-shadow", value),
        ];
        let req = request(&policy, &headers);
        assert_eq!(
            m.marker(&req, TOKEN.as_bytes()),
            Marker::Forged,
            "{:?}",
            value
        );
        assert_eq!(choice(&policy, &headers), expected, "{:?}", value);
    }
    // Without a token (none could be made) nothing is a copy.
    let req = request(
        &policy,
        &[(":method", "GET"), ("x-meshcanary-shadow", TOKEN)],
    );
    assert_eq!(m.marker(&req, b""), Marker::Forged);
}

#[test]
fn a_request_that_fails_when_is_not_eligible() {
    let policy = parse(&with_mirror(CONTRACT_MIRROR));
    assert_eq!(
        choice(&policy, &[(":method", "GET"), ("x-plan", "paid")]),
        MirrorChoice::NotEligible
    );
    assert_eq!(
        choice(&policy, &[(":method", "GET")]),
        MirrorChoice::NotEligible
    );
    // `when` comes before the method: an unlisted method that fails `when` is not counted.
    assert_eq!(
        choice(&policy, &[(":method", "POST"), ("x-plan", "paid")]),
        MirrorChoice::NotEligible
    );
    assert_eq!(
        choice(&policy, &[(":method", "POST"), ("x-plan", "free")]),
        METHOD
    );

    // All conditions must hold; cookie and query conditions work as in rules.
    let policy = parse(&mirror_with(
        r#""when": [{"cookie": "plan", "equals": "free"}, {"query": "dry", "present": false}]"#,
    ));
    assert_eq!(
        choice(
            &policy,
            &[
                (":method", "GET"),
                ("cookie", "a=1; plan=free"),
                (":path", "/p?x=1")
            ]
        ),
        SEND
    );
    assert_eq!(
        choice(
            &policy,
            &[
                (":method", "GET"),
                ("cookie", "plan=free"),
                (":path", "/p?dry=1")
            ]
        ),
        MirrorChoice::NotEligible
    );
    assert_eq!(
        choice(
            &policy,
            &[(":method", "GET"), ("cookie", "plan=paid"), (":path", "/p")]
        ),
        MirrorChoice::NotEligible
    );
}

#[test]
fn unlisted_methods_are_skipped() {
    let policy = parse(&with_mirror(r#"{"cluster": "shadow"}"#));
    for method in ["GET", "HEAD", "OPTIONS"] {
        assert_eq!(choice(&policy, &[(":method", method)]), SEND, "{}", method);
    }
    // Methods are compared as sent, case-sensitively; a missing `:method` is no method.
    for method in [
        "POST", "PUT", "PATCH", "DELETE", "get", "Get", "CONNECT", "",
    ] {
        assert_eq!(
            choice(&policy, &[(":method", method)]),
            METHOD,
            "{:?}",
            method
        );
    }
    assert_eq!(choice(&policy, &[]), METHOD);

    // Writes are mirrored only when listed (lower-case in the policy is fine).
    let policy = parse(&mirror_with(r#""methods": ["post", "GET"]"#));
    assert_eq!(choice(&policy, &[(":method", "POST")]), SEND);
    assert_eq!(choice(&policy, &[(":method", "GET")]), SEND);
    assert_eq!(choice(&policy, &[(":method", "HEAD")]), METHOD);
    assert_eq!(choice(&policy, &[(":method", "PUT")]), METHOD);
}

#[test]
fn zero_and_hundred_percent_never_draw() {
    // Even with a keyed split and a key, and without one.
    for (percent, expected) in [("0", SAMPLED_OUT), ("0.0", SAMPLED_OUT), ("100", SEND)] {
        let no_key = parse(&mirror_with(&format!(r#""percent": {}"#, percent)));
        let with_key = keyed(percent);
        for i in 0..1_000 {
            let id = format!("user-{}", i);
            assert_eq!(choice(&no_key, &[(":method", "GET")]), expected);
            assert_eq!(
                choice(&with_key, &[(":method", "GET"), ("x-user-id", id.as_str())]),
                expected,
                "{} at {} %",
                id,
                percent
            );
            assert_eq!(choice(&with_key, &[(":method", "GET")]), expected);
        }
    }
}

#[test]
fn without_a_key_sampling_draws_once_per_request() {
    // No split at all, a random split, and a keyed split whose key is absent or empty.
    let random_split = parse(&with_rules_and_mirror(
        r#"[{"name": "r", "split": {"by": "random", "weights": [{"variant": "canary", "weight": 1}]}}]"#,
        r#"{"cluster": "shadow", "percent": 30}"#,
    ));
    let unkeyed = parse(&mirror_with(r#""percent": 30"#));
    let keyed = keyed("30");
    let cases: [(&Policy, &[(&str, &str)]); 5] = [
        (&unkeyed, &[(":method", "GET"), ("x-user-id", "user-1")]),
        (
            &random_split,
            &[(":method", "GET"), ("x-user-id", "user-1")],
        ),
        (&keyed, &[(":method", "GET")]),
        (&keyed, &[(":method", "GET"), ("x-user-id", "")]),
        (
            &keyed,
            &[(":method", "GET"), ("cookie", "x-user-id=user-1")],
        ),
    ];
    for (policy, headers) in cases {
        let m = mirror_of(policy);
        let req = request(policy, headers);
        let calls = Cell::new(0);
        assert_eq!(
            m.choose(&req, Marker::Absent, counted(&calls, 0)),
            SEND,
            "{:?}",
            headers
        );
        assert_eq!(
            m.choose(&req, Marker::Absent, counted(&calls, u64::MAX)),
            SAMPLED_OUT,
            "{:?}",
            headers
        );
        assert_eq!(calls.get(), 2, "one draw per request: {:?}", headers);
    }

    // The draw is mapped onto the share exactly: 30 % of the u64 range is sent.
    let m = mirror_of(&unkeyed);
    let req = request(&unkeyed, &[(":method", "GET")]);
    let first_out = ((300_000u128 << 64) + 999_999) / 1_000_000;
    let first_out = first_out as u64;
    assert_eq!(m.choose(&req, Marker::Absent, || first_out - 1), SEND);
    assert_eq!(m.choose(&req, Marker::Absent, || first_out), SAMPLED_OUT);

    // Over many uniform draws (splitmix64), about 30 %.
    let mut state = 11u64;
    let sent = (0..20_000)
        .filter(|_| {
            m.choose(&req, Marker::Absent, || {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                fmix64(state)
            }) == SEND
        })
        .count();
    assert!((5_600..=6_400).contains(&sent), "sent {} of 20000", sent);
}

/// For `user-0` … `user-19999` (sent in `x-user-id`): whether each is mirrored.
fn mirrored_users(policy: &Policy) -> Vec<bool> {
    let m = mirror_of(policy);
    (0..20_000)
        .map(|i| {
            let id = format!("user-{}", i);
            let req = request(policy, &[(":method", "GET"), ("x-user-id", id.as_str())]);
            match m.choose(&req, Marker::Absent, no_draw) {
                MirrorChoice::Send => true,
                MirrorChoice::Skip(SkipReason::SampledOut) => false,
                other => panic!("{}: unexpected {:?}", id, other),
            }
        })
        .collect()
}

fn share_percent(users: &[bool]) -> f64 {
    users.iter().filter(|c| **c).count() as f64 * 100.0 / users.len() as f64
}

#[test]
fn keyed_sampling_is_sticky_per_key() {
    let policy = keyed("30");
    let m = mirror_of(&policy);
    let calls = Cell::new(0);
    for user in 0..200 {
        let id = format!("user-{}", user);
        let req = request(&policy, &[(":method", "GET"), ("x-user-id", id.as_str())]);
        let first = m.choose(&req, Marker::Absent, counted(&calls, 0));
        for i in 0..100u64 {
            let random = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            assert_eq!(
                m.choose(&req, Marker::Absent, counted(&calls, random)),
                first,
                "{} changed on call {}",
                id,
                i
            );
        }
        // The random source is never asked: the key decides.
        assert_eq!(calls.get(), 0, "{} drew", id);
    }
}

#[test]
fn keyed_sampling_mirrors_about_the_asked_share() {
    let users = mirrored_users(&keyed("30"));
    let share = share_percent(&users);
    assert!(
        (28.0..=32.0).contains(&share),
        "mirrored share {:.2} %",
        share
    );
    for (percent, low, high) in [("10", 8.0, 12.0), ("50", 48.0, 52.0), ("12.5", 10.5, 14.5)] {
        let share = share_percent(&mirrored_users(&keyed(percent)));
        assert!(
            (low..=high).contains(&share),
            "{} %: mirrored share {:.2} %",
            percent,
            share
        );
    }
}

#[test]
fn keyed_sampling_does_not_follow_the_routing_split() {
    // Stable and canary users are mirrored alike: the mirror has a salt of its own.
    let policy = keyed("30");
    let mirrored = mirrored_users(&policy);
    let canary = policy.variant_index("canary").expect("canary");
    let (mut in_canary, mut in_stable) = (Vec::new(), Vec::new());
    for (i, was_mirrored) in mirrored.iter().enumerate() {
        let id = format!("user-{}", i);
        let decision = policy.decide(&request(&policy, &[("x-user-id", id.as_str())]), no_draw);
        if decision.variant == canary {
            in_canary.push(*was_mirrored);
        } else {
            in_stable.push(*was_mirrored);
        }
    }
    assert!(in_canary.len() > 9_000 && in_stable.len() > 9_000);
    for (cohort, users) in [("canary", &in_canary), ("stable", &in_stable)] {
        let share = share_percent(users);
        assert!(
            (27.0..=33.0).contains(&share),
            "{} users: mirrored share {:.2} %",
            cohort,
            share
        );
    }
}

#[test]
fn ramping_the_mirror_keeps_every_mirrored_key_mirrored() {
    let before = mirrored_users(&keyed("10"));
    let after = mirrored_users(&keyed("30"));
    for (i, (was, is)) in before.iter().zip(&after).enumerate() {
        assert!(
            !*was || *is,
            "user-{} stopped being mirrored on the ramp",
            i
        );
    }
}

#[test]
fn a_cookie_keyed_split_makes_sampling_sticky_by_the_cookie() {
    let policy = parse(&with_rules_and_mirror(
        r#"[{"name": "r", "split": {"by": {"cookie": "uid"},
            "weights": [{"variant": "canary", "weight": 1}]}}]"#,
        r#"{"cluster": "shadow", "percent": 50}"#,
    ));
    let m = mirror_of(&policy);
    let mut sent = 0;
    for i in 0..2_000 {
        let cookie = format!("a=b; uid={}; c=d", i);
        let req = request(&policy, &[(":method", "GET"), ("cookie", cookie.as_str())]);
        let first = m.choose(&req, Marker::Absent, no_draw);
        assert_eq!(m.choose(&req, Marker::Absent, no_draw), first);
        // The same key in another cookie header, or a quoted one, gives the same choice.
        let other = format!("uid=\"{}\"", i);
        assert_eq!(
            m.choose(
                &request(&policy, &[(":method", "GET"), ("cookie", other.as_str())]),
                Marker::Absent,
                no_draw
            ),
            first,
            "uid {}",
            i
        );
        if first == SEND {
            sent += 1;
        }
    }
    assert!((850..=1_150).contains(&sent), "sent {} of 2000", sent);
    // Without the cookie (or with an empty value), a draw decides.
    let calls = Cell::new(0);
    for cookie in ["a=b", "uid="] {
        let req = request(&policy, &[(":method", "GET"), ("cookie", cookie)]);
        assert_eq!(m.choose(&req, Marker::Absent, counted(&calls, 0)), SEND);
    }
    assert_eq!(calls.get(), 2);
}

// ---------------------------------------------------------------------------------------
// What a copy carries
// ---------------------------------------------------------------------------------------

fn default_mirror() -> Mirror {
    mirror_of(&parse(&mirror_with(
        r#""strip_headers": ["X-Session-Token"]"#,
    )))
    .clone()
}

#[test]
fn envoy_internal_headers_are_recognised_by_their_full_prefix_in_any_case() {
    let m = default_mirror();
    for name in [
        "x-envoy-",
        "X-Envoy-Original-Path",
        "X-ENVOY-EXPECTED-RQ-TIMEOUT-MS",
        "x-EnVoY-attempt-count",
    ] {
        assert!(!m.copies_header(name), "{} must not be copied", name);
    }
    // Only `x-envoy-` with its dash is Envoy's: look-alikes are ordinary headers.
    for name in [
        "x-envoy",
        "x-envoyfoo",
        "X-Envoy_Original",
        "x-envoy.trace",
        "my-x-envoy-header",
        "x-envo",
        "x",
        "",
    ] {
        assert!(m.copies_header(name), "{:?} must be copied", name);
    }
    // A name that is not ASCII (never valid, but must not panic on a char boundary).
    assert!(m.copies_header("x-envoyé"));
    assert!(m.copies_header("x-envé-x"));
    assert!(m.copies_header("éééé"));
}

#[test]
fn credentials_hop_by_hop_marker_and_listed_headers_are_dropped_in_any_case() {
    let m = default_mirror();
    for name in [
        "AUTHORIZATION",
        "Proxy-Authorization",
        "Cookie",
        "x-API-key",
        "X-SESSION-TOKEN",
        "Connection",
        "KEEP-ALIVE",
        "proxy-connection",
        "transfer-encoding",
        "TE",
        "Upgrade",
        "Content-Length",
        "X-Meshcanary-Shadow",
        ":authority",
        ":Authority",
    ] {
        assert!(!m.copies_header(name), "{} must not be copied", name);
    }
    for name in [
        ":method",
        ":path",
        ":scheme",
        "content-type",
        "accept-encoding",
        "x-forwarded-for",
        "x-meshcanary-variant",
        "set-cookie",
        "cookie2",
        "authorization-hint",
        "x-session-token-id",
        "tex",
        "trailer",
    ] {
        assert!(m.copies_header(name), "{} must be copied", name);
    }

    // A custom marker replaces the default one; the credentials stay dropped even when the
    // policy lists nothing.
    let custom = mirror_of(&parse(&mirror_with(r#""marker_header": "X-Dry-Run""#))).clone();
    assert!(!custom.copies_header("x-dry-run"));
    assert!(!custom.copies_header("X-DRY-RUN"));
    assert!(custom.copies_header("x-meshcanary-shadow"));
    assert!(custom.copies_header("x-session-token"));
    for name in ALWAYS_STRIPPED {
        assert!(!custom.copies_header(name), "{}", name);
    }
}

#[test]
fn authority_suffix_edge_cases() {
    let m = default_mirror();
    for (authority, expected) in [
        // No port.
        ("localhost", "localhost-shadow"),
        (
            "api.default.svc.cluster.local",
            "api.default.svc.cluster.local-shadow",
        ),
        ("10.0.0.1", "10.0.0.1-shadow"),
        // A port.
        ("localhost:80", "localhost-shadow:80"),
        ("10.0.0.1:8443", "10.0.0.1-shadow:8443"),
        // Not a port after the colon: the whole authority is taken as the host.
        ("api.local:http", "api.local:http-shadow"),
        ("api.local:80a", "api.local:80a-shadow"),
        ("a:b:c", "a:b:c-shadow"),
        // An empty port (RFC 3986 allows it) keeps its colon after the host.
        ("api.local:", "api.local-shadow:"),
        // IPv6 literals keep their brackets, with and without a port.
        ("[2001:db8::1]:443", "[2001:db8::1]-shadow:443"),
        ("[2001:db8::1]", "[2001:db8::1]-shadow"),
        ("[::ffff:10.0.0.1]:8080", "[::ffff:10.0.0.1]-shadow:8080"),
        ("[fe80::1%25eth0]:80", "[fe80::1%25eth0]-shadow:80"),
        ("[::1]:", "[::1]-shadow:"),
    ] {
        assert_eq!(m.shadow_authority(authority), expected, "{}", authority);
    }

    // Another suffix goes to the same place; without one the authority is unchanged.
    let dotted = mirror_of(&parse(&mirror_with(r#""authority_suffix": ".shadow""#))).clone();
    assert_eq!(dotted.shadow_authority("api:8080"), "api.shadow:8080");
    assert_eq!(dotted.shadow_authority("[::1]:8080"), "[::1].shadow:8080");
    let none = mirror_of(&parse(&mirror_with(r#""authority_suffix": null"#))).clone();
    for authority in ["api", "api:8080", "[::1]:8080", "[::1]", "api:http", ""] {
        assert_eq!(none.shadow_authority(authority), authority);
    }
}

#[test]
fn body_digest_edges() {
    // An empty body, even with a zero limit, has a digest of length 0.
    let empty = BodyDigest::new(0);
    let (hash, len) = empty.finish().expect("an empty body fits");
    assert_eq!(len, 0);
    let mut also_empty = BodyDigest::new(10);
    also_empty.update(b"");
    assert_eq!(also_empty.finish(), Some((hash, 0)));

    // Exactly the limit fits; one byte more does not, and it never fits again.
    let mut d = BodyDigest::new(4);
    d.update(b"\x00\xff");
    d.update(b"");
    d.update(b"\x80\x01");
    let at_limit = d.finish().expect("fits");
    assert_eq!(at_limit.1, 4);
    d.update(b"x");
    assert_eq!(d.finish(), None);
    d.update(b"");
    assert_eq!(d.finish(), None);

    // The digest depends on the bytes, not on how they were chunked.
    let body: Vec<u8> = (0..=255u8).cycle().take(1_000).collect();
    let mut whole = BodyDigest::new(1_000);
    whole.update(&body);
    for chunk in [1, 7, 255, 999] {
        let mut parts = BodyDigest::new(1_000);
        for part in body.chunks(chunk) {
            parts.update(part);
        }
        assert_eq!(parts.finish(), whole.finish(), "chunks of {}", chunk);
    }
    // One different byte gives a different digest.
    let mut changed = body.clone();
    changed[500] ^= 1;
    let mut other = BodyDigest::new(1_000);
    other.update(&changed);
    assert_ne!(other.finish(), whole.finish());
}

#[test]
fn listed_headers_of_every_length_are_dropped_long_ones_included() {
    // The fingerprints fold many names into one bit of 64: a name sharing one is still
    // compared in full.
    let long = "x-".to_string() + &"l".repeat(70);
    let longer = "x-".to_string() + &"l".repeat(90);
    let marker = "x-".to_string() + &"m".repeat(61);
    let m = mirror_of(&parse(&mirror_with(&format!(
        r#""strip_headers": ["a", "{long}"], "marker_header": "{marker}""#
    ))))
    .clone();
    for name in [
        "a",
        "A",
        long.as_str(),
        &long.to_ascii_uppercase(),
        marker.as_str(),
    ] {
        assert!(!m.copies_header(name), "{name} must not be copied");
    }
    for name in ["b", longer.as_str(), &("x-".to_string() + &"m".repeat(62))] {
        assert!(m.copies_header(name), "{name} must be copied");
    }
}
