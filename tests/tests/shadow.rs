//! Shadow traffic end to end: real Envoy, the real module, a recording shadow upstream.
//! Copies are sent asynchronously, so tests wait (bounded) for them to arrive and for
//! counters to settle.

use std::time::{Duration, Instant};

use meshcanary_e2e::{
    assert_no_wasm_failure, write_ecds, Behaviour, Cluster, Envoy, EnvoyConfig, FilterSource,
    Upstream,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    envoy: Envoy,
    stable: Upstream,
    canary: Upstream,
    shadow: Upstream,
}

/// Envoy with `stable`, `canary` and `shadow` clusters and a policy whose `mirror`
/// section is `mirror` (the cluster defaults to `shadow`).
async fn start(mirror: Value, shadow: Behaviour, concurrency: u32) -> Setup {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let shadow = Upstream::start_with("shadow", shadow).await;
    let mut mirror = mirror;
    if mirror.get("cluster").is_none() {
        mirror["cluster"] = json!("shadow");
    }
    let policy = json!({
        "name": "shop",
        "variants": ["stable", "canary"],
        "rules": [{"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"}],
        "mirror": mirror
    });
    let mut config = EnvoyConfig::stable_canary(
        FilterSource::Inline(policy.to_string()),
        stable.addr,
        canary.addr,
    );
    config.clusters.push(Cluster {
        name: "shadow".into(),
        addr: shadow.addr,
    });
    config.concurrency = concurrency;
    let envoy = Envoy::start(&config).await.expect("envoy starts");
    Setup {
        envoy,
        stable,
        canary,
        shadow,
    }
}

/// A copy's marker value: the proxy's copy token, 128 random bits in hex.
fn assert_copy_token(marker: Option<&str>) -> String {
    let token = marker.expect("the copy carries the marker header");
    assert!(
        token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "a 128-bit token, not a value a client would guess: {token:?}"
    );
    token.to_string()
}

fn stat(name: &str) -> String {
    format!("wasmcustom.meshcanary.shop.shadow.{name}")
}

impl Setup {
    /// Waits (bounded) until shadow counter `name` is `expected`; if it never gets there,
    /// fails naming every shadow counter and what the shadow upstream received, so a
    /// failure says which path the missing copies took (skipped, failed, timed out, or
    /// never sent).
    async fn expect_shadow(&self, name: &str, expected: u64) {
        let value = self
            .envoy
            .wait_counter(&stat(name), WAIT, |v| v == expected)
            .await;
        if value != expected {
            panic!(
                "shadow.{name} is {value}, expected {expected}; {}",
                self.shadow_report().await
            );
        }
    }

    /// Shadow counters `names`, read once together they add up to at least `total`
    /// (waiting, bounded, for the counts to reach Envoy; returned as last read either way).
    async fn shadow_counts_adding_up<const N: usize>(
        &self,
        names: [&str; N],
        total: u64,
    ) -> [u64; N] {
        let count = |stats: &std::collections::HashMap<String, u64>, name: &str| {
            stats.get(&stat(name)).copied().unwrap_or(0)
        };
        let stats = self
            .envoy
            .wait_stats(WAIT, |stats| {
                names.iter().map(|name| count(stats, name)).sum::<u64>() >= total
            })
            .await;
        names.map(|name| count(&stats, name))
    }

    /// Every non-zero shadow counter and the shadow upstream's request count.
    async fn shadow_report(&self) -> String {
        let prefix = stat("");
        let mut counters: Vec<String> = self
            .envoy
            .stats()
            .await
            .into_iter()
            .filter(|(name, value)| name.starts_with(&prefix) && *value > 0)
            .map(|(name, value)| format!("{} {value}", &name[prefix.len()..]))
            .collect();
        counters.sort();
        format!(
            "shadow counters: {}; the shadow upstream received {} request(s)",
            counters.join(", "),
            self.shadow.count()
        )
    }
}

