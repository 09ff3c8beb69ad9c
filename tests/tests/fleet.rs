//! One controller process, many rollouts: `meshcanary serve DIR` drives every spec in a
//! folder at once, each against its own real Envoy (ECDS file) and real upstreams under
//! load, while an invalid spec sits beside them.
//!
//! Rollouts are short (steps 20 → 50 → 100 %, 0.5 s ticks, 2 s minimum per step unless a
//! test needs one to stay mid-way) so that the whole file ends in about a minute.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshcanary_e2e::controller::{Controller, Event};
use meshcanary_e2e::{paths, write_ecds, Behaviour, Envoy, EnvoyConfig, FilterSource, Upstream};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

const RUN_LIMIT: Duration = Duration::from_secs(60);

/// The tests of this file run one at a time (even under `--test-threads 2`): the first
/// compares detection times, which the other test's Envoys and load would disturb.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// Requests per second sent to each rollout's Envoy.
const RPS: u32 = 300;

fn base_policy(name: &str) -> Value {
    json!({
        "name": name,
        "variants": ["stable", "canary"],
        "rules": [
            {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": format!("{name}-v2"),
                "weights": [{"variant": "canary", "weight": 0}, {"variant": "stable", "weight": 100}]}}
        ]
    })
}

/// One rollout's world: its Envoy, upstreams, load, ECDS file and spec (in the shared
/// spec folder); processes die with it.
struct Rig {
    name: String,
    envoy: Envoy,
    canary: Upstream,
    _stable: Upstream,
    spec: PathBuf,
    ecds: PathBuf,
    load: Option<Child>,
}

impl Rig {
    /// `specs/<name>.yaml` with its policy and ECDS file in `work/` (outside the folder
    /// the controller reads), the canary behaving as `canary`.
    async fn start(
        root: &Path,
        name: &str,
        canary: Behaviour,
        edit: impl FnOnce(&mut Value),
    ) -> Rig {
        let stable = Upstream::start_with(&format!("{name}-stable"), Behaviour::default()).await;
        let canary = Upstream::start_with(&format!("{name}-canary"), canary).await;
        let work = root.join("work");
        let specs = root.join("specs");
        std::fs::create_dir_all(&work).expect("work dir");
        std::fs::create_dir_all(&specs).expect("spec dir");
        let ecds = work.join(format!("{name}.ecds.json"));
        write_ecds(&ecds, "initial", &base_policy(name).to_string());
        let mut config =
            EnvoyConfig::stable_canary(FilterSource::Ecds(ecds.clone()), stable.addr, canary.addr);
        config.stats_flush_interval = Some(Duration::from_secs(1));
        config.concurrency = 1;
        let envoy = Envoy::start(&config).await.expect("envoy starts");
        let policy = work.join(format!("{name}.policy.json"));
        std::fs::write(&policy, base_policy(name).to_string()).expect("policy");
        let mut spec = json!({
            "policy": policy,
            "split_rule": "rollout",
            "canary": "canary",
            "steps": [20, 50, 100],
            "step_min_duration": "2s",
            "interval": "500ms",
            "analysis": {
                "error_ceiling": 0.2, "max_error_rate": 0.05, "latency_threshold_ms": 500,
                "max_slow_rate": 0.05, "min_requests": 100, "alpha": 0.001,
                "no_data_timeout": "10s", "on_no_data": "rollback"
            },
            "source": {"envoy_admin": [envoy.admin.clone()]},
            "sink": {"ecds_file": {"path": ecds.clone(), "wasm": paths::wasm()}}
        });
        edit(&mut spec);
        let spec_path = specs.join(format!("{name}.yaml"));
        // JSON is YAML: written as JSON to keep the test free of a YAML writer.
        std::fs::write(
            &spec_path,
            serde_json::to_string_pretty(&spec).expect("spec"),
        )
        .expect("spec file");
        Rig {
            name: name.to_string(),
            envoy,
            canary,
            _stable: stable,
            spec: spec_path,
            ecds,
            load: None,
        }
    }

    fn key(&self) -> String {
        format!("{}.yaml", self.name)
    }

