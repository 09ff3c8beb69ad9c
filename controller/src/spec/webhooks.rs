//! The spec's `webhooks` and `notify` sections: their validated types and their checks
//! (every problem with its path, in the same pass as the rest of the spec).
//!
//! What the controller does with them is [`crate::hooks`] (calls, gates, failure counts)
//! and [`crate::notify`] (events and notifications, fire-and-forget).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::document::{NotifyDocument, NotifyTypeDocument, SeverityDocument, WebhookDocument};
use super::{parse_duration, Checker};

/// Default time one attempt of a webhook may take.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time one attempt of a notification may take.
pub const DEFAULT_NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a `timeout` may be: a hook holds its own rollout's loop at most this long
/// per attempt.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// The shortest a `timeout` may be.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);
/// Default extra attempts after a failed one.
pub const DEFAULT_RETRIES: u32 = 2;
/// The most extra attempts a hook or target may ask for.
pub const MAX_RETRIES: u32 = 5;
/// Default intervals a `pre-rollout` or `rollout` hook may fail in a row.
pub const DEFAULT_MAX_FAILURES: u32 = 10;

/// When a webhook is called, and what its answer does: the spec's `type`, one type for
/// the file, the CRD and the controller.
pub use super::document::WebhookTypeDocument as WebhookKind;

impl WebhookKind {
    /// The name the spec and the payloads use (`pre-rollout`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookKind::PreRollout => "pre-rollout",
            WebhookKind::ConfirmPromotion => "confirm-promotion",
            WebhookKind::Rollout => "rollout",
            WebhookKind::Rollback => "rollback",
            WebhookKind::PostRollout => "post-rollout",
            WebhookKind::Event => "event",
        }
    }

    /// Whether failed intervals are counted against `max_failures`.
    pub fn counts_failures(self) -> bool {
        matches!(self, WebhookKind::PreRollout | WebhookKind::Rollout)
    }
}

/// One validated webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSpec {
    /// Unique name.
    pub name: String,
    /// When it is called.
    pub kind: WebhookKind,
    /// `http://` URL the POST goes to.
    pub url: String,
    /// How long one attempt may take.
    pub timeout: Duration,
    /// Extra attempts after a failed one (never after a refusal).
    pub retries: u32,
    /// Failed intervals in a row before a rollback (`pre-rollout`, `rollout`).
    pub max_failures: u32,
    /// The payload's `metadata`.
    pub metadata: BTreeMap<String, String>,
}

/// How much a notification matters; ordered, so a target takes every severity from its
/// own least one up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Step changes, the start, a completion.
    Info,
    /// A gate or failing hook holding the rollout, unreadable metrics, a write retried.
    Warning,
    /// A rollback or an abort.
    Error,
}

impl Severity {
    /// `info`, `warning`, `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }

    fn from_document(d: SeverityDocument) -> Severity {
        match d {
            SeverityDocument::Info => Severity::Info,
            SeverityDocument::Warning => Severity::Warning,
            SeverityDocument::Error => Severity::Error,
        }
    }
}

/// What a notification target receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyFormat {
    /// meshcanary's notification object ([`crate::notify::notification`]).
    Json,
    /// A Slack-compatible incoming-webhook message ([`crate::notify::slack_message`]).
    Slack,
}

/// One validated notification target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyTarget {
    /// Unique name among the targets.
    pub name: String,
    /// The payload it receives.
    pub format: NotifyFormat,
    /// `http://` URL the POST goes to.
    pub url: String,
    /// The least severity it receives.
    pub severity: Severity,
    /// Slack's `channel`, if given.
    pub channel: Option<String>,
    /// Slack's `username`, if given.
    pub username: Option<String>,
    /// How long one attempt may take.
    pub timeout: Duration,
    /// Extra attempts after a failed one.
    pub retries: u32,
}

/// A name for a hook or target: letters, digits, `-`, `_`, `.`; 1 to 63 characters.
fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Why `url` cannot be called, if it cannot: the controller's client speaks plain HTTP.
pub fn hook_url_problem(url: &str) -> Option<String> {
    if url.starts_with("https://") {
        return Some(format!(
            "{url:?}: https is not supported by the controller's HTTP client; use an http:// URL (in a mesh, let the controller's sidecar originate TLS: see the README's \"Webhooks\")"
        ));
    }
    match reqwest::Url::parse(url) {
        Ok(parsed)
            if parsed.scheme() == "http" && parsed.host_str().is_some_and(|h| !h.is_empty()) =>
        {
            None
        }
        _ => Some(format!("expected an http:// URL, found {url:?}")),
    }
}

impl Checker<'_, '_> {
    fn hook_name(
        &mut self,
        name: &Option<String>,
        path: &str,
        seen: &mut BTreeSet<String>,
    ) -> Option<String> {
        let field = format!("{path}.name");
        let name = self.required(name, &field)?.clone();
        if !name_ok(&name) {
            self.error(
                &field,
                format!("{name:?}: expected 1 to 63 letters, digits, '-', '_' or '.'"),
            );
            return None;
        }
        if !seen.insert(name.clone()) {
            self.error(
                &field,
                format!("{name:?} is used twice; names must be unique"),
            );
            return None;
        }
        Some(name)
    }

