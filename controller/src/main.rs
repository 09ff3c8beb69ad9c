//! `meshcanary`: the controller's command line. It only wires; the work is in the library.
//!
//! Exit codes (a public contract): 0 promoted (canary at 100 %), 3 rolled back or
//! aborted (canary at 0 %), 2 invalid spec or usage, 1 anything else.

mod operator;
mod serve;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::sync::Arc;

use clap::{Parser, Subcommand};
use meshcanary_controller::control;
use meshcanary_controller::fleet::{Launcher, StopSignal};
use meshcanary_controller::gateway::{
    render_gateway, Backend, GatewayOptions, GatewayRef, GatewayRenderError, Target,
};
use meshcanary_controller::output::{Format, Output};
use meshcanary_controller::rollout::{self, Outcome, RunError};
use meshcanary_controller::sink::kubernetes::{render_manifest, ManifestError};
use meshcanary_controller::sink::{AnySink, ConfigSink};
use meshcanary_controller::source::envoy_admin::EnvoyAdmin;
use meshcanary_controller::source::istio::IstioPrometheus;
use meshcanary_controller::source::prometheus::Prometheus;
use meshcanary_controller::source::{MetricSource, Query, Snapshot, SourceError};
use meshcanary_controller::spec::{PrometheusMetrics, RolloutSpec, SourceSpec};
use meshcanary_policy::Policy;
use serde_json::json;

const EXIT_FAILURE: u8 = 1;
const EXIT_INVALID: u8 = 2;

/// Safe canary releases in a service mesh: judge a canary from its metrics, promote it
/// step by step, roll it back automatically.
#[derive(Parser)]
#[command(name = "meshcanary", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Output format of progress and results.
    #[arg(long, value_enum, default_value = "text", global = true)]
    output: Format,
}

