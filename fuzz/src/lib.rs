//! What the fuzz targets share: the fixed policies the per-request targets run against,
//! and the properties a validated policy must have, checked the same way by every target
//! that produces one.
//!
//! Every check panics (libFuzzer reports a crash with the input) when a property fails;
//! a property is only asserted where the code promises it, never "it happens to be so".

use std::cell::Cell;

use meshcanary_policy::decide::RequestInputs;
use meshcanary_policy::envoy::wasm_filter_config;
use meshcanary_policy::{
    Action, Marker, MirrorChoice, Policy, SkipReason, Split, SplitKey, Subject,
};
use serde_json::Value;

/// The fixed policies of the per-request target, from the repository: the Istio sample's
/// policy, and two written for the fuzzer so that every kind of condition, split key,
/// hash, `missing` behaviour and a mirror with sticky sampling appear.
pub const FIXED_POLICIES: [&str; 3] = [
    include_str!("../../manifests/istio/controller/policy.json"),
    include_str!("../fixtures/decision.json"),
    include_str!("../fixtures/mirror.json"),
];

/// The fixed policies, validated (a fixture that does not validate is a bug in the
/// fixture: it panics at once, on the first input).
pub fn fixed_policies() -> Vec<Policy> {
    FIXED_POLICIES
        .iter()
        .map(|doc| match Policy::from_json(doc.as_bytes()) {
            Ok(p) => p,
            Err(e) => panic!("fixture policy does not validate: {}", e),
        })
        .collect()
}

/// Checks everything `Policy::from_json` promises for these bytes, and returns the
/// policy when they validated.
///
/// * no panic, and the same bytes give the same answer twice;
/// * a refusal names at least one problem, each with a message;
/// * a valid policy is internally consistent (see [`check_policy_invariants`]);
/// * a valid document re-serialized (compact, pretty, and inside the ECDS/Wasm message
///   the controller writes, as the string the filter reads) validates again to the
///   same policy.
pub fn check_policy_bytes(bytes: &[u8]) -> Option<Policy> {
    let first = Policy::from_json(bytes);
    let second = Policy::from_json(bytes);
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "validation is not deterministic"),
        (Err(a), Err(b)) => {
            assert_eq!(a.to_string(), b.to_string(), "errors are not deterministic")
        }
        _ => panic!(
            "validation is not deterministic: {:?} vs {:?}",
            first, second
        ),
    }
    match first {
        Err(errors) => {
            assert!(!errors.is_empty(), "refused without naming a problem");
            for e in errors.iter() {
                assert!(
                    !e.message.is_empty(),
                    "error without a message at {:?}",
                    e.path
                );
            }
            None
        }
        Ok(policy) => {
            check_policy_invariants(&policy);
            let value: Value = match serde_json::from_slice(bytes) {
                Ok(v) => v,
                Err(e) => panic!("validated, but is not JSON: {}", e),
            };
            check_reserialized(&value, &policy);
            Some(policy)
        }
    }
}

