//! `meshcanary serve SPEC|DIR`: the long-running controller for a Deployment.
//!
//! With a spec file it drives that spec's rollout, stays up once it ends, starts a new
//! rollout when the spec's content changes (a new release: `kubectl apply` of its
//! ConfigMap), and serves `/metrics` (Prometheus text) and `/healthz`. SIGTERM saves the
//! rollout's record and exits; the next pod resumes it.
//!
//! With a folder it drives every `*.yaml` / `*.yml` spec in it at once, one task per
//! file (see [`meshcanary_controller::fleet`]), looking at the folder every
//! [`DIR_POLL`]: a new file starts a rollout, a changed file is a new release, a removed
//! file stops being driven (its record stays), an invalid file is reported and tried
//! again when it changes.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use meshcanary_controller::fleet::{Activity, EventHook, Fleet, FleetOptions};
use meshcanary_controller::output::Output;
use meshcanary_controller::spec::{RolloutSpec, SinkSpec};
use meshcanary_policy::ConfigErrors;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::sync::watch;

/// How often an idle controller looks at its spec for a new release.
const SPEC_POLL: Duration = Duration::from_secs(5);

/// How often `serve DIR` looks at its folder (new, changed, removed specs).
pub const DIR_POLL: Duration = Duration::from_secs(2);

/// A label set with one `kind` label (`outcome`, `verdict` or error kind).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

/// A label set naming one rollout (its spec's file name in the folder).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabel {
    rollout: String,
}

/// A label set naming what the fleet does with a rollout.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActivityLabel {
    activity: String,
}

/// The gauges that describe "the" rollout: one series for `serve SPEC`, one per rollout
/// (label `rollout`) for `serve DIR`.
enum RolloutGauges {
    One {
        canary_weight: Gauge<i64, AtomicI64>,
        step: Gauge<i64, AtomicI64>,
    },
    PerRollout {
        canary_weight: Family<RolloutLabel, Gauge<i64, AtomicI64>>,
        step: Family<RolloutLabel, Gauge<i64, AtomicI64>>,
        rollouts: Family<ActivityLabel, Gauge<i64, AtomicI64>>,
    },
}

/// The controller's own metrics.
struct Metrics {
    registry: Registry,
    rollouts_started: Counter,
    rollouts_finished: Family<Kind, Counter>,
    verdicts: Family<Kind, Counter>,
    errors: Family<Kind, Counter>,
    dry_run_rollbacks: Counter,
    commands: Family<Kind, Counter>,
    gauges: RolloutGauges,
}

impl Metrics {
    fn new(per_rollout: bool) -> Metrics {
        let mut registry = Registry::with_prefix("meshcanary");
        let rollouts_started = Counter::<u64, AtomicU64>::default();
        let rollouts_finished = Family::<Kind, Counter>::default();
        let verdicts = Family::<Kind, Counter>::default();
        let errors = Family::<Kind, Counter>::default();
        let dry_run_rollbacks = Counter::<u64, AtomicU64>::default();
        let commands = Family::<Kind, Counter>::default();
        registry.register(
            "dry_run_rollbacks",
            "Rollback verdicts reached under analysis.dry_run and not applied",
            dry_run_rollbacks.clone(),
        );
        registry.register(
            "operator_commands",
            "Operator commands acknowledged, by kind (pause, resume, promote, promote_refused)",
            commands.clone(),
        );
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
        let gauges = if per_rollout {
            let canary_weight = Family::<RolloutLabel, Gauge<i64, AtomicI64>>::default();
            let step = Family::<RolloutLabel, Gauge<i64, AtomicI64>>::default();
            let rollouts = Family::<ActivityLabel, Gauge<i64, AtomicI64>>::default();
            registry.register(
                "canary_weight_percent",
                "Canary weight last applied, percent, by rollout (spec file)",
                canary_weight.clone(),
            );
            registry.register(
                "rollout_step",
                "Index of the step being judged, by rollout (spec file)",
                step.clone(),
            );
            registry.register(
                "rollouts",
                "Rollouts known, by activity (running, retrying, finished, invalid, stopped)",
                rollouts.clone(),
            );
            RolloutGauges::PerRollout {
                canary_weight,
                step,
                rollouts,
            }
        } else {
            let canary_weight = Gauge::<i64, AtomicI64>::default();
            let step = Gauge::<i64, AtomicI64>::default();
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
            RolloutGauges::One {
                canary_weight,
                step,
            }
        };
        Metrics {
            registry,
            rollouts_started,
            rollouts_finished,
            verdicts,
            errors,
            dry_run_rollbacks,
            commands,
            gauges,
        }
    }

