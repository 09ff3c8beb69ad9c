//! The controller end to end: the real `meshcanary` binary drives a real Envoy through
//! its ECDS file, judging real upstreams under load from the real load generator.
//!
//! Rollouts here are short (steps 20 → 50 → 100 %, 2 s minimum per step, 0.5 s ticks,
//! 300 requests/s) so that every test ends in seconds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use meshcanary_e2e::controller::{Controller, Forwarder};
use meshcanary_e2e::{
    paths, route_keys, write_ecds, Behaviour, Envoy, EnvoyConfig, FilterSource, Upstream,
};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

const RUN_LIMIT: Duration = Duration::from_secs(60);

fn base_policy() -> Value {
    json!({
        "name": "checkout",
        "variants": ["stable", "canary"],
        "rules": [
            {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
            {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "checkout-v2",
                "weights": [{"variant": "canary", "weight": 0}, {"variant": "stable", "weight": 100}]}}
        ]
    })
}

/// Everything one rollout test needs; processes die with it.
struct Bench {
    dir: tempfile::TempDir,
    envoy: Envoy,
    stable: Upstream,
    canary: Upstream,
    spec: PathBuf,
    ecds: PathBuf,
    load: Option<Child>,
}

impl Bench {
    /// Envoy reading the policy by ECDS (canary at 0 % until the controller writes),
    /// upstreams with the given behaviour, and a spec adjusted by `edit`.
    async fn start(
        stable: Behaviour,
        canary: Behaviour,
        edit: impl FnOnce(&mut Value, &Envoy),
    ) -> Bench {
        let stable = Upstream::start_with("stable", stable).await;
        let canary = Upstream::start_with("canary", canary).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let ecds = dir.path().join("checkout.ecds.json");
        write_ecds(&ecds, "initial", &base_policy().to_string());
        let mut config =
            EnvoyConfig::stable_canary(FilterSource::Ecds(ecds.clone()), stable.addr, canary.addr);
        config.stats_flush_interval = Some(Duration::from_secs(1));
        let envoy = Envoy::start(&config).await.expect("envoy starts");
        std::fs::write(dir.path().join("policy.json"), base_policy().to_string()).expect("policy");
        let mut spec = json!({
            "policy": "policy.json",
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
        edit(&mut spec, &envoy);
        let spec_path = dir.path().join("rollout.yaml");
        // JSON is YAML: the spec file is written as JSON to keep the test free of a YAML writer.
        std::fs::write(
            &spec_path,
            serde_json::to_string_pretty(&spec).expect("spec"),
        )
        .expect("spec file");
        Bench {
            dir,
            envoy,
            stable,
            canary,
            spec: spec_path,
            ecds,
            load: None,
        }
    }

    /// Starts the load generator: `rps` requests/s from 5,000 users, for at most a minute.
    fn start_load(&mut self, rps: u32) {
        let url = self.envoy.url("/");
        self.start_load_at(&url, rps);
    }

    /// Like [`Bench::start_load`], to another address of the same Envoy (a forwarder).
    fn start_load_at(&mut self, url: &str, rps: u32) {
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_meshcanary-load"));
        self.load = Some(meshcanary_e2e::controller::start_load(bin, url, rps, 8));
    }

    /// The canary weight (basis points) in the ECDS file Envoy watches.
    fn ecds_canary_weight(&self) -> u64 {
        meshcanary_e2e::controller::ecds_canary_weight(&self.ecds, 1)
    }

    fn spec_arg(&self) -> String {
        self.spec.display().to_string()
    }
}

fn applied_weights(controller: &Controller) -> Vec<u64> {
    controller
        .events()
        .iter()
        .filter(|e| e.kind() == "applied")
        .filter_map(|e| e.json["weight"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_promoted_through_every_step() {
    let mut bench = Bench::start(Behaviour::default(), Behaviour::default(), |_, _| {}).await;
    bench.start_load(300);
    let mut run = Controller::run(&bench.spec);
    let code = run.wait(RUN_LIMIT).await;
    assert_eq!(code, Some(0), "exit code\n{}", run.transcript());
    assert_eq!(
        applied_weights(&run),
        vec![20, 50, 100],
        "{}",
        run.transcript()
    );
    assert_eq!(
        run.events()
            .iter()
            .filter(|e| e.kind() == "promote")
            .count(),
        1
    );
    assert!(run
        .wait_event("complete", Duration::ZERO, |_| true)
        .await
        .is_some());
    assert_eq!(
        bench.ecds_canary_weight(),
        10_000,
        "the final policy sends 100 % to canary"
    );
    // Every user now reaches the canary.
    let users: Vec<String> = (0..200).map(|i| format!("late-user-{i}")).collect();
    let answers = route_keys(&bench.envoy, "x-user-id", &users, 2).await;
    assert!(answers.iter().all(|a| a == "canary"), "{answers:?}");
    // Re-running a finished rollout reports it and exits the same way.
    let mut again = Controller::run(&bench.spec);
    assert_eq!(
        again.wait(RUN_LIMIT).await,
        Some(0),
        "{}",
        again.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_half_its_requests_is_rolled_back_within_ten_seconds() {
    let broken = Behaviour {
        error_rate: 0.5,
        ..Behaviour::default()
    };
    let mut bench = Bench::start(Behaviour::default(), broken, |_, _| {}).await;
    bench.start_load(300);
    let mut run = Controller::run(&bench.spec);
    let code = run.wait(RUN_LIMIT).await;
    assert_eq!(code, Some(3), "exit code\n{}", run.transcript());
    let first_canary_request = bench
        .canary
        .requests()
        .first()
        .map(|r| r.at)
        .expect("the canary got traffic");
    let back_at_zero = run
        .events()
        .into_iter()
        .find(|e| e.kind() == "applied" && e.json["weight"] == 0)
        .expect("weight 0 applied");
    let detection = back_at_zero.at.duration_since(first_canary_request);
    println!(
        "50 % errors: rolled back and confirmed {detection:?} after the canary's first request"
    );
    // Typically half a second; the bound leaves room for a slow, loaded machine.
    assert!(
        detection <= Duration::from_secs(10),
        "took {detection:?}\n{}",
        run.transcript()
    );
    assert_eq!(bench.ecds_canary_weight(), 0);
    // Afterwards the canary receives nothing, while the load goes on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settled = bench.canary.count();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        bench.canary.count(),
        settled,
        "requests still reach the canary"
    );
    assert!(bench.stable.count() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_with_ten_times_the_error_rate_is_rolled_back() {
    let stable = Behaviour {
        error_rate: 0.01,
        ..Behaviour::default()
    };
    let canary = Behaviour {
        error_rate: 0.10,
        ..Behaviour::default()
    };
    let mut bench = Bench::start(stable, canary, |_, _| {}).await;
    bench.start_load(300);
    let mut run = Controller::run(&bench.spec);
    let code = run.wait(RUN_LIMIT).await;
    assert_eq!(code, Some(3), "exit code\n{}", run.transcript());
    let first = bench
        .canary
        .requests()
        .first()
        .map(|r| r.at)
        .expect("canary traffic");
    let rollback = run
        .wait_event("rollback", Duration::ZERO, |_| true)
        .await
        .expect("rollback event");
    println!(
        "10x errors (1 % vs 10 %): rolled back {:?} after the canary's first request; reason: {}",
        rollback.at.duration_since(first),
        rollback.json["reason"]
    );
    assert!(applied_weights(&run).ends_with(&[0]));
    assert!(
        !applied_weights(&run).contains(&100),
        "never promoted to 100 %"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_traffic_it_never_promotes_and_acts_on_the_no_data_timeout() {
    // on_no_data: rollback.
    let bench = Bench::start(Behaviour::default(), Behaviour::default(), |spec, _| {
        spec["analysis"]["no_data_timeout"] = json!("3s");
    })
    .await;
    let started = Instant::now();
    let mut run = Controller::run(&bench.spec);
    assert_eq!(run.wait(RUN_LIMIT).await, Some(3), "{}", run.transcript());
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "acted before the timeout"
    );
    assert!(run.events().iter().all(|e| e.kind() != "promote"));
    assert_eq!(applied_weights(&run), vec![20, 0]);

    // on_no_data: hold — still holding at the first step well after the timeout.
    let bench = Bench::start(Behaviour::default(), Behaviour::default(), |spec, _| {
        spec["analysis"]["no_data_timeout"] = json!("2s");
        spec["analysis"]["on_no_data"] = json!("hold");
    })
    .await;
    let mut run = Controller::run(&bench.spec);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        run.wait(Duration::from_millis(10)).await,
        None,
        "still running\n{}",
        run.transcript()
    );
    assert_eq!(applied_weights(&run), vec![20]);
    assert!(run.events().iter().all(|e| e.kind() != "promote"));
    let status = std::process::Command::new(paths::meshcanary_bin())
        .args(["status", &bench.spec_arg()])
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("Progressing") && text.contains("step 1 of 3"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_admin_holds_the_rollout_until_it_returns() {
    let mut forwarder: Option<Forwarder> = None;
    let mut admin_addr = None;
    let mut bench = Bench::start(Behaviour::default(), Behaviour::default(), |spec, envoy| {
        admin_addr = envoy
            .admin
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok());
        // Updates are still confirmed through the real admin; only metrics go through the forwarder.
        spec["sink"]["ecds_file"]["admin"] = json!([envoy.admin]);
    })
    .await;
    let f = Forwarder::start(admin_addr.expect("admin address")).await;
    let mut spec: Value =
        serde_json::from_str(&std::fs::read_to_string(&bench.spec).expect("spec")).expect("json");
    spec["source"]["envoy_admin"] = json!([format!("http://{}", f.addr)]);
    std::fs::write(&bench.spec, spec.to_string()).expect("spec");
    forwarder.replace(f);
    let forwarder = forwarder.expect("forwarder");
    bench.start_load(300);
    let mut run = Controller::run(&bench.spec);
    assert!(run
        .wait_event("applied", Duration::from_secs(20), |e| e["weight"] == 20)
        .await
        .is_some());
    forwarder.set_open(false);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        run.events().iter().all(|e| e.kind() != "promote"),
        "promoted while blind\n{}",
        run.transcript()
    );
    assert!(run
        .wait_event("source", Duration::ZERO, |e| e["error"].is_string())
        .await
        .is_some());
    assert_eq!(bench.ecds_canary_weight(), 2_000, "held at the first step");
    forwarder.set_open(true);
    assert_eq!(run.wait(RUN_LIMIT).await, Some(0), "{}", run.transcript());
    assert_eq!(applied_weights(&run), vec![20, 50, 100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_rollout_resumes_at_the_same_step() {
    let mut bench = Bench::start(Behaviour::default(), Behaviour::default(), |spec, _| {
        spec["step_min_duration"] = json!("3s");
    })
    .await;
    bench.start_load(300);
    let mut first = Controller::run(&bench.spec);
    let at_50 = first
        .wait_event("applied", RUN_LIMIT, |e| e["weight"] == 50)
        .await;
    assert!(at_50.is_some(), "{}", first.transcript());
    first.kill().await;
    assert_eq!(bench.ecds_canary_weight(), 5_000);

    let mut second = Controller::run(&bench.spec);
    let resumed = second
        .wait_event("resume", Duration::from_secs(10), |_| true)
        .await;
    let resumed = resumed.unwrap_or_else(|| panic!("no resume event\n{}", second.transcript()));
    assert_eq!(resumed.json["step"], 1, "same step: {}", resumed.json);
    assert_eq!(resumed.json["weight"], 50);
    assert_eq!(
        second.wait(RUN_LIMIT).await,
        Some(0),
        "{}",
        second.transcript()
    );
    assert_eq!(
        applied_weights(&second),
        vec![50, 100],
        "never back to 20, never skipping 50"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_controller_refuses_to_drive_the_same_rollout() {
    let mut bench = Bench::start(Behaviour::default(), Behaviour::default(), |spec, _| {
        spec["step_min_duration"] = json!("60s");
    })
    .await;
    bench.start_load(100);
    let first = Controller::run(&bench.spec);
    // The first controller claims the rollout (its lock) before it reports `start`.
    assert!(
        first
            .wait_event("start", Duration::from_secs(20), |_| true)
            .await
            .is_some(),
        "the first controller did not start\n{}",
        first.transcript()
    );
    let mut second = Controller::run(&bench.spec);
    assert_eq!(second.wait(Duration::from_secs(10)).await, Some(1));
    assert!(
        second.stderr().contains("another controller"),
        "{}",
        second.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_sends_the_canary_to_zero_within_three_seconds() {
    let mut bench = Bench::start(Behaviour::default(), Behaviour::default(), |spec, _| {
        spec["step_min_duration"] = json!("60s");
    })
    .await;
    bench.start_load(300);
    let mut run = Controller::run(&bench.spec);
    assert!(run
        .wait_event("applied", Duration::from_secs(20), |e| e["weight"] == 20)
        .await
        .is_some());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        bench.canary.count() > 0,
        "the canary had traffic before the abort"
    );

    let asked = Instant::now();
    let abort = Command::new(paths::meshcanary_bin())
        .args(["abort", &bench.spec_arg()])
        .output()
        .await
        .expect("abort");
    let confirmed = Instant::now();
    assert!(
        abort.status.success(),
        "{}",
        String::from_utf8_lossy(&abort.stderr)
    );
    println!("abort confirmed by Envoy after {:?}", confirmed - asked);
    // Typically ~30 ms; 3 s leaves room for a loaded machine (the step would otherwise
    // hold the canary at 20 % for 60 s).
    assert!(
        confirmed - asked <= Duration::from_secs(3),
        "abort took {:?}",
        confirmed - asked
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Requests already inside Envoy when it confirmed may still reach the canary, and
    // the upstream notes a request's arrival a moment later: 500 ms of grace for those.
    let late: Vec<_> = bench
        .canary
        .requests()
        .into_iter()
        .filter(|r| r.at > confirmed + Duration::from_millis(500))
        .collect();
    assert!(
        late.is_empty(),
        "{} requests reached the canary after the abort",
        late.len()
    );
    assert_eq!(bench.ecds_canary_weight(), 0);
    assert_eq!(
        run.wait(Duration::from_secs(5)).await,
        Some(3),
        "{}",
        run.transcript()
    );
    assert!(run
        .wait_event("aborted", Duration::ZERO, |_| true)
        .await
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_exits_2_naming_every_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("policy.json"), base_policy().to_string()).expect("policy");
    let spec = dir.path().join("bad.yaml");
    std::fs::write(
        &spec,
        "policy: policy.json\nsplit_rule: nope\ncanary: canary\nsteps: [50, 10]\ninterval: fast\nsink: {}\n",
    )
    .expect("spec");
    for command in ["run", "validate", "render", "status", "abort"] {
        let out = std::process::Command::new(paths::meshcanary_bin())
            .args([command, &spec.display().to_string()])
            .output()
            .expect("meshcanary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        for expected in [
            "split_rule: the policy has no rule \"nope\"",
            "steps: the last step must be 100",
            "interval: \"fast\" is not a duration",
            "sink: expected ecds_file",
        ] {
            assert!(
                stderr.contains(expected),
                "{command}: missing {expected:?} in:\n{stderr}"
            );
        }
    }
    let usage = std::process::Command::new(paths::meshcanary_bin())
        .arg("frobnicate")
        .output()
        .expect("meshcanary");
    assert_eq!(usage.status.code(), Some(2), "usage errors exit 2");
    let _ = dir;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_prints_exactly_what_the_sink_writes() {
    let mut bench = Bench::start(Behaviour::default(), Behaviour::default(), |spec, _| {
        spec["step_min_duration"] = json!("60s");
    })
    .await;
    bench.start_load(100);
    let mut run = Controller::run(&bench.spec);
    assert!(run
        .wait_event("applied", Duration::from_secs(20), |e| e["weight"] == 20)
        .await
        .is_some());
    run.kill().await;
    let render = |_: ()| {
        std::process::Command::new(paths::meshcanary_bin())
            .args(["render", &bench.spec_arg()])
            .output()
            .expect("render")
    };
    let first = render(());
    let second = render(());
    assert!(first.status.success());
    assert_eq!(first.stdout, second.stdout, "deterministic");
    let written = std::fs::read_to_string(&bench.ecds).expect("ECDS");
    assert_eq!(
        String::from_utf8_lossy(&first.stdout).trim_end(),
        written.trim_end()
    );
    let _ = &bench.dir;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_as_the_source_promotes_a_healthy_canary_and_rolls_back_a_broken_one() {
    use meshcanary_e2e::prometheus::{prometheus_available, PrometheusServer};
    if !prometheus_available("prometheus_as_the_source") {
        return;
    }
    for (canary, expected_code, expected_weights) in [
        (Behaviour::default(), 0, vec![20, 50, 100]),
        (
            Behaviour {
                error_rate: 0.5,
                ..Behaviour::default()
            },
            3,
            vec![20, 0],
        ),
    ] {
        let mut prometheus: Option<PrometheusServer> = None;
        let mut admin = String::new();
        let mut bench = Bench::start(Behaviour::default(), canary, |spec, envoy| {
            admin = envoy.admin.clone();
            // The sink still confirms each update through Envoy's admin.
            spec["sink"]["ecds_file"]["admin"] = json!([envoy.admin]);
        })
        .await;
        let server = PrometheusServer::start(std::slice::from_ref(&admin)).await;
        let mut spec: Value =
            serde_json::from_str(&std::fs::read_to_string(&bench.spec).expect("spec"))
                .expect("json");
        spec["source"] = json!({"prometheus": {"url": server.url}});
        std::fs::write(&bench.spec, spec.to_string()).expect("spec");
        prometheus.replace(server);
        bench.start_load(300);
        let mut run = Controller::run(&bench.spec);
        assert_eq!(
            run.wait(RUN_LIMIT).await,
            Some(expected_code),
            "{}",
            run.transcript()
        );
        assert_eq!(
            applied_weights(&run),
            expected_weights,
            "{}",
            run.transcript()
        );
        drop(prometheus);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reports_metrics_and_starts_a_new_rollout_when_the_spec_changes() {
    let mut bench = Bench::start(Behaviour::default(), Behaviour::default(), |_, _| {}).await;
    bench.start_load(300);
    let mut serve = Controller::spawn(&["serve", &bench.spec_arg(), "--listen", "127.0.0.1:0"]);
    let listen = serve.serving_address(RUN_LIMIT).await;
    let done = serve.wait_event("finished", RUN_LIMIT, |_| true).await;
    assert!(done.is_some(), "{}", serve.transcript());
    let client = reqwest::Client::new();
    let health = client
        .get(format!("http://{listen}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
    let metrics = client
        .get(format!("http://{listen}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for expected in [
        "meshcanary_rollouts_started_total 1",
        "meshcanary_rollouts_finished_total{kind=\"promoted\"} 1",
        "meshcanary_verdicts_total{kind=\"complete\"} 1",
        "meshcanary_canary_weight_percent 100",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in:\n{metrics}"
        );
    }
    // A new release: the spec's content changes, and a new rollout starts by itself.
    let mut spec: Value =
        serde_json::from_str(&std::fs::read_to_string(&bench.spec).expect("spec")).expect("json");
    spec["steps"] = json!([25, 100]);
    std::fs::write(&bench.spec, spec.to_string()).expect("spec");
    let restarted = serve
        .wait_event("applied", Duration::from_secs(30), |e| e["weight"] == 25)
        .await;
    assert!(restarted.is_some(), "{}", serve.transcript());
    serve.terminate();
    assert_eq!(
        serve.wait(Duration::from_secs(10)).await,
        Some(0),
        "{}",
        serve.transcript()
    );
}

// --- Faults around the controller ----------------------------------------------------------
//
// Each of these breaks one thing the controller depends on — its metrics, the proxy, the
// disk, the clock — in a real process, while a real rollout runs, and checks that the
// controller holds or retries as the README says, never promotes on what it could not see,
// and finishes the rollout once the fault is gone.

/// The events of `kind` that arrived in `[from, to]`.
fn events_between(run: &Controller, kinds: &[&str], from: Instant, to: Instant) -> Vec<Value> {
    run.events()
        .into_iter()
        .filter(|e| kinds.contains(&e.kind()) && e.at >= from && e.at <= to)
        .map(|e| e.json)
        .collect()
}

/// Puts the metrics behind `proxy` through each fault in turn (no healthy answer in
/// between) while `run` drives a healthy canary: each fault lasts until the controller
/// reported it with a reason naming it (`expected`), and at least `hold`. Then checks that
/// nothing was promoted or applied from the moment the first fault could be seen until the
/// metrics answered again.
async fn hold_through_metric_faults(
    run: &Controller,
    proxy: &meshcanary_e2e::faults::FaultProxy,
    faults: &[(meshcanary_e2e::faults::Fault, Duration, &str)],
) {
    use meshcanary_e2e::faults::Fault;
    let first = Instant::now();
    for (fault, hold, expected) in faults {
        let since = Instant::now();
        proxy.set(fault.clone());
        // A slow answer's read may still be pending from the fault before: allow for two
        // source timeouts (5 s for Prometheus) before calling the fault unreported.
        let deadline = since + Duration::from_secs(15);
        loop {
            let reported = events_between(run, &["source"], since, Instant::now())
                .iter()
                .any(|e| {
                    e["error"]
                        .as_str()
                        .is_some_and(|text| text.contains(expected))
                });
            if reported {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{fault:?}: no `source` event naming {expected:?}\n{}",
                run.transcript()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(hold.saturating_sub(since.elapsed())).await;
    }
    let healed = Instant::now();
    proxy.set(Fault::Pass);
    // A read that started just before the first fault may still judge on good data: one
    // interval (500 ms) of grace, plus scheduling slack.
    let acted = events_between(
        run,
        &["promote", "complete", "applied"],
        first + Duration::from_millis(800),
        healed,
    );
    assert!(
        acted.is_empty(),
        "acted while the metrics were failing: {acted:?}\n{}",
        run.transcript()
    );
}

/// A healthy rollout whose metrics — Envoy's admin, or a real Prometheus scraping it when
/// `prometheus` — are read through a fault-injecting proxy, put through `faults` (see
/// [`hold_through_metric_faults`]) once the first step is applied; it must then finish.
async fn metric_faults_hold_the_rollout(
    prometheus: bool,
    faults: &[(meshcanary_e2e::faults::Fault, Duration, &str)],
) {
    use meshcanary_e2e::faults::FaultProxy;
    use meshcanary_e2e::prometheus::PrometheusServer;
    let mut admin = String::new();
    let mut bench = Bench::start(Behaviour::default(), Behaviour::default(), |spec, envoy| {
        admin = envoy.admin.clone();
        spec["step_min_duration"] = json!("1s");
        // The faults last longer than the default 10 s of the bench: no data for that long
        // is what `no_data_timeout` is for, tested elsewhere.
        spec["analysis"]["no_data_timeout"] = json!("60s");
        // Updates are confirmed through the real admin; only metrics go through the faults.
        spec["sink"]["ecds_file"]["admin"] = json!([envoy.admin]);
    })
    .await;
    let server = match prometheus {
        true => Some(PrometheusServer::start(std::slice::from_ref(&admin)).await),
        false => None,
    };
    let proxy = FaultProxy::start(server.as_ref().map_or(&admin, |p| &p.url)).await;
    let mut spec: Value =
        serde_json::from_str(&std::fs::read_to_string(&bench.spec).expect("spec")).expect("json");
    spec["source"] = match prometheus {
        true => json!({"prometheus": {"url": proxy.url()}}),
        false => json!({"envoy_admin": [proxy.url()]}),
    };
    std::fs::write(&bench.spec, spec.to_string()).expect("spec");
    bench.start_load(300);
    let mut run = Controller::run(&bench.spec);
    assert!(
        run.wait_event("applied", Duration::from_secs(20), |e| e["weight"] == 20)
            .await
            .is_some(),
        "{}",
        run.transcript()
    );
    hold_through_metric_faults(&run, &proxy, faults).await;
    assert_eq!(bench.ecds_canary_weight(), 2_000, "held at the first step");
    assert_eq!(run.wait(RUN_LIMIT).await, Some(0), "{}", run.transcript());
    assert_eq!(applied_weights(&run), vec![20, 50, 100]);
    assert!(
        run.wait_event("source", Duration::ZERO, |e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("readable again")))
            .await
            .is_some(),
        "{}",
        run.transcript()
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_answering_500_slowly_or_garbage_holds_the_rollout_until_it_answers_again() {
    use meshcanary_e2e::faults::Fault;
    metric_faults_hold_the_rollout(
        false,
        &[
            (Fault::Status(500), Duration::from_secs(2), "500"),
            // Longer than the admin source's 2 s timeout.
            (
                Fault::Slow(Duration::from_secs(4)),
                Duration::ZERO,
                "timed out",
            ),
            (Fault::Garbage, Duration::from_secs(2), "unexpected answer"),
            (
                Fault::WrongShape,
                Duration::from_secs(2),
                "unexpected answer",
            ),
            (
                Fault::Truncated,
                Duration::from_secs(2),
                "unexpected answer",
            ),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_answering_500_slowly_or_garbage_holds_the_rollout_until_it_answers_again() {
    use meshcanary_e2e::faults::Fault;
    if !meshcanary_e2e::prometheus::prometheus_available("a_prometheus_answering_500") {
        return;
    }
    metric_faults_hold_the_rollout(
        true,
        &[
            (Fault::Status(503), Duration::from_secs(2), "503"),
            // Longer than the Prometheus source's 5 s timeout.
            (
                Fault::Slow(Duration::from_secs(7)),
                Duration::ZERO,
                "timed out",
            ),
            (Fault::Garbage, Duration::from_secs(2), "unexpected answer"),
            // Prometheus answers errors as JSON with `"status": "error"`; anything else
            // without `"status": "success"` is refused the same way.
            (Fault::WrongShape, Duration::from_secs(2), "refused"),
        ],
    )
    .await;
}

/// Kills `bench`'s Envoy and starts it again with the same configuration, reading the
/// ECDS file — after `before_start` (which may replace the file) — and points the
/// forwarders at it once `gap` has passed since the kill. When it was killed.
async fn restart_envoy(
    bench: &mut Bench,
    admin_fwd: &Forwarder,
    listener_fwd: &Forwarder,
    gap: Duration,
    before_start: impl FnOnce(&Bench),
) -> Instant {
    let killed = Instant::now();
    bench.envoy.kill().await;
    before_start(bench);
    let mut config = EnvoyConfig::stable_canary(
        FilterSource::Ecds(bench.ecds.clone()),
        bench.stable.addr,
        bench.canary.addr,
    );
    config.stats_flush_interval = Some(Duration::from_secs(1));
    bench.envoy = Envoy::start(&config).await.expect("envoy starts again");
    tokio::time::sleep(gap.saturating_sub(killed.elapsed())).await;
    admin_fwd.set_target(
        bench
            .envoy
            .admin
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok())
            .expect("admin address"),
    );
    listener_fwd.set_target(bench.envoy.listener);
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_restarted_mid_rollout_gets_its_step_again_and_the_gap_never_counts() {
    // Clients (the controller, the load) reach Envoy through forwarders, so the restarted
    // Envoy, on new ports, stays where they know it — as a pod's address would.
    let mut admin_fwd = None;
    let mut listener_fwd = None;
    let mut bench = Bench::start(Behaviour::default(), Behaviour::default(), |spec, envoy| {
        admin_fwd = envoy
            .admin
            .strip_prefix("http://")
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
        listener_fwd = Some(envoy.listener);
        spec["step_min_duration"] = json!("4s");
        spec["analysis"]["no_data_timeout"] = json!("30s");
    })
    .await;
    let admin_fwd = Forwarder::start(admin_fwd.expect("admin address")).await;
    let listener_fwd = Forwarder::start(listener_fwd.expect("listener")).await;
    let mut spec: Value =
        serde_json::from_str(&std::fs::read_to_string(&bench.spec).expect("spec")).expect("json");
    let admin_url = format!("http://{}", admin_fwd.addr);
    spec["source"]["envoy_admin"] = json!([admin_url]);
    spec["sink"]["ecds_file"]["admin"] = json!([admin_url]);
    std::fs::write(&bench.spec, spec.to_string()).expect("spec");
    bench.start_load_at(&format!("http://{}/", listener_fwd.addr), 300);
    let mut run = Controller::run(&bench.spec);

    // 1. A crash at 20 %: Envoy comes back reading the same file, so it runs the step's
    //    version; the controller confirms that and writes nothing.
    let at_20 = run
        .wait_event("applied", Duration::from_secs(20), |e| e["weight"] == 20)
        .await
        .unwrap_or_else(|| panic!("no first step\n{}", run.transcript()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed = restart_envoy(
        &mut bench,
        &admin_fwd,
        &listener_fwd,
        Duration::from_secs(2),
        |_| {},
    )
    .await;
    let confirmed = run
        .wait_event("confirmed", Duration::from_secs(15), |e| e["weight"] == 20)
        .await
        .unwrap_or_else(|| panic!("the restart was not confirmed\n{}", run.transcript()));
    assert!(confirmed.at > killed);
    assert_eq!(confirmed.json["generation"], at_20.json["generation"]);
    let early = events_between(
        &run,
        &["promote", "complete", "applied"],
        killed,
        confirmed.at,
    );
    assert!(early.is_empty(), "acted across the gap: {early:?}");

    // 2. A crash at 50 %: Envoy comes back with the file its pod starts with (the canary
    //    at 0 %). The controller applies the step again, and the step's 4 s start over
    //    once Envoy confirms it.
    let at_50 = run
        .wait_event("applied", RUN_LIMIT, |e| e["weight"] == 50)
        .await
        .unwrap_or_else(|| panic!("no second step\n{}", run.transcript()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed = restart_envoy(
        &mut bench,
        &admin_fwd,
        &listener_fwd,
        Duration::from_secs(2),
        |bench| write_ecds(&bench.ecds, "initial", &base_policy().to_string()),
    )
    .await;
    let restart = run
        .wait_event("restart", Duration::from_secs(15), |e| e["weight"] == 50)
        .await
        .unwrap_or_else(|| panic!("the second restart was not seen\n{}", run.transcript()));
    assert!(restart.at > killed);
    let reapplied = run
        .wait_event("applied", Duration::from_secs(15), |e| {
            e["weight"] == 50 && e["generation"].as_u64() > at_50.json["generation"].as_u64()
        })
        .await
        .unwrap_or_else(|| panic!("the step was not applied again\n{}", run.transcript()));
    let early = events_between(&run, &["promote", "complete"], killed, reapplied.at);
    assert!(early.is_empty(), "promoted across the gap: {early:?}");
    assert_eq!(run.wait(RUN_LIMIT).await, Some(0), "{}", run.transcript());
    assert_eq!(
        applied_weights(&run),
        vec![20, 50, 50, 100],
        "{}",
        run.transcript()
    );
    let complete = run
        .wait_event("complete", Duration::ZERO, |_| true)
        .await
        .expect("completed");
    // The step's 4 s, less 1 s for the moments at which this test reads the two events.
    // A step clock gone on from the first apply, 3.5 s or more before the step was
    // applied again, would end within about a second of that.
    assert!(
        complete.at.duration_since(reapplied.at) >= Duration::from_secs(3),
        "the step's clock restarts once the step is confirmed again: completed {:?} after it\n{}",
        complete.at.duration_since(reapplied.at),
        run.transcript()
    );
    // The restarted Envoy runs what the controller confirmed last.
    let users: Vec<String> = (0..100).map(|i| format!("after-restart-{i}")).collect();
    let answers = route_keys(&bench.envoy, "x-user-id", &users, 2).await;
    assert!(answers.iter().all(|a| a == "canary"), "{answers:?}");
}

/// The uid the test runs the controller as when the test itself runs as root (root
/// writes through any permission): `nobody`.
const UNPRIVILEGED: u32 = 65534;

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_unwritable_ecds_directory_holds_the_step_until_it_can_be_written() {
    use std::os::unix::fs::PermissionsExt;
    let mut bench = Bench::start(Behaviour::default(), Behaviour::default(), |spec, _| {
        spec["step_min_duration"] = json!("1s");
        spec["analysis"]["no_data_timeout"] = json!("60s");
    })
    .await;
    let dir = bench.dir.path().to_path_buf();
    let root = running_as_root();
    let mut command = if root {
        // Permissions bind only a user that is not root: run the controller as `nobody`,
        // from copies of its binary and the module that `nobody` can read wherever the
        // checkout lives.
        let bin = dir.join("meshcanary");
        std::fs::copy(paths::meshcanary_bin(), &bin).expect("copy the controller");
        let wasm = dir.join("filter.wasm");
        std::fs::copy(paths::wasm(), &wasm).expect("copy the module");
        let mut spec: Value =
            serde_json::from_str(&std::fs::read_to_string(&bench.spec).expect("spec"))
                .expect("json");
        spec["sink"]["ecds_file"]["wasm"] = json!(wasm);
        std::fs::write(&bench.spec, spec.to_string()).expect("spec");
        for entry in std::fs::read_dir(&dir).expect("dir") {
            let path = entry.expect("entry").path();
            std::os::unix::fs::chown(&path, Some(UNPRIVILEGED), Some(UNPRIVILEGED)).expect("chown");
        }
        std::os::unix::fs::chown(&dir, Some(UNPRIVILEGED), Some(UNPRIVILEGED)).expect("chown");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut command = tokio::process::Command::new("setpriv");
        command
            .args(["--reuid", &UNPRIVILEGED.to_string()])
            .args(["--regid", &UNPRIVILEGED.to_string()])
            .arg("--clear-groups")
            .arg(&bin);
        command
    } else {
        tokio::process::Command::new(paths::meshcanary_bin())
    };
    command.arg("run").arg(&bench.spec).kill_on_drop(true);
    bench.start_load(300);
    let mut run = Controller::start_command(command).expect("start the controller");
    assert!(
        run.wait_event("applied", Duration::from_secs(20), |e| e["weight"] == 20)
            .await
            .is_some(),
        "{}",
        run.transcript()
    );

    // A full disk: every temporary file the sink writes (policy and record) is /dev/full,
    // so writing it fails with ENOSPC as a full file system does.
    let tmp_files = [
        dir.join("checkout.ecds.json.tmp"),
        dir.join("checkout.ecds.json.state.json.tmp"),
    ];
    // Installed while the controller is stopped and between two writes (no temporary file
    // exists): a write in progress would otherwise rename the symlink over its target.
    loop {
        run.signal("STOP");
        if tmp_files.iter().all(|tmp| !tmp.exists()) {
            break;
        }
        run.signal("CONT");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for tmp in &tmp_files {
        std::os::unix::fs::symlink("/dev/full", tmp).expect("symlink to /dev/full");
    }
    run.signal("CONT");
    let full_since = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let errors = events_between(&run, &["error"], full_since, Instant::now());
    assert!(
        errors.iter().any(|e| e["error"]
            .as_str()
            .is_some_and(|t| t.contains("No space left on device"))),
        "{}",
        run.transcript()
    );
    assert_eq!(bench.ecds_canary_weight(), 2_000, "still at the first step");
    assert_eq!(run.try_wait().expect("wait"), None, "still running");
    for tmp in &tmp_files {
        let removed = std::fs::remove_file(tmp);
        assert!(
            removed.is_ok(),
            "{}: {removed:?}\n{}",
            tmp.display(),
            run.transcript()
        );
    }
    let at_50 = run
        .wait_event("applied", Duration::from_secs(10), |e| e["weight"] == 50)
        .await
        .unwrap_or_else(|| panic!("not promoted once the disk had room\n{}", run.transcript()));
    assert!(at_50.at >= full_since + Duration::from_secs(3));

    // A directory the controller may not write to.
    let unwritable_since = Instant::now();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let errors = events_between(&run, &["error"], unwritable_since, Instant::now());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    assert!(
        errors.iter().any(|e| e["error"]
            .as_str()
            .is_some_and(|t| t.contains("Permission denied"))),
        "{}",
        run.transcript()
    );
    let acted = events_between(
        &run,
        &["applied"],
        unwritable_since,
        unwritable_since + Duration::from_secs(3),
    );
    assert!(acted.is_empty(), "{acted:?}");
    assert_eq!(run.wait(RUN_LIMIT).await, Some(0), "{}", run.transcript());
    assert_eq!(applied_weights(&run), vec![20, 50, 100]);
    let text = std::fs::read_to_string(&bench.ecds).expect("ECDS file");
    assert!(
        serde_json::from_str::<Value>(&text).is_ok(),
        "never half-written"
    );
}

/// libfaketime, which the test preloads into the controller to step its wall clock.
fn libfaketime() -> PathBuf {
    if let Some(path) = std::env::var_os("MESHCANARY_LIBFAKETIME") {
        return PathBuf::from(path);
    }
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|arch| arch.path().join("faketime/libfaketime.so.1"))
        .find(|path| path.exists());
    found.unwrap_or_else(|| {
        panic!(
            "libfaketime not found: install it with `apt-get install faketime` (make test \
             does), or set MESHCANARY_LIBFAKETIME"
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_step_while_it_runs_neither_shortens_nor_stretches_a_step() {
    let mut bench = Bench::start(Behaviour::default(), Behaviour::default(), |spec, _| {
        spec["step_min_duration"] = json!("4s");
        spec["analysis"]["no_data_timeout"] = json!("10s");
        spec["analysis"]["on_no_data"] = json!("rollback");
    })
    .await;
    // The controller's wall clock is real time plus the offset in this file, read at every
    // call; its monotonic clock is left alone, as an NTP step leaves it.
    let clock = bench.dir.path().join("clock-offset");
    std::fs::write(&clock, "+0\n").expect("clock file");
    let mut command = tokio::process::Command::new(paths::meshcanary_bin());
    command
        .arg("run")
        .arg(&bench.spec)
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME_TIMESTAMP_FILE", &clock)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .kill_on_drop(true);
    bench.start_load(300);
    let mut run = Controller::start_command(command).expect("start the controller");
    let at_20 = run
        .wait_event("applied", Duration::from_secs(20), |e| e["weight"] == 20)
        .await
        .unwrap_or_else(|| panic!("{}", run.transcript()));
    // One hour forward: counted as time, it would end the step's 4 s at once (and make
    // the last data look an hour old).
    std::fs::write(&clock, "+3600\n").expect("clock file");
    let at_50 = run
        .wait_event("applied", RUN_LIMIT, |e| e["weight"] == 50)
        .await
        .unwrap_or_else(|| panic!("{}", run.transcript()));
    // The step's 4 s, less 1 s for the moments at which this test reads the two events
    // (a step shortened by the clock's jump would end at the next 0.5 s tick).
    let step = at_50.at.duration_since(at_20.at);
    assert!(
        step >= Duration::from_secs(3),
        "a forward step shortened the first step to {step:?}\n{}",
        run.transcript()
    );
    // Two hours back: counted as time, the second step would wait for the clock to catch up.
    std::fs::write(&clock, "-3600\n").expect("clock file");
    assert_eq!(
        run.wait(Duration::from_secs(30)).await,
        Some(0),
        "a backward step stalled or failed the rollout\n{}",
        run.transcript()
    );
    let at_100 = run
        .wait_event("applied", Duration::ZERO, |e| e["weight"] == 100)
        .await
        .expect("promoted");
    let step = at_100.at.duration_since(at_50.at);
    assert!(
        step >= Duration::from_secs(3) && step <= Duration::from_secs(15),
        "second step took {step:?}\n{}",
        run.transcript()
    );
    assert_eq!(applied_weights(&run), vec![20, 50, 100]);
}

/// Runs `meshcanary <args> --output json` to its end: exit code, JSON lines, stderr and
/// how long it took.
async fn meshcanary(args: &[&str]) -> (Option<i32>, Vec<Value>, String, Duration) {
    let started = Instant::now();
    let output = Command::new(paths::meshcanary_bin())
        .args(args)
        .args(["--output", "json"])
        .output()
        .await
        .expect("run meshcanary");
    let lines = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (
        output.status.code(),
        lines,
        String::from_utf8_lossy(&output.stderr).into_owned(),
        started.elapsed(),
    )
}

/// The rollout record the ECDS file sink keeps next to the file.
fn saved_record(bench: &Bench) -> Value {
    meshcanary_e2e::controller::saved_record(&bench.ecds)
}

/// One interval of the specs below (1 s), plus 2 s for the CLI's start and polling
/// (200 ms) and the sink's apply and Envoy's confirmation on a slow, loaded machine.
/// Still well short of what the commands are tested against: the 60 s step a promote
/// skips, the 5 s step a pause must land within, the 5 s a resumed step would wait had
/// its evidence been dropped.
const ONE_INTERVAL_AND_SLACK: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_the_weight_against_a_passing_verdict_and_resume_lets_it_act() {
    // The engine would pass step 1 after 5 s; the pause comes first and holds it.
    let mut bench = Bench::start(Behaviour::default(), Behaviour::default(), |spec, _| {
        spec["step_min_duration"] = json!("5s");
        spec["interval"] = json!("1s");
    })
    .await;
    bench.start_load(300);
    let mut run = Controller::run(&bench.spec);
    assert!(
        run.wait_event("applied", Duration::from_secs(20), |e| e["weight"] == 20)
            .await
            .is_some(),
        "{}",
        run.transcript()
    );
    let (code, lines, stderr, took) = meshcanary(&["pause", &bench.spec_arg()]).await;
    assert_eq!(code, Some(0), "{lines:?}\n{stderr}\n{}", run.transcript());
    println!("pause confirmed in {took:?}");
    assert!(took <= ONE_INTERVAL_AND_SLACK, "pause took {took:?}");
    let confirmed = lines
        .iter()
        .find(|l| l["event"] == "pause")
        .expect("confirmation");
    assert_eq!(confirmed["confirmed"], true);
    // Paused past the step's 5 s: the verdicts are reported, the weight stays.
    let held = run
        .wait_event("paused", Duration::from_secs(15), |e| {
            e["verdict"] == "promote"
        })
        .await;
    assert!(held.is_some(), "{}", run.transcript());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(applied_weights(&run), vec![20], "{}", run.transcript());
    assert_eq!(bench.ecds_canary_weight(), 2_000);
    // Who and since when, in the record and in `status`.
    let record = saved_record(&bench);
    let request = record["control"]["paused"]["request"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(request.contains("via meshcanary pause"), "{record}");
    assert!(record["control"]["paused"]["since_unix_ms"]
        .as_u64()
        .is_some());
    let (code, status, _, _) = meshcanary(&["status", &bench.spec_arg()]).await;
    assert_eq!(code, Some(0));
    assert_eq!(status[0]["paused"]["request"], json!(request), "{status:?}");
    assert!(
        status[0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Paused by"),
        "{status:?}"
    );

    let resumed_at = Instant::now();
    let (code, lines, stderr, took) = meshcanary(&["resume", &bench.spec_arg()]).await;
    assert_eq!(code, Some(0), "{lines:?}\n{stderr}");
    println!("resume confirmed in {took:?}");
    assert!(took <= ONE_INTERVAL_AND_SLACK, "resume took {took:?}");
    // The evidence gathered while paused counts: the step passes at the first tick.
    let promoted = run
        .wait_event("promote", Duration::from_secs(10), |_| true)
        .await
        .expect("promoted after resume");
    println!("promoted {:?} after the resume", promoted.at - resumed_at);
    assert!(
        promoted.at - resumed_at <= ONE_INTERVAL_AND_SLACK,
        "{:?}\n{}",
        promoted.at - resumed_at,
        run.transcript()
    );
    let record = saved_record(&bench);
    let commands: Vec<&str> = record["control"]["commands"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["command"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(commands, vec!["pause", "resume"], "{record}");
    assert!(record["control"]["paused"].is_null(), "{record}");
    // Not paused any more: the rollout ends as it would have.
    assert_eq!(run.wait(RUN_LIMIT).await, Some(0), "{}", run.transcript());
    assert_eq!(applied_weights(&run), vec![20, 50, 100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_skips_the_rest_of_a_step_within_one_interval() {
    let mut bench = Bench::start(Behaviour::default(), Behaviour::default(), |spec, _| {
        spec["step_min_duration"] = json!("60s");
        spec["interval"] = json!("1s");
    })
    .await;
    bench.start_load(300);
    let mut run = Controller::run(&bench.spec);
    assert!(run
        .wait_event("applied", Duration::from_secs(20), |e| e["weight"] == 20)
        .await
        .is_some());
    for (weight, event) in [(50, "promote"), (100, "complete")] {
        let (code, lines, stderr, took) = meshcanary(&["promote", &bench.spec_arg()]).await;
        assert_eq!(code, Some(0), "{lines:?}\n{stderr}\n{}", run.transcript());
        println!("promote to {weight} % confirmed in {took:?}");
        assert!(took <= ONE_INTERVAL_AND_SLACK, "promote took {took:?}");
        let applied = run
            .wait_event("applied", Duration::from_secs(5), |e| e["weight"] == weight)
            .await;
        assert!(applied.is_some(), "{}", run.transcript());
        let verdict = run
            .wait_event(event, Duration::ZERO, |e| e["operator"].is_string())
            .await;
        assert!(verdict.is_some(), "{}", run.transcript());
    }
    assert_eq!(
        run.wait(Duration::from_secs(10)).await,
        Some(0),
        "{}",
        run.transcript()
    );
    assert_eq!(bench.ecds_canary_weight(), 10_000);
    let record = saved_record(&bench);
    let promotes: Vec<&Value> = record["control"]["commands"]
        .as_array()
        .map(|a| a.iter().filter(|c| c["command"] == "promote").collect())
        .unwrap_or_default();
    assert_eq!(promotes.len(), 2, "{record}");
    assert!(promotes
        .iter()
        .all(|c| c["accepted"] == true && c.get("forced").is_none()));
    // No controller any more: a command is not confirmed, exits 1 and leaves no mark.
    let (code, _, stderr, _) = meshcanary(&["pause", &bench.spec_arg(), "--timeout", "1"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no controller confirmed"), "{stderr}");
    let mut mark = bench.ecds.clone().into_os_string();
    mark.push(".pause");
    assert!(!PathBuf::from(mark).exists(), "the pause mark is withdrawn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_reports_a_rollback_verdict_while_traffic_keeps_flowing_to_the_broken_canary() {
    let broken = Behaviour {
        error_rate: 0.5,
        ..Behaviour::default()
    };
    let mut bench = Bench::start(Behaviour::default(), broken, |spec, _| {
        spec["analysis"]["dry_run"] = json!(true);
        spec["interval"] = json!("1s");
    })
    .await;
    bench.start_load(300);
    // `serve DIR`: the folder's one spec, with /metrics.
    let dir = bench.dir.path().display().to_string();
    let mut serve = Controller::spawn(&["serve", &dir, "--listen", "127.0.0.1:0"]);
    let listen = serve.serving_address(Duration::from_secs(20)).await;
    let would = serve
        .wait_event("would_rollback", Duration::from_secs(20), |_| true)
        .await
        .unwrap_or_else(|| panic!("no would_rollback\n{}", serve.transcript()));
    assert_eq!(would.json["dry_run"], true);
    assert_eq!(would.json["verdict"], "rollback");
    assert_eq!(would.json["applied"], false);
    assert!(
        would.json["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("would roll back: "),
        "{}",
        would.json
    );
    // Traffic keeps flowing to the canary, at its weight.
    let before = bench.canary.count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = bench.canary.count();
    println!(
        "canary requests in the 3 s after the would-roll-back: {}",
        after - before
    );
    assert!(after - before > 100, "{before} → {after}");
    assert_eq!(bench.ecds_canary_weight(), 2_000);
    assert!(
        serve
            .events()
            .iter()
            .all(|e| e.kind() != "rollback" && e.kind() != "finished"),
        "{}",
        serve.transcript()
    );
    let record = saved_record(&bench);
    assert!(
        record["control"]["would_roll_back"]["count"].as_u64() >= Some(1),
        "{record}"
    );
    assert_eq!(record["state"]["phase"], "progressing", "{record}");
    // Promote is refused past the failing verdict; --force skips it and is recorded.
    let spec = bench.spec_arg();
    let (code, _, stderr, _) = meshcanary(&["promote", &spec]).await;
    assert_eq!(code, Some(1), "{stderr}\n{}", serve.transcript());
    assert!(
        stderr.contains("refused") && stderr.contains("--force"),
        "{stderr}"
    );
    let (code, lines, stderr, _) = meshcanary(&["promote", "--force", &spec]).await;
    assert_eq!(code, Some(0), "{lines:?}\n{stderr}\n{}", serve.transcript());
    assert!(serve
        .wait_event("applied", Duration::from_secs(5), |e| e["weight"] == 50)
        .await
        .is_some());
    let record = saved_record(&bench);
    let last = record["control"]["commands"]
        .as_array()
        .and_then(|a| a.last().cloned())
        .unwrap_or_default();
    assert_eq!(
        (&last["accepted"], &last["forced"]),
        (&json!(true), &json!(true)),
        "{record}"
    );
    let metrics = reqwest::get(format!("http://{listen}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for expected in [
        "meshcanary_operator_commands_total{kind=\"promote_refused\"} 1",
        "meshcanary_operator_commands_total{kind=\"promote\"} 1",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in:\n{metrics}"
        );
    }
    assert!(
        metrics
            .lines()
            .filter_map(|l| l.strip_prefix("meshcanary_dry_run_rollbacks_total "))
            .any(|n| n.parse::<u64>().is_ok_and(|n| n >= 1)),
        "{metrics}"
    );
    let (code, status, _, _) = meshcanary(&["status", &dir]).await;
    assert_eq!(code, Some(0));
    assert_eq!(status[0]["dry_run"], true, "{status:?}");
    serve.terminate();
    assert_eq!(
        serve.wait(Duration::from_secs(10)).await,
        Some(0),
        "{}",
        serve.transcript()
    );
}
