//! The controller's webhooks and notifications end to end: the real `meshcanary` binary
//! drives a real Envoy through its ECDS file under load, and its hooks and notification
//! targets are real HTTP receivers on loopback (recording upstreams of the harness) that
//! record every POST and answer the status a test sets while the rollout runs.
//!
//! Rollouts are short (steps 20 → 50 → 100 %, 2 s minimum per step, 0.5 s ticks) so each
//! test ends in seconds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshcanary_e2e::controller::{Controller, Event};
use meshcanary_e2e::{paths, write_ecds, Behaviour, Envoy, EnvoyConfig, FilterSource, Upstream};
use serde_json::{json, Value};
use tokio::process::Child;

const RUN_LIMIT: Duration = Duration::from_secs(60);

fn base_policy(name: &str) -> Value {
    json!({
        "name": name,
        "variants": ["stable", "canary"],
        "rules": [
            {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "checkout-v2",
                "weights": [{"variant": "canary", "weight": 0}, {"variant": "stable", "weight": 100}]}}
        ]
    })
}

/// Envoy with a stable and a canary upstream, the spec (with the test's webhooks and
/// notify section) and the load generator; everything dies with it.
struct Rig {
    _dir: Option<tempfile::TempDir>,
    envoy: Envoy,
    canary: Upstream,
    spec: PathBuf,
    ecds: PathBuf,
    load: Option<Child>,
}

impl Rig {
    /// A rollout of policy `checkout` with its spec in a folder of its own (for `run`).
    async fn start(canary: Behaviour, hooks: Value, notify: Option<Value>) -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut rig = Rig::start_in(dir.path(), "checkout", canary, hooks, notify).await;
        rig._dir = Some(dir);
        rig
    }

    /// A rollout of policy `name`: its spec is `<root>/specs/<name>.yaml` (the folder
    /// `serve` reads), its policy and ECDS file are in `<root>/work/`.
    async fn start_in(
        root: &Path,
        name: &str,
        canary: Behaviour,
        hooks: Value,
        notify: Option<Value>,
    ) -> Rig {
        let stable = Upstream::start("stable").await;
        let canary = Upstream::start_with("canary", canary).await;
        let work = root.join("work");
        let specs = root.join("specs");
        std::fs::create_dir_all(&work).expect("work dir");
        std::fs::create_dir_all(&specs).expect("spec dir");
        let ecds = work.join(format!("{name}.ecds.json"));
        write_ecds(&ecds, "initial", &base_policy(name).to_string());
        let mut config =
            EnvoyConfig::stable_canary(FilterSource::Ecds(ecds.clone()), stable.addr, canary.addr);
        config.stats_flush_interval = Some(Duration::from_secs(1));
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
            "analysis": {"max_error_rate": 0.05, "max_slow_rate": 0.05, "min_requests": 100,
                         "no_data_timeout": "10s"},
            "source": {"envoy_admin": [envoy.admin.clone()]},
            "sink": {"ecds_file": {"path": ecds.clone(), "wasm": paths::wasm()}},
            "webhooks": hooks,
        });
        if let Some(notify) = notify {
            spec["notify"] = notify;
        }
        let spec_path = specs.join(format!("{name}.yaml"));
        // JSON is YAML.
        std::fs::write(
            &spec_path,
            serde_json::to_string_pretty(&spec).expect("spec"),
        )
        .expect("spec file");
        // Keep the stable upstream alive as long as the rig: Envoy routes to it.
        std::mem::forget(stable);
        Rig {
            _dir: None,
            envoy,
            canary,
            spec: spec_path,
            ecds,
            load: None,
        }
    }

    /// `rps` requests/s from 5,000 users, for at most 90 s.
    fn start_load(&mut self, rps: u32) {
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_meshcanary-load"));
        let url = self.envoy.url("/");
        self.load = Some(meshcanary_e2e::controller::start_load(bin, &url, rps, 8));
    }

    /// The canary weight (basis points) in the ECDS file Envoy watches.
    fn ecds_canary_weight(&self) -> u64 {
        meshcanary_e2e::controller::ecds_canary_weight(&self.ecds, 0)
    }
}

