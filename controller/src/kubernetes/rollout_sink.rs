//! The sink of a `Rollout` resource: the one-rollout driver ([`crate::rollout::run`])
//! drives a Rollout through it, unchanged.
//!
//! - `apply`: the EnvoyFilter (named by `sink.kubernetes.name`, default the Rollout's
//!   name, in the Rollout's namespace) by server-side apply under field manager
//!   [`FIELD_MANAGER`], forced, with an `ownerReference` to the Rollout (deleting the
//!   Rollout deletes it); then the status, and an Event with the numbers;
//! - `save` / `load`: the record in the Rollout's `status` (a JSON merge patch on the
//!   `status` subresource, never an update of the whole object), with the status fields
//!   and conditions of [`super::status`];
//! - the abort mark: the annotation [`ABORT_ANNOTATION`] on the Rollout
//!   (`kubectl annotate rollout NAME meshcanary.io/abort=yes`). The watcher keeps the
//!   flag current, so a tick costs no request; once marked, the sink sends the canary
//!   to 0 % itself (once) before it says so, and refuses any weight above 0;
//! - the pause and promote marks: the annotations [`PAUSE_ANNOTATION`] (a state:
//!   present while paused) and [`PROMOTE_ANNOTATION`] (a request, removed by the
//!   controller once read), kept current by the watcher like the abort flag; `meshcanary
//!   pause|resume|promote --rollout NS/NAME` writes them by a JSON merge patch under
//!   [`OPERATOR_FIELD_MANAGER`], and the acknowledgement lands in the status's record;
//! - the claim: the controller-wide leadership ([`super::lease`]); every write checks it.
//!
//! Events are `events.k8s.io/v1` Events regarding the Rollout (kube's `Recorder`):
//! `StepApplied` for each applied step, `Promoted`, `RolledBack` and `Aborted` (the last
//! two as warnings), each with the weight and the verdict's numbers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::Client;
use serde_json::{json, Value};

use super::lease::Leader;
use super::status::{self, RolloutStatus};
use crate::control::{MarkKind, Marks};
use crate::sink::kubernetes::{
    annotation_is, envoy_filter_resource, envoy_filter_spec, to_yaml, ABORT_ANNOTATION,
    ABORT_FIELD_MANAGER, FIELD_MANAGER, MANAGED_BY, OPERATOR_FIELD_MANAGER, PAUSE_ANNOTATION,
    PHASE_ANNOTATION, PROMOTE_ANNOTATION, STEP_ANNOTATION, WEIGHT_ANNOTATION,
};
use crate::sink::{ConfigSink, Record, SinkError};
use crate::spec::document::Rollout;
use crate::spec::{KubernetesSpec, RolloutSpec, SinkSpec};
use crate::verdict::Phase;

/// What the watcher knows of one Rollout, shared with the sink that drives it.
#[derive(Debug)]
pub struct RolloutHandle {
    /// The Rollout's namespace.
    pub namespace: String,
    /// The Rollout's name.
    pub name: String,
    /// The Rollout's `metadata.uid` (the EnvoyFilter's owner).
    pub uid: String,
    generation: AtomicI64,
    abort: AtomicBool,
    /// The pause and promote annotations' values as last seen.
    marks: Mutex<(Option<String>, Option<String>)>,
    /// The problems of the Rollout's current spec while an earlier valid revision is
    /// still driven (kept in the status the driver writes).
    problems: Mutex<Vec<String>>,
}

impl RolloutHandle {
    /// A handle for the Rollout `namespace/name` with `uid`.
    pub fn new(namespace: &str, name: &str, uid: &str) -> RolloutHandle {
        RolloutHandle {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: uid.to_string(),
            generation: AtomicI64::new(0),
            abort: AtomicBool::new(false),
            marks: Mutex::new((None, None)),
            problems: Mutex::new(Vec::new()),
        }
    }

