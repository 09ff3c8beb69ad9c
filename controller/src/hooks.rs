//! Webhooks: the spec's `webhooks` called at their moments of a rollout — an HTTP POST
//! with a JSON body ([`payload`]), a bounded timeout per attempt and a few retries.
//!
//! What an answer does is decided here and acted on by the driver ([`crate::rollout`]),
//! around the verdict engine's decision, never inside it:
//! - `pre-rollout`: the first weight waits for a 2xx from every such hook; one failed
//!   interval (however often retried) counts one failure, `max_failures` in a row roll back;
//! - `confirm-promotion`: a promotion (or the completion) happens only when every such
//!   gate answers 2xx; a refusal, an error or a timeout holds the step;
//! - `rollout`: called at every interval while progressing; a failure holds promotion for
//!   that interval and counts like a `pre-rollout` failure;
//! - `rollback`, `post-rollout`: called at the end; their answers change nothing;
//! - `event`: every event, fire-and-forget, by [`crate::notify`].
//!
//! Each rollout has its own [`Hooks`] and calls them from its own task, so a slow hook
//! holds its own rollout at most `timeout × (retries + 1)` plus backoff, and no other.
//! What must survive a restart (gate passed, failures in a row, end hooks called) is
//! [`HookState`], saved in the rollout's record.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::output::Output;
use crate::sink::Record;
use crate::spec::webhooks::{WebhookKind, WebhookSpec};
use crate::spec::RolloutSpec;
use crate::verdict::Phase;

/// The webhooks' part of the rollout record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookState {
    /// Every `pre-rollout` hook answered 2xx in one interval: the first weight may be
    /// (or was) applied.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pre_rollout_passed: bool,
    /// Failed intervals in a row, per `pre-rollout` or `rollout` hook name (absent: 0).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<String, u32>,
    /// Why a promotion is held now (a gate's answer, a failing hook), if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
    /// The `rollback` and `post-rollout` hooks were called for this rollout's end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub end_called: bool,
}

impl HookState {
    /// Nothing to remember (the record leaves the field out).
    pub fn is_empty(&self) -> bool {
        *self == HookState::default()
    }
}

/// How one call ended (after its retries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The receiver answered with this HTTP status.
    Status(u16),
    /// No answer within the timeout.
    TimedOut(Duration),
    /// No connection, or the connection broke: why.
    Unreachable(String),
}

/// One call's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallResult {
    /// The last attempt's answer.
    pub answer: Answer,
    /// Attempts made (1 + retries used).
    pub attempts: u32,
    /// Time from the first attempt to the last answer.
    pub elapsed: Duration,
}

impl CallResult {
    /// A 2xx answer.
    pub fn ok(&self) -> bool {
        matches!(self.answer, Answer::Status(s) if (200..300).contains(&s))
    }

    /// The answer in words: `answered 403`, `timed out after 10 s`, `unreachable: …`.
    pub fn describe(&self) -> String {
        match &self.answer {
            Answer::Status(s) => format!("answered {s}"),
            Answer::TimedOut(t) => format!("timed out after {} s", t.as_secs_f64()),
            Answer::Unreachable(why) => format!("unreachable: {why}"),
        }
    }

    /// The HTTP status, if any.
    pub fn status(&self) -> Option<u16> {
        match self.answer {
            Answer::Status(s) => Some(s),
            _ => None,
        }
    }
}

/// Whether another attempt may help: no answer, or the receiver said "later" (5xx,
/// 429). A refusal (403, 400, …) is an answer and is not asked again.
fn retryable(answer: &Answer) -> bool {
    match answer {
        Answer::Status(s) => *s == 429 || (500..600).contains(s),
        Answer::TimedOut(_) | Answer::Unreachable(_) => true,
    }
}

