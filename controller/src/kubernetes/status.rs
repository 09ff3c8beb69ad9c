//! The `status` of a `Rollout`: what `kubectl get rollouts`, `kubectl describe` and
//! `kubectl wait --for=condition=Promoted` read, and the record a restarted controller
//! resumes from (the verdict engine's whole state, evidence included).
//!
//! Everything here is a pure function of (previous status, spec, record, time): the
//! sink writes the result through the `status` subresource.
//!
//! Conditions follow the Kubernetes API conventions: `type`, `status` (`True`, `False`,
//! `Unknown`), a CamelCase `reason`, a `message` with the numbers, and a
//! `lastTransitionTime` that changes only when `status` changes.

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::sink::Record;
use crate::verdict::{Phase, RollbackReason};

/// `Progressing`: True while the canary is being judged.
pub const PROGRESSING: &str = "Progressing";
/// `Promoted`: True once the canary takes 100 %.
pub const PROMOTED: &str = "Promoted";
/// `RolledBack`: True once the canary is back at 0 % (rolled back or aborted).
pub const ROLLED_BACK: &str = "RolledBack";
/// `Paused`: True while an operator's pause stands (`meshcanary pause`, or the
/// `meshcanary.io/pause` annotation); present once a rollout was ever paused.
pub const PAUSED: &str = "Paused";

/// The status of a Rollout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// `Progressing`, `Paused` (progressing, held by an operator's pause), `Promoted`,
    /// `RolledBack`, `Aborted`, or `Invalid` (the spec has problems; see `problems`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The step being judged, counting from 1 (once promoted, the last step; once rolled
    /// back or aborted, the step it was at).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// `step/steps`, e.g. `2/4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_text: Option<String>,
    /// The canary's weight, in percent, of the policy last applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_weight: Option<u32>,
    /// The `metadata.generation` of the spec this status is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Content hash of the spec and its policy: the release being driven.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The last verdict, with its numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verdict: Option<LastVerdict>,
    /// `Progressing`, `Promoted` and `RolledBack`; `Paused` once the rollout was ever
    /// paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The spec's problems, each with its field path: with phase `Invalid` nothing is
    /// driven; with another phase, an earlier valid revision is still being driven.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// The controller's record of the rollout (its identity, the policy version written
    /// and the verdict engine's state with its evidence), from which a restarted
    /// controller resumes the analysis where it was. Written by the controller only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opaque_object")]
    pub record: Option<Record>,
}

/// The last verdict with its numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastVerdict {
    /// The verdict's reason, in words.
    pub reason: String,
    /// Canary requests, errors and slow requests in the current step.
    #[schemars(schema_with = "opaque_object")]
    pub canary: Value,
    /// Baseline requests, errors and slow requests in the current step.
    #[schemars(schema_with = "opaque_object")]
    pub baseline: Value,
    /// The error test's log-likelihood ratio Λ, over the rollout (`llr`) and this step
    /// (`stepLlr`), as a decimal string.
    pub error_evidence: String,
    /// The slow-request test's Λ, likewise.
    pub slow_evidence: String,
    /// When it was reached (RFC 3339).
    pub time: String,
}

/// A condition, as the Kubernetes API conventions describe it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Progressing`, `Promoted` or `RolledBack`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Why, in one CamelCase word.
    pub reason: String,
    /// Why, in words, with the numbers.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The `metadata.generation` the condition is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Any JSON object, kept as written (the controller's own data).
fn opaque_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// The phase as a CamelCase word.
pub fn phase_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::Progressing => "Progressing",
        Phase::Promoted => "Promoted",
        Phase::RolledBack { .. } => "RolledBack",
        Phase::Aborted => "Aborted",
    }
}

/// A rollback's reason as a CamelCase word.
pub fn rollback_reason(reason: &RollbackReason) -> &'static str {
    match reason {
        RollbackReason::HardGuard => "ErrorRateAboveCeiling",
        RollbackReason::ErrorRegression => "ErrorRateRegressed",
        RollbackReason::SlowRegression => "LatencyRegressed",
        RollbackReason::NoData { .. } => "NoData",
        RollbackReason::Aborted => "Aborted",
        RollbackReason::Webhook => "WebhookFailed",
    }
}

/// `conditions` with `next` set: its `lastTransitionTime` is `now` only when its status
/// changed (or it is new); otherwise the previous time is kept.
pub fn set_condition(conditions: &mut Vec<Condition>, mut next: Condition, now: &str) {
    match conditions.iter_mut().find(|c| c.type_ == next.type_) {
        Some(current) => {
            next.last_transition_time = if current.status == next.status {
                current.last_transition_time.clone()
            } else {
                now.to_string()
            };
            *current = next;
        }
        None => {
            next.last_transition_time = now.to_string();
            conditions.push(next);
        }
    }
}

