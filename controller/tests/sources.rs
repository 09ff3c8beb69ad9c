//! Metric sources against real processes: Envoy 1.40 running the real filter module, and a
//! real Prometheus scraping it. Known numbers of requests go through Envoy (some 4xx, some
//! 5xx, some slower than the threshold) and each source must report exactly those counts.
//!
//! Envoy comes from `MESHCANARY_ENVOY` (default: the project venv), the module from
//! `MESHCANARY_WASM` (default: `make wasm`'s output) and Prometheus from
//! `MESHCANARY_PROMETHEUS` (default: Debian's `/usr/bin/prometheus`).

use std::collections::BTreeMap;
use std::time::Duration;

use meshcanary_controller::source::envoy_admin::EnvoyAdmin;
use meshcanary_controller::source::prometheus::Prometheus;
use meshcanary_controller::source::{MetricSource, Query, Snapshot, SourceError, VariantCounts};
use meshcanary_e2e::prometheus::{prometheus_available, PrometheusServer};
use meshcanary_e2e::{
    assert_no_wasm_failure, Behaviour, Envoy, EnvoyConfig, FilterSource, Upstream,
};
use serde_json::json;

mod common;
use common::{assert_read, bounded, dead_url, settle};

/// Names with `-` and `_`, which Envoy's Prometheus output folds into `_`.
const POLICY: &str = "shop-front_v2";
const STABLE: &str = "stable";
const CANARY: &str = "canary-x_1";
/// In the policy, never chosen: its counters exist and stay at zero.
const DARK: &str = "dark";
/// Not in the policy at all: Envoy has no such stats.
const GHOST: &str = "ghost";
const THRESHOLD_MS: u64 = 500;
/// Well above the threshold and well below the next boundary (1000 ms).
const SLOW_DELAY: Duration = Duration::from_millis(600);

/// One Envoy with the filter in front of a `stable` and a `canary` upstream.
struct Rig {
    envoy: Envoy,
    stable: Upstream,
    canary: Upstream,
}

impl Rig {
    async fn start() -> Rig {
        let stable = Upstream::start("stable").await;
        let canary = Upstream::start("canary").await;
        let policy = json!({
            "name": POLICY,
            "variants": [STABLE, CANARY, DARK],
            "rules": [{"name": "pick-canary",
                       "when": [{"header": "x-pick", "equals": "canary"}],
                       "variant": CANARY}]
        });
        let mut config = EnvoyConfig::stable_canary(
            FilterSource::Inline(policy.to_string()),
            stable.addr,
            canary.addr,
        );
        config.routes = vec![
            (CANARY.into(), "canary".into()),
            (STABLE.into(), "stable".into()),
        ];
        // Histograms reach the admin output only at a stats flush (5 s by default).
        config.stats_flush_interval = Some(Duration::from_secs(1));
        let envoy = Envoy::start(&config).await.expect("envoy starts");
        Rig {
            envoy,
            stable,
            canary,
        }
    }

    /// Sends `mix` to `variant` (`STABLE` by falling through every rule, `CANARY` by header).
    async fn drive(&self, variant: &str, mix: &Mix) {
        let (upstream, pick) = if variant == CANARY {
            (&self.canary, Some("canary"))
        } else {
            (&self.stable, None)
        };
        let phases = [
            (mix.ok, 200, Duration::ZERO),
            (mix.client_errors, 404, Duration::ZERO),
            (mix.server_errors, 503, Duration::ZERO),
            (mix.slow, 200, SLOW_DELAY),
        ];
        for (count, status, delay) in phases {
            // The upstream's behaviour is global, so phases run one after another and the
            // requests of one phase run at once.
            upstream.set_behaviour(Behaviour {
                status,
                delay,
                ..Behaviour::default()
            });
            let mut requests = tokio::task::JoinSet::new();
            for _ in 0..count {
                let mut request = self.envoy.client().get(self.envoy.url("/"));
                if let Some(pick) = pick {
                    request = request.header("x-pick", pick);
                }
                requests.spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
            }
            while let Some(answer) = requests.join_next().await {
                let answer = answer.expect("request task").expect("answer through envoy");
                assert_eq!(answer, status, "status of a request to {variant}");
            }
        }
    }

