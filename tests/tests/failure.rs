//! What Envoy does with traffic once the filter's Wasm VM has failed, for each failure
//! policy meshcanary can render — proven with a module built from this repository
//! (`make wasm-test-trap`: the filter with its `test-trap` feature) that traps on a
//! request carrying `x-meshcanary-test-trap`, the way a panic in the proxy-wasm SDK does.
//!
//! - `FAIL_RELOAD` (meshcanary's default): the next request after the trap gets a fresh
//!   VM with the same policy, and routing goes on.
//! - `FAIL_OPEN`: requests bypass the dead filter and take the default route (stable).
//! - `FAIL_CLOSED` (Envoy's own default, never rendered unless asked for): every later
//!   request through that worker is answered 503 — the control that shows the trap
//!   really kills the VM.

use std::time::{Duration, Instant};

use meshcanary_e2e::{
    paths, wasm_failure, Envoy, EnvoyConfig, FilterSource, Upstream, FILTER_NAME,
};
use meshcanary_policy::envoy::{wasm_filter_config, FailurePolicy, FLUSH_PERIOD_MS};
use serde_json::{json, Value};

/// The header that makes the test module trap.
const TRAP_HEADER: &str = "x-meshcanary-test-trap";

/// How long after the trap the tests watch the traffic.
const WATCH: Duration = Duration::from_millis(1500);

/// Every request carrying `x-canary: always` goes to the canary: a request that reaches
/// the canary was routed by a live filter; one that reaches stable bypassed it.
fn policy() -> Value {
    json!({
        "name": "checkout",
        "variants": ["stable", "canary"],
        "rules": [{"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"}]
    })
}

/// One worker, so "every later request through that worker" is every later request.
async fn start(filter: FilterSource) -> (Envoy, Upstream, Upstream) {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let mut config = EnvoyConfig::stable_canary(filter, stable.addr, canary.addr);
    config.concurrency = 1;
    let envoy = Envoy::start(&config).await.expect("envoy starts");
    (envoy, stable, canary)
}

/// The trap module inline in the listener, with `failure` as the controller renders it.
fn inline_trap_filter(failure: FailurePolicy) -> FilterSource {
    FilterSource::Raw(json!({
        "name": FILTER_NAME,
        "typed_config": wasm_filter_config(FILTER_NAME, &paths::trap_wasm(), &policy(), failure),
    }))
}

