//! A recording HTTP/1.1 upstream on loopback: it answers with its own name and keeps
//! every request it saw (method, path, headers, body), so tests can compare what Envoy
//! forwarded with what the client sent. Its behaviour (status, delay, reset, a share of
//! errors or slow answers) can be changed while it runs: in process with
//! [`Upstream::set_behaviour`], or over HTTP through the control endpoint (see
//! [`CONTROL_PATH`]) when it runs as the `meshcanary-upstream` program.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::lock;

/// Response header carrying the upstream's name.
pub const UPSTREAM_HEADER: &str = "x-upstream";

/// `PUT /_control?key=value&...` changes the behaviour (answered 204; 400 names a bad
/// key or value). Keys: `status`, `error_rate`, `latency_ms`, `slow_rate`, `slow_ms`,
/// `reset` (`true`/`false`); keys left out keep their value. Served only when
/// [`Options::control`] is set, and never counted as traffic.
pub const CONTROL_PATH: &str = "/_control";

/// `GET /_stats` answers [`Stats::to_json`] plus the current behaviour; `DELETE /_stats`
/// zeroes the counts (204). Served and not counted like [`CONTROL_PATH`].
pub const STATS_PATH: &str = "/_stats";

/// How the upstream answers.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Status of every response.
    pub status: u16,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Close the connection instead of answering.
    pub reset: bool,
    /// Response body; `None` answers with the upstream's name and a newline.
    pub body: Option<Vec<u8>>,
    /// Share of requests (0.0–1.0) answered 500 instead of `status`. Deterministic:
    /// failures are spread evenly over arrival order (see [`spread`]).
    pub error_rate: f64,
    /// Share of requests (0.0–1.0) that wait `slow_delay` instead of `delay`, spread
    /// like `error_rate` over the same arrival count (so at equal rates the same requests
    /// are slow and fail).
    pub slow_rate: f64,
    /// How long a slow request waits in all.
    pub slow_delay: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            status: 200,
            delay: Duration::ZERO,
            reset: false,
            body: None,
            error_rate: 0.0,
            slow_rate: 0.0,
            slow_delay: Duration::ZERO,
        }
    }
}

impl Behaviour {
    /// Applies a control query (`error_rate=0.5&latency_ms=10`, see [`CONTROL_PATH`]).
    /// All or nothing: on the first bad pair nothing changes and the error names it.
    pub fn apply_query(&mut self, query: &str) -> Result<(), String> {
        let mut next = self.clone();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}`: expected key=value"))?;
            let bad = |e: String| format!("`{key}`: {e}");
            match key {
                "status" => next.status = parse_status(value).map_err(bad)?,
                "error_rate" => next.error_rate = parse_rate(value).map_err(bad)?,
                "slow_rate" => next.slow_rate = parse_rate(value).map_err(bad)?,
                "latency_ms" => next.delay = parse_millis(value).map_err(bad)?,
                "slow_ms" => next.slow_delay = parse_millis(value).map_err(bad)?,
                "reset" => {
                    next.reset = value
                        .parse()
                        .map_err(|_| bad(format!("`{value}` is not true or false")))?
                }
                _ => {
                    return Err(format!(
                        "unknown key `{key}` (known: status, error_rate, latency_ms, \
                         slow_rate, slow_ms, reset)"
                    ))
                }
            }
        }
        *self = next;
        Ok(())
    }

    /// The behaviour as the control endpoint reports it.
    pub fn to_json(&self) -> Value {
        json!({
            "status": self.status,
            "error_rate": self.error_rate,
            "latency_ms": self.delay.as_millis() as u64,
            "slow_rate": self.slow_rate,
            "slow_ms": self.slow_delay.as_millis() as u64,
            "reset": self.reset,
        })
    }
}

/// Parses a share of requests: a number from 0.0 to 1.0.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!("`{text}` is not a rate between 0.0 and 1.0")),
    }
}

/// Parses an HTTP status code that a response can carry (100–999).
pub fn parse_status(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|code| StatusCode::from_u16(*code).is_ok())
        .ok_or_else(|| format!("`{text}` is not an HTTP status code"))
}

fn parse_millis(text: &str) -> Result<Duration, String> {
    text.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| format!("`{text}` is not a whole number of milliseconds"))
}

/// Whether the request that arrived `n`-th (from 0) is one of the `rate` share picked.
///
/// Request `n` is picked when `floor((n + 1) * rate)` steps past `floor(n * rate)`, so
/// any run of consecutive requests at one rate holds the expected number of picks give
/// or take one (exactly 500 of the first 1000 at 0.5), and a rate changed at run time
/// holds from the next request on. No randomness: the same arrival order gives the same
/// answers.
pub fn spread(n: u64, rate: f64) -> bool {
    if rate >= 1.0 {
        return true;
    }
    if rate.is_nan() || rate <= 0.0 {
        return false;
    }
    ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor()
}

/// Where and how an upstream runs, beyond its behaviour.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address to listen on; port 0 lets the kernel choose.
    pub listen: SocketAddr,
    /// Serve [`CONTROL_PATH`] and [`STATS_PATH`] (the program does; in-process tests
    /// call [`Upstream::set_behaviour`] and [`Upstream::stats`] instead).
    pub control: bool,
    /// Keep every request for [`Upstream::requests`] and [`Upstream::count`]. A
    /// long-running program turns this off so its memory stays flat; [`Stats`] counts
    /// either way.
    pub record: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            control: false,
            record: true,
        }
    }
}

/// What an upstream answered, counted since it started or since [`Upstream::reset_stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests received.
    pub requests: u64,
    /// Answers sent, by status.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests made to wait `slow_delay`.
    pub slow: u64,
    /// Connections closed instead of answering.
    pub resets: u64,
}

