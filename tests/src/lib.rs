//! Test harness for meshcanary's end-to-end tests: a real Envoy running the real filter
//! module, recording upstreams and a client, all on loopback.
//!
//! Envoy comes from the project venv (`make envoy`) and the module from `make wasm`;
//! `MESHCANARY_ENVOY` and `MESHCANARY_WASM` override them.
//!
//! The crate also builds the two programs the demo and the controller's tests run as
//! processes: `meshcanary-upstream` (this upstream, with a share of errors and slow
//! answers changeable over HTTP) and `meshcanary-load` (a bounded, paced load generator
//! for loopback only); see `src/bin/`. [`programs`] runs them for the demo,
//! `meshcanary-demo` (`make demo`), which is built on this harness too.

pub mod controller;
pub mod envoy;
pub mod faults;
pub mod paths;
pub mod programs;
pub mod prometheus;
pub mod upstream;

pub use envoy::{
    try_write_ecds, write_ecds, Cluster, Envoy, EnvoyConfig, FilterSource, FILTER_NAME,
};
pub use upstream::{
    Behaviour, Options, Recorded, Stats, Upstream, CONTROL_PATH, STATS_PATH, UPSTREAM_HEADER,
};

/// The answer to one request, reduced to what tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The `x-upstream` header: which upstream answered (empty for Envoy's own replies).
    pub upstream: String,
    /// Response body.
    pub body: Vec<u8>,
}

/// Sends a GET with these headers through Envoy.
pub async fn get(envoy: &Envoy, path: &str, headers: &[(&str, &[u8])]) -> Answer {
    let mut request = envoy.client().get(envoy.url(path));
    for (name, value) in headers {
        request = request.header(
            *name,
            reqwest::header::HeaderValue::from_bytes(value)
                .expect("header value the client can send"),
        );
    }
    let response = request.send().await.expect("request through envoy");
    let status = response.status().as_u16();
    let upstream = response
        .headers()
        .get(UPSTREAM_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let body = response.bytes().await.expect("response body").to_vec();
    Answer {
        status,
        upstream,
        body,
    }
}

/// Sends one GET per key, `concurrency` at a time, with the key in `header`; returns the
/// upstream that answered each key, in key order.
pub async fn route_keys(
    envoy: &Envoy,
    header: &str,
    keys: &[String],
    concurrency: usize,
) -> Vec<String> {
    let chunks: Vec<Vec<(usize, String)>> = (0..concurrency)
        .map(|lane| {
            keys.iter()
                .enumerate()
                .filter(|(i, _)| i % concurrency == lane)
                .map(|(i, k)| (i, k.clone()))
                .collect()
        })
        .collect();
    let mut lanes = Vec::new();
    for chunk in chunks {
        let client = envoy.client().clone();
        let url = envoy.url("/");
        let header = header.to_string();
        lanes.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(chunk.len());
            for (i, key) in chunk {
                let response = client
                    .get(&url)
                    .header(header.as_str(), key.as_str())
                    .send()
                    .await
                    .expect("request through envoy");
                assert_eq!(response.status().as_u16(), 200, "key {key}");
                let upstream = response
                    .headers()
                    .get(UPSTREAM_HEADER)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_default();
                out.push((i, upstream));
            }
            out
        }));
    }
    let mut answers = vec![String::new(); keys.len()];
    for lane in lanes {
        for (i, upstream) in lane.await.expect("lane finished") {
            answers[i] = upstream;
        }
    }
    answers
}

/// Panics if Envoy's log shows the filter's VM trapped or failed a callback.
pub fn assert_no_wasm_failure(log: &str) {
    if let Some(line) = wasm_failure(log) {
        panic!("the filter failed inside Envoy: {line}");
    }
}

/// The first line of Envoy's log that shows a wasm VM trapped or failed a callback.
pub fn wasm_failure(log: &str) -> Option<&str> {
    log.lines().find(|line| {
        let lower = line.to_ascii_lowercase();
        lower.contains("panicked")
            || lower.contains("runtimeerror")
            || lower.contains("wasm trap")
            || (lower.contains("proxy_on_") && lower.contains("failed"))
    })
}

/// Locks a mutex even if a panicking holder poisoned it: what the harness keeps behind its
/// mutexes (lines read, counters, settings) is whole either way, and the programs built on
/// it must not panic.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