/// One request routed by the policy: its status and the upstream that answered.
async fn routed(envoy: &Envoy, trap: bool) -> (u16, String) {
    let mut request = envoy
        .client()
        .get(envoy.url("/"))
        .header("x-canary", "always");
    if trap {
        request = request.header(TRAP_HEADER, "1");
    }
    let response = request.send().await.expect("request through envoy");
    let status = response.status().as_u16();
    let upstream = response
        .headers()
        .get(meshcanary_e2e::UPSTREAM_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    (status, upstream)
}

/// What the traffic after a trap looked like.
#[derive(Debug)]
struct AfterTrap {
    /// The trapping request's own status.
    trapped_status: u16,
    /// `(ms after the trap, status, upstream)` of every request sent while watching.
    answers: Vec<(u128, u16, String)>,
}

impl AfterTrap {
    /// Requests that were not answered 200.
    fn failed(&self) -> usize {
        self.answers.iter().filter(|(_, s, _)| *s != 200).count()
    }

    /// Milliseconds after the trap of the first request the canary answered.
    fn first_routed_ms(&self) -> Option<u128> {
        self.answers
            .iter()
            .find(|(_, s, u)| *s == 200 && u == "canary")
            .map(|(t, _, _)| *t)
    }

    fn count(&self, status: u16, upstream: &str) -> usize {
        self.answers
            .iter()
            .filter(|(_, s, u)| *s == status && u == upstream)
            .count()
    }
}

/// Proves the filter routes, traps it, then sends a request every 10 ms for [`WATCH`].
async fn trap_and_watch(envoy: &Envoy) -> AfterTrap {
    assert_eq!(
        routed(envoy, false).await,
        (200, "canary".to_string()),
        "the filter routes before the trap"
    );
    let traps_before = envoy.log().matches("test-trap build: trapping").count();
    let (trapped_status, _) = routed(envoy, true).await;
    let trapped_at = Instant::now();
    let mut answers = Vec::new();
    while trapped_at.elapsed() < WATCH {
        let (status, upstream) = routed(envoy, false).await;
        answers.push((trapped_at.elapsed().as_millis(), status, upstream));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = envoy.log();
    assert_eq!(
        log.matches("test-trap build: trapping").count(),
        traps_before + 1,
        "the module trapped inside Envoy once more:\n{log}"
    );
    assert!(
        wasm_failure(&log).is_some(),
        "Envoy logged the trap:\n{log}"
    );
    AfterTrap {
        trapped_status,
        answers,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_reload_routes_again_within_a_second_of_a_trap() {
    let (envoy, _stable, canary) = start(inline_trap_filter(FailurePolicy::Reload)).await;
    // Worst case first: a VM that fails within the backoff of its own start waits out the
    // backoff (0.1 s at first) before Envoy starts it again; requests through that worker
    // meanwhile are answered 503.
    let early = trap_and_watch(&envoy).await;
    let first = early.first_routed_ms();
    eprintln!(
        "FAIL_RELOAD, trap right after the VM started: {} of {} requests in the next {:?} failed, routed again after {:?} ms",
        early.failed(),
        early.answers.len(),
        WATCH,
        first
    );
    assert_eq!(
        early.trapped_status, 503,
        "the request the VM died on fails"
    );
    let first = first.expect("routed to the canary again after the trap");
    assert!(first < 1000, "routed again {first} ms after the trap");
    assert!(
        early.answers.iter().all(|(t, s, u)| if *t < first {
            *s == 503
        } else {
            *s == 200 && u == "canary"
        }),
        "503 only until the reload, then every request routed by the fresh VM: {early:?}"
    );

    // The usual case: a VM that has run for longer than the backoff is replaced by the
    // very next request.
    let vms_started = envoy.counter("wasmcustom.meshcanary.vm.started").await;
    let settled = trap_and_watch(&envoy).await;
    eprintln!(
        "FAIL_RELOAD, trap of a VM that ran {:?}: {} of {} requests failed, routed again after {:?} ms",
        WATCH,
        settled.failed(),
        settled.answers.len(),
        settled.first_routed_ms()
    );
    assert_eq!(settled.failed(), 0, "{settled:?}");
    assert_eq!(
        settled.count(200, "canary"),
        settled.answers.len(),
        "every request after the trap routed by a live filter: {settled:?}"
    );

    let sent = early.answers.len() + settled.answers.len();
    assert!(canary.count() >= sent - early.failed());
    let stats = envoy.stats().await;
    assert_eq!(
        stats.get("wasm.meshcanary.vm_reload_success").copied(),
        Some(2),
        "Envoy counted both reloads"
    );
    // The fresh VMs count on: Envoy's counters are cumulative across VMs. What a dead VM
    // had counted but not flushed yet is lost: at most one flush period (100 ms) of its
    // requests, here one request every ~10 ms plus the check before each trap.
    let routed_total = 2 + sent - early.failed();
    let per_trap_bound = FLUSH_PERIOD_MS / 10 + 2;
    // The live VM's last counts reach Envoy at its next flush, later on a busy machine:
    // wait (bounded) until no more than the bound is missing; counts lost with a dead VM
    // never arrive, so more loss than that still fails below. Then read again after more
    // than a flush period, so that counting too much shows too.
    let canary_requests = "wasmcustom.meshcanary.checkout.variant.canary.requests";
    let enough = (routed_total as u64).saturating_sub(2 * per_trap_bound);
    envoy
        .wait_counter(canary_requests, Duration::from_secs(10), |v| v >= enough)
        .await;
    let counted = envoy.counter(canary_requests).await;
    let lost = routed_total as u64 - counted.min(routed_total as u64);
    eprintln!(
        "counted {counted} of {routed_total} routed requests: {lost} lost with the two dead VMs"
    );
    assert!(
        counted <= routed_total as u64 && lost <= 2 * per_trap_bound,
        "counted {counted} of {routed_total}: more than one flush period lost per trap"
    );
    assert_eq!(
        envoy.counter("wasmcustom.meshcanary.vm.started").await,
        vms_started + 1,
        "the reloaded VM counted its start ({vms_started} VMs had started before it)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_sends_requests_unrouted_to_the_default_route() {
    let (envoy, stable, _canary) = start(inline_trap_filter(FailurePolicy::Open)).await;
    let after = trap_and_watch(&envoy).await;
    eprintln!(
        "FAIL_OPEN: trapping request answered {}; {} requests after it: {} to stable, {} failed",
        after.trapped_status,
        after.answers.len(),
        after.count(200, "stable"),
        after.failed()
    );
    assert_eq!(after.failed(), 0, "{after:?}");
    assert_eq!(
        after.count(200, "stable"),
        after.answers.len(),
        "the dead filter is bypassed: no decision header, the default route: {after:?}"
    );
    assert_eq!(stable.count(), after.answers.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_the_envoy_default_answers_every_later_request_503() {
    let (envoy, stable, canary) = start(inline_trap_filter(FailurePolicy::Closed)).await;
    let after = trap_and_watch(&envoy).await;
    eprintln!(
        "FAIL_CLOSED: {} of {} requests after the trap failed",
        after.failed(),
        after.answers.len()
    );
    assert_eq!(
        after.count(503, ""),
        after.answers.len(),
        "Envoy's own default takes the worker's traffic down: {after:?}"
    );
    assert_eq!(stable.count(), 0);
    assert_eq!(canary.count(), 1, "only the request before the trap");
}

/// The ECDS file `meshcanary render` writes for a spec that does not choose a failure
/// policy: a trap is survived, exactly as with the inline filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_ecds_configuration_reloads_after_a_trap() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("policy.json"), policy().to_string()).expect("policy");
    let ecds = dir.path().join("meshcanary.ecds.json");
    let spec = dir.path().join("rollout.yaml");
    std::fs::write(
        &spec,
        format!(
            "policy: policy.json\nsplit_rule: qa-split\ncanary: canary\nsteps: [10, 100]\n\
             source: {{envoy_admin: \"http://127.0.0.1:9\"}}\n\
             sink: {{ecds_file: {{path: {}, wasm: {}}}}}\n",
            ecds.display(),
            paths::trap_wasm().display()
        ),
    )
    .expect("spec");
    // The spec needs a split rule to drive.
    let mut with_split = policy();
    with_split["rules"].as_array_mut().expect("rules").push(
        json!({"name": "qa-split", "split": {"by": {"header": "x-user-id"}, "salt": "s",
            "weights": [{"variant": "canary", "weight": 1}, {"variant": "stable", "weight": 99}]}}),
    );
    std::fs::write(dir.path().join("policy.json"), with_split.to_string()).expect("policy");

    let rendered = std::process::Command::new(paths::meshcanary_bin())
        .args(["render", &spec.display().to_string()])
        .output()
        .expect("meshcanary render runs");
    assert!(
        rendered.status.success(),
        "render: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let document: Value = serde_json::from_slice(&rendered.stdout).expect("ECDS JSON");
    let config = &document["resources"][0]["typed_config"]["config"];
    assert_eq!(config["failure_policy"], "FAIL_RELOAD", "{document}");
    assert_eq!(
        config["reload_config"]["backoff"],
        json!({"base_interval": "0.1s", "max_interval": "1s"})
    );
    std::fs::write(&ecds, &rendered.stdout).expect("ECDS file");

    let (envoy, _stable, _canary) = start(FilterSource::Ecds(ecds)).await;
    let version = document["version_info"].as_str().expect("version");
    envoy
        .wait_ecds_version(version, Duration::from_secs(10))
        .await
        .expect("rendered configuration applied");
    // Past the reload backoff of the VM's start (see the FAIL_RELOAD test for a trap
    // inside it).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = trap_and_watch(&envoy).await;
    eprintln!(
        "rendered ECDS: {} of {} requests after the trap failed, first routed after {:?} ms",
        after.failed(),
        after.answers.len(),
        after.first_routed_ms()
    );
    assert!(
        after.first_routed_ms().is_some_and(|ms| ms < 1000),
        "{after:?}"
    );
    assert_eq!(after.failed(), 0, "{after:?}");
}

/// Every Wasm filter configuration in a committed file (and every WasmPlugin), found
/// wherever it sits in the document, with the failure handling it names.
fn failure_policies_in(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if map.get("@type")
                == Some(&json!(
                    "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
                ))
            {
                found.push(format!("Wasm:{}", value["config"]["failure_policy"]));
            }
            if map.get("kind") == Some(&json!("WasmPlugin")) {
                found.push(format!("WasmPlugin:{}", value["spec"]["failStrategy"]));
            }
            map.values().for_each(|v| failure_policies_in(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| failure_policies_in(v, found)),
        _ => {}
    }
}

#[test]
fn every_committed_envoy_configuration_says_how_a_vm_failure_is_handled() {
    let repo = paths::repo();
    let mut files = vec![repo.join("examples/quickstart/envoy.yaml")];
    let mut folders = vec![repo.join("manifests")];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("manifests folder") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    let mut configurations = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("committed file");
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut found = Vec::new();
        documents
            .iter()
            .for_each(|d| failure_policies_in(d, &mut found));
        for policy in &found {
            configurations += 1;
            assert!(
                [
                    "Wasm:\"FAIL_RELOAD\"",
                    "Wasm:\"FAIL_OPEN\"",
                    "WasmPlugin:\"FAIL_RELOAD\"",
                    "WasmPlugin:\"FAIL_OPEN\""
                ]
                .contains(&policy.as_str()),
                "{}: a Wasm filter with failure handling {policy}: every committed configuration must keep traffic flowing when the VM fails",
                file.display()
            );
        }
    }
    // quickstart, the ECDS EnvoyFilter, the inline EnvoyFilter and the WasmPlugin.
    assert!(
        configurations >= 4,
        "found {configurations} Wasm configurations in {files:?}"
    );
}