/// A receiver answering `status` to every POST.
async fn receiver(name: &str, status: u16) -> Upstream {
    Upstream::start_with(
        name,
        Behaviour {
            status,
            ..Behaviour::default()
        },
    )
    .await
}

fn answer(receiver: &Upstream, status: u16) {
    receiver.set_behaviour(Behaviour {
        status,
        ..Behaviour::default()
    });
}

fn url(receiver: &Upstream, path: &str) -> String {
    format!("http://{}{}", receiver.addr, path)
}

/// The JSON bodies POSTed to `path`, in arrival order.
fn posts(receiver: &Upstream, path: &str) -> Vec<Value> {
    receiver
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == path)
        .map(|r| serde_json::from_slice(&r.body).expect("a JSON body"))
        .collect()
}

/// The events of one rollout of a `serve DIR` (its key) of one kind.
fn of(serve: &Controller, key: &str, kind: &str) -> Vec<Event> {
    serve
        .events()
        .into_iter()
        .filter(|e| e.json["rollout"] == key && e.kind() == kind)
        .collect()
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
async fn a_pre_rollout_gate_holds_the_first_weight_and_a_confirm_gate_holds_promotion_until_each_answers_2xx(
) {
    let smoke = receiver("smoke", 503).await;
    let approve = receiver("approve", 403).await;
    let hooks = json!([
        {"name": "smoke", "type": "pre-rollout", "url": url(&smoke, "/run"), "timeout": "1s",
         "retries": 0, "max_failures": 1000, "metadata": {"suite": "smoke"}},
        {"name": "approve", "type": "confirm-promotion", "url": url(&approve, "/approve"),
         "timeout": "1s", "retries": 0},
    ]);
    let mut rig = Rig::start(Behaviour::default(), hooks, None).await;
    rig.start_load(300);
    let started = Instant::now();
    let mut run = Controller::run(&rig.spec);

    // The smoke test refuses: the first weight waits, the canary gets nothing.
    let held = run
        .wait_event("hold", Duration::from_secs(15), |e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("pre-rollout hook smoke answered 503"))
        })
        .await;
    assert!(held.is_some(), "{}", run.transcript());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(applied_weights(&run), vec![0], "{}", run.transcript());
    assert_eq!(rig.ecds_canary_weight(), 0);
    assert_eq!(
        rig.canary.count(),
        0,
        "the canary got traffic before the gate passed"
    );
    let refused_calls = posts(&smoke, "/run").len();
    assert!(
        refused_calls >= 4,
        "called at every interval: {refused_calls}"
    );

    // It answers 2xx: the first weight follows within an interval or two.
    answer(&smoke, 200);
    let released = Instant::now();
    let first = run
        .wait_event("applied", Duration::from_secs(10), |e| e["weight"] == 20)
        .await
        .unwrap_or_else(|| panic!("first weight not applied\n{}", run.transcript()));
    println!(
        "pre-rollout: held {:?}, first weight {:?} after the 2xx",
        released - started,
        first.at - released
    );
    assert!(first.at - released <= Duration::from_secs(3));
    let body = posts(&smoke, "/run").pop().expect("a call");
    assert_eq!(body["type"], "pre-rollout");
    assert_eq!(body["hook"], "smoke");
    assert_eq!(body["weight"], 0);
    assert_eq!(body["phase"], "Progressing");
    assert_eq!(body["metadata"], json!({"suite": "smoke"}));
    assert_eq!(body["rollout"], "checkout");

    // The verdict wants to promote; the gate refuses: the step stays at 20 %.
    let gated = run
        .wait_event("hold", Duration::from_secs(20), |e| {
            e["reason"] == "gate approve answered 403"
        })
        .await
        .unwrap_or_else(|| panic!("no gate hold\n{}", run.transcript()));
    println!("gate hold: {}", gated.json["message"]);
    assert_eq!(gated.json["held"], "promote");
    assert!(gated.json["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("HOLD: gate approve answered 403")));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(applied_weights(&run), vec![0, 20], "{}", run.transcript());
    assert_eq!(rig.ecds_canary_weight(), 2_000, "held at the first step");
    let asked = posts(&approve, "/approve");
    assert!(
        asked.len() >= 3,
        "asked again at every interval: {}",
        asked.len()
    );
    let last = asked.last().expect("a call");
    assert_eq!(last["type"], "confirm-promotion");
    assert_eq!(last["weight"], 20);
    assert_eq!(last["next_weight"], 50);
    assert_eq!(last["verdict"], "promote");
    assert!(
        last["numbers"]["canary"]["requests"]
            .as_f64()
            .unwrap_or(0.0)
            >= 100.0,
        "{last}"
    );

    // Released: the rollout goes on to the end, each promotion asking again.
    answer(&approve, 200);
    let asked_before = asked.len();
    assert_eq!(run.wait(RUN_LIMIT).await, Some(0), "{}", run.transcript());
    assert_eq!(applied_weights(&run), vec![0, 20, 50, 100]);
    let later: Vec<Value> = posts(&approve, "/approve").split_off(asked_before);
    let next_weights: Vec<&Value> = later.iter().map(|b| &b["next_weight"]).collect();
    assert_eq!(
        next_weights,
        [&json!(50), &json!(100)],
        "one call per promotion"
    );
    assert_eq!(later[1]["verdict"], "complete");
    println!(
        "held at 20 % for {} gate calls; total {:?}",
        asked_before,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_reaches_the_rollback_hook_and_a_slack_compatible_receiver_with_its_numbers() {
    let hooks_receiver = receiver("hooks", 200).await;
    let chat = receiver("chat", 200).await;
    let hooks = json!([
        {"name": "page", "type": "rollback", "url": url(&hooks_receiver, "/rollback"), "timeout": "2s"},
        {"name": "done", "type": "post-rollout", "url": url(&hooks_receiver, "/done"), "timeout": "2s"},
        {"name": "all", "type": "event", "url": url(&hooks_receiver, "/events")},
        // Nothing listens there: its failure must change nothing.
        {"name": "broken", "type": "rollback", "url": "http://127.0.0.1:1/rollback", "retries": 1},
    ]);
    let notify = json!({
        "targets": [
            {"name": "chat", "type": "slack", "url": url(&chat, "/services/T0/B0/x"),
             "severity": "warning", "channel": "#releases"},
            {"name": "audit", "type": "json", "url": url(&chat, "/audit")},
        ]
    });
    let broken = Behaviour {
        error_rate: 0.5,
        ..Behaviour::default()
    };
    let mut rig = Rig::start(broken, hooks, Some(notify)).await;
    rig.start_load(300);
    let mut run = Controller::run(&rig.spec);
    assert_eq!(run.wait(RUN_LIMIT).await, Some(3), "{}", run.transcript());
    assert_eq!(applied_weights(&run), vec![20, 0]);
    let rollback = run
        .wait_event("rollback", Duration::ZERO, |_| true)
        .await
        .expect("rollback event");

    // The rollback hook: once, after 0 % was applied, with the verdict's numbers.
    let called = posts(&hooks_receiver, "/rollback");
    assert_eq!(called.len(), 1, "{called:?}");
    let body = &called[0];
    assert_eq!(body["type"], "rollback");
    assert_eq!(body["phase"], "RolledBack");
    assert_eq!(body["weight"], 0);
    assert_eq!(body["verdict"], "rollback");
    assert_eq!(body["reason"], rollback.json["reason"]);
    assert!(
        body["numbers"]["canary"]["errors"].as_f64().unwrap_or(0.0) > 0.0,
        "{body}"
    );
    assert_eq!(
        body["numbers"], rollback.json["numbers"],
        "the numbers the verdict printed"
    );
    let at = |path: &str| {
        hooks_receiver
            .requests()
            .into_iter()
            .find(|r| r.path == path)
            .map(|r| r.at)
            .unwrap_or_else(|| panic!("no call to {path}"))
    };
    let applied_zero = run
        .wait_event("applied", Duration::ZERO, |e| e["weight"] == 0)
        .await
        .expect("0 % applied");
    // (The event's arrival is read from the controller's stdout, a moment late: up to a
    // second on a loaded machine.)
    assert!(
        at("/rollback") + Duration::from_millis(1250) >= applied_zero.at,
        "the rollback hook was called {:?} before 0 % was applied",
        applied_zero.at - at("/rollback")
    );
    // The order itself, as the controller printed it: 0 % applied, then the hook's answer.
    let events = run.events();
    let position = |what: &dyn Fn(&Value) -> bool| events.iter().position(|e| what(&e.json));
    let applied_zero_line = position(&|e| e["event"] == "applied" && e["weight"] == 0);
    let page_answer_line = position(&|e| e["event"] == "webhook" && e["hook"] == "page");
    assert!(
        matches!((applied_zero_line, page_answer_line), (Some(a), Some(p)) if a < p),
        "0 % applied (line {applied_zero_line:?}) before the rollback hook answered (line \
         {page_answer_line:?})\n{}",
        run.transcript()
    );
    assert!(at("/done") >= at("/rollback"), "post-rollout comes last");
    assert_eq!(posts(&hooks_receiver, "/done")[0]["phase"], "RolledBack");
    let broken = run
        .wait_event("webhook", Duration::ZERO, |e| e["hook"] == "broken")
        .await
        .unwrap_or_else(|| panic!("no report of the broken hook\n{}", run.transcript()));
    assert_eq!(broken.json["ok"], false);
    assert_eq!(broken.json["attempts"], 2);
    assert!(broken.json["error"]
        .as_str()
        .is_some_and(|e| e.starts_with("unreachable: ")));

    // The Slack-compatible receiver: warnings and up only, the rollback with why and numbers.
    let messages = posts(&chat, "/services/T0/B0/x");
    let texts: Vec<&str> = messages.iter().filter_map(|m| m["text"].as_str()).collect();
    println!("slack-compatible messages: {texts:#?}");
    assert!(!texts.is_empty());
    assert!(messages.iter().all(|m| m["channel"] == "#releases"));
    assert!(
        texts.iter().all(|t| !t.starts_with(":large_blue_circle:")),
        "info was filtered out: {texts:?}"
    );
    let reason = rollback.json["reason"].as_str().expect("reason");
    let rolled_back = texts
        .iter()
        .find(|t| t.starts_with(":red_circle: *checkout* rollback: ROLLBACK"))
        .unwrap_or_else(|| panic!("no rollback message in {texts:?}"));
    assert!(rolled_back.contains(reason), "{rolled_back}");
    let canary = &rollback.json["numbers"]["canary"];
    let counts = format!(
        "canary {:.0} req, {:.0} err",
        canary["requests"].as_f64().expect("requests"),
        canary["errors"].as_f64().expect("errors")
    );
    assert!(
        rolled_back.contains(&counts),
        "the numbers ({counts}): {rolled_back}"
    );

    // The JSON target takes info too: the start and the rollback, with the numbers.
    let audit = posts(&chat, "/audit");
    let events: Vec<&str> = audit.iter().filter_map(|n| n["event"].as_str()).collect();
    assert_eq!(events.first(), Some(&"start"), "{events:?}");
    let notified = audit
        .iter()
        .find(|n| n["event"] == "rollback")
        .unwrap_or_else(|| panic!("no rollback notification in {events:?}"));
    assert_eq!(notified["severity"], "error");
    assert_eq!(notified["data"]["numbers"], rollback.json["numbers"]);

    // The event hook: every printed event, in order.
    let seen: Vec<String> = posts(&hooks_receiver, "/events")
        .iter()
        .filter_map(|e| e["event"].as_str().map(str::to_string))
        .collect();
    let printed: Vec<String> = run
        .events()
        .iter()
        .map(|e| e.kind().to_string())
        // `finished` is `run`'s own summary, printed after the rollout's end.
        .filter(|k| !k.is_empty() && k != "finished")
        .collect();
    assert_eq!(
        seen, printed,
        "the event hook sees exactly what run printed"
    );
    assert_eq!(rig.ecds_canary_weight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pre_rollout_hook_counts_across_a_restart_and_rolls_back_at_max_failures() {
    let smoke = receiver("smoke", 500).await;
    let page = receiver("page", 200).await;
    let hooks = json!([
        {"name": "smoke", "type": "pre-rollout", "url": url(&smoke, "/run"), "timeout": "1s",
         "retries": 1, "max_failures": 6},
        {"name": "page", "type": "rollback", "url": url(&page, "/rollback")},
    ]);
    let rig = Rig::start(Behaviour::default(), hooks, None).await;
    let mut first = Controller::run(&rig.spec);
    let third = first
        .wait_event("webhook", Duration::from_secs(15), |e| e["failures"] == 3)
        .await;
    assert!(third.is_some(), "{}", first.transcript());
    first.kill().await;
    // What the record kept (a kill between counting and saving loses that one count:
    // the interval is asked again).
    let mut state = rig.ecds.as_os_str().to_owned();
    state.push(".state.json");
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(PathBuf::from(state)).expect("record"))
            .expect("record JSON");
    let saved = record["hooks"]["failures"]["smoke"].as_u64().unwrap_or(0);
    assert!((2..=3).contains(&saved), "{record}");
    assert_eq!(
        record["hooks"]["pre_rollout_passed"],
        Value::Null,
        "{record}"
    );
    let calls_before = posts(&smoke, "/run").len();

    let mut second = Controller::run(&rig.spec);
    assert_eq!(
        second.wait(RUN_LIMIT).await,
        Some(3),
        "{}",
        second.transcript()
    );
    let resumed = second
        .wait_event("resume", Duration::ZERO, |_| true)
        .await
        .expect("resumed");
    assert_eq!(
        resumed.json["weight"], 0,
        "still waiting for the gate at 0 %"
    );
    let counts: Vec<u64> = second
        .events()
        .iter()
        .filter(|e| e.kind() == "webhook")
        .filter_map(|e| e.json["failures"].as_u64())
        .collect();
    assert_eq!(
        counts,
        (saved + 1..=6).collect::<Vec<u64>>(),
        "counting went on where the record left it\n{}",
        second.transcript()
    );
    // One count per interval, however often it was retried: two calls each.
    assert_eq!(posts(&smoke, "/run").len() - calls_before, 2 * counts.len());
    let rollback = second
        .wait_event("rollback", Duration::ZERO, |_| true)
        .await
        .expect("rollback");
    assert_eq!(
        rollback.json["reason"],
        "pre-rollout hook smoke failed 6 intervals in a row (last: answered 500)"
    );
    assert_eq!(
        applied_weights(&second),
        vec![0],
        "the canary never got a weight"
    );
    assert_eq!(posts(&page, "/rollback").len(), 1);
    // Finished: running it again calls nothing again.
    let mut again = Controller::run(&rig.spec);
    assert_eq!(
        again.wait(RUN_LIMIT).await,
        Some(3),
        "{}",
        again.transcript()
    );
    assert_eq!(
        posts(&page, "/rollback").len(),
        1,
        "the end's hooks are called once"
    );
    assert_eq!(
        posts(&smoke, "/run").len(),
        calls_before + 2 * counts.len(),
        "a finished rollout's gate is not asked again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_gate_holds_only_its_own_rollout_and_a_stop_interrupts_it() {
    let root = tempfile::tempdir().expect("temp dir");
    // The gate takes every call but answers only after 60 s: each call waits for the
    // hook's 30 s timeout.
    let gate = Upstream::start_with(
        "gate",
        Behaviour {
            delay: Duration::from_secs(60),
            ..Behaviour::default()
        },
    )
    .await;
    let hooks = json!([{"name": "approve", "type": "confirm-promotion",
                        "url": url(&gate, "/approve"), "timeout": "30s", "retries": 0}]);
    let mut gated = Rig::start_in(root.path(), "gated", Behaviour::default(), hooks, None).await;
    let mut plain =
        Rig::start_in(root.path(), "plain", Behaviour::default(), json!([]), None).await;
    gated.start_load(300);
    plain.start_load(300);
    let specs = root.path().join("specs").display().to_string();
    let mut serve = Controller::spawn(&["serve", &specs, "--listen", "127.0.0.1:0"]);

    // The plain rollout goes through every step while the gate's call hangs.
    let done = serve
        .wait_event("applied", RUN_LIMIT, |e| {
            e["rollout"] == "plain.yaml" && e["weight"] == 100
        })
        .await;
    assert!(done.is_some(), "{}", serve.transcript());
    let started = of(&serve, "plain.yaml", "applied")[0].at;
    let plain_took = done.map(|d| d.at - started).unwrap_or_default();
    let plain_weights: Vec<u64> = of(&serve, "plain.yaml", "applied")
        .iter()
        .filter_map(|e| e.json["weight"].as_u64())
        .collect();
    assert_eq!(plain_weights, vec![20, 50, 100]);
    let gated_weights: Vec<u64> = of(&serve, "gated.yaml", "applied")
        .iter()
        .filter_map(|e| e.json["weight"].as_u64())
        .collect();
    assert_eq!(gated_weights, vec![20], "{}", serve.transcript());
    assert_eq!(gated.ecds_canary_weight(), 2_000);
    assert_eq!(plain.ecds_canary_weight(), 10_000);
    let asked = gate.requests();
    assert_eq!(asked.len(), 1, "one call, still waiting");
    assert!(
        of(&serve, "gated.yaml", "webhook").is_empty(),
        "the call has not ended\n{}",
        serve.transcript()
    );
    println!(
        "plain rollout: 20 → 100 % in {plain_took:?} while the gated one's call waited {:?}",
        asked[0].at.elapsed()
    );
    assert!(plain_took <= Duration::from_secs(15), "{plain_took:?}");

    // SIGTERM while the gate's call waits: serve saves and exits at once.
    let asked_to_stop = Instant::now();
    serve.terminate();
    assert_eq!(
        serve.wait(Duration::from_secs(10)).await,
        Some(0),
        "{}",
        serve.transcript()
    );
    println!("stopped {:?} after SIGTERM", asked_to_stop.elapsed());
    assert!(asked_to_stop.elapsed() <= Duration::from_secs(5));
    assert!(
        of(&serve, "gated.yaml", "stopped").len() == 1,
        "{}",
        serve.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rollout_hook_holds_promotion_and_rolls_back_at_max_failures() {
    let warm = receiver("warm", 500).await;
    let hooks = json!([{"name": "warm", "type": "rollout", "url": url(&warm, "/run"),
                        "timeout": "1s", "retries": 0, "max_failures": 12}]);
    let mut rig = Rig::start(Behaviour::default(), hooks, None).await;
    rig.start_load(300);
    let mut run = Controller::run(&rig.spec);
    assert_eq!(run.wait(RUN_LIMIT).await, Some(3), "{}", run.transcript());
    // A healthy canary the verdict wanted to promote: the failing hook held it.
    let held = run
        .wait_event("hold", Duration::ZERO, |e| e["held"] == "promote")
        .await
        .unwrap_or_else(|| panic!("no hold by the hook\n{}", run.transcript()));
    assert!(
        held.json["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("rollout hook warm answered 500 (failure ")),
        "{}",
        held.json
    );
    assert_eq!(applied_weights(&run), vec![20, 0], "never promoted");
    let rollback = run
        .wait_event("rollback", Duration::ZERO, |_| true)
        .await
        .expect("rollback");
    assert_eq!(
        rollback.json["reason"],
        "rollout hook warm failed 12 intervals in a row (last: answered 500)"
    );
    let calls = posts(&warm, "/run");
    assert_eq!(calls.len(), 12, "one call per interval, no retries");
    assert!(calls
        .iter()
        .all(|c| c["type"] == "rollout" && c["weight"] == 20));
    assert!(
        calls[11]["numbers"]["canary"]["requests"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0,
        "the last verdict's numbers: {}",
        calls[11]
    );
    assert_eq!(rig.ecds_canary_weight(), 0);
}
