//! Driving one rollout: read metrics, judge, apply, persist — one tick at a time.
//!
//! Side effects live here; the decision does not (it is [`crate::verdict::judge`]). The
//! record written with every step is what makes a restart resume at the same step, and
//! the sink's claim is what keeps a second controller from writing.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::hooks::{self, Hooks, Moment};
use crate::notify::Relay;
use crate::output::Output;
use crate::sink::{ConfigSink, Record, RolloutId, SinkError};
use crate::source::{MetricSource, Query, Snapshot};
use crate::spec::webhooks::WebhookKind;
use crate::spec::RolloutSpec;
use crate::verdict::{self, Counters, Observation, Phase, RollbackReason, Verdict};

/// How a rollout ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The canary takes 100 %.
    Promoted,
    /// The canary was rolled back to 0 % by the verdict.
    RolledBack(String),
    /// An operator aborted it (`meshcanary abort`); the canary is at 0 %.
    Aborted,
}

impl Outcome {
    /// The CLI's exit code: 0 promoted, 3 rolled back or aborted.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Promoted => 0,
            Outcome::RolledBack(_) | Outcome::Aborted => 3,
        }
    }
}

/// Why a rollout could not be driven.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The sink failed in a way retrying will not fix.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The saved record belongs to another rollout.
    #[error(
        "the saved record is for rollout {found:?}, not {expected:?}; remove it to start this one"
    )]
    OtherRollout {
        /// The record's rollout.
        found: Box<RolloutId>,
        /// This spec's rollout.
        expected: Box<RolloutId>,
    },
    /// The policy cannot be rendered for a weight.
    #[error("cannot render the policy: {0}")]
    Render(String),
    /// Stopped by a signal; the record is saved and `run` resumes it.
    #[error("stopped by a signal at step {step}; run again to resume")]
    Interrupted {
        /// The step the rollout is at.
        step: usize,
    },
}

/// Wall-clock time since the Unix epoch: the engine's clock, so that persisted step
/// clocks mean the same after a restart.
pub fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn unix_ms() -> u64 {
    u64::try_from(now().as_millis()).unwrap_or(u64::MAX)
}

/// The rollout's identity, from the spec.
pub fn rollout_id(spec: &RolloutSpec) -> RolloutId {
    spec.id()
}

/// The policy document at a canary weight.
pub fn policy_at(spec: &RolloutSpec, weight: u32) -> Result<Value, RunError> {
    spec.policy_at(weight).map_err(RunError::Render)
}

/// What the source is asked for.
pub fn query(spec: &RolloutSpec) -> Query {
    let mut variants = vec![spec.canary.clone()];
    variants.extend(spec.baseline());
    Query {
        policy: spec.policy.name.clone(),
        variants,
        latency_threshold_ms: u64::from(spec.judge.analysis.latency_threshold_ms),
    }
}

/// The engine's observation from a snapshot: the canary, and the baseline summed.
pub fn observation(spec: &RolloutSpec, at: Duration, snapshot: Option<&Snapshot>) -> Observation {
    let snapshot = match snapshot {
        Some(s) => s,
        None => {
            return Observation {
                now: at,
                canary: None,
                baseline: None,
            }
        }
    };
    let counters = |names: &[String]| {
        let (mut responses, mut errors, mut slow) = (0, 0, 0);
        for name in names {
            if let Some(c) = snapshot.variants.get(name) {
                responses += c.responses;
                errors += c.errors;
                slow += c.slow;
            }
        }
        Counters::new(responses, errors, slow)
    };
    Observation {
        now: at,
        canary: Some(counters(std::slice::from_ref(&spec.canary))),
        baseline: Some(counters(&spec.baseline())),
    }
}