impl Stats {
    /// `{"requests": 10, "by_status": {"200": 9, "500": 1}, "slow": 0, "resets": 0}`.
    pub fn to_json(&self) -> Value {
        let by_status: BTreeMap<String, u64> = self
            .by_status
            .iter()
            .map(|(status, n)| (status.to_string(), *n))
            .collect();
        json!({
            "requests": self.requests,
            "by_status": by_status,
            "slow": self.slow,
            "resets": self.resets,
        })
    }
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method.
    pub method: String,
    /// Path and query, as sent on the request line.
    pub path: String,
    /// Headers in arrival order, names lower-cased.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The whole body.
    pub body: Vec<u8>,
    /// When the request headers arrived.
    pub at: Instant,
}

impl Recorded {
    /// First value of a header, as text (lossy).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

struct State {
    name: String,
    options: Options,
    behaviour: Mutex<Behaviour>,
    records: Mutex<Vec<Recorded>>,
    in_flight: Mutex<(usize, usize)>,
    stats: Mutex<Stats>,
    /// Requests seen since start; never reset, so [`spread`] stays even across a stats reset.
    arrivals: AtomicU64,
}

/// A running upstream; it stops when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<State>,
    _stop: watch::Sender<()>,
}

impl Upstream {
    /// Starts an upstream named `name` on an ephemeral loopback port.
    pub async fn start(name: &str) -> Upstream {
        Self::start_with(name, Behaviour::default()).await
    }

    /// Starts an upstream with a given behaviour.
    pub async fn start_with(name: &str, behaviour: Behaviour) -> Upstream {
        Self::start_with_options(name, behaviour, Options::default())
            .await
            .expect("bind an ephemeral loopback port")
    }

    /// Starts an upstream where and how `options` say; fails only if it cannot listen.
    pub async fn start_with_options(
        name: &str,
        behaviour: Behaviour,
        options: Options,
    ) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(options.listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            name: name.to_string(),
            options,
            behaviour: Mutex::new(behaviour),
            records: Mutex::new(Vec::new()),
            in_flight: Mutex::new((0, 0)),
            stats: Mutex::new(Stats::default()),
            arrivals: AtomicU64::new(0),
        });
        let (stop, mut stopped) = watch::channel(());
        let accept_state = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let state = Arc::clone(&accept_state);
                        tokio::spawn(async move {
                            let service = service_fn(move |req| handle(Arc::clone(&state), req));
                            let _ = http1::Builder::new()
                                .max_headers(1000)
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                }
            }
        });
        Ok(Upstream {
            addr,
            state,
            _stop: stop,
        })
    }

    /// The upstream's name (also sent back in `x-upstream`).
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Changes how it answers from now on.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *lock(&self.state.behaviour) = behaviour;
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.records).clone()
    }

    /// Number of requests received so far.
    pub fn count(&self) -> usize {
        lock(&self.state.records).len()
    }

    /// Forgets the requests received so far.
    pub fn clear(&self) {
        lock(&self.state.records).clear();
    }

    /// What it answered so far.
    pub fn stats(&self) -> Stats {
        lock(&self.state.stats).clone()
    }

    /// Zeroes [`Upstream::stats`].
    pub fn reset_stats(&self) {
        *lock(&self.state.stats) = Stats::default();
    }

    /// Largest number of requests that were being handled at the same time.
    pub fn max_in_flight(&self) -> usize {
        lock(&self.state.in_flight).1
    }
}

/// Counts a request as in flight for as long as it lives.
struct InFlight(Arc<State>);

