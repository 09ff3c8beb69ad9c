//! Fire-and-forget deliveries of a rollout's events: to its `event` webhooks (every
//! printed event) and to its `notify` targets (step changes, verdicts that act, holds by
//! a gate or a failing hook, outcomes; filtered by severity), as documented JSON —
//! meshcanary's own objects ([`event_payload`], [`notification`]) or a Slack-compatible
//! incoming-webhook message ([`slack_message`]).
//!
//! The rollout's loop never waits for a receiver: its [`Output`] hands each event to a
//! [`Tap`] that only builds the bodies and queues them. Every destination has a queue
//! (bounded: a full one drops, with a log line) and a task of its own that posts in
//! order with the destination's timeout and retries, so a slow receiver delays only its
//! own deliveries. At the rollout's end [`Relay::close`] waits a bounded time for what is
//! queued, so a `run` that exits right after a rollback still delivers it.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::hooks::post;
use crate::output::{Output, Tap};
use crate::spec::webhooks::{NotifyFormat, Severity, WebhookKind};
use crate::spec::RolloutSpec;

/// Deliveries waiting per destination before new ones are dropped.
const QUEUE: usize = 256;
/// The longest [`Relay::close`] waits for queued deliveries.
const CLOSE_LIMIT: Duration = Duration::from_secs(30);

/// The severity of a rollout event as a notification, or `None` when such events are
/// not notified (a verdict's hold while evidence gathers, a weight confirmed, …).
pub fn severity(kind: &str, data: &Value) -> Option<Severity> {
    match kind {
        "start" | "resume" | "superseded" | "promote" | "complete" => Some(Severity::Info),
        // An operator's command, a step confirmed again after a proxy restarted, a record
        // saved again after failed saves: worth a line in the channel, nothing to do.
        "command" | "confirmed" | "saved" => Some(Severity::Info),
        // A proxy restarted (counters went down), or a dry run's rollback verdict: the
        // canary keeps its weight, and someone should look.
        "restart" | "would_rollback" => Some(Severity::Warning),
        "rollback" | "aborted" => Some(Severity::Error),
        // Held by a gate or a failing hook (the driver's holds name what held them).
        "hold" if data.get("held").is_some() || data.get("hook").is_some() => {
            Some(Severity::Warning)
        }
        "webhook" if data["ok"] == Value::Bool(false) => Some(Severity::Warning),
        "source" if data.get("error").is_some() => Some(Severity::Warning),
        "source" => Some(Severity::Info),
        "error" => Some(Severity::Warning),
        _ => None,
    }
}

/// meshcanary's notification object (`type: json` targets).
pub fn notification(
    rollout: &str,
    severity: Severity,
    kind: &str,
    message: &str,
    data: &Value,
    unix_ms: u64,
) -> Value {
    json!({
        "source": "meshcanary",
        "rollout": rollout,
        "event": kind,
        "severity": severity.as_str(),
        "message": message,
        "unix_ms": unix_ms,
        "data": data,
    })
}

/// The body of an `event` webhook: the event as `run --output json` prints it, with the
/// hook's name and metadata.
pub fn event_payload(
    rollout: &str,
    hook: &str,
    metadata: &Value,
    kind: &str,
    message: &str,
    data: &Value,
    unix_ms: u64,
) -> Value {
    json!({
        "rollout": rollout,
        "hook": hook,
        "type": WebhookKind::Event.as_str(),
        "event": kind,
        "message": message,
        "unix_ms": unix_ms,
        "data": data,
        "metadata": metadata,
    })
}