    /// Follows the Rollout as last seen: its generation and abort annotation.
    pub fn observe(&self, rollout: &Rollout) {
        self.generation
            .store(rollout.metadata.generation.unwrap_or(0), Ordering::SeqCst);
        let annotations = rollout.metadata.annotations.as_ref();
        let marked = annotations.is_some_and(|a| a.contains_key(ABORT_ANNOTATION));
        self.abort.store(marked, Ordering::SeqCst);
        let value = |key: &str| annotations.and_then(|a| a.get(key)).cloned();
        *lock(&self.marks) = (value(PAUSE_ANNOTATION), value(PROMOTE_ANNOTATION));
    }

    /// The pause and promote annotations' values as last seen.
    pub fn marks(&self) -> (Option<String>, Option<String>) {
        lock(&self.marks).clone()
    }

    /// The spec generation last seen.
    pub fn generation(&self) -> i64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Whether the abort annotation is on the Rollout.
    pub fn abort_marked(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }

    /// Sets (or, with an empty list, clears) the current spec's problems.
    pub fn set_problems(&self, problems: Vec<String>) {
        *lock(&self.problems) = problems;
    }

    /// The current spec's problems (empty when it is valid).
    pub fn problems(&self) -> Vec<String> {
        lock(&self.problems).clone()
    }