fn condition(type_: &str, on: bool, reason: &str, message: &str, generation: i64) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if on { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: String::new(),
        observed_generation: Some(generation),
    }
}

/// The status for `record`, the rollout of spec generation `generation` with `steps`,
/// at `now` (RFC 3339), from the `previous` status (whose condition times carry over).
pub fn from_record(
    previous: &RolloutStatus,
    steps: &[u32],
    record: &Record,
    generation: i64,
    now: &str,
) -> RolloutStatus {
    let state = &record.state;
    let weight = state.current_weight(steps);
    // Promoted: the last step (100 %) is where it stands, though the last one judged was
    // the one before.
    let step_number = match state.phase {
        Phase::Promoted => steps.len(),
        _ => state.step + 1,
    };
    let step = u32::try_from(step_number).unwrap_or(u32::MAX);
    let canary = json!({
        "requests": state.canary.requests,
        "errors": state.canary.errors,
        "slow": state.canary.slow,
    });
    let baseline = json!({
        "requests": state.baseline.requests,
        "errors": state.baseline.errors,
        "slow": state.baseline.slow,
    });
    let numbers = format!(
        "canary {} requests, {} errors, {} slow; baseline {} requests, {} errors, {} slow; error Λ {:.2}, slow Λ {:.2}",
        state.canary.requests,
        state.canary.errors,
        state.canary.slow,
        state.baseline.requests,
        state.baseline.errors,
        state.baseline.slow,
        state.errors.llr,
        state.slow.llr
    );
    let mut status = RolloutStatus {
        phase: Some(phase_name(&state.phase).to_string()),
        step: Some(step),
        step_text: Some(format!("{}/{}", step, steps.len())),
        canary_weight: Some(record.applied_weight),
        observed_generation: Some(generation),
        revision: Some(record.rollout.revision.clone()),
        last_verdict: Some(LastVerdict {
            reason: state.reason.clone(),
            canary,
            baseline,
            error_evidence: format!(
                "llr {:.4}, stepLlr {:.4}",
                state.errors.llr, state.errors.step_llr
            ),
            slow_evidence: format!(
                "llr {:.4}, stepLlr {:.4}",
                state.slow.llr, state.slow.step_llr
            ),
            time: previous
                .last_verdict
                .as_ref()
                .filter(|v| v.reason == state.reason)
                .map(|v| v.time.clone())
                .unwrap_or_else(|| now.to_string()),
        }),
        conditions: previous.conditions.clone(),
        problems: Vec::new(),
        record: Some(record.clone()),
    };
    let (progressing, promoted, rolled_back) = match &state.phase {
        Phase::Progressing => (
            condition(
                PROGRESSING,
                true,
                "Analyzing",
                &format!(
                    "step {} of {}: canary at {} % (target {} %); {}; {}",
                    step,
                    steps.len(),
                    record.applied_weight,
                    weight,
                    state.reason,
                    numbers
                ),
                generation,
            ),
            condition(PROMOTED, false, "Analyzing", "not promoted yet", generation),
            condition(
                ROLLED_BACK,
                false,
                "Analyzing",
                "not rolled back",
                generation,
            ),
        ),
        Phase::Promoted => {
            let message = format!(
                "promoted after {} steps: canary at {} %; {}; {}",
                steps.len(),
                record.applied_weight,
                state.reason,
                numbers
            );
            (
                condition(PROGRESSING, false, "Promoted", &message, generation),
                condition(PROMOTED, true, "AllStepsPassed", &message, generation),
                condition(ROLLED_BACK, false, "Promoted", "promoted", generation),
            )
        }
        Phase::RolledBack { reason } => {
            let message = format!(
                "rolled back at step {} of {} ({}): canary at {} %; {}",
                step,
                steps.len(),
                reason,
                record.applied_weight,
                numbers
            );
            (
                condition(PROGRESSING, false, "RolledBack", &message, generation),
                condition(PROMOTED, false, "RolledBack", &message, generation),
                condition(
                    ROLLED_BACK,
                    true,
                    rollback_reason(reason),
                    &message,
                    generation,
                ),
            )
        }
        Phase::Aborted => {
            let message = format!(
                "aborted by an operator at step {} of {}: canary at {} %",
                step,
                steps.len(),
                record.applied_weight
            );
            (
                condition(PROGRESSING, false, "Aborted", &message, generation),
                condition(PROMOTED, false, "Aborted", &message, generation),
                condition(ROLLED_BACK, true, "Aborted", &message, generation),
            )
        }
    };
    for c in [progressing, promoted, rolled_back] {
        set_condition(&mut status.conditions, c, now);
    }
    let was_paused = status.conditions.iter().any(|c| c.type_ == PAUSED);
    match (&record.control.paused, &state.phase) {
        (Some(paused), Phase::Progressing) => {
            status.phase = Some(PAUSED.to_string());
            let message = format!(
                "paused by an operator ({:?}) since {}: the canary holds {} %; verdicts are reported, not applied",
                paused.request,
                rfc3339_of_unix_ms(paused.since_unix_ms),
                record.applied_weight
            );
            set_condition(
                &mut status.conditions,
                condition(PAUSED, true, "PausedByOperator", &message, generation),
                now,
            );
        }
        _ if was_paused => set_condition(
            &mut status.conditions,
            condition(PAUSED, false, "NotPaused", "not paused", generation),
            now,
        ),
        _ => {}
    }
    status
}

