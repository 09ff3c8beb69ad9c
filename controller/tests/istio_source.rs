//! The Istio-standard-metrics source ([`IstioPrometheus`]): the exact PromQL it sends, and
//! its sums read back from a REAL Prometheus (Debian's, `MESHCANARY_PROMETHEUS` to
//! override) scraping, every second, small exporters on 127.0.0.1 that serve
//! `istio_requests_total` and `istio_request_duration_milliseconds` as Istio's sidecars
//! expose them on `/stats/prometheus`: Envoy's text format, Istio's label set, Envoy's
//! default buckets (which Istio keeps unless `sidecar.istio.io/statsHistogramBuckets` is
//! set), counters that grow between scrapes, and series that must not be counted (another
//! service, the `destination` reporter, a version that an unescaped regex would match,
//! response code 0).
//!
//! No Istio runs here: the exporters stand in for sidecars. What this proves is the
//! query and the arithmetic against Prometheus's real parser, storage and PromQL engine.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use meshcanary_controller::source::istio::IstioPrometheus;
use meshcanary_controller::source::{MetricSource, Query, Snapshot, SourceError, VariantCounts};
use meshcanary_e2e::prometheus::{prometheus_available, PrometheusServer};

mod common;
use common::{assert_read, bounded, dead_url, settle};

/// The service under rollout.
const SERVICE: &str = "checkout.shop.svc.cluster.local";
/// Another service the same callers use: its series must not be counted.
const OTHER_SERVICE: &str = "payments.shop.svc.cluster.local";
/// A variant read under its own name as `destination_version` (the default mapping).
const STABLE: &str = "v1";
/// A variant mapped to another version label, one with a regex metacharacter.
const CANARY: &str = "canary";
const CANARY_VERSION: &str = "v2.1";
/// Matched by `v2.1` if the `.` were left unescaped: must not be counted.
const DECOY_VERSION: &str = "v2x1";
/// A variant with no series at all: present, with zeros.
const DARK: &str = "dark";
const THRESHOLD_MS: u64 = 500;
/// Envoy's default histogram buckets, which Istio's duration histogram uses unless a pod
/// sets `sidecar.istio.io/statsHistogramBuckets`: Envoy's
/// `HistogramSettingsImpl::defaultBuckets()` (source/common/stats/histogram_impl.cc), and
/// the default list stated by that annotation's reference in istio/api.
const ISTIO_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn query(variants: &[&str], threshold_ms: u64) -> Query {
    Query {
        policy: "not-used-by-this-source".into(),
        variants: variants.iter().map(|v| v.to_string()).collect(),
        latency_threshold_ms: threshold_ms,
    }
}

fn source(url: &str) -> IstioPrometheus {
    IstioPrometheus::new(url, SERVICE, reqwest::Client::new())
        .with_version_label(CANARY, CANARY_VERSION)
}

// ---------------------------------------------------------------------------------------
// The PromQL text.

#[test]
fn promql_is_one_instant_query_with_exact_matchers() {
    let q = query(&[STABLE, CANARY, DARK], THRESHOLD_MS);
    let promql = source("http://p").promql(&q).expect("promql");
    let selector = r#"{destination_service="checkout.shop.svc.cluster.local",reporter="source",destination_version=~"v1|v2\\.1|dark",response_code=~"[1-5][0-9][0-9]"}"#;
    assert_eq!(
        promql,
        format!(
            "sum by (destination_version, response_code) (istio_requests_total{selector}) or \
             sum by (destination_version, le) (istio_request_duration_milliseconds_bucket{selector})"
        )
    );
    // The threshold is applied to the answer, not written into the query (see the
    // module's documentation: `le` is spelt differently by Prometheus 2 and 3).
    assert_eq!(
        source("http://p")
            .promql(&query(&[STABLE, CANARY, DARK], 1000))
            .expect("promql"),
        promql
    );
}

