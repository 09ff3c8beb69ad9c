//! An operator's hand on a running rollout: `meshcanary pause`, `resume` and `promote`,
//! and what the rollout's record keeps of them (and of a dry run's would-be rollbacks).
//!
//! The commands travel like `meshcanary abort`'s mark: the CLI leaves a *mark* where the
//! sink keeps the rollout (a file next to the ECDS file, an annotation on the Rollout or
//! the EnvoyFilter), apart from the record the controller rewrites every tick, and the
//! running controller reads the marks at each tick ([`crate::sink::ConfigSink::operator_marks`]).
//! It acknowledges every command in the record ([`Control::commands`]); the CLI waits for
//! that acknowledgement.
//!
//! - The pause mark is a *state*: present means paused (its text says who asked), absent
//!   means not paused. `resume` removes it. A restarted controller finds it again.
//! - The promote mark is a *request*: the controller removes it before it acts on it, so
//!   one request is acted on at most once (a controller that dies between the two loses
//!   the request rather than acting twice; the CLI then reports that no controller
//!   confirmed). Its text names the request; a first word `force` forces it.
//!
//! Everything here is pure; the driver ([`crate::rollout`]) does the I/O.

use serde::{Deserialize, Serialize};

use crate::verdict::Verdict;

/// How many acknowledged commands the record keeps (the newest).
pub const KEPT_COMMANDS: usize = 20;

/// The operator's marks on a rollout, as the sink read them at one tick.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks {
    /// `meshcanary abort`: the canary goes to 0 % and the rollout ends.
    pub abort: bool,
    /// `meshcanary pause`: the mark's text (who asked, and the request's name).
    pub pause: Option<String>,
    /// `meshcanary promote`: the request's text; a first word `force` forces it.
    pub promote: Option<String>,
}

/// A mark the CLI sets or removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkKind {
    /// The pause mark (state).
    Pause,
    /// The promote request (removed by the controller once read).
    Promote,
}

/// An operator's command, as acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Hold the current weight; verdicts are still computed and reported, not applied.
    Pause,
    /// Let the verdicts act again.
    Resume,
    /// Skip the rest of the current step's wait.
    Promote,
}

impl Command {
    /// The command's name, as typed.
    pub fn name(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Promote => "promote",
        }
    }
}

/// The controller's acknowledgement of one command, kept in the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acknowledgement {
    /// Which command.
    pub command: Command,
    /// The mark's text: who asked, and the request's name (for `resume`, the pause
    /// mark it lifted).
    pub request: String,
    /// Whether it was acted on (a promote past a failing verdict without `--force` is
    /// refused).
    pub accepted: bool,
    /// A promote past a failing verdict, by `--force`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub forced: bool,
    /// What the controller did, or why it refused, in words.
    pub detail: String,
    /// The step (index) the rollout was at when the command arrived.
    pub step: usize,
    /// When the controller acknowledged it, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

/// While paused: who asked, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    /// The pause mark's text.
    pub request: String,
    /// When the controller acknowledged the pause, in milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
}

/// A dry run's rollback verdicts that were not applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WouldRollBack {
    /// The last such verdict's reason, in words.
    pub reason: String,
    /// The step (index) it was reached at.
    pub step: usize,
    /// When the first was reached, in milliseconds since the Unix epoch.
    pub first_unix_ms: u64,
    /// When the last was reached.
    pub last_unix_ms: u64,
    /// How many evaluations reached one.
    pub count: u64,
}