impl InFlight {
    fn enter(state: &Arc<State>) -> InFlight {
        let mut guard = lock(&state.in_flight);
        guard.0 += 1;
        guard.1 = guard.1.max(guard.0);
        InFlight(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.0.in_flight).0 -= 1;
    }
}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let at = Instant::now();
    let path = request.uri().path();
    if state.options.control && (path == CONTROL_PATH || path == STATS_PATH) {
        return control(&state, &request);
    }
    let n = state.arrivals.fetch_add(1, Ordering::Relaxed);
    lock(&state.stats).requests += 1;
    let _in_flight = InFlight::enter(&state);
    let method = request.method().to_string();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let headers = request
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    if state.options.record {
        lock(&state.records).push(Recorded {
            method,
            path,
            headers,
            body,
            at,
        });
    }
    let behaviour = lock(&state.behaviour).clone();
    let slow = spread(n, behaviour.slow_rate);
    let delay = if slow {
        lock(&state.stats).slow += 1;
        behaviour.slow_delay
    } else {
        behaviour.delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if behaviour.reset {
        lock(&state.stats).resets += 1;
        // An error from the service makes hyper drop the connection without a response.
        return Err(std::io::Error::other("reset by test upstream"));
    }
    let status = if spread(n, behaviour.error_rate) {
        500
    } else {
        behaviour.status
    };
    let body = behaviour
        .body
        .unwrap_or_else(|| format!("{}\n", state.name).into_bytes());
    let response = Response::builder()
        .status(status)
        .header(UPSTREAM_HEADER, state.name.as_str())
        .body(Full::new(Bytes::from(body)))
        .map_err(std::io::Error::other)?;
    *lock(&state.stats).by_status.entry(status).or_default() += 1;
    Ok::<_, std::io::Error>(response)
}

/// Answers the control and stats endpoints (see [`CONTROL_PATH`], [`STATS_PATH`]).
fn control(
    state: &State,
    request: &Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let query = request.uri().query().unwrap_or("");
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::PUT, CONTROL_PATH) => match lock(&state.behaviour).apply_query(query) {
            Ok(()) => (StatusCode::NO_CONTENT, String::new()),
            Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        (&Method::GET, STATS_PATH) => {
            let mut stats = lock(&state.stats).to_json();
            stats["name"] = json!(state.name);
            stats["behaviour"] = lock(&state.behaviour).to_json();
            (StatusCode::OK, format!("{stats}\n"))
        }
        (&Method::DELETE, STATS_PATH) => {
            *lock(&state.stats) = Stats::default();
            (StatusCode::NO_CONTENT, String::new())
        }
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            format!("PUT {CONTROL_PATH}?..., GET or DELETE {STATS_PATH}\n"),
        ),
    };
    Response::builder()
        .status(status)
        .header(UPSTREAM_HEADER, state.name.as_str())
        .body(Full::new(Bytes::from(body)))
        .map_err(std::io::Error::other)
}

impl Upstream {
    /// Waits until at least `n` requests arrived (or `timeout` passed); returns the count.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while self.count() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_picks_the_share_in_every_window_give_or_take_one() {
        for rate in [0.0, 0.01, 0.1, 0.25, 0.333, 0.5, 0.9, 1.0] {
            let picked: Vec<bool> = (0..10_000).map(|n| spread(n, rate)).collect();
            for (start, len) in [(0, 1000), (17, 100), (5000, 333), (9990, 10)] {
                let got = picked[start..start + len].iter().filter(|p| **p).count() as f64;
                let want = rate * len as f64;
                assert!(
                    (got - want).abs() <= 1.0,
                    "rate {rate} window {start}+{len}: {got}"
                );
            }
        }
        assert_eq!((0..1000).filter(|n| spread(*n, 0.5)).count(), 500);
        assert!(!spread(3, f64::NAN));
    }

    #[test]
    fn control_queries_apply_all_or_nothing() {
        let mut behaviour = Behaviour::default();
        behaviour
            .apply_query("error_rate=0.25&latency_ms=10&slow_rate=1&slow_ms=900&status=201")
            .unwrap();
        assert_eq!(behaviour.error_rate, 0.25);
        assert_eq!(behaviour.delay, Duration::from_millis(10));
        assert_eq!(behaviour.slow_rate, 1.0);
        assert_eq!(behaviour.slow_delay, Duration::from_millis(900));
        assert_eq!(behaviour.status, 201);

        for bad in [
            "status=503&error_rate=-0.1",
            "status=1000",
            "reset=yes",
            "x=1",
            "error_rate",
        ] {
            let before = behaviour.to_json();
            assert!(behaviour.apply_query(bad).is_err(), "{bad}");
            assert_eq!(behaviour.to_json(), before, "{bad} changed nothing");
        }
        behaviour.apply_query("").unwrap();
        assert_eq!(behaviour.status, 201);
    }
}
