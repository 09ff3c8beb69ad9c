//! Validation of the policy document (the filter's JSON configuration).
//!
//! Proves that:
//! * the contract example from issue 2 parses, with defaults filled in, header names
//!   lower-cased, request inputs de-duplicated and the default salt `<policy>/<rule>`;
//! * every kind of bad document is refused with exactly the expected `path: message`
//!   list (a table: one row per kind of mistake, at every level of the document);
//! * a document with many problems gets all of them reported at once, in document order.

use meshcanary_policy::{
    Action, Condition, ConfigErrors, HashKind, MissingKey, Policy, Split, SplitKey, Subject, Test,
};

/// The policy from issue 2's contract section, verbatim.
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

/// A valid split rule, for documents that need one more well-formed rule.
const GOOD_SPLIT: &str = r#"{"name": "rollout", "split": {"by": {"header": "x-user-id"},
    "weights": [{"variant": "canary", "weight": 10}, {"variant": "stable", "weight": 90}]}}"#;

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

fn problems(doc: &str) -> ConfigErrors {
    match Policy::from_json(doc.as_bytes()) {
        Ok(policy) => panic!("expected errors, got {:#?}\n--- document:\n{}", policy, doc),
        Err(errors) => errors,
    }
}

/// The problems of a document as `path: message` lines.
fn error_lines(doc: &str) -> Vec<String> {
    problems(doc).iter().map(ToString::to_string).collect()
}

/// A policy named `checkout` with variants `stable` and `canary` and these rules (JSON).
fn with_rules(rules: &str) -> String {
    format!(
        r#"{{"name": "checkout", "variants": ["stable", "canary"], "rules": {}}}"#,
        rules
    )
}

/// A policy with one rule that has a condition (JSON) and sends matches to `canary`.
fn with_condition(condition: &str) -> String {
    with_rules(&format!(
        r#"[{{"name": "r", "when": [{}], "variant": "canary"}}]"#,
        condition
    ))
}

/// A policy with one split rule whose `split` object is given (JSON).
fn with_split(split: &str) -> String {
    with_rules(&format!(r#"[{{"name": "r", "split": {}}}]"#, split))
}

/// A policy with one split by `x-user-id` whose `weights` list is given (JSON).
fn with_weights(weights: &str) -> String {
    with_split(&format!(
        r#"{{"by": {{"header": "x-user-id"}}, "weights": {}}}"#,
        weights
    ))
}

fn only_split(policy: &Policy) -> &Split {
    match policy.rules.last().map(|r| &r.action) {
        Some(Action::Split(split)) => split,
        other => panic!("expected a split as the last rule, found {:?}", other),
    }
}

// ---------------------------------------------------------------------------------------
// Valid documents
// ---------------------------------------------------------------------------------------

#[test]
fn contract_example_parses_into_the_expected_policy() {
    let policy = parse(CONTRACT_EXAMPLE);
    assert_eq!(policy.name, "checkout");
    assert_eq!(policy.decision_header, "x-meshcanary-variant");
    assert_eq!(policy.variants, ["stable", "canary"]);
    assert_eq!(policy.inputs, ["x-canary", "cookie", "x-user-id"]);

    let names: Vec<&str> = policy.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["qa", "beta", "rollout"]);

    assert_eq!(
        policy.rules[0].when,
        [Condition {
            subject: Subject::Header(0),
            test: Test::Equals("always".into()),
        }]
    );
    assert_eq!(policy.rules[0].action, Action::Variant(1));

    assert_eq!(
        policy.rules[1].when,
        [Condition {
            subject: Subject::Cookie {
                name: "plan".into(),
                input: 1,
            },
            test: Test::In(vec!["beta".into(), "internal".into()]),
        }]
    );
    assert_eq!(policy.rules[1].action, Action::Variant(1));

    assert!(policy.rules[2].when.is_empty());
    let split = only_split(&policy);
    assert_eq!(split.by, SplitKey::Header(2));
    assert_eq!(split.salt, "checkout-v2");
    assert_eq!(split.variants, [1, 0], "weights list canary first");
    assert_eq!(split.weights.as_slice(), [10, 90]);
    assert_eq!(split.weights.total(), 100);
    assert_eq!(split.missing, MissingKey::Random);
    assert_eq!(split.hash, HashKind::Fnv);

    assert_eq!(policy.rule_index("beta"), Some(1));
    assert_eq!(policy.rule_index("nope"), None);
    assert_eq!(policy.variant_index("canary"), Some(1));
    assert_eq!(policy.variant_index("nope"), None);
}

#[test]
fn from_value_accepts_the_same_document() {
    let value: serde_json::Value = serde_json::from_str(CONTRACT_EXAMPLE).expect("valid JSON");
    assert_eq!(Policy::from_value(&value), Ok(parse(CONTRACT_EXAMPLE)));
}

#[test]
fn optional_fields_get_their_defaults() {
    let policy = parse(r#"{"name": "p", "variants": ["only"]}"#);
    assert_eq!(policy.decision_header, "x-meshcanary-variant");
    assert!(policy.rules.is_empty());
    assert!(policy.inputs.is_empty());

    let policy = parse(&with_rules(
        r#"[{"name": "rollout", "split": {"by": "random",
        "weights": [{"variant": "canary", "weight": 1}]}}]"#,
    ));
    let split = only_split(&policy);
    assert_eq!(split.by, SplitKey::Random);
    assert_eq!(split.missing, MissingKey::Random);
    assert_eq!(split.hash, HashKind::Fnv);
    assert!(policy.inputs.is_empty(), "a random split reads nothing");
}