    /// `namespace/name`: the key the controller drives it under.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The time as the API server writes it (RFC 3339, seconds).
pub fn now_rfc3339() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// How long one API request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The sink of one Rollout.
pub struct RolloutSink {
    client: Client,
    handle: Arc<RolloutHandle>,
    spec: RolloutSpec,
    envoy: KubernetesSpec,
    leader: Leader,
    recorder: Recorder,
    timeout: Duration,
    /// The status as last written or read: its conditions' times carry over.
    last_status: Mutex<RolloutStatus>,
    /// Whether this sink already sent the canary to 0 % for the abort mark.
    abort_applied: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl RolloutSink {
    /// The sink of `spec` (read from the Rollout of `handle`); `None` when the spec's
    /// sink is not an EnvoyFilter (a Rollout's always is).
    pub fn new(
        client: Client,
        handle: Arc<RolloutHandle>,
        spec: RolloutSpec,
        leader: Leader,
        recorder: Recorder,
    ) -> Option<RolloutSink> {
        let envoy = match &spec.sink {
            SinkSpec::Kubernetes(k) => k.clone(),
            SinkSpec::EcdsFile(_) => return None,
        };
        Some(RolloutSink {
            client,
            handle,
            spec,
            envoy,
            leader,
            recorder,
            timeout: REQUEST_TIMEOUT,
            last_status: Mutex::new(RolloutStatus::default()),
            abort_applied: AtomicBool::new(false),
        })
    }

    /// Another request timeout (tests).
    pub fn with_timeout(mut self, timeout: Duration) -> RolloutSink {
        self.timeout = timeout;
        self
    }

    fn rollouts(&self) -> Api<Rollout> {
        Api::namespaced(self.client.clone(), &self.handle.namespace)
    }

    fn rollout_request(&self, method: &str, subresource: &str) -> String {
        format!(
            "{} rollouts.meshcanary.io {}/{}{}",
            method, self.handle.namespace, self.handle.name, subresource
        )
    }

    /// The EnvoyFilter an apply of `policy` with `record` sends.
    pub fn envoy_filter(&self, policy: &Value, record: &Record) -> DynamicObject {
        let mut object = DynamicObject::new(&self.envoy.name, &envoy_filter_resource())
            .within(&self.envoy.namespace)
            .data(json!({ "spec": envoy_filter_spec(&self.envoy, policy) }));
        object.metadata.labels = Some(BTreeMap::from([(
            MANAGED_BY.0.to_string(),
            MANAGED_BY.1.to_string(),
        )]));
        // At a glance only: the record lives in the Rollout's status.
        object.metadata.annotations = Some(BTreeMap::from([
            (
                STEP_ANNOTATION.to_string(),
                format!("{}/{}", record.state.step + 1, self.spec.judge.steps.len()),
            ),
            (
                WEIGHT_ANNOTATION.to_string(),
                record.applied_weight.to_string(),
            ),
            (
                PHASE_ANNOTATION.to_string(),
                status::phase_name(&record.state.phase).to_string(),
            ),
        ]));
        object.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "meshcanary.io/v1alpha1".to_string(),
            kind: "Rollout".to_string(),
            name: self.handle.name.clone(),
            uid: self.handle.uid.clone(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        object
    }

    fn check_leader(&self) -> Result<(), SinkError> {
        match self.leader.lost() {
            Some(why) => Err(SinkError::Busy(format!(
                "this controller is no longer the leader ({}); refusing to write",
                why
            ))),
            None => Ok(()),
        }
    }

    async fn timed<T>(
        &self,
        request: String,
        call: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, SinkError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(api_error(request, e)),
            Err(_) => Err(SinkError::Api {
                request,
                reason: format!(
                    "the Kubernetes API server did not answer within {} ms",
                    self.timeout.as_millis()
                ),
            }),
        }
    }

    /// Writes the status for `record` through the `status` subresource.
    async fn write_status(&self, record: &Record) -> Result<(), SinkError> {
        let mut record = record.clone();
        if self.handle.abort_marked() {
            // A tick in flight when the mark arrived must not write the rollout back
            // to Progressing.
            record.state.abort();
        }
        let next = {
            let previous = lock(&self.last_status);
            let mut next = status::from_record(
                &previous,
                &self.spec.judge.steps,
                &record,
                self.handle.generation(),
                &now_rfc3339(),
            );
            // A newer spec is invalid while this revision goes on: say so.
            next.problems = self.handle.problems();
            next
        };
        let patch = status::merge_patch(&next);
        self.timed(
            self.rollout_request("PATCH", "/status"),
            self.rollouts().patch_status(
                &self.handle.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ),
        )
        .await?;
        *lock(&self.last_status) = next;
        Ok(())
    }

    /// Publishes an Event regarding the Rollout; a failure is logged, never fatal (an
    /// Event is a report, not state).
    async fn event(&self, warning: bool, reason: &str, note: String) {
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("meshcanary.io/v1alpha1".to_string()),
            kind: Some("Rollout".to_string()),
            name: Some(self.handle.name.clone()),
            namespace: Some(self.handle.namespace.clone()),
            uid: Some(self.handle.uid.clone()),
            ..Default::default()
        };
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: Some(truncate(&note, 1000)),
            action: "Rollout".to_string(),
            secondary: None,
        };
        let published =
            tokio::time::timeout(self.timeout, self.recorder.publish(&event, &reference)).await;
        match published {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                "cannot publish Event {} for Rollout {}: {}",
                reason,
                self.handle.key(),
                e
            ),
            Err(_) => tracing::warn!(
                "cannot publish Event {} for Rollout {}: no answer within {} ms",
                reason,
                self.handle.key(),
                self.timeout.as_millis()
            ),
        }
    }

    /// Sends the canary to 0 % for the operator's abort (once per sink).
    async fn apply_abort(&self) -> Result<(), SinkError> {
        if self.abort_applied.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut record = match self.load().await? {
            Some(record) => record,
            None => Record::new(
                self.spec.id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default(),
            ),
        };
        record.state.abort();
        record.applied_weight = 0;
        record.generation += 1;
        let policy = self.spec.policy_at(0).map_err(|e| SinkError::Api {
            request: "render".to_string(),
            reason: e,
        })?;
        let applied = self.apply_envoy_filter(&policy, &record).await;
        if let Err(e) = applied {
            self.abort_applied.store(false, Ordering::SeqCst);
            return Err(e);
        }
        self.write_status(&record).await?;
        self.event(
            true,
            "Aborted",
            format!(
                "aborted by an operator ({} annotation) at step {} of {}: canary at 0 %",
                ABORT_ANNOTATION,
                record.state.step + 1,
                self.spec.judge.steps.len()
            ),
        )
        .await;
        Ok(())
    }

    /// A JSON merge patch of one annotation of the Rollout (`null` removes it) under
    /// `field_manager`: how operators' marks are written, apart from the spec.
    async fn patch_annotation(
        &self,
        annotation: &str,
        value: Value,
        field_manager: &str,
    ) -> Result<(), SinkError> {
        let patch = json!({"metadata": {"annotations": {annotation: value}}});
        let params = PatchParams {
            field_manager: Some(field_manager.to_string()),
            ..PatchParams::default()
        };
        self.timed(
            self.rollout_request("PATCH", ""),
            self.rollouts()
                .patch(&self.handle.name, &params, &Patch::Merge(&patch)),
        )
        .await?;
        Ok(())
    }

    async fn apply_envoy_filter(&self, policy: &Value, record: &Record) -> Result<(), SinkError> {
        self.check_leader()?;
        let object = self.envoy_filter(policy, record);
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.envoy.namespace,
            &envoy_filter_resource(),
        );
        let request = format!(
            "PATCH envoyfilters.networking.istio.io {}/{}",
            self.envoy.namespace, self.envoy.name
        );
        self.timed(
            request,
            api.patch(
                &self.envoy.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&object),
            ),
        )
        .await?;
        Ok(())
    }
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// An API error, in words that say what to do.
pub fn api_error(request: String, error: kube::Error) -> SinkError {
    match error {
        kube::Error::Api(status) => {
            let server = if status.message.is_empty() {
                status.reason.clone()
            } else {
                status.message.clone()
            };
            match status.code {
                409 => SinkError::Busy(format!("{}: conflict: {}", request, server)),
                403 => SinkError::Api {
                    request,
                    reason: format!(
                        "forbidden: the controller's ClusterRole must allow this (see manifests/istio/controller/rbac.yaml) (API server: {})",
                        server
                    ),
                },
                404 => SinkError::Api {
                    request,
                    reason: format!("not found (API server: {})", server),
                },
                code => SinkError::Api {
                    request,
                    reason: format!("HTTP {} {}: {}", code, status.reason, server),
                },
            }
        }
        other => SinkError::Api {
            request,
            reason: format!("cannot reach the Kubernetes API server: {}", other),
        },
    }
}

