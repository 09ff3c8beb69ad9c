//! `meshcanary pause | resume | promote`: leave the operator's mark where the rollout is
//! kept, then wait for the running controller's acknowledgement in the rollout's record
//! (see `meshcanary_controller::control`).
//!
//! Exit 0 once confirmed (or at once with `--no-wait`); 1 when the controller refused
//! (a promote past a failing verdict without `--force`) or none confirmed in time — the
//! mark is then withdrawn, so a controller started later does not act on a command
//! reported as failed; 2 for an invalid spec or usage.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use meshcanary_controller::control::{Acknowledgement, Command, MarkKind};
use meshcanary_controller::output::Output;
use meshcanary_controller::sink::{AnySink, ConfigSink, Record};
use meshcanary_controller::spec::RolloutSpec;
use serde_json::json;

use crate::{report_invalid, Operator, EXIT_FAILURE, EXIT_INVALID};

/// How often the record is read while waiting.
const POLL: Duration = Duration::from_millis(200);

/// Where the command goes: a spec's sink, or a Rollout resource.
enum Target {
    Spec(Box<AnySink>),
    Rollout {
        api: Box<kube::Api<meshcanary_controller::kubernetes::crd::Rollout>>,
        namespace: String,
        name: String,
    },
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Spec(sink) => sink.describe(),
            Target::Rollout {
                namespace, name, ..
            } => format!("Rollout {}/{}", namespace, name),
        }
    }

    async fn set_mark(&self, kind: MarkKind, text: Option<&str>) -> Result<(), String> {
        match self {
            Target::Spec(sink) => sink
                .set_operator_mark(kind, text)
                .await
                .map_err(|e| e.to_string()),
            Target::Rollout { api, name, .. } => {
                use meshcanary_controller::sink::kubernetes::{
                    OPERATOR_FIELD_MANAGER, PAUSE_ANNOTATION, PROMOTE_ANNOTATION,
                };
                let annotation = match kind {
                    MarkKind::Pause => PAUSE_ANNOTATION,
                    MarkKind::Promote => PROMOTE_ANNOTATION,
                };
                let patch = json!({"metadata": {"annotations": {annotation: text}}});
                let params = kube::api::PatchParams {
                    field_manager: Some(OPERATOR_FIELD_MANAGER.to_string()),
                    ..Default::default()
                };
                api.patch(name, &params, &kube::api::Patch::Merge(&patch))
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("cannot mark {}: {}", self.describe(), e))
            }
        }
    }

    async fn record(&self) -> Result<Option<Record>, String> {
        match self {
            Target::Spec(sink) => sink.load().await.map_err(|e| e.to_string()),
            Target::Rollout { api, name, .. } => api
                .get(name)
                .await
                .map(|r| r.status.and_then(|s| s.record))
                .map_err(|e| format!("cannot read {}: {}", self.describe(), e)),
        }
    }
}

/// The mark's text: who asked, with what, and a name no other request has.
fn request_text(command: Command, force: bool) -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_string());
    let millis = meshcanary_controller::rollout::now().as_millis();
    format!(
        "{}{} via meshcanary {}, request {}-{}",
        if force { "force: " } else { "" },
        user,
        command.name(),
        millis,
        std::process::id()
    )
}