/// Milliseconds since the Unix epoch as RFC 3339 (seconds), as the API server writes times.
fn rfc3339_of_unix_ms(unix_ms: u64) -> String {
    let seconds = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX);
    k8s_openapi::jiff::Timestamp::from_second(seconds)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| format!("{} ms since the Unix epoch", unix_ms))
}

/// The status of a Rollout whose spec (generation `generation`) has `problems`: nothing
/// is driven; the last record is kept so a corrected spec of the same release resumes.
pub fn invalid(
    previous: &RolloutStatus,
    problems: &[String],
    generation: i64,
    now: &str,
) -> RolloutStatus {
    let message = format!(
        "the spec has {} problem(s): {}",
        problems.len(),
        problems.join("; ")
    );
    let mut status = RolloutStatus {
        phase: Some("Invalid".to_string()),
        observed_generation: Some(generation),
        problems: problems.to_vec(),
        conditions: previous.conditions.clone(),
        ..previous.clone()
    };
    set_condition(
        &mut status.conditions,
        condition(PROGRESSING, false, "InvalidSpec", &message, generation),
        now,
    );
    status
}

/// The JSON merge patch that writes `status` through the `status` subresource: the
/// whole status object, fields left out set to null so a stale one disappears.
pub fn merge_patch(status: &RolloutStatus) -> Value {
    let mut body = serde_json::to_value(status).unwrap_or(Value::Null);
    if let Value::Object(fields) = &mut body {
        for name in [
            "phase",
            "step",
            "stepText",
            "canaryWeight",
            "observedGeneration",
            "revision",
            "lastVerdict",
            "conditions",
            "problems",
            "record",
        ] {
            fields.entry(name).or_insert(Value::Null);
        }
    }
    json!({ "status": body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::RolloutId;
    use std::time::Duration;

    fn record() -> Record {
        let id = RolloutId {
            policy: "checkout".into(),
            split_rule: "rollout".into(),
            canary: "canary".into(),
            revision: "abc".into(),
        };
        let mut r = Record::new(id, Duration::from_secs(1));
        r.applied_weight = 5;
        r.generation = 1;
        r
    }

    fn find<'a>(s: &'a RolloutStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition present")
    }

    #[test]
    fn a_progressing_rollout_says_so_with_its_numbers() {
        let mut r = record();
        r.state.canary.requests = 120.0;
        r.state.canary.errors = 1.0;
        let s = from_record(&RolloutStatus::default(), &[5, 50, 100], &r, 3, "T1");
        assert_eq!(s.phase.as_deref(), Some("Progressing"));
        assert_eq!(s.step, Some(1));
        assert_eq!(s.step_text.as_deref(), Some("1/3"));
        assert_eq!(s.canary_weight, Some(5));
        assert_eq!(s.observed_generation, Some(3));
        let p = find(&s, PROGRESSING);
        assert_eq!(
            (p.status.as_str(), p.reason.as_str()),
            ("True", "Analyzing")
        );
        assert!(
            p.message.contains("canary 120 requests, 1 errors"),
            "{}",
            p.message
        );
        assert_eq!(p.last_transition_time, "T1");
        assert_eq!(find(&s, PROMOTED).status, "False");
        assert_eq!(find(&s, ROLLED_BACK).status, "False");
        assert_eq!(s.record.as_ref(), Some(&r), "the verdict state is kept");
    }

    #[test]
    fn transition_time_changes_only_with_the_status() {
        let r = record();
        let first = from_record(&RolloutStatus::default(), &[5, 100], &r, 1, "T1");
        let mut later = r.clone();
        later.state.reason = "holding: 10 of 300 requests".into();
        let second = from_record(&first, &[5, 100], &later, 1, "T2");
        let p = find(&second, PROGRESSING);
        assert_eq!(p.last_transition_time, "T1", "still True: time kept");
        assert!(p.message.contains("holding: 10 of 300"));
        let mut done = later.clone();
        done.state.phase = Phase::Promoted;
        done.applied_weight = 100;
        let third = from_record(&second, &[5, 100], &done, 1, "T3");
        assert_eq!(third.phase.as_deref(), Some("Promoted"));
        let promoted = find(&third, PROMOTED);
        assert_eq!(
            (
                promoted.status.as_str(),
                promoted.reason.as_str(),
                promoted.last_transition_time.as_str()
            ),
            ("True", "AllStepsPassed", "T3")
        );
        assert_eq!(find(&third, PROGRESSING).last_transition_time, "T3");
        assert_eq!(
            find(&third, ROLLED_BACK).last_transition_time,
            "T1",
            "False all along"
        );
    }

    #[test]
    fn rollback_and_abort_set_rolled_back_with_a_camel_case_reason() {
        let mut r = record();
        r.state.phase = Phase::RolledBack {
            reason: RollbackReason::ErrorRegression,
        };
        r.applied_weight = 0;
        let s = from_record(&RolloutStatus::default(), &[5, 100], &r, 2, "T1");
        let c = find(&s, ROLLED_BACK);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "ErrorRateRegressed")
        );
        assert!(c.message.contains("canary at 0 %"), "{}", c.message);
        r.state.phase = Phase::Aborted;
        let s = from_record(&s, &[5, 100], &r, 2, "T2");
        assert_eq!(find(&s, ROLLED_BACK).reason, "Aborted");
        assert_eq!(s.phase.as_deref(), Some("Aborted"));
    }

    #[test]
    fn a_paused_rollout_says_paused_by_whom_and_since_when_and_resumes() {
        let mut r = record();
        let plain = from_record(&RolloutStatus::default(), &[5, 100], &r, 1, "T1");
        assert!(
            plain.conditions.iter().all(|c| c.type_ != PAUSED),
            "no Paused condition before any pause"
        );
        r.control.paused = Some(crate::control::Paused {
            request: "ops (meshcanary pause)".into(),
            since_unix_ms: 1_796_601_600_000,
        });
        let paused = from_record(&plain, &[5, 100], &r, 1, "T2");
        assert_eq!(paused.phase.as_deref(), Some("Paused"));
        let c = find(&paused, PAUSED);
        assert_eq!(
            (
                c.status.as_str(),
                c.reason.as_str(),
                c.last_transition_time.as_str()
            ),
            ("True", "PausedByOperator", "T2")
        );
        assert!(
            c.message.contains("ops (meshcanary pause)"),
            "{}",
            c.message
        );
        assert!(c.message.contains("2026-12-07T00:00:00Z"), "{}", c.message);
        assert_eq!(find(&paused, PROGRESSING).status, "True");
        r.control.paused = None;
        let resumed = from_record(&paused, &[5, 100], &r, 1, "T3");
        assert_eq!(resumed.phase.as_deref(), Some("Progressing"));
        let c = find(&resumed, PAUSED);
        assert_eq!(
            (c.status.as_str(), c.last_transition_time.as_str()),
            ("False", "T3")
        );
    }

    #[test]
    fn an_invalid_spec_keeps_the_record_and_stops_progressing() {
        let r = record();
        let before = from_record(&RolloutStatus::default(), &[5, 100], &r, 1, "T1");
        let s = invalid(
            &before,
            &["steps: the last step must be 100".into()],
            2,
            "T2",
        );
        assert_eq!(s.phase.as_deref(), Some("Invalid"));
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.record, before.record);
        let p = find(&s, PROGRESSING);
        assert_eq!(
            (p.status.as_str(), p.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(p.message.contains("steps: the last step must be 100"));
    }

    #[test]
    fn the_merge_patch_clears_fields_left_out() {
        let patch = merge_patch(&RolloutStatus {
            phase: Some("Invalid".into()),
            ..RolloutStatus::default()
        });
        assert_eq!(patch["status"]["phase"], "Invalid");
        assert!(patch["status"]["record"].is_null());
        assert!(patch["status"]
            .as_object()
            .is_some_and(|o| o.contains_key("record")));
    }
}
