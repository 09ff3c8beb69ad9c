//! Hostile and broken traffic through real Envoy (2 workers) and the real module, while
//! the policy is replaced through ECDS ten times a second, alternating valid and invalid
//! versions. Requests are written by hand on raw TCP connections, so they can be what no
//! HTTP client library would send: non-UTF-8 and obs-text values, 60 KB cookies with
//! thousands of pairs, broken quoting and percent-encoding, 30 KB keys, spoofed decision
//! and marker headers, pipelining, HTTP/1.0, chunked bodies with trailers, bodies over
//! `max_body_bytes`, clients that hang up mid-body.
//!
//! What must hold: every complete request is answered by an upstream or by Envoy's own
//! codec limits (4xx), never by a failing filter; Envoy's log shows no trap or panic; no
//! credential and no write reaches the shadow; no spoofed header is honoured.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshcanary_e2e::{
    wasm_failure, write_ecds, Behaviour, Cluster, Envoy, EnvoyConfig, FilterSource, Upstream,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A policy reading headers, cookies and the query, with a keyed split and a mirror whose
/// body limit is small; `version` moves the split so each valid update is a real change.
fn valid_policy(version: u64) -> Value {
    json!({
        "name": "edge",
        "variants": ["stable", "canary"],
        "rules": [
            {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
            {"name": "beta", "when": [{"cookie": "plan", "in": ["beta", "internal"]}], "variant": "canary"},
            {"name": "debug", "when": [{"query": "debug", "equals": "on"}], "variant": "canary"},
            {"name": "rollout", "split": {"by": {"cookie": "uid"}, "salt": "edge", "missing": "fallback",
                "weights": [{"variant": "canary", "weight": 10 + version % 30},
                            {"variant": "stable", "weight": 90 - version % 30}]}}
        ],
        "mirror": {"cluster": "shadow", "percent": 100, "max_body_bytes": 1024,
                   "methods": ["GET", "HEAD", "OPTIONS"], "strip_headers": ["x-session-token"]}
    })
}

/// A policy Envoy must refuse (the filter rejects it), so the previous one keeps serving.
fn invalid_policy(version: u64) -> Value {
    json!({"name": "edge", "variants": ["stable"], "rules": [{"name": "x", "variant": format!("v{version}")}]})
}

/// One raw request and the answers read back until Envoy closed the connection.
struct Exchange {
    name: &'static str,
    answers: Vec<(u16, Option<String>)>,
}

/// Writes `bytes` on a fresh connection (optionally closing the write side early) and
/// reads every response until the connection closes or `deadline`.
async fn exchange(envoy: &Envoy, name: &'static str, bytes: &[u8], hang_up: bool) -> Exchange {
    let mut stream = TcpStream::connect(envoy.listener)
        .await
        .expect("connect to envoy");
    // Large requests may be answered (and the connection closed) before they are fully
    // written: a failed write is then the codec's answer, not an error.
    let _ = stream.write_all(bytes).await;
    if hang_up {
        drop(stream);
        return Exchange {
            name,
            answers: Vec::new(),
        };
    }
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "{name}: no answer within 10 s");
    Exchange {
        name,
        answers: parse_responses(&out),
    }
}

