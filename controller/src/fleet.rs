//! How many rollouts are run: one process drives many rollouts at once, each in its own
//! task, isolated from the others.
//!
//! What happens to *one* rollout is [`crate::rollout`]; where specs come from (a folder
//! of files, Kubernetes objects) is the caller's business: it tells the [`Fleet`] what
//! to drive with [`Fleet::apply`], [`Fleet::remove`] and [`Fleet::invalid`], keyed by
//! whatever names a rollout there (a file name, `namespace/name`). Nothing here knows
//! about files or Kubernetes.
//!
//! Isolation: every rollout runs in a task of its own, supervised by a second task that
//! catches its end — an outcome, an error or a panic — through the `JoinHandle`. An error
//! or a panic is reported with the rollout's key and retried with backoff; it never
//! touches another rollout. The only shared state is the table behind
//! [`Fleet::snapshot`], behind a lock that is never held across an `.await`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use meshcanary_policy::ConfigErrors;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::output::Output;
use crate::rollout::{Outcome, RunError};
use crate::spec::RolloutSpec;

/// A boxed, sendable future (what a [`Launcher`] returns).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How one rollout is driven: given its spec, its output (labelled with its key, observed
/// by the fleet) and a stop signal, drive it — `rollout::run` with its source and sink.
pub type Launcher = Arc<
    dyn Fn(RolloutSpec, Output, StopSignal) -> BoxFuture<Result<Outcome, RunError>> + Send + Sync,
>;

/// Sees every event of every rollout: `(key, kind, data)`. For metrics; called from the
/// rollouts' tasks, so it must be quick and must not block.
pub type EventHook = Arc<dyn Fn(&str, &str, &Value) + Send + Sync>;

/// Resolves when the rollout must stop (a new release, its removal, or shutdown).
#[derive(Clone)]
pub struct StopSignal(watch::Receiver<bool>);

impl StopSignal {
    /// Resolves once a stop is asked for (or the fleet that gave the signal is gone).
    pub async fn stopped(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }
}

/// How a fleet reports and retries.
#[derive(Clone)]
pub struct FleetOptions {
    /// Label every line with the rollout's key (off for a fleet of one, whose output stays
    /// exactly that of a single rollout).
    pub label_lines: bool,
    /// First wait before a failed rollout is tried again.
    pub retry_first: Duration,
    /// Longest wait between two tries (the wait doubles up to it).
    pub retry_max: Duration,
    /// Sees every event, printed or not.
    pub hook: Option<EventHook>,
}

impl Default for FleetOptions {
    fn default() -> FleetOptions {
        FleetOptions {
            label_lines: true,
            retry_first: Duration::from_secs(5),
            retry_max: Duration::from_secs(60),
            hook: None,
        }
    }
}

/// What the fleet is doing with one rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activity {
    /// Its task runs (it may be waiting for the previous release to save its record).
    Running,
    /// Its last try failed; it is tried again after a backoff.
    Retrying,
    /// It ended (promoted, rolled back or aborted); nothing runs until its spec changes.
    Finished,
    /// Its input is invalid and nothing of it was ever driven.
    Invalid,
    /// Stopped (removal or shutdown); its record is saved.
    Stopped,
}

/// What one rollout is doing now: for `status` and `/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    /// The rollout's key (a file name, `namespace/name`).
    pub key: String,
    /// What the fleet does with it.
    pub activity: Activity,
    /// The spec's revision driven (empty when never valid).
    pub revision: String,
    /// Index of the step being judged.
    pub step: usize,
    /// Number of steps.
    pub steps: usize,
    /// Canary weight last applied, percent.
    pub weight: u32,
    /// The last verdict (`hold`, `promote`, `complete`, `rollback`, `aborted`; a dry
    /// run's rollback not applied is `would_rollback`, a verdict held back by a pause
    /// `paused`).
    pub last_verdict: Option<String>,
    /// Its reason, as the verdict engine words it.
    pub reason: Option<String>,
    /// When it was reached, milliseconds since the Unix epoch.
    pub verdict_unix_ms: Option<u64>,
    /// How it ended, once finished (`Promoted`, `RolledBack("…")`, `Aborted`).
    pub outcome: Option<String>,
    /// The last error (a failed try, a panic), until the next success.
    pub error: Option<String>,
    /// The input's problems while it is invalid (the last valid revision, if any, keeps
    /// being driven).
    pub problems: Vec<String>,
}