/// Drives a rollout to its end. `stop` resolves when the process is asked to stop.
///
/// A saved record of an earlier revision of the same rollout that has not finished is
/// refused ([`RunError::OtherRollout`]): see [`run_release`] for the rule of a controller
/// that watches its specs change.
pub async fn run<S, K>(
    spec: &RolloutSpec,
    source: &S,
    sink: &K,
    out: &mut Output,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Outcome, RunError>
where
    S: MetricSource,
    K: ConfigSink,
{
    drive(spec, source, sink, out, stop, false).await
}

/// Like [`run`], for a controller that drives whatever revision its spec has now
/// (`serve DIR`): a saved, unfinished record of an earlier revision of the same rollout
/// (same policy, rule and canary) is superseded — this revision is a new release and
/// starts at its first step, as a finished one's would.
pub async fn run_release<S, K>(
    spec: &RolloutSpec,
    source: &S,
    sink: &K,
    out: &mut Output,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Outcome, RunError>
where
    S: MetricSource,
    K: ConfigSink,
{
    drive(spec, source, sink, out, stop, true).await
}

/// Drives the rollout with its webhooks, relaying its events to its `event` hooks and
/// notification targets until it ends (see [`crate::hooks`], [`crate::notify`]).
async fn drive<S, K>(
    spec: &RolloutSpec,
    source: &S,
    sink: &K,
    out: &mut Output,
    stop: impl std::future::Future<Output = ()>,
    supersede: bool,
) -> Result<Outcome, RunError>
where
    S: MetricSource,
    K: ConfigSink,
{
    let name = out
        .label()
        .map_or_else(|| spec.policy.name.clone(), str::to_string);
    let mut hooks = Hooks::new(spec, &name);
    let relay = Relay::start(spec, &name, out);
    let result = drive_hooked(spec, source, sink, out, stop, supersede, &mut hooks).await;
    if let Some(relay) = relay {
        relay.close(out).await;
    }
    result
}

async fn drive_hooked<S, K>(
    spec: &RolloutSpec,
    source: &S,
    sink: &K,
    out: &mut Output,
    stop: impl std::future::Future<Output = ()>,
    supersede: bool,
    hooks: &mut Hooks,
) -> Result<Outcome, RunError>
where
    S: MetricSource,
    K: ConfigSink,
{
    tokio::pin!(stop);
    let _claim = sink.claim().await?;
    let id = rollout_id(spec);
    let steps = &spec.judge.steps;
    let saved = match sink.load().await? {
        // A finished rollout of an earlier revision of this spec: this is a new release.
        Some(record)
            if record.rollout.revision != id.revision
                && record.rollout.same_target(&id)
                && finished(&record).is_some() =>
        {
            None
        }
        Some(record)
            if supersede
                && record.rollout.revision != id.revision
                && record.rollout.same_target(&id) =>
        {
            out.event(
                "superseded",
                format!(
                    "revision {} replaces revision {} at step {}: a new release starts",
                    id.revision,
                    record.rollout.revision,
                    record.state.step + 1
                ),
                json!({"revision": id.revision, "previous_revision": record.rollout.revision, "previous_step": record.state.step}),
            );
            None
        }
        other => other,
    };
    let mut record = match saved {
        Some(record) if record.rollout != id => {
            return Err(RunError::OtherRollout {
                found: Box::new(record.rollout),
                expected: Box::new(id),
            })
        }
        Some(mut record) => {
            // Before the `pre-rollout` gate passed, the canary is still at 0 %.
            let weight = if hooks::waits_for_pre_rollout(&record) {
                record.applied_weight
            } else {
                record.state.current_weight(steps)
            };
            out.event(
                "resume",
                format!(
                    "resuming {} at step {} ({} %), phase {:?}",
                    id.policy,
                    record.state.step + 1,
                    weight,
                    record.state.phase
                ),
                json!({"step": record.state.step, "weight": weight}),
            );
            // Nobody looked while no controller ran: the no-data clock restarts now.
            record.state.last_data_at = record.state.last_data_at.max(now());
            record
        }
        None => {
            out.event(
                "start",
                format!(
                    "rollout of {:?} in {} rule {:?}: steps {:?} %, reading {}, writing {}",
                    spec.canary,
                    id.policy,
                    spec.split_rule,
                    steps,
                    source.describe(),
                    sink.describe()
                ),
                json!({"steps": steps, "canary": spec.canary, "baseline": spec.baseline()}),
            );
            Record::new(id.clone(), now())
        }
    };
    if record.generation == 0 {
        // A new rollout: an abort mark left by an earlier one does not apply to it.
        sink.set_abort_mark(false).await?;
    } else if sink.abort_marked().await? {
        record.state.abort();
    }
    if let Some(outcome) = finished(&record) {
        out.event(
            "finished",
            format!("already finished: {:?}", outcome),
            json!({"outcome": format!("{:?}", outcome)}),
        );
        // Its end's hooks, if a crash (or an abort with no controller running) came
        // between the end and them.
        return finish(sink, out, &mut record, hooks, outcome, Value::Null).await;
    }
    // (Re)apply the current step's weight, so the file matches the record whatever
    // happened before; a fresh rollout's step clock starts once Envoy has it.
    let fresh = record.generation == 0;
    let gated = match pre_rollout(spec, sink, out, &mut record, hooks, &mut stop).await? {
        Gate::Passed => true,
        Gate::NotAsked => false,
        Gate::Ended(outcome) => return Ok(outcome),
    };
    let weight = record.state.current_weight(steps);
    apply(spec, sink, out, &mut record, weight).await?;
    if fresh || gated {
        record.state.restart_step_clock(now());
        if gated {
            // Time spent waiting for the gate is no time without data.
            record.state.last_data_at = record.state.last_data_at.max(now());
        }
        sink.save(&record).await?;
    }

    let query = query(spec);
    let mut ticker = tokio::time::interval(spec.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Promotion with the step's minimum time never reached: how the engine takes in an
    // interval whose promotion a gate held (the evidence counts, the step stays).
    let held_back = verdict::Spec {
        step_min_duration: Duration::MAX,
        ..spec.judge.clone()
    };
    let mut last_hold = String::new();
    let mut last_hold_at = Duration::ZERO;
    let mut last_numbers = Value::Null;
    let mut source_failing = false;
    loop {
        tokio::select! {
            _ = &mut stop => {
                sink.save(&record).await?;
                return Err(RunError::Interrupted { step: record.state.step });
            }
            _ = ticker.tick() => {}
        }
        if sink.abort_marked().await? {
            out.event(
                "aborted",
                "aborted by an operator; the canary is at 0 %".to_string(),
                json!({}),
            );
            let mut ended = aborted_record(sink, &record).await;
            return finish(sink, out, &mut ended, hooks, Outcome::Aborted, last_numbers).await;
        }
        let interval_hooks = if hooks.has(WebhookKind::Rollout) {
            let moment = Moment {
                numbers: last_numbers.clone(),
                ..Moment::of(&record)
            };
            let called = hooks.counted(WebhookKind::Rollout, &mut record.hooks, &moment, out);
            let Some(counted) = unless_stopped(called, &mut stop).await else {
                sink.save(&record).await?;
                return Err(RunError::Interrupted {
                    step: record.state.step,
                });
            };
            if let Some(why) = counted.exhausted {
                return roll_back_for_hook(spec, sink, out, &mut record, hooks, why, last_numbers)
                    .await;
            }
            counted.failing
        } else {
            None
        };
        let snapshot = match source.read(&query).await {
            Ok(s) => {
                if source_failing {
                    out.event("source", "metrics readable again".to_string(), json!({}));
                }
                source_failing = false;
                Some(s)
            }
            Err(e) => {
                if !source_failing {
                    out.event(
                        "source",
                        format!("cannot read metrics ({}); holding", e),
                        json!({"error": e.to_string()}),
                    );
                }
                source_failing = true;
                None
            }
        };
        let at = now();
        let seen = observation(spec, at, snapshot.as_ref());
        let (next, verdict) = verdict::judge(&spec.judge, &record.state, &seen);
        let numbers = serde_json::to_value(verdict.numbers()).unwrap_or(Value::Null);
        last_numbers = numbers.clone();
        if let Some((held, to_weight)) = promotion(&verdict, steps) {
            let why = match interval_hooks {
                Some(failing) => Some(failing),
                None if hooks.has(WebhookKind::ConfirmPromotion) => {
                    let moment = Moment {
                        next_weight: Some(to_weight),
                        verdict: Some(held.to_string()),
                        reason: verdict.reason_text(),
                        numbers: numbers.clone(),
                        ..Moment::of(&record)
                    };
                    let asked = hooks.confirm(&moment, out);
                    let Some(answer) = unless_stopped(asked, &mut stop).await else {
                        sink.save(&record).await?;
                        return Err(RunError::Interrupted {
                            step: record.state.step,
                        });
                    };
                    answer.err()
                }
                None => None,
            };
            if let Some(why) = why {
                // Held: this interval's evidence is taken in as for any hold; the step stays.
                let (state, _) = verdict::judge(&held_back, &record.state, &seen);
                record.state = state;
                record.state.reason = why.clone();
                record.hooks.held_by = Some(why.clone());
                if why != last_hold || at.saturating_sub(last_hold_at) >= Duration::from_secs(10) {
                    out.event(
                        "hold",
                        format!("HOLD: {} — {}", why, verdict),
                        json!({"verdict": "hold", "reason": why, "held": held, "to_weight": to_weight, "numbers": numbers}),
                    );
                    last_hold = why;
                    last_hold_at = at;
                } else {
                    out.notify("hold", &json!({"verdict": "hold"}));
                }
                record.updated_unix_ms = unix_ms();
                sink.save(&record).await?;
                continue;
            }
            record.hooks.held_by = None;
        }
        match &verdict {
            Verdict::Hold { .. } => {
                record.state = next;
                let line = verdict.to_string();
                let reason = verdict.reason_text();
                // One line when the reason changes, and a progress line every 10 s; the
                // observer (metrics) sees every hold.
                if reason != last_hold || at.saturating_sub(last_hold_at) >= Duration::from_secs(10)
                {
                    out.event(
                        "hold",
                        line,
                        json!({"verdict": "hold", "reason": reason, "numbers": numbers}),
                    );
                    last_hold = reason;
                    last_hold_at = at;
                } else {
                    out.notify("hold", &json!({"verdict": "hold"}));
                }
                record.updated_unix_ms = unix_ms();
                sink.save(&record).await?;
            }
            Verdict::Promote { to_step, .. } => {
                out.event(
                    "promote",
                    verdict.to_string(),
                    json!({"verdict": "promote", "to_step": to_step, "numbers": numbers}),
                );
                let previous = std::mem::replace(&mut record.state, next);
                if let Err(e) = apply(spec, sink, out, &mut record, steps[*to_step]).await {
                    // Not applied: stay at the old step and try again at the next tick.
                    out.event(
                        "error",
                        format!("promotion not applied: {}", e),
                        json!({"error": e.to_string()}),
                    );
                    record.state = previous;
                    continue;
                }
                record.state.restart_step_clock(now());
                sink.save(&record).await?;
                last_hold.clear();
            }
            Verdict::Complete { .. } => {
                out.event(
                    "complete",
                    verdict.to_string(),
                    json!({"verdict": "complete", "numbers": numbers}),
                );
                record.state = next;
                apply_until_done(spec, sink, out, &mut record, 100).await;
                return finish(sink, out, &mut record, hooks, Outcome::Promoted, numbers).await;
            }
            Verdict::Rollback { reason, .. } => {
                out.event("rollback", verdict.to_string(), json!({"verdict": "rollback", "reason": reason.to_string(), "numbers": numbers}));
                record.state = next;
                apply_until_done(spec, sink, out, &mut record, 0).await;
                let outcome = Outcome::RolledBack(reason.to_string());
                return finish(sink, out, &mut record, hooks, outcome, numbers).await;
            }
        }
    }
}

/// Whether a verdict promotes (`promote`, or `complete`), and to which weight.
fn promotion(verdict: &Verdict, steps: &[u32]) -> Option<(&'static str, u32)> {
    match verdict {
        Verdict::Promote { to_step, .. } => {
            Some(("promote", steps.get(*to_step).copied().unwrap_or(100)))
        }
        Verdict::Complete { .. } => Some(("complete", 100)),
        _ => None,
    }
}

/// Runs `work` unless a stop comes first (`None`).
async fn unless_stopped<T, F>(work: impl Future<Output = T>, stop: &mut Pin<&mut F>) -> Option<T>
where
    F: Future<Output = ()>,
{
    tokio::select! {
        _ = stop.as_mut() => None,
        done = work => Some(done),
    }
}

/// What the `pre-rollout` gate decided.
enum Gate {
    /// No `pre-rollout` hook, or it passed before (the first weight was applied).
    NotAsked,
    /// Every `pre-rollout` hook answered 2xx now: the first weight may be applied.
    Passed,
    /// The rollout ended while waiting (rolled back by the hooks, or aborted).
    Ended(Outcome),
}

/// The `pre-rollout` gate: the policy is written with the canary at 0 % (so the record,
/// and with it the hooks' failure counts, has somewhere to live), then the hooks are
/// called at every interval until each answers 2xx in the same interval; `max_failures`
/// failed intervals in a row roll back, an abort ends it.
async fn pre_rollout<K, F>(
    spec: &RolloutSpec,
    sink: &K,
    out: &mut Output,
    record: &mut Record,
    hooks: &mut Hooks,
    stop: &mut Pin<&mut F>,
) -> Result<Gate, RunError>
where
    K: ConfigSink,
    F: Future<Output = ()>,
{
    if !hooks.has(WebhookKind::PreRollout) || !hooks::waits_for_pre_rollout(record) {
        return Ok(Gate::NotAsked);
    }
    if record.generation == 0 {
        apply(spec, sink, out, record, 0).await?;
    }
    let mut ticker = tokio::time::interval(spec.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_hold = (String::new(), Duration::ZERO);
    loop {
        if unless_stopped(ticker.tick(), stop).await.is_none() {
            sink.save(record).await?;
            return Err(RunError::Interrupted {
                step: record.state.step,
            });
        }
        if sink.abort_marked().await? {
            out.event(
                "aborted",
                "aborted by an operator before the first weight; the canary is at 0 %".to_string(),
                json!({}),
            );
            let mut ended = aborted_record(sink, record).await;
            let outcome = finish(sink, out, &mut ended, hooks, Outcome::Aborted, Value::Null);
            return outcome.await.map(Gate::Ended);
        }
        let moment = Moment::of(record);
        let called = hooks.counted(WebhookKind::PreRollout, &mut record.hooks, &moment, out);
        let Some(counted) = unless_stopped(called, stop).await else {
            sink.save(record).await?;
            return Err(RunError::Interrupted {
                step: record.state.step,
            });
        };
        if let Some(why) = counted.exhausted {
            return roll_back_for_hook(spec, sink, out, record, hooks, why, Value::Null)
                .await
                .map(Gate::Ended);
        }
        if counted.passed {
            record.hooks.pre_rollout_passed = true;
            record.hooks.held_by = None;
            sink.save(record).await?;
            return Ok(Gate::Passed);
        }
        let why = counted.failing.unwrap_or_default();
        let at = now();
        if why != last_hold.0 || at.saturating_sub(last_hold.1) >= Duration::from_secs(10) {
            out.event(
                "hold",
                format!("HOLD: {} — the first weight ({} %) waits", why, spec.judge.steps.first().copied().unwrap_or(0)),
                json!({"verdict": "hold", "reason": why, "held": "start", "to_weight": spec.judge.steps.first()}),
            );
            last_hold = (why.clone(), at);
        }
        record.state.reason = why.clone();
        record.hooks.held_by = Some(why);
        record.updated_unix_ms = unix_ms();
        sink.save(record).await?;
    }
}

/// A `pre-rollout` or `rollout` hook failed `max_failures` intervals in a row: the
/// canary goes to 0 % like any rollback.
async fn roll_back_for_hook<K: ConfigSink>(
    spec: &RolloutSpec,
    sink: &K,
    out: &mut Output,
    record: &mut Record,
    hooks: &mut Hooks,
    why: String,
    numbers: Value,
) -> Result<Outcome, RunError> {
    out.event(
        "rollback",
        format!("ROLLBACK: {} | at {} %", why, record.applied_weight),
        json!({"verdict": "rollback", "reason": why, "hook": true, "numbers": numbers}),
    );
    record.state.phase = Phase::RolledBack {
        reason: RollbackReason::Webhook,
    };
    record.state.reason = why.clone();
    apply_until_done(spec, sink, out, record, 0).await;
    finish(sink, out, record, hooks, Outcome::RolledBack(why), numbers).await
}

/// The record an operator's abort left (it applied 0 % with a newer generation than
/// this driver's), with this driver's hook state; this driver's own, aborted, if it
/// cannot be read.
async fn aborted_record<K: ConfigSink>(sink: &K, record: &Record) -> Record {
    match sink.load().await {
        Ok(Some(mut saved)) if saved.rollout == record.rollout => {
            saved.hooks = record.hooks.clone();
            saved
        }
        _ => {
            let mut own = record.clone();
            own.state.abort();
            own
        }
    }
}

/// The rollout ended: its `rollback` (after a rollback or abort) and `post-rollout`
/// hooks are called once, and that they were is saved; the outcome stands whatever they
/// or the save say.
async fn finish<K: ConfigSink>(
    sink: &K,
    out: &mut Output,
    record: &mut Record,
    hooks: &mut Hooks,
    outcome: Outcome,
    numbers: Value,
) -> Result<Outcome, RunError> {
    if !hooks.has_end_hooks() || record.hooks.end_called {
        return Ok(outcome);
    }
    let moment = Moment {
        verdict: Some(
            match outcome {
                Outcome::Promoted => "complete",
                Outcome::RolledBack(_) => "rollback",
                Outcome::Aborted => "aborted",
            }
            .to_string(),
        ),
        numbers,
        ..Moment::of(record)
    };
    hooks.at_end(&mut record.hooks, &moment, out).await;
    if let Err(e) = sink.save(record).await {
        out.event(
            "error",
            format!("the end's hooks were called; saving that failed: {}", e),
            json!({"error": e.to_string()}),
        );
    }
    Ok(outcome)
}

/// The outcome of a finished record.
pub fn finished(record: &Record) -> Option<Outcome> {
    match &record.state.phase {
        Phase::Progressing => None,
        Phase::Promoted => Some(Outcome::Promoted),
        Phase::RolledBack { reason } => Some(Outcome::RolledBack(reason.to_string())),
        Phase::Aborted => Some(Outcome::Aborted),
    }
}

/// Writes the policy at `weight` and waits for the proxies to confirm it.
async fn apply<K: ConfigSink>(
    spec: &RolloutSpec,
    sink: &K,
    out: &mut Output,
    record: &mut Record,
    weight: u32,
) -> Result<(), RunError> {
    let policy = policy_at(spec, weight)?;
    record.generation += 1;
    record.applied_weight = weight;
    record.updated_unix_ms = unix_ms();
    let started = std::time::Instant::now();
    sink.apply(&policy, record).await?;
    out.event(
        "applied",
        format!("canary at {} % (version {}), confirmed in {} ms", weight, record.generation, started.elapsed().as_millis()),
        json!({"weight": weight, "generation": record.generation, "confirm_ms": started.elapsed().as_millis()}),
    );
    Ok(())
}

/// A final weight (0 on rollback, 100 on promotion) must land: retried until it does.
async fn apply_until_done<K: ConfigSink>(
    spec: &RolloutSpec,
    sink: &K,
    out: &mut Output,
    record: &mut Record,
    weight: u32,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        match apply(spec, sink, out, record, weight).await {
            Ok(()) => return,
            Err(e) => {
                out.event(
                    "error",
                    format!(
                        "{} % not applied yet ({}); retrying in {:?}",
                        weight, e, delay
                    ),
                    json!({"error": e.to_string()}),
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// `meshcanary abort`: the canary to 0 % now, whatever a running controller is doing;
/// it sees the mark at its next tick and stops.
pub async fn abort<K: ConfigSink>(
    spec: &RolloutSpec,
    sink: &K,
    out: &mut Output,
) -> Result<(), RunError> {
    let id = rollout_id(spec);
    let mut record = match sink.load().await? {
        // Any revision of this rollout can be aborted.
        Some(r) if !r.rollout.same_target(&id) => {
            return Err(RunError::OtherRollout {
                found: Box::new(r.rollout),
                expected: Box::new(id),
            })
        }
        Some(r) => r,
        None => Record::new(id, now()),
    };
    // Mark first: a running controller stops before its next write.
    sink.set_abort_mark(true).await?;
    record.state.abort();
    apply(spec, sink, out, &mut record, 0).await
}