    fn hook_url(&mut self, url: &Option<String>, path: &str) -> Option<String> {
        let field = format!("{path}.url");
        let url = self.required(url, &field)?.clone();
        match hook_url_problem(&url) {
            None => Some(url),
            Some(problem) => {
                self.error(&field, problem);
                None
            }
        }
    }

    fn hook_timeout(
        &mut self,
        value: Option<&serde_json::Value>,
        path: &str,
        default: Duration,
    ) -> Option<Duration> {
        let field = format!("{path}.timeout");
        let Some(value) = value else {
            return Some(default);
        };
        match parse_duration(value) {
            Ok(d) if (MIN_TIMEOUT..=MAX_TIMEOUT).contains(&d) => Some(d),
            Ok(_) => {
                self.error(&field, "must be between 100ms and 60s");
                None
            }
            Err(message) => {
                self.error(&field, message);
                None
            }
        }
    }

    fn hook_retries(&mut self, retries: Option<u32>, path: &str) -> Option<u32> {
        match retries {
            None => Some(DEFAULT_RETRIES),
            Some(r) if r <= MAX_RETRIES => Some(r),
            Some(r) => {
                self.error(
                    &format!("{path}.retries"),
                    format!("{r}: at most {MAX_RETRIES}"),
                );
                None
            }
        }
    }

    /// The `webhooks` section; `None` when any hook is invalid (each problem reported).
    pub(super) fn webhooks(
        &mut self,
        hooks: Option<&Vec<WebhookDocument>>,
    ) -> Option<Vec<WebhookSpec>> {
        let Some(hooks) = hooks else {
            return Some(Vec::new());
        };
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        let mut ok = true;
        for (i, hook) in hooks.iter().enumerate() {
            let path = format!("webhooks[{}]", self.original_index("webhooks", i));
            let name = self.hook_name(&hook.name, &path, &mut seen);
            let kind = self.required(&hook.kind, &format!("{path}.type")).copied();
            let url = self.hook_url(&hook.url, &path);
            let timeout = self.hook_timeout(hook.timeout.as_ref(), &path, DEFAULT_HOOK_TIMEOUT);
            let retries = self.hook_retries(hook.retries, &path);
            let max_failures = match (hook.max_failures, kind) {
                (None, _) => Some(DEFAULT_MAX_FAILURES),
                (Some(0), _) => {
                    self.error(&format!("{path}.max_failures"), "must be at least 1");
                    None
                }
                (Some(n), Some(k)) if !k.counts_failures() => {
                    self.error(
                        &format!("{path}.max_failures"),
                        format!("{n}: only pre-rollout and rollout hooks count failures (a {} hook never changes the rollout's course)", k.as_str()),
                    );
                    None
                }
                (Some(n), _) => Some(n),
            };
            match (name, kind, url, timeout, retries, max_failures) {
                (
                    Some(name),
                    Some(kind),
                    Some(url),
                    Some(timeout),
                    Some(retries),
                    Some(max_failures),
                ) => out.push(WebhookSpec {
                    name,
                    kind,
                    url,
                    timeout,
                    retries,
                    max_failures,
                    metadata: hook.metadata.clone().unwrap_or_default(),
                }),
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// The `notify` section; `None` when it is invalid (each problem reported).
    pub(super) fn notify(&mut self, notify: Option<&NotifyDocument>) -> Option<Vec<NotifyTarget>> {
        let Some(notify) = notify else {
            return Some(Vec::new());
        };
        let least = notify
            .severity
            .map_or(Severity::Info, Severity::from_document);
        let targets = self.required(&notify.targets, "notify.targets")?;
        if targets.is_empty() {
            self.error(
                "notify.targets",
                "expected at least one target (or leave notify out)",
            );
            return None;
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        let mut ok = true;
        for (i, target) in targets.iter().enumerate() {
            let path = format!(
                "notify.targets[{}]",
                self.original_index("notify.targets", i)
            );
            let name = self.hook_name(&target.name, &path, &mut seen);
            let format = self
                .required(&target.kind, &format!("{path}.type"))
                .map(|k| match k {
                    NotifyTypeDocument::Json => NotifyFormat::Json,
                    NotifyTypeDocument::Slack => NotifyFormat::Slack,
                });
            let url = self.hook_url(&target.url, &path);
            let timeout = self.hook_timeout(target.timeout.as_ref(), &path, DEFAULT_NOTIFY_TIMEOUT);
            let retries = self.hook_retries(target.retries, &path);
            let mut slack_only_ok = true;
            if format == Some(NotifyFormat::Json) {
                for (field, given) in [
                    ("channel", target.channel.is_some()),
                    ("username", target.username.is_some()),
                ] {
                    if given {
                        self.error(&format!("{path}.{field}"), "only with type: slack");
                        slack_only_ok = false;
                    }
                }
            }
            match (name, format, url, timeout, retries) {
                (Some(name), Some(format), Some(url), Some(timeout), Some(retries))
                    if slack_only_ok =>
                {
                    out.push(NotifyTarget {
                        name,
                        format,
                        url,
                        severity: target.severity.map_or(least, Severity::from_document),
                        channel: target.channel.clone(),
                        username: target.username.clone(),
                        timeout,
                        retries,
                    })
                }
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }
}
