//! The driver's handling of the operator's marks and of a dry run, tick by tick, with an
//! in-memory sink (that keeps the marks as a file or an annotation would) and in-process
//! counters: what pause holds back, what resume lets act, when promote is refused, and
//! what a dry run does with a rollback verdict.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshcanary_controller::control::{Command, MarkKind, Marks};
use meshcanary_controller::output::{Format, Output};
use meshcanary_controller::rollout::{self, Outcome};
use meshcanary_controller::sink::{ConfigSink, Record, SinkError};
use meshcanary_controller::spec::RolloutSpec;
use meshcanary_controller::verdict::Phase;

mod stand_in;

use stand_in::SteadyCounters;

const POLICY: &str = r#"{"name": "checkout", "variants": ["stable", "canary"], "rules": [
  {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "s",
   "weights": [{"variant": "canary", "weight": 0}, {"variant": "stable", "weight": 100}]}}]}"#;

/// Steps 50 → 100, 100 ms ticks, a step that takes an hour unless promoted.
fn spec(dir: &Path, dry_run: bool) -> RolloutSpec {
    std::fs::write(dir.join("policy.json"), POLICY).expect("policy");
    let text = format!(
        "policy: policy.json\nsplit_rule: rollout\ncanary: canary\nsteps: [50, 100]\n\
         step_min_duration: 1h\ninterval: 100ms\n\
         analysis: {{min_requests: 10, dry_run: {dry_run}}}\n\
         source: {{envoy_admin: [\"http://127.0.0.1:1\"]}}\n\
         sink: {{ecds_file: {{path: out.ecds.json, wasm: f.wasm}}}}\n"
    );
    RolloutSpec::parse(&text, &dir.join("rollout.yaml")).expect("valid spec")
}

/// The record and the marks, in memory.
#[derive(Default)]
struct Memory {
    record: Mutex<Option<Record>>,
    marks: Mutex<Marks>,
    weights: Mutex<Vec<u32>>,
}

impl Memory {
    fn record(&self) -> Option<Record> {
        self.record.lock().expect("record").clone()
    }
    fn mark(&self, kind: MarkKind, text: Option<&str>) {
        let mut marks = self.marks.lock().expect("marks");
        match kind {
            MarkKind::Pause => marks.pause = text.map(str::to_string),
            MarkKind::Promote => marks.promote = text.map(str::to_string),
        }
    }
    fn weights(&self) -> Vec<u32> {
        self.weights.lock().expect("weights").clone()
    }
}

/// The driver's handle on the shared [`Memory`].
struct MemorySink(Arc<Memory>);

