//! Driving one rollout: read metrics, judge, apply, persist — one tick at a time.
//!
//! Side effects live here; the decision does not (it is [`crate::verdict::judge`]). The
//! record written with every step is what makes a restart resume at the same step, and
//! the sink's claim is what keeps a second controller from writing.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::control::{self, Acknowledgement, Command, MarkKind};
use crate::hooks::{self, Hooks, Moment};
use crate::notify::Relay;
use crate::output::Output;
use crate::sink::{ConfigSink, Record, RolloutId, SinkError};
use crate::source::{MetricSource, Query, Snapshot};
use crate::spec::webhooks::WebhookKind;
use crate::spec::RolloutSpec;
use crate::verdict::{
    self, Counters, HoldReason, NoDataCause, Observation, Phase, RollbackReason, Verdict,
};

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

/// The engine's clock: wall-clock time since the Unix epoch, read once when the process
/// first asks, then advanced by the monotonic clock.
///
/// Wall-clock time is what makes a persisted step clock mean the same after a restart; the
/// monotonic clock is what keeps a wall-clock step while the controller runs (an NTP
/// correction, a VM resumed, an operator's `date -s`) from counting as time spent in a
/// step: a jump forward would otherwise satisfy `step_min_duration` and `no_data_timeout`
/// at once, and a jump back would hold a step until the clock caught up.
pub fn now() -> Duration {
    static ANCHOR: OnceLock<(Duration, Instant)> = OnceLock::new();
    let (wall, monotonic) = ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        (wall, Instant::now())
    });
    *wall + monotonic.elapsed()
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
    // The source's last error, so that a change of failure is reported (once) as well.
    let mut source_error: Option<String> = None;
    let mut save_failing = false;
    // Set when the counters went down (a proxy restarted): until the proxies are confirmed
    // to run the current step again, nothing is promoted.
    let mut reconfirm_pending = false;
    let mut last_numbers = Value::Null;
    loop {
        tokio::select! {
            _ = &mut stop => {
                sink.save(&record).await?;
                return Err(RunError::Interrupted { step: record.state.step });
            }
            _ = ticker.tick() => {}
        }
        let marks = sink.operator_marks().await?;
        if marks.abort {
            out.event(
                "aborted",
                "aborted by an operator; the canary is at 0 %".to_string(),
                json!({}),
            );
            let mut ended = aborted_record(sink, &record).await;
            return finish(sink, out, &mut ended, hooks, Outcome::Aborted, last_numbers).await;
        }
        if reconfirm_pending {
            reconfirm_pending = !reconfirm(spec, sink, out, &mut record, &mut save_failing).await;
        }
        if let Some(ack) =
            record
                .control
                .follow_pause_mark(marks.pause.as_deref(), record.state.step, unix_ms())
        {
            report_command(out, &ack, record.state.current_weight(steps));
            last_hold.clear();
            record.updated_unix_ms = unix_ms();
            save_reporting(sink, out, &record, &mut save_failing).await;
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
                if source_error.take().is_some() {
                    out.event("source", "metrics readable again".to_string(), json!({}));
                }
                Some(s)
            }
            Err(e) => {
                let error = e.to_string();
                if source_error.as_deref() != Some(error.as_str()) {
                    out.event(
                        "source",
                        format!("cannot read metrics ({}); holding", error),
                        json!({"error": error}),
                    );
                }
                source_error = Some(error);
                None
            }
        };
        let at = now();
        let seen = observation(spec, at, snapshot.as_ref());
        let (mut next, mut verdict) = verdict::judge(&spec.judge, &record.state, &seen);
        // An operator's promote request: read once, removed, acted on (or refused) now.
        let mut promoted_by: Option<String> = None;
        if let Some(request) = marks.promote {
            sink.set_operator_mark(MarkKind::Promote, None).await?;
            let forced = control::is_forced(&request);
            let step = record.state.step;
            let (accepted, detail) = match control::promote_allowed(forced, &verdict) {
                Err(why) => (false, why),
                Ok(()) => match &verdict {
                    Verdict::Promote { .. } | Verdict::Complete { .. } => (
                        true,
                        "the step passed on its own evidence at this tick".to_string(),
                    ),
                    _ => {
                        // Skip from the state with this tick's evidence in it (a forced
                        // skip past a rollback verdict keeps the rollout going).
                        let mut base = next.clone();
                        base.phase = Phase::Progressing;
                        (next, verdict) = verdict::skip_step(&spec.judge, &base, at);
                        (true, verdict.reason_text())
                    }
                },
            };
            let ack = Acknowledgement {
                command: Command::Promote,
                request: request.clone(),
                accepted,
                forced: forced && accepted,
                detail,
                step,
                unix_ms: unix_ms(),
            };
            report_command(out, &ack, record.state.current_weight(steps));
            record.control.acknowledge(ack);
            if accepted {
                promoted_by = Some(request);
            }
        }
        let numbers = serde_json::to_value(verdict.numbers()).unwrap_or(Value::Null);
        last_numbers = numbers.clone();
        // Paused, or a dry run's rollback: the verdict is reported and recorded, not
        // applied; the canary keeps its weight.
        let paused = record.control.paused.clone();
        let suppressed = match (&verdict, &paused) {
            (Verdict::Hold { .. }, _) => None,
            _ if promoted_by.is_some() => None,
            (Verdict::Rollback { reason, .. }, Some(paused)) => Some(format!(
                "paused by {:?}: would roll back: {}",
                paused.request, reason
            )),
            (_, Some(paused)) => Some(format!(
                "paused by {:?}: would promote: {}",
                paused.request,
                verdict.reason_text()
            )),
            (Verdict::Rollback { reason, .. }, None) if spec.dry_run => {
                Some(format!("would roll back: {}", reason))
            }
            _ => None,
        };
        if let Some(what) = suppressed {
            let dry_run_rollback = matches!(verdict, Verdict::Rollback { .. }) && spec.dry_run;
            if let Verdict::Rollback { reason, .. } = &verdict {
                if spec.dry_run {
                    record.control.note_would_roll_back(
                        &reason.to_string(),
                        record.state.step,
                        unix_ms(),
                    );
                }
            }
            if paused.is_none() {
                // A dry run goes on with this tick's evidence (its rollback evidence
                // included, so the step passes only if the evidence itself recovers).
                next.phase = Phase::Progressing;
                next.reason = what.clone();
                record.state = next;
            } else {
                // Paused: the state stays as it was, so the evidence since then counts
                // at the first tick after `resume`.
                record.state.reason = what.clone();
            }
            let kind = if dry_run_rollback {
                "would_rollback"
            } else {
                "paused"
            };
            if what != last_hold || at.saturating_sub(last_hold_at) >= Duration::from_secs(10) {
                out.event(
                    kind,
                    format!(
                        "{} (canary stays at {} %) | {}",
                        what,
                        record.state.current_weight(steps),
                        verdict.numbers()
                    ),
                    json!({
                        "verdict": verdict_word(&verdict),
                        "reason": verdict.reason_text(),
                        "dry_run": spec.dry_run,
                        "paused": paused.is_some(),
                        "applied": false,
                        "numbers": numbers,
                    }),
                );
                last_hold = what;
                last_hold_at = at;
            } else {
                out.notify(
                    kind,
                    &json!({"verdict": verdict_word(&verdict), "dry_run": spec.dry_run}),
                );
            }
            record.updated_unix_ms = unix_ms();
            save_reporting(sink, out, &record, &mut save_failing).await;
            continue;
        }
        // Gates are asked only for a promotion that would be applied (a proxy that
        // restarted and is not confirmed yet holds it anyway).
        let gated = promotion(&verdict, steps).filter(|_| !reconfirm_pending);
        if let Some((held, to_weight)) = gated {
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
                save_reporting(sink, out, &record, &mut save_failing).await;
                continue;
            }
            record.hooks.held_by = None;
        }
        match &verdict {
            Verdict::Hold { .. } => {
                record.state = next;
                let line = match &paused {
                    Some(p) => format!("(paused by {:?}) {}", p.request, verdict),
                    None => verdict.to_string(),
                };
                let reason = verdict.reason_text();
                // One line when the reason changes, and a progress line every 10 s; the
                // observer (metrics) sees every hold.
                if reason != last_hold || at.saturating_sub(last_hold_at) >= Duration::from_secs(10)
                {
                    out.event(
                        "hold",
                        line,
                        json!({"verdict": "hold", "reason": reason, "paused": paused.is_some(), "numbers": numbers}),
                    );
                    last_hold = reason;
                    last_hold_at = at;
                } else {
                    out.notify("hold", &json!({"verdict": "hold"}));
                }
                record.updated_unix_ms = unix_ms();
                save_reporting(sink, out, &record, &mut save_failing).await;
                if matches!(
                    verdict,
                    Verdict::Hold {
                        reason: HoldReason::NoData {
                            cause: NoDataCause::CounterReset,
                            ..
                        },
                        ..
                    }
                ) {
                    out.event(
                        "restart",
                        format!(
                            "counters went down: a proxy restarted; checking that it runs step {} ({} %)",
                            record.state.step + 1,
                            record.state.current_weight(steps)
                        ),
                        json!({"step": record.state.step, "weight": record.state.current_weight(steps)}),
                    );
                    reconfirm_pending =
                        !reconfirm(spec, sink, out, &mut record, &mut save_failing).await;
                }
            }
            Verdict::Promote { .. } | Verdict::Complete { .. } if reconfirm_pending => {
                // The evidence is there, but a proxy that restarted has not confirmed the
                // step's policy yet: what it serves is unknown, so the step is not over.
                // The engine's new state is dropped; the next tick's deltas cover this one.
                out.event(
                    "hold",
                    format!(
                        "not promoting: step {} is not confirmed by every proxy since a restart",
                        record.state.step + 1
                    ),
                    json!({"verdict": "hold", "reason": "step not confirmed since a proxy restarted", "numbers": numbers}),
                );
            }
            Verdict::Promote { to_step, .. } => {
                out.event(
                    "promote",
                    operator_line(&verdict, promoted_by.as_deref()),
                    with_operator(
                        json!({"verdict": "promote", "to_step": to_step, "numbers": numbers}),
                        promoted_by.as_deref(),
                    ),
                );
                let previous = std::mem::replace(&mut record.state, next);
                if let Err(e) = apply(spec, sink, out, &mut record, steps[*to_step]).await {
                    // Not applied: stay at the old step and try again at the next tick
                    // (an operator's request too: its mark goes back).
                    out.event(
                        "error",
                        format!("promotion not applied: {}", e),
                        json!({"error": e.to_string()}),
                    );
                    record.state = previous;
                    if let Some(request) = &promoted_by {
                        sink.set_operator_mark(MarkKind::Promote, Some(request))
                            .await?;
                    }
                    continue;
                }
                record.state.restart_step_clock(now());
                save_reporting(sink, out, &record, &mut save_failing).await;
                last_hold.clear();
            }
            Verdict::Complete { .. } => {
                out.event(
                    "complete",
                    operator_line(&verdict, promoted_by.as_deref()),
                    with_operator(
                        json!({"verdict": "complete", "numbers": numbers}),
                        promoted_by.as_deref(),
                    ),
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

/// After a proxy restarted: confirms that the proxies run the current step's policy, and
/// applies it again when they do not (a proxy that came back with an older or a default
/// configuration). Applied again, the step's clock and tallies restart once it is
/// confirmed: the traffic since the restart was not at the step's weight, and neither it
/// nor the gap counts towards a promotion. Whether the step is confirmed; when not, the
/// caller asks again at the next tick and promotes nothing until then.
async fn reconfirm<K: ConfigSink>(
    spec: &RolloutSpec,
    sink: &K,
    out: &mut Output,
    record: &mut Record,
    save_failing: &mut bool,
) -> bool {
    let weight = record.state.current_weight(&spec.judge.steps);
    let step = record.state.step + 1;
    match sink.is_live(record).await {
        Ok(true) => {
            out.event(
                "confirmed",
                format!(
                    "step {} ({} %, version {}) confirmed: the proxies run it",
                    step, weight, record.generation
                ),
                json!({"step": record.state.step, "weight": weight, "generation": record.generation}),
            );
            return true;
        }
        Ok(false) => {}
        Err(e) => {
            out.event(
                "error",
                format!(
                    "step {} ({} %) not confirmed yet ({}); not promoting until it is",
                    step, weight, e
                ),
                json!({"error": e.to_string()}),
            );
            return false;
        }
    }
    match apply(spec, sink, out, record, weight).await {
        Ok(()) => {
            record.state.restart_step_clock(now());
            save_reporting(sink, out, record, save_failing).await;
            true
        }
        Err(e) => {
            out.event(
                "error",
                format!(
                    "step {} ({} %) not applied again yet ({}); not promoting until it is",
                    step, weight, e
                ),
                json!({"error": e.to_string()}),
            );
            false
        }
    }
}

/// Saves the record; a failure (a full or read-only disk) is reported when it starts and
/// when it ends, and does not stop the rollout: the record is saved again at every tick,
/// and the policy already written keeps serving.
async fn save_reporting<K: ConfigSink>(
    sink: &K,
    out: &mut Output,
    record: &Record,
    failing: &mut bool,
) {
    match sink.save(record).await {
        Ok(()) => {
            if *failing {
                out.event(
                    "saved",
                    "the rollout record is saved again".to_string(),
                    json!({}),
                );
            }
            *failing = false;
        }
        Err(e) => {
            if !*failing {
                out.event(
                    "error",
                    format!(
                        "cannot save the rollout record ({}); retrying at every tick",
                        e
                    ),
                    json!({"error": e.to_string()}),
                );
            }
            *failing = true;
        }
    }
}

/// The verdict's kind in one word, as the JSON output names it.
fn verdict_word(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Hold { .. } => "hold",
        Verdict::Promote { .. } => "promote",
        Verdict::Complete { .. } => "complete",
        Verdict::Rollback { .. } => "rollback",
    }
}

/// A promotion's line, naming the operator's request when it was one.
fn operator_line(verdict: &Verdict, request: Option<&str>) -> String {
    match request {
        Some(request) => format!("{} (operator: {:?})", verdict, request),
        None => verdict.to_string(),
    }
}

/// A promotion's JSON data, with `"operator": <request>` when an operator asked for it.
fn with_operator(mut data: Value, request: Option<&str>) -> Value {
    if let (Some(request), Some(fields)) = (request, data.as_object_mut()) {
        fields.insert("operator".to_string(), Value::String(request.to_string()));
    }
    data
}

/// One line for an acknowledged command.
fn report_command(out: &mut Output, ack: &Acknowledgement, weight: u32) {
    let verb = match (ack.command, ack.accepted) {
        (_, false) => "refused",
        (_, true) => "acknowledged",
    };
    out.event(
        "command",
        format!(
            "{} {} ({:?}{}) at step {}, canary at {} %: {}",
            ack.command.name(),
            verb,
            ack.request,
            if ack.forced { ", forced" } else { "" },
            ack.step + 1,
            weight,
            ack.detail
        ),
        json!({
            "command": ack.command,
            "request": ack.request,
            "accepted": ack.accepted,
            "forced": ack.forced,
            "detail": ack.detail,
            "step": ack.step,
        }),
    );
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
    // The generation grows even when the write fails: a version that may have reached a
    // proxy is never reused for another weight.
    record.generation += 1;
    let applied_before = record.applied_weight;
    record.applied_weight = weight;
    record.updated_unix_ms = unix_ms();
    let started = std::time::Instant::now();
    if let Err(e) = sink.apply(&policy, record).await {
        record.applied_weight = applied_before;
        return Err(e.into());
    }
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
