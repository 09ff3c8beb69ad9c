//! The committed Grafana dashboard (`manifests/grafana/meshcanary-dashboard.json`) asks
//! real questions: every PromQL expression in it is sent to a real Prometheus that scrapes
//! a real Envoy running the filter under load (with a shadow) and a real controller
//! (`serve DIR`) driving a rollout, and must parse and — unless it watches for something
//! that a healthy run never does — return series with numbers.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use meshcanary_e2e::controller::Controller;
use meshcanary_e2e::prometheus::{prometheus_available, PrometheusServer, ScrapeJob};
use meshcanary_e2e::{
    paths, write_ecds, Behaviour, Cluster, Envoy, EnvoyConfig, FilterSource, Upstream,
};
use serde_json::{json, Value};
use tokio::process::Command;

/// Template variables as Grafana would fill them for this test's Prometheus (1 s
/// scrapes), the policy and every rollout. The rate window reaches back past the
/// promotion to 100 %, so that the stable variant still has traffic in it.
const VARIABLES: &[(&str, &str)] = &[
    ("$__rate_interval", "30s"),
    ("$__interval", "1s"),
    ("$__range", "2m"),
    ("${policy}", "checkout"),
    ("$policy", "checkout"),
    ("${rollout}", ".*"),
    ("$rollout", ".*"),
    ("${scrape_interval}", "1s"),
    ("$scrape_interval", "1s"),
];

/// Targets, by (panel, legend), that watch for what a healthy run never does and whose
/// series only exist once it happened: they must parse, and may be empty. (The filter
/// defines its other counters at start, so their series exist at 0.)
const MAY_BE_EMPTY: &[(&str, &str)] = &[
    // The controller counts an error kind the first time one happens.
    ("Controller errors per second", "{{kind}}"),
    // Envoy's counter of refused policies appears with the first refusal.
    ("Policy configurations", "rejected"),
];

fn dashboard() -> Value {
    let path = paths::repo().join("manifests/grafana/meshcanary-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard is committed");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// `(panel title, legend, expr)` of every target of every panel.
fn targets(dashboard: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                panel["title"].as_str().unwrap_or_default().to_string(),
                target["legendFormat"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                target["expr"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    out
}

fn substitute(expr: &str) -> String {
    let mut out = expr.to_string();
    for (name, value) in VARIABLES {
        out = out.replace(name, value);
    }
    out
}

#[test]
fn the_dashboard_is_importable_and_every_panel_uses_the_datasource_variable() {
    let dashboard = dashboard();
    assert!(
        dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "a current Grafana's schema"
    );
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for name in ["datasource", "policy", "rollout", "scrape_interval"] {
        assert!(
            variables.contains(&name),
            "variable {name} in {variables:?}"
        );
    }
    let mut ids = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        ids.push(panel["id"].as_u64().expect("panel id"));
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{target}");
        }
    }
    let count = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), count, "panel ids are unique");
    // Every variable an expression uses is one this test fills in.
    for (title, _, expr) in targets(&dashboard) {
        let left = substitute(&expr);
        // `$1` is label_replace's capture group, not a Grafana variable.
        let unfilled = left
            .match_indices('$')
            .filter(|(i, _)| !left[i + 1..].starts_with('1'))
            .count();
        assert_eq!(unfilled, 0, "{title}: unfilled variable in {left}");
    }
}

fn base_policy() -> Value {
    json!({
        "name": "checkout",
        "variants": ["stable", "canary"],
        "rules": [
            {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
            {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "checkout-v2",
                "weights": [{"variant": "canary", "weight": 0}, {"variant": "stable", "weight": 100}]}}
        ],
        "mirror": {"cluster": "shadow", "compare": "body"}
    })
}

fn free_listen() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    format!("127.0.0.1:{port}")
}