/// The leadership held while the sink is used.
pub struct LeaderClaim;

impl ConfigSink for RolloutSink {
    type Claim = LeaderClaim;

    async fn claim(&self) -> Result<LeaderClaim, SinkError> {
        self.check_leader()?;
        Ok(LeaderClaim)
    }

    async fn load(&self) -> Result<Option<Record>, SinkError> {
        let rollout = self
            .timed(
                self.rollout_request("GET", ""),
                self.rollouts().get_opt(&self.handle.name),
            )
            .await?;
        let Some(rollout) = rollout else {
            return Ok(None);
        };
        self.handle.observe(&rollout);
        let status = rollout.status.unwrap_or_default();
        let record = status.record.clone();
        *lock(&self.last_status) = status;
        Ok(record)
    }

    async fn apply(&self, policy: &Value, record: &Record) -> Result<(), SinkError> {
        let weight = record.applied_weight;
        if self.handle.abort_marked() && weight > 0 {
            if record.state.phase == Phase::Progressing {
                // The driver holds and sees the mark at its next tick.
                return Err(SinkError::Busy(format!(
                    "Rollout {} is aborted ({} annotation): the canary stays at 0 %",
                    self.handle.key(),
                    ABORT_ANNOTATION
                )));
            }
            // A final weight is retried until it lands: land the abort instead.
            return self.apply_abort().await;
        }
        self.apply_envoy_filter(policy, record).await?;
        self.write_status(record).await?;
        let steps = &self.spec.judge.steps;
        let state = &record.state;
        let numbers = format!(
            "canary {} requests, {} errors; baseline {} requests, {} errors; error Λ {:.2}",
            state.canary.requests,
            state.canary.errors,
            state.baseline.requests,
            state.baseline.errors,
            state.errors.llr
        );
        let (warning, reason, note) = match &state.phase {
            Phase::Progressing => (
                false,
                "StepApplied",
                format!(
                    "canary at {} % (step {} of {}, policy version {}); {}",
                    weight,
                    state.step + 1,
                    steps.len(),
                    record.generation,
                    state.reason
                ),
            ),
            Phase::Promoted => (
                false,
                "Promoted",
                format!("canary at {} %: {}; {}", weight, state.reason, numbers),
            ),
            Phase::RolledBack { reason } => (
                true,
                "RolledBack",
                format!(
                    "canary at {} % after step {} of {} ({}): {}; {}",
                    weight,
                    state.step + 1,
                    steps.len(),
                    status::rollback_reason(reason),
                    state.reason,
                    numbers
                ),
            ),
            Phase::Aborted => (
                true,
                "Aborted",
                format!("canary at {} %: aborted by an operator", weight),
            ),
        };
        self.event(warning, reason, note).await;
        Ok(())
    }