impl RolloutView {
    fn new(key: &str) -> RolloutView {
        RolloutView {
            key: key.to_string(),
            activity: Activity::Running,
            revision: String::new(),
            step: 0,
            steps: 0,
            weight: 0,
            last_verdict: None,
            reason: None,
            verdict_unix_ms: None,
            outcome: None,
            error: None,
            problems: Vec::new(),
        }
    }

    /// Follows a rollout's events.
    fn observe(&mut self, kind: &str, data: &Value) {
        let step = |v: &Value| v.as_u64().and_then(|s| usize::try_from(s).ok());
        match kind {
            "start" => {
                self.step = 0;
                self.error = None;
            }
            "resume" => {
                self.step = step(&data["step"]).unwrap_or(0);
                self.weight = data["weight"].as_u64().unwrap_or(0) as u32;
                self.error = None;
            }
            "applied" => self.weight = data["weight"].as_u64().unwrap_or(0) as u32,
            "hold" | "promote" | "complete" | "rollback" | "aborted" | "would_rollback"
            | "paused" => {
                self.last_verdict = Some(kind.to_string());
                if let Some(reason) = data["reason"].as_str() {
                    self.reason = Some(reason.to_string());
                } else if kind != "hold" {
                    // A repeated hold keeps the reason last printed; anything else has
                    // its reason in the verdict line's numbers, or none.
                    self.reason = None;
                }
                if let Some(to) = step(&data["to_step"]) {
                    self.step = to;
                }
                self.verdict_unix_ms = Some(unix_ms());
            }
            _ => {}
        }
    }
}

fn unix_ms() -> u64 {
    u64::try_from(crate::rollout::now().as_millis()).unwrap_or(u64::MAX)
}

/// One key's entry.
struct Entry {
    /// The revision started last (None: never valid).
    revision: Option<String>,
    /// Asks its task to stop.
    stop: watch::Sender<bool>,
    /// Its supervising task (None when none was started).
    task: Option<JoinHandle<()>>,
    /// The problems last reported, so that the same ones are not reported again.
    reported_problems: Option<String>,
}

type Views = Arc<Mutex<BTreeMap<String, RolloutView>>>;

fn lock(views: &Views) -> MutexGuard<'_, BTreeMap<String, RolloutView>> {
    // A panicking rollout task may have held the lock; the table is whole either way.
    views.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Many rollouts, each in its own task.
pub struct Fleet {
    launcher: Launcher,
    output: Output,
    options: FleetOptions,
    entries: HashMap<String, Entry>,
    /// Tasks of removed keys, awaited at shutdown (and before the key runs again).
    retiring: HashMap<String, JoinHandle<()>>,
    views: Views,
}