    fn admin(&self) -> String {
        self.envoy.admin.clone()
    }

    /// A filter that trapped would make every number read meaningless.
    fn assert_filter_healthy(&self) {
        assert_no_wasm_failure(&self.envoy.log());
    }
}

/// Requests of each kind sent to one variant.
#[derive(Debug, Clone, Copy, Default)]
struct Mix {
    ok: u64,
    client_errors: u64,
    server_errors: u64,
    slow: u64,
}

impl Mix {
    /// What a source must report for this traffic with the 500 ms threshold.
    fn expected(&self) -> VariantCounts {
        let responses = self.ok + self.client_errors + self.server_errors + self.slow;
        VariantCounts {
            responses,
            errors: self.server_errors,
            latency_samples: responses,
            slow: self.slow,
        }
    }
}

fn plus(a: VariantCounts, b: VariantCounts) -> VariantCounts {
    VariantCounts {
        responses: a.responses + b.responses,
        errors: a.errors + b.errors,
        latency_samples: a.latency_samples + b.latency_samples,
        slow: a.slow + b.slow,
    }
}

fn query(threshold_ms: u64) -> Query {
    Query {
        policy: POLICY.into(),
        variants: vec![STABLE.into(), CANARY.into(), DARK.into(), GHOST.into()],
        latency_threshold_ms: threshold_ms,
    }
}

fn snapshot(stable: VariantCounts, canary: VariantCounts) -> Snapshot {
    Snapshot {
        variants: BTreeMap::from([
            (STABLE.to_string(), stable),
            (CANARY.to_string(), canary),
            (DARK.to_string(), VariantCounts::default()),
            (GHOST.to_string(), VariantCounts::default()),
        ]),
    }
}