    /// The EnvoyFilter exists and carries the record's weight (istiod brings restarted
    /// sidecars up to date by itself; what can be lost is the object, deleted or
    /// overwritten by someone else).
    async fn is_live(&self, record: &Record) -> Result<bool, SinkError> {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.envoy.namespace,
            &envoy_filter_resource(),
        );
        let request = format!(
            "GET envoyfilters.networking.istio.io {}/{}",
            self.envoy.namespace, self.envoy.name
        );
        let object = self.timed(request, api.get_opt(&self.envoy.name)).await?;
        let weight = record.applied_weight.to_string();
        Ok(object.is_some_and(|o| annotation_is(&o, WEIGHT_ANNOTATION, &weight)))
    }

    async fn save(&self, record: &Record) -> Result<(), SinkError> {
        self.check_leader()?;
        self.write_status(record).await
    }

    async fn set_abort_mark(&self, on: bool) -> Result<(), SinkError> {
        if !on && !self.handle.abort_marked() {
            // Nothing to clear (the watch keeps the flag current): no request.
            return Ok(());
        }
        let value = if on {
            Value::String("aborted by an operator".to_string())
        } else {
            Value::Null
        };
        self.patch_annotation(ABORT_ANNOTATION, value, ABORT_FIELD_MANAGER)
            .await?;
        self.handle.abort.store(on, Ordering::SeqCst);
        Ok(())
    }

    async fn abort_marked(&self) -> Result<bool, SinkError> {
        if !self.handle.abort_marked() {
            return Ok(false);
        }
        self.apply_abort().await?;
        Ok(true)
    }

    /// The watcher keeps the marks current: no request (except the abort's own writes).
    async fn operator_marks(&self) -> Result<Marks, SinkError> {
        let abort = self.abort_marked().await?;
        let (pause, promote) = self.handle.marks();
        Ok(Marks {
            abort,
            pause,
            promote,
        })
    }

    async fn set_operator_mark(&self, kind: MarkKind, text: Option<&str>) -> Result<(), SinkError> {
        let annotation = match kind {
            MarkKind::Pause => PAUSE_ANNOTATION,
            MarkKind::Promote => PROMOTE_ANNOTATION,
        };
        let value = text.map_or(Value::Null, |t| Value::String(t.to_string()));
        self.patch_annotation(annotation, value, OPERATOR_FIELD_MANAGER)
            .await?;
        let mut marks = lock(&self.handle.marks);
        match kind {
            MarkKind::Pause => marks.0 = text.map(str::to_string),
            MarkKind::Promote => marks.1 = text.map(str::to_string),
        }
        Ok(())
    }

    fn render(&self, policy: &Value, record: &Record) -> Result<String, SinkError> {
        let object =
            serde_json::to_value(self.envoy_filter(policy, record)).map_err(|e| SinkError::Io {
                path: self.handle.key(),
                reason: e.to_string(),
            })?;
        to_yaml(&object).map_err(|e| SinkError::Io {
            path: self.handle.key(),
            reason: e,
        })
    }

    fn describe(&self) -> String {
        format!(
            "EnvoyFilter {}/{} owned by Rollout {} (server-side apply as {}; record in the Rollout's status)",
            self.envoy.namespace,
            self.envoy.name,
            self.handle.key(),
            FIELD_MANAGER
        )
    }
}