impl ConfigSink for MemorySink {
    type Claim = ();
    async fn claim(&self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn load(&self) -> Result<Option<Record>, SinkError> {
        Ok(self.0.record())
    }
    async fn apply(&self, _policy: &serde_json::Value, record: &Record) -> Result<(), SinkError> {
        self.0
            .weights
            .lock()
            .expect("weights")
            .push(record.applied_weight);
        *self.0.record.lock().expect("record") = Some(record.clone());
        Ok(())
    }
    async fn save(&self, record: &Record) -> Result<(), SinkError> {
        *self.0.record.lock().expect("record") = Some(record.clone());
        Ok(())
    }
    async fn set_abort_mark(&self, on: bool) -> Result<(), SinkError> {
        self.0.marks.lock().expect("marks").abort = on;
        Ok(())
    }
    async fn abort_marked(&self) -> Result<bool, SinkError> {
        Ok(self.0.marks.lock().expect("marks").abort)
    }
    async fn operator_marks(&self) -> Result<Marks, SinkError> {
        Ok(self.0.marks.lock().expect("marks").clone())
    }
    async fn set_operator_mark(&self, kind: MarkKind, text: Option<&str>) -> Result<(), SinkError> {
        self.0.mark(kind, text);
        Ok(())
    }
    fn render(&self, policy: &serde_json::Value, _record: &Record) -> Result<String, SinkError> {
        Ok(policy.to_string())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// Waits (up to 5 s) until `check` holds of the saved record.
async fn until(memory: &Memory, what: &str, check: impl Fn(&Record) -> bool) {
    let started = Instant::now();
    while !memory.record().as_ref().is_some_and(&check) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: not within 5 s; record: {:?}",
            memory.record()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn drive(
    spec: RolloutSpec,
    memory: &Arc<Memory>,
    broken: bool,
) -> tokio::task::JoinHandle<Result<Outcome, String>> {
    let sink = MemorySink(Arc::clone(memory));
    tokio::spawn(async move {
        let source = SteadyCounters::new(broken);
        let mut out = Output::new(Format::Json).silent();
        rollout::run(&spec, &source, &sink, &mut out, std::future::pending())
            .await
            .map_err(|e| e.to_string())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_while_paused_is_rolled_back_at_the_first_tick_after_resume() {
    let dir = tempfile::tempdir().expect("temp dir");
    let memory = Arc::new(Memory::default());
    memory.mark(MarkKind::Pause, Some("ops: looking"));
    let task = drive(spec(dir.path(), false), &memory, true);
    until(&memory, "a rollback held back by the pause", |r| {
        r.state.reason.contains("would roll back")
    })
    .await;
    // Ten ticks more: still not rolled back, still at 50 %.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let record = memory.record().expect("record");
    assert_eq!(record.state.phase, Phase::Progressing);
    assert_eq!(memory.weights(), vec![50]);
    assert_eq!(
        record.control.paused.as_ref().map(|p| p.request.as_str()),
        Some("ops: looking")
    );
    assert!(record
        .state
        .reason
        .starts_with("paused by \"ops: looking\": would roll back"));
    assert!(!task.is_finished());
    let resumed = Instant::now();
    memory.mark(MarkKind::Pause, None);
    let outcome = task.await.expect("join").expect("run");
    assert!(matches!(outcome, Outcome::RolledBack(_)), "{outcome:?}");
    // The first 100 ms tick after the resume acts; 1.4 s more for a slow, loaded machine.
    // (A resume not acted on would hold the rollback back for good.)
    assert!(
        resumed.elapsed() < Duration::from_millis(1500),
        "{:?}",
        resumed.elapsed()
    );
    assert_eq!(memory.weights(), vec![50, 0]);
    let commands: Vec<Command> = memory
        .record()
        .map(|r| r.control.commands.iter().map(|c| c.command).collect())
        .unwrap_or_default();
    assert_eq!(commands, vec![Command::Pause, Command::Resume]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_holds_a_failing_canary_refuses_promote_and_a_forced_promote_completes_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let memory = Arc::new(Memory::default());
    let task = drive(spec(dir.path(), true), &memory, true);
    until(&memory, "several would-be rollbacks", |r| {
        r.control
            .would_roll_back
            .as_ref()
            .is_some_and(|w| w.count >= 5)
    })
    .await;
    let record = memory.record().expect("record");
    assert_eq!(record.state.phase, Phase::Progressing);
    assert!(
        record.state.reason.starts_with("would roll back: "),
        "{}",
        record.state.reason
    );
    assert_eq!(memory.weights(), vec![50], "no rollback applied");
    // Promote is refused past the failing verdict, and the request is consumed.
    memory.mark(MarkKind::Promote, Some("ops"));
    until(&memory, "the refusal", |r| {
        r.control.commands.iter().any(|c| c.request == "ops")
    })
    .await;
    let record = memory.record().expect("record");
    let refused = record.control.commands.last().expect("ack");
    assert_eq!(
        (refused.command, refused.accepted),
        (Command::Promote, false)
    );
    assert!(refused.detail.contains("--force"), "{}", refused.detail);
    assert_eq!(memory.marks.lock().expect("marks").promote, None);
    assert_eq!(memory.weights(), vec![50]);
    // Forced: the last judged step is skipped, the rollout completes.
    memory.mark(MarkKind::Promote, Some("force: ops"));
    let outcome = task.await.expect("join").expect("run");
    assert_eq!(outcome, Outcome::Promoted);
    assert_eq!(memory.weights(), vec![50, 100]);
    let record = memory.record().expect("record");
    let forced = record.control.commands.last().expect("ack");
    assert_eq!(
        (forced.command, forced.accepted, forced.forced),
        (Command::Promote, true, true)
    );
    assert_eq!(record.state.phase, Phase::Promoted);
}
