//! The controller's spec reader (`RolloutSpec::parse`) on arbitrary YAML text, in a
//! folder holding the base policies a spec may name (`policy.json`, the Istio sample's;
//! `decision.json`; `broken.json`, not JSON). No panic; the same text gives the same
//! answer twice (the revision included); a refusal names a problem; an accepted spec is
//! consistent: its policy document validates to its policy, the split rule is a split
//! holding the canary and a baseline, the verdict's own checks find nothing, the
//! revision is 16 hex digits and the interval at least 100 ms.
//!
//! Inputs whose `policy` is not a plain file name are skipped: the reader reads that
//! path, and the fuzzer must not read the machine's files (`/dev/zero` never ends).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshcanary_controller::spec::RolloutSpec;
use meshcanary_policy::{Action, Policy};
use serde_json::Value;

fn spec_file() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("meshcanary-fuzz-spec-{}", std::process::id()));
        let write = |name: &str, text: &str| {
            std::fs::create_dir_all(&dir).expect("temp dir");
            std::fs::write(dir.join(name), text).expect("fixture");
        };
        write("policy.json", meshcanary_fuzz::FIXED_POLICIES[0]);
        write("decision.json", meshcanary_fuzz::FIXED_POLICIES[1]);
        write("broken.json", "{\"name\": ");
        dir.join("rollout.yaml")
    })
}

/// True when the spec names its policy by a plain file name (or not at all).
fn policy_path_is_local(text: &str) -> bool {
    let value: Value = match serde_saphyr::from_str(text) {
        Ok(v) => v,
        Err(_) => return true,
    };
    match value.get("policy").and_then(Value::as_str) {
        Some(p) => !p.is_empty() && !p.contains('/') && !p.contains('\\') && !p.starts_with(".."),
        None => true,
    }
}

fn outcome(result: &Result<RolloutSpec, meshcanary_policy::ConfigErrors>) -> String {
    match result {
        Ok(spec) => format!("ok {} {:?} {:?}", spec.revision, spec.judge, spec.interval),
        Err(errors) => format!("err {}", errors),
    }
}

fuzz_target!(|data: &[u8]| {
    let text = match std::str::from_utf8(data) {
        Ok(t) => t,
        Err(_) => return,
    };
    if !policy_path_is_local(text) {
        return;
    }
    let file = spec_file();
    let first = RolloutSpec::parse(text, file);
    let second = RolloutSpec::parse(text, file);
    assert_eq!(
        outcome(&first),
        outcome(&second),
        "the reader is not deterministic"
    );
    let spec = match first {
        Ok(spec) => spec,
        Err(errors) => {
            assert!(!errors.is_empty(), "refused without naming a problem");
            return;
        }
    };
    match Policy::from_value(&spec.policy_document) {
        Ok(p) => assert_eq!(p, spec.policy, "the document is not the policy"),
        Err(e) => panic!("accepted spec with an invalid policy document: {}", e),
    }
    meshcanary_fuzz::check_policy_invariants(&spec.policy);
    let rule = spec
        .policy
        .rule_index(&spec.split_rule)
        .map(|i| &spec.policy.rules[i]);
    match rule.map(|r| &r.action) {
        Some(Action::Split(split)) => assert!(split
            .variants
            .iter()
            .any(|v| spec.policy.variants[*v] == spec.canary)),
        other => panic!("split_rule is not a split: {:?}", other),
    }
    let baseline = spec.baseline();
    assert!(!baseline.is_empty(), "no baseline");
    assert!(
        !baseline.contains(&spec.canary),
        "the canary in its own baseline"
    );
    assert!(
        spec.judge.problems().is_empty(),
        "accepted with problems: {:?}",
        spec.judge.problems()
    );
    assert_eq!(spec.revision.len(), 16);
    assert!(spec.revision.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(spec.interval >= Duration::from_millis(100));
});
