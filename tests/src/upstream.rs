//! A recording HTTP/1.1 upstream on loopback: it answers with its own name and keeps
//! every request it saw (method, path, headers, body), so tests can compare what Envoy
//! forwarded with what the client sent. Its behaviour (status, delay, reset) can be
//! changed while it runs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Response header carrying the upstream's name.
pub const UPSTREAM_HEADER: &str = "x-upstream";

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
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            status: 200,
            delay: Duration::ZERO,
            reset: false,
            body: None,
        }
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
    behaviour: Mutex<Behaviour>,
    records: Mutex<Vec<Recorded>>,
    in_flight: Mutex<(usize, usize)>,
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
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral loopback port");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(State {
            name: name.to_string(),
            behaviour: Mutex::new(behaviour),
            records: Mutex::new(Vec::new()),
            in_flight: Mutex::new((0, 0)),
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
        Upstream {
            addr,
            state,
            _stop: stop,
        }
    }

    /// The upstream's name (also sent back in `x-upstream`).
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Changes how it answers from now on.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.state.behaviour.lock().expect("behaviour lock") = behaviour;
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.records.lock().expect("records lock").clone()
    }

    /// Number of requests received so far.
    pub fn count(&self) -> usize {
        self.state.records.lock().expect("records lock").len()
    }

    /// Forgets the requests received so far.
    pub fn clear(&self) {
        self.state.records.lock().expect("records lock").clear();
    }

    /// Largest number of requests that were being handled at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.state.in_flight.lock().expect("in-flight lock").1
    }
}

/// Counts a request as in flight for as long as it lives.
struct InFlight(Arc<State>);

impl InFlight {
    fn enter(state: &Arc<State>) -> InFlight {
        let mut guard = state.in_flight.lock().expect("in-flight lock");
        guard.0 += 1;
        guard.1 = guard.1.max(guard.0);
        InFlight(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.lock().expect("in-flight lock").0 -= 1;
    }
}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let at = Instant::now();
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
    state.records.lock().expect("records lock").push(Recorded {
        method,
        path,
        headers,
        body,
        at,
    });
    let behaviour = state.behaviour.lock().expect("behaviour lock").clone();
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }
    if behaviour.reset {
        // An error from the service makes hyper drop the connection without a response.
        return Err(std::io::Error::other("reset by test upstream"));
    }
    let body = behaviour
        .body
        .unwrap_or_else(|| format!("{}\n", state.name).into_bytes());
    let response = Response::builder()
        .status(behaviour.status)
        .header(UPSTREAM_HEADER, state.name.as_str())
        .body(Full::new(Bytes::from(body)))
        .map_err(std::io::Error::other)?;
    Ok::<_, std::io::Error>(response)
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
