//! The fleet's own rules, with launchers that stand in for rollouts: isolation (a
//! panicking or failing rollout is retried and never stops another), releases (same
//! revision: nothing; a new one: the old task stops first), removal and invalid input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshcanary_controller::fleet::{Activity, Fleet, FleetOptions, Launcher};
use meshcanary_controller::output::{Format, Output};
use meshcanary_controller::rollout::{Outcome, RunError};
use meshcanary_controller::sink::SinkError;
use meshcanary_controller::spec::RolloutSpec;

const POLICY: &str = r#"{"name": "checkout", "variants": ["stable", "canary"], "rules": [
  {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "s",
   "weights": [{"variant": "canary", "weight": 0}, {"variant": "stable", "weight": 100}]}}]}"#;

fn spec(dir: &Path, name: &str, steps: &str) -> RolloutSpec {
    let text = format!(
        "policy: policy.json\nsplit_rule: rollout\ncanary: canary\nsteps: {steps}\n\
         step_min_duration: 1s\ninterval: 1s\nanalysis: {{min_requests: 10}}\n\
         source: {{envoy_admin: [\"http://127.0.0.1:1\"]}}\n\
         sink: {{ecds_file: {{path: {name}.ecds.json, wasm: f.wasm}}}}\n"
    );
    RolloutSpec::parse(&text, &dir.join(format!("{name}.yaml"))).expect("valid spec")
}

fn folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("policy.json"), POLICY).expect("policy");
    dir
}

/// What the stand-in rollouts did: launches per spec file name, and which ended by a stop.
#[derive(Default)]
struct Log {
    launches: Mutex<BTreeMap<String, usize>>,
    stopped: AtomicUsize,
}

impl Log {
    fn launches(&self, name: &str) -> usize {
        *self.launches.lock().expect("log").get(name).unwrap_or(&0)
    }
}

/// By spec file name: `panics*` panics, `fails*` errors, `quick*` promotes at once, any
/// other runs until stopped.
fn launcher(log: Arc<Log>) -> Launcher {
    Arc::new(move |spec: RolloutSpec, _out, stop| {
        let log = Arc::clone(&log);
        Box::pin(async move {
            let name = spec
                .file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            *log.launches
                .lock()
                .expect("log")
                .entry(name.clone())
                .or_default() += 1;
            if name.starts_with("panics") {
                panic!("stand-in rollout {name} panics");
            }
            if name.starts_with("fails") {
                return Err(RunError::Sink(SinkError::Busy("a test".into())));
            }
            if name.starts_with("quick") {
                return Ok(Outcome::Promoted);
            }
            stop.stopped().await;
            log.stopped.fetch_add(1, Ordering::SeqCst);
            Err(RunError::Interrupted { step: 0 })
        })
    })
}