#[test]
fn default_salt_is_policy_slash_rule() {
    let policy = parse(&with_rules(&format!("[{}]", GOOD_SPLIT)));
    assert_eq!(only_split(&policy).salt, "checkout/rollout");

    // An explicit salt, even an empty one, is kept as it is.
    let policy = parse(&with_split(
        r#"{"by": "random", "salt": "", "weights": [{"variant": "stable", "weight": 1}]}"#,
    ));
    assert_eq!(only_split(&policy).salt, "");
}

#[test]
fn explicit_split_options_are_compiled() {
    let policy = parse(&with_split(
        r#"{"by": {"cookie": "uid"}, "salt": "s", "missing": "fallback", "hash": "flagd",
            "weights": [{"variant": "stable", "weight": 0}, {"variant": "canary", "weight": 7}]}"#,
    ));
    let split = only_split(&policy);
    assert_eq!(
        split.by,
        SplitKey::Cookie {
            name: "uid".into(),
            input: 0
        }
    );
    assert_eq!(split.missing, MissingKey::Fallback);
    assert_eq!(split.hash, HashKind::Flagd);
    assert_eq!(split.variants, [0, 1]);
    assert_eq!(split.weights.as_slice(), [0, 7]);
    assert_eq!(policy.inputs, ["cookie"]);

    let policy = parse(&with_split(
        r#"{"by": "random", "missing": "random", "hash": "fnv",
            "weights": [{"variant": "canary", "weight": 2147483647}]}"#,
    ));
    assert_eq!(only_split(&policy).weights.total(), 2_147_483_647);
}

#[test]
fn header_names_are_lower_cased_and_inputs_deduplicated() {
    let policy = parse(
        r#"{
          "name": "checkout",
          "decision_header": "X-Route-To",
          "variants": ["stable", "canary"],
          "rules": [
            {"name": "a", "when": [{"header": "X-User-Id", "present": true},
                                   {"header": "x-user-id", "prefix": "u"},
                                   {"cookie": "plan", "equals": "beta"},
                                   {"query": "debug", "equals": "1"}], "variant": "canary"},
            {"name": "b", "when": [{"cookie": "team", "in": ["qa"]},
                                   {"query": "Debug", "present": false},
                                   {"header": ":Authority", "equals": "shop"}], "variant": "canary"},
            {"name": "c", "split": {"by": {"header": "X-USER-ID"},
                                    "weights": [{"variant": "canary", "weight": 1}]}}
          ]
        }"#,
    );
    assert_eq!(policy.decision_header, "x-route-to");
    assert_eq!(
        policy.inputs,
        ["x-user-id", "cookie", ":path", ":authority"]
    );

    let subjects: Vec<&Subject> = policy
        .rules
        .iter()
        .flat_map(|r| r.when.iter().map(|c| &c.subject))
        .collect();
    assert_eq!(
        subjects,
        [
            &Subject::Header(0),
            &Subject::Header(0),
            &Subject::Cookie {
                name: "plan".into(),
                input: 1
            },
            &Subject::Query {
                name: "debug".into(),
                input: 2
            },
            &Subject::Cookie {
                name: "team".into(),
                input: 1
            },
            // Query parameter names are case-sensitive: kept as written.
            &Subject::Query {
                name: "Debug".into(),
                input: 2
            },
            &Subject::Header(3),
        ]
    );
    assert_eq!(only_split(&policy).by, SplitKey::Header(0));
}

#[test]
fn longest_names_and_unusual_but_valid_values_are_accepted() {
    let long = "a".repeat(64);
    let policy = parse(&format!(
        r#"{{"name": "{long}", "variants": ["{long}", "v_1-x"],
            "rules": [{{"name": "{long}", "when": [{{"header": "x-a", "equals": ""}},
                                                  {{"header": "x-b", "prefix": ""}},
                                                  {{"cookie": "__Host-id", "present": false}},
                                                  {{"query": "a b", "in": ["", "é"]}}],
                       "variant": "v_1-x"}}]}}"#
    ));
    assert_eq!(policy.name.len(), 64);
    assert_eq!(policy.variants[0].len(), 64);
    assert_eq!(policy.rules[0].name.len(), 64);
}