#[test]
fn promql_escapes_values_and_appends_matchers() {
    let hostile = IstioPrometheus::new("http://p", r#"a"b\c"#, reqwest::Client::new())
        .with_reporter("destination")
        .with_version_label(CANARY, "v(1)|*")
        .with_matchers(r#" ,job="kubernetes-pods",namespace=~"shop|shop-canary", "#);
    let promql = hostile.promql(&query(&[CANARY], 500)).expect("promql");
    let selector = r#"{destination_service="a\"b\\c",reporter="destination",destination_version=~"v\\(1\\)\\|\\*",response_code=~"[1-5][0-9][0-9]",job="kubernetes-pods",namespace=~"shop|shop-canary"}"#;
    assert_eq!(
        promql,
        format!(
            "sum by (destination_version, response_code) (istio_requests_total{selector}) or \
             sum by (destination_version, le) (istio_request_duration_milliseconds_bucket{selector})"
        )
    );
}

#[test]
fn describe_names_the_server_service_reporter_and_matchers() {
    assert_eq!(
        source("http://prom:9090").describe(),
        "Prometheus at http://prom:9090 (Istio metrics of checkout.shop.svc.cluster.local, \
         reporter=source)"
    );
    assert_eq!(
        source("http://prom:9090")
            .with_matchers(r#"job="envoy-stats""#)
            .describe(),
        "Prometheus at http://prom:9090 (Istio metrics of checkout.shop.svc.cluster.local, \
         reporter=source, job=\"envoy-stats\")"
    );
}

#[test]
fn variants_sharing_a_version_label_are_refused() {
    let shared = source("http://p").with_version_label(STABLE, CANARY_VERSION);
    match shared.promql(&query(&[STABLE, CANARY], 500)) {
        Err(SourceError::Ambiguous { reason, .. }) => {
            assert!(
                reason.contains("\"v1\"") && reason.contains("\"canary\""),
                "{reason}"
            )
        }
        other => panic!("expected Ambiguous, got {other:?}"),
    }
    assert_eq!(source("http://p").version_of(STABLE), STABLE);
    assert_eq!(source("http://p").version_of(CANARY), CANARY_VERSION);
}

// ---------------------------------------------------------------------------------------
// Sidecars stand-ins.

/// One request as a sidecar's Istio stats record it.
#[derive(Debug, Clone, Copy)]
struct Req {
    reporter: &'static str,
    service: &'static str,
    version: &'static str,
    code: u16,
    latency_ms: f64,
}

/// `count` requests alike.
fn reqs(
    count: usize,
    reporter: &'static str,
    service: &'static str,
    version: &'static str,
    code: u16,
    latency_ms: f64,
) -> Vec<Req> {
    vec![
        Req {
            reporter,
            service,
            version,
            code,
            latency_ms,
        };
        count
    ]
}

/// A sidecar's `/stats/prometheus` on 127.0.0.1: Istio's metrics for every request
/// recorded so far (cumulative, as Envoy keeps them).
struct Sidecar {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Req>>>,
}

impl Sidecar {
    /// `workload` is the pod's workload: `source_workload` of what it reports as
    /// `source`, `destination_workload` of what it reports as `destination`.
    async fn start(workload: &'static str) -> Sidecar {
        let requests: Arc<Mutex<Vec<Req>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("address");
        let shared = requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(answer(workload, &shared, &request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Sidecar { addr, requests }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn record(&self, more: impl IntoIterator<Item = Req>) {
        self.requests.lock().expect("lock").extend(more);
    }

    fn recorded(&self) -> Vec<Req> {
        self.requests.lock().expect("lock").clone()
    }
}

fn answer(
    workload: &str,
    requests: &Mutex<Vec<Req>>,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if request.uri().path() != "/stats/prometheus" {
        let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *response.status_mut() = hyper::StatusCode::NOT_FOUND;
        return response;
    }
    let text = exposition(workload, &requests.lock().expect("lock"));
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Istio's labels for one series, in the order the stats filter defines them
/// (istio/proxy `source/extensions/filters/http/istio_stats/istio_stats.cc`).
fn labels(workload: &str, key: &(&'static str, &'static str, &'static str, u16)) -> String {
    let (reporter, service, version, code) = *key;
    let short = service.split('.').next().unwrap_or(service);
    let destination_workload = format!("{short}-{version}");
    let (source_workload, destination_workload) = if reporter == "source" {
        (workload.to_string(), destination_workload)
    } else {
        // The callee's sidecar reports the caller from metadata exchange.
        ("frontend".to_string(), workload.to_string())
    };
    let flags = if code == 0 { "DC" } else { "-" };
    [
        ("reporter", reporter.to_string()),
        ("source_workload", source_workload.clone()),
        ("source_canonical_service", source_workload.clone()),
        ("source_canonical_revision", "latest".to_string()),
        ("source_workload_namespace", "shop".to_string()),
        (
            "source_principal",
            format!("spiffe://cluster.local/ns/shop/sa/{source_workload}"),
        ),
        ("source_app", source_workload.clone()),
        ("source_version", "unknown".to_string()),
        ("source_cluster", "Kubernetes".to_string()),
        ("destination_workload", destination_workload.clone()),
        ("destination_workload_namespace", "shop".to_string()),
        (
            "destination_principal",
            format!("spiffe://cluster.local/ns/shop/sa/{short}"),
        ),
        ("destination_app", short.to_string()),
        ("destination_version", version.to_string()),
        ("destination_service", service.to_string()),
        ("destination_service_name", short.to_string()),
        ("destination_service_namespace", "shop".to_string()),
        ("destination_canonical_service", short.to_string()),
        ("destination_canonical_revision", version.to_string()),
        ("destination_cluster", "Kubernetes".to_string()),
        ("request_protocol", "http".to_string()),
        ("response_code", code.to_string()),
        ("grpc_response_status", String::new()),
        ("response_flags", flags.to_string()),
        ("connection_security_policy", "unknown".to_string()),
    ]
    .iter()
    .map(|(name, value)| format!("{name}=\"{value}\""))
    .collect::<Vec<_>>()
    .join(",")
}

/// Envoy's Prometheus text for the requests: one counter and one histogram per label set,
/// `le` printed as Envoy prints it (`0.5`, `1`, …, `3600000`, `+Inf`).
fn exposition(workload: &str, requests: &[Req]) -> String {
    type Key = (&'static str, &'static str, &'static str, u16);
    let mut series: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
    for r in requests {
        series
            .entry((r.reporter, r.service, r.version, r.code))
            .or_default()
            .push(r.latency_ms);
    }
    let mut text = String::from("# TYPE istio_requests_total counter\n");
    for (key, latencies) in &series {
        let _ = writeln!(
            text,
            "istio_requests_total{{{}}} {}",
            labels(workload, key),
            latencies.len()
        );
    }
    text.push_str("# TYPE istio_request_duration_milliseconds histogram\n");
    for (key, latencies) in &series {
        let labels = labels(workload, key);
        for bound in ISTIO_BUCKETS_MS {
            let below = latencies.iter().filter(|l| **l <= bound).count();
            let _ = writeln!(
                text,
                "istio_request_duration_milliseconds_bucket{{{labels},le=\"{bound}\"}} {below}"
            );
        }
        let _ = writeln!(
            text,
            "istio_request_duration_milliseconds_bucket{{{labels},le=\"+Inf\"}} {}",
            latencies.len()
        );
        let sum: f64 = latencies.iter().sum();
        let _ = writeln!(
            text,
            "istio_request_duration_milliseconds_sum{{{labels}}} {sum}"
        );
        let _ = writeln!(
            text,
            "istio_request_duration_milliseconds_count{{{labels}}} {}",
            latencies.len()
        );
    }
    text
}

/// What the source must report for `requests` (several sidecars' lists), computed directly
/// from the requests: the independent check of the PromQL and the arithmetic.
fn expected(
    requests: &[Vec<Req>],
    reporter: &str,
    variants: &[(&str, &str)],
    threshold_ms: u64,
) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (variant, version) in variants {
        let mut counts = VariantCounts::default();
        for r in requests.iter().flatten() {
            let counted = r.reporter == reporter
                && r.service == SERVICE
                && r.version == *version
                && (100..=599).contains(&r.code);
            if counted {
                counts.responses += 1;
                counts.latency_samples += 1;
                counts.errors += u64::from(r.code >= 500);
                counts.slow += u64::from(r.latency_ms > threshold_ms as f64);
            }
        }
        snapshot.variants.insert(variant.to_string(), counts);
    }
    snapshot
}

const VARIANTS: [(&str, &str); 3] = [(STABLE, STABLE), (CANARY, CANARY_VERSION), (DARK, DARK)];

fn literal(stable: [u64; 4], canary: [u64; 4]) -> Snapshot {
    let counts = |[responses, errors, latency_samples, slow]: [u64; 4]| VariantCounts {
        responses,
        errors,
        latency_samples,
        slow,
    };
    Snapshot {
        variants: BTreeMap::from([
            (STABLE.to_string(), counts(stable)),
            (CANARY.to_string(), counts(canary)),
            (DARK.to_string(), VariantCounts::default()),
        ]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_sums_istio_metrics_over_pods_exactly() {
    if !prometheus_available("real_prometheus_sums_istio_metrics_over_pods_exactly") {
        return;
    }
    bounded(async {
        // Two callers' sidecars (reporter="source"), and the canary pod's own sidecar
        // (reporter="destination", which reports the same requests a second time).
        let (frontend, bff, checkout) = tokio::join!(
            Sidecar::start("frontend"),
            Sidecar::start("mobile-bff"),
            Sidecar::start("checkout-v2.1"),
        );
        frontend.record(
            [
                reqs(5, "source", SERVICE, STABLE, 200, 3.0),
                reqs(1, "source", SERVICE, STABLE, 200, 700.0),
                reqs(1, "source", SERVICE, STABLE, 503, 12.0),
                reqs(2, "source", SERVICE, STABLE, 404, 4.0),
                reqs(3, "source", SERVICE, CANARY_VERSION, 200, 40.0),
                reqs(2, "source", SERVICE, CANARY_VERSION, 500, 800.0),
                reqs(1, "source", SERVICE, CANARY_VERSION, 200, 2000.0),
                // No response (downstream disconnect): code 0, not a response.
                reqs(1, "source", SERVICE, CANARY_VERSION, 0, 1.0),
                reqs(4, "source", SERVICE, DECOY_VERSION, 200, 900.0),
                reqs(6, "source", OTHER_SERVICE, STABLE, 503, 900.0),
            ]
            .concat(),
        );
        bff.record(
            [
                reqs(2, "source", SERVICE, STABLE, 200, 120.0),
                reqs(1, "source", SERVICE, STABLE, 502, 600.0),
                reqs(4, "source", SERVICE, CANARY_VERSION, 200, 30.0),
                reqs(1, "source", SERVICE, CANARY_VERSION, 504, 1200.0),
            ]
            .concat(),
        );
        checkout.record(
            [
                reqs(50, "destination", SERVICE, CANARY_VERSION, 200, 1.0),
                reqs(9, "destination", SERVICE, CANARY_VERSION, 500, 700.0),
            ]
            .concat(),
        );
        let prometheus =
            PrometheusServer::start(&[frontend.url(), bff.url(), checkout.url()]).await;
        let source = source(&prometheus.url);
        let q = query(&[STABLE, CANARY, DARK], THRESHOLD_MS);
        println!("PromQL: {}", source.promql(&q).expect("promql"));
        let all = || vec![frontend.recorded(), bff.recorded(), checkout.recorded()];

        // Phase 1, by hand: stable 9 + 3 responses, 503 and 502 are errors, 700 and 600 ms
        // are slow; canary 6 + 5 (code 0 left out), 500, 500 and 504 are errors, 800, 800,
        // 2000 and 1200 ms are slow. The decoy version, the other service and the
        // destination reporter add nothing.
        let phase1 = literal([12, 2, 12, 2], [11, 3, 11, 4]);
        assert_eq!(phase1, expected(&all(), "source", &VARIANTS, THRESHOLD_MS));
        let read = settle(&source, &q, &phase1, Duration::from_secs(10)).await;
        if let Err(e) = &read {
            panic!("{e}\nprometheus log:\n{}", prometheus.log());
        }
        assert_read(read, &phase1, "phase 1, both callers summed");

        // Counters grow between scrapes: the source reports the new cumulative totals.
        frontend.record(
            [
                reqs(4, "source", SERVICE, CANARY_VERSION, 500, 700.0),
                reqs(6, "source", SERVICE, CANARY_VERSION, 200, 20.0),
                reqs(10, "source", SERVICE, STABLE, 200, 2.0),
            ]
            .concat(),
        );
        bff.record(
            [
                reqs(3, "source", SERVICE, STABLE, 200, 2.0),
                reqs(2, "source", SERVICE, STABLE, 503, 3000.0),
            ]
            .concat(),
        );
        checkout.record(reqs(100, "destination", SERVICE, CANARY_VERSION, 200, 1.0));
        let phase2 = literal([27, 4, 27, 4], [21, 7, 21, 8]);
        assert_eq!(phase2, expected(&all(), "source", &VARIANTS, THRESHOLD_MS));
        let read = settle(&source, &q, &phase2, Duration::from_secs(10)).await;
        assert_read(read, &phase2, "phase 2, cumulative after growth");

        // The next boundary: only 2000, 1200 and 3000 ms are slower than 1000 ms.
        let at_1000 = expected(&all(), "source", &VARIANTS, 1000);
        assert_eq!(at_1000, literal([27, 4, 27, 2], [21, 7, 21, 2]));
        assert_read(
            source.read(&query(&[STABLE, CANARY, DARK], 1000)).await,
            &at_1000,
            "1000 ms",
        );

        // Off the boundaries: refused, naming every boundary Prometheus has.
        match source.read(&query(&[STABLE, CANARY, DARK], 600)).await {
            Err(e @ SourceError::ThresholdNotABucketBoundary { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("600 ms")
                        && text.contains(
                            "0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, \
                             30000, 60000, 300000, 600000, 1800000, 3600000"
                        ),
                    "{text}"
                );
                if let SourceError::ThresholdNotABucketBoundary { boundaries, .. } = e {
                    assert_eq!(boundaries, ISTIO_BUCKETS_MS.to_vec());
                }
            }
            other => panic!("threshold 600 ms: expected a boundary error, got {other:?}"),
        }

        // One pod only, by its scrape target.
        let only_frontend = source
            .clone()
            .with_matchers(format!("instance=\"{}\"", frontend.addr));
        assert_read(
            only_frontend.read(&q).await,
            &expected(&[frontend.recorded()], "source", &VARIANTS, THRESHOLD_MS),
            "frontend's sidecar only",
        );
        // The other reporter: the canary pod's own view, 159 requests.
        let destination = source.clone().with_reporter("destination");
        let seen_by_callee = expected(&all(), "destination", &VARIANTS, THRESHOLD_MS);
        assert_eq!(
            seen_by_callee.variants.get(CANARY).map(|c| c.responses),
            Some(159)
        );
        // Settled on its own: Prometheus scrapes the canary pod independently of the
        // callers, so phase 2 being visible for them says nothing about its +100.
        assert_read(
            settle(&destination, &q, &seen_by_callee, Duration::from_secs(10)).await,
            &seen_by_callee,
            "reporter=destination",
        );
        // Another job has nothing: zeros, not an error.
        let elsewhere = source.clone().with_matchers("job=\"elsewhere\"");
        assert_read(
            elsewhere.read(&q).await,
            &literal([0; 4], [0; 4]),
            "job=\"elsewhere\"",
        );
        // Values that need escaping reach Prometheus as a valid query.
        let hostile =
            IstioPrometheus::new(prometheus.url.clone(), r#"a"b\c"#, reqwest::Client::new())
                .with_version_label(CANARY, "v(1)|*");
        let zeros = Snapshot {
            variants: BTreeMap::from([(CANARY.to_string(), VariantCounts::default())]),
        };
        assert_read(
            hostile.read(&query(&[CANARY], 500)).await,
            &zeros,
            "escaped values",
        );

        // A broken matcher is Prometheus's refusal, named.
        match source.clone().with_matchers("job=").read(&q).await {
            Err(SourceError::Unreachable { reason, .. }) => {
                assert!(
                    reason.contains("HTTP 400") && reason.contains("bad_data"),
                    "{reason}"
                )
            }
            other => panic!("expected Prometheus to refuse a broken matcher, got {other:?}"),
        }
        // Prometheus down: an error, not zeros.
        let dead = IstioPrometheus::new(dead_url().await, SERVICE, reqwest::Client::new());
        assert!(matches!(
            dead.read(&q).await,
            Err(SourceError::Unreachable { .. })
        ));
        println!("{}: {:?}", source.describe(), phase2);
    })
    .await;
}
