//! `meshcanary-load`: a bounded, paced load generator for loopback, for the demo and the
//! controller's tests.
//!
//! ```text
//! meshcanary-load --url http://127.0.0.1:10000/ --rps 40 --duration-s 30 \
//!     --max-requests 2000 --user-ids 500 --header 'x-env: demo'
//! ```
//!
//! It sends GETs until --duration-s has passed or --max-requests were sent, whichever
//! comes first, or until it gets SIGTERM or SIGINT (so a caller such as the demo can end
//! it early and still get the totals), waits for the answers still on their way (each
//! bounded by --timeout-ms), and prints one JSON summary line on stdout:
//!
//! ```text
//! {"sent":1200,"completed":1199,"errors":1,"first_error":"...","by_class":{"2xx":1150,"5xx":49},
//!  "by_upstream":{"canary":{"2xx":50,"5xx":49},"stable":{"2xx":1100}},
//!  "latency_ms":{"p50":1.2,"p99":9.8,"max":12.0},"elapsed_s":30.0,"stopped_by_signal":false}
//! ```
//!
//! `errors` counts requests that got no HTTP answer (refused, reset, timed out);
//! `by_upstream` is keyed by the `x-upstream` answer header, `-` when there was none
//! (Envoy's own answers). Latencies are those of answered requests, body included.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clap::Parser;
use meshcanary_e2e::UPSTREAM_HEADER;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Url;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Bounded, paced HTTP load on 127.0.0.0/8; prints one JSON summary line at the end.
#[derive(Debug, Parser)]
#[command(name = "meshcanary-load", version)]
struct Args {
    /// Target, `http://` with a host in 127.0.0.0/8 (nothing else is allowed).
    #[arg(long)]
    url: String,
    /// Target rate in requests per second; 0 sends as fast as --concurrency allows.
    #[arg(long, default_value_t = 50.0)]
    rps: f64,
    /// Stop sending after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Stop sending after this many requests.
    #[arg(long, default_value_t = 100_000)]
    max_requests: u64,
    /// Requests on their way at most at one time.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Extra request header, `name: value`; repeatable.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Send `x-user-id: user-K`, K cycling over 0..N, so sticky splits see N users.
    #[arg(long, value_name = "N")]
    user_ids: Option<u64>,
    /// Give up on one request after this long (counted in `errors`).
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let plan = match Plan::from_args(&args) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("meshcanary-load: {e}");
            return ExitCode::from(2);
        }
    };
    // Registered before the first request, so that an early SIGTERM already ends the run
    // with a summary instead of killing the process.
    let stop = match stop_signal() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("meshcanary-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(plan, stop).await {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshcanary-load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The arguments, checked.
struct Plan {
    url: Url,
    /// Requests per second; `None` when unpaced.
    rps: Option<f64>,
    duration: Duration,
    max_requests: u64,
    concurrency: usize,
    headers: HeaderMap,
    user_ids: Option<u64>,
    timeout: Duration,
}

impl Plan {
    fn from_args(args: &Args) -> Result<Plan, String> {
        let url = loopback_url(&args.url)?;
        let rps = if args.rps == 0.0 {
            None
        } else if args.rps.is_finite() && args.rps > 0.0 {
            Some(args.rps)
        } else {
            return Err(format!("--rps {}: expected a rate of 0 or more", args.rps));
        };
        let duration = Duration::try_from_secs_f64(args.duration_s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                format!(
                    "--duration-s {}: expected a number of seconds > 0 that fits a timer",
                    args.duration_s
                )
            })?;
        if args.concurrency == 0 {
            return Err("--concurrency 0: expected at least 1".into());
        }
        if args.timeout_ms == 0 {
            return Err("--timeout-ms 0: expected at least 1".into());
        }
        if args.user_ids == Some(0) {
            return Err("--user-ids 0: expected at least 1 user".into());
        }
        let mut headers = HeaderMap::new();
        for header in &args.headers {
            let (name, value) = parse_header(header)?;
            headers.append(name, value);
        }
        Ok(Plan {
            url,
            rps,
            duration,
            max_requests: args.max_requests,
            concurrency: args.concurrency,
            headers,
            user_ids: args.user_ids,
            timeout: Duration::from_millis(args.timeout_ms),
        })
    }
}

/// Accepts only `http://` URLs whose host is an IPv4 address in 127.0.0.0/8.
///
/// House rule: load goes to loopback only. Names are refused, `localhost` included,
/// because what a name resolves to is not ours to check.
fn loopback_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("--url {text}: {e}"))?;
    if url.scheme() != "http" {
        return Err(format!("--url {text}: only http:// is supported"));
    }
    // The URL parser has already normalised IPv4 spellings such as `127.1` or `0x7f.1`.
    let host = url.host_str().unwrap_or("");
    match host.parse::<Ipv4Addr>() {
        Ok(ip) if ip.is_loopback() => Ok(url),
        _ => Err(format!(
            "--url {text}: refusing host `{host}`: load may only target 127.0.0.0/8 \
             (write the address, e.g. 127.0.0.1)"
        )),
    }
}

fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let bad = || format!("--header {text:?}: expected `name: value`");
    let (name, value) = text.split_once(':').ok_or_else(bad)?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
    let value = HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
    Ok((name, value))
}