fn options() -> FleetOptions {
    FleetOptions {
        retry_first: Duration::from_millis(20),
        retry_max: Duration::from_millis(40),
        ..FleetOptions::default()
    }
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn activity(fleet: &Fleet, key: &str) -> Option<Activity> {
    fleet
        .snapshot()
        .into_iter()
        .find(|v| v.key == key)
        .map(|v| v.activity)
}

#[tokio::test(flavor = "current_thread")]
async fn a_panicking_or_failing_rollout_is_retried_and_never_stops_the_others() {
    let dir = folder();
    let log = Arc::new(Log::default());
    let out = Output::new(Format::Json).silent();
    let mut fleet = Fleet::new(launcher(Arc::clone(&log)), &out, options());
    fleet.apply("panics.yaml", spec(dir.path(), "panics", "[50, 100]"));
    fleet.apply("fails.yaml", spec(dir.path(), "fails", "[50, 100]"));
    fleet.apply("steady.yaml", spec(dir.path(), "steady", "[50, 100]"));
    fleet.apply("quick.yaml", spec(dir.path(), "quick", "[50, 100]"));
    settle().await;
    // A panic's unwinding takes as long as the backtrace it captures (RUST_BACKTRACE=1 in
    // a debug build: 100 ms and more), so the retries get a bounded while to happen.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (log.launches("panics") < 3 || log.launches("fails") < 3)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(log.launches("panics") >= 3, "a panic is caught and retried");
    assert!(log.launches("fails") >= 3, "an error is retried");
    assert_eq!(log.launches("steady"), 1, "the others run on, untouched");
    assert_eq!(log.launches("quick"), 1);
    assert_eq!(activity(&fleet, "steady.yaml"), Some(Activity::Running));
    assert_eq!(activity(&fleet, "quick.yaml"), Some(Activity::Finished));
    let panics = fleet
        .snapshot()
        .into_iter()
        .find(|v| v.key == "panics.yaml")
        .expect("view");
    assert!(
        panics.error.as_deref().unwrap_or("").contains("panicked"),
        "{panics:?}"
    );
    fleet.shutdown().await;
    assert_eq!(
        log.stopped.load(Ordering::SeqCst),
        1,
        "shutdown stops the running one"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_same_revision_does_nothing_and_a_new_one_replaces_the_running_task() {
    let dir = folder();
    let log = Arc::new(Log::default());
    let out = Output::new(Format::Json).silent();
    let mut fleet = Fleet::new(launcher(Arc::clone(&log)), &out, options());
    fleet.apply("steady.yaml", spec(dir.path(), "steady", "[50, 100]"));
    fleet.apply("quick.yaml", spec(dir.path(), "quick", "[50, 100]"));
    settle().await;
    fleet.apply("steady.yaml", spec(dir.path(), "steady", "[50, 100]"));
    fleet.apply("quick.yaml", spec(dir.path(), "quick", "[50, 100]"));
    settle().await;
    assert_eq!(log.launches("steady"), 1, "same revision: nothing");
    assert_eq!(
        log.launches("quick"),
        1,
        "a finished rollout stays finished"
    );
    fleet.apply("steady.yaml", spec(dir.path(), "steady", "[25, 100]"));
    fleet.apply("quick.yaml", spec(dir.path(), "quick", "[25, 100]"));
    settle().await;
    assert_eq!(
        log.stopped.load(Ordering::SeqCst),
        1,
        "the old release stopped"
    );
    assert_eq!(log.launches("steady"), 2, "and the new one started");
    assert_eq!(
        log.launches("quick"),
        2,
        "a new revision of a finished one starts"
    );
    fleet.remove("steady.yaml");
    settle().await;
    assert_eq!(log.stopped.load(Ordering::SeqCst), 2, "removal stops it");
    assert_eq!(activity(&fleet, "steady.yaml"), None);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn invalid_input_is_listed_with_its_problems_and_driven_once_it_is_valid() {
    let dir = folder();
    let log = Arc::new(Log::default());
    let out = Output::new(Format::Json).silent();
    let mut fleet = Fleet::new(launcher(Arc::clone(&log)), &out, options());
    let bad =
        RolloutSpec::parse("steps: [", &PathBuf::from("/nowhere/bad.yaml")).expect_err("invalid");
    fleet.invalid("steady.yaml", &bad);
    fleet.invalid("steady.yaml", &bad);
    let view = fleet.snapshot().into_iter().next().expect("listed");
    assert_eq!(view.activity, Activity::Invalid);
    assert!(!view.problems.is_empty());
    assert_eq!(log.launches("steady"), 0);
    fleet.apply("steady.yaml", spec(dir.path(), "steady", "[50, 100]"));
    settle().await;
    assert_eq!(log.launches("steady"), 1);
    let view = fleet.snapshot().into_iter().next().expect("listed");
    assert_eq!(view.activity, Activity::Running);
    assert!(view.problems.is_empty());
    fleet.shutdown().await;
}

/// A sink that keeps the record in memory, and a source that always answers zeros.
#[derive(Default)]
struct MemorySink {
    record: Mutex<Option<meshcanary_controller::sink::Record>>,
}

impl meshcanary_controller::sink::ConfigSink for MemorySink {
    type Claim = ();
    async fn claim(&self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn load(&self) -> Result<Option<meshcanary_controller::sink::Record>, SinkError> {
        Ok(self.record.lock().expect("record").clone())
    }
    async fn apply(
        &self,
        _policy: &serde_json::Value,
        record: &meshcanary_controller::sink::Record,
    ) -> Result<(), SinkError> {
        *self.record.lock().expect("record") = Some(record.clone());
        Ok(())
    }
    async fn save(&self, record: &meshcanary_controller::sink::Record) -> Result<(), SinkError> {
        *self.record.lock().expect("record") = Some(record.clone());
        Ok(())
    }
    async fn set_abort_mark(&self, _on: bool) -> Result<(), SinkError> {
        Ok(())
    }
    async fn abort_marked(&self) -> Result<bool, SinkError> {
        Ok(false)
    }
    fn render(
        &self,
        policy: &serde_json::Value,
        _record: &meshcanary_controller::sink::Record,
    ) -> Result<String, SinkError> {
        Ok(policy.to_string())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

struct Zeros;

impl meshcanary_controller::source::MetricSource for Zeros {
    async fn read(
        &self,
        _query: &meshcanary_controller::source::Query,
    ) -> Result<meshcanary_controller::source::Snapshot, meshcanary_controller::source::SourceError>
    {
        Ok(meshcanary_controller::source::Snapshot::default())
    }
    fn describe(&self) -> String {
        "zeros".into()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn run_release_supersedes_an_unfinished_earlier_revision_and_run_refuses_it() {
    use meshcanary_controller::rollout;
    let dir = folder();
    let sink = MemorySink::default();
    let first = spec(dir.path(), "steady", "[50, 100]");
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = Arc::clone(&events);
    let mut out = Output::new(Format::Json)
        .silent()
        .with_observer(Box::new(move |kind, _| {
            seen.lock().expect("events").push(kind.to_string())
        }));
    let stopped = tokio::time::sleep(Duration::from_millis(200));
    let result = rollout::run_release(&first, &Zeros, &sink, &mut out, stopped).await;
    assert!(
        matches!(result, Err(RunError::Interrupted { step: 0 })),
        "{result:?}"
    );
    let saved = sink.record.lock().expect("record").clone().expect("saved");
    assert_eq!(saved.rollout.revision, first.revision);
    assert_eq!(saved.applied_weight, 50);

    // A new revision of the same rollout while the first is unfinished.
    let second = spec(dir.path(), "steady", "[25, 100]");
    assert_ne!(second.revision, first.revision);
    let refused = rollout::run(&second, &Zeros, &sink, &mut out, std::future::ready(())).await;
    assert!(
        matches!(refused, Err(RunError::OtherRollout { .. })),
        "{refused:?}"
    );
    let stopped = tokio::time::sleep(Duration::from_millis(200));
    let result = rollout::run_release(&second, &Zeros, &sink, &mut out, stopped).await;
    assert!(
        matches!(result, Err(RunError::Interrupted { step: 0 })),
        "{result:?}"
    );
    let now = sink.record.lock().expect("record").clone().expect("saved");
    assert_eq!(
        now.rollout.revision, second.revision,
        "the new release took over"
    );
    assert_eq!(now.applied_weight, 25, "at its own first step");
    assert_eq!(now.generation, 1, "a new record, not the old one continued");
    let kinds = events.lock().expect("events").clone();
    assert_eq!(
        kinds.iter().filter(|k| *k == "superseded").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| *k == "start").count(),
        2,
        "{kinds:?}"
    );
}