/// Text for a Slack-compatible receiver: `&`, `<` and `>` are control characters there.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A Slack-compatible incoming-webhook message (`type: slack` targets): `text` with the
/// severity, the rollout, the event and its message (the verdict, why, and the numbers),
/// plus `channel` and `username` when the target gives them.
pub fn slack_message(
    rollout: &str,
    severity: Severity,
    kind: &str,
    message: &str,
    channel: Option<&str>,
    username: Option<&str>,
) -> Value {
    let icon = match severity {
        Severity::Info => ":large_blue_circle:",
        Severity::Warning => ":warning:",
        Severity::Error => ":red_circle:",
    };
    let mut body = json!({
        "text": format!("{icon} *{}* {}: {}", slack_escape(rollout), kind, slack_escape(message)),
    });
    if let Some(target) = body.as_object_mut() {
        if let Some(channel) = channel {
            target.insert("channel".into(), Value::String(channel.to_string()));
        }
        if let Some(username) = username {
            target.insert("username".into(), Value::String(username.to_string()));
        }
    }
    body
}

/// What one destination receives.
enum Receives {
    /// Every event (an `event` webhook).
    Events { hook: String, metadata: Value },
    /// Notifications from `least` severity on.
    Notifications {
        format: NotifyFormat,
        least: Severity,
        channel: Option<String>,
        username: Option<String>,
    },
}

struct Destination {
    name: String,
    receives: Receives,
    queue: mpsc::Sender<Value>,
}

impl Destination {
    fn body(
        &self,
        rollout: &str,
        kind: &str,
        message: &str,
        data: &Value,
        at: u64,
    ) -> Option<Value> {
        match &self.receives {
            Receives::Events { hook, metadata } => Some(event_payload(
                rollout, hook, metadata, kind, message, data, at,
            )),
            Receives::Notifications {
                format,
                least,
                channel,
                username,
            } => {
                let severity = severity(kind, data).filter(|s| s >= least)?;
                Some(match format {
                    NotifyFormat::Json => notification(rollout, severity, kind, message, data, at),
                    NotifyFormat::Slack => slack_message(
                        rollout,
                        severity,
                        kind,
                        message,
                        channel.as_deref(),
                        username.as_deref(),
                    ),
                })
            }
        }
    }
}

/// The delivery tasks of one rollout.
pub struct Relay {
    workers: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts a delivery task per `event` webhook and notification target of `spec` and
    /// hands every event `out` prints to them; `None` (and nothing started) when there is
    /// none. `rollout` names the rollout in the bodies.
    pub fn start(spec: &RolloutSpec, rollout: &str, out: &mut Output) -> Option<Relay> {
        let event_hooks = spec.webhooks.iter().any(|h| h.kind == WebhookKind::Event);
        if !event_hooks && spec.notify.is_empty() {
            return None;
        }
        let client = reqwest::Client::new();
        let mut destinations = Vec::new();
        let mut workers = Vec::new();
        let mut add =
            |name: String, receives: Receives, url: String, timeout: Duration, retries: u32| {
                let (queue, mut waiting) = mpsc::channel::<Value>(QUEUE);
                let client = client.clone();
                let label = name.clone();
                workers.push(tokio::spawn(async move {
                    while let Some(body) = waiting.recv().await {
                        let result = post(&client, &url, &body, timeout, retries).await;
                        if !result.ok() {
                            tracing::warn!(
                                "delivery to {} ({}) failed: {}",
                                label,
                                url,
                                result.describe()
                            );
                        }
                    }
                }));
                destinations.push(Destination {
                    name,
                    receives,
                    queue,
                });
            };
        for hook in spec
            .webhooks
            .iter()
            .filter(|h| h.kind == WebhookKind::Event)
        {
            add(
                hook.name.clone(),
                Receives::Events {
                    hook: hook.name.clone(),
                    metadata: json!(hook.metadata),
                },
                hook.url.clone(),
                hook.timeout,
                hook.retries,
            );
        }
        for target in &spec.notify {
            add(
                target.name.clone(),
                Receives::Notifications {
                    format: target.format,
                    least: target.severity,
                    channel: target.channel.clone(),
                    username: target.username.clone(),
                },
                target.url.clone(),
                target.timeout,
                target.retries,
            );
        }
        if destinations.is_empty() {
            return None;
        }
        let rollout = rollout.to_string();
        let tap: Tap = Box::new(move |kind, message, data| {
            let at = u64::try_from(crate::rollout::now().as_millis()).unwrap_or(u64::MAX);
            for destination in &destinations {
                let Some(body) = destination.body(&rollout, kind, message, data, at) else {
                    continue;
                };
                if destination.queue.try_send(body).is_err() {
                    tracing::warn!(
                        "{}: {} deliveries are waiting; the {:?} event is dropped",
                        destination.name,
                        QUEUE,
                        kind
                    );
                }
            }
        });
        out.set_tap(Some(tap));
        Some(Relay { workers })
    }