/// What came back, added to by every request task.
#[derive(Default)]
struct Tally {
    completed: u64,
    errors: u64,
    first_error: Option<String>,
    by_class: BTreeMap<String, u64>,
    by_upstream: BTreeMap<String, BTreeMap<String, u64>>,
    latencies: Vec<Duration>,
}

impl Tally {
    fn answer(&mut self, status: u16, upstream: String, latency: Duration) {
        let class = format!("{}xx", status / 100);
        self.completed += 1;
        *self.by_class.entry(class.clone()).or_default() += 1;
        *self
            .by_upstream
            .entry(upstream)
            .or_default()
            .entry(class)
            .or_default() += 1;
        self.latencies.push(latency);
    }

    fn error(&mut self, error: &reqwest::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            // reqwest's own message only says the request failed; the innermost source
            // says why (connection refused, timed out...).
            let mut message = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                message = format!("{message}: {cause}");
                source = cause.source();
            }
            self.first_error = Some(message);
        }
    }
}

/// Resolves at the first SIGTERM or SIGINT.
fn stop_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let listen =
        |kind: SignalKind| signal(kind).map_err(|e| format!("cannot listen for signals: {e}"));
    let mut terminate = listen(SignalKind::terminate())?;
    let mut interrupt = listen(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

async fn run(
    plan: Plan,
    stop: impl std::future::Future<Output = ()>,
) -> Result<serde_json::Value, String> {
    let client = reqwest::Client::builder()
        // Neither a proxy from the environment nor a redirect may take load off loopback.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(plan.timeout)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let slots = Arc::new(Semaphore::new(plan.concurrency));
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    let deadline = start
        .checked_add(plan.duration)
        .ok_or("--duration-s is too large")?;
    let mut sent = 0;
    tokio::pin!(stop);
    let mut stopped_by_signal = false;

    while sent < plan.max_requests {
        // Request k is due at start + k / rps, so the average rate holds even after a
        // stall; the catch-up burst is capped by --concurrency.
        if let Some(rps) = plan.rps {
            let offset = sent as f64 / rps;
            if offset >= plan.duration.as_secs_f64() {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(start + Duration::from_secs_f64(offset)) => {}
                () = &mut stop => {
                    stopped_by_signal = true;
                    break;
                }
            }
        }
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.map_err(|e| e.to_string())?,
            () = tokio::time::sleep_until(deadline) => break,
            () = &mut stop => {
                stopped_by_signal = true;
                break;
            }
        };
        if Instant::now() >= deadline {
            break;
        }
        let mut request = client.get(plan.url.clone()).headers(plan.headers.clone());
        if let Some(users) = plan.user_ids {
            request = request.header("x-user-id", format!("user-{}", sent % users));
        }
        let tally = Arc::clone(&tally);
        tasks.spawn(async move {
            let began = Instant::now();
            let outcome = match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let upstream = response
                        .headers()
                        .get(UPSTREAM_HEADER)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_else(|| "-".into());
                    // The body is part of the answer's latency, and reading it lets the
                    // connection be reused.
                    response.bytes().await.map(|_| (status, upstream))
                }
                Err(e) => Err(e),
            };
            let latency = began.elapsed();
            let mut tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
            match outcome {
                Ok((status, upstream)) => tally.answer(status, upstream, latency),
                Err(e) => tally.error(&e),
            }
            drop(slot);
        });
        sent += 1;
    }
    // Answers still on their way are waited for; each is bounded by --timeout-ms.
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();

    let mut tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
    tally.latencies.sort_unstable();
    let millis = |p: f64| percentile(&tally.latencies, p).map(|d| d.as_secs_f64() * 1e3);
    Ok(json!({
        "sent": sent,
        "completed": tally.completed,
        "errors": tally.errors,
        "first_error": tally.first_error,
        "by_class": tally.by_class,
        "by_upstream": tally.by_upstream,
        "latency_ms": {"p50": millis(0.50), "p99": millis(0.99), "max": millis(1.0)},
        "elapsed_s": elapsed.as_secs_f64(),
        "stopped_by_signal": stopped_by_signal,
    }))
}

/// Nearest-rank percentile of sorted values; `None` when there are none.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ipv4_loopback_http_urls_pass() {
        for ok in [
            "http://127.0.0.1:8080/",
            "http://127.1.2.3/x?y=1",
            "http://127.1/",
        ] {
            assert!(loopback_url(ok).is_ok(), "{ok}");
        }
        for refused in [
            "http://10.0.0.1/",
            "http://localhost:8080/",
            "http://[::1]/",
            "http://example.com/",
            "https://127.0.0.1/",
            "http://128.0.0.1/",
            "not a url",
        ] {
            assert!(loopback_url(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&values, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&values, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(
            percentile(&values[..1], 0.5),
            Some(Duration::from_millis(1))
        );
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn headers_parse_with_or_without_spaces() {
        let (name, value) = parse_header("X-Env:  demo ").unwrap();
        assert_eq!((name.as_str(), value.to_str().unwrap()), ("x-env", "demo"));
        assert!(parse_header("no colon").is_err());
        assert!(parse_header(": empty name").is_err());
    }
}