/// A valid document, written out again in every form the project writes policies,
/// validates to the same policy.
pub fn check_reserialized(value: &Value, policy: &Policy) {
    let compact = value.to_string();
    let pretty = match serde_json::to_string_pretty(value) {
        Ok(s) => s,
        Err(e) => panic!("cannot re-serialize: {}", e),
    };
    // The controller's sinks embed the policy as a string in the Wasm filter config.
    let config = wasm_filter_config(
        "meshcanary",
        std::path::Path::new("/m.wasm"),
        value,
        meshcanary_policy::envoy::FailurePolicy::default(),
    );
    let embedded = config["config"]["configuration"]["value"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for (form, text) in [("compact", compact), ("pretty", pretty), ("ecds", embedded)] {
        match Policy::from_json(text.as_bytes()) {
            Ok(again) => assert_eq!(&again, policy, "{} re-serialization changed it", form),
            Err(e) => panic!("{} re-serialization no longer validates: {}", form, e),
        }
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= meshcanary_policy::policy::MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// What the rest of the filter relies on without checking again at request time.
pub fn check_policy_invariants(p: &Policy) {
    assert!(is_name(&p.name), "bad policy name {:?}", p.name);
    assert!(!p.variants.is_empty(), "no variants");
    for (i, v) in p.variants.iter().enumerate() {
        assert!(is_name(v), "bad variant name {:?}", v);
        assert!(!p.variants[..i].contains(v), "duplicate variant {:?}", v);
    }
    assert_eq!(
        p.decision_header,
        p.decision_header.to_ascii_lowercase(),
        "decision header not lower-case"
    );
    for (i, input) in p.inputs.iter().enumerate() {
        assert_eq!(input, &input.to_ascii_lowercase(), "input not lower-case");
        assert!(
            !p.inputs[..i].contains(input),
            "duplicate input {:?}",
            input
        );
    }
    for (i, rule) in p.rules.iter().enumerate() {
        assert!(is_name(&rule.name), "bad rule name {:?}", rule.name);
        assert!(
            p.rules[..i].iter().all(|r| r.name != rule.name),
            "duplicate rule {:?}",
            rule.name
        );
        for c in &rule.when {
            check_subject(p, &c.subject);
        }
        match &rule.action {
            Action::Variant(v) => assert!(*v < p.variants.len(), "variant index out of range"),
            Action::Split(split) => check_split(p, split),
        }
    }
    if let Some(m) = &p.mirror {
        assert_eq!(
            p.inputs.get(m.method_input).map(String::as_str),
            Some(":method")
        );
        assert_eq!(p.inputs.get(m.marker_input), Some(&m.marker_header));
        assert!(m.percent_ppm <= 1_000_000, "percent above 100");
        for c in &m.when {
            check_subject(p, &c.subject);
        }
        if let Some(key) = &m.sample_key {
            check_split_key(p, key);
        }
        for name in meshcanary_policy::mirror::ALWAYS_STRIPPED {
            assert!(
                !m.copies_header(name),
                "credential {} would be copied",
                name
            );
        }
        assert!(!m.copies_header(&m.marker_header), "marker would be copied");
    }
}

fn check_subject(p: &Policy, subject: &Subject) {
    let (input, expected) = match subject {
        Subject::Header(i) => (*i, None),
        Subject::Cookie { input, .. } => (*input, Some("cookie")),
        Subject::Query { input, .. } => (*input, Some(":path")),
    };
    let name = p.inputs.get(input).map(String::as_str);
    assert!(name.is_some(), "condition input out of range");
    if let Some(expected) = expected {
        assert_eq!(name, Some(expected));
    }
}

fn check_split_key(p: &Policy, key: &SplitKey) {
    match key {
        SplitKey::Header(i) => assert!(*i < p.inputs.len(), "split input out of range"),
        SplitKey::Cookie { input, .. } => {
            assert_eq!(p.inputs.get(*input).map(String::as_str), Some("cookie"))
        }
        SplitKey::Random => {}
    }
}

fn check_split(p: &Policy, split: &Split) {
    check_split_key(p, &split.by);
    assert_eq!(split.variants.len(), split.weights.as_slice().len());
    assert!(split.weights.total() > 0, "a split without weight");
    for v in &split.variants {
        assert!(*v < p.variants.len(), "split variant out of range");
    }
}

/// A random source that counts how often it was asked.
pub struct CountingRandom {
    value: u64,
    calls: Cell<u32>,
}

impl CountingRandom {
    /// A source that always answers `value`.
    pub fn new(value: u64) -> CountingRandom {
        CountingRandom {
            value,
            calls: Cell::new(0),
        }
    }

    /// One draw.
    pub fn draw(&self) -> u64 {
        self.calls.set(self.calls.get() + 1);
        self.value
    }

    /// Draws so far.
    pub fn calls(&self) -> u32 {
        self.calls.get()
    }
}

/// Checks the decision and the mirror choice for one request against one policy:
/// determinism, bounds, rule order, and what each placement promises.
pub fn check_request<R: RequestInputs + ?Sized>(p: &Policy, request: &R, random: u64) {
    let draws = CountingRandom::new(random);
    let decision = p.decide(request, || draws.draw());
    let again_draws = CountingRandom::new(random);
    assert_eq!(
        decision,
        p.decide(request, || again_draws.draw()),
        "decision is not deterministic"
    );
    assert!(draws.calls() <= 1, "random drawn more than once");
    assert!(decision.variant < p.variants.len());
    let matching = p
        .rules
        .iter()
        .position(|r| r.when.iter().all(|c| c.matches(request)));
    assert_eq!(decision.rule, matching, "not the first matching rule");
    match decision.rule.map(|i| &p.rules[i].action) {
        None => {
            assert_eq!(decision.variant, 0, "no rule, yet not the fallback");
            assert_eq!(decision.placement, None);
            assert_eq!(draws.calls(), 0, "drew without a split");
        }
        Some(Action::Variant(v)) => {
            assert_eq!(decision.variant, *v);
            assert_eq!(decision.placement, None);
            assert_eq!(draws.calls(), 0, "drew without a split");
        }
        Some(Action::Split(split)) => check_placement(split, request, decision, &draws),
    }
    if let Some(m) = &p.mirror {
        // The proxy's copy token: only this exact marker value makes a request a copy.
        const COPY_TOKEN: &[u8] = b"0123456789abcdef0123456789abcdef";
        let marker = m.marker(request, COPY_TOKEN);
        assert_eq!(
            marker == Marker::Genuine,
            request.input(m.marker_input) == Some(COPY_TOKEN),
            "a copy is exactly a request carrying the token"
        );
        assert_eq!(
            marker == Marker::Absent,
            request.input(m.marker_input).is_none()
        );
        let draws = CountingRandom::new(random);
        let choice = m.choose(request, marker, || draws.draw());
        let again = CountingRandom::new(random);
        assert_eq!(
            choice,
            m.choose(request, marker, || again.draw()),
            "mirror not deterministic"
        );
        assert!(draws.calls() <= 1, "mirror drew more than once");
        assert_eq!(
            choice == MirrorChoice::Skip(SkipReason::Marked),
            marker == Marker::Genuine,
            "a copy copied, or a forged marker hid a live request"
        );
        if choice == MirrorChoice::Send {
            assert!(m.when.iter().all(|c| c.matches(request)));
            let method = request.input(m.method_input).unwrap_or_default();
            assert!(m.methods.iter().any(|x| x.as_bytes() == method));
        }
        // The copy's authority: the suffix goes in once, and nothing else changes.
        if let Some(Ok(authority)) = p
            .inputs
            .iter()
            .position(|n| n == ":authority")
            .and_then(|i| request.input(i))
            .map(std::str::from_utf8)
        {
            let shadow = m.shadow_authority(authority);
            match &m.authority_suffix {
                None => assert_eq!(shadow, authority),
                Some(suffix) => {
                    // Inserted once, at the end of the host: the end, or before a port.
                    let inserted_at_host_end = (0..=authority.len()).any(|i| {
                        (i == authority.len() || authority.as_bytes()[i] == b':')
                            && shadow == format!("{}{}{}", &authority[..i], suffix, &authority[i..])
                    });
                    assert!(
                        inserted_at_host_end,
                        "suffix not inserted at the end of the host: {:?} -> {:?}",
                        authority, shadow
                    );
                }
            }
        }
    }
}

fn check_placement<R: RequestInputs + ?Sized>(
    split: &Split,
    request: &R,
    decision: meshcanary_policy::Decision,
    draws: &CountingRandom,
) {
    use meshcanary_policy::Placement;
    let weight_of = |variant: usize| {
        split
            .variants
            .iter()
            .zip(split.weights.as_slice())
            .filter(|(v, _)| **v == variant)
            .map(|(_, w)| *w)
            .sum::<u64>()
    };
    let key = split.key(request);
    match decision.placement {
        Some(Placement::Sticky) => {
            let key = match key {
                Some(k) => k,
                None => panic!("sticky without a key"),
            };
            assert_eq!(draws.calls(), 0, "a sticky placement drew");
            assert_eq!(decision.variant, split.variant_for_key(key));
            assert!(
                weight_of(decision.variant) > 0,
                "placed in a zero-weight variant"
            );
        }
        Some(Placement::KeyMissingFallback) => {
            assert!(key.is_none());
            assert_eq!(decision.variant, 0);
            assert_eq!(draws.calls(), 0);
        }
        Some(Placement::Random) | Some(Placement::KeyMissingRandom) => {
            assert!(key.is_none());
            assert_eq!(draws.calls(), 1, "a random placement without a draw");
            assert!(
                weight_of(decision.variant) > 0,
                "placed in a zero-weight variant"
            );
        }
        None => panic!("a split decided without a placement"),
    }
}