/// The innermost cause of a client error ("Connection refused (os error 111)").
fn error_text(e: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = e;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

/// POSTs `body` to `url`: each attempt bounded by `timeout`, at most `retries` more
/// attempts after one that may be retried, 200 ms backoff doubling to 2 s.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    timeout: Duration,
    retries: u32,
) -> CallResult {
    let started = Instant::now();
    let mut attempts = 0;
    let mut delay = Duration::from_millis(200);
    loop {
        attempts += 1;
        let answer = match client.post(url).timeout(timeout).json(body).send().await {
            Ok(response) => Answer::Status(response.status().as_u16()),
            Err(e) if e.is_timeout() => Answer::TimedOut(timeout),
            Err(e) => Answer::Unreachable(error_text(&e)),
        };
        if !retryable(&answer) || attempts > retries {
            return CallResult {
                answer,
                attempts,
                elapsed: started.elapsed(),
            };
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Where the rollout stands when a hook is called: what its payload says besides the
/// rollout's identity.
#[derive(Debug, Clone, PartialEq)]
pub struct Moment {
    /// `Progressing`, `Promoted`, `RolledBack` or `Aborted`.
    pub phase: &'static str,
    /// Index of the step judged (0-based, as in events).
    pub step: usize,
    /// The canary weight applied, percent.
    pub weight: u32,
    /// `confirm-promotion`: the weight the promotion would apply.
    pub next_weight: Option<u32>,
    /// The verdict this call is about (`promote`, `complete`, `rollback`, …), if any.
    pub verdict: Option<String>,
    /// The last verdict's reason (or the rollout's), in words.
    pub reason: String,
    /// The verdict's numbers ([`crate::verdict::Numbers`] as JSON), `null` before any.
    pub numbers: Value,
}

impl Moment {
    /// The moment a record stands for, without a verdict.
    pub fn of(record: &Record) -> Moment {
        Moment {
            phase: crate::kubernetes::status::phase_name(&record.state.phase),
            step: record.state.step,
            weight: record.applied_weight,
            next_weight: None,
            verdict: None,
            reason: record.state.reason.clone(),
            numbers: Value::Null,
        }
    }
}

fn unix_ms() -> u64 {
    u64::try_from(crate::rollout::now().as_millis()).unwrap_or(u64::MAX)
}

/// The rollout a payload is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The rollout's key when a process drives many (file name, `namespace/name`), else
    /// the policy's name.
    pub rollout: String,
    /// The policy's name.
    pub policy: String,
    /// The split rule driven.
    pub split_rule: String,
    /// The variant under test.
    pub canary: String,
    /// The spec's revision.
    pub revision: String,
    /// Number of steps.
    pub steps: usize,
}

impl Identity {
    /// The identity of `spec`'s rollout, named `rollout`.
    pub fn new(spec: &RolloutSpec, rollout: &str) -> Identity {
        Identity {
            rollout: rollout.to_string(),
            policy: spec.policy.name.clone(),
            split_rule: spec.split_rule.clone(),
            canary: spec.canary.clone(),
            revision: spec.revision.clone(),
            steps: spec.judge.steps.len(),
        }
    }
}

/// The JSON body POSTed to `hook` at `moment` (every type but `event`, whose body is
/// [`crate::notify::event_payload`]).
pub fn payload(id: &Identity, hook: &WebhookSpec, moment: &Moment, unix_ms: u64) -> Value {
    json!({
        "rollout": id.rollout,
        "hook": hook.name,
        "type": hook.kind.as_str(),
        "policy": id.policy,
        "split_rule": id.split_rule,
        "canary": id.canary,
        "revision": id.revision,
        "phase": moment.phase,
        "step": moment.step,
        "steps": id.steps,
        "weight": moment.weight,
        "next_weight": moment.next_weight,
        "verdict": moment.verdict,
        "reason": moment.reason,
        "numbers": moment.numbers,
        "metadata": hook.metadata,
        "unix_ms": unix_ms,
    })
}

/// What the counted hooks (`pre-rollout`, `rollout`) of one interval said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counted {
    /// Every hook of the kind answered 2xx (or there is none).
    pub passed: bool,
    /// The first failing hook, in words, with its count (`rollout hook warm answered 500
    /// (failure 2 of 10)`).
    pub failing: Option<String>,
    /// A hook reached its `max_failures`: the rollback's reason, in words.
    pub exhausted: Option<String>,
}

/// One rollout's webhooks and their HTTP client (made only when there are hooks: a
/// process may drive a thousand rollouts without any).
pub struct Hooks {
    client: Option<reqwest::Client>,
    id: Identity,
    hooks: Vec<WebhookSpec>,
    /// The last result printed per hook: an unchanged answer is not printed again.
    printed: BTreeMap<String, String>,
}

impl Hooks {
    /// The hooks of `spec`'s rollout, named `rollout` in payloads.
    pub fn new(spec: &RolloutSpec, rollout: &str) -> Hooks {
        Hooks {
            client: (!spec.webhooks.is_empty()).then(reqwest::Client::new),
            id: Identity::new(spec, rollout),
            hooks: spec.webhooks.clone(),
            printed: BTreeMap::new(),
        }
    }

    /// Whether any hook is of `kind`.
    pub fn has(&self, kind: WebhookKind) -> bool {
        self.hooks.iter().any(|h| h.kind == kind)
    }

    /// Calls every hook of `kind`, concurrently; results in the spec's order.
    async fn call(&self, kind: WebhookKind, moment: &Moment) -> Vec<(WebhookSpec, CallResult)> {
        let Some(client) = &self.client else {
            return Vec::new();
        };
        let at = unix_ms();
        let calls = self.hooks.iter().filter(|h| h.kind == kind).map(|hook| {
            let body = payload(&self.id, hook, moment, at);
            async move {
                let result = post(client, &hook.url, &body, hook.timeout, hook.retries).await;
                (hook.clone(), result)
            }
        });
        futures::future::join_all(calls).await
    }

    /// Prints a `webhook` event for a failed call, or for an answer that changed.
    fn report(
        &mut self,
        out: &mut Output,
        hook: &WebhookSpec,
        result: &CallResult,
        count: Option<u32>,
    ) {
        let text = result.describe();
        let changed = self.printed.get(&hook.name) != Some(&text);
        if !(changed || (count.is_some() && !result.ok())) {
            return;
        }
        self.printed.insert(hook.name.clone(), text.clone());
        let counted = match count {
            Some(n) if !result.ok() => format!(" (failure {n} of {})", hook.max_failures),
            _ => String::new(),
        };
        let error = match &result.answer {
            Answer::Status(_) => None,
            _ => Some(text.clone()),
        };
        out.event(
            "webhook",
            format!(
                "{} hook {} {}{} ({} attempt{}, {} ms)",
                hook.kind.as_str(),
                hook.name,
                text,
                counted,
                result.attempts,
                if result.attempts == 1 { "" } else { "s" },
                result.elapsed.as_millis()
            ),
            json!({
                "hook": hook.name,
                "type": hook.kind.as_str(),
                "ok": result.ok(),
                "status": result.status(),
                "error": error,
                "attempts": result.attempts,
                "ms": result.elapsed.as_millis() as u64,
                "failures": count.filter(|_| !result.ok()),
                "max_failures": hook.kind.counts_failures().then_some(hook.max_failures),
            }),
        );
    }

    /// Calls the `pre-rollout` or `rollout` hooks for one interval and counts their
    /// failures in `state` (one per hook per interval; a 2xx clears it).
    pub async fn counted(
        &mut self,
        kind: WebhookKind,
        state: &mut HookState,
        moment: &Moment,
        out: &mut Output,
    ) -> Counted {
        let mut counted = Counted {
            passed: true,
            ..Counted::default()
        };
        for (hook, result) in self.call(kind, moment).await {
            if result.ok() {
                state.failures.remove(&hook.name);
                self.report(out, &hook, &result, None);
                continue;
            }
            let count = state
                .failures
                .get(&hook.name)
                .copied()
                .unwrap_or(0)
                .saturating_add(1);
            state.failures.insert(hook.name.clone(), count);
            self.report(out, &hook, &result, Some(count));
            counted.passed = false;
            if counted.failing.is_none() {
                counted.failing = Some(format!(
                    "{} hook {} {} (failure {} of {})",
                    kind.as_str(),
                    hook.name,
                    result.describe(),
                    count,
                    hook.max_failures
                ));
            }
            if count >= hook.max_failures && counted.exhausted.is_none() {
                counted.exhausted = Some(format!(
                    "{} hook {} failed {} intervals in a row (last: {})",
                    kind.as_str(),
                    hook.name,
                    count,
                    result.describe()
                ));
            }
        }
        counted
    }

    /// Asks every `confirm-promotion` gate; `Err` holds the promotion, with why
    /// (`gate approve answered 403`).
    pub async fn confirm(&mut self, moment: &Moment, out: &mut Output) -> Result<(), String> {
        let mut refused = Vec::new();
        for (hook, result) in self.call(WebhookKind::ConfirmPromotion, moment).await {
            self.report(out, &hook, &result, None);
            if !result.ok() {
                refused.push(format!("gate {} {}", hook.name, result.describe()));
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(refused.join("; "))
        }
    }

    /// Whether anything is to be called at the end.
    pub fn has_end_hooks(&self) -> bool {
        self.has(WebhookKind::Rollback) || self.has(WebhookKind::PostRollout)
    }

    /// Calls the end's hooks once: `rollback` hooks after a rollback or abort, then
    /// `post-rollout` hooks; their answers are reported and change nothing.
    pub async fn at_end(&mut self, state: &mut HookState, moment: &Moment, out: &mut Output) {
        if state.end_called {
            return;
        }
        if matches!(moment.phase, "RolledBack" | "Aborted") {
            for (hook, result) in self.call(WebhookKind::Rollback, moment).await {
                self.report(out, &hook, &result, None);
            }
        }
        for (hook, result) in self.call(WebhookKind::PostRollout, moment).await {
            self.report(out, &hook, &result, None);
        }
        state.end_called = true;
    }
}

/// Whether a record's first weight still waits for the `pre-rollout` gate: nothing but
/// 0 % was ever applied, and the gate has not passed.
pub fn waits_for_pre_rollout(record: &Record) -> bool {
    !record.hooks.pre_rollout_passed
        && record.state.phase == Phase::Progressing
        && record.state.step == 0
        && record.applied_weight == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::RolloutId;

    fn hook(kind: WebhookKind) -> WebhookSpec {
        WebhookSpec {
            name: "approve".into(),
            kind,
            url: "http://127.0.0.1:1/approve".into(),
            timeout: Duration::from_secs(1),
            retries: 0,
            max_failures: 10,
            metadata: BTreeMap::from([("team".to_string(), "shop".to_string())]),
        }
    }

    fn id() -> Identity {
        Identity {
            rollout: "checkout".into(),
            policy: "checkout".into(),
            split_rule: "rollout".into(),
            canary: "canary".into(),
            revision: "r1".into(),
            steps: 3,
        }
    }

    #[test]
    fn the_payload_names_the_rollout_the_moment_and_the_metadata() {
        let moment = Moment {
            phase: "Progressing",
            step: 0,
            weight: 20,
            next_weight: Some(50),
            verdict: Some("promote".into()),
            reason: "canary as good as baseline".into(),
            numbers: json!({"canary": {"requests": 250.0, "errors": 0.0}}),
        };
        let body = payload(&id(), &hook(WebhookKind::ConfirmPromotion), &moment, 7);
        assert_eq!(
            body,
            json!({
                "rollout": "checkout", "hook": "approve", "type": "confirm-promotion",
                "policy": "checkout", "split_rule": "rollout", "canary": "canary",
                "revision": "r1", "phase": "Progressing", "step": 0, "steps": 3,
                "weight": 20, "next_weight": 50, "verdict": "promote",
                "reason": "canary as good as baseline",
                "numbers": {"canary": {"requests": 250.0, "errors": 0.0}},
                "metadata": {"team": "shop"}, "unix_ms": 7
            })
        );
    }

    #[test]
    fn only_silence_and_later_are_retried_never_a_refusal() {
        assert!(retryable(&Answer::Status(503)));
        assert!(retryable(&Answer::Status(429)));
        assert!(retryable(&Answer::TimedOut(Duration::from_secs(1))));
        assert!(retryable(&Answer::Unreachable("refused".into())));
        assert!(!retryable(&Answer::Status(403)));
        assert!(!retryable(&Answer::Status(200)));
        let refused = CallResult {
            answer: Answer::Status(403),
            attempts: 1,
            elapsed: Duration::ZERO,
        };
        assert_eq!(refused.describe(), "answered 403");
        assert!(!refused.ok());
    }

    #[test]
    fn an_empty_hook_state_is_left_out_of_the_record() {
        let id = RolloutId {
            policy: "p".into(),
            split_rule: "r".into(),
            canary: "c".into(),
            revision: "v".into(),
        };
        let mut record = Record::new(id, Duration::from_secs(1));
        let text = serde_json::to_string(&record).expect("json");
        assert!(!text.contains("hooks"), "{text}");
        record.hooks.failures.insert("warm".into(), 3);
        record.hooks.pre_rollout_passed = true;
        let text = serde_json::to_string(&record).expect("json");
        let back: Record = serde_json::from_str(&text).expect("read back");
        assert_eq!(back.hooks, record.hooks);
        assert_eq!(
            serde_json::to_value(&record.hooks).expect("json"),
            json!({"pre_rollout_passed": true, "failures": {"warm": 3}})
        );
    }

    #[tokio::test]
    async fn an_unreachable_receiver_is_retried_and_reported_in_words() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let client = reqwest::Client::new();
        let result = post(
            &client,
            "http://127.0.0.1:1/",
            &json!({}),
            Duration::from_secs(1),
            1,
        )
        .await;
        assert_eq!(result.attempts, 2);
        assert!(
            matches!(result.answer, Answer::Unreachable(_)),
            "{result:?}"
        );
        assert!(
            result.describe().starts_with("unreachable: "),
            "{}",
            result.describe()
        );
    }
}