    /// Load from 5,000 users at [`RPS`], for at most 90 s.
    fn start_load(&mut self) {
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_meshcanary-load"));
        let url = self.envoy.url("/");
        self.load = Some(meshcanary_e2e::controller::start_load(bin, &url, RPS, 4));
    }

    /// The rollout's saved record (`<ecds>.state.json`).
    fn record(&self) -> Value {
        meshcanary_e2e::controller::saved_record(&self.ecds)
    }

    /// Time from the canary's first request to the controller's confirmed 0 % write.
    fn detection(&self, serve: &Controller) -> Option<Duration> {
        let first = self.canary.requests().first().map(|r| r.at)?;
        let zero = of(serve, &self.key())
            .into_iter()
            .find(|e| e.kind() == "applied" && e.json["weight"] == 0)?;
        Some(zero.at.duration_since(first))
    }
}

/// The events of one rollout (JSON lines carry `"rollout": "<file>"`).
fn of(serve: &Controller, key: &str) -> Vec<Event> {
    serve
        .events()
        .into_iter()
        .filter(|e| e.json["rollout"] == key)
        .collect()
}

async fn wait_for(
    serve: &Controller,
    key: &str,
    kind: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Event {
    let found = serve
        .wait_event(kind, timeout, |e| e["rollout"] == key && pred(e))
        .await;
    found.unwrap_or_else(|| panic!("no {kind} event for {key}\n{}", serve.transcript()))
}

/// `serve DIR` on a port the system picks (`Controller::serving_address` tells which).
fn serve_dir(dir: &Path) -> Controller {
    Controller::spawn(&[
        "serve",
        &dir.display().to_string(),
        "--listen",
        "127.0.0.1:0",
    ])
}

fn broken() -> Behaviour {
    Behaviour {
        error_rate: 0.5,
        ..Behaviour::default()
    }
}

/// The broken canary alone in its folder: the reference detection time.
async fn detection_alone() -> Duration {
    let root = tempfile::tempdir().expect("temp dir");
    let mut rig = Rig::start(root.path(), "broken", broken(), |_| {}).await;
    rig.start_load();
    let mut serve = serve_dir(&root.path().join("specs"));
    wait_for(&serve, &rig.key(), "finished", RUN_LIMIT, |e| {
        e["outcome_kind"] == "rolled_back"
    })
    .await;
    let detection = rig.detection(&serve).expect("detection time");
    serve.kill().await;
    detection
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_serve_dir_promotes_rolls_back_and_aborts_at_once_beside_an_invalid_spec() {
    let _one = ONE_AT_A_TIME.lock().await;
    let alone = detection_alone().await;

    let root = tempfile::tempdir().expect("temp dir");
    let (mut healthy, mut broken, mut held) = tokio::join!(
        Rig::start(root.path(), "healthy", Behaviour::default(), |_| {}),
        Rig::start(root.path(), "broken", broken(), |_| {}),
        // Stays at its first step until aborted.
        Rig::start(root.path(), "held", Behaviour::default(), |spec| {
            spec["step_min_duration"] = json!("60s");
        }),
    );
    let specs = root.path().join("specs");
    // Steps that go down, and an unknown field: reported with the file, never driven.
    let mut invalid: Value =
        serde_json::from_str(&std::fs::read_to_string(&healthy.spec).expect("spec")).expect("json");
    invalid["steps"] = json!([50, 20, 100]);
    invalid["colour"] = json!("blue");
    invalid["sink"]["ecds_file"]["path"] = json!(root.path().join("work/invalid.ecds.json"));
    std::fs::write(specs.join("invalid.yaml"), invalid.to_string()).expect("invalid spec");
    for rig in [&mut healthy, &mut broken, &mut held] {
        rig.start_load();
    }
    let started = Instant::now();
    let mut serve = serve_dir(&specs);
    let listen = serve.serving_address(RUN_LIMIT).await;

    // The third is aborted mid-way, by the command an operator would type.
    wait_for(&serve, &held.key(), "applied", RUN_LIMIT, |e| {
        e["weight"] == 20
    })
    .await;
    let promoted = wait_for(&serve, &healthy.key(), "finished", RUN_LIMIT, |_| true).await;
    assert_eq!(
        promoted.json["outcome_kind"],
        "promoted",
        "{}",
        serve.transcript()
    );
    let rolled_back = wait_for(&serve, &broken.key(), "finished", RUN_LIMIT, |_| true).await;
    assert_eq!(
        rolled_back.json["outcome_kind"],
        "rolled_back",
        "{}",
        serve.transcript()
    );
    let abort = Command::new(paths::meshcanary_bin())
        .args(["abort", &held.spec.display().to_string()])
        .output()
        .await
        .expect("abort");
    assert!(
        abort.status.success(),
        "{}",
        String::from_utf8_lossy(&abort.stderr)
    );
    let aborted = wait_for(
        &serve,
        &held.key(),
        "finished",
        Duration::from_secs(10),
        |_| true,
    )
    .await;
    assert_eq!(
        aborted.json["outcome_kind"],
        "aborted",
        "{}",
        serve.transcript()
    );
    let all_done = started.elapsed();

    // The invalid spec: reported once, with its file and every problem, never driven.
    let reports = of(&serve, "invalid.yaml");
    let invalid_reports: Vec<&Event> = reports.iter().filter(|e| e.kind() == "invalid").collect();
    assert_eq!(invalid_reports.len(), 1, "{}", serve.transcript());
    let problems = invalid_reports[0].json["problems"].to_string();
    assert!(
        problems.contains("steps") && problems.contains("colour"),
        "{problems}"
    );
    assert!(
        reports.iter().all(|e| e.kind() == "invalid"),
        "never driven"
    );

    // Each rollout's weights, in order; nothing crossed over between them.
    let weights = |rig: &Rig| -> Vec<u64> {
        of(&serve, &rig.key())
            .iter()
            .filter(|e| e.kind() == "applied")
            .filter_map(|e| e.json["weight"].as_u64())
            .collect()
    };
    assert_eq!(
        weights(&healthy),
        vec![20, 50, 100],
        "{}",
        serve.transcript()
    );
    assert_eq!(weights(&broken).last(), Some(&0), "{}", serve.transcript());
    assert!(!weights(&broken).contains(&100));
    assert_eq!(weights(&held), vec![20], "the abort itself wrote 0 %");

    // Detection of the broken canary beside two others, against alone.
    let together = broken.detection(&serve).expect("detection time");
    println!(
        "broken canary rolled back (0 % confirmed) {together:?} after its first request beside \
         two other rollouts, {alone:?} alone; all three done after {all_done:?}"
    );
    // Ticks are 0.5 s: an extra tick or two plus scheduling noise on a shared, loaded
    // 2-core machine; a rollout left waiting behind the others for six ticks fails.
    let margin = Duration::from_secs(3);
    assert!(
        together <= alone + margin,
        "beside others: {together:?}, alone: {alone:?} (margin {margin:?})"
    );

    // Per-rollout series on /metrics.
    let metrics = reqwest::get(format!("http://{listen}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for expected in [
        "meshcanary_canary_weight_percent{rollout=\"healthy.yaml\"} 100",
        "meshcanary_canary_weight_percent{rollout=\"broken.yaml\"} 0",
        "meshcanary_rollouts_finished_total{kind=\"promoted\"} 1",
        "meshcanary_rollouts_finished_total{kind=\"rolled_back\"} 1",
        "meshcanary_rollouts_finished_total{kind=\"aborted\"} 1",
        "meshcanary_errors_total{kind=\"spec\"} 1",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in:\n{metrics}"
        );
    }

    // `status DIR`: one JSON object per rollout, the invalid one with its problems.
    let status = Command::new(paths::meshcanary_bin())
        .args(["status", &specs.display().to_string(), "--output", "json"])
        .output()
        .await
        .expect("status");
    assert_eq!(status.status.code(), Some(0));
    let rows: Vec<Value> = String::from_utf8_lossy(&status.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let phase = |file: &str| {
        rows.iter()
            .find(|r| r["file"] == file)
            .map(|r| r["phase"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(phase("healthy.yaml"), "promoted");
    assert_eq!(phase("broken.yaml"), "rolled_back");
    assert_eq!(phase("held.yaml"), "aborted");
    assert_eq!(phase("invalid.yaml"), "invalid");
    let broken_row = rows
        .iter()
        .find(|r| r["file"] == "broken.yaml")
        .expect("row");
    assert_eq!(broken_row["canary_weight"], 0);
    assert_eq!(broken_row["last_verdict"], "rollback");
    assert!(!broken_row["reason"].as_str().unwrap_or("").is_empty());

    // A removed spec stops being driven; its record stays.
    std::fs::remove_file(&healthy.spec).expect("remove spec");
    wait_for(
        &serve,
        "healthy.yaml",
        "removed",
        Duration::from_secs(10),
        |_| true,
    )
    .await;
    assert_eq!(healthy.record()["state"]["phase"], "promoted");

    serve.terminate();
    assert_eq!(
        serve.wait(Duration::from_secs(20)).await,
        Some(0),
        "{}",
        serve.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_serve_dir_resumes_every_rollout_at_its_step_with_its_evidence() {
    let _one = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().expect("temp dir");
    let long = |spec: &mut Value| spec["step_min_duration"] = json!("60s");
    let (mut first, mut second) = tokio::join!(
        Rig::start(root.path(), "first", Behaviour::default(), long),
        // Reaches its second step (50 %) and is killed there, well inside that step.
        Rig::start(root.path(), "second", Behaviour::default(), |spec| {
            spec["steps"] = json!([20, 50, 75, 100]);
            spec["step_min_duration"] = json!("10s");
        }),
    );
    first.start_load();
    second.start_load();
    let specs = root.path().join("specs");
    let mut serve = serve_dir(&specs);
    wait_for(&serve, &second.key(), "applied", RUN_LIMIT, |e| {
        e["weight"] == 50
    })
    .await;
    // Evidence in both current steps (the second's lasts 10 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    serve.kill().await;
    let before = [first.record(), second.record()];
    let killed_transcript = serve.transcript();

    let mut restarted = serve_dir(&specs);
    for (rig, saved) in [&first, &second].into_iter().zip(&before) {
        let resumed = wait_for(
            &restarted,
            &rig.key(),
            "resume",
            Duration::from_secs(15),
            |_| true,
        )
        .await;
        assert_eq!(
            resumed.json["step"],
            saved["state"]["step"],
            "{}",
            restarted.transcript()
        );
        assert_eq!(resumed.json["weight"], saved["applied_weight"]);
    }
    // A few ticks later: the same rollout (its clocks), the same step, the evidence of
    // before kept and added to, not started over.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (rig, saved) in [&first, &second].into_iter().zip(&before) {
        let now = rig.record();
        println!(
            "{}: before kill step {} canary requests {} llr {:.3}; after resume step {} canary requests {} llr {:.3}",
            rig.name,
            saved["state"]["step"],
            saved["state"]["canary"]["requests"],
            saved["state"]["errors"]["llr"].as_f64().unwrap_or(f64::NAN),
            now["state"]["step"],
            now["state"]["canary"]["requests"],
            now["state"]["errors"]["llr"].as_f64().unwrap_or(f64::NAN),
        );
        assert_eq!(now["state"]["step"], saved["state"]["step"], "{}", rig.name);
        assert_eq!(now["state"]["started_at"], saved["state"]["started_at"]);
        assert_eq!(
            now["state"]["step_started_at"],
            saved["state"]["step_started_at"]
        );
        let requests = |r: &Value| r["state"]["canary"]["requests"].as_f64().unwrap_or(-1.0);
        assert!(
            requests(saved) > 0.0,
            "evidence before the kill: {saved}\n{killed_transcript}"
        );
        assert!(
            requests(&now) > requests(saved),
            "{}: the step's evidence continues ({} → {})",
            rig.name,
            requests(saved),
            requests(&now)
        );
        assert!(now["generation"].as_u64() >= saved["generation"].as_u64());
    }
    assert!(
        restarted.events().iter().all(|e| e.kind() != "start"),
        "nothing started over\n{}",
        restarted.transcript()
    );
    restarted.terminate();
    assert_eq!(restarted.wait(Duration::from_secs(20)).await, Some(0));
}