#[derive(Subcommand)]
enum Command {
    /// Drive one rollout to its end (exit 0 promoted, 3 rolled back).
    Run {
        /// The rollout spec (YAML).
        spec: PathBuf,
    },
    /// Check a policy (.json) or a rollout spec (.yaml); print every problem with its path.
    Validate {
        /// The file to check.
        file: PathBuf,
    },
    /// Show where a rollout stands; for a folder, every rollout in it (one line each).
    Status {
        /// The rollout spec, or a folder of specs (as `serve DIR` drives).
        spec: PathBuf,
    },
    /// Send the canary to 0 % now; a running controller stops at its next tick.
    Abort {
        /// The rollout spec (not with --rollout).
        #[arg(required_unless_present = "rollout", conflicts_with = "rollout")]
        spec: Option<PathBuf>,
        /// A `Rollout` resource, `NAMESPACE/NAME`: sets its `meshcanary.io/abort`
        /// annotation (kubeconfig: in-cluster, KUBECONFIG, ~/.kube/config); the controller
        /// (`serve --kubernetes`) sends the canary to 0 % at its next tick.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        rollout: Option<String>,
    },
    /// Hold the canary at its weight; verdicts are reported, not applied, until `resume`.
    ///
    /// A running controller keeps judging and reporting every verdict but applies none
    /// (no promotion, no rollback). Exit 0 once the controller confirms (in the rollout's
    /// record), 1 if none does in time (the mark is then withdrawn).
    Pause(Operator),
    /// Lift a pause: the verdicts act again from the controller's next tick.
    Resume(Operator),
    /// Skip the rest of the current step's wait (never past a failing verdict without --force).
    ///
    /// The canary goes to the next step (minimum time and requests skipped) at the
    /// controller's next tick. Refused (exit 1) while the current verdict is failing (a
    /// rollback, in a dry run or while paused), unless --force.
    Promote {
        #[command(flatten)]
        target: Operator,
        /// Skip even past a failing verdict (recorded as forced).
        #[arg(long)]
        force: bool,
    },
    /// Long-running controller (for a Deployment): drive the spec's rollout (or every
    /// spec's in a folder, concurrently), start a new one when a spec changes, serve
    /// /metrics and /healthz; SIGTERM saves and exits.
    Serve {
        /// The rollout spec, or a folder of `*.yaml` / `*.yml` specs (not with --kubernetes).
        #[arg(required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
        spec: Option<PathBuf>,
        /// Drive every `Rollout` resource (meshcanary.io/v1alpha1) instead of spec files:
        /// in-cluster, one controller-wide Lease (leader election), status and Events on
        /// each Rollout.
        #[arg(long)]
        kubernetes: bool,
        /// With --kubernetes: only Rollouts in this namespace (default: every namespace).
        #[arg(long, requires = "kubernetes")]
        namespace: Option<String>,
        /// With --kubernetes: the namespace of the controller's Lease (default: the pod's).
        #[arg(long, requires = "kubernetes")]
        lease_namespace: Option<String>,
        /// With --kubernetes: the name of the controller's Lease.
        #[arg(long, requires = "kubernetes", default_value = "meshcanary-controller")]
        lease_name: String,
        /// Address for /metrics and /healthz.
        #[arg(long, default_value = "0.0.0.0:9464")]
        listen: SocketAddr,
    },
    /// Print the `Rollout` CustomResourceDefinition (YAML), generated from the same types
    /// as the spec file; `manifests/istio/controller/crd.yaml` is this output.
    Crd,
    /// Turn an event stream (`run --output json`, `serve --output json`) into one
    /// self-contained HTML page on standard output: weight, error and slow rates,
    /// evidence against the rollback boundary, and the verdicts (one section per rollout).
    Report {
        /// The JSON lines file (`-` for standard input). Lines that are not events are skipped.
        events: PathBuf,
    },
    /// Print exactly what the sink would write for the rollout's current state.
    Render {
        /// The rollout spec.
        spec: PathBuf,
        /// `kubernetes`: print the EnvoyFilter to commit (GitOps) for the rollout's first
        /// step, without contacting a cluster; needs a sink.kubernetes section.
        #[arg(long, value_enum, conflicts_with = "target")]
        sink: Option<RenderSink>,
        /// Documents for a Gateway API `Gateway` instead (with --gateway and a --backend
        /// per variant): `gateway-api` an Istio WasmPlugin attached by `targetRefs`,
        /// `envoy-gateway` an Envoy Gateway EnvoyExtensionPolicy; each with an HTTPRoute
        /// routing on the decision header. Offline; needs a sink.kubernetes section.
        #[arg(long, value_enum, requires_all = ["gateway", "backend"])]
        target: Option<RenderTarget>,
        /// With --target: the Gateway, `NAMESPACE/NAME`.
        #[arg(long, value_name = "NAMESPACE/NAME", requires = "target")]
        gateway: Option<GatewayRef>,
        /// With --target: where a variant's requests go, `VARIANT=SERVICE:PORT` (a Service
        /// in sink.kubernetes.namespace); once per variant of the policy.
        #[arg(long, value_name = "VARIANT=SERVICE:PORT", requires = "target")]
        backend: Vec<Backend>,
        /// With --target: a hostname of the HTTPRoute (repeatable; none: every hostname
        /// the Gateway's listeners accept).
        #[arg(long, requires = "target")]
        hostname: Vec<String>,
    },
}

/// What `render --target` renders for.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RenderTarget {
    /// An Istio WasmPlugin attached to the Gateway (`targetRefs`) + an HTTPRoute.
    GatewayApi,
    /// An Envoy Gateway EnvoyExtensionPolicy on an HTTPRoute + that HTTPRoute.
    EnvoyGateway,
}

/// The rollout an operator's command is for, and how long to wait for the controller.
#[derive(clap::Args)]
struct Operator {
    /// The rollout spec (as `run` or `serve` drive it, `serve DIR` included); not with
    /// --rollout.
    #[arg(required_unless_present = "rollout", conflicts_with = "rollout")]
    spec: Option<PathBuf>,
    /// A `Rollout` resource, `NAMESPACE/NAME`: sets its `meshcanary.io/pause` or
    /// `meshcanary.io/promote` annotation (kubeconfig: in-cluster, KUBECONFIG,
    /// ~/.kube/config) and waits for the acknowledgement in its status.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    rollout: Option<String>,
    /// Leave the mark and exit 0 without waiting for a controller to confirm.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the controller's confirmation, in seconds (default: two
    /// intervals of the rollout plus 10 s).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
}

