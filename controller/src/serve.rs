//! `meshcanary serve SPEC`: the long-running controller for a Deployment. It drives the
//! spec's rollout, stays up once it ends, starts a new rollout when the spec's content
//! changes (a new release: `kubectl apply` of its ConfigMap), and serves `/metrics`
//! (Prometheus text) and `/healthz`. SIGTERM saves the rollout's record and exits; the
//! next pod resumes it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use meshcanary_controller::output::Output;
use meshcanary_controller::rollout::{self, RunError};
use meshcanary_controller::spec::RolloutSpec;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::sync::watch;

/// How often an idle controller looks at its spec for a new release.
const SPEC_POLL: Duration = Duration::from_secs(5);

/// A label set with one `kind` label (`outcome`, `verdict` or error kind).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

/// The controller's own metrics.
struct Metrics {
    registry: Registry,
    rollouts_started: Counter,
    rollouts_finished: Family<Kind, Counter>,
    verdicts: Family<Kind, Counter>,
    errors: Family<Kind, Counter>,
    canary_weight: Gauge<i64, AtomicI64>,
    step: Gauge<i64, AtomicI64>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("meshcanary");
        let rollouts_started = Counter::<u64, AtomicU64>::default();
        let rollouts_finished = Family::<Kind, Counter>::default();
        let verdicts = Family::<Kind, Counter>::default();
        let errors = Family::<Kind, Counter>::default();
        let canary_weight = Gauge::<i64, AtomicI64>::default();
        let step = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "rollouts_started",
            "Rollouts started (fresh, not resumed)",
            rollouts_started.clone(),
        );
        registry.register(
            "rollouts_finished",
            "Rollouts finished, by outcome (promoted, rolled_back, aborted)",
            rollouts_finished.clone(),
        );
        registry.register(
            "verdicts",
            "Verdicts reached, by kind (hold, promote, complete, rollback)",
            verdicts.clone(),
        );
        registry.register(
            "errors",
            "Errors, by kind (source, sink, spec, run)",
            errors.clone(),
        );
        registry.register(
            "canary_weight_percent",
            "Canary weight last applied, percent",
            canary_weight.clone(),
        );
        registry.register(
            "rollout_step",
            "Index of the step being judged",
            step.clone(),
        );
        Metrics {
            registry,
            rollouts_started,
            rollouts_finished,
            verdicts,
            errors,
            canary_weight,
            step,
        }
    }

    fn kind(family: &Family<Kind, Counter>, kind: &str) {
        family
            .get_or_create(&Kind {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Turns the rollout's events into metric updates.
    fn observe(&self, event: &str, data: &Value) {
        match event {
            "start" => {
                self.rollouts_started.inc();
                self.step.set(0);
            }
            "resume" => {
                self.step.set(data["step"].as_i64().unwrap_or(0));
            }
            "applied" => {
                self.canary_weight.set(data["weight"].as_i64().unwrap_or(0));
            }
            "hold" | "promote" | "complete" | "rollback" => {
                Metrics::kind(&self.verdicts, event);
                if let Some(step) = data["to_step"].as_i64() {
                    self.step.set(step);
                }
            }
            "source" if data["error"].is_string() => Metrics::kind(&self.errors, "source"),
            "error" => Metrics::kind(&self.errors, "sink"),
            "aborted" => Metrics::kind(&self.rollouts_finished, "aborted"),
            _ => {}
        }
    }

    fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Runs the controller until SIGTERM/SIGINT.
pub async fn serve(spec_path: &Path, listen: SocketAddr, mut out: Output) -> Result<(), String> {
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {}", listen, e))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(http_server(listener, Arc::clone(&metrics), stop_rx.clone()));
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let observer_metrics = Arc::clone(&metrics);
    out = out.with_observer(Box::new(move |kind, data| {
        observer_metrics.observe(kind, data)
    }));
    out.event(
        "serve",
        format!(
            "serving /metrics and /healthz on {}; spec {}",
            listen,
            spec_path.display()
        ),
        json!({"listen": listen.to_string(), "spec": spec_path}),
    );
    let mut finished_revision: Option<String> = None;
    let mut reported_invalid: Option<String> = None;
    loop {
        if *stop_rx.borrow() {
            return Ok(());
        }
        let spec = match RolloutSpec::load(spec_path) {
            Ok(spec) => spec,
            Err(errors) => {
                let text = errors.to_string();
                if reported_invalid.as_deref() != Some(text.as_str()) {
                    Metrics::kind(&metrics.errors, "spec");
                    out.event(
                        "invalid",
                        format!("{}: {}", spec_path.display(), text.replace('\n', "; ")),
                        json!({"problems": text.lines().collect::<Vec<_>>()}),
                    );
                    reported_invalid = Some(text);
                }
                if wait_or_stop(&stop_rx, SPEC_POLL).await {
                    return Ok(());
                }
                continue;
            }
        };
        reported_invalid = None;
        if finished_revision.as_deref() == Some(spec.revision.as_str()) {
            if wait_or_stop(&stop_rx, SPEC_POLL).await {
                return Ok(());
            }
            continue;
        }
        let mut stop = stop_rx.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let result = rollout::run(
            &spec,
            &crate::source(&spec),
            &crate::sink(&spec),
            &mut out,
            stopped,
        )
        .await;
        match result {
            Ok(outcome) => {
                let kind = match outcome {
                    rollout::Outcome::Promoted => "promoted",
                    rollout::Outcome::RolledBack(_) => "rolled_back",
                    // Counted by the observer when the running rollout saw the mark.
                    rollout::Outcome::Aborted => "",
                };
                if !kind.is_empty() {
                    Metrics::kind(&metrics.rollouts_finished, kind);
                }
                out.event(
                    "finished",
                    format!(
                        "rollout finished: {:?}; waiting for a new revision of the spec",
                        outcome
                    ),
                    json!({"outcome": format!("{:?}", outcome)}),
                );
                finished_revision = Some(spec.revision.clone());
            }
            Err(RunError::Interrupted { step }) => {
                out.event(
                    "stopped",
                    format!("stopped at step {}; the next start resumes", step + 1),
                    json!({"step": step}),
                );
                return Ok(());
            }
            Err(e) => {
                Metrics::kind(&metrics.errors, "run");
                out.event(
                    "error",
                    format!("{}; retrying in {:?}", e, SPEC_POLL),
                    json!({"error": e.to_string()}),
                );
                if wait_or_stop(&stop_rx, SPEC_POLL).await {
                    return Ok(());
                }
            }
        }
    }
}

/// Sleeps `delay`; true when asked to stop meanwhile.
async fn wait_or_stop(stop: &watch::Receiver<bool>, delay: Duration) -> bool {
    let mut waiting = stop.clone();
    tokio::select! {
        _ = waiting.wait_for(|s| *s) => true,
        _ = tokio::time::sleep(delay) => *stop.borrow(),
    }
}

/// `/metrics` and `/healthz`; anything else is 404.
async fn http_server(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(respond(request.uri().path(), &metrics)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(path: &str, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