    /// Stops relaying `out`'s events and waits (at most 30 s) until what is queued is
    /// delivered or given up.
    pub async fn close(self, out: &mut Output) {
        // Dropping the tap closes the queues: each task ends after its last delivery.
        drop(out.set_tap(None));
        let aborts: Vec<_> = self.workers.iter().map(JoinHandle::abort_handle).collect();
        if tokio::time::timeout(CLOSE_LIMIT, futures::future::join_all(self.workers))
            .await
            .is_err()
        {
            tracing::warn!(
                "notifications still undelivered after {:?} are dropped",
                CLOSE_LIMIT
            );
            for abort in aborts {
                abort.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severities_pick_what_acts_and_leave_out_gathering() {
        assert_eq!(severity("rollback", &json!({})), Some(Severity::Error));
        assert_eq!(severity("aborted", &json!({})), Some(Severity::Error));
        assert_eq!(severity("promote", &json!({})), Some(Severity::Info));
        assert_eq!(severity("hold", &json!({"verdict": "hold"})), None);
        assert_eq!(
            severity("hold", &json!({"verdict": "hold", "held": "promote"})),
            Some(Severity::Warning)
        );
        assert_eq!(severity("webhook", &json!({"ok": true})), None);
        assert_eq!(
            severity("webhook", &json!({"ok": false})),
            Some(Severity::Warning)
        );
        assert_eq!(severity("applied", &json!({"weight": 20})), None);
        assert_eq!(
            severity("would_rollback", &json!({"dry_run": true})),
            Some(Severity::Warning)
        );
        assert_eq!(severity("restart", &json!({})), Some(Severity::Warning));
        assert_eq!(severity("paused", &json!({})), None);
        assert!(Severity::Info < Severity::Warning && Severity::Warning < Severity::Error);
    }

    #[test]
    fn the_slack_message_carries_the_why_and_the_numbers_escaped() {
        let body = slack_message(
            "checkout",
            Severity::Error,
            "rollback",
            "ROLLBACK: error rate regressed vs baseline | canary 125 req / 12 err, Λerr 8.92 (rollback at 7.60) <&>",
            Some("#releases"),
            None,
        );
        assert_eq!(
            body,
            json!({
                "text": ":red_circle: *checkout* rollback: ROLLBACK: error rate regressed vs baseline | canary 125 req / 12 err, Λerr 8.92 (rollback at 7.60) &lt;&amp;&gt;",
                "channel": "#releases"
            })
        );
    }

    #[test]
    fn the_notification_and_event_bodies_have_their_documented_shape() {
        let data = json!({"verdict": "rollback", "reason": "error rate regressed vs baseline"});
        assert_eq!(
            notification(
                "checkout",
                Severity::Error,
                "rollback",
                "ROLLBACK: …",
                &data,
                9
            ),
            json!({"source": "meshcanary", "rollout": "checkout", "event": "rollback",
                   "severity": "error", "message": "ROLLBACK: …", "unix_ms": 9, "data": data})
        );
        assert_eq!(
            event_payload(
                "checkout",
                "all",
                &json!({"team": "shop"}),
                "applied",
                "canary at 20 %",
                &json!({"weight": 20}),
                9
            ),
            json!({"rollout": "checkout", "hook": "all", "type": "event", "event": "applied",
                   "message": "canary at 20 %", "unix_ms": 9, "data": {"weight": 20},
                   "metadata": {"team": "shop"}})
        );
    }
}
