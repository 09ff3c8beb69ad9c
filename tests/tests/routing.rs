//! Routing end to end: real Envoy, the real `meshcanary_filter.wasm`, recording
//! upstreams on loopback. Where a test needs "the right variant" it asks the policy core
//! natively, so these tests also prove that the module inside Envoy decides exactly as
//! the native core (and hence the controller) does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshcanary_e2e::{
    assert_no_wasm_failure, get, route_keys, write_ecds, Behaviour, Cluster, Envoy, EnvoyConfig,
    FilterSource, Upstream,
};
use meshcanary_policy::{Action, Policy};
use serde_json::{json, Value};

/// How long a test waits for the filter's counts to reach Envoy's stats. The filter
/// flushes every 100 ms, but a busy machine can delay a worker's flush well beyond that:
/// tests poll until a counter has its expected value (or never gets there), instead of
/// reading it once after a fixed wait.
const WAIT: Duration = Duration::from_secs(10);

/// Starts Envoy with an inline policy in front of a `stable` and a `canary` upstream.
async fn start(policy: &Value) -> (Envoy, Upstream, Upstream) {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let config = EnvoyConfig::stable_canary(
        FilterSource::Inline(policy.to_string()),
        stable.addr,
        canary.addr,
    );
    let envoy = Envoy::start(&config).await.expect("envoy starts");
    (envoy, stable, canary)
}

/// Envoy reading its policy from an ECDS file, in front of a `stable` and a `canary`
/// upstream.
struct EcdsRig {
    envoy: Envoy,
    stable: Upstream,
    canary: Upstream,
    /// The file Envoy watches.
    ecds: PathBuf,
    /// Holds the file's directory for as long as the test runs.
    _dir: tempfile::TempDir,
}

/// Starts Envoy with `policy` as ECDS version "1", and waits until it is applied.
async fn start_ecds(policy: &Value) -> EcdsRig {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ecds = dir.path().join("meshcanary.ecds.json");
    let config =
        EnvoyConfig::stable_canary(FilterSource::Ecds(ecds.clone()), stable.addr, canary.addr);
    write_ecds(&ecds, "1", &policy.to_string());
    let envoy = Envoy::start(&config).await.expect("envoy starts");
    envoy
        .wait_ecds_version("1", Duration::from_secs(10))
        .await
        .expect("v1 applied");
    EcdsRig {
        envoy,
        stable,
        canary,
        ecds,
        _dir: dir,
    }
}

/// Writes `policy` to the ECDS file as `version` and waits until Envoy applied it.
async fn apply_ecds(envoy: &Envoy, ecds: &Path, version: &str, policy: &Value) {
    write_ecds(ecds, version, &policy.to_string());
    envoy
        .wait_ecds_version(version, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("version {version} applied: {e}"));
}

fn split_policy(canary_weight: u64) -> Value {
    json!({
        "name": "checkout",
        "variants": ["stable", "canary"],
        "rules": [
            {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
            {"name": "rollout", "split": {
                "by": {"header": "x-user-id"}, "salt": "checkout-v2",
                "weights": [{"variant": "canary", "weight": canary_weight},
                            {"variant": "stable", "weight": 100 - canary_weight}]}}
        ]
    })
}

/// Request headers as the client sends them.
type Headers<'a> = &'a [(&'a str, &'a [u8])];

/// Counter `wasmcustom.meshcanary.counted.<name>` in `stats` (0 when absent).
fn counted(stats: &HashMap<String, u64>, name: &str) -> u64 {
    stats
        .get(&format!("wasmcustom.meshcanary.counted.{name}"))
        .copied()
        .unwrap_or(0)
}

fn user_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i}")).collect()
}

fn share(answers: &[String], variant: &str) -> f64 {
    answers.iter().filter(|a| *a == variant).count() as f64 / answers.len() as f64
}