/// What the record keeps of the operator's commands and of a dry run.
///
/// Every field is written, `null` included: a Rollout's record is saved by a JSON merge
/// patch of its status, where a field left out keeps its old value (a lifted pause
/// would stay). The record leaves out `control` only while it is empty, and it never
/// becomes empty again once something was acknowledged or noted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Control {
    /// Set while the rollout is paused.
    #[serde(default)]
    pub paused: Option<Paused>,
    /// The last [`KEPT_COMMANDS`] acknowledged commands, oldest first.
    #[serde(default)]
    pub commands: Vec<Acknowledgement>,
    /// `analysis.dry_run`: the rollback verdicts reached and not applied.
    #[serde(default)]
    pub would_roll_back: Option<WouldRollBack>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl Control {
    /// Nothing to keep (the record then has no `control` field at all).
    pub fn is_empty(&self) -> bool {
        self.paused.is_none() && self.commands.is_empty() && self.would_roll_back.is_none()
    }

    /// Keeps `ack`, dropping the oldest beyond [`KEPT_COMMANDS`].
    pub fn acknowledge(&mut self, ack: Acknowledgement) {
        self.commands.push(ack);
        if self.commands.len() > KEPT_COMMANDS {
            let excess = self.commands.len() - KEPT_COMMANDS;
            self.commands.drain(..excess);
        }
    }

    /// Follows the pause mark: the acknowledgement of a pause (mark new, or its text
    /// changed) or of a resume (mark gone), or `None` when nothing changed.
    pub fn follow_pause_mark(
        &mut self,
        mark: Option<&str>,
        step: usize,
        unix_ms: u64,
    ) -> Option<Acknowledgement> {
        let ack = match (mark, &self.paused) {
            (Some(text), None) => {
                self.paused = Some(Paused {
                    request: text.to_string(),
                    since_unix_ms: unix_ms,
                });
                Acknowledgement {
                    command: Command::Pause,
                    request: text.to_string(),
                    accepted: true,
                    forced: false,
                    detail:
                        "paused: the canary holds its weight; verdicts are reported, not applied"
                            .to_string(),
                    step,
                    unix_ms,
                }
            }
            (Some(text), Some(paused)) if paused.request != text => {
                let since = paused.since_unix_ms;
                self.paused = Some(Paused {
                    request: text.to_string(),
                    since_unix_ms: since,
                });
                Acknowledgement {
                    command: Command::Pause,
                    request: text.to_string(),
                    accepted: true,
                    forced: false,
                    detail: "already paused; the pause now stands for this request".to_string(),
                    step,
                    unix_ms,
                }
            }
            (None, Some(paused)) => {
                let request = paused.request.clone();
                self.paused = None;
                Acknowledgement {
                    command: Command::Resume,
                    request,
                    accepted: true,
                    forced: false,
                    detail: "resumed: verdicts act again".to_string(),
                    step,
                    unix_ms,
                }
            }
            _ => return None,
        };
        self.acknowledge(ack.clone());
        Some(ack)
    }

    /// Counts a dry run's rollback verdict that was not applied.
    pub fn note_would_roll_back(&mut self, reason: &str, step: usize, unix_ms: u64) {
        match &mut self.would_roll_back {
            Some(w) => {
                w.reason = reason.to_string();
                w.step = step;
                w.last_unix_ms = unix_ms;
                w.count += 1;
            }
            None => {
                self.would_roll_back = Some(WouldRollBack {
                    reason: reason.to_string(),
                    step,
                    first_unix_ms: unix_ms,
                    last_unix_ms: unix_ms,
                    count: 1,
                })
            }
        }
    }
}

/// Whether a promote request's text forces it: its first word is `force`.
pub fn is_forced(request: &str) -> bool {
    request
        .split(|c: char| c.is_whitespace() || c == ':' || c == ',')
        .next()
        .is_some_and(|word| word.eq_ignore_ascii_case("force"))
}