    fn kind(family: &Family<Kind, Counter>, kind: &str) {
        family
            .get_or_create(&Kind {
                kind: kind.to_string(),
            })
            .inc();
    }

    fn set_weight(&self, rollout: &str, weight: i64) {
        match &self.gauges {
            RolloutGauges::One { canary_weight, .. } => {
                canary_weight.set(weight);
            }
            RolloutGauges::PerRollout { canary_weight, .. } => {
                canary_weight
                    .get_or_create(&RolloutLabel {
                        rollout: rollout.to_string(),
                    })
                    .set(weight);
            }
        }
    }

    fn set_step(&self, rollout: &str, value: i64) {
        match &self.gauges {
            RolloutGauges::One { step, .. } => {
                step.set(value);
            }
            RolloutGauges::PerRollout { step, .. } => {
                step.get_or_create(&RolloutLabel {
                    rollout: rollout.to_string(),
                })
                .set(value);
            }
        }
    }

    /// Drops a rollout's series once it is no longer driven.
    fn forget(&self, rollout: &str) {
        if let RolloutGauges::PerRollout {
            canary_weight,
            step,
            ..
        } = &self.gauges
        {
            let label = RolloutLabel {
                rollout: rollout.to_string(),
            };
            canary_weight.remove(&label);
            step.remove(&label);
        }
    }