/// What the native policy core decides for a user id under `policy`'s split rule.
fn native_variant(policy: &Value, rule: &str, key: &str) -> String {
    let policy = Policy::from_json(policy.to_string().as_bytes()).expect("valid policy");
    let index = policy.rule_index(rule).expect("rule exists");
    match &policy.rules[index].action {
        Action::Split(split) => policy.variants[split.variant_for_key(key.as_bytes())].clone(),
        Action::Variant(_) => panic!("rule {rule} is not a split"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rule_routes_to_canary_and_everything_else_to_stable() {
    let policy = json!({
        "name": "checkout",
        "variants": ["stable", "canary"],
        "rules": [{"name": "qa", "when": [{"header": "X-Canary", "equals": "always"}], "variant": "canary"}]
    });
    let (envoy, stable, canary) = start(&policy).await;

    assert_eq!(
        get(&envoy, "/", &[("x-canary", b"always")]).await.upstream,
        "canary"
    );
    assert_eq!(
        get(&envoy, "/", &[("X-CANARY", b"always")]).await.upstream,
        "canary"
    );
    assert_eq!(get(&envoy, "/", &[]).await.upstream, "stable");
    assert_eq!(
        get(&envoy, "/", &[("x-canary", b"sometimes")])
            .await
            .upstream,
        "stable"
    );
    assert_eq!(
        get(&envoy, "/", &[("x-canary", b"ALWAYS")]).await.upstream,
        "stable"
    );

    assert_eq!(canary.count(), 2);
    assert_eq!(stable.count(), 3);
    for r in canary.requests() {
        assert_eq!(r.header("x-meshcanary-variant").as_deref(), Some("canary"));
    }
    for r in stable.requests() {
        assert_eq!(r.header("x-meshcanary-variant").as_deref(), Some("stable"));
    }
    let qa = "wasmcustom.meshcanary.checkout.rule.qa.matches";
    assert_eq!(envoy.wait_counter(qa, WAIT, |v| v == 2).await, 2);
    let fallback = "wasmcustom.meshcanary.checkout.fallback";
    assert_eq!(envoy.wait_counter(fallback, WAIT, |v| v == 3).await, 3);
    assert_no_wasm_failure(&envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_and_query_rules_route_as_specified() {
    let policy = json!({
        "name": "shop",
        "variants": ["stable", "canary"],
        "rules": [
            {"name": "beta", "when": [{"cookie": "plan", "in": ["beta", "internal"]}], "variant": "canary"},
            {"name": "preview", "when": [{"query": "preview", "equals": "on air"}], "variant": "canary"},
            {"name": "ring", "when": [{"query": "ring", "prefix": "inner-"}], "variant": "canary"}
        ]
    });
    let (envoy, _stable, _canary) = start(&policy).await;
    let cases: &[(&str, Headers, &str)] = &[
        ("/", &[("cookie", b"plan=beta")], "canary"),
        (
            "/",
            &[("cookie", b"session=abc; plan=internal; theme=dark")],
            "canary",
        ),
        ("/", &[("cookie", b"plan=\"beta\"")], "canary"),
        ("/", &[("cookie", b"plan=free")], "stable"),
        ("/", &[("cookie", b"myplan=beta")], "stable"),
        ("/", &[("cookie", b"=beta; plan")], "stable"),
        ("/cart?preview=on+air", &[], "canary"),
        ("/cart?x=1&preview=on%20air", &[], "canary"),
        ("/cart?preview=on", &[], "stable"),
        ("/cart?ring=inner-3", &[], "canary"),
        ("/cart?ring=outer-1", &[], "stable"),
        ("/cart", &[], "stable"),
    ];
    for (path, headers, expected) in cases {
        let answer = get(&envoy, path, headers).await;
        assert_eq!(answer.status, 200);
        assert_eq!(&answer.upstream, expected, "{path} {headers:?}");
    }
    for (rule, expected) in [("beta", 3), ("preview", 2), ("ring", 1)] {
        let name = format!("wasmcustom.meshcanary.shop.rule.{rule}.matches");
        assert_eq!(
            envoy.wait_counter(&name, WAIT, |v| v == expected).await,
            expected,
            "{name}"
        );
    }
    assert_no_wasm_failure(&envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_is_sticky_and_on_target_over_ten_thousand_users() {
    let policy = split_policy(10);
    let (envoy, _stable, _canary) = start(&policy).await;
    let ids = user_ids(10_000);

    let first = route_keys(&envoy, "x-user-id", &ids, 2).await;
    let again = route_keys(&envoy, "x-user-id", &ids, 2).await;

    let canary_share = share(&first, "canary");
    assert!(
        (canary_share - 0.10).abs() <= 0.01,
        "canary share {canary_share}"
    );
    for (i, (a, b)) in first.iter().zip(&again).enumerate() {
        assert_eq!(a, b, "{} changed variant between requests", ids[i]);
    }
    // Inside Envoy (2 workers, 2 VMs) exactly as the native core decides.
    for (id, answer) in ids.iter().zip(&first) {
        assert_eq!(answer, &native_variant(&policy, "rollout", id), "{id}");
    }
    println!(
        "canary share over 10,000 ids: {:.2} %",
        canary_share * 100.0
    );
    assert_no_wasm_failure(&envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecds_ramp_from_10_to_30_keeps_every_canary_user() {
    let rig = start_ecds(&split_policy(10)).await;
    let envoy = &rig.envoy;
    let ids = user_ids(10_000);

    let before = route_keys(envoy, "x-user-id", &ids, 2).await;
    apply_ecds(envoy, &rig.ecds, "2", &split_policy(30)).await;
    let after = route_keys(envoy, "x-user-id", &ids, 2).await;

    let share_before = share(&before, "canary");
    let share_after = share(&after, "canary");
    assert!(
        (share_before - 0.10).abs() <= 0.01,
        "before: {share_before}"
    );
    assert!((share_after - 0.30).abs() <= 0.01, "after: {share_after}");
    let left: Vec<&String> = ids
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| *b == "canary" && *a != "canary")
        .map(|(id, _)| id)
        .collect();
    assert!(
        left.is_empty(),
        "{} users left the canary, e.g. {:?}",
        left.len(),
        &left[..left.len().min(5)]
    );
    println!(
        "ramp 10 -> 30: {:.2} % -> {:.2} %",
        share_before * 100.0,
        share_after * 100.0
    );
    assert_no_wasm_failure(&envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_decision_header_never_changes_the_route() {
    let policy = split_policy(10);
    let (envoy, stable, canary) = start(&policy).await;
    // Users the policy puts on stable, each claiming to be canary in every way we can spell it.
    let stable_users: Vec<String> = user_ids(200)
        .into_iter()
        .filter(|id| native_variant(&policy, "rollout", id) == "stable")
        .take(50)
        .collect();
    for id in &stable_users {
        for forged in ["x-meshcanary-variant", "X-Meshcanary-Variant"] {
            let answer = get(
                &envoy,
                "/",
                &[("x-user-id", id.as_bytes()), (forged, b"canary")],
            )
            .await;
            assert_eq!(answer.upstream, "stable", "{id} forged {forged}");
        }
        // Two copies of the header: still one decision, ours.
        let mut request = envoy
            .client()
            .get(envoy.url("/"))
            .header("x-user-id", id.as_str());
        request = request
            .header("x-meshcanary-variant", "canary")
            .header("x-meshcanary-variant", "canary");
        let response = request.send().await.expect("request");
        assert_eq!(response.headers()["x-upstream"], "stable");
    }
    assert_eq!(canary.count(), 0);
    for r in stable.requests() {
        let values: Vec<_> = r
            .headers
            .iter()
            .filter(|(n, _)| n == "x-meshcanary-variant")
            .collect();
        assert_eq!(
            values.len(),
            1,
            "exactly one decision header reaches the upstream"
        );
        assert_eq!(values[0].1, b"stable");
    }
    assert_no_wasm_failure(&envoy.log());
}

fn invalid_policy() -> Value {
    json!({
        "name": "Checkout",
        "variants": ["stable", "canary"],
        "rules": [
            {"name": "qa", "when": [{"header": "x-canary"}], "variant": "canary"},
            {"name": "rollout", "split": {"by": {"header": "x-user-id"},
                "weights": [{"variant": "canary", "weight": 0}, {"variant": "stable", "weight": 0}]}},
            {"name": "typo", "split": {"by": "random", "weights": [{"variant": "canary", "weight": 1}]}, "colour": "red"}
        ]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policy_at_startup_is_refused_with_every_error_named() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let config = EnvoyConfig::stable_canary(
        FilterSource::Inline(invalid_policy().to_string()),
        stable.addr,
        canary.addr,
    );
    let log = match Envoy::start(&config).await {
        Ok(envoy) => panic!("envoy accepted an invalid policy:\n{}", envoy.log()),
        Err(log) => log,
    };
    for expected in [
        "name: \"Checkout\" may contain only a-z, 0-9, '_' and '-'",
        "rules[0].when[0]: a condition needs exactly one of equals, prefix, in, present (found 0)",
        "rules[1].split.weights: total weight must be greater than 0",
        "rules[2].colour: unknown field",
        "rules[2]: unreachable: rules[1] applies to every request",
    ] {
        assert!(
            log.contains(expected),
            "log does not name {expected:?}:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policy_through_ecds_is_refused_and_the_previous_one_keeps_serving() {
    let rig = start_ecds(&split_policy(10)).await;
    let envoy = &rig.envoy;
    let fail_stat = "extension_config_discovery.http_filter.meshcanary.config_fail";
    let fails_before = envoy.counter(fail_stat).await;

    // Traffic keeps flowing while the bad update arrives.
    let client = envoy.client().clone();
    let url = envoy.url("/");
    let traffic = tokio::spawn(async move {
        let mut answers = Vec::new();
        for _ in 0..600 {
            let r = client.get(&url).header("x-canary", "always").send().await;
            answers.push(match r {
                Ok(r) => (r.status().as_u16(), r.headers().get("x-upstream").cloned()),
                Err(_) => (0, None),
            });
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        answers
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    write_ecds(&rig.ecds, "2", &invalid_policy().to_string());
    let fails = envoy
        .wait_counter(fail_stat, Duration::from_secs(10), |v| v != fails_before)
        .await;
    assert_ne!(fails, fails_before, "the invalid update was never refused");
    let answers = traffic.await.expect("traffic task");
    let failed = answers.iter().filter(|(status, upstream)| {
        *status != 200 || upstream.as_ref().map(|v| v.as_bytes()) != Some(&b"canary"[..])
    });
    assert_eq!(
        failed.count(),
        0,
        "requests failed or were misrouted during the refused update"
    );
    let texts = envoy.text_stats().await;
    assert_eq!(
        texts
            .get("extension_config_discovery.http_filter.meshcanary.version_text")
            .map(String::as_str),
        Some("1"),
        "the previous version keeps serving"
    );
    // Still routing by v1's split.
    let ids = user_ids(300);
    let answers = route_keys(envoy, "x-user-id", &ids, 2).await;
    for (id, answer) in ids.iter().zip(&answers) {
        assert_eq!(answer, &native_variant(&split_policy(10), "rollout", id));
    }
    let log = envoy.log();
    assert!(
        log.contains("rules[1].split.weights: total weight must be greater than 0"),
        "{log}"
    );
    assert_no_wasm_failure(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_variant_counters_equal_what_the_upstreams_saw() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start_with(
        "canary",
        Behaviour {
            status: 503,
            ..Behaviour::default()
        },
    )
    .await;
    // A third variant whose cluster has nobody listening: Envoy answers 503 itself.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_addr = closed.local_addr().expect("addr");
    drop(closed);
    let policy = json!({
        "name": "counted",
        "variants": ["stable", "canary", "broken"],
        "rules": [
            {"name": "to-canary", "when": [{"header": "x-to", "equals": "canary"}], "variant": "canary"},
            {"name": "to-broken", "when": [{"header": "x-to", "equals": "broken"}], "variant": "broken"}
        ]
    });
    let mut config = EnvoyConfig::stable_canary(
        FilterSource::Inline(policy.to_string()),
        stable.addr,
        canary.addr,
    );
    config.clusters.push(Cluster {
        name: "broken".into(),
        addr: closed_addr,
    });
    config.routes.push(("broken".into(), "broken".into()));
    let envoy = Envoy::start(&config).await.expect("envoy starts");

    let (n_stable, n_canary, n_broken) = (37, 23, 11);
    for _ in 0..n_stable {
        assert_eq!(get(&envoy, "/", &[]).await.status, 200);
    }
    for _ in 0..n_canary {
        assert_eq!(get(&envoy, "/", &[("x-to", b"canary")]).await.status, 503);
    }
    for _ in 0..n_broken {
        let answer = get(&envoy, "/", &[("x-to", b"broken")]).await;
        assert_eq!((answer.status, answer.upstream.as_str()), (503, ""));
    }
    // Until every request's counts have reached Envoy (each of these sums counts every
    // request once), then exactly as below.
    let total = (n_stable + n_canary + n_broken) as u64;
    let sum = |stats: &HashMap<String, u64>, names: [&str; 3]| -> u64 {
        names.iter().map(|n| counted(stats, n)).sum()
    };
    let stats = envoy
        .wait_stats(WAIT, |stats| {
            let requests = [
                "variant.stable.requests",
                "variant.canary.requests",
                "variant.broken.requests",
            ];
            let responses = [
                "variant.stable.responses.2xx",
                "variant.canary.responses.5xx",
                "variant.broken.responses.5xx",
            ];
            let decisions = [
                "rule.to-canary.matches",
                "rule.to-broken.matches",
                "fallback",
            ];
            [requests, responses, decisions]
                .into_iter()
                .all(|names| sum(stats, names) >= total)
        })
        .await;
    let stat = |name: &str| counted(&stats, name);
    assert_eq!(stable.count(), n_stable);
    assert_eq!(canary.count(), n_canary);
    assert_eq!(stat("variant.stable.requests"), stable.count() as u64);
    assert_eq!(stat("variant.stable.responses.2xx"), stable.count() as u64);
    assert_eq!(stat("variant.canary.requests"), canary.count() as u64);
    assert_eq!(stat("variant.canary.responses.5xx"), canary.count() as u64);
    assert_eq!(stat("variant.canary.responses.2xx"), 0);
    assert_eq!(stat("variant.broken.requests"), n_broken as u64);
    assert_eq!(
        stat("variant.broken.responses.5xx"),
        n_broken as u64,
        "Envoy's own 503s count too"
    );
    assert_eq!(stat("rule.to-canary.matches"), n_canary as u64);
    assert_eq!(stat("rule.to-broken.matches"), n_broken as u64);
    assert_eq!(stat("fallback"), n_stable as u64);
    for error in ["read_header", "set_header", "read_status", "clock"] {
        assert_eq!(stat(&format!("errors.{error}")), 0, "errors.{error}");
    }
    assert_no_wasm_failure(&envoy.log());
}

/// The filter counts in the module and flushes to Envoy every 100 ms: requests answered
/// just before a policy update (and the end of the root that counted them) must still
/// reach Envoy's counters, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_made_just_before_an_ecds_update_are_flushed_exactly_once() {
    let rig = start_ecds(&split_policy(10)).await;
    let envoy = &rig.envoy;

    let first = route_keys(envoy, "x-user-id", &user_ids(300), 2).await;
    // At once, well inside one flush period after the last answer.
    apply_ecds(envoy, &rig.ecds, "2", &split_policy(30)).await;
    let second = route_keys(envoy, "x-user-id", &user_ids(200), 2).await;

    let answered = (first.len() + second.len()) as u64;
    assert_eq!(answered, 500);
    let requests_of = |stats: &HashMap<String, u64>, variant: &str| {
        stats
            .get(&format!(
                "wasmcustom.meshcanary.checkout.variant.{variant}.requests"
            ))
            .copied()
            .unwrap_or(0)
    };
    // Until every answered request is counted (a count the old root never flushed keeps
    // the sum short for good); then `stats()` reads again after more than a flush period,
    // so that a count flushed twice shows in what the assertions see.
    envoy
        .wait_stats(WAIT, |stats| {
            requests_of(stats, "stable") + requests_of(stats, "canary") >= answered
        })
        .await;
    let stats = envoy.stats().await;
    let requests = |variant: &str| requests_of(&stats, variant);
    assert_eq!(
        (requests("stable"), requests("canary")),
        (rig.stable.count() as u64, rig.canary.count() as u64),
        "the filter's counters against what the upstreams saw"
    );
    assert_eq!(requests("stable") + requests("canary"), answered);
    assert_no_wasm_failure(&envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_never_fails_a_request_and_is_routed_as_the_core_decides() {
    let policy = json!({
        "name": "hostile",
        "variants": ["stable", "canary"],
        "rules": [
            {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
            {"name": "beta", "when": [{"cookie": "plan", "equals": "beta"}], "variant": "canary"},
            {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "missing": "fallback",
                "weights": [{"variant": "canary", "weight": 50}, {"variant": "stable", "weight": 50}]}}
        ]
    });
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let mut config = EnvoyConfig::stable_canary(
        FilterSource::Inline(policy.to_string()),
        stable.addr,
        canary.addr,
    );
    config.max_request_headers = 500;
    let envoy = Envoy::start(&config).await.expect("envoy starts");
    let core = Policy::from_json(policy.to_string().as_bytes()).expect("valid");

    let big_cookie: Vec<u8> = {
        let mut c = b"a=".to_vec();
        c.extend(std::iter::repeat_n(b'x', 16 * 1024));
        c.extend_from_slice(b"; plan=beta");
        c
    };
    let mut many: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| (format!("x-filler-{i}"), vec![b'v'; 20]))
        .collect();
    many.push(("x-canary".into(), b"always".to_vec()));
    let cases: Vec<Vec<(String, Vec<u8>)>> = vec![
        vec![("x-canary".into(), vec![0xff, 0xfe, b'a'])],
        vec![("x-user-id".into(), vec![0xc3, 0x28, 0xa0, 0xa1])],
        vec![("x-user-id".into(), "用户-42".as_bytes().to_vec())],
        vec![("cookie".into(), big_cookie)],
        vec![("cookie".into(), b";;=;plan;=beta;plan=".to_vec())],
        vec![("cookie".into(), vec![b'p', b'l', b'a', b'n', b'=', 0xff])],
        vec![("x-user-id".into(), Vec::new())],
        vec![],
        many,
    ];
    for headers in &cases {
        // Expected: the core's decision for the very values Envoy will hand the filter.
        let inputs: Vec<Option<Vec<u8>>> = core
            .inputs
            .iter()
            .map(|name| {
                headers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
            })
            .collect();
        let expected = &core.variants[core.decide(&inputs, || 0).variant];
        let borrowed: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        let answer = get(&envoy, "/", &borrowed).await;
        assert_eq!(
            answer.status,
            200,
            "{:?}",
            headers.iter().map(|h| &h.0).collect::<Vec<_>>()
        );
        assert_eq!(
            &answer.upstream,
            expected,
            "headers {:?}",
            headers.iter().take(3).collect::<Vec<_>>()
        );
    }
    // Sticky for a non-UTF-8 key too.
    for _ in 0..5 {
        let answer = get(&envoy, "/", &[("x-user-id", &[0xc3, 0x28, 0xa0, 0xa1])]).await;
        assert_eq!(answer.status, 200);
    }
    // No usable x-user-id and no earlier rule matched: cases 1, 5, 6, 7 and 8.
    let key_missing = "wasmcustom.meshcanary.hostile.rule.rollout.key_missing";
    let stats = envoy
        .wait_stats(WAIT, |stats| stats.get(key_missing) == Some(&5))
        .await;
    for error in ["read_header", "set_header", "read_status", "clock"] {
        assert_eq!(
            stats.get(&format!("wasmcustom.meshcanary.hostile.errors.{error}")),
            Some(&0)
        );
    }
    assert_eq!(stats.get(key_missing), Some(&5));
    assert_no_wasm_failure(&envoy.log());
}