// ---------------------------------------------------------------------------------------
// Invalid documents: one row per kind of mistake, with the exact problems reported
// ---------------------------------------------------------------------------------------

struct Case {
    what: &'static str,
    doc: String,
    expected: &'static [&'static str],
}

fn case(what: &'static str, doc: impl Into<String>, expected: &'static [&'static str]) -> Case {
    Case {
        what,
        doc: doc.into(),
        expected,
    }
}

fn bad_documents() -> Vec<Case> {
    vec![
        // --- not a policy at all -------------------------------------------------------
        case("not JSON", "not json", &["not valid JSON: expected ident at line 1 column 2"]),
        case(
            "truncated JSON",
            r#"{"name": "checkout""#,
            &["not valid JSON: EOF while parsing an object at line 1 column 19"],
        ),
        case("empty input", "", &["not valid JSON: EOF while parsing a value at line 1 column 0"]),
        case("a list", r#"["checkout"]"#, &["expected an object, found a list"]),
        case("a string", r#""checkout""#, &["expected an object, found a string"]),
        case("null", "null", &["expected an object, found null"]),
        // --- unknown fields, at every level ---------------------------------------------
        case(
            "unknown top-level field",
            r#"{"name": "checkout", "variants": ["stable"], "owner": "team"}"#,
            &["owner: unknown field; expected one of: name, decision_header, variants, rules, mirror"],
        ),
        case(
            "unknown rule field",
            with_rules(
                r#"[{"name": "qa", "when": [{"header": "x-qa", "present": true}],
                     "variant": "canary", "weight": 5}]"#,
            ),
            &["rules[0].weight: unknown field; expected one of: name, when, variant, split"],
        ),
        case(
            "unknown condition field",
            with_condition(r#"{"header": "x-qa", "equals": "1", "negate": true}"#),
            &["rules[0].when[0].negate: unknown field; expected one of: header, cookie, query, equals, prefix, in, present"],
        ),
        case(
            "unknown split field",
            with_split(
                r#"{"by": "random", "sticky": true, "weights": [{"variant": "canary", "weight": 1}]}"#,
            ),
            &["rules[0].split.sticky: unknown field; expected one of: by, salt, weights, missing, hash"],
        ),
        case(
            "unknown weights item field",
            with_weights(r#"[{"variant": "canary", "weight": 1, "note": "x"}]"#),
            &["rules[0].split.weights[0].note: unknown field; expected one of: variant, weight"],
        ),
        case(
            "unknown split.by field",
            with_split(
                r#"{"by": {"header": "x-user-id", "fallback": "x-session"},
                    "weights": [{"variant": "canary", "weight": 1}]}"#,
            ),
            &["rules[0].split.by.fallback: unknown field; expected one of: header, cookie"],
        ),
        // --- missing required fields ----------------------------------------------------
        case(
            "empty object",
            "{}",
            &["name: required field is missing", "variants: required field is missing"],
        ),
        case(
            "rule without a name",
            with_rules(
                r#"[{"split": {"by": "random", "weights": [{"variant": "canary", "weight": 1}]}}]"#,
            ),
            &["rules[0].name: required field is missing"],
        ),
        case(
            "split without by and weights",
            with_split("{}"),
            &["rules[0].split.by: required field is missing", "rules[0].split.weights: required field is missing"],
        ),
        case(
            "weights item without variant and weight",
            with_weights("[{}]"),
            &[
                "rules[0].split.weights[0].variant: required field is missing",
                "rules[0].split.weights[0].weight: required field is missing",
            ],
        ),
        // --- names -----------------------------------------------------------------------
        case(
            "upper-case policy name",
            r#"{"name": "Checkout", "variants": ["stable"]}"#,
            &[r#"name: "Checkout" may contain only a-z, 0-9, '_' and '-'"#],
        ),
        case(
            "policy name too long",
            format!(r#"{{"name": "{}", "variants": ["stable"]}}"#, "a".repeat(65)),
            &["name: must be 1 to 64 characters long"],
        ),
        case(
            "empty policy name",
            r#"{"name": "", "variants": ["stable"]}"#,
            &["name: must be 1 to 64 characters long"],
        ),
        case(
            "policy name not a string",
            r#"{"name": 7, "variants": ["stable"]}"#,
            &["name: expected a string, found a number"],
        ),
        case(
            "non-ASCII and dotted names",
            r#"{"name": "check.out", "variants": ["stäble", "canary"]}"#,
            &[
                r#"name: "check.out" may contain only a-z, 0-9, '_' and '-'"#,
                r#"variants[0]: "stäble" may contain only a-z, 0-9, '_' and '-'"#,
            ],
        ),
        case(
            "bad variant names",
            format!(r#"{{"name": "p", "variants": ["Canary", "", "{}", null]}}"#, "v".repeat(65)),
            &[
                r#"variants[0]: "Canary" may contain only a-z, 0-9, '_' and '-'"#,
                "variants[1]: must be 1 to 64 characters long",
                "variants[2]: must be 1 to 64 characters long",
                "variants[3]: expected a string, found null",
            ],
        ),
        case(
            "bad rule name",
            with_rules(
                r#"[{"name": "Beta Users", "when": [{"cookie": "plan", "equals": "beta"}], "variant": "canary"}]"#,
            ),
            &[r#"rules[0].name: "Beta Users" may contain only a-z, 0-9, '_' and '-'"#],
        ),
        // --- variants --------------------------------------------------------------------
        case(
            "duplicate variants",
            r#"{"name": "p", "variants": ["stable", "canary", "stable", "canary"]}"#,
            &[r#"variants[2]: duplicate variant "stable""#, r#"variants[3]: duplicate variant "canary""#],
        ),
        case(
            "empty variants",
            r#"{"name": "p", "variants": []}"#,
            &["variants: must list at least one variant"],
        ),
        case(
            "variants not a list",
            r#"{"name": "p", "variants": "stable"}"#,
            &["variants: expected a list of names, found a string"],
        ),
        // --- rules -----------------------------------------------------------------------
        case(
            "rules not a list",
            r#"{"name": "p", "variants": ["stable"], "rules": {"name": "r"}}"#,
            &["rules: expected a list of rules, found an object"],
        ),
        case(
            "rule not an object",
            with_rules(r#"["qa"]"#),
            &["rules[0]: expected an object, found a string"],
        ),
        case(
            "duplicate rule names",
            with_rules(
                r#"[{"name": "qa", "when": [{"header": "x-qa", "present": true}], "variant": "canary"},
                    {"name": "beta", "when": [{"cookie": "plan", "equals": "beta"}], "variant": "canary"},
                    {"name": "qa", "when": [{"query": "qa", "equals": "1"}], "variant": "canary"}]"#,
            ),
            &[r#"rules[2].name: duplicate rule name "qa""#],
        ),
        case(
            // Regression: the duplicate used to be hidden until rules[0] was fixed.
            "duplicate rule name when the first rule is broken elsewhere",
            with_rules(
                r#"[{"name": "qa", "when": [{"header": "x-qa", "present": true}], "variant": "beta"},
                    {"name": "qa", "when": [{"query": "qa", "equals": "1"}], "variant": "canary"}]"#,
            ),
            &[
                r#"rules[0].variant: "beta" is not one of the policy's variants (stable, canary)"#,
                r#"rules[1].name: duplicate rule name "qa""#,
            ],
        ),
        case(
            "rule with both variant and split",
            with_rules(
                r#"[{"name": "r", "when": [{"header": "x-qa", "present": true}], "variant": "canary",
                     "split": {"by": "random", "weights": [{"variant": "canary", "weight": 1}]}}]"#,
            ),
            &[r#"rules[0]: a rule has either "variant" or "split", not both"#],
        ),
        case(
            "rule with neither variant nor split",
            with_rules(r#"[{"name": "r", "when": [{"header": "x-qa", "present": true}]}]"#),
            &[r#"rules[0]: a rule needs "variant" (with "when") or "split""#],
        ),
        case(
            "variant rule without when",
            with_rules(r#"[{"name": "r", "variant": "canary"}]"#),
            &[r#"rules[0].when: a rule with "variant" needs at least one condition (the first variant is already the fallback)"#],
        ),
        case(
            "variant rule with an empty when",
            with_rules(r#"[{"name": "r", "when": [], "variant": "canary"}]"#),
            &[r#"rules[0].when: a rule with "variant" needs at least one condition (the first variant is already the fallback)"#],
        ),
        case(
            // The missing condition is the problem; later rules are not reported as
            // unreachable, since adding a condition fixes the rule.
            "variant rule without when, followed by another rule",
            with_rules(&format!(r#"[{{"name": "r", "variant": "canary"}}, {}]"#, GOOD_SPLIT)),
            &[r#"rules[0].when: a rule with "variant" needs at least one condition (the first variant is already the fallback)"#],
        ),
        case(
            "variant not in variants",
            with_condition(r#"{"header": "x-qa", "present": true}"#).replace(r#""variant": "canary""#, r#""variant": "beta""#),
            &[r#"rules[0].variant: "beta" is not one of the policy's variants (stable, canary)"#],
        ),
        case(
            "variant not a string",
            with_rules(r#"[{"name": "r", "when": [{"header": "x-qa", "present": true}], "variant": 1}]"#),
            &["rules[0].variant: expected a string, found a number"],
        ),
        case(
            "when not a list",
            with_rules(r#"[{"name": "r", "when": {"header": "x-qa", "present": true}, "variant": "canary"}]"#),
            &["rules[0].when: expected a list of conditions, found an object"],
        ),
        case(
            "unreachable rules after an unconditional split",
            with_rules(&format!(
                r#"[{},
                    {{"name": "qa", "when": [{{"header": "x-qa", "present": true}}], "variant": "canary"}},
                    {{"name": "late", "split": {{"by": "random", "weights": [{{"variant": "canary", "weight": 1}}]}}}}]"#,
                GOOD_SPLIT
            )),
            &[
                "rules[1]: unreachable: rules[0] applies to every request",
                "rules[2]: unreachable: rules[0] applies to every request",
            ],
        ),
        case(
            // Regression: fixing the weights would only have revealed the next problem.
            "unreachable rule after a broken unconditional split",
            with_rules(
                r#"[{"name": "all", "split": {"by": "random", "weights": [{"variant": "beta", "weight": 1}]}},
                    {"name": "qa", "when": [{"header": "x-qa", "present": true}], "variant": "canary"}]"#,
            ),
            &[
                r#"rules[0].split.weights[0].variant: "beta" is not one of the policy's variants (stable, canary)"#,
                "rules[1]: unreachable: rules[0] applies to every request",
            ],
        ),
        case(
            "a split with an empty when applies to every request too",
            with_rules(&format!(
                r#"[{{"name": "all", "when": [], "split": {{"by": "random", "weights": [{{"variant": "canary", "weight": 1}}]}}}},
                    {}]"#,
                GOOD_SPLIT
            )),
            &["rules[1]: unreachable: rules[0] applies to every request"],
        ),
        // --- conditions ------------------------------------------------------------------
        case(
            "condition without a subject",
            with_condition(r#"{"equals": "1"}"#),
            &["rules[0].when[0]: a condition needs exactly one of header, cookie, query (found 0)"],
        ),
        case(
            "condition with two subjects",
            with_condition(r#"{"header": "x-qa", "cookie": "qa", "equals": "1"}"#),
            &["rules[0].when[0]: a condition needs exactly one of header, cookie, query (found 2)"],
        ),
        case(
            "condition without a test",
            with_condition(r#"{"header": "x-qa"}"#),
            &["rules[0].when[0]: a condition needs exactly one of equals, prefix, in, present (found 0)"],
        ),
        case(
            "condition with two tests",
            with_condition(r#"{"header": "x-qa", "equals": "1", "prefix": "1"}"#),
            &["rules[0].when[0]: a condition needs exactly one of equals, prefix, in, present (found 2)"],
        ),
        case(
            "empty condition",
            with_condition("{}"),
            &[
                "rules[0].when[0]: a condition needs exactly one of header, cookie, query (found 0)",
                "rules[0].when[0]: a condition needs exactly one of equals, prefix, in, present (found 0)",
            ],
        ),
        case(
            "condition not an object",
            with_condition(r#""x-qa""#),
            &["rules[0].when[0]: expected an object, found a string"],
        ),
        case(
            "empty in",
            with_condition(r#"{"cookie": "plan", "in": []}"#),
            &["rules[0].when[0].in: must list at least one value"],
        ),
        case(
            "in with non-strings",
            with_condition(r#"{"cookie": "plan", "in": ["beta", 1, null, ["x"]]}"#),
            &[
                "rules[0].when[0].in[1]: expected a string, found a number",
                "rules[0].when[0].in[2]: expected a string, found null",
                "rules[0].when[0].in[3]: expected a string, found a list",
            ],
        ),
        case(
            "in not a list",
            with_condition(r#"{"cookie": "plan", "in": "beta"}"#),
            &["rules[0].when[0].in: expected a list of strings, found a string"],
        ),
        case(
            "present not a boolean",
            with_condition(r#"{"header": "x-qa", "present": "yes"}"#),
            &["rules[0].when[0].present: expected true or false, found a string"],
        ),
        case(
            "equals and prefix not strings",
            with_rules(
                r#"[{"name": "r", "when": [{"header": "x-a", "equals": 1}, {"header": "x-b", "prefix": true}],
                     "variant": "canary"}]"#,
            ),
            &[
                "rules[0].when[0].equals: expected a string, found a number",
                "rules[0].when[1].prefix: expected a string, found a boolean",
            ],
        ),
        case(
            "bad header names",
            with_rules(
                r#"[{"name": "r", "when": [{"header": "x canary", "present": true},
                                           {"header": "", "present": true},
                                           {"header": ":", "present": true},
                                           {"header": "x-ü", "present": true},
                                           {"header": "x:y", "present": true},
                                           {"header": 5, "present": true}],
                     "variant": "canary"}]"#,
            ),
            &[
                r#"rules[0].when[0].header: "x canary" is not a valid header name"#,
                r#"rules[0].when[1].header: "" is not a valid header name"#,
                r#"rules[0].when[2].header: ":" is not a valid header name"#,
                r#"rules[0].when[3].header: "x-ü" is not a valid header name"#,
                r#"rules[0].when[4].header: "x:y" is not a valid header name"#,
                "rules[0].when[5].header: expected a string, found a number",
            ],
        ),
        case(
            "bad cookie and query names",
            with_rules(
                r#"[{"name": "r", "when": [{"cookie": "a=b", "present": true},
                                           {"cookie": "", "present": true},
                                           {"query": "", "present": true}],
                     "variant": "canary"}]"#,
            ),
            &[
                r#"rules[0].when[0].cookie: "a=b" is not a valid cookie name"#,
                r#"rules[0].when[1].cookie: "" is not a valid cookie name"#,
                "rules[0].when[2].query: query parameter name must not be empty",
            ],
        ),
        case(
            "bad decision headers",
            r#"{"name": "p", "decision_header": "X Variant", "variants": ["stable"]}"#,
            &[r#"decision_header: "X Variant" is not a valid header name"#],
        ),
        case(
            "pseudo-header as decision header",
            r#"{"name": "p", "decision_header": ":authority", "variants": ["stable"]}"#,
            &["decision_header: must not be a pseudo-header"],
        ),
        // --- split.by, missing, hash, salt ------------------------------------------------
        case(
            "by is an unknown string",
            with_split(r#"{"by": "header", "weights": [{"variant": "canary", "weight": 1}]}"#),
            &[r#"rules[0].split.by: expected "random", {"header": NAME} or {"cookie": NAME}"#],
        ),
        case(
            "by is a number",
            with_split(r#"{"by": 5, "weights": [{"variant": "canary", "weight": 1}]}"#),
            &["rules[0].split.by: expected an object, found a number"],
        ),
        case(
            "by names both a header and a cookie",
            with_split(
                r#"{"by": {"header": "x-user-id", "cookie": "uid"}, "weights": [{"variant": "canary", "weight": 1}]}"#,
            ),
            &[r#"rules[0].split.by: expected exactly one of "header" or "cookie""#],
        ),
        case(
            "by names neither",
            with_split(r#"{"by": {}, "weights": [{"variant": "canary", "weight": 1}]}"#),
            &[r#"rules[0].split.by: expected exactly one of "header" or "cookie""#],
        ),
        case(
            "by with bad names",
            with_rules(
                r#"[{"name": "a", "when": [{"header": "x-a", "present": true}],
                     "split": {"by": {"header": "x user"}, "weights": [{"variant": "canary", "weight": 1}]}},
                    {"name": "b", "split": {"by": {"cookie": "u;id"}, "weights": [{"variant": "canary", "weight": 1}]}}]"#,
            ),
            &[
                r#"rules[0].split.by.header: "x user" is not a valid header name"#,
                r#"rules[1].split.by.cookie: "u;id" is not a valid cookie name"#,
            ],
        ),
        case(
            "bad missing",
            with_split(
                r#"{"by": {"header": "x-user-id"}, "missing": "stable", "weights": [{"variant": "canary", "weight": 1}]}"#,
            ),
            &[r#"rules[0].split.missing: expected "random" or "fallback""#],
        ),
        case(
            "missing not a string",
            with_split(
                r#"{"by": {"header": "x-user-id"}, "missing": null, "weights": [{"variant": "canary", "weight": 1}]}"#,
            ),
            &[r#"rules[0].split.missing: expected "random" or "fallback""#],
        ),
        case(
            "bad hash",
            with_split(r#"{"by": "random", "hash": "murmur3", "weights": [{"variant": "canary", "weight": 1}]}"#),
            &[r#"rules[0].split.hash: expected "fnv" or "flagd""#],
        ),
        case(
            "hash with the wrong case",
            with_split(r#"{"by": "random", "hash": "FNV", "weights": [{"variant": "canary", "weight": 1}]}"#),
            &[r#"rules[0].split.hash: expected "fnv" or "flagd""#],
        ),
        case(
            "salt not a string",
            with_split(r#"{"by": "random", "salt": 42, "weights": [{"variant": "canary", "weight": 1}]}"#),
            &["rules[0].split.salt: expected a string, found a number"],
        ),
        // --- weights -----------------------------------------------------------------------
        case(
            "negative weight",
            with_weights(r#"[{"variant": "canary", "weight": -10}, {"variant": "stable", "weight": 110}]"#),
            &["rules[0].split.weights[0].weight: expected a non-negative integer, found -10"],
        ),
        case(
            "float weights, even integral ones",
            with_weights(r#"[{"variant": "canary", "weight": 10.5}, {"variant": "stable", "weight": 90.0}]"#),
            &[
                "rules[0].split.weights[0].weight: expected a non-negative integer, found 10.5",
                "rules[0].split.weights[1].weight: expected a non-negative integer, found 90.0",
            ],
        ),
        case(
            "string and null weights",
            with_weights(r#"[{"variant": "canary", "weight": "10"}, {"variant": "stable", "weight": null}]"#),
            &[
                r#"rules[0].split.weights[0].weight: expected a non-negative integer, found "10""#,
                "rules[0].split.weights[1].weight: expected a non-negative integer, found null",
            ],
        ),
        case(
            // The issue's own example of an error message.
            "total weight 0 in the contract example",
            CONTRACT_EXAMPLE
                .replace(r#""weight": 10"#, r#""weight": 0"#)
                .replace(r#""weight": 90"#, r#""weight": 0"#),
            &["rules[2].split.weights: total weight must be greater than 0"],
        ),
        case(
            "total weight above 2^31-1",
            with_weights(r#"[{"variant": "canary", "weight": 2147483647}, {"variant": "stable", "weight": 1}]"#),
            &["rules[0].split.weights: total weight 2147483648 is above the maximum 2147483647"],
        ),
        case(
            "total weight above u64",
            with_weights(
                r#"[{"variant": "canary", "weight": 18446744073709551615}, {"variant": "stable", "weight": 18446744073709551615}]"#,
            ),
            &["rules[0].split.weights: total weight 36893488147419103230 is above the maximum 2147483647"],
        ),
        case(
            "weight above u64",
            with_weights(r#"[{"variant": "canary", "weight": 18446744073709551616}]"#),
            &["rules[0].split.weights[0].weight: expected a non-negative integer, found a number beyond ±10^15"],
        ),
        case(
            "duplicate variant in weights",
            with_weights(
                r#"[{"variant": "canary", "weight": 10}, {"variant": "stable", "weight": 80}, {"variant": "canary", "weight": 10}]"#,
            ),
            &[r#"rules[0].split.weights[2].variant: variant "canary" is listed twice"#],
        ),
        case(
            // Regression: the repetition used to be hidden by the bad first weight.
            "duplicate variant in weights after a bad weight",
            with_weights(r#"[{"variant": "canary", "weight": -1}, {"variant": "canary", "weight": 10}]"#),
            &[
                "rules[0].split.weights[0].weight: expected a non-negative integer, found -1",
                r#"rules[0].split.weights[1].variant: variant "canary" is listed twice"#,
            ],
        ),
        case(
            "problems of a split in the order its fields are documented",
            with_split(
                r#"{"by": {"header": "x-user-id"}, "weights": [], "missing": "never", "hash": "crc32"}"#,
            ),
            &[
                "rules[0].split.weights: must list at least one variant",
                r#"rules[0].split.missing: expected "random" or "fallback""#,
                r#"rules[0].split.hash: expected "fnv" or "flagd""#,
            ],
        ),
        case(
            "weights naming an unknown variant",
            with_weights(r#"[{"variant": "canary", "weight": 10}, {"variant": "beta", "weight": 90}]"#),
            &[r#"rules[0].split.weights[1].variant: "beta" is not one of the policy's variants (stable, canary)"#],
        ),
        case(
            "empty weights",
            with_weights("[]"),
            &["rules[0].split.weights: must list at least one variant"],
        ),
        case(
            "weights not a list",
            with_weights(r#"{"canary": 10, "stable": 90}"#),
            &["rules[0].split.weights: expected a list of {variant, weight}, found an object"],
        ),
        case(
            "weights item not an object",
            with_weights(r#"[["canary", 10]]"#),
            &["rules[0].split.weights[0]: expected an object, found a list"],
        ),
    ]
}

#[test]
fn bad_documents_are_refused_with_exactly_the_expected_problems() {
    let mut failures = Vec::new();
    for case in bad_documents() {
        let found = match Policy::from_json(case.doc.as_bytes()) {
            Ok(_) => vec!["<accepted>".to_string()],
            Err(errors) => {
                // Display is the same list, one problem per line.
                let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
                assert_eq!(errors.to_string(), lines.join("\n"), "{}", case.what);
                assert_eq!(errors.len(), lines.len());
                assert!(!errors.is_empty());
                lines
            }
        };
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
fn errors_carry_path_and_message_separately() {
    let errors = problems(
        &CONTRACT_EXAMPLE
            .replace(r#""weight": 10"#, r#""weight": 0"#)
            .replace(r#""weight": 90"#, r#""weight": 0"#),
    );
    let only = errors.iter().next().expect("one problem");
    assert_eq!(only.path, "rules[2].split.weights");
    assert_eq!(only.message, "total weight must be greater than 0");

    // A problem with the document itself has an empty path and prints only the message.
    let errors = problems("[]");
    let only = errors.iter().next().expect("one problem");
    assert_eq!(only.path, "");
    assert_eq!(only.to_string(), "expected an object, found a list");
}

#[test]
fn every_problem_of_a_document_is_reported_at_once_in_document_order() {
    // Each line of this document has at least one problem (noted at its end).
    let doc = r#"{
      "name": "Checkout",
      "decision_header": ":authority",
      "variants": ["stable", "canary"],
      "rules": [
        {"name": "qa", "when": [{"header": "x canary", "equals": "always"}], "variant": "canary"},
        {"name": "beta", "when": [{"cookie": "plan", "in": []}], "variant": "beta"},
        {"name": "mobile", "when": [{"header": "user-agent", "query": "m", "present": "yes"}], "variant": "canary"},
        {"name": "qa", "when": [{"query": "debug", "equals": "1"}], "variant": "canary"},
        {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": 7,
          "weights": [{"variant": "canary", "weight": -1}, {"variant": "stable", "weight": 2.5},
                      {"variant": "canary", "weight": 1}],
          "missing": "drop", "hash": "md5"}},
        {"name": "late", "when": [{"header": "x-late", "present": true}], "variant": "canary"},
        {"name": "Later", "split": {"by": "random", "weights": [{"variant": "stable", "weight": 0}]}}
      ]
    }"#;
    let expected = [
        r#"name: "Checkout" may contain only a-z, 0-9, '_' and '-'"#,
        "decision_header: must not be a pseudo-header",
        r#"rules[0].when[0].header: "x canary" is not a valid header name"#,
        "rules[1].when[0].in: must list at least one value",
        r#"rules[1].variant: "beta" is not one of the policy's variants (stable, canary)"#,
        "rules[2].when[0]: a condition needs exactly one of header, cookie, query (found 2)",
        "rules[2].when[0].present: expected true or false, found a string",
        // rules[0] is broken elsewhere, but its name is fine and still taken.
        r#"rules[3].name: duplicate rule name "qa""#,
        "rules[4].split.salt: expected a string, found a number",
        "rules[4].split.weights[0].weight: expected a non-negative integer, found -1",
        "rules[4].split.weights[1].weight: expected a non-negative integer, found 2.5",
        r#"rules[4].split.weights[2].variant: variant "canary" is listed twice"#,
        r#"rules[4].split.missing: expected "random" or "fallback""#,
        r#"rules[4].split.hash: expected "fnv" or "flagd""#,
        // rules[4] is broken, but once fixed it would still take every request.
        "rules[5]: unreachable: rules[4] applies to every request",
        "rules[6]: unreachable: rules[4] applies to every request",
        r#"rules[6].name: "Later" may contain only a-z, 0-9, '_' and '-'"#,
        "rules[6].split.weights: total weight must be greater than 0",
    ];
    assert_eq!(error_lines(doc), expected);
}

#[test]
fn unknown_fields_are_reported_first_within_their_object() {
    // serde_json's map keeps keys sorted, not in the order of the text, so within one
    // object the unknown fields (alphabetically) come before the known fields' problems.
    let doc = r#"{"name": "Checkout", "variants": [], "zeta": 1, "alpha": 2}"#;
    assert_eq!(
        error_lines(doc),
        [
            "alpha: unknown field; expected one of: name, decision_header, variants, rules, mirror",
            "zeta: unknown field; expected one of: name, decision_header, variants, rules, mirror",
            r#"name: "Checkout" may contain only a-z, 0-9, '_' and '-'"#,
            "variants: must list at least one variant",
        ]
    );
}

#[test]
fn rules_are_still_checked_when_the_variants_are_invalid() {
    // Variant references cannot be resolved, but the shape of the rules is checked.
    let doc = r#"{"name": "p", "variants": ["stable", "stable"], "rules": [
        {"name": "a", "when": [{"header": "x a", "present": true}], "variant": "anything"},
        {"name": "b", "split": {"by": "random", "weights": [{"variant": "anything", "weight": -1}]}}
    ]}"#;
    assert_eq!(
        error_lines(doc),
        [
            r#"variants[1]: duplicate variant "stable""#,
            r#"rules[0].when[0].header: "x a" is not a valid header name"#,
            "rules[1].split.weights[0].weight: expected a non-negative integer, found -1",
        ]
    );
}