fn spec(policy: &Path, ecds: &Path, admin: &str) -> Value {
    json!({
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
        "source": {"envoy_admin": [admin]},
        "sink": {"ecds_file": {"path": ecds, "wasm": paths::wasm()}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_runs_against_prometheus_scraping_envoy_and_the_controller() {
    if !prometheus_available(
        "every_dashboard_query_runs_against_prometheus_scraping_envoy_and_the_controller",
    ) {
        return;
    }
    let started = Instant::now();
    // Same body everywhere except the canary's: the stable's copies match the shadow's
    // body, the canary's do not; the shadow fails some copies (status mismatches), and
    // both variants fail a few requests (error ratios above zero).
    let body = |text: &str| Some(text.as_bytes().to_vec());
    let stable = Upstream::start_with(
        "stable",
        Behaviour {
            body: body("same\n"),
            error_rate: 0.01,
            ..Behaviour::default()
        },
    )
    .await;
    let canary = Upstream::start_with(
        "canary",
        Behaviour {
            body: body("canary\n"),
            error_rate: 0.01,
            ..Behaviour::default()
        },
    )
    .await;
    let shadow = Upstream::start_with(
        "shadow",
        Behaviour {
            body: body("same\n"),
            error_rate: 0.2,
            ..Behaviour::default()
        },
    )
    .await;
    let root = tempfile::tempdir().expect("temp dir");
    let work = root.path().join("work");
    let specs = root.path().join("specs");
    std::fs::create_dir_all(&work).expect("work dir");
    std::fs::create_dir_all(&specs).expect("spec dir");
    let ecds = work.join("checkout.ecds.json");
    write_ecds(&ecds, "initial", &base_policy().to_string());
    let mut config =
        EnvoyConfig::stable_canary(FilterSource::Ecds(ecds.clone()), stable.addr, canary.addr);
    config.clusters.push(Cluster {
        name: "shadow".into(),
        addr: shadow.addr,
    });
    config.stats_flush_interval = Some(Duration::from_secs(1));
    config.concurrency = 1;
    let envoy = Envoy::start(&config).await.expect("envoy starts");
    let policy = work.join("checkout.policy.json");
    std::fs::write(&policy, base_policy().to_string()).expect("policy");
    std::fs::write(
        specs.join("checkout.yaml"),
        serde_json::to_string_pretty(&spec(&policy, &ecds, &envoy.admin)).expect("spec"),
    )
    .expect("spec file");

    let listen = free_listen();
    let prometheus = PrometheusServer::start_jobs(&[
        ScrapeJob {
            name: "envoy",
            metrics_path: "/stats/prometheus",
            urls: vec![envoy.admin.clone()],
        },
        ScrapeJob {
            name: "meshcanary-controller",
            metrics_path: "/metrics",
            urls: vec![listen.clone()],
        },
    ])
    .await;
    let _load = Command::new(env!("CARGO_BIN_EXE_meshcanary-load"))
        .args(["--url", &envoy.url("/"), "--rps", "200"])
        .args(["--duration-s", "60", "--max-requests", "12000"])
        .args(["--concurrency", "4", "--user-ids", "5000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the load generator");
    let mut serve =
        Controller::spawn(&["serve", &specs.display().to_string(), "--listen", &listen]);
    let finished = serve
        .wait_event("finished", Duration::from_secs(60), |e| {
            e["rollout"] == "checkout.yaml"
        })
        .await;
    assert!(
        finished.is_some(),
        "the rollout finishes\n{}",
        serve.transcript()
    );
    // A few more scrapes of the finished state and of the traffic at 100 %.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let client = reqwest::Client::new();
    let mut failures = Vec::new();
    let mut report = Vec::new();
    let mut answers = std::collections::HashMap::new();
    let targets = targets(&dashboard());
    assert!(targets.len() >= 20, "{} targets", targets.len());
    for (title, legend, expr) in &targets {
        let query = substitute(expr);
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", prometheus.url),
            &[("query", query.as_str())],
        )
        .expect("query URL");
        let answer: Value = client
            .get(url)
            .send()
            .await
            .expect("query Prometheus")
            .json()
            .await
            .expect("Prometheus answers JSON");
        if answer["status"] != "success" {
            failures.push(format!(
                "{title} / {legend}: {}\n  {query}",
                answer["error"]
            ));
            continue;
        }
        let series: Vec<(String, f64)> = answer["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let value = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (s["metric"].to_string(), value)
            })
            .collect();
        report.push(format!("{title} / {legend}: {series:?}"));
        answers.insert((title.clone(), legend.clone()), series.clone());
        let with_numbers = series.iter().filter(|(_, v)| v.is_finite()).count();
        if with_numbers == 0 && !MAY_BE_EMPTY.contains(&(title.as_str(), legend.as_str())) {
            failures.push(format!(
                "{title} / {legend}: no series with a number ({series:?})\n  {query}"
            ));
        }
    }
    println!("{}", report.join("\n"));
    println!("{} queries in {:?}", targets.len(), started.elapsed());
    assert!(
        failures.is_empty(),
        "{}\n\nprometheus log:\n{}",
        failures.join("\n"),
        prometheus.log()
    );

    // The numbers mean what the panels say: per-variant series by name with traffic and
    // errors on both, the shadow's mismatches (it fails a fifth of the copies), the
    // finished rollout at 100 %.
    let value = |title: &str, legend: &str, labels: &str| -> f64 {
        answers[&(title.to_string(), legend.to_string())]
            .iter()
            .find(|(l, _)| l == labels)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| {
                panic!(
                    "{title} / {legend}: no series {labels}\n{}",
                    report.join("\n")
                )
            })
    };
    for variant in ["canary", "stable"] {
        let labels = format!("{{\"variant\":\"{variant}\"}}");
        let rps = value("Requests per second by variant", "{{variant}}", &labels);
        assert!(rps > 0.0, "{variant}: {rps} requests/s");
        let errors = value("Error ratio (5xx share) by variant", "{{variant}}", &labels);
        assert!(
            errors > 0.0 && errors < 0.1,
            "{variant}: error ratio {errors}"
        );
        let p99 = value(
            "Latency quantiles by variant (ms)",
            "{{variant}} p99",
            &labels,
        );
        assert!(p99 > 0.0, "{variant}: p99 {p99} ms");
    }
    let mismatch = value("Shadow compare: mismatch ratio", "status mismatch", "{}");
    assert!(
        mismatch > 0.05 && mismatch < 0.5,
        "status mismatch ratio {mismatch}"
    );
    let weight = value(
        "Canary weight by rollout",
        "{{rollout}}",
        "{\"rollout\":\"checkout.yaml\"}",
    );
    assert_eq!(weight, 100.0, "promoted");
    let finished = value(
        "Rollouts by activity",
        "{{activity}}",
        "{\"activity\":\"finished\"}",
    );
    assert_eq!(finished, 1.0);
    serve.kill().await;

    // The same run's `serve --output json` stream makes a report with the rollout's
    // section, named by its spec file (tests/report.rs checks pages in a browser).
    let stream: String = serve
        .events()
        .iter()
        .map(|e| format!("{}\n", e.json))
        .collect();
    let events = root.path().join("serve.jsonl");
    std::fs::write(&events, stream).expect("events file");
    let output = Command::new(paths::meshcanary_bin())
        .arg("report")
        .arg(&events)
        .output()
        .await
        .expect("meshcanary report runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let page = String::from_utf8_lossy(&output.stdout);
    assert!(
        page.contains("data-rollout=\"checkout.yaml\"")
            && page.contains("data-verdict=\"complete\""),
        "a section for checkout.yaml with its completion"
    );
}
