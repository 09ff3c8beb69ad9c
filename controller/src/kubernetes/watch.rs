//! The watch of every `Rollout` (in one namespace, or in all), feeding the scheduler of
//! many rollouts ([`crate::fleet::Fleet`]).
//!
//! kube's `watcher` does the list + watch: it resumes a watch that ends from the last
//! `resourceVersion`, relists after `410 Gone` (an expired `resourceVersion`), and backs
//! off on errors. A relist is level-triggered here: every Rollout listed is applied again
//! (the same revision is a no-op for the fleet), and one the relist no longer has is
//! removed. A Rollout is driven under the key `namespace/name`:
//!
//! - a valid spec is [`Fleet::apply`]d: a new revision (a new `.spec` generation, or a
//!   changed policy in `policy_from`'s ConfigMap) is a new release;
//! - an invalid spec is [`Fleet::invalid`]: its status says `Invalid` with every problem
//!   and its path, and a Warning Event `InvalidSpec` is published once per distinct set
//!   of problems;
//! - a deleted Rollout is [`Fleet::remove`]d; its EnvoyFilter goes with it (owner
//!   reference, garbage collection by the API server).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as K8sEvent, EventType, Recorder};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde_json::Value;

use super::lease::Leader;
use super::rollout_sink::{api_error, now_rfc3339, RolloutHandle, RolloutSink, REQUEST_TIMEOUT};
use super::status::{self, RolloutStatus};
use crate::fleet::{Activity, Fleet};
use crate::spec::document::Rollout;
use crate::spec::{RolloutOrigin, RolloutSpec};

/// What every Rollout's sink is made with; the launcher asks it for a spec's sink.
#[derive(Clone)]
pub struct RolloutSinks {
    client: Client,
    leader: Leader,
    recorder: Recorder,
    handles: Arc<Mutex<HashMap<String, Arc<RolloutHandle>>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl RolloutSinks {
    /// Sinks that write with `client` while `leader` holds, publishing Events with
    /// `recorder`.
    pub fn new(client: Client, leader: Leader, recorder: Recorder) -> RolloutSinks {
        RolloutSinks {
            client,
            leader,
            recorder,
            handles: Arc::default(),
        }
    }

    /// The sink of a spec read from a Rollout ([`RolloutSpec::file`] is its
    /// `namespace/name`); `None` when that Rollout is no longer known.
    pub fn sink_for(&self, spec: &RolloutSpec) -> Option<RolloutSink> {
        let key = spec.file.display().to_string();
        let handle = lock(&self.handles).get(&key).cloned()?;
        RolloutSink::new(
            self.client.clone(),
            handle,
            spec.clone(),
            self.leader.clone(),
            self.recorder.clone(),
        )
    }

    /// The leadership every write checks.
    pub fn leader(&self) -> &Leader {
        &self.leader
    }
}

/// Feeds a fleet from the watch of Rollouts.
pub struct RolloutWatch {
    sinks: RolloutSinks,
    namespace: Option<String>,
    /// The problems last reported per key (an Event once per distinct set).
    reported_invalid: HashMap<String, String>,
    /// Keys seen since the current (re)list began.
    relisted: Option<BTreeSet<String>>,
    /// Per key, the (uid, generation) whose spec was last read: a change of status or
    /// annotations alone (the controller's own status writes come back as MODIFIED) is
    /// not read again, except on a relist, which rereads everything (and with it any
    /// `policy_from` ConfigMap).
    processed: HashMap<String, (String, i64)>,
}

impl RolloutWatch {
    /// Watches Rollouts in `namespace` (all namespaces when `None`).
    pub fn new(sinks: RolloutSinks, namespace: Option<String>) -> RolloutWatch {
        RolloutWatch {
            sinks,
            namespace,
            reported_invalid: HashMap::new(),
            relisted: None,
            processed: HashMap::new(),
        }
    }