async fn send(
    envoy: &Envoy,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, String, Vec<u8>) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = envoy.client().request(method, envoy.url(path)).body(body);
    for (n, v) in headers {
        request = request.header(*n, *v);
    }
    let response = request.send().await.expect("request through envoy");
    let status = response.status().as_u16();
    let upstream = response
        .headers()
        .get("x-upstream")
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    (
        status,
        upstream,
        response.bytes().await.expect("body").to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_is_copied_faithfully_without_credentials_and_marked() {
    let s = start(
        json!({"strip_headers": ["x-session-token"]}),
        Behaviour::default(),
        2,
    )
    .await;
    let body = b"query body \x00\x01".to_vec();
    let (status, upstream, answer) = send(
        &s.envoy,
        "GET",
        "/search?q=shoes&page=2",
        &[
            ("host", "checkout.local:8080"),
            ("authorization", "Bearer secret"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("cookie", "session=abc"),
            ("x-api-key", "k-123"),
            ("x-session-token", "t-456"),
            ("x-trace", "keep-me"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(
        (status, upstream.as_str(), answer.as_slice()),
        (200, "stable", &b"stable\n"[..])
    );
    assert_eq!(
        s.shadow.wait_for(1, WAIT).await,
        1,
        "the shadow got one copy"
    );
    let copy = &s.shadow.requests()[0];
    let primary = &s.stable.requests()[0];
    assert_eq!(copy.method, "GET");
    assert_eq!(copy.path, "/search?q=shoes&page=2");
    assert_eq!(copy.body, body, "same body, byte for byte");
    assert_copy_token(copy.header("x-meshcanary-shadow").as_deref());
    assert_eq!(
        copy.header("host").as_deref(),
        Some("checkout.local-shadow:8080")
    );
    assert_eq!(copy.header("x-trace").as_deref(), Some("keep-me"));
    for credential in [
        "authorization",
        "proxy-authorization",
        "cookie",
        "x-api-key",
        "x-session-token",
    ] {
        assert_eq!(
            copy.header(credential),
            None,
            "{credential} reached the shadow"
        );
        assert!(
            primary.header(credential).is_some(),
            "{credential} still reaches the primary"
        );
    }
    assert_eq!(
        primary.header("x-meshcanary-shadow"),
        None,
        "the primary is not marked"
    );
    s.expect_shadow("sent", 1).await;
    assert_no_wasm_failure(&s.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_not_copied_unless_listed() {
    let s = start(json!({}), Behaviour::default(), 2).await;
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let (status, upstream, _) = send(
            &s.envoy,
            method,
            "/orders",
            &[],
            b"{\"charge\": 10}".to_vec(),
        )
        .await;
        assert_eq!((status, upstream.as_str()), (200, "stable"));
    }
    s.expect_shadow("skipped.method", 4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.shadow.count(), 0, "no write reached the shadow");
    drop(s);

    let s = start(
        json!({"methods": ["GET", "post", "PUT", "PATCH", "DELETE"]}),
        Behaviour::default(),
        2,
    )
    .await;
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        send(
            &s.envoy,
            method,
            "/orders",
            &[],
            b"{\"charge\": 10}".to_vec(),
        )
        .await;
    }
    assert_eq!(s.shadow.wait_for(4, WAIT).await, 4);
    let mut methods: Vec<String> = s
        .shadow
        .requests()
        .iter()
        .map(|r| r.method.clone())
        .collect();
    methods.sort();
    assert_eq!(methods, ["DELETE", "PATCH", "POST", "PUT"]);
    for copy in s.shadow.requests() {
        assert_copy_token(copy.header("x-meshcanary-shadow").as_deref());
        assert_eq!(copy.body, b"{\"charge\": 10}");
    }
    assert_no_wasm_failure(&s.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_shadow_never_delays_the_primary() {
    let slow = Behaviour {
        delay: Duration::from_secs(2),
        ..Behaviour::default()
    };
    let s = start(json!({"timeout_ms": 3000}), slow, 2).await;
    let mut latencies = Vec::with_capacity(500);
    let started = Instant::now();
    for i in 0..500 {
        let t = Instant::now();
        let (status, upstream, _) =
            send(&s.envoy, "GET", &format!("/item/{i}"), &[], Vec::new()).await;
        latencies.push(t.elapsed());
        assert_eq!((status, upstream.as_str()), (200, "stable"));
    }
    let total = started.elapsed();
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    println!("primary latency with a 2 s shadow: p50 {p50:?}, p99 {p99:?}, max {:?}, 500 requests in {total:?}", latencies[499]);
    // Far below the shadow's 2 s: the copy is sent after the primary moved on. (Bounds
    // with room for a slow, loaded machine: a primary that waited for its copy would take
    // 2 s, so p50 and p99 would both be over 2 s.)
    assert!(p50 < Duration::from_millis(100), "p50 {p50:?}");
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    assert!(total < Duration::from_secs(30), "total {total:?}");
    // Every request's copy is either sent or skipped at the limit; the roots dispatch the
    // copies and the counts reach Envoy later: wait until the two add up to every request.
    let [sent, limited] = s
        .shadow_counts_adding_up(["sent", "skipped.in_flight_limit"], 500)
        .await;
    assert!(
        sent > 0 && sent + limited == 500,
        "sent {sent} + limited {limited}"
    );
    // Every copy outlived its (long finished) primary stream and got the shadow's answer.
    // (Copies cancelled with their primaries would never be answered.)
    s.expect_shadow("responses.2xx", sent).await;
    assert_eq!(s.envoy.counter(&stat("timed_out")).await, 0);
    println!("copies sent {sent}, all answered, skipped at the in-flight limit {limited}");
    assert_no_wasm_failure(&s.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_failures_never_touch_the_primary_and_are_counted() {
    // 500s from the shadow.
    let s = start(
        json!({}),
        Behaviour {
            status: 500,
            ..Behaviour::default()
        },
        2,
    )
    .await;
    for _ in 0..20 {
        assert_eq!(send(&s.envoy, "GET", "/", &[], Vec::new()).await.0, 200);
    }
    s.expect_shadow("responses.5xx", 20).await;
    s.expect_shadow("status_mismatch", 20).await;
    drop(s);

    // The shadow resets every connection.
    let s = start(
        json!({}),
        Behaviour {
            reset: true,
            ..Behaviour::default()
        },
        2,
    )
    .await;
    for _ in 0..20 {
        let (status, upstream, body) = send(&s.envoy, "GET", "/", &[], Vec::new()).await;
        assert_eq!(
            (status, upstream.as_str(), body.as_slice()),
            (200, "stable", &b"stable\n"[..])
        );
    }
    let failed = s
        .envoy
        .wait_counter(&stat("failed"), WAIT, |v| v == 20)
        .await;
    let five_xx = s.envoy.counter(&stat("responses.5xx")).await;
    // Envoy may turn a reset into its own 503 for the call, or report no response.
    println!("resetting shadow: failed {failed}, 5xx {five_xx}");
    assert_eq!(failed + five_xx, 20, "failed {failed}, 5xx {five_xx}");
    drop(s);

    // A cluster that does not exist.
    let s = start(
        json!({"cluster": "no-such-cluster"}),
        Behaviour::default(),
        2,
    )
    .await;
    for _ in 0..20 {
        assert_eq!(send(&s.envoy, "GET", "/", &[], Vec::new()).await.0, 200);
    }
    s.expect_shadow("failed", 20).await;
    assert_eq!(s.envoy.counter(&stat("sent")).await, 0);
    assert_eq!(s.stable.count(), 20);
    assert_no_wasm_failure(&s.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_skipped_and_binary_bodies_arrive_exact() {
    let s = start(
        json!({"methods": ["POST"], "max_body_bytes": 65536}),
        Behaviour::default(),
        2,
    )
    .await;
    let binary: Vec<u8> = (0..=255u8).cycle().take(60_000).collect();
    let large: Vec<u8> = (0..=255u8).rev().cycle().take(200_000).collect();
    let (status, upstream, _) = send(&s.envoy, "POST", "/upload", &[], binary.clone()).await;
    assert_eq!((status, upstream.as_str()), (200, "stable"));
    let (status, _, _) = send(&s.envoy, "POST", "/upload", &[], large.clone()).await;
    assert_eq!(status, 200);
    s.expect_shadow("skipped.body_too_large", 1).await;
    assert_eq!(s.shadow.wait_for(1, WAIT).await, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.shadow.count(), 1, "the large body was not copied");
    assert_eq!(
        s.shadow.requests()[0].body,
        binary,
        "byte-exact binary body"
    );
    let primary_bodies: Vec<usize> = s.stable.requests().iter().map(|r| r.body.len()).collect();
    assert_eq!(
        primary_bodies,
        [60_000, 200_000],
        "the primary got both bodies whole"
    );
    assert_no_wasm_failure(&s.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_50_copies_half_of_the_eligible_requests() {
    let s = start(json!({"percent": 50}), Behaviour::default(), 2).await;
    for i in 0..2000 {
        send(&s.envoy, "GET", &format!("/p/{i}"), &[], Vec::new()).await;
    }
    // Every request is either copied or sampled out; both counts reach Envoy later (the
    // copies are sent by the roots, the counts flushed every 100 ms): wait until they add
    // up to every request.
    let [sent, sampled_out] = s
        .shadow_counts_adding_up(["sent", "skipped.sampled_out"], 2000)
        .await;
    assert_eq!(
        sent + sampled_out,
        2000,
        "sent {sent} + sampled out {sampled_out}; {}",
        s.shadow_report().await
    );
    println!(
        "percent 50: {sent} of 2000 copied ({:.1} %)",
        sent as f64 / 20.0
    );
    // sent ~ Bin(2000, 1/2): standard deviation 22.4, so ±140 is 6.3 standard deviations,
    // exceeded by chance with P ≈ 3e-10 (±100 was P ≈ 7e-6). A filter copying 43 % or
    // 57 % of the requests instead of 50 % still fails.
    assert!(sent.abs_diff(1000) <= 140, "sent {sent} of 2000");
    assert_no_wasm_failure(&s.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_shadow_holds_at_most_max_in_flight_copies() {
    let stalled = Behaviour {
        delay: Duration::from_secs(3),
        ..Behaviour::default()
    };
    // One worker, so the per-worker limit is the whole limit.
    let s = start(json!({"max_in_flight": 5, "timeout_ms": 5000}), stalled, 1).await;
    for i in 0..50 {
        assert_eq!(
            send(&s.envoy, "GET", &format!("/s/{i}"), &[], Vec::new())
                .await
                .0,
            200
        );
    }
    s.expect_shadow("skipped.in_flight_limit", 45).await;
    assert_eq!(s.shadow.wait_for(5, WAIT).await, 5);
    s.expect_shadow("sent", 5).await;
    assert!(
        s.shadow.max_in_flight() <= 5,
        "max in flight {}",
        s.shadow.max_in_flight()
    );
    assert_no_wasm_failure(&s.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_counts_status_and_body_differences() {
    // Same status class, different body (the shadow answers with its own name).
    let s = start(json!({"compare": "body"}), Behaviour::default(), 2).await;
    for _ in 0..10 {
        send(&s.envoy, "GET", "/", &[], Vec::new()).await;
    }
    s.expect_shadow("body_mismatch", 10).await;
    s.expect_shadow("status_match", 10).await;
    // Now an identical body.
    s.shadow.set_behaviour(Behaviour {
        body: Some(b"stable\n".to_vec()),
        ..Behaviour::default()
    });
    for _ in 0..10 {
        send(&s.envoy, "GET", "/", &[], Vec::new()).await;
    }
    s.expect_shadow("body_match", 10).await;
    s.expect_shadow("status_match", 20).await;
    // A different status class.
    s.shadow.set_behaviour(Behaviour {
        status: 404,
        ..Behaviour::default()
    });
    for _ in 0..10 {
        send(&s.envoy, "GET", "/", &[], Vec::new()).await;
    }
    s.expect_shadow("status_mismatch", 10).await;
    assert_eq!(
        s.envoy.counter(&stat("body_mismatch")).await,
        10,
        "unchanged"
    );
    drop(s);

    // compare: "status" counts equal classes as matches and never looks at bodies.
    let s = start(json!({"compare": "status"}), Behaviour::default(), 2).await;
    for _ in 0..10 {
        send(&s.envoy, "GET", "/", &[], Vec::new()).await;
    }
    s.expect_shadow("status_match", 10).await;
    assert_eq!(s.envoy.counter(&stat("body_mismatch")).await, 0);
    assert_no_wasm_failure(&s.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_carrying_the_marker_is_not_copied_again_nor_counted_as_live() {
    let s = start(json!({}), Behaviour::default(), 2).await;
    // A copy coming back through this proxy (a shadow cluster routed through it, a shadow
    // service passing the header on) carries the token the proxy put on it.
    send(&s.envoy, "GET", "/original", &[], Vec::new()).await;
    assert_eq!(s.shadow.wait_for(1, WAIT).await, 1);
    let token = assert_copy_token(
        s.shadow.requests()[0]
            .header("x-meshcanary-shadow")
            .as_deref(),
    );
    s.expect_shadow("sent", 1).await;
    // The one live request so far, once its count has reached Envoy.
    let live = "wasmcustom.meshcanary.shop.variant.stable.requests";
    let live_before = s.envoy.wait_counter(live, WAIT, |v| v == 1).await;
    assert_eq!(live_before, 1, "the original request counted as live");
    s.stable.clear();
    // A connection per request, so both workers see copies: every worker knows the token.
    let copies = 20;
    for _ in 0..copies {
        let (status, upstream, _) = send(
            &s.envoy,
            "GET",
            "/",
            &[("x-meshcanary-shadow", &token), ("connection", "close")],
            Vec::new(),
        )
        .await;
        assert_eq!(
            (status, upstream.as_str()),
            (200, "stable"),
            "a copy is still routed"
        );
    }
    let per_worker: Vec<u64> = s
        .envoy
        .stats()
        .await
        .into_iter()
        .filter(|(name, _)| name.contains(".worker_") && name.ends_with(".downstream_cx_total"))
        .map(|(_, connections)| connections)
        .collect();
    assert!(
        per_worker.len() == 2 && per_worker.iter().all(|c| *c > 1),
        "both workers took copies: {per_worker:?}"
    );
    s.expect_shadow("skipped.marked", copies).await;
    assert_eq!(
        s.envoy
            .counter("wasmcustom.meshcanary.shop.variant.stable.requests")
            .await,
        live_before,
        "copies are not live traffic"
    );
    assert_eq!(s.envoy.counter(&stat("forged_marker")).await, 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.shadow.count(), 1, "copies are never copied again");
    assert_eq!(s.envoy.counter(&stat("sent")).await, 1);
    // The genuine marker travels on with the copy it marks.
    assert!(s
        .stable
        .requests()
        .iter()
        .all(|r| r.header("x-meshcanary-shadow").as_deref() == Some(token.as_str())));
    assert_no_wasm_failure(&s.envoy.log());
}

/// Issue 15's report, as a new user tried it: 200 requests carrying
/// `x-meshcanary-shadow: 1`, half of them routed to a canary answering 500, were all served
/// and none was counted — any client could hide a failing canary from the analysis. Now a
/// marker is a copy only with the proxy's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_marker_cannot_hide_requests_from_the_analysis() {
    let s = start(json!({}), Behaviour::default(), 2).await;
    s.canary.set_behaviour(Behaviour {
        error_rate: 1.0,
        ..Behaviour::default()
    });
    let total = 200u64;
    for i in 0..total {
        let mut headers = vec![("x-meshcanary-shadow", "1")];
        if i % 2 == 0 {
            headers.push(("x-canary", "always"));
        }
        let (status, upstream, _) = send(&s.envoy, "GET", "/", &headers, Vec::new()).await;
        let expected = if i % 2 == 0 {
            (500, "canary")
        } else {
            (200, "stable")
        };
        assert_eq!((status, upstream.as_str()), expected, "request {i}");
    }
    let envoy = &s.envoy;
    // Each count as soon as it has reached Envoy (flushed every 100 ms, later on a busy
    // machine), bounded.
    let counter = |name: String, expected: u64| async move {
        envoy.wait_counter(&name, WAIT, |v| v == expected).await
    };
    let variant = |v: &str, what: &str| format!("wasmcustom.meshcanary.shop.variant.{v}.{what}");
    assert_eq!(
        counter(variant("canary", "requests"), total / 2).await,
        total / 2
    );
    assert_eq!(
        counter(variant("canary", "responses.5xx"), total / 2).await,
        total / 2,
        "the failing canary is seen"
    );
    assert_eq!(
        counter(variant("stable", "requests"), total / 2).await,
        total / 2
    );
    assert_eq!(
        counter(variant("stable", "responses.2xx"), total / 2).await,
        total / 2
    );
    assert_eq!(
        counter(stat("forged_marker"), total).await,
        total,
        "and each forgery counted"
    );
    assert_eq!(envoy.counter(&stat("skipped.marked")).await, 0);
    // Live requests like any other: copied, with the real token in place of the forged one.
    s.expect_shadow("sent", total).await;
    assert_eq!(
        s.shadow.wait_for(total as usize, WAIT).await,
        total as usize
    );
    for copy in s.shadow.requests() {
        assert_copy_token(copy.header("x-meshcanary-shadow").as_deref());
    }
    // The forged header never reaches a service.
    for upstream in [&s.stable, &s.canary] {
        assert!(
            upstream
                .requests()
                .iter()
                .all(|r| r.header("x-meshcanary-shadow").is_none()),
            "{} received a forged marker",
            upstream.name()
        );
    }
    assert_no_wasm_failure(&s.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_decides_first_and_a_canary_request_is_still_copied() {
    let s = start(json!({}), Behaviour::default(), 2).await;
    let (status, upstream, _) =
        send(&s.envoy, "GET", "/", &[("x-canary", "always")], Vec::new()).await;
    assert_eq!((status, upstream.as_str()), (200, "canary"));
    assert_eq!(s.shadow.wait_for(1, WAIT).await, 1);
    let copy = &s.shadow.requests()[0];
    // The copy carries the primary's routing decision.
    assert_eq!(
        copy.header("x-meshcanary-variant").as_deref(),
        Some("canary")
    );
    assert_eq!(s.canary.count(), 1);
    assert_eq!(s.stable.count(), 0);
    assert_no_wasm_failure(&s.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_sends_its_own_copies() {
    // Each worker's root sends the copies its streams make, woken through a queue of its
    // own: were two workers to share one, only one would ever be woken.
    let s = start(json!({}), Behaviour::default(), 2).await;
    let requests = 60;
    for i in 0..requests {
        // A connection per request, so the kernel spreads them over both workers.
        let (status, _, _) = send(
            &s.envoy,
            "GET",
            &format!("/w/{i}"),
            &[("connection", "close")],
            Vec::new(),
        )
        .await;
        assert_eq!(status, 200);
    }
    let stats = s.envoy.stats().await;
    let mut per_worker: Vec<(String, u64)> = stats
        .into_iter()
        .filter(|(name, _)| name.contains(".worker_") && name.ends_with(".downstream_cx_total"))
        .collect();
    per_worker.sort();
    assert_eq!(
        per_worker.len(),
        2,
        "per-worker listener stats: {per_worker:?}"
    );
    assert!(
        per_worker.iter().all(|(_, connections)| *connections > 0),
        "both workers took connections: {per_worker:?}"
    );
    s.expect_shadow("sent", requests).await;
    assert_eq!(
        s.shadow.wait_for(requests as usize, WAIT).await,
        requests as usize
    );
    assert_no_wasm_failure(&s.envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_token_changes_with_the_policy() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let shadow = Upstream::start("shadow").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ecds = dir.path().join("meshcanary.ecds.json");
    let policy = |percent: u32| {
        json!({
            "name": "shop",
            "variants": ["stable", "canary"],
            "rules": [{"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"}],
            "mirror": {"cluster": "shadow", "percent": percent}
        })
    };
    let mut config =
        EnvoyConfig::stable_canary(FilterSource::Ecds(ecds.clone()), stable.addr, canary.addr);
    config.clusters.push(Cluster {
        name: "shadow".into(),
        addr: shadow.addr,
    });
    write_ecds(&ecds, "1", &policy(100).to_string());
    let envoy = Envoy::start(&config).await.expect("envoy starts");
    envoy
        .wait_ecds_version("1", WAIT)
        .await
        .expect("version 1 applied");
    let token_now = |n: usize| {
        let envoy = &envoy;
        let shadow = &shadow;
        async move {
            send(envoy, "GET", "/", &[], Vec::new()).await;
            assert_eq!(shadow.wait_for(n, WAIT).await, n);
            assert_copy_token(
                shadow.requests()[n - 1]
                    .header("x-meshcanary-shadow")
                    .as_deref(),
            )
        }
    };
    let first = token_now(1).await;
    assert_eq!(token_now(2).await, first, "one token per policy");

    write_ecds(&ecds, "2", &policy(99).to_string());
    envoy
        .wait_ecds_version("2", WAIT)
        .await
        .expect("version 2 applied");
    // 99 %: sampling may skip a request, so the count of copies is not the count of
    // requests; and a worker may serve a request or two with version 1 while Envoy hands
    // version 2 to every thread. Send until a copy carries a token other than the first.
    let mut second = None;
    for _attempt in 0..20 {
        let copies = shadow.count();
        send(&envoy, "GET", "/", &[], Vec::new()).await;
        if shadow
            .wait_for(copies + 1, Duration::from_millis(500))
            .await
            > copies
        {
            let newest = shadow.requests().len() - 1;
            let token = assert_copy_token(
                shadow.requests()[newest]
                    .header("x-meshcanary-shadow")
                    .as_deref(),
            );
            if token != first {
                second = Some(token);
                break;
            }
        }
    }
    let second = second.expect("a copy with a new token within 20 requests of the new policy");

    // The old token is now just another forged marker: counted as live.
    let forged_before = envoy.counter(&stat("forged_marker")).await;
    send(
        &envoy,
        "GET",
        "/",
        &[("x-meshcanary-shadow", &first)],
        Vec::new(),
    )
    .await;
    envoy
        .wait_counter(&stat("forged_marker"), WAIT, |v| v == forged_before + 1)
        .await;
    assert_eq!(
        envoy.counter(&stat("forged_marker")).await,
        forged_before + 1
    );
    let marked_before = envoy.counter(&stat("skipped.marked")).await;
    send(
        &envoy,
        "GET",
        "/",
        &[("x-meshcanary-shadow", &second)],
        Vec::new(),
    )
    .await;
    assert_eq!(
        envoy
            .wait_counter(&stat("skipped.marked"), WAIT, |v| v == marked_before + 1)
            .await,
        marked_before + 1
    );
    assert_no_wasm_failure(&envoy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_that_is_not_utf8_skips_the_copy_and_utf8_text_is_copied_exactly() {
    let s = start(json!({}), Behaviour::default(), 1).await;
    // UTF-8 beyond ASCII: copied byte for byte.
    let (status, _, _) = send(&s.envoy, "GET", "/a", &[("x-note", "café ☕")], Vec::new()).await;
    assert_eq!(status, 200);
    s.expect_shadow("sent", 1).await;
    assert_eq!(s.shadow.wait_for(1, WAIT).await, 1);
    assert_eq!(
        s.shadow.requests()[0].header("x-note").as_deref(),
        Some("café ☕")
    );
    // Latin-1 (obs-text, legal in HTTP/1 but not UTF-8): Envoy's HTTP call takes text
    // only, so the copy is skipped and counted; the primary is untouched.
    let latin1 = reqwest::header::HeaderValue::from_bytes(b"caf\xe9").expect("obs-text value");
    let answer = s
        .envoy
        .client()
        .get(s.envoy.url("/b"))
        .header("x-note", latin1)
        .send()
        .await
        .expect("request through envoy");
    assert_eq!(answer.status().as_u16(), 200);
    s.expect_shadow("skipped.non_utf8_header", 1).await;
    let primary = s.stable.requests();
    assert_eq!(
        primary.last().map(|r| r
            .headers
            .iter()
            .any(|(n, v)| n == "x-note" && v == b"caf\xe9")),
        Some(true),
        "the primary got the header as sent"
    );
    // Nothing more reached the shadow, and nothing was counted as sent.
    assert_eq!(s.envoy.counter(&stat("sent")).await, 1);
    assert_eq!(s.shadow.count(), 1);
    assert_no_wasm_failure(&s.envoy.log());
}
