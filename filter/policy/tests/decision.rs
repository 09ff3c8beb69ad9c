//! The per-request decision.
//!
//! Proves that:
//! * rules apply in order and the first match wins; no match means the first variant;
//! * header tests (`equals`, `prefix`, `in`, `present`) behave as documented, and values
//!   that are not UTF-8 never match a string test but do count as present;
//! * cookie and query parsing survive real-world and malformed input (quoted values,
//!   `;;=;a`, 16 KB headers, bad escapes, fragments, encoded names…);
//! * splits: a present key is sticky whatever the random source says, a missing (or
//!   empty) key follows `missing`, `by: "random"` draws, and a split can have a `when`;
//! * a 10 % split over 10,000 users is within ±1 point, and ramping 10 → 30 % keeps every
//!   canary user in the canary (for both hash schemes).

use std::cell::Cell;

use meshcanary_policy::decide::{cookie_value, query_value};
use meshcanary_policy::{Action, Decision, Placement, Policy, Split};

/// The policy from issue 2's contract section.
const CONTRACT_EXAMPLE: &str = r#"{
  "name": "checkout",
  "decision_header": "x-meshcanary-variant",
  "variants": ["stable", "canary"],
  "rules": [
    {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
    {"name": "beta", "when": [{"cookie": "plan", "in": ["beta", "internal"]}], "variant": "canary"},
    {"name": "rollout",
     "split": {"by": {"header": "x-user-id"}, "salt": "checkout-v2",
               "weights": [{"variant": "canary", "weight": 10}, {"variant": "stable", "weight": 90}]}}
  ]
}"#;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn policy(doc: &str) -> Policy {
    match Policy::from_json(doc.as_bytes()) {
        Ok(policy) => policy,
        Err(errors) => panic!("invalid test policy:\n{}\n--- document:\n{}", errors, doc),
    }
}

/// A policy with variants `stable` and `canary` and these rules (JSON).
fn with_rules(rules: &str) -> Policy {
    policy(&format!(
        r#"{{"name": "p", "variants": ["stable", "canary"], "rules": {}}}"#,
        rules
    ))
}

/// A policy whose only rule sends requests satisfying `condition` (JSON) to `canary`.
fn with_condition(condition: &str) -> Policy {
    with_rules(&format!(
        r#"[{{"name": "r", "when": [{}], "variant": "canary"}}]"#,
        condition
    ))
}

/// A policy whose only rule is this split (the JSON of the `split` object).
fn with_split(split: &str) -> Policy {
    with_rules(&format!(r#"[{{"name": "r", "split": {}}}]"#, split))
}

/// The request a policy sees: its inputs' values, from (header name, value) pairs.
/// Names are matched case-insensitively, the first pair of a name wins.
fn raw_request(policy: &Policy, headers: &[(&str, &[u8])]) -> Vec<Option<Vec<u8>>> {
    policy
        .inputs
        .iter()
        .map(|input| {
            headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(input))
                .map(|(_, value)| value.to_vec())
        })
        .collect()
}

fn request(policy: &Policy, headers: &[(&str, &str)]) -> Vec<Option<Vec<u8>>> {
    let raw: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
    raw_request(policy, &raw)
}

/// A random source for decisions that must not draw.
fn no_draw() -> u64 {
    panic!("this decision must not draw a random number")
}

/// Decides without a random draw; returns the variant's and the rule's names.
fn route(policy: &Policy, headers: &[(&str, &str)]) -> (String, Option<String>) {
    names(policy, policy.decide(&request(policy, headers), no_draw))
}

fn names(policy: &Policy, d: Decision) -> (String, Option<String>) {
    (
        policy.variants[d.variant].clone(),
        d.rule.map(|r| policy.rules[r].name.clone()),
    )
}

/// True when the only rule of a [`with_condition`] policy matches these raw headers.
fn matches_raw(policy: &Policy, headers: &[(&str, &[u8])]) -> bool {
    let decision = policy.decide(&raw_request(policy, headers), no_draw);
    decision.rule == Some(0)
}

/// True when the only rule of a [`with_condition`] policy matches these headers.
fn matches(policy: &Policy, headers: &[(&str, &str)]) -> bool {
    policy.decide(&request(policy, headers), no_draw).rule == Some(0)
}

fn split_of(policy: &Policy, rule: usize) -> &Split {
    match &policy.rules[rule].action {
        Action::Split(split) => split,
        other => panic!("rule {} is not a split: {:?}", rule, other),
    }
}

fn owned(s: Option<&str>) -> Option<Vec<u8>> {
    s.map(|s| s.as_bytes().to_vec())
}

// ---------------------------------------------------------------------------------------
// Rule order
// ---------------------------------------------------------------------------------------

#[test]
fn first_matching_rule_decides() {
    let p = policy(CONTRACT_EXAMPLE);
    let everything = [
        ("x-canary", "always"),
        ("cookie", "plan=beta"),
        ("x-user-id", "user-42"),
    ];
    assert_eq!(route(&p, &everything), ("canary".into(), Some("qa".into())));
    assert_eq!(
        route(&p, &everything[1..]),
        ("canary".into(), Some("beta".into()))
    );
    let d = p.decide(&request(&p, &everything[2..]), no_draw);
    assert_eq!(d.rule, Some(2));
    assert_eq!(d.placement, Some(Placement::Sticky));

    // Rules that do not match are skipped, however close they come.
    let near_misses = [
        ("X-Canary", "Always"),
        ("cookie", "plan=Beta; xplan=beta"),
        ("x-user-id", "user-42"),
    ];
    assert_eq!(p.decide(&request(&p, &near_misses), no_draw).rule, Some(2));
}

#[test]
fn earlier_rule_wins_over_a_later_one_that_also_matches() {
    let p = with_rules(
        r#"[{"name": "first", "when": [{"header": "x-a", "present": true}], "variant": "stable"},
            {"name": "second", "when": [{"header": "x-a", "equals": "1"}], "variant": "canary"}]"#,
    );
    assert_eq!(
        route(&p, &[("x-a", "1")]),
        ("stable".into(), Some("first".into()))
    );
}