const CANARY_MIX: Mix = Mix {
    ok: 6,
    client_errors: 1,
    server_errors: 3,
    slow: 2,
};
const STABLE_MIX: Mix = Mix {
    ok: 8,
    client_errors: 0,
    server_errors: 1,
    slow: 1,
};
const CANARY_MIX_B: Mix = Mix {
    ok: 2,
    client_errors: 0,
    server_errors: 1,
    slow: 1,
};
const STABLE_MIX_B: Mix = Mix {
    ok: 5,
    client_errors: 2,
    server_errors: 0,
    slow: 0,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_admin_reports_exactly_the_requests_sent() {
    bounded(async {
        let rig = Rig::start().await;
        let source = EnvoyAdmin::new(vec![rig.admin()], reqwest::Client::new());

        // Before any traffic: every variant is present with zeros.
        let zeros = snapshot(VariantCounts::default(), VariantCounts::default());
        assert_read(
            source.read(&query(THRESHOLD_MS)).await,
            &zeros,
            "no traffic yet",
        );

        rig.drive(CANARY, &CANARY_MIX).await;
        rig.drive(STABLE, &STABLE_MIX).await;
        let expected = snapshot(STABLE_MIX.expected(), CANARY_MIX.expected());
        let read = settle(
            &source,
            &query(THRESHOLD_MS),
            &expected,
            Duration::from_secs(5),
        )
        .await;
        assert_read(read, &expected, "one Envoy, threshold 500 ms");

        // The same histograms with the next boundary: nothing is slower than 1000 ms.
        let mut at_1000 = expected.clone();
        for counts in at_1000.variants.values_mut() {
            counts.slow = 0;
        }
        assert_read(
            source.read(&query(1000)).await,
            &at_1000,
            "one Envoy, threshold 1000 ms",
        );

        // A threshold between boundaries cannot be counted exactly: refused, with the choices.
        match source.read(&query(600)).await {
            Err(e @ SourceError::ThresholdNotABucketBoundary { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("600 ms") && text.contains("250, 500, 1000, 2500"),
                    "{text}"
                );
                if let SourceError::ThresholdNotABucketBoundary { boundaries, .. } = e {
                    assert_eq!(boundaries.len(), 19, "Envoy's default buckets");
                    assert_eq!(boundaries.first(), Some(&0.5));
                    assert_eq!(boundaries.last(), Some(&3_600_000.0));
                }
            }
            other => panic!("threshold 600 ms: expected a boundary error, got {other:?}"),
        }
        println!("{}: {:?}", source.describe(), expected);
        rig.assert_filter_healthy();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_admin_sums_every_envoy() {
    bounded(async {
        let (a, b) = tokio::join!(Rig::start(), Rig::start());
        tokio::join!(
            a.drive(CANARY, &CANARY_MIX),
            b.drive(CANARY, &CANARY_MIX_B),
            a.drive(STABLE, &STABLE_MIX),
            b.drive(STABLE, &STABLE_MIX_B),
        );
        let client = reqwest::Client::new();
        let q = query(THRESHOLD_MS);
        let only_a = snapshot(STABLE_MIX.expected(), CANARY_MIX.expected());
        let only_b = snapshot(STABLE_MIX_B.expected(), CANARY_MIX_B.expected());
        let both = snapshot(
            plus(STABLE_MIX.expected(), STABLE_MIX_B.expected()),
            plus(CANARY_MIX.expected(), CANARY_MIX_B.expected()),
        );
        let wait = Duration::from_secs(5);
        let source_a = EnvoyAdmin::new(vec![a.admin()], client.clone());
        let source_b = EnvoyAdmin::new(vec![b.admin()], client.clone());
        // Trailing slashes are tolerated: users copy URLs from browsers.
        let source_ab = EnvoyAdmin::new(vec![a.admin(), format!("{}/", b.admin())], client);
        assert_read(
            settle(&source_a, &q, &only_a, wait).await,
            &only_a,
            "Envoy A",
        );
        assert_read(
            settle(&source_b, &q, &only_b, wait).await,
            &only_b,
            "Envoy B",
        );
        assert_read(
            settle(&source_ab, &q, &both, wait).await,
            &both,
            "A and B summed",
        );
        a.assert_filter_healthy();
        b.assert_filter_healthy();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_admin_fails_the_whole_read_when_one_envoy_cannot_be_read() {
    bounded(async {
        let rig = Rig::start().await;
        rig.drive(CANARY, &CANARY_MIX).await;
        let client = reqwest::Client::new();
        let q = query(THRESHOLD_MS);
        let dead = dead_url().await;

        // One good and one dead Envoy: an error naming the dead one, never a partial sum.
        let source = EnvoyAdmin::new(vec![rig.admin(), dead.clone()], client.clone());
        match source.read(&q).await {
            Err(SourceError::Unreachable { endpoint, reason }) => {
                assert_eq!(endpoint, dead, "{reason}");
                assert!(reason.to_lowercase().contains("connect"), "{reason}");
            }
            other => panic!("expected Unreachable for {dead}, got {other:?}"),
        }

        // Something that is not an admin endpoint (the upstream answers plain text).
        let upstream = format!("http://{}", rig.stable.addr);
        let source = EnvoyAdmin::new(vec![upstream.clone()], client.clone());
        match source.read(&q).await {
            Err(SourceError::Malformed { endpoint, reason }) => {
                assert_eq!(endpoint, upstream);
                assert!(reason.contains("not JSON"), "{reason}");
            }
            other => panic!("expected Malformed from a non-admin server, got {other:?}"),
        }

        // A path Envoy does not serve: its HTTP error is reported.
        let wrong_path = format!("{}/nothing-here", rig.admin());
        let source = EnvoyAdmin::new(vec![wrong_path], client.clone());
        match source.read(&q).await {
            Err(SourceError::Unreachable { reason, .. }) => {
                assert!(reason.contains("HTTP 404"), "{reason}")
            }
            other => panic!("expected an HTTP error, got {other:?}"),
        }

        // Configuration mistakes are errors too, not zeros.
        for urls in [vec![], vec!["not a url".to_string()]] {
            let source = EnvoyAdmin::new(urls.clone(), client.clone());
            assert!(
                matches!(source.read(&q).await, Err(SourceError::Unreachable { .. })),
                "{urls:?}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_reports_the_same_sums_as_the_envoys() {
    if !prometheus_available("prometheus_reports_the_same_sums_as_the_envoys") {
        return;
    }
    bounded(async {
        let (a, b) = tokio::join!(Rig::start(), Rig::start());
        let prometheus = PrometheusServer::start(&[a.admin(), b.admin()]).await;
        tokio::join!(
            a.drive(CANARY, &CANARY_MIX),
            b.drive(CANARY, &CANARY_MIX_B),
            a.drive(STABLE, &STABLE_MIX),
            b.drive(STABLE, &STABLE_MIX_B),
        );
        let both = snapshot(
            plus(STABLE_MIX.expected(), STABLE_MIX_B.expected()),
            plus(CANARY_MIX.expected(), CANARY_MIX_B.expected()),
        );
        let client = reqwest::Client::new();
        let q = query(THRESHOLD_MS);
        let source = Prometheus::new(prometheus.url.clone(), client.clone());
        println!("PromQL: {}", source.promql(&q).expect("promql"));
        // A flush (1 s) and a scrape (1 s) after the last request, with slack for a busy machine.
        let read = settle(&source, &q, &both, Duration::from_secs(12)).await;
        if let Err(e) = &read {
            panic!("{e}\nprometheus log:\n{}", prometheus.log());
        }
        assert_read(read, &both, "Prometheus, both Envoys summed");

        // The embedded source over the same Envoys says the same.
        let admin = EnvoyAdmin::new(vec![a.admin(), b.admin()], client.clone());
        assert_read(admin.read(&q).await, &both, "Envoy admin over A and B");

        // Extra matchers narrow the sum: the scrape job matches, another job has nothing.
        let matching = source.clone().with_matchers("job=\"meshcanary\"");
        assert_read(matching.read(&q).await, &both, "job=\"meshcanary\"");
        let other = source.clone().with_matchers("job=\"elsewhere\"");
        let zeros = snapshot(VariantCounts::default(), VariantCounts::default());
        assert_read(other.read(&q).await, &zeros, "job=\"elsewhere\"");

        // One Envoy only, by its scrape target.
        let target_a = a.admin().trim_start_matches("http://").to_string();
        let only_a = source
            .clone()
            .with_matchers(format!("instance=\"{target_a}\""));
        assert_read(
            only_a.read(&q).await,
            &snapshot(STABLE_MIX.expected(), CANARY_MIX.expected()),
            "instance A",
        );

        // Threshold off the boundaries: refused with the boundaries Prometheus has.
        match source.read(&query(600)).await {
            Err(e @ SourceError::ThresholdNotABucketBoundary { .. }) => {
                assert!(e.to_string().contains("250, 500, 1000"), "{e}")
            }
            other => panic!("threshold 600 ms: expected a boundary error, got {other:?}"),
        }

        // A broken matcher is Prometheus's refusal, named.
        let broken = source.clone().with_matchers("job=");
        match broken.read(&q).await {
            Err(SourceError::Unreachable { reason, .. }) => {
                assert!(
                    reason.contains("HTTP 400") && reason.contains("bad_data"),
                    "{reason}"
                )
            }
            other => panic!("expected Prometheus to refuse a broken matcher, got {other:?}"),
        }

        // Prometheus down: an error, not zeros.
        let dead = Prometheus::new(dead_url().await, client);
        assert!(matches!(
            dead.read(&q).await,
            Err(SourceError::Unreachable { .. })
        ));
        a.assert_filter_healthy();
        b.assert_filter_healthy();
    })
    .await;
}
