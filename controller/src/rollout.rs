//! Driving one rollout: read metrics, judge, apply, persist — one tick at a time.
//!
//! Side effects live here; the decision does not (it is [`crate::verdict::judge`]). The
//! record written with every step is what makes a restart resume at the same step, and
//! the sink's claim is what keeps a second controller from writing.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::output::Output;
use crate::sink::{ConfigSink, Record, RolloutId, SinkError};
use crate::source::{MetricSource, Query, Snapshot};
use crate::spec::RolloutSpec;
use crate::verdict::{self, Counters, HoldReason, NoDataCause, Observation, Phase, Verdict};

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
            out.event(
                "resume",
                format!(
                    "resuming {} at step {} ({} %), phase {:?}",
                    id.policy,
                    record.state.step + 1,
                    record.state.current_weight(steps),
                    record.state.phase
                ),
                json!({"step": record.state.step, "weight": record.state.current_weight(steps)}),
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
        return Ok(outcome);
    }
    // (Re)apply the current step's weight, so the file matches the record whatever
    // happened before; a fresh rollout's step clock starts once Envoy has it.
    let fresh = record.generation == 0;
    let weight = record.state.current_weight(steps);
    apply(spec, sink, out, &mut record, weight).await?;
    if fresh {
        record.state.restart_step_clock(now());
        sink.save(&record).await?;
    }

    let query = query(spec);
    let mut ticker = tokio::time::interval(spec.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut last_hold = String::new();
    let mut last_hold_at = Duration::ZERO;
    // The source's last error, so that a change of failure is reported (once) as well.
    let mut source_error: Option<String> = None;
    let mut save_failing = false;
    // Set when the counters went down (a proxy restarted): until the proxies are confirmed
    // to run the current step again, nothing is promoted.
    let mut reconfirm_pending = false;
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
            return Ok(Outcome::Aborted);
        }
        if reconfirm_pending {
            reconfirm_pending = !reconfirm(spec, sink, out, &mut record, &mut save_failing).await;
        }
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
        let (next, verdict) = verdict::judge(
            &spec.judge,
            &record.state,
            &observation(spec, at, snapshot.as_ref()),
        );
        let numbers = serde_json::to_value(verdict.numbers()).unwrap_or(Value::Null);
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
                save_reporting(sink, out, &record, &mut save_failing).await;
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
                return Ok(Outcome::Promoted);
            }
            Verdict::Rollback { reason, .. } => {
                out.event("rollback", verdict.to_string(), json!({"verdict": "rollback", "reason": reason.to_string(), "numbers": numbers}));
                record.state = next;
                apply_until_done(spec, sink, out, &mut record, 0).await;
                return Ok(Outcome::RolledBack(reason.to_string()));
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