impl Fleet {
    /// A fleet that drives each rollout with `launcher`, printing like `output` (same
    /// format and clock; each rollout gets a fork of it).
    pub fn new(launcher: Launcher, output: &Output, options: FleetOptions) -> Fleet {
        Fleet {
            launcher,
            output: output.fork(),
            options,
            entries: HashMap::new(),
            retiring: HashMap::new(),
            views: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// Starts driving `key` with `spec`. The same revision again does nothing (a finished
    /// rollout stays finished); a new revision is a new release: the running task is
    /// stopped (it saves its record) and the new one starts once it has.
    pub fn apply(&mut self, key: &str, spec: RolloutSpec) {
        self.prune();
        if let Some(entry) = self.entries.get_mut(key) {
            if entry.reported_problems.take().is_some() {
                if let Some(view) = lock(&self.views).get_mut(key) {
                    view.problems.clear();
                }
            }
            if entry.revision.as_deref() == Some(spec.revision.as_str()) {
                return;
            }
        }
        let previous = match self.entries.remove(key) {
            Some(entry) => {
                let _ = entry.stop.send(true);
                entry.task.or_else(|| self.retiring.remove(key))
            }
            None => self.retiring.remove(key),
        };
        let (stop, stop_rx) = watch::channel(false);
        {
            let mut views = lock(&self.views);
            let view = views
                .entry(key.to_string())
                .or_insert_with(|| RolloutView::new(key));
            *view = RolloutView {
                revision: spec.revision.clone(),
                steps: spec.judge.steps.len(),
                ..RolloutView::new(key)
            };
        }
        let revision = spec.revision.clone();
        let supervisor = Supervisor {
            key: key.to_string(),
            spec,
            launcher: Arc::clone(&self.launcher),
            output: self.output.fork(),
            options: self.options.clone(),
            views: Arc::clone(&self.views),
            stop: stop_rx,
        };
        let task = tokio::spawn(supervisor.run(previous));
        self.entries.insert(
            key.to_string(),
            Entry {
                revision: Some(revision),
                stop,
                task: Some(task),
                reported_problems: None,
            },
        );
    }

    /// Stops driving `key`; its record stays where the sink keeps it.
    pub fn remove(&mut self, key: &str) {
        self.prune();
        if let Some(entry) = self.entries.remove(key) {
            let _ = entry.stop.send(true);
            if let Some(task) = entry.task {
                self.retiring.insert(key.to_string(), task);
            }
        }
        lock(&self.views).remove(key);
    }

    /// `key`'s input is invalid: reported once per distinct set of problems (with the
    /// key), and not driven. A rollout already running from an earlier valid revision
    /// keeps running (a bad edit must not strand a canary half-way); the next valid input
    /// is applied as usual.
    pub fn invalid(&mut self, key: &str, problems: &ConfigErrors) {
        let text = problems.to_string();
        let entry = self
            .entries
            .entry(key.to_string())
            .or_insert_with(|| Entry {
                revision: None,
                stop: watch::channel(false).0,
                task: None,
                reported_problems: None,
            });
        if entry.reported_problems.as_deref() == Some(text.as_str()) {
            return;
        }
        entry.reported_problems = Some(text.clone());
        let never_driven = entry.revision.is_none();
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        {
            let mut views = lock(&self.views);
            let view = views
                .entry(key.to_string())
                .or_insert_with(|| RolloutView::new(key));
            view.problems = lines.clone();
            if never_driven {
                view.activity = Activity::Invalid;
            }
        }
        let mut out = rollout_output(&self.output, key, &self.options, None);
        // A labelled line names the key already.
        let message = if self.options.label_lines {
            text.replace('\n', "; ")
        } else {
            format!("{}: {}", key, text.replace('\n', "; "))
        };
        out.event("invalid", message, json!({"file": key, "problems": lines}));
    }

    /// The keys the fleet knows (driven, finished or invalid).
    pub fn keys(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// What each rollout is doing now, ordered by key.
    pub fn snapshot(&self) -> Vec<RolloutView> {
        lock(&self.views).values().cloned().collect()
    }

    /// A handle on the same table as [`Fleet::snapshot`], for readers in other tasks
    /// (the `/metrics` server).
    pub fn views(&self) -> FleetViews {
        FleetViews(Arc::clone(&self.views))
    }

    /// Stops everything and waits until each running rollout has saved its record.
    pub async fn shutdown(mut self) {
        for entry in self.entries.values() {
            let _ = entry.stop.send(true);
        }
        let tasks: Vec<JoinHandle<()>> = self
            .entries
            .drain()
            .filter_map(|(_, entry)| entry.task)
            .chain(self.retiring.drain().map(|(_, task)| task))
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Forgets retired tasks that have ended.
    fn prune(&mut self) {
        self.retiring.retain(|_, task| !task.is_finished());
    }
}

/// A read-only handle on a fleet's [`RolloutView`]s.
#[derive(Clone)]
pub struct FleetViews(Views);

impl FleetViews {
    /// What each rollout is doing now, ordered by key.
    pub fn snapshot(&self) -> Vec<RolloutView> {
        lock(&self.0).values().cloned().collect()
    }
}

/// A rollout's output: forked from the fleet's, labelled if asked, observed by the view
/// table and the hook.
fn rollout_output(
    base: &Output,
    key: &str,
    options: &FleetOptions,
    views: Option<&Views>,
) -> Output {
    let mut out = base.fork();
    if options.label_lines {
        out = out.with_label(key);
    }
    let hook = options.hook.clone();
    let views = views.cloned();
    if hook.is_none() && views.is_none() {
        return out;
    }
    let key = key.to_string();
    out.with_observer(Box::new(move |kind, data| {
        if let Some(views) = &views {
            if let Some(view) = lock(views).get_mut(&key) {
                view.observe(kind, data);
            }
        }
        if let Some(hook) = &hook {
            hook(&key, kind, data);
        }
    }))
}

/// Drives one revision of one rollout: runs it in a task of its own, and retries it
/// with backoff when it fails or panics, until it ends or is stopped.
struct Supervisor {
    key: String,
    spec: RolloutSpec,
    launcher: Launcher,
    output: Output,
    options: FleetOptions,
    views: Views,
    stop: watch::Receiver<bool>,
}

impl Supervisor {
    async fn run(self, previous: Option<JoinHandle<()>>) {
        // The earlier release saves its record and releases its claim first.
        if let Some(previous) = previous {
            let _ = previous.await;
        }
        let mut out = rollout_output(&self.output, &self.key, &self.options, Some(&self.views));
        let mut delay = self.options.retry_first;
        loop {
            if *self.stop.borrow() {
                self.set_activity(Activity::Stopped);
                return;
            }
            self.set_activity(Activity::Running);
            let rollout_out =
                rollout_output(&self.output, &self.key, &self.options, Some(&self.views));
            let task = tokio::spawn((self.launcher)(
                self.spec.clone(),
                rollout_out,
                StopSignal(self.stop.clone()),
            ));
            let failure = match task.await {
                Ok(Ok(outcome)) => {
                    self.finished(&mut out, &outcome);
                    return;
                }
                Ok(Err(RunError::Interrupted { step })) => {
                    self.set_activity(Activity::Stopped);
                    out.event(
                        "stopped",
                        format!("stopped at step {}; the next start resumes", step + 1),
                        json!({"step": step}),
                    );
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(join) if join.is_panic() => {
                    format!(
                        "the rollout's task panicked: {}",
                        panic_text(join.into_panic())
                    )
                }
                // Cancelled: only the runtime shutting down does that.
                Err(_) => return,
            };
            {
                let mut views = lock(&self.views);
                if let Some(view) = views.get_mut(&self.key) {
                    view.activity = Activity::Retrying;
                    view.error = Some(failure.clone());
                }
            }
            out.event(
                "error",
                format!("{}; retrying in {:?}", failure, delay),
                json!({"error": failure, "retry_in_s": delay.as_secs_f64()}),
            );
            if wait_or_stop(&self.stop, delay).await {
                self.set_activity(Activity::Stopped);
                return;
            }
            delay = (delay * 2).min(self.options.retry_max.max(self.options.retry_first));
        }
    }

    fn set_activity(&self, activity: Activity) {
        if let Some(view) = lock(&self.views).get_mut(&self.key) {
            view.activity = activity;
        }
    }

    fn finished(&self, out: &mut Output, outcome: &Outcome) {
        let kind = match outcome {
            Outcome::Promoted => "promoted",
            Outcome::RolledBack(_) => "rolled_back",
            Outcome::Aborted => "aborted",
        };
        if let Some(view) = lock(&self.views).get_mut(&self.key) {
            view.activity = Activity::Finished;
            view.outcome = Some(format!("{:?}", outcome));
            view.error = None;
        }
        out.event(
            "finished",
            format!(
                "rollout finished: {:?}; waiting for a new revision of the spec",
                outcome
            ),
            json!({"outcome": format!("{:?}", outcome), "outcome_kind": kind}),
        );
    }
}

/// The message a panic carried.
fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Sleeps `delay`; true when asked to stop meanwhile.
async fn wait_or_stop(stop: &watch::Receiver<bool>, delay: Duration) -> bool {
    let mut waiting = stop.clone();
    tokio::select! {
        _ = waiting.wait_for(|s| *s) => true,
        _ = tokio::time::sleep(delay) => *stop.borrow(),
    }
}
