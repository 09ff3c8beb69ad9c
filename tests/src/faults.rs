//! Fault injection between the controller and a real metrics endpoint (an Envoy admin or a
//! Prometheus): an HTTP proxy on loopback that passes every GET through to its target,
//! or — switched while it runs — answers the way a failing endpoint does: an error status,
//! too slowly, or with a body that is not what the endpoint serves.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::lock;

/// How the proxy answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Every request goes to the target and its answer comes back unchanged.
    Pass,
    /// Answers this status with a short text body, without asking the target.
    Status(u16),
    /// Waits this long, then passes the request through (a client with a shorter timeout
    /// gives up first).
    Slow(Duration),
    /// Answers 200 with a body that is not JSON at all.
    Garbage,
    /// Answers 200 with JSON of the wrong shape (what a misconfigured endpoint or a
    /// proxy's error page in JSON looks like).
    WrongShape,
    /// Answers 200 with the target's real answer cut in half.
    Truncated,
}

/// A fault-injecting HTTP proxy; it stops with the test's runtime.
pub struct FaultProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
}

impl FaultProxy {
    /// Proxies `http://<addr>/…` to `target` (a base URL such as `http://127.0.0.1:9901`).
    pub async fn start(target: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fault = Arc::new(Mutex::new(Fault::Pass));
        let client = reqwest::Client::new();
        let target = target.trim_end_matches('/').to_string();
        let shared = Arc::clone(&fault);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (fault, client, target) = (Arc::clone(&shared), client.clone(), target.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let fault = lock(&fault).clone();
                        answer(fault, client.clone(), target.clone(), request)
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FaultProxy { addr, fault }
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes how it answers from the next request on.
    pub fn set(&self, fault: Fault) {
        *lock(&self.fault) = fault;
    }
}

async fn answer(
    fault: Fault,
    client: reqwest::Client,
    target: String,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let reply = |status: u16, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(std::io::Error::other)
    };
    match fault {
        Fault::Status(status) => return reply(status, b"injected failure\n".to_vec()),
        Fault::Garbage => return reply(200, b"\x00\xffnot json at all {{{".to_vec()),
        Fault::WrongShape => {
            return reply(
                200,
                br#"{"stats": "unavailable", "data": {"result": 7}}"#.to_vec(),
            )
        }
        Fault::Slow(delay) => tokio::time::sleep(delay).await,
        Fault::Pass | Fault::Truncated => {}
    }
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let upstream = client
        .get(format!("{target}{path}"))
        .send()
        .await
        .map_err(std::io::Error::other)?;
    let status = upstream.status().as_u16();
    let mut body = upstream
        .bytes()
        .await
        .map_err(std::io::Error::other)?
        .to_vec();
    if fault == Fault::Truncated {
        body.truncate(body.len() / 2);
    }
    reply(status, body)
}