    fn api(&self) -> Api<Rollout> {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.sinks.client.clone(), ns),
            None => Api::all(self.sinks.client.clone()),
        }
    }

    /// Runs until `stop` resolves or leadership is lost (then the reason is returned).
    pub async fn run(
        &mut self,
        fleet: &mut Fleet,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), String> {
        let stream = watcher::watcher(self.api(), watcher::Config::default()).default_backoff();
        tokio::pin!(stream);
        tokio::pin!(stop);
        let mut leader_check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = leader_check.tick() => {
                    if let Some(why) = self.sinks.leader.lost() {
                        return Err(format!("lost the controller's leadership: {}", why));
                    }
                }
                event = stream.next() => match event {
                    None => return Err("the watch of Rollouts ended".to_string()),
                    Some(Err(e)) => tracing::warn!("watching Rollouts: {} (retrying)", e),
                    Some(Ok(event)) => self.handle(fleet, event).await,
                },
            }
        }
    }

    /// One watch event.
    pub async fn handle(&mut self, fleet: &mut Fleet, event: Event<Rollout>) {
        match event {
            Event::Init => self.relisted = Some(BTreeSet::new()),
            Event::InitApply(rollout) => {
                if let (Some(seen), Some(key)) = (self.relisted.as_mut(), key_of(&rollout)) {
                    seen.insert(key);
                }
                self.observe(fleet, rollout).await;
            }
            Event::InitDone => {
                if let Some(seen) = self.relisted.take() {
                    let known: Vec<String> = lock(&self.sinks.handles).keys().cloned().collect();
                    for key in known.into_iter().filter(|k| !seen.contains(k)) {
                        self.forget(fleet, &key);
                    }
                }
            }
            Event::Apply(rollout) => self.observe(fleet, rollout).await,
            Event::Delete(rollout) => {
                if let Some(key) = key_of(&rollout) {
                    self.forget(fleet, &key);
                }
            }
        }
    }

    fn forget(&mut self, fleet: &mut Fleet, key: &str) {
        fleet.remove(key);
        lock(&self.sinks.handles).remove(key);
        self.reported_invalid.remove(key);
        self.processed.remove(key);
    }

    async fn observe(&mut self, fleet: &mut Fleet, rollout: Rollout) {
        let Some(key) = key_of(&rollout) else { return };
        if rollout.metadata.deletion_timestamp.is_some() {
            self.forget(fleet, &key);
            return;
        }
        let namespace = rollout.metadata.namespace.clone().unwrap_or_default();
        let name = rollout.metadata.name.clone().unwrap_or_default();
        let uid = rollout.metadata.uid.clone().unwrap_or_default();
        let handle = {
            let mut handles = lock(&self.sinks.handles);
            let current = handles.get(&key).filter(|h| h.uid == uid).cloned();
            match current {
                Some(h) => h,
                None => {
                    // New, or deleted and created again under the same name.
                    let h = Arc::new(RolloutHandle::new(&namespace, &name, &uid));
                    handles.insert(key.clone(), Arc::clone(&h));
                    h
                }
            }
        };
        handle.observe(&rollout);
        let seen = (uid.clone(), handle.generation());
        let relisting = self.relisted.is_some();
        if !relisting && self.processed.get(&key) == Some(&seen) {
            return;
        }
        self.processed.insert(key.clone(), seen);
        let referenced_policy = match &rollout.spec.policy_from {
            Some(from) => Some(self.referenced_policy(&namespace, from).await),
            None => None,
        };
        let origin = RolloutOrigin {
            namespace,
            name,
            referenced_policy,
        };
        let document = serde_json::to_value(&rollout.spec).unwrap_or(Value::Null);
        match RolloutSpec::from_rollout(&document, &origin) {
            Ok(spec) => {
                self.reported_invalid.remove(&key);
                handle.set_problems(Vec::new());
                fleet.apply(&key, spec);
            }
            Err(problems) => {
                fleet.invalid(&key, &problems);
                let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
                handle.set_problems(lines.clone());
                // An earlier valid revision still driven writes the problems into its
                // own status; an `Invalid` phase would say nothing is driven.
                let driven = fleet
                    .snapshot()
                    .iter()
                    .any(|v| v.key == key && v.activity == Activity::Running);
                self.report_invalid(&rollout, &handle, &lines, !driven)
                    .await;
            }
        }
    }

    /// The text of `policy_from`'s ConfigMap key, or why it cannot be had.
    async fn referenced_policy(
        &self,
        namespace: &str,
        from: &crate::spec::document::PolicySource,
    ) -> Result<String, String> {
        let Some(key_ref) = &from.config_map_key_ref else {
            return Err("config_map_key_ref: required field is missing".to_string());
        };
        let (Some(name), Some(key)) = (&key_ref.name, &key_ref.key) else {
            return Err("config_map_key_ref needs name and key".to_string());
        };
        let api: Api<ConfigMap> = Api::namespaced(self.sinks.client.clone(), namespace);
        let request = format!("GET configmaps {}/{}", namespace, name);
        let got = match tokio::time::timeout(REQUEST_TIMEOUT, api.get_opt(name)).await {
            Ok(Ok(got)) => got,
            Ok(Err(e)) => return Err(api_error(request, e).to_string()),
            Err(_) => {
                return Err(format!(
                    "{}: no answer within {:?}",
                    request, REQUEST_TIMEOUT
                ))
            }
        };
        let Some(config_map) = got else {
            return Err(format!("ConfigMap {}/{} does not exist", namespace, name));
        };
        config_map
            .data
            .and_then(|mut data| data.remove(key))
            .ok_or_else(|| format!("ConfigMap {}/{} has no key {:?}", namespace, name, key))
    }

    /// Writes the `Invalid` status (when it changed, and `write_status`) and, once per
    /// distinct set of problems, a Warning Event.
    async fn report_invalid(
        &mut self,
        rollout: &Rollout,
        handle: &RolloutHandle,
        lines: &[String],
        write_status: bool,
    ) {
        if self.sinks.leader.lost().is_some() {
            return;
        }
        let previous = rollout.status.clone().unwrap_or_default();
        let generation = handle.generation();
        let unchanged = !write_status
            || previous.phase.as_deref() == Some("Invalid")
                && previous.problems == lines
                && previous.observed_generation == Some(generation);
        if !unchanged {
            let next: RolloutStatus = status::invalid(&previous, lines, generation, &now_rfc3339());
            let api: Api<Rollout> = Api::namespaced(self.sinks.client.clone(), &handle.namespace);
            let patch = status::merge_patch(&next);
            let written = tokio::time::timeout(
                REQUEST_TIMEOUT,
                api.patch_status(&handle.name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await;
            match written {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(
                    "cannot write the status of Rollout {}: {}",
                    handle.key(),
                    api_error(
                        format!("PATCH rollouts.meshcanary.io {}/status", handle.key()),
                        e
                    )
                ),
                Err(_) => tracing::warn!(
                    "cannot write the status of Rollout {}: no answer",
                    handle.key()
                ),
            }
        }
        let text = lines.join("; ");
        if self.reported_invalid.get(&handle.key()) == Some(&text) {
            return;
        }
        self.reported_invalid.insert(handle.key(), text.clone());
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("meshcanary.io/v1alpha1".to_string()),
            kind: Some("Rollout".to_string()),
            name: Some(handle.name.clone()),
            namespace: Some(handle.namespace.clone()),
            uid: Some(handle.uid.clone()),
            ..Default::default()
        };
        let event = K8sEvent {
            type_: EventType::Warning,
            reason: "InvalidSpec".to_string(),
            note: Some(
                format!("{} problem(s): {}", lines.len(), text)
                    .chars()
                    .take(1000)
                    .collect(),
            ),
            action: "Validate".to_string(),
            secondary: None,
        };
        let published = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.sinks.recorder.publish(&event, &reference),
        )
        .await;
        if !matches!(published, Ok(Ok(()))) {
            tracing::warn!(
                "cannot publish the InvalidSpec Event of Rollout {}",
                handle.key()
            );
        }
    }
}

/// `namespace/name` of a Rollout.
pub fn key_of(rollout: &Rollout) -> Option<String> {
    Some(format!(
        "{}/{}",
        rollout.metadata.namespace.as_deref()?,
        rollout.metadata.name.as_deref()?
    ))
}