/// What `render --sink` renders for.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RenderSink {
    /// The Istio EnvoyFilter of the Kubernetes sink.
    Kubernetes,
}

/// The configured metric source.
pub(crate) enum Source {
    EnvoyAdmin(EnvoyAdmin),
    Prometheus(Prometheus),
    Istio(IstioPrometheus),
}

impl MetricSource for Source {
    async fn read(&self, query: &Query) -> Result<Snapshot, SourceError> {
        match self {
            Source::EnvoyAdmin(s) => s.read(query).await,
            Source::Prometheus(s) => s.read(query).await,
            Source::Istio(s) => s.read(query).await,
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::EnvoyAdmin(s) => s.describe(),
            Source::Prometheus(s) => s.describe(),
            Source::Istio(s) => s.describe(),
        }
    }
}

pub(crate) fn source(spec: &RolloutSpec) -> Source {
    let client = reqwest::Client::new();
    match &spec.source {
        SourceSpec::EnvoyAdmin(urls) => Source::EnvoyAdmin(EnvoyAdmin::new(urls.clone(), client)),
        SourceSpec::Prometheus {
            url,
            matchers,
            metrics: PrometheusMetrics::Filter,
        } => {
            Source::Prometheus(Prometheus::new(url.clone(), client).with_matchers(matchers.clone()))
        }
        SourceSpec::Prometheus {
            url,
            matchers,
            metrics:
                PrometheusMetrics::Istio {
                    destination_service,
                    reporter,
                    versions,
                },
        } => {
            let mut istio = IstioPrometheus::new(url.clone(), destination_service.clone(), client)
                .with_reporter(reporter.clone())
                .with_matchers(matchers.clone());
            for (variant, label) in versions {
                istio = istio.with_version_label(variant.clone(), label.clone());
            }
            Source::Istio(istio)
        }
    }
}

pub(crate) fn sink(spec: &RolloutSpec) -> AnySink {
    AnySink::new(spec)
}