    /// Sets the per-activity counts (serve DIR).
    fn count_activities(&self, activities: &[Activity]) {
        if let RolloutGauges::PerRollout { rollouts, .. } = &self.gauges {
            for name in ["running", "retrying", "finished", "invalid", "stopped"] {
                let n = activities
                    .iter()
                    .filter(|a| activity_name(**a) == name)
                    .count();
                rollouts
                    .get_or_create(&ActivityLabel {
                        activity: name.to_string(),
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    /// Turns a rollout's events (and the fleet's about it) into metric updates.
    fn observe(&self, rollout: &str, event: &str, data: &Value) {
        match event {
            "start" => {
                self.rollouts_started.inc();
                self.set_step(rollout, 0);
            }
            "resume" => {
                self.set_step(rollout, data["step"].as_i64().unwrap_or(0));
            }
            "applied" => {
                self.set_weight(rollout, data["weight"].as_i64().unwrap_or(0));
            }
            "hold" | "promote" | "complete" | "rollback" => {
                Metrics::kind(&self.verdicts, event);
                if let Some(step) = data["to_step"].as_i64() {
                    self.set_step(rollout, step);
                }
            }
            "would_rollback" => {
                self.dry_run_rollbacks.inc();
            }
            "command" => {
                let kind = match (data["command"].as_str(), data["accepted"].as_bool()) {
                    (Some("promote"), Some(false)) => "promote_refused",
                    (Some(command), _) => command,
                    (None, _) => "unknown",
                };
                Metrics::kind(&self.commands, kind);
            }
            "source" if data["error"].is_string() => Metrics::kind(&self.errors, "source"),
            "error" => {
                Metrics::kind(&self.errors, "sink");
                // The fleet's report of a failed try (it is retried).
                if data.get("retry_in_s").is_some() {
                    Metrics::kind(&self.errors, "run");
                }
            }
            "invalid" => Metrics::kind(&self.errors, "spec"),
            "aborted" => Metrics::kind(&self.rollouts_finished, "aborted"),
            // The fleet's report of an ended rollout; an abort was counted above.
            "finished" => {
                if let Some(kind @ ("promoted" | "rolled_back")) = data["outcome_kind"].as_str() {
                    Metrics::kind(&self.rollouts_finished, kind)
                }
            }
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

fn activity_name(activity: Activity) -> &'static str {
    match activity {
        Activity::Running => "running",
        Activity::Retrying => "retrying",
        Activity::Finished => "finished",
        Activity::Invalid => "invalid",
        Activity::Stopped => "stopped",
    }
}

/// Starts serving /metrics and /healthz on `listen` (metrics labelled by rollout when
/// `per_rollout`) and watching for SIGTERM/SIGINT: the metrics, the stop signal that
/// turns true on either, and the address actually bound (port 0 asks the system for a
/// free port; the `serve` event reports the one it gave).
async fn start_serving(
    listen: SocketAddr,
    per_rollout: bool,
) -> Result<(Arc<Metrics>, watch::Receiver<bool>, SocketAddr), String> {
    let metrics = Arc::new(Metrics::new(per_rollout));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {}", listen, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("cannot tell where {} listens: {}", listen, e))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(http_server(listener, Arc::clone(&metrics), stop_rx.clone()));
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    Ok((metrics, stop_rx, bound))
}

/// Runs the controller until SIGTERM/SIGINT: a folder of specs, or one spec file.
pub async fn serve(path: &Path, listen: SocketAddr, out: Output) -> Result<(), String> {
    let per_rollout = path.is_dir();
    let (metrics, stop_rx, listen) = start_serving(listen, per_rollout).await?;
    let hook_metrics = Arc::clone(&metrics);
    let hook: EventHook = Arc::new(move |rollout, kind, data| {
        hook_metrics.observe(rollout, kind, data);
    });
    let mut out = out;
    out.event(
        "serve",
        format!(
            "serving /metrics and /healthz on {}; {} {}",
            listen,
            if per_rollout { "specs in" } else { "spec" },
            path.display()
        ),
        if per_rollout {
            json!({"listen": listen.to_string(), "dir": path})
        } else {
            json!({"listen": listen.to_string(), "spec": path})
        },
    );
    if per_rollout {
        serve_dir(path, &out, hook, &metrics, stop_rx).await;
    } else {
        serve_file(path, &out, hook, stop_rx).await;
    }
    Ok(())
}

/// Where `serve --kubernetes` takes its controller-wide Lease.
pub struct LeaseAt {
    /// The Lease's namespace; `None`: the client's default (in-cluster: the pod's).
    pub namespace: Option<String>,
    /// The Lease's name.
    pub name: String,
}

/// `serve --kubernetes`: every Rollout (in `namespace`, or in all namespaces), each in
/// its own task, while this replica holds the controller's Lease. A standby replica
/// serves /healthz and waits for the Lease. Losing the Lease stops every rollout (each
/// saves its record) and exits with an error, so the pod restarts as a standby.
pub async fn serve_kubernetes(
    namespace: Option<String>,
    lease: LeaseAt,
    listen: SocketAddr,
    out: Output,
) -> Result<(), String> {
    use meshcanary_controller::kubernetes::lease;
    use meshcanary_controller::kubernetes::watch::{RolloutSinks, RolloutWatch};
    use meshcanary_controller::rollout::{self, RunError};
    use meshcanary_controller::sink::kubernetes::{prepare_tls, Options};
    use meshcanary_controller::sink::SinkError;

    let (metrics, stop_rx, listen) = start_serving(listen, true).await?;
    prepare_tls();
    let client = kube::Client::try_default().await.map_err(|e| {
        format!(
            "no Kubernetes configuration (in-cluster, KUBECONFIG, ~/.kube/config): {}",
            e
        )
    })?;
    let lease_namespace = lease
        .namespace
        .unwrap_or_else(|| client.default_namespace().to_string());
    let mut out = out;
    out.event(
        "serve",
        format!(
            "serving /metrics and /healthz on {}; Rollouts in {}; waiting for Lease {}/{}",
            listen,
            namespace.as_deref().unwrap_or("every namespace"),
            lease_namespace,
            lease.name
        ),
        json!({"listen": listen.to_string(), "namespace": namespace, "lease": format!("{}/{}", lease_namespace, lease.name)}),
    );
    let options = Options::default();
    let acquired = tokio::select! {
        leader = lease::acquire(client.clone(), &lease_namespace, &lease.name, &options) => leader,
        _ = wait_for_stop(stop_rx.clone()) => return Ok(()),
    };
    let leader = acquired.map_err(|e| e.to_string())?;
    out.event(
        "leader",
        format!(
            "holding Lease {}/{} as {}: driving Rollouts",
            lease_namespace,
            lease.name,
            leader.identity()
        ),
        json!({"identity": leader.identity()}),
    );
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "meshcanary".to_string(),
            instance: Some(leader.identity()),
        },
    );
    let sinks = RolloutSinks::new(client, leader, recorder);
    let launcher_sinks = sinks.clone();
    let launcher: meshcanary_controller::fleet::Launcher = Arc::new(
        move |spec: RolloutSpec,
              mut out: Output,
              stop: meshcanary_controller::fleet::StopSignal| {
            let sink = launcher_sinks.sink_for(&spec);
            Box::pin(async move {
                let Some(sink) = sink else {
                    return Err(RunError::Sink(SinkError::Api {
                        request: spec.file.display().to_string(),
                        reason: "the Rollout is no longer known to this controller".to_string(),
                    }));
                };
                let source = crate::source(&spec);
                rollout::run_release(&spec, &source, &sink, &mut out, stop.stopped()).await
            })
        },
    );
    let hook_metrics = Arc::clone(&metrics);
    let hook: EventHook = Arc::new(move |rollout, kind, data| {
        hook_metrics.observe(rollout, kind, data);
    });
    let options = FleetOptions {
        label_lines: true,
        hook: Some(hook),
        ..FleetOptions::default()
    };
    let mut fleet = Fleet::new(launcher, &out, options);
    let mut rollouts = RolloutWatch::new(sinks, namespace);
    let result = rollouts.run(&mut fleet, wait_for_stop(stop_rx)).await;
    // Each rollout saves its record; within the pod's grace period (30 s), since a
    // rollout whose writes are refused (leadership lost) may never get to.
    if tokio::time::timeout(Duration::from_secs(20), fleet.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("not every rollout stopped within 20 s; exiting anyway");
    }
    result
}

/// Resolves once a stop is asked for.
async fn wait_for_stop(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// `serve SPEC`: a fleet of one, printing and counting exactly as a single rollout. A
/// new revision of the spec is taken once the running rollout has ended (or failed);
/// until then the running one goes on.
async fn serve_file(path: &Path, out: &Output, hook: EventHook, stop: watch::Receiver<bool>) {
    let options = FleetOptions {
        label_lines: false,
        retry_first: SPEC_POLL,
        retry_max: SPEC_POLL,
        hook: Some(hook),
    };
    let mut fleet = Fleet::new(crate::launcher(false), out, options);
    let key = path.display().to_string();
    loop {
        match RolloutSpec::load(path) {
            Ok(spec) => {
                let running = fleet
                    .snapshot()
                    .iter()
                    .any(|v| v.key == key && v.activity == Activity::Running);
                if !running {
                    fleet.apply(&key, spec);
                }
            }
            Err(errors) => fleet.invalid(&key, &errors),
        }
        if wait_or_stop(&stop, SPEC_POLL).await {
            break;
        }
    }
    fleet.shutdown().await;
}

/// `serve DIR`: every spec in the folder, each in its own task.
async fn serve_dir(
    dir: &Path,
    out: &Output,
    hook: EventHook,
    metrics: &Metrics,
    stop: watch::Receiver<bool>,
) {
    let options = FleetOptions {
        label_lines: true,
        hook: Some(hook),
        ..FleetOptions::default()
    };
    let mut fleet = Fleet::new(crate::launcher(true), out, options);
    let mut unreadable: Option<String> = None;
    let mut notes = out.fork();
    loop {
        match read_folder(dir) {
            Ok(specs) => {
                unreadable = None;
                let present: BTreeSet<String> = specs.keys().cloned().collect();
                for key in fleet.keys() {
                    if !present.contains(&key) {
                        notes.event(
                            "removed",
                            format!("{}: spec removed; no longer driven (its record stays)", key),
                            json!({"rollout": key}),
                        );
                        fleet.remove(&key);
                        metrics.forget(&key);
                    }
                }
                for (key, loaded) in specs {
                    match loaded {
                        Ok(spec) => fleet.apply(&key, spec),
                        Err(errors) => fleet.invalid(&key, &errors),
                    }
                }
            }
            Err(e) => {
                // The rollouts already driven go on; the folder is read again next time.
                if unreadable.as_deref() != Some(e.as_str()) {
                    notes.event(
                        "error",
                        format!("cannot read {}: {}", dir.display(), e),
                        json!({"error": e}),
                    );
                    unreadable = Some(e);
                }
            }
        }
        let activities: Vec<Activity> = fleet.snapshot().iter().map(|v| v.activity).collect();
        metrics.count_activities(&activities);
        if wait_or_stop(&stop, DIR_POLL).await {
            break;
        }
    }
    fleet.shutdown().await;
}

/// One spec file's reading: the spec, or every problem with it.
pub type Loaded = Result<RolloutSpec, ConfigErrors>;

/// Every `*.yaml` / `*.yml` file of `dir` (not hidden), by file name, read and validated.
/// A file some valid spec names as its ECDS file is that sink's output, not a spec, and is
/// left out. Two specs writing the same target are both invalid (a configuration error,
/// reported for both), so that no two rollouts fight over one sink.
pub fn read_folder(dir: &Path) -> Result<BTreeMap<String, Loaded>, String> {
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_spec = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if is_spec && !name.starts_with('.') && path.is_file() {
            files.push((name, path));
        }
    }
    let mut loaded: BTreeMap<String, Loaded> = files
        .into_iter()
        .map(|(name, path)| {
            let spec = RolloutSpec::load(&path);
            (name, spec)
        })
        .collect();
    // ECDS files in the folder are outputs, not specs.
    let outputs: BTreeSet<PathBuf> = loaded
        .values()
        .filter_map(|l| match l {
            Ok(RolloutSpec {
                sink: SinkSpec::EcdsFile(ecds),
                ..
            }) => Some(normalized(&ecds.path)),
            _ => None,
        })
        .collect();
    loaded.retain(|name, _| !outputs.contains(&normalized(&dir.join(name))));
    // Two specs, one target: neither is driven.
    let mut by_target: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, spec) in &loaded {
        if let Ok(spec) = spec {
            by_target
                .entry(sink_target(spec))
                .or_default()
                .push(name.clone());
        }
    }
    for (target, names) in by_target {
        if names.len() < 2 {
            continue;
        }
        for name in &names {
            let others: Vec<&str> = names
                .iter()
                .filter(|n| *n != name)
                .map(String::as_str)
                .collect();
            let mut errors = ConfigErrors::default();
            errors.push(
                "sink",
                format!(
                    "{} is also written by {}: two rollouts cannot drive one target; give each its own",
                    target,
                    others.join(", ")
                ),
            );
            loaded.insert(name.clone(), Err(errors));
        }
    }
    Ok(loaded)
}

/// What a spec's sink writes: the ECDS file, or the EnvoyFilter's namespace/name.
fn sink_target(spec: &RolloutSpec) -> String {
    match &spec.sink {
        SinkSpec::EcdsFile(ecds) => format!("ECDS file {}", normalized(&ecds.path).display()),
        SinkSpec::Kubernetes(k) => format!("EnvoyFilter {}/{}", k.namespace, k.name),
    }
}

/// The path with its folder resolved (symlinks, `..`) when it exists.
fn normalized(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
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