#[test]
fn all_conditions_of_a_rule_must_hold() {
    let p = with_rules(
        r#"[{"name": "both", "when": [{"header": "x-a", "equals": "1"}, {"header": "x-b", "equals": "2"}],
             "variant": "canary"}]"#,
    );
    assert_eq!(
        route(&p, &[("x-a", "1"), ("x-b", "2")]).1.as_deref(),
        Some("both")
    );
    assert_eq!(route(&p, &[("x-a", "1")]).1, None);
    assert_eq!(route(&p, &[("x-b", "2")]).1, None);
    assert_eq!(route(&p, &[("x-a", "1"), ("x-b", "3")]).1, None);
}

#[test]
fn no_match_means_the_first_variant() {
    let p = with_condition(r#"{"header": "x-a", "present": true}"#);
    let d = p.decide(&request(&p, &[]), no_draw);
    assert_eq!(
        d,
        Decision {
            variant: 0,
            rule: None,
            placement: None
        }
    );
    // A policy without rules sends everything to its first variant.
    let p = policy(r#"{"name": "p", "variants": ["blue", "green"]}"#);
    let empty: Vec<Option<Vec<u8>>> = Vec::new();
    assert_eq!(p.decide(&empty, no_draw).variant, 0);
    assert_eq!(p.decide(&empty[..], no_draw).variant, 0);
}

// ---------------------------------------------------------------------------------------
// Header tests
// ---------------------------------------------------------------------------------------

#[test]
fn header_tests_behave_as_documented() {
    // (condition, header value or None for absent, expected match)
    let table: &[(&str, Option<&str>, bool)] = &[
        (r#""equals": "beta""#, Some("beta"), true),
        (r#""equals": "beta""#, Some("Beta"), false),
        (r#""equals": "beta""#, Some("beta "), false),
        (r#""equals": "beta""#, Some("betas"), false),
        (r#""equals": "beta""#, Some("bet"), false),
        (r#""equals": "beta""#, Some(""), false),
        (r#""equals": "beta""#, None, false),
        (r#""equals": """#, Some(""), true),
        (r#""equals": """#, None, false),
        (r#""equals": "é""#, Some("é"), true),
        (r#""prefix": "mobile-""#, Some("mobile-ios"), true),
        (r#""prefix": "mobile-""#, Some("mobile-"), true),
        (r#""prefix": "mobile-""#, Some("mobile"), false),
        (r#""prefix": "mobile-""#, Some("Mobile-ios"), false),
        (r#""prefix": "mobile-""#, Some("x-mobile-ios"), false),
        (r#""prefix": "mobile-""#, None, false),
        // An empty prefix is a presence test.
        (r#""prefix": """#, Some(""), true),
        (r#""prefix": """#, None, false),
        (r#""in": ["beta", "internal"]"#, Some("beta"), true),
        (r#""in": ["beta", "internal"]"#, Some("internal"), true),
        (r#""in": ["beta", "internal"]"#, Some("ga"), false),
        (
            r#""in": ["beta", "internal"]"#,
            Some("beta,internal"),
            false,
        ),
        (r#""in": ["beta", "internal"]"#, Some(""), false),
        (r#""in": ["beta", "internal"]"#, None, false),
        (r#""in": ["", "x"]"#, Some(""), true),
        (r#""present": true"#, Some("anything"), true),
        (r#""present": true"#, Some(""), true),
        (r#""present": true"#, None, false),
        (r#""present": false"#, None, true),
        (r#""present": false"#, Some(""), false),
        (r#""present": false"#, Some("x"), false),
    ];
    for (test, value, expected) in table {
        let p = with_condition(&format!(r#"{{"header": "X-Plan", {}}}"#, test));
        let headers: Vec<(&str, &[u8])> = value.iter().map(|v| ("x-plan", v.as_bytes())).collect();
        assert_eq!(
            matches_raw(&p, &headers),
            *expected,
            "{} against {:?}",
            test,
            value
        );
    }
}

#[test]
fn values_that_are_not_utf8_never_match_string_tests() {
    let bad_values: &[&[u8]] = &[
        b"\xff\xfe",
        b"beta\xff", // valid UTF-8 prefix, then garbage
        b"\xffbeta",
        b"\xc3",                // truncated two-byte sequence
        b"\xc0\xaf",            // overlong encoding of '/'
        b"\xed\xa0\x80",        // a UTF-16 surrogate
        b"mobile-\xf0\x9f\x98", // truncated emoji
    ];
    let string_tests = [
        r#""equals": "\u00ff\u00fe""#, // the bytes read as Latin-1
        r#""equals": "\ufffd\ufffd""#, // the bytes after lossy decoding
        r#""equals": "beta\ufffd""#,
        r#""prefix": "beta""#,
        r#""prefix": "mobile-""#,
        r#""prefix": "\ufffd""#,
        r#""prefix": "ÿ""#,
        r#""in": ["\u00ff\u00fe", "\ufffd\ufffd", "beta", "beta\ufffd", "\ufffdbeta"]"#,
    ];
    for &value in bad_values {
        for test in &string_tests {
            for subject in [
                r#""header": "x-plan""#,
                r#""cookie": "plan""#,
                r#""query": "plan""#,
            ] {
                let p = with_condition(&format!("{{{}, {}}}", subject, test));
                let cookie = [&b"plan="[..], value].concat();
                let path = [&b"/checkout?plan="[..], value].concat();
                let headers: [(&str, &[u8]); 3] =
                    [("x-plan", value), ("cookie", &cookie), (":path", &path)];
                assert!(
                    !matches_raw(&p, &headers),
                    "{} with {} matched {:x?}",
                    subject,
                    test,
                    value
                );
            }
        }
        // ...but the value is there.
        let present = with_condition(r#"{"header": "x-plan", "present": true}"#);
        assert!(matches_raw(&present, &[("x-plan", value)]), "{:x?}", value);
        let absent = with_condition(r#"{"header": "x-plan", "present": false}"#);
        assert!(!matches_raw(&absent, &[("x-plan", value)]), "{:x?}", value);
    }
    // Percent-encoded invalid UTF-8 in a query value is not UTF-8 either once decoded.
    let p = with_condition(r#"{"query": "plan", "prefix": "beta"}"#);
    assert!(!matches(&p, &[(":path", "/?plan=beta%ff")]));
    assert!(matches(&p, &[(":path", "/?plan=beta%c3%a9")]));
}

#[test]
fn a_key_that_is_not_utf8_is_still_sticky() {
    let p = policy(CONTRACT_EXAMPLE);
    let req = raw_request(&p, &[("x-user-id", b"\xff\xfe-user")]);
    let first = p.decide(&req, no_draw);
    assert_eq!(first.placement, Some(Placement::Sticky));
    for _ in 0..100 {
        assert_eq!(p.decide(&req, no_draw), first);
    }
}

// ---------------------------------------------------------------------------------------
// Cookies
// ---------------------------------------------------------------------------------------

#[test]
fn cookie_values_are_found_in_real_world_headers() {
    // (cookie header, cookie name, expected value)
    let table: &[(&str, &str, Option<&str>)] = &[
        ("plan=beta", "plan", Some("beta")),
        ("a=1; plan=beta; b=2", "plan", Some("beta")),
        ("a=1;plan=beta;b=2", "plan", Some("beta")),
        ("  a=1 ;   plan = beta  ; b=2", "plan", Some("beta")),
        ("a=1;\tplan=beta\t", "plan", Some("beta")),
        ("plan=\"beta\"", "plan", Some("beta")),
        ("plan=\"\"", "plan", Some("")),
        ("plan=\"beta", "plan", Some("\"beta")),
        ("plan=beta\"", "plan", Some("beta\"")),
        ("plan=\"", "plan", Some("\"")),
        ("plan=\"be ta\"", "plan", Some("be ta")),
        ("plan=", "plan", Some("")),
        ("plan=a=b=c", "plan", Some("a=b=c")),
        ("plan=beta; plan=ga", "plan", Some("beta")), // the first of duplicates wins
        ("planx=1; plan=beta", "plan", Some("beta")), // a longer name is another cookie
        ("xplan=1; plan=beta", "plan", Some("beta")),
        ("plan=beta", "pla", None), // a shorter name is another cookie
        ("planx=1", "plan", None),
        ("xplan=1", "plan", None),
        ("Plan=beta", "plan", None), // names are case-sensitive
        ("", "plan", None),
        (";;=;a", "a", None),
        (";;=;a", "plan", None),
        (";;=;a;plan=beta", "plan", Some("beta")),
        ("plan", "plan", None), // no '=': not a pair
        ("plan beta", "plan", None),
        (";", "plan", None),
        ("=beta", "plan", None),
        ("a=1; ; plan=beta", "plan", Some("beta")),
    ];
    for (header, name, expected) in table {
        assert_eq!(
            cookie_value(header.as_bytes(), name.as_bytes()),
            expected.map(str::as_bytes),
            "cookie {:?} in {:?}",
            name,
            header
        );
    }
}

#[test]
fn sixteen_kilobyte_cookie_headers_are_parsed() {
    let padding = "x".repeat(16 * 1024);
    let header = format!("session={}; plan=beta; tracking={}", padding, padding);
    assert!(header.len() > 32 * 1024);
    assert_eq!(cookie_value(header.as_bytes(), b"plan"), Some(&b"beta"[..]));
    assert_eq!(
        cookie_value(header.as_bytes(), b"session"),
        Some(padding.as_bytes())
    );
    assert_eq!(cookie_value(header.as_bytes(), b"absent"), None);

    // Through a policy: a 16 KB cookie header of many small cookies.
    let many: Vec<String> = (0..1600).map(|i| format!("c{}=v{}", i, i)).collect();
    let header = format!("{}; plan=internal", many.join("; "));
    assert!(header.len() > 16 * 1024);
    let p = policy(CONTRACT_EXAMPLE);
    assert_eq!(
        route(&p, &[("cookie", header.as_str())]),
        ("canary".into(), Some("beta".into()))
    );
    // A 16 KB garbage header simply does not match.
    let garbage = ";=".repeat(8 * 1024);
    let d = p.decide(&request(&p, &[("cookie", garbage.as_str())]), || 0);
    assert_eq!(d.rule, Some(2));
    assert_eq!(d.placement, Some(Placement::KeyMissingRandom));
}

#[test]
fn cookie_conditions_use_the_cookie_header() {
    let p = with_condition(r#"{"cookie": "plan", "in": ["beta", "internal"]}"#);
    let yes = |h: &str| matches(&p, &[("cookie", h)]);
    assert!(yes("plan=beta"));
    assert!(yes("theme=dark; plan=\"internal\""));
    assert!(!yes("plan=ga"));
    assert!(!yes("plan=ga; plan=beta"), "the first of duplicates wins");
    assert!(!yes("myplan=beta"));
    assert!(!matches(&p, &[]));

    let present = with_condition(r#"{"cookie": "plan", "present": true}"#);
    assert!(matches(&present, &[("cookie", "plan=")]));
    assert!(!matches(&present, &[("cookie", "plan")]));
    assert!(!matches(&present, &[("cookie", "other=1")]));
    assert!(!matches(&present, &[]));
}

// ---------------------------------------------------------------------------------------
// Query parameters
// ---------------------------------------------------------------------------------------

#[test]
fn query_values_are_found_and_decoded() {
    // (path, parameter name, expected decoded value)
    type Row = (&'static [u8], &'static str, Option<&'static [u8]>);
    let table: &[Row] = &[
        (b"/p?a=1&b=2", "b", Some(b"2")),
        (b"/p?a=1&b=2", "a", Some(b"1")),
        (b"/p?a=1&a=2", "a", Some(b"1")), // the first of duplicates wins
        (b"/p?ab=1&a=2", "a", Some(b"2")), // a longer name is another parameter
        (b"/p?ab=1", "a", None),
        (b"/p?a=1", "ab", None),
        (b"/p?A=1", "a", None), // names are case-sensitive
        (b"/p", "a", None),
        (b"/p?", "a", None),
        (b"/?a=", "a", Some(b"")),
        (b"?a=1", "a", Some(b"1")),
        // Decoding: '+' and %20 are spaces, %XX is a byte, either case.
        (b"/p?q=x+y", "q", Some(b"x y")),
        (b"/p?q=x%20y", "q", Some(b"x y")),
        (b"/p?q=%41%62%2f%2F", "q", Some(b"Ab//")),
        (b"/p?q=%2B", "q", Some(b"+")),
        (b"/p?q=%e2%82%ac", "q", Some("€".as_bytes())),
        (b"/p?q=%25zz", "q", Some(b"%zz")),
        // Bad escapes are kept as they are.
        (b"/p?q=%zz", "q", Some(b"%zz")),
        (b"/p?q=%", "q", Some(b"%")),
        (b"/p?q=a%", "q", Some(b"a%")),
        (b"/p?q=%4", "q", Some(b"%4")),
        (b"/p?q=%4g", "q", Some(b"%4g")),
        (b"/p?q=%%41", "q", Some(b"%A")),
        (b"/p?q=100%&r=1", "q", Some(b"100%")),
        // A parameter without '=' is present with an empty value.
        (b"/p?debug&a=1", "debug", Some(b"")),
        (b"/p?a=1&debug", "debug", Some(b"")),
        // Empty names and empty pairs are skipped.
        (b"/p?=1&a=2", "a", Some(b"2")),
        (b"/p?&&a=2&&", "a", Some(b"2")),
        (b"/p?=", "a", None),
        (b"/p?&", "a", None),
        // A fragment ends the query; a '?' inside it starts nothing.
        (b"/p?a=1#frag", "a", Some(b"1")),
        (b"/p?a=1#b=2", "b", None),
        (b"/p?a=1#&b=2", "b", None),
        (b"/p#x?a=1", "a", None),
        (b"/p#?a=1", "a", None),
        // Only the first '?' starts the query.
        (b"/p?a=1?b=2", "a", Some(b"1?b=2")),
        // Names are decoded before comparing.
        (b"/p?user%5Fid=7", "user_id", Some(b"7")),
        (b"/p?my+name=x", "my name", Some(b"x")),
        (b"/p?my%20name=x", "my name", Some(b"x")),
        (b"/p?a%3Db=1", "a=b", Some(b"1")),
        (b"/p?a%26b=1", "a&b", Some(b"1")),
        (b"/p?%C3%A9t%C3%A9=1", "été", Some(b"1")),
        (b"/p?user_id=7", "user%5Fid", None), // the policy's name is not decoded
    ];
    for (path, name, expected) in table {
        assert_eq!(
            query_value(path, name.as_bytes()),
            expected.map(<[u8]>::to_vec),
            "{:?} in {:?}",
            name,
            String::from_utf8_lossy(path)
        );
    }
}

#[test]
fn query_conditions_read_the_path() {
    let p = with_condition(r#"{"query": "q", "equals": "x y"}"#);
    for path in ["/s?q=x+y", "/s?q=x%20y", "/s?a=1&q=x%20y#top"] {
        assert!(matches(&p, &[(":path", path)]), "{}", path);
    }
    for path in ["/s?q=x%2By", "/s?q=xy", "/s", "/s?Q=x+y", "/s#?q=x+y"] {
        assert!(!matches(&p, &[(":path", path)]), "{}", path);
    }
    let debug = with_condition(r#"{"query": "debug", "present": true}"#);
    assert!(matches(&debug, &[(":path", "/s?debug")]));
    assert!(!matches(&debug, &[(":path", "/s?nodebug")]));
    assert!(!matches(&debug, &[]));
}

// ---------------------------------------------------------------------------------------
// Splits
// ---------------------------------------------------------------------------------------

/// A random source that counts its draws and returns 0, u64::MAX, 0, ...
fn counting_random(calls: &Cell<u32>) -> impl FnOnce() -> u64 + '_ {
    move || {
        calls.set(calls.get() + 1);
        if calls.get() % 2 == 1 {
            0
        } else {
            u64::MAX
        }
    }
}

#[test]
fn a_present_key_is_sticky_whatever_the_random_source_says() {
    let p = policy(CONTRACT_EXAMPLE);
    let calls = Cell::new(0);
    for user in 0..50 {
        let id = format!("user-{}", user);
        let req = request(&p, &[("x-user-id", id.as_str())]);
        let first = p.decide(&req, counting_random(&calls));
        assert_eq!(first.placement, Some(Placement::Sticky));
        assert_eq!(first.rule, Some(2));
        for i in 0..1000u64 {
            let d = p.decide(&req, move || i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            assert_eq!(d, first, "{} moved on call {}", id, i);
        }
        assert_eq!(
            p.variants[first.variant],
            p.variants[split_of(&p, 2).variant_for_key(id.as_bytes())]
        );
    }
    assert_eq!(calls.get(), 0, "a sticky placement never draws");
}

#[test]
fn a_missing_key_is_drawn_at_random_by_default() {
    let p = policy(CONTRACT_EXAMPLE);
    let calls = Cell::new(0);
    // The weights list canary first: a draw of 0 lands in it, u64::MAX in stable.
    let d = p.decide(&request(&p, &[]), counting_random(&calls));
    assert_eq!(d.placement, Some(Placement::KeyMissingRandom));
    assert!(d.placement.map_or(false, Placement::key_missing));
    assert_eq!(p.variants[d.variant], "canary");
    let d = p.decide(&request(&p, &[]), counting_random(&calls));
    assert_eq!(p.variants[d.variant], "stable");
    assert_eq!(calls.get(), 2, "one draw per request");

    // An empty header is no key either.
    let d = p.decide(&request(&p, &[("x-user-id", "")]), || 0);
    assert_eq!(d.placement, Some(Placement::KeyMissingRandom));
    assert_eq!(p.variants[d.variant], "canary");
    // Blank but not empty is a key.
    let d = p.decide(&request(&p, &[("x-user-id", " ")]), no_draw);
    assert_eq!(d.placement, Some(Placement::Sticky));
}

#[test]
fn a_missing_key_goes_to_the_fallback_when_asked() {
    // The fallback is the policy's first variant (stable), not the first weight (canary).
    let p = with_split(
        r#"{"by": {"cookie": "uid"}, "missing": "fallback",
            "weights": [{"variant": "canary", "weight": 100}, {"variant": "stable", "weight": 0}]}"#,
    );
    for cookie in [
        None,
        Some(""),
        Some("other=1"),
        Some("uid="),
        Some("uid=\"\""),
        Some("uid"),
    ] {
        let req = [owned(cookie)];
        let d = p.decide(&req[..], no_draw);
        assert_eq!(d.variant, 0, "cookie {:?}", cookie);
        assert_eq!(d.rule, Some(0));
        assert_eq!(d.placement, Some(Placement::KeyMissingFallback));
        assert!(Placement::KeyMissingFallback.key_missing());
    }
    let d = p.decide(&[owned(Some("a=1; uid=u-1"))][..], no_draw);
    assert_eq!(d.placement, Some(Placement::Sticky));
    assert_eq!(p.variants[d.variant], "canary");
    assert!(!Placement::Sticky.key_missing());
    assert!(!Placement::Random.key_missing());
}

#[test]
fn a_random_split_draws_for_every_request() {
    let p = with_split(
        r#"{"by": "random", "missing": "fallback",
            "weights": [{"variant": "canary", "weight": 1}, {"variant": "stable", "weight": 1}]}"#,
    );
    let calls = Cell::new(0);
    let empty: Vec<Option<Vec<u8>>> = Vec::new();
    let d = p.decide(&empty, counting_random(&calls));
    assert_eq!(d.placement, Some(Placement::Random));
    assert_eq!(p.variants[d.variant], "canary");
    let d = p.decide(&empty, counting_random(&calls));
    assert_eq!(p.variants[d.variant], "stable");
    assert_eq!(calls.get(), 2);
    assert!(split_of(&p, 0).key(&empty).is_none());

    // Roughly half and half over many uniform draws (splitmix64 as the source).
    let mut state = 7u64;
    let mut canary = 0;
    for _ in 0..10_000 {
        let d = p.decide(&empty, || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            meshcanary_policy::bucket::fmix64(state)
        });
        if p.variants[d.variant] == "canary" {
            canary += 1;
        }
    }
    assert!((4_800..=5_200).contains(&canary), "canary drew {}", canary);
}

#[test]
fn a_split_with_a_when_only_splits_matching_requests() {
    let p = with_rules(
        r#"[{"name": "mobile", "when": [{"header": "x-client", "prefix": "mobile-"}],
             "split": {"by": {"header": "x-user-id"}, "missing": "fallback",
                       "weights": [{"variant": "canary", "weight": 1}]}},
            {"name": "web", "when": [{"header": "x-client", "equals": "web"}], "variant": "stable"}]"#,
    );
    let d = p.decide(
        &request(&p, &[("x-client", "mobile-ios"), ("x-user-id", "u1")]),
        no_draw,
    );
    assert_eq!(names(&p, d), ("canary".into(), Some("mobile".into())));
    assert_eq!(d.placement, Some(Placement::Sticky));
    // A matching request without a key: the split's `missing` applies.
    let d = p.decide(&request(&p, &[("x-client", "mobile-ios")]), no_draw);
    assert_eq!(d.placement, Some(Placement::KeyMissingFallback));
    assert_eq!(d.rule, Some(0));
    // Requests the `when` rejects go on to the next rule or the fallback.
    assert_eq!(
        route(&p, &[("x-client", "web"), ("x-user-id", "u1")]),
        ("stable".into(), Some("web".into()))
    );
    assert_eq!(
        route(&p, &[("x-client", "desktop"), ("x-user-id", "u1")]),
        ("stable".into(), None)
    );
}

/// For `user-0` … `user-9999` (sent in `x-user-id`): whether each gets the canary.
fn canary_users(policy: &Policy) -> Vec<bool> {
    let canary = policy.variant_index("canary").expect("a canary variant");
    (0..10_000)
        .map(|i| {
            let id = format!("user-{}", i);
            policy
                .decide(&request(policy, &[("x-user-id", id.as_str())]), no_draw)
                .variant
                == canary
        })
        .collect()
}

fn share_percent(users: &[bool]) -> f64 {
    users.iter().filter(|c| **c).count() as f64 * 100.0 / users.len() as f64
}

fn rollout(hash: &str, canary_weight: u32) -> Policy {
    policy(&format!(
        r#"{{"name": "checkout", "variants": ["stable", "canary"], "rules": [
            {{"name": "rollout", "split": {{"by": {{"header": "x-user-id"}}, "salt": "checkout-v2",
              "hash": "{}",
              "weights": [{{"variant": "canary", "weight": {}}}, {{"variant": "stable", "weight": {}}}]}}}}]}}"#,
        hash,
        canary_weight,
        100 - canary_weight
    ))
}

#[test]
fn ten_percent_of_ten_thousand_users_is_within_one_point() {
    let contract = share_percent(&canary_users(&policy(CONTRACT_EXAMPLE)));
    assert!(
        (9.0..=11.0).contains(&contract),
        "canary share {:.2} %",
        contract
    );
    for hash in ["fnv", "flagd"] {
        let share = share_percent(&canary_users(&rollout(hash, 10)));
        assert!(
            (9.0..=11.0).contains(&share),
            "{}: canary share {:.2} %",
            hash,
            share
        );
    }
}

#[test]
fn ramping_ten_to_thirty_keeps_every_canary_user_in_the_canary() {
    for hash in ["fnv", "flagd"] {
        let before = canary_users(&rollout(hash, 10));
        let after = canary_users(&rollout(hash, 30));
        for (i, (was, is)) in before.iter().zip(&after).enumerate() {
            assert!(
                !*was || *is,
                "{}: user-{} left the canary on the ramp",
                hash,
                i
            );
        }
        let share = share_percent(&after);
        assert!(
            (29.0..=31.0).contains(&share),
            "{}: canary share {:.2} %",
            hash,
            share
        );
    }
}

#[test]
fn raising_the_canary_keeps_the_others_in_place_with_three_variants() {
    // FNV scheme: the first listed variant grows; the others keep their 1:1 ratio, so
    // nobody moves between them.
    let doc = |canary: u32, rest: u32| {
        policy(&format!(
            r#"{{"name": "p", "variants": ["stable", "canary", "beta"], "rules": [
                {{"name": "r", "split": {{"by": {{"header": "x-user-id"}},
                  "weights": [{{"variant": "canary", "weight": {}}}, {{"variant": "stable", "weight": {}}},
                              {{"variant": "beta", "weight": {}}}]}}}}]}}"#,
            canary, rest, rest
        ))
    };
    let low = doc(10, 45);
    let high = doc(40, 30);
    for i in 0..10_000 {
        let id = format!("user-{}", i);
        let before = low
            .decide(&request(&low, &[("x-user-id", id.as_str())]), no_draw)
            .variant;
        let after = high
            .decide(&request(&high, &[("x-user-id", id.as_str())]), no_draw)
            .variant;
        assert!(
            before == after || after == 1,
            "{} moved {} -> {}",
            id,
            before,
            after
        );
    }
}

#[test]
fn long_in_lists_in_any_order_and_with_duplicates_match_exactly_their_values() {
    // Compiled sorted and deduplicated (looked up by binary search): order and repeats in
    // the JSON must not change what matches.
    let mut values: Vec<String> = (0..1000).rev().map(|i| format!("v{i}")).collect();
    values.push("v7".into());
    values.push("".into());
    let list = serde_json::to_string(&values).unwrap();
    let p = with_condition(&format!(r#"{{"header": "x-plan", "in": {list}}}"#));
    for i in [0, 1, 7, 10, 99, 500, 998, 999] {
        assert!(matches(&p, &[("x-plan", &format!("v{i}"))]), "v{i}");
    }
    assert!(matches(&p, &[("x-plan", "")]));
    for miss in ["v1000", "v-1", "v", "V7", "v07", "w1"] {
        assert!(!matches(&p, &[("x-plan", miss)]), "{miss}");
    }
}

#[test]
fn many_rules_on_the_same_cookies_and_query_parameters_decide_as_each_rule_alone() {
    // A decision parses a cookie or query parameter once for consecutive conditions on the
    // same name; interleaved names and kinds must still each see their own value.
    let mut rules = Vec::new();
    for i in 0..30 {
        let when = match i % 5 {
            0 => format!(r#"{{"cookie": "tenant", "equals": "t{i}"}}"#),
            1 => format!(r#"{{"query": "tenant", "equals": "t{i}"}}"#),
            2 => format!(r#"{{"cookie": "plan", "prefix": "p{i}-"}}"#),
            3 => format!(r#"{{"query": "item", "in": ["i{i}", "x"]}}"#),
            _ => format!(
                r#"{{"cookie": "tenant", "present": false}}, {{"query": "tenant", "equals": "q{i}"}}"#
            ),
        };
        rules.push(format!(
            r#"{{"name": "r{i}", "when": [{when}], "variant": "canary"}}"#
        ));
    }
    let p = with_rules(&format!("[{}]", rules.join(",")));
    let rule_of = |cookie: &str, path: &str| {
        p.decide(
            &request(&p, &[("cookie", cookie), (":path", path)]),
            no_draw,
        )
        .rule
    };
    assert_eq!(
        rule_of("tenant=t25; plan=zz", "/?tenant=none&item=none"),
        Some(25)
    );
    assert_eq!(rule_of("tenant=zz", "/?tenant=t26"), Some(26));
    assert_eq!(rule_of("plan=p27-x", "/?tenant=none"), Some(27));
    assert_eq!(rule_of("plan=none", "/?item=i28&tenant=none"), Some(28));
    assert_eq!(rule_of("plan=none", "/?tenant=q29"), Some(29));
    assert_eq!(rule_of("tenant=x; plan=none", "/?tenant=q29"), None);
    assert_eq!(rule_of("tenant=t0", "/?tenant=t1"), Some(0));
    assert_eq!(rule_of("tenant=zz", "/?tenant=t1"), Some(1));
}

/// `cookie_value` as first written (split at every ';', trim each pair, split it at its
/// first '=', trim both sides): the one-pass parser must agree with it.
fn cookie_value_reference<'h>(header: &'h [u8], name: &[u8]) -> Option<&'h [u8]> {
    fn trim(mut s: &[u8]) -> &[u8] {
        while let [b' ' | b'\t', rest @ ..] = s {
            s = rest;
        }
        while let [rest @ .., b' ' | b'\t'] = s {
            s = rest;
        }
        s
    }
    header.split(|b| *b == b';').find_map(|pair| {
        let pair = trim(pair);
        let eq = pair.iter().position(|b| *b == b'=')?;
        if trim(&pair[..eq]) != name {
            return None;
        }
        let value = trim(&pair[eq + 1..]);
        Some(
            value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value),
        )
    })
}

/// 50,000 byte strings shorter than `max_len`, drawn from `alphabet` by a fixed
/// generator (a failure reproduces): the inputs a parser is compared with its
/// reference on.
fn drawn_strings(
    seed: u64,
    alphabet: &'static [u8],
    max_len: usize,
) -> impl Iterator<Item = Vec<u8>> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize
    };
    (0..50_000).map(move |_| {
        let len = next() % max_len;
        (0..len)
            .map(|_| alphabet[next() % alphabet.len()])
            .collect()
    })
}

#[test]
fn cookie_parser_agrees_with_the_split_and_trim_reference() {
    // Headers drawn from the bytes that matter to the parser, and names that occur in
    // them, prefix one another, or not at all.
    let names: [&[u8]; 5] = [b"a", b"ab", b"b", b"pl", b"plan"];
    let mut matched = 0;
    for header in drawn_strings(7, b" \t;=\"abpl", 24) {
        for name in names {
            let expected = cookie_value_reference(&header, name);
            assert_eq!(
                cookie_value(&header, name),
                expected,
                "header {:?}, name {:?}",
                String::from_utf8_lossy(&header),
                String::from_utf8_lossy(name)
            );
            matched += usize::from(expected.is_some());
        }
    }
    assert!(matched > 2_000, "too few headers held a name: {matched}");
}

/// `query_value` as first written (cut at '#', find '?', split at every '&', decode each
/// name in full): the word-at-a-time parser must agree with it.
fn query_value_reference(path: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    fn decode(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < input.len() {
            let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
            match input[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < input.len() => match (hex(input[i + 1]), hex(input[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                },
                b => out.push(b),
            }
            i += 1;
        }
        out
    }
    let path = match path.iter().position(|b| *b == b'#') {
        Some(end) => &path[..end],
        None => path,
    };
    let query = &path[path.iter().position(|b| *b == b'?')? + 1..];
    query.split(|b| *b == b'&').find_map(|pair| {
        let (raw_name, raw_value) = match pair.iter().position(|b| *b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &b""[..]),
        };
        (!raw_name.is_empty() && decode(raw_name) == name).then(|| decode(raw_value))
    })
}

#[test]
fn query_parser_agrees_with_the_decode_everything_reference() {
    // Paths drawn from the bytes that matter to the parser (separators, escapes, the
    // fragment), long enough to span several eight-byte words, and names that occur
    // in them plainly, only when decoded, or not at all.
    let names: [&[u8]; 6] = [b"a", b"ab", b"a b", b"b", b" ", b"a\x02"];
    let mut matched = 0;
    for path in drawn_strings(11, b"/?#&=%+ab20A", 40) {
        for name in names {
            let expected = query_value_reference(&path, name);
            assert_eq!(
                query_value(&path, name),
                expected,
                "path {:?}, name {:?}",
                String::from_utf8_lossy(&path),
                String::from_utf8_lossy(name)
            );
            matched += usize::from(expected.is_some());
        }
    }
    assert!(matched > 2_000, "too few paths held a name: {matched}");
}