/// How `serve` drives one rollout of its fleet: the spec's own source and sink.
/// `supersede`: a new revision replaces an unfinished record of an earlier one
/// ([`rollout::run_release`], `serve DIR`) instead of being refused ([`rollout::run`]).
pub(crate) fn launcher(supersede: bool) -> Launcher {
    Arc::new(
        move |spec: RolloutSpec, mut out: Output, stop: StopSignal| {
            Box::pin(async move {
                let source = source(&spec);
                let sink = sink(&spec);
                if supersede {
                    rollout::run_release(&spec, &source, &sink, &mut out, stop.stopped()).await
                } else {
                    rollout::run(&spec, &source, &sink, &mut out, stop.stopped()).await
                }
            })
        },
    )
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Help and version are not usage errors.
            return if e.use_stderr() {
                ExitCode::from(EXIT_INVALID)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut out = Output::new(cli.output);
    match cli.command {
        Command::Validate { file } => validate(&file, &mut out),
        Command::Run { spec } => with_spec(&spec, &mut out, run).await,
        Command::Serve {
            kubernetes: true,
            namespace,
            lease_namespace,
            lease_name,
            listen,
            ..
        } => {
            let lease = serve::LeaseAt {
                namespace: lease_namespace,
                name: lease_name,
            };
            match serve::serve_kubernetes(namespace, lease, listen, out).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("meshcanary: {}", e);
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Serve { spec: None, .. } => {
            eprintln!("meshcanary: serve needs a SPEC (file or folder) or --kubernetes");
            ExitCode::from(EXIT_INVALID)
        }
        Command::Serve {
            spec: Some(spec),
            listen,
            ..
        } => match serve::serve(&spec, listen, out).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshcanary: {}", e);
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::Crd => match meshcanary_controller::kubernetes::crd::crd_yaml() {
            Ok(text) => {
                print!("{}", text);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshcanary: cannot render the CRD: {}", e);
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::Status { spec } if spec.is_dir() => status_dir(&spec, &mut out).await,
        Command::Status { spec } => with_spec(&spec, &mut out, status).await,
        Command::Abort {
            rollout: Some(rollout),
            ..
        } => abort_rollout(&rollout, &mut out).await,
        Command::Abort {
            spec: Some(spec), ..
        } => with_spec(&spec, &mut out, abort).await,
        Command::Abort { .. } => {
            eprintln!("meshcanary: abort needs a SPEC or --rollout NAMESPACE/NAME");
            ExitCode::from(EXIT_INVALID)
        }
        Command::Pause(target) => {
            operator::command(control::Command::Pause, false, target, &mut out).await
        }
        Command::Resume(target) => {
            operator::command(control::Command::Resume, false, target, &mut out).await
        }
        Command::Promote { target, force } => {
            operator::command(control::Command::Promote, force, target, &mut out).await
        }
        Command::Report { events } => report(&events),
        Command::Render {
            spec,
            target: Some(target),
            gateway: Some(gateway),
            backend,
            hostname,
            ..
        } => {
            let options = GatewayOptions {
                target: match target {
                    RenderTarget::GatewayApi => Target::GatewayApi,
                    RenderTarget::EnvoyGateway => Target::EnvoyGateway,
                },
                gateway,
                backends: backend,
                hostnames: hostname,
            };
            with_spec(
                &spec,
                &mut out,
                async |spec: &RolloutSpec, out: &mut Output| {
                    render_for_gateway(spec, &options, out)
                },
            )
            .await
        }
        Command::Render {
            target: Some(_), ..
        } => {
            eprintln!("meshcanary: render --target needs --gateway NAMESPACE/NAME");
            ExitCode::from(EXIT_INVALID)
        }
        Command::Render {
            spec, sink: None, ..
        } => with_spec(&spec, &mut out, render).await,
        Command::Render {
            spec,
            sink: Some(RenderSink::Kubernetes),
            ..
        } => with_spec(&spec, &mut out, render_kubernetes).await,
    }
}

/// Loads the spec (exit 2 with every problem when invalid) and runs `command` on it.
async fn with_spec<F>(file: &Path, out: &mut Output, command: F) -> ExitCode
where
    F: AsyncFnOnce(&RolloutSpec, &mut Output) -> ExitCode,
{
    match RolloutSpec::load(file) {
        Ok(spec) => command(&spec, out).await,
        Err(errors) => {
            report_invalid(file, &errors, out);
            ExitCode::from(EXIT_INVALID)
        }
    }
}

pub(crate) fn report_invalid(
    file: &Path,
    errors: &meshcanary_policy::ConfigErrors,
    out: &mut Output,
) {
    let problems: Vec<String> = errors.iter().map(ToString::to_string).collect();
    for problem in &problems {
        eprintln!("{}: {}", file.display(), problem);
    }
    out.event(
        "invalid",
        format!("{}: {} problem(s)", file.display(), problems.len()),
        json!({"file": file, "problems": problems}),
    );
}

fn validate(file: &Path, out: &mut Output) -> ExitCode {
    let is_policy = file.extension().is_some_and(|e| e == "json");
    let result = if is_policy {
        std::fs::read(file)
            .map_err(|e| {
                let mut errors = meshcanary_policy::ConfigErrors::default();
                errors.push("", format!("cannot read {}: {}", file.display(), e));
                errors
            })
            .and_then(|bytes| Policy::from_json(&bytes).map(|_| ()))
    } else {
        RolloutSpec::load(file).map(|_| ())
    };
    match result {
        Ok(()) => {
            let kind = if is_policy { "policy" } else { "rollout spec" };
            out.event(
                "valid",
                format!("{}: valid {}", file.display(), kind),
                json!({"file": file}),
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            report_invalid(file, &errors, out);
            ExitCode::from(EXIT_INVALID)
        }
    }
}

async fn run(spec: &RolloutSpec, out: &mut Output) -> ExitCode {
    let started = std::time::Instant::now();
    let result = rollout::run(spec, &source(spec), &sink(spec), out, shutdown_signal()).await;
    match result {
        Ok(outcome) => {
            let code = outcome.exit_code();
            let message = match &outcome {
                Outcome::Promoted => "promoted: the canary takes 100 %".to_string(),
                Outcome::RolledBack(reason) => format!("rolled back: {}", reason),
                Outcome::Aborted => "aborted: the canary is at 0 %".to_string(),
            };
            out.event(
                "finished",
                format!("{} after {:.1} s", message, started.elapsed().as_secs_f64()),
                json!({"outcome": format!("{:?}", outcome), "exit_code": code, "seconds": started.elapsed().as_secs_f64()}),
            );
            ExitCode::from(code as u8)
        }
        Err(e) => {
            report_error(&e, out);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn report_error(e: &RunError, out: &mut Output) {
    eprintln!("meshcanary: {}", e);
    out.event("error", e.to_string(), json!({"error": e.to_string()}));
}

async fn status(spec: &RolloutSpec, out: &mut Output) -> ExitCode {
    match sink(spec).load().await {
        Ok(Some(record)) => {
            let steps = &spec.judge.steps;
            let aborted = sink(spec).abort_marked().await.unwrap_or(false);
            out.event(
                "status",
                format!(
                    "{}: phase {:?}{}{}, step {} of {}, canary at {} % (applied {} %, version {}); {}",
                    record.rollout.policy,
                    record.state.phase,
                    if aborted { " (abort requested)" } else { "" },
                    control_note(&record),
                    record.state.step + 1,
                    steps.len(),
                    record.state.current_weight(steps),
                    record.applied_weight,
                    record.generation,
                    record.state.reason
                ),
                json!({"record": record, "abort_requested": aborted, "paused": record.control.paused, "dry_run": spec.dry_run}),
            );
            ExitCode::SUCCESS
        }
        Ok(None) => {
            out.event("status", "not started".to_string(), json!({"record": null}));
            ExitCode::SUCCESS
        }
        Err(e) => {
            report_error(&RunError::Sink(e), out);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `status DIR`: one line (one JSON object) per spec in the folder, invalid ones with
/// their problems. Exit 0 when the folder could be read, whatever the rollouts' states;
/// 1 when it could not.
async fn status_dir(dir: &Path, out: &mut Output) -> ExitCode {
    let specs = match serve::read_folder(dir) {
        Ok(specs) => specs,
        Err(e) => {
            eprintln!("meshcanary: cannot read {}: {}", dir.display(), e);
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    if specs.is_empty() {
        out.event(
            "status",
            format!("{}: no rollout specs (*.yaml, *.yml)", dir.display()),
            json!({"dir": dir, "rollouts": 0}),
        );
    }
    for (file, loaded) in specs {
        let spec = match loaded {
            Ok(spec) => spec,
            Err(errors) => {
                let problems: Vec<String> = errors.iter().map(ToString::to_string).collect();
                out.event(
                    "status",
                    format!("{}: invalid: {}", file, problems.join("; ")),
                    json!({"file": file, "phase": "invalid", "problems": problems}),
                );
                continue;
            }
        };
        let sink = sink(&spec);
        match sink.load().await {
            Ok(Some(record)) => {
                let steps = &spec.judge.steps;
                let aborted = sink.abort_marked().await.unwrap_or(false);
                let weight = record.state.current_weight(steps);
                let verdict = last_verdict(&record.state);
                let age_s = rollout::now()
                    .as_millis()
                    .saturating_sub(u128::from(record.updated_unix_ms))
                    as f64
                    / 1000.0;
                let stale = record.rollout.revision != spec.revision;
                out.event(
                    "status",
                    format!(
                        "{}: phase {:?}{}{}{}, step {} of {}, canary at {} %; last verdict {}: {} ({:.0} s ago)",
                        file,
                        record.state.phase,
                        if aborted { " (abort requested)" } else { "" },
                        control_note(&record),
                        if stale { " (record of an earlier revision)" } else { "" },
                        record.state.step + 1,
                        steps.len(),
                        weight,
                        verdict,
                        record.state.reason,
                        age_s
                    ),
                    json!({
                        "file": file,
                        "phase": if record.control.paused.is_some() && !record.state.is_finished() { "paused" } else { phase_name(&record.state.phase) },
                        "step": record.state.step,
                        "steps": steps.len(),
                        "canary_weight": weight,
                        "last_verdict": verdict,
                        "reason": record.state.reason,
                        "updated_unix_ms": record.updated_unix_ms,
                        "abort_requested": aborted,
                        "paused": record.control.paused,
                        "dry_run": spec.dry_run,
                        "would_roll_back": record.control.would_roll_back,
                        "revision": spec.revision,
                        "record_revision": record.rollout.revision,
                    }),
                );
            }
            Ok(None) => out.event(
                "status",
                format!("{}: not started", file),
                json!({"file": file, "phase": "not_started"}),
            ),
            Err(e) => out.event(
                "status",
                format!("{}: cannot read its record: {}", file, e),
                json!({"file": file, "phase": "unknown", "error": e.to_string()}),
            ),
        }
    }
    ExitCode::SUCCESS
}

/// What the operator's commands and a dry run left in the record, for a status line:
/// ` (paused by "…" since …)`, ` (dry run: would have rolled back 3 times, last: …)`.
fn control_note(record: &meshcanary_controller::sink::Record) -> String {
    let mut note = String::new();
    if let Some(paused) = &record.control.paused {
        let ago = rollout::now()
            .as_millis()
            .saturating_sub(u128::from(paused.since_unix_ms)) as f64
            / 1000.0;
        note.push_str(&format!(
            " (Paused by {:?}, {:.0} s ago)",
            paused.request, ago
        ));
    }
    if let Some(w) = &record.control.would_roll_back {
        note.push_str(&format!(
            " (dry run: would have rolled back {} time(s), last at step {}: {})",
            w.count,
            w.step + 1,
            w.reason
        ));
    }
    note
}

/// The phase as one word, for `status DIR --output json`.
fn phase_name(phase: &meshcanary_controller::verdict::Phase) -> &'static str {
    use meshcanary_controller::verdict::Phase;
    match phase {
        Phase::Progressing => "progressing",
        Phase::Promoted => "promoted",
        Phase::RolledBack { .. } => "rolled_back",
        Phase::Aborted => "aborted",
    }
}

/// The kind of the last verdict, from the saved state: the record keeps the phase and
/// the last verdict's reason in words, and a promotion's reason says "step … passed".
fn last_verdict(state: &meshcanary_controller::verdict::State) -> &'static str {
    use meshcanary_controller::verdict::Phase;
    match &state.phase {
        Phase::Promoted => "complete",
        Phase::RolledBack { .. } => "rollback",
        Phase::Aborted => "aborted",
        Phase::Progressing if state.reason.is_empty() => "none",
        Phase::Progressing if state.reason.starts_with("would roll back") => "would_rollback",
        Phase::Progressing
            if state.reason.starts_with("step ") && state.reason.contains(" passed") =>
        {
            "promote"
        }
        Phase::Progressing => "hold",
    }
}

async fn abort(spec: &RolloutSpec, out: &mut Output) -> ExitCode {
    match rollout::abort(spec, &sink(spec), out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_error(&e, out);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `abort --rollout NAMESPACE/NAME`: the abort annotation on a Rollout, by a JSON merge
/// patch under the abort field manager.
async fn abort_rollout(rollout: &str, out: &mut Output) -> ExitCode {
    use meshcanary_controller::kubernetes::crd::Rollout;
    use meshcanary_controller::sink::kubernetes::{
        prepare_tls, ABORT_ANNOTATION, ABORT_FIELD_MANAGER,
    };
    let Some((namespace, name)) = rollout.split_once('/') else {
        eprintln!(
            "meshcanary: --rollout {:?}: expected NAMESPACE/NAME",
            rollout
        );
        return ExitCode::from(EXIT_INVALID);
    };
    prepare_tls();
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("meshcanary: no Kubernetes configuration: {}", e);
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let api: kube::Api<Rollout> = kube::Api::namespaced(client, namespace);
    let patch = json!({"metadata": {"annotations": {ABORT_ANNOTATION: "aborted by an operator (meshcanary abort)"}}});
    let params = kube::api::PatchParams {
        field_manager: Some(ABORT_FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    match api
        .patch(name, &params, &kube::api::Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            out.event(
                "abort",
                format!(
                    "Rollout {}/{} marked {}: the controller sends the canary to 0 % at its next tick",
                    namespace, name, ABORT_ANNOTATION
                ),
                json!({"rollout": rollout}),
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "meshcanary: cannot mark Rollout {}/{}: {}",
                namespace, name, e
            );
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn render(spec: &RolloutSpec, out: &mut Output) -> ExitCode {
    let sink = sink(spec);
    let record = match sink.load().await {
        Ok(Some(record)) => record,
        // What the first apply of a new rollout writes (generation 1).
        Ok(None) => meshcanary_controller::sink::Record {
            generation: 1,
            updated_unix_ms: 0,
            hooks: Default::default(),
            ..meshcanary_controller::sink::Record::new(rollout::rollout_id(spec), rollout::now())
        },
        Err(e) => {
            report_error(&RunError::Sink(e), out);
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let weight = record.state.current_weight(&spec.judge.steps);
    let rendered = rollout::policy_at(spec, weight)
        .map_err(|e| e.to_string())
        .and_then(|policy| sink.render(&policy, &record).map_err(|e| e.to_string()));
    match rendered {
        Ok(text) => {
            println!("{}", text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshcanary: {}", e);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `render --sink kubernetes`: offline and deterministic; exit 2 without a sink.kubernetes.
async fn render_kubernetes(spec: &RolloutSpec, _out: &mut Output) -> ExitCode {
    print_rendered(spec, render_manifest(spec), |e| {
        matches!(e, ManifestError::NotKubernetes(_))
    })
}

/// Prints rendered documents, or names the spec and what went wrong: exit 2 when the spec
/// or the flags cannot give the documents (`invalid`), 1 when rendering them failed.
fn print_rendered<E: std::fmt::Display>(
    spec: &RolloutSpec,
    rendered: Result<String, E>,
    invalid: fn(&E) -> bool,
) -> ExitCode {
    match rendered {
        Ok(text) => {
            print!("{}", text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshcanary: {}: {}", spec.file.display(), e);
            if invalid(&e) {
                ExitCode::from(EXIT_INVALID)
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
    }
}

/// `report EVENTS`: the page on standard output; exit 2 when the file cannot be read or
/// holds a malformed line or no events at all (named with its line number on stderr).
fn report(events: &Path) -> ExitCode {
    use std::io::{Read, Write};
    let text = if events == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map(|_| text)
            .map_err(|e| format!("cannot read standard input: {}", e))
    } else {
        std::fs::read_to_string(events)
            .map_err(|e| format!("cannot read {}: {}", events.display(), e))
    };
    let text = match text {
        Ok(text) => text,
        Err(e) => {
            eprintln!("meshcanary: {}", e);
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let runs = match meshcanary_controller::report::parse(&text) {
        Ok(runs) => runs,
        Err(e) => {
            eprintln!("meshcanary: {}: {}", events.display(), e);
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let page = meshcanary_controller::report::render(&runs, &events.display().to_string());
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(page.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshcanary: cannot write the report: {}", e);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `render --target`: offline and deterministic; exit 2 for a spec or flags that cannot
/// give the documents.
fn render_for_gateway(spec: &RolloutSpec, options: &GatewayOptions, _out: &mut Output) -> ExitCode {
    print_rendered(spec, render_gateway(spec, options), |e| {
        matches!(e, GatewayRenderError::Usage(_))
    })
}

/// Resolves on SIGINT or SIGTERM: the rollout saves its record and stops, resumable.
pub(crate) async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
