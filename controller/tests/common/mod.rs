//! Helpers shared by the metric-source tests (`sources.rs`, `istio_source.rs`).

use std::future::Future;
use std::time::{Duration, Instant};

use meshcanary_controller::source::{MetricSource, Query, Snapshot, SourceError};

/// Every test ends within this, processes (Envoy, Prometheus) included.
const TEST_LIMIT: Duration = Duration::from_secs(30);

/// Runs a test body with a hard time limit.
pub async fn bounded(body: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .expect("the test finished within its time limit");
}

/// Reads until the source reports `expected` (histograms lag counters by up to one stats
/// flush, Prometheus by a scrape more) or `timeout` passes; returns the last read.
pub async fn settle(
    source: &impl MetricSource,
    query: &Query,
    expected: &Snapshot,
    timeout: Duration,
) -> Result<Snapshot, SourceError> {
    let deadline = Instant::now() + timeout;
    loop {
        let read = source.read(query).await;
        if matches!(&read, Ok(s) if s == expected) || Instant::now() > deadline {
            return read;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that a read succeeded with exactly `expected`.
pub fn assert_read(read: Result<Snapshot, SourceError>, expected: &Snapshot, what: &str) {
    match read {
        Ok(snapshot) => assert_eq!(&snapshot, expected, "{what}"),
        Err(e) => panic!("{what}: {e}"),
    }
}

/// A loopback URL on which nothing listens.
pub async fn dead_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind an ephemeral port");
    let addr = listener.local_addr().expect("local address");
    drop(listener);
    format!("http://{addr}")
}
