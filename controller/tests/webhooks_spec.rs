//! The spec's `webhooks` and `notify` sections: read with their defaults, and every
//! problem reported at once with its path.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use meshcanary_controller::spec::webhooks::{NotifyFormat, Severity, WebhookKind};
use meshcanary_controller::spec::RolloutSpec;

const POLICY: &str = r#"{"name": "checkout", "variants": ["stable", "canary"], "rules": [
  {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "s",
   "weights": [{"variant": "canary", "weight": 0}, {"variant": "stable", "weight": 100}]}}]}"#;

const BASE: &str = "policy: policy.json\nsplit_rule: rollout\ncanary: canary\nsteps: [10, 100]\n\
sink: {ecds_file: {path: out.ecds.json, wasm: f.wasm}}\n";

/// `BASE` plus `extra`, parsed as `spec.yaml` in a folder with the policy.
fn parse(extra: &str) -> Result<RolloutSpec, Vec<String>> {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("policy.json"), POLICY).expect("policy");
    let file: PathBuf = dir.path().join("spec.yaml");
    RolloutSpec::parse(&format!("{BASE}{extra}"), &file)
        .map_err(|e| e.iter().map(ToString::to_string).collect())
}

#[test]
fn the_issue_example_is_read_with_its_defaults() {
    let spec = parse(
        r##"
webhooks:
  - name: smoke
    type: pre-rollout
    url: http://smoke-tests.default/run
    timeout: 30s
    metadata: {suite: checkout}
  - {name: approve, type: confirm-promotion, url: http://gate/approve}
  - {name: warm, type: rollout, url: http://loadtester/run, max_failures: 3, retries: 0}
  - {name: page, type: rollback, url: http://hooks/rollback}
  - {name: done, type: post-rollout, url: http://hooks/done}
  - {name: all, type: event, url: http://hooks/events}
notify:
  severity: warning
  targets:
    - {name: chat, type: slack, url: "http://chat/services/T0/B0/x", channel: "#releases", username: canary-bot}
    - {name: audit, type: json, url: http://audit/meshcanary, severity: info, timeout: 2s}
"##,
    )
    .unwrap_or_else(|e| panic!("{}", e.join("\n")));
    let kinds: Vec<WebhookKind> = spec.webhooks.iter().map(|h| h.kind).collect();
    assert_eq!(
        kinds,
        [
            WebhookKind::PreRollout,
            WebhookKind::ConfirmPromotion,
            WebhookKind::Rollout,
            WebhookKind::Rollback,
            WebhookKind::PostRollout,
            WebhookKind::Event
        ]
    );
    let smoke = &spec.webhooks[0];
    assert_eq!(smoke.timeout, Duration::from_secs(30));
    assert_eq!((smoke.retries, smoke.max_failures), (2, 10), "the defaults");
    assert_eq!(
        smoke.metadata,
        BTreeMap::from([("suite".to_string(), "checkout".to_string())])
    );
    assert_eq!(spec.webhooks[1].timeout, Duration::from_secs(10));
    assert_eq!(
        (spec.webhooks[2].retries, spec.webhooks[2].max_failures),
        (0, 3)
    );
    let chat = &spec.notify[0];
    assert_eq!(chat.format, NotifyFormat::Slack);
    assert_eq!(chat.severity, Severity::Warning, "notify.severity applies");
    assert_eq!(chat.channel.as_deref(), Some("#releases"));
    assert_eq!(chat.username.as_deref(), Some("canary-bot"));
    assert_eq!(chat.timeout, Duration::from_secs(5));
    let audit = &spec.notify[1];
    assert_eq!(audit.format, NotifyFormat::Json);
    assert_eq!(audit.severity, Severity::Info, "its own severity wins");
    assert_eq!(audit.timeout, Duration::from_secs(2));
    // Without the sections: nothing to call.
    let plain = parse("").expect("valid");
    assert!(plain.webhooks.is_empty() && plain.notify.is_empty());
}

#[test]
fn every_webhook_and_notify_problem_is_reported_with_its_path() {
    let errors = parse(
        r##"
webhooks:
  - {name: smoke, type: pre-rollout, url: http://smoke/run, timeout: 2m}
  - {name: smoke, type: rollout, url: http://warm/run, retries: 9}
  - {name: gate, type: confirm-promoted, url: http://gate/approve}
  - {name: page, type: rollback, url: "https://hooks.example/rollback", max_failures: 3}
  - {name: "bad name", type: event, url: "smoke/run", timeout: soon}
  - {name: warm, type: rollout, url: http://warm/run, max_failures: 0, colour: red}
  - {type: post-rollout, url: http://x/done, timeout: 10ms}
notify:
  severity: loud
  targets:
    - {name: chat, type: teams, url: http://chat/x}
    - {name: audit, type: json, url: http://audit/x, channel: "#x", severity: debug}
    - {name: audit, type: slack}
"##,
    )
    .expect_err("invalid");
    for expected in [
        "webhooks[0].timeout: must be between 100ms and 60s",
        "webhooks[1].name: \"smoke\" is used twice",
        "webhooks[1].retries: 9: at most 5",
        "webhooks[2].type: expected one of \"pre-rollout\"",
        "webhooks[3].url: \"https://hooks.example/rollback\": https is not supported",
        "webhooks[3].max_failures: 3: only pre-rollout and rollout hooks count failures",
        "webhooks[4].name: \"bad name\": expected 1 to 63 letters",
        "webhooks[4].url: expected an http:// URL, found \"smoke/run\"",
        "webhooks[4].timeout: \"soon\" is not a duration",
        "webhooks[5].max_failures: must be at least 1",
        "webhooks[5].colour: unknown field",
        "webhooks[6].name: required field is missing",
        "webhooks[6].timeout: must be between 100ms and 60s",
        "notify.severity: expected one of \"info\", \"warning\", \"error\"",
        "notify.targets[0].type: expected \"json\" or \"slack\"",
        "notify.targets[1].channel: only with type: slack",
        "notify.targets[1].severity: expected one of \"info\", \"warning\", \"error\"",
        "notify.targets[2].name: \"audit\" is used twice",
        "notify.targets[2].url: required field is missing",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "missing {expected:?} in:\n{}",
            errors.join("\n")
        );
    }
    let empty = parse("notify: {targets: []}\n").expect_err("no target");
    assert!(
        empty
            .iter()
            .any(|e| e.starts_with("notify.targets: expected at least one target")),
        "{empty:?}"
    );
}