/// Runs `meshcanary pause|resume|promote`.
pub async fn command(
    command: Command,
    force: bool,
    operator: Operator,
    out: &mut Output,
) -> ExitCode {
    let timeout = match operator.timeout {
        None => None,
        Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            eprintln!(
                "meshcanary: --timeout {}: expected a positive number of seconds",
                s
            );
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let (target, interval) = match resolve(&operator, out).await {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let timeout = timeout.unwrap_or_else(|| default_timeout(interval));
    run(command, force, &target, timeout, operator.no_wait, out).await
}

/// The target and the rollout's interval.
async fn resolve(operator: &Operator, out: &mut Output) -> Result<(Target, Duration), ExitCode> {
    match (&operator.spec, &operator.rollout) {
        (_, Some(rollout)) => {
            let Some((namespace, name)) = rollout.split_once('/') else {
                eprintln!(
                    "meshcanary: --rollout {:?}: expected NAMESPACE/NAME",
                    rollout
                );
                return Err(ExitCode::from(EXIT_INVALID));
            };
            meshcanary_controller::sink::kubernetes::prepare_tls();
            let client = match kube::Client::try_default().await {
                Ok(client) => client,
                Err(e) => {
                    eprintln!("meshcanary: no Kubernetes configuration: {}", e);
                    return Err(ExitCode::from(EXIT_FAILURE));
                }
            };
            let api: kube::Api<meshcanary_controller::kubernetes::crd::Rollout> =
                kube::Api::namespaced(client, namespace);
            // The Rollout's own interval, for the default timeout.
            let interval = match api.get(name).await {
                Ok(r) => r
                    .spec
                    .interval
                    .as_ref()
                    .and_then(|v| meshcanary_controller::spec::parse_duration(v).ok())
                    .unwrap_or(Duration::from_secs(10)),
                Err(e) => {
                    eprintln!("meshcanary: cannot read Rollout {}: {}", rollout, e);
                    return Err(ExitCode::from(EXIT_FAILURE));
                }
            };
            Ok((
                Target::Rollout {
                    api: Box::new(api),
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                },
                interval,
            ))
        }
        (Some(file), None) => match load(file, out) {
            Ok(spec) => Ok((Target::Spec(Box::new(crate::sink(&spec))), spec.interval)),
            Err(code) => Err(code),
        },
        (None, None) => {
            eprintln!("meshcanary: a SPEC or --rollout NAMESPACE/NAME is needed");
            Err(ExitCode::from(EXIT_INVALID))
        }
    }
}

fn load(file: &Path, out: &mut Output) -> Result<RolloutSpec, ExitCode> {
    RolloutSpec::load(file).map_err(|errors| {
        report_invalid(file, &errors, out);
        ExitCode::from(EXIT_INVALID)
    })
}

/// Default wait: two intervals plus 10 s.
pub fn default_timeout(interval: Duration) -> Duration {
    interval * 2 + Duration::from_secs(10)
}

async fn run(
    command: Command,
    force: bool,
    target: &Target,
    timeout: Duration,
    no_wait: bool,
    out: &mut Output,
) -> ExitCode {
    let before = match target.record().await {
        Ok(record) => record,
        Err(e) => {
            eprintln!("meshcanary: {}", e);
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let request = request_text(command, force);
    let (kind, text) = match command {
        Command::Pause => (MarkKind::Pause, Some(request.as_str())),
        Command::Resume => (MarkKind::Pause, None),
        Command::Promote => (MarkKind::Promote, Some(request.as_str())),
    };
    if let Err(e) = target.set_mark(kind, text).await {
        eprintln!("meshcanary: {}", e);
        return ExitCode::from(EXIT_FAILURE);
    }
    let was_paused = before
        .as_ref()
        .and_then(|r| r.control.paused.as_ref())
        .map(|p| p.request.clone());
    if command == Command::Resume && was_paused.is_none() {
        out.event(
            "resume",
            format!(
                "{}: not paused (any pause mark is removed); nothing to confirm",
                target.describe()
            ),
            json!({"command": "resume", "confirmed": false, "paused": false}),
        );
        return ExitCode::SUCCESS;
    }
    if no_wait {
        out.event(
            command.name(),
            format!(
                "{}: {} requested ({:?}); not waiting for the controller (--no-wait)",
                target.describe(),
                command.name(),
                request
            ),
            json!({"command": command.name(), "request": request, "confirmed": false}),
        );
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    loop {
        let record = match target.record().await {
            Ok(record) => record,
            Err(e) => {
                eprintln!("meshcanary: {} (still waiting)", e);
                None
            }
        };
        if let Some(record) = &record {
            if let Some(code) = confirmed(command, &request, record, started, target, out) {
                return code;
            }
        }
        if started.elapsed() >= timeout {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    // Nobody confirmed: withdraw the mark, so that a controller started later does not
    // act on a command reported as failed (a pause is put back as it was).
    let withdrawn = match command {
        Command::Pause => {
            target
                .set_mark(MarkKind::Pause, was_paused.as_deref())
                .await
        }
        Command::Resume => Ok(()),
        Command::Promote => target.set_mark(MarkKind::Promote, None).await,
    };
    let withdrawn = match (command, withdrawn) {
        (Command::Resume, _) => "the pause mark stays removed".to_string(),
        (_, Ok(())) => "the request is withdrawn".to_string(),
        (_, Err(e)) => format!("the request could not be withdrawn: {}", e),
    };
    let message = format!(
        "no controller confirmed `{}` on {} within {:.0} s (is `meshcanary run` or `serve` driving it?); {}",
        command.name(),
        target.describe(),
        timeout.as_secs_f64(),
        withdrawn
    );
    eprintln!("meshcanary: {}", message);
    out.event(
        "error",
        message.clone(),
        json!({"command": command.name(), "request": request, "confirmed": false, "error": message}),
    );
    ExitCode::from(EXIT_FAILURE)
}

/// `Some(exit code)` once the record holds the controller's answer to this request.
fn confirmed(
    command: Command,
    request: &str,
    record: &Record,
    started: Instant,
    target: &Target,
    out: &mut Output,
) -> Option<ExitCode> {
    let ack: Option<&Acknowledgement> = match command {
        Command::Pause | Command::Promote => record
            .control
            .commands
            .iter()
            .rev()
            .find(|a| a.command == command && a.request == request),
        Command::Resume => {
            if record.control.paused.is_some() {
                return None;
            }
            record
                .control
                .commands
                .iter()
                .rev()
                .find(|a| a.command == Command::Resume)
        }
    };
    let ack = ack?;
    let seconds = started.elapsed().as_secs_f64();
    let data = json!({
        "command": command.name(),
        "request": request,
        "confirmed": true,
        "accepted": ack.accepted,
        "forced": ack.forced,
        "detail": ack.detail,
        "step": ack.step,
        "seconds": seconds,
    });
    if ack.accepted {
        out.event(
            command.name(),
            format!(
                "{}: {} confirmed by the controller in {:.1} s at step {}{}: {}",
                target.describe(),
                command.name(),
                seconds,
                ack.step + 1,
                if ack.forced { " (forced)" } else { "" },
                ack.detail
            ),
            data,
        );
        Some(ExitCode::SUCCESS)
    } else {
        let message = format!(
            "{}: {} refused by the controller at step {}: {}",
            target.describe(),
            command.name(),
            ack.step + 1,
            ack.detail
        );
        eprintln!("meshcanary: {}", message);
        out.event("error", message, data);
        Some(ExitCode::from(EXIT_FAILURE))
    }
}