/// Status and `x-upstream` of every response in a byte stream (bodies skipped by
/// Content-Length or chunked framing).
fn parse_responses(mut bytes: &[u8]) -> Vec<(u16, Option<String>)> {
    let mut answers = Vec::new();
    while let Some(end) = find(bytes, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut upstream = None;
        let mut length = 0usize;
        let mut chunked = false;
        for line in lines {
            let (k, v) = line.split_once(':').unwrap_or((line, ""));
            match k.trim().to_ascii_lowercase().as_str() {
                "x-upstream" => upstream = Some(v.trim().to_string()),
                "content-length" => length = v.trim().parse().unwrap_or(0),
                "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
                _ => {}
            }
        }
        answers.push((status, upstream));
        let mut rest = &bytes[end + 4..];
        if chunked {
            // Skip chunks until the zero-length one and its blank line.
            while let Some(line_end) = find(rest, b"\r\n") {
                let size =
                    usize::from_str_radix(String::from_utf8_lossy(&rest[..line_end]).trim(), 16)
                        .unwrap_or(0);
                rest = &rest[(line_end + 2 + size + 2).min(rest.len())..];
                if size == 0 {
                    break;
                }
            }
        } else {
            rest = &rest[length.min(rest.len())..];
        }
        bytes = rest;
    }
    answers
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `GET path` with extra raw header lines, closing the connection after the answer.
fn get(path: &str, headers: &[u8]) -> Vec<u8> {
    let mut out = format!("GET {path} HTTP/1.1\r\nHost: edge.local\r\n").into_bytes();
    out.extend_from_slice(headers);
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

/// The hostile requests: (name, bytes, hang up after writing).
fn hostile_requests() -> Vec<(&'static str, Vec<u8>, bool)> {
    let mut requests = Vec::new();
    // Values that are not UTF-8, and obs-text (0x80–0xFF) in inputs the policy reads.
    requests.push((
        "non-utf8 header values",
        get(
            "/",
            b"X-Canary: \xff\xfe\xc3\x28\r\nCookie: uid=\xe2\x82; plan=\xc0\xaf\r\nX-Trace: \x80\x81\x82\r\n",
        ),
        false,
    ));
    requests.push((
        "obs-text cookie",
        get("/", b"Cookie: uid=caf\xe9; plan=b\xeata\r\n"),
        false,
    ));
    // A 60 KB cookie header with thousands of pairs (at or over Envoy's header limit).
    let mut cookie = b"Cookie: ".to_vec();
    let mut i = 0;
    while cookie.len() < 60 * 1024 {
        cookie.extend_from_slice(format!("k{i}=v{i}; ").as_bytes());
        i += 1;
    }
    cookie.extend_from_slice(b"uid=user-7\r\n");
    requests.push(("60 KB cookie, thousands of pairs", get("/", &cookie), false));
    let mut cookie = b"Cookie: ".to_vec();
    for i in 0..2000 {
        cookie.extend_from_slice(format!("a{i}=\"q{i}; ").as_bytes());
    }
    cookie.extend_from_slice(b"plan=\"beta\r\n");
    requests.push(("malformed quoting in 2,000 pairs", get("/", &cookie), false));
    requests.push((
        "quotes and separators",
        get(
            "/",
            b"Cookie: =; ;;; =x; plan=\"\"beta\"\"; uid=\"\r\nCookie: uid\r\n",
        ),
        false,
    ));
    // Broken percent-encoding in huge query strings.
    let mut query = String::from("/search?");
    while query.len() < 30 * 1024 {
        query.push_str("a=%zz%4&%%=%e2%82&debug=%6fn%&");
    }
    requests.push((
        "broken percent-encoding, 30 KB query",
        get(&query, b""),
        false,
    ));
    requests.push((
        "percent-encoded key and value",
        get("/?%64ebug=%6Fn&debug", b""),
        false,
    ));
    // Empty and 30 KB keys.
    requests.push((
        "empty keys",
        get("/?=&debug=&=on", b"Cookie: =beta; uid=\r\nX-Canary:\r\n"),
        false,
    ));
    let long_key = "u".repeat(30 * 1024);
    requests.push((
        "30 KB cookie key",
        get("/", format!("Cookie: uid={long_key}\r\n").as_bytes()),
        false,
    ));
    // Spoofed decision and marker headers, credentials that must never reach the shadow.
    requests.push((
        "spoofed decision header",
        get(
            "/",
            b"X-Meshcanary-Variant: canary\r\nX-Meshcanary-Variant: stable\r\nAuthorization: Bearer secret\r\nX-Session-Token: s\r\n",
        ),
        false,
    ));
    requests.push((
        "spoofed marker",
        get(
            "/",
            b"X-Meshcanary-Shadow: 1\r\nX-Canary: always\r\nCookie: session=secret\r\nX-Api-Key: k\r\n",
        ),
        false,
    ));
    // Pipelined requests on one connection, the last closing it.
    let mut pipelined = Vec::new();
    for i in 0..5 {
        pipelined.extend_from_slice(
            format!("GET /p/{i} HTTP/1.1\r\nHost: edge.local\r\nCookie: uid=user-{i}\r\n\r\n")
                .as_bytes(),
        );
    }
    pipelined.extend_from_slice(
        b"GET /p/last HTTP/1.1\r\nHost: edge.local\r\nConnection: close\r\n\r\n",
    );
    requests.push(("six pipelined requests", pipelined, false));
    requests.push((
        "HTTP/1.0",
        b"GET /old HTTP/1.0\r\nHost: edge.local\r\nCookie: plan=beta\r\n\r\n".to_vec(),
        false,
    ));
    // Chunked bodies with trailers, a write and a read.
    requests.push((
        "chunked POST with trailers",
        b"POST /orders HTTP/1.1\r\nHost: edge.local\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\nAuthorization: Bearer s\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n".to_vec(),
        false,
    ));
    requests.push((
        "chunked GET with a body and trailers",
        b"GET /with-body HTTP/1.1\r\nHost: edge.local\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nbody\r\n0\r\nX-T: 1\r\n\r\n".to_vec(),
        false,
    ));
    // A body over max_body_bytes (1 KB): served, not copied.
    let body = vec![b'x'; 8 * 1024];
    let mut big = format!(
        "GET /big HTTP/1.1\r\nHost: edge.local\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    big.extend_from_slice(&body);
    requests.push(("8 KB body over max_body_bytes", big, false));
    // Clients that hang up mid-body.
    requests.push((
        "hang-up mid-body",
        b"GET /partial HTTP/1.1\r\nHost: edge.local\r\nContent-Length: 100000\r\n\r\nonly a little"
            .to_vec(),
        true,
    ));
    requests.push((
        "hang-up mid-chunk",
        b"POST /partial HTTP/1.1\r\nHost: edge.local\r\nTransfer-Encoding: chunked\r\n\r\n100\r\nabc".to_vec(),
        true,
    ));
    requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_traffic_during_policy_churn_never_fails_the_filter() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let shadow = Upstream::start_with("shadow", Behaviour::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ecds = dir.path().join("meshcanary.ecds.json");
    let mut config =
        EnvoyConfig::stable_canary(FilterSource::Ecds(ecds.clone()), stable.addr, canary.addr);
    config.clusters.push(Cluster {
        name: "shadow".into(),
        addr: shadow.addr,
    });
    config.concurrency = 2;
    config.max_request_headers = 10_000;
    config.accept_http_10 = true;
    // Room for the 60 KB cookie, so it reaches the filter rather than Envoy's 431.
    config.max_request_headers_kb = 96;
    write_ecds(&ecds, "0", &valid_policy(0).to_string());
    let envoy = Envoy::start(&config).await.expect("envoy starts");
    envoy
        .wait_ecds_version("0", Duration::from_secs(10))
        .await
        .expect("first policy applied");

    // Ten updates a second, alternating valid and invalid, for as long as the traffic runs.
    let churning = Arc::new(AtomicBool::new(true));
    let churn = {
        let churning = Arc::clone(&churning);
        let ecds = ecds.clone();
        tokio::spawn(async move {
            let mut version = 0u64;
            while churning.load(Ordering::Relaxed) {
                version += 1;
                let policy = if version.is_multiple_of(2) {
                    valid_policy(version)
                } else {
                    invalid_policy(version)
                };
                write_ecds(&ecds, &version.to_string(), &policy.to_string());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            version
        })
    };

    let started = Instant::now();
    let mut answered = 0usize;
    let mut by_codec = 0usize;
    let mut codec_refused = std::collections::BTreeSet::new();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(8) {
        rounds += 1;
        for (name, bytes, hang_up) in hostile_requests() {
            let exchange = exchange(&envoy, name, &bytes, hang_up).await;
            if hang_up {
                continue;
            }
            assert!(
                !exchange.answers.is_empty(),
                "{}: a complete request got no answer",
                exchange.name
            );
            for (status, upstream) in &exchange.answers {
                match (status, upstream.as_deref()) {
                    (200, Some("stable" | "canary")) => answered += 1,
                    // Envoy's own codec limits (header size, malformed framing): never the filter.
                    (400 | 413 | 414 | 431, None) => {
                        by_codec += 1;
                        codec_refused.insert(exchange.name);
                    }
                    other => panic!(
                        "{}: answered {other:?}; only an upstream or Envoy's codec may answer",
                        exchange.name
                    ),
                }
            }
        }
    }
    churning.store(false, Ordering::Relaxed);
    let updates = churn.await.expect("churn task");
    eprintln!(
        "{rounds} rounds of {} hostile requests: {answered} answered by an upstream, {by_codec} by Envoy's codec limits ({codec_refused:?}), {updates} policy updates (half invalid)",
        hostile_requests().len()
    );
    assert!(
        answered > 0 && updates >= 40,
        "the churn and the traffic overlapped"
    );

    // Updates were really applied and refused while the traffic ran.
    let stats = envoy.stats().await;
    let ecds_stat = |name: &str| {
        stats
            .get(&format!(
                "extension_config_discovery.http_filter.meshcanary.{name}"
            ))
            .copied()
            .unwrap_or(0)
    };
    assert!(
        ecds_stat("config_reload") >= 20 && ecds_stat("config_fail") >= 20,
        "valid and invalid updates reached Envoy: reload {}, fail {}",
        ecds_stat("config_reload"),
        ecds_stat("config_fail")
    );

    let log = envoy.log();
    assert!(
        wasm_failure(&log).is_none(),
        "the filter trapped or failed: {:?}",
        wasm_failure(&log)
    );
    assert!(!log.to_ascii_lowercase().contains("panicked"), "{log}");

    // No spoofed header honoured: every request reached the upstream its own decision
    // header names, and no forged marker travelled on.
    for upstream in [&stable, &canary] {
        for request in upstream.requests() {
            assert_eq!(
                request.header("x-meshcanary-variant").as_deref(),
                Some(upstream.name()),
                "{} got a request decided for another variant: {:?}",
                upstream.name(),
                request.path
            );
            assert_ne!(
                request.header("x-meshcanary-shadow").as_deref(),
                Some("1"),
                "a forged marker reached {}",
                upstream.name()
            );
        }
    }
    // No credential and no write reached the shadow.
    assert!(shadow.count() > 0, "copies were made meanwhile");
    for copy in shadow.requests() {
        assert!(
            ["GET", "HEAD", "OPTIONS"].contains(&copy.method.as_str()),
            "a {} reached the shadow",
            copy.method
        );
        for credential in [
            "authorization",
            "proxy-authorization",
            "cookie",
            "x-api-key",
            "x-session-token",
        ] {
            assert!(
                copy.header(credential).is_none(),
                "{credential} reached the shadow on {}",
                copy.path
            );
        }
        assert!(
            copy.body.len() <= 1024,
            "a body over max_body_bytes was copied"
        );
    }
}