/// Whether a promote request may skip the current step's wait, given this tick's
/// verdict: never past a failing (rollback) verdict unless forced. `Err` says why not.
pub fn promote_allowed(forced: bool, verdict: &Verdict) -> Result<(), String> {
    match verdict {
        Verdict::Rollback { reason, .. } if !forced => Err(format!(
            "the current verdict is failing ({}); `meshcanary promote --force` skips it anyway",
            reason
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::{self, Observation, RollbackReason, State};
    use std::time::Duration;

    fn verdicts() -> (Verdict, Verdict) {
        let spec = verdict::Spec {
            steps: vec![10, 100],
            step_min_duration: Duration::from_secs(1),
            analysis: verdict::Analysis::default(),
        };
        let state = State::start(Duration::from_secs(1));
        let obs = Observation {
            now: Duration::from_secs(2),
            canary: None,
            baseline: None,
        };
        let (_, hold) = verdict::judge(&spec, &state, &obs);
        let rollback = Verdict::Rollback {
            reason: RollbackReason::HardGuard,
            numbers: hold.numbers().clone(),
        };
        (hold, rollback)
    }

    #[test]
    fn a_pause_mark_pauses_once_and_its_removal_resumes() {
        let mut control = Control::default();
        let ack = control
            .follow_pause_mark(Some("ops via meshcanary pause"), 1, 1000)
            .expect("a new pause is acknowledged");
        assert_eq!(
            (ack.command, ack.accepted, ack.step),
            (Command::Pause, true, 1)
        );
        assert_eq!(
            control.paused,
            Some(Paused {
                request: "ops via meshcanary pause".into(),
                since_unix_ms: 1000
            })
        );
        assert_eq!(
            control.follow_pause_mark(Some("ops via meshcanary pause"), 1, 2000),
            None,
            "the same mark again changes nothing"
        );
        let again = control
            .follow_pause_mark(Some("someone else"), 1, 3000)
            .expect("a new request is acknowledged");
        assert_eq!(again.command, Command::Pause);
        assert_eq!(
            control.paused.as_ref().map(|p| p.since_unix_ms),
            Some(1000),
            "paused since the first pause"
        );
        let resume = control
            .follow_pause_mark(None, 2, 4000)
            .expect("removal resumes");
        assert_eq!(
            (resume.command, resume.request.as_str()),
            (Command::Resume, "someone else")
        );
        assert_eq!(control.paused, None);
        assert_eq!(control.follow_pause_mark(None, 2, 5000), None);
        assert_eq!(control.commands.len(), 3);
    }

    #[test]
    fn the_record_keeps_the_newest_commands_only() {
        let mut control = Control::default();
        for i in 0..(KEPT_COMMANDS as u64 + 5) {
            control.follow_pause_mark(Some(&format!("pause {i}")), 0, i);
            control.follow_pause_mark(None, 0, i);
        }
        assert_eq!(control.commands.len(), KEPT_COMMANDS);
        assert_eq!(
            control.commands.last().map(|a| a.command),
            Some(Command::Resume)
        );
    }

    #[test]
    fn force_is_the_first_word_of_a_promote_request() {
        assert!(is_forced("force"));
        assert!(is_forced("force cli-1-2"));
        assert!(is_forced("FORCE: ops"));
        assert!(!is_forced("cli-1-2"));
        assert!(!is_forced("please force it"));
        assert!(!is_forced(""));
    }

    #[test]
    fn promote_is_refused_past_a_failing_verdict_unless_forced() {
        let (hold, rollback) = verdicts();
        assert_eq!(promote_allowed(false, &hold), Ok(()));
        let refused = promote_allowed(false, &rollback).expect_err("refused");
        assert!(refused.contains("hard guard"), "{refused}");
        assert!(refused.contains("--force"), "{refused}");
        assert_eq!(promote_allowed(true, &rollback), Ok(()));
    }

    #[test]
    fn would_roll_back_counts_and_keeps_the_first_time() {
        let mut control = Control::default();
        control.note_would_roll_back("hard guard", 0, 10);
        control.note_would_roll_back("error rate regressed", 1, 20);
        let w = control.would_roll_back.expect("noted");
        assert_eq!(
            (w.count, w.first_unix_ms, w.last_unix_ms, w.step),
            (2, 10, 20, 1)
        );
        assert_eq!(w.reason, "error rate regressed");
    }

    #[test]
    fn a_lifted_pause_is_written_as_null_so_a_merge_patch_removes_it() {
        let mut control = Control::default();
        control.follow_pause_mark(Some("ops"), 0, 1);
        control.follow_pause_mark(None, 0, 2);
        let json = serde_json::to_value(&control).expect("serializes");
        assert!(
            json.as_object().is_some_and(|o| o.contains_key("paused")) && json["paused"].is_null(),
            "{json}"
        );
    }

    #[test]
    fn an_empty_control_is_left_out_of_the_record() {
        assert!(Control::default().is_empty());
        let mut control = Control::default();
        control.note_would_roll_back("x", 0, 1);
        assert!(!control.is_empty());
    }
}
