//! CONTRACT tests of `serve --kubernetes` (the watch of Rollouts, each Rollout's sink,
//! the controller's Lease), not cluster tests: no API server can run here, so the
//! controller talks to a local HTTP server on 127.0.0.1 that answers as the Kubernetes
//! API server does — list and watch (a chunked stream of `{"type", "object"}` lines,
//! `resourceVersion`s, a watch `ERROR` event with a `410 Gone` Status), the `status`
//! subresource, server-side apply, JSON merge patches, Events, Leases with
//! `resourceVersion` preconditions — and each test asserts the exact exchange.
//! `tests/kubernetes_cluster.rs` holds what only a real cluster can show.
//!
//! The metrics come from an in-process source (a healthy or a broken canary), so the
//! rollouts run to their end in about a second each.

mod api_server;
mod stand_in;

use stand_in::SteadyCounters;

use api_server::Exchange;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kube::runtime::events::{Recorder, Reporter};
use meshcanary_controller::fleet::{Fleet, FleetOptions, Launcher, StopSignal};
use meshcanary_controller::kubernetes::lease;
use meshcanary_controller::kubernetes::watch::{RolloutSinks, RolloutWatch};
use meshcanary_controller::output::{Format, Output};
use meshcanary_controller::rollout::{self, RunError};
use meshcanary_controller::sink::kubernetes::Options;
use meshcanary_controller::sink::SinkError;
use meshcanary_controller::spec::RolloutSpec;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const NS: &str = "shop";
const ROLLOUTS: &str = "/apis/meshcanary.io/v1alpha1/namespaces/shop/rollouts";
const ENVOYFILTERS: &str = "/apis/networking.istio.io/v1alpha3/namespaces/shop/envoyfilters";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/meshcanary/leases";
const JSON: &str = "application/json";
const MERGE: &str = "application/merge-patch+json";
const APPLY: &str = "application/apply-patch+yaml";

// ---------------------------------------------------------------------------------------
// The fake API server.

impl Exchange {
    fn line(&self) -> String {
        format!("{} {} {}", self.method, self.path, self.content_type)
            .trim_end()
            .to_string()
    }
}

/// A canned answer, used once, for requests whose method and path match.
#[derive(Clone)]
enum Behavior {
    Respond(u16, String),
    Hang,
}

/// What the next watch request gets.
#[derive(Clone, Copy, Debug, PartialEq)]
enum WatchPlan {
    /// A stream of changes until the test ends it.
    Stream,
    /// One `ERROR` event with a `410 Gone` Status (the resourceVersion is too old).
    Gone,
}

#[derive(Default)]
struct World {
    /// Rollouts by `namespace/name`: the whole object.
    rollouts: BTreeMap<String, Value>,
    envoy_filters: BTreeMap<String, Value>,
    leases: BTreeMap<String, Value>,
    config_maps: BTreeMap<String, Value>,
    events: Vec<Value>,
    resource_version: u64,
    exchanges: Vec<Exchange>,
    overrides: Vec<(String, String, Behavior)>,
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
    watch_plans: VecDeque<WatchPlan>,
    /// The `resourceVersion` of each LIST answered.
    list_versions: Vec<String>,
    /// The `resourceVersion` of the last Rollout event a watch received.
    last_delivered: u64,
}

type Shared = Arc<Mutex<World>>;

fn lock(world: &Shared) -> MutexGuard<'_, World> {
    world.lock().unwrap_or_else(|e| e.into_inner())
}

fn status_body(code: u16, reason: &str, message: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
    .to_string()
}

/// A `NotFound` Status naming the object, as the API server writes it.
fn not_found(group: &str, plural: &str, name: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{}.{} \"{}\" not found", plural, group, name), "reason": "NotFound",
        "details": {"name": name, "group": group, "kind": plural}, "code": 404})
    .to_string()
}

fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn query_param<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

enum Answer {
    Full(u16, String),
    Watch(mpsc::UnboundedReceiver<Bytes>),
    Hang,
}

impl World {
    fn next_rv(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    fn broadcast(&mut self, kind: &str, object: &Value) {
        let line = format!("{}\n", json!({"type": kind, "object": object}));
        self.watchers
            .retain(|w| w.send(Bytes::from(line.clone())).is_ok());
        if !self.watchers.is_empty() {
            self.last_delivered = object["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }

    /// Creates or changes a Rollout's spec (a new generation when the spec differs).
    fn put_rollout(&mut self, name: &str, spec: Value, annotations: Value) {
        let key = format!("{}/{}", NS, name);
        let rv = self.next_rv();
        let (kind, object) = match self.rollouts.get(&key).cloned() {
            Some(mut object) => {
                if object["spec"] != spec {
                    let generation = object["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                    object["metadata"]["generation"] = json!(generation);
                }
                object["spec"] = spec;
                object["metadata"]["annotations"] = annotations;
                object["metadata"]["resourceVersion"] = json!(rv);
                ("MODIFIED", object)
            }
            None => (
                "ADDED",
                json!({
                    "apiVersion": "meshcanary.io/v1alpha1", "kind": "Rollout",
                    "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{}", name),
                        "generation": 1, "resourceVersion": rv, "annotations": annotations},
                    "spec": spec
                }),
            ),
        };
        self.rollouts.insert(key, object.clone());
        self.broadcast(kind, &object);
    }

    fn delete_rollout(&mut self, name: &str, tell_watchers: bool) {
        let key = format!("{}/{}", NS, name);
        if let Some(mut object) = self.rollouts.remove(&key) {
            object["metadata"]["resourceVersion"] = json!(self.next_rv());
            if tell_watchers {
                self.broadcast("DELETED", &object);
            }
        }
    }

    fn answer(&mut self, e: &Exchange) -> Answer {
        if let Some(i) = self
            .overrides
            .iter()
            .position(|(m, p, _)| *m == e.method && *p == e.path)
        {
            let (_, _, behavior) = self.overrides.remove(i);
            return match behavior {
                Behavior::Respond(code, body) => Answer::Full(code, body),
                Behavior::Hang => Answer::Hang,
            };
        }
        let path = e.path.as_str();
        if path == ROLLOUTS && e.method == "GET" {
            if query_param(&e.query, "watch") == Some("true") {
                let plan = self.watch_plans.pop_front().unwrap_or(WatchPlan::Stream);
                let (tx, rx) = mpsc::unbounded_channel();
                if plan == WatchPlan::Gone {
                    let gone = json!({"type": "ERROR", "object": serde_json::from_str::<Value>(
                        &status_body(410, "Expired", "too old resource version")).unwrap_or_default()});
                    let _ = tx.send(Bytes::from(format!("{}\n", gone)));
                    drop(tx);
                } else {
                    self.watchers.push(tx);
                }
                return Answer::Watch(rx);
            }
            let items: Vec<Value> = self.rollouts.values().cloned().collect();
            self.list_versions.push(self.resource_version.to_string());
            return Answer::Full(
                200,
                json!({"apiVersion": "meshcanary.io/v1alpha1", "kind": "RolloutList",
                    "metadata": {"resourceVersion": self.resource_version.to_string()}, "items": items})
                .to_string(),
            );
        }
        if let Some(rest) = path.strip_prefix(&format!("{}/", ROLLOUTS)) {
            let (name, status) = match rest.strip_suffix("/status") {
                Some(name) => (name, true),
                None => (rest, false),
            };
            let key = format!("{}/{}", NS, name);
            let Some(mut object) = self.rollouts.get(&key).cloned() else {
                return Answer::Full(404, not_found("meshcanary.io", "rollouts", name));
            };
            match (e.method.as_str(), status) {
                ("GET", false) => return Answer::Full(200, object.to_string()),
                ("PATCH", true) if e.content_type == MERGE => {
                    // The status subresource ignores everything but status.
                    let mut current = object["status"].take();
                    if current.is_null() {
                        current = json!({});
                    }
                    merge(&mut current, &e.body["status"]);
                    object["status"] = current;
                }
                ("PATCH", false) if e.content_type == MERGE => {
                    // The main resource ignores status.
                    let mut patch = e.body.clone();
                    if let Some(p) = patch.as_object_mut() {
                        p.remove("status");
                    }
                    merge(&mut object, &patch);
                }
                _ => {
                    return Answer::Full(
                        405,
                        status_body(405, "MethodNotAllowed", "not in this fake"),
                    )
                }
            }
            object["metadata"]["resourceVersion"] = json!(self.next_rv());
            self.rollouts.insert(key, object.clone());
            self.broadcast("MODIFIED", &object);
            return Answer::Full(200, object.to_string());
        }
        if let Some(name) = path.strip_prefix(&format!("{}/", ENVOYFILTERS)) {
            if e.method == "GET" {
                return match self.envoy_filters.get(name) {
                    Some(object) => Answer::Full(200, object.to_string()),
                    None => {
                        Answer::Full(404, not_found("networking.istio.io", "envoyfilters", name))
                    }
                };
            }
            if e.method == "PATCH"
                && e.content_type == APPLY
                && query_param(&e.query, "force") == Some("true")
            {
                let mut object = e.body.clone();
                object["metadata"]["resourceVersion"] = json!(self.next_rv());
                self.envoy_filters.insert(name.to_string(), object.clone());
                return Answer::Full(200, object.to_string());
            }
            return Answer::Full(
                405,
                status_body(405, "MethodNotAllowed", "not in this fake"),
            );
        }
        if path == EVENTS && e.method == "POST" {
            self.events.push(e.body.clone());
            return Answer::Full(201, e.body.to_string());
        }
        if let Some(rest) = path.strip_prefix("/api/v1/namespaces/shop/configmaps/") {
            return match self.config_maps.get(rest) {
                Some(cm) => Answer::Full(200, cm.to_string()),
                None => Answer::Full(404, not_found("", "configmaps", rest)),
            };
        }
        if path == LEASES && e.method == "POST" {
            let name = e.body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if self.leases.contains_key(&name) {
                return Answer::Full(409, status_body(409, "AlreadyExists", "already exists"));
            }
            let mut lease = e.body.clone();
            lease["metadata"]["resourceVersion"] = json!(self.next_rv());
            self.leases.insert(name, lease.clone());
            return Answer::Full(201, lease.to_string());
        }
        if let Some(name) = path.strip_prefix(&format!("{}/", LEASES)) {
            let current = self.leases.get(name).cloned();
            return match (e.method.as_str(), current) {
                ("GET", Some(lease)) => Answer::Full(200, lease.to_string()),
                ("GET", None) => {
                    Answer::Full(404, not_found("coordination.k8s.io", "leases", name))
                }
                ("PUT", Some(lease)) => {
                    if lease["metadata"]["resourceVersion"] != e.body["metadata"]["resourceVersion"]
                    {
                        return Answer::Full(
                            409,
                            status_body(409, "Conflict", "the object has been modified"),
                        );
                    }
                    let mut next = e.body.clone();
                    next["metadata"]["resourceVersion"] = json!(self.next_rv());
                    self.leases.insert(name.to_string(), next.clone());
                    Answer::Full(200, next.to_string())
                }
                _ => Answer::Full(404, not_found("coordination.k8s.io", "leases", name)),
            };
        }
        Answer::Full(404, "404 page not found".to_string())
    }
}

async fn serve(
    world: Shared,
    request: Request<Incoming>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let exchange = Exchange::read(request).await;
    let answer = {
        let mut w = lock(&world);
        w.exchanges.push(exchange.clone());
        w.answer(&exchange)
    };
    let response = match answer {
        Answer::Full(code, body) => Response::builder()
            .status(code)
            .header("content-type", JSON)
            .body(Full::new(Bytes::from(body)).boxed()),
        Answer::Watch(rx) => {
            let frames = tokio_stream_of(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
            Response::builder()
                .status(200)
                .header("content-type", JSON)
                .body(BodyExt::boxed(StreamBody::new(frames)))
        }
        Answer::Hang => {
            std::future::pending::<()>().await;
            Response::builder()
                .status(500)
                .body(Full::new(Bytes::new()).boxed())
        }
    };
    Ok(response.unwrap_or_default())
}

/// An mpsc receiver as a stream.
fn tokio_stream_of(mut rx: mpsc::UnboundedReceiver<Bytes>) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

struct ApiServer {
    addr: SocketAddr,
    world: Shared,
}

impl ApiServer {
    async fn start() -> ApiServer {
        let world: Shared = Arc::new(Mutex::new(World::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("address");
        let w = world.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let w = w.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| serve(w.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ApiServer { addr, world }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.world)
    }

    fn exchanges(&self) -> Vec<Exchange> {
        self.world().exchanges.clone()
    }

    fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().expect("url");
        let mut config = kube::Config::new(url);
        config.default_namespace = "meshcanary".to_string();
        kube::Client::try_from(config).expect("client")
    }

    /// Ends every open watch stream (as the API server does after `timeoutSeconds`);
    /// returns the `resourceVersion` of the last event they received.
    fn end_watches(&self) -> u64 {
        let mut w = self.world();
        w.watchers.clear();
        w.last_delivered
    }

    fn rollout(&self, name: &str) -> Value {
        self.world()
            .rollouts
            .get(&format!("{}/{}", NS, name))
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Waits (up to `limit`) until `check` holds of the world.
    async fn until(&self, what: &str, limit: Duration, check: impl Fn(&World) -> bool) {
        let started = Instant::now();
        while !check(&self.world()) {
            assert!(
                started.elapsed() < limit,
                "{what}: not within {limit:?}; exchanges:\n{}",
                self.exchanges()
                    .iter()
                    .map(Exchange::line)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The rollouts under test.

/// A Rollout's spec: two steps, quick.
fn rollout_spec(canary: &str) -> Value {
    json!({
        "policy": {
            "name": format!("policy-{}", canary),
            "variants": ["stable", canary],
            "rules": [{"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "s",
                "weights": [{"variant": canary, "weight": 0}, {"variant": "stable", "weight": 100}]}}]
        },
        "split_rule": "rollout",
        "canary": canary,
        "steps": [50, 100],
        "step_min_duration": "200ms",
        "interval": "100ms",
        "analysis": {"min_requests": 100},
        "sink": {"kubernetes": {"wasm": {"local": "/var/local/lib/wasm/meshcanary_filter.wasm"}}}
    })
}

/// Short renewals, but a lease duration (renew deadline 4 s) that a loaded machine
/// running the tests in parallel does not miss.
fn lease_options(identity: &str) -> Options {
    Options {
        identity: identity.to_string(),
        lease_duration: Duration::from_secs(6),
        renew_every: Duration::from_millis(200),
        request_timeout: Duration::from_secs(1),
    }
}

/// The controller under test: the leader's sinks, a fleet whose launcher drives each
/// Rollout with an in-process source (a canary named `broken…` is broken), and the watch.
struct Controller {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

async fn controller(api: &ApiServer, identity: &str) -> Controller {
    let client = api.client();
    let leader = lease::acquire(
        client.clone(),
        "meshcanary",
        "meshcanary-controller",
        &lease_options(identity),
    )
    .await
    .expect("leadership");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "meshcanary".to_string(),
            instance: Some(identity.to_string()),
        },
    );
    let sinks = RolloutSinks::new(client, leader, recorder);
    let launcher_sinks = sinks.clone();
    let launcher: Launcher = Arc::new(
        move |spec: RolloutSpec, mut out: Output, stop: StopSignal| {
            let sink = launcher_sinks.sink_for(&spec);
            Box::pin(async move {
                let Some(sink) = sink else {
                    return Err(RunError::Sink(SinkError::Busy("unknown Rollout".into())));
                };
                let source = SteadyCounters::new(spec.canary.starts_with("broken"));
                rollout::run_release(&spec, &source, &sink, &mut out, stop.stopped()).await
            })
        },
    );
    let options = FleetOptions {
        label_lines: true,
        retry_first: Duration::from_millis(100),
        retry_max: Duration::from_millis(400),
        hook: None,
    };
    let mut fleet = Fleet::new(launcher, &Output::new(Format::Text), options);
    let mut watch = RolloutWatch::new(sinks, Some(NS.to_string()));
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let result = watch
            .run(&mut fleet, async move {
                let _ = stop_rx.await;
            })
            .await;
        fleet.shutdown().await;
        result
    });
    Controller { stop, task }
}

impl Controller {
    async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        self.task.await.expect("controller task")
    }
}

fn condition(rollout: &Value, type_: &str) -> Value {
    rollout["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .cloned()
        .unwrap_or(Value::Null)
}

fn condition_is(world: &World, name: &str, type_: &str) -> bool {
    world
        .rollouts
        .get(&format!("{}/{}", NS, name))
        .is_some_and(|r| condition(r, type_)["status"] == "True")
}

// ---------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_then_watch_drives_several_rollouts_to_promoted_and_rolled_back_through_the_status_subresource(
) {
    let api = ApiServer::start().await;
    {
        let mut w = api.world();
        w.put_rollout("checkout", rollout_spec("canary"), json!({}));
        w.put_rollout("cart", rollout_spec("v2"), json!({}));
        w.put_rollout("payments", rollout_spec("broken-v3"), json!({}));
    }
    let c = controller(&api, "replica-a").await;
    api.until("all three finished", Duration::from_secs(20), |w| {
        condition_is(w, "checkout", "Promoted")
            && condition_is(w, "cart", "Promoted")
            && condition_is(w, "payments", "RolledBack")
    })
    .await;
    c.stop().await.expect("stopped cleanly");

    let exchanges = api.exchanges();
    let lines: Vec<String> = exchanges.iter().map(Exchange::line).collect();
    // The Lease first, then one LIST and a WATCH from the list's resourceVersion.
    assert_eq!(lines[0], format!("GET {}/meshcanary-controller", LEASES));
    assert_eq!(lines[1], format!("POST {} {}", LEASES, JSON));
    let list = exchanges
        .iter()
        .position(|e| e.path == ROLLOUTS && query_param(&e.query, "watch").is_none())
        .expect("a LIST of Rollouts");
    let watch = exchanges
        .iter()
        .position(|e| e.path == ROLLOUTS && query_param(&e.query, "watch") == Some("true"))
        .expect("a WATCH of Rollouts");
    assert!(list < watch);
    let listed = api.world().list_versions.clone();
    assert_eq!(
        query_param(&exchanges[watch].query, "resourceVersion"),
        listed.first().map(String::as_str),
        "the watch starts at the list's resourceVersion: {}",
        exchanges[watch].query
    );
    // Status only through the status subresource, as JSON merge patches; the Rollout
    // itself is never PUT nor patched by the driver.
    for e in &exchanges {
        if e.path.starts_with(&format!("{}/", ROLLOUTS)) {
            assert!(
                (e.method == "PATCH" && e.path.ends_with("/status") && e.content_type == MERGE)
                    || e.method == "GET",
                "unexpected write of a Rollout: {}",
                e.line()
            );
        }
    }
    // Each EnvoyFilter: forced server-side apply as meshcanary, owned by its Rollout.
    let applies: Vec<&Exchange> = exchanges
        .iter()
        .filter(|e| e.path.starts_with(ENVOYFILTERS))
        .collect();
    for e in &applies {
        assert_eq!(e.method, "PATCH");
        assert_eq!(e.content_type, APPLY);
        assert_eq!(query_param(&e.query, "fieldManager"), Some("meshcanary"));
        assert_eq!(query_param(&e.query, "force"), Some("true"));
        let name = e.path.rsplit('/').next().unwrap_or_default();
        let owner = &e.body["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Rollout", "{}", e.body);
        assert_eq!(owner["name"], name);
        assert_eq!(owner["uid"], format!("uid-{}", name));
        assert_eq!(owner["controller"], true);
    }
    let weights = |name: &str| -> Vec<u64> {
        applies
            .iter()
            .filter(|e| e.path.ends_with(&format!("/{}", name)))
            .map(|e| {
                e.body["metadata"]["annotations"]["meshcanary.io/canary-weight"]
                    .as_str()
                    .and_then(|w| w.parse().ok())
                    .unwrap_or(999)
            })
            .collect()
    };
    assert_eq!(weights("checkout"), vec![50, 100]);
    assert_eq!(weights("cart"), vec![50, 100]);
    assert_eq!(weights("payments"), vec![50, 0]);

    // The status: phase, step, weight, observed generation, conditions with reasons,
    // the record with the verdict state.
    let checkout = api.rollout("checkout");
    let status = &checkout["status"];
    assert_eq!(status["phase"], "Promoted");
    assert_eq!(status["canaryWeight"], 100);
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["stepText"], "2/2");
    let promoted = condition(&checkout, "Promoted");
    assert_eq!(promoted["reason"], "AllStepsPassed");
    assert!(promoted["lastTransitionTime"].is_string());
    assert!(status["record"]["state"]["canary"]["requests"]
        .as_f64()
        .is_some_and(|n| n > 0.0));
    assert_eq!(condition(&checkout, "Progressing")["status"], "False");
    let payments = api.rollout("payments");
    assert_eq!(payments["status"]["phase"], "RolledBack");
    assert_eq!(payments["status"]["canaryWeight"], 0);
    let rolled_back = condition(&payments, "RolledBack");
    assert!(
        ["ErrorRateAboveCeiling", "ErrorRateRegressed"]
            .contains(&rolled_back["reason"].as_str().unwrap_or("")),
        "{rolled_back}"
    );
    assert!(
        rolled_back["message"]
            .as_str()
            .is_some_and(|m| m.contains("errors")),
        "{rolled_back}"
    );

    // Events (events.k8s.io/v1) regarding each Rollout, with the numbers.
    let events = api.world().events.clone();
    let reasons = |name: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["regarding"]["name"] == name)
            .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(reasons("checkout"), vec!["StepApplied", "Promoted"]);
    assert_eq!(reasons("payments"), vec!["StepApplied", "RolledBack"]);
    let rolled = events
        .iter()
        .find(|e| e["reason"] == "RolledBack")
        .expect("RolledBack event");
    assert_eq!(rolled["type"], "Warning");
    assert_eq!(rolled["regarding"]["kind"], "Rollout");
    assert!(
        rolled["note"]
            .as_str()
            .is_some_and(|n| n.contains("canary at 0 %") && n.contains("requests")),
        "{rolled}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_ends_is_resumed_and_a_410_gone_relists_and_drops_what_the_relist_lacks() {
    let api = ApiServer::start().await;
    {
        let mut w = api.world();
        w.put_rollout("checkout", rollout_spec("canary"), json!({}));
        w.put_rollout("cart", rollout_spec("v2"), json!({}));
    }
    let c = controller(&api, "replica-a").await;
    api.until("both promoted", Duration::from_secs(20), |w| {
        condition_is(w, "checkout", "Promoted") && condition_is(w, "cart", "Promoted")
    })
    .await;
    let watches = |api: &ApiServer| -> Vec<Exchange> {
        api.exchanges()
            .into_iter()
            .filter(|e| e.path == ROLLOUTS && query_param(&e.query, "watch") == Some("true"))
            .collect()
    };
    let lists = |api: &ApiServer| -> usize {
        api.exchanges()
            .iter()
            .filter(|e| {
                e.path == ROLLOUTS && e.method == "GET" && query_param(&e.query, "watch").is_none()
            })
            .count()
    };
    assert_eq!(lists(&api), 1);
    // The API server ends the watch: a new WATCH follows, from the last resourceVersion
    // seen, without a LIST.
    let last_rv = api.end_watches();
    api.until("a second watch", Duration::from_secs(10), |w| {
        w.exchanges
            .iter()
            .filter(|e| e.path == ROLLOUTS && query_param(&e.query, "watch") == Some("true"))
            .count()
            >= 2
    })
    .await;
    let second = watches(&api)[1].clone();
    assert_eq!(
        query_param(&second.query, "resourceVersion").and_then(|v| v.parse::<u64>().ok()),
        Some(last_rv),
        "{}",
        second.query
    );
    assert_eq!(lists(&api), 1, "no relist for a watch that merely ended");

    // Now the resourceVersion is too old: 410 Gone in the stream. Meanwhile `cart` was
    // deleted and the DELETED event missed; the relist shows it gone.
    {
        let mut w = api.world();
        w.watch_plans.push_back(WatchPlan::Gone);
        w.delete_rollout("cart", false);
    }
    api.end_watches();
    api.until("a relist", Duration::from_secs(15), |w| {
        w.exchanges
            .iter()
            .filter(|e| {
                e.path == ROLLOUTS && e.method == "GET" && query_param(&e.query, "watch").is_none()
            })
            .count()
            >= 2
    })
    .await;
    // A new spec generation of `checkout` after the relist is a new release.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut spec = rollout_spec("canary");
    spec["steps"] = json!([30, 100]);
    api.world().put_rollout("checkout", spec, json!({}));
    api.until(
        "checkout's generation 2 promoted",
        Duration::from_secs(20),
        |w| {
            w.rollouts.get("shop/checkout").is_some_and(|r| {
                r["status"]["observedGeneration"] == 2
                    && condition(r, "Promoted")["status"] == "True"
            })
        },
    )
    .await;
    c.stop().await.expect("stopped cleanly");
    let exchanges = api.exchanges();
    let gone_at = exchanges
        .iter()
        .rposition(|e| e.path == ROLLOUTS && query_param(&e.query, "watch").is_none())
        .expect("relist");
    // After the relist, nothing is written for the deleted Rollout.
    assert!(
        !exchanges[gone_at..]
            .iter()
            .any(|e| e.path.contains("/rollouts/cart") || e.path.ends_with("/envoyfilters/cart")),
        "a Rollout missing from the relist is no longer driven"
    );
    let weights: Vec<String> = exchanges
        .iter()
        .filter(|e| e.method == "PATCH" && e.path.ends_with("/envoyfilters/checkout"))
        .map(|e| {
            e.body["metadata"]["annotations"]["meshcanary.io/canary-weight"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        weights,
        vec!["50", "100", "30", "100"],
        "generation 2 is a new release"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_abort_annotation_sends_the_canary_to_zero_with_a_warning_event() {
    let api = ApiServer::start().await;
    let mut spec = rollout_spec("canary");
    spec["step_min_duration"] = json!("1h");
    api.world().put_rollout("checkout", spec.clone(), json!({}));
    let c = controller(&api, "replica-a").await;
    api.until("at step 1", Duration::from_secs(10), |w| {
        w.rollouts
            .get("shop/checkout")
            .is_some_and(|r| r["status"]["canaryWeight"] == 50)
    })
    .await;
    api.world()
        .put_rollout("checkout", spec, json!({"meshcanary.io/abort": "yes"}));
    api.until("aborted", Duration::from_secs(10), |w| {
        condition_is(w, "checkout", "RolledBack")
    })
    .await;
    c.stop().await.expect("stopped cleanly");
    let checkout = api.rollout("checkout");
    assert_eq!(checkout["status"]["phase"], "Aborted");
    assert_eq!(checkout["status"]["canaryWeight"], 0);
    assert_eq!(condition(&checkout, "RolledBack")["reason"], "Aborted");
    let last_apply = api
        .exchanges()
        .into_iter()
        .rfind(|e| e.method == "PATCH" && e.path.ends_with("/envoyfilters/checkout"))
        .expect("applies");
    assert_eq!(
        last_apply.body["metadata"]["annotations"]["meshcanary.io/canary-weight"],
        "0"
    );
    let events = api.world().events.clone();
    let aborted = events
        .iter()
        .find(|e| e["reason"] == "Aborted")
        .expect("Aborted event");
    assert_eq!(aborted["type"], "Warning");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_rollout_gets_an_invalid_status_and_one_warning_event_while_others_run() {
    let api = ApiServer::start().await;
    let mut bad = rollout_spec("canary");
    bad["steps"] = json!([50, 90]);
    bad["canary"] = json!("nope");
    {
        let mut w = api.world();
        w.put_rollout("bad", bad, json!({}));
        w.put_rollout("checkout", rollout_spec("canary"), json!({}));
        w.config_maps.insert(
            "policy".into(),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "policy", "namespace": NS},
                "data": {"other.json": "{}"}}),
        );
        let mut from = rollout_spec("v2");
        if let Some(s) = from.as_object_mut() {
            s.remove("policy");
        }
        from["policy_from"] =
            json!({"config_map_key_ref": {"name": "policy", "key": "policy.json"}});
        w.put_rollout("from-configmap", from, json!({}));
    }
    let c = controller(&api, "replica-a").await;
    api.until("checkout promoted", Duration::from_secs(20), |w| {
        condition_is(w, "checkout", "Promoted")
    })
    .await;
    c.stop().await.expect("stopped cleanly");
    let bad = api.rollout("bad");
    assert_eq!(bad["status"]["phase"], "Invalid");
    let problems: Vec<String> = bad["status"]["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("canary: \"nope\" is not one of the variants")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("steps: the last step must be 100")),
        "{problems:?}"
    );
    let progressing = condition(&bad, "Progressing");
    assert_eq!(
        (
            progressing["status"].as_str(),
            progressing["reason"].as_str()
        ),
        (Some("False"), Some("InvalidSpec"))
    );
    let from = api.rollout("from-configmap");
    assert!(
        from["status"]["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("has no key \"policy.json\"")),
        "{}",
        from["status"]
    );
    let events = api.world().events.clone();
    let invalid: Vec<&Value> = events
        .iter()
        .filter(|e| e["reason"] == "InvalidSpec" && e["regarding"]["name"] == "bad")
        .collect();
    assert_eq!(invalid.len(), 1, "one Event per distinct set of problems, though the status write is seen again by the watch");
    assert_eq!(invalid[0]["type"], "Warning");
    assert!(
        !api.world().envoy_filters.contains_key("bad"),
        "nothing is applied for an invalid spec"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_409_500_and_timeouts_are_retried_and_the_rollout_still_finishes() {
    let api = ApiServer::start().await;
    api.world()
        .put_rollout("checkout", rollout_spec("canary"), json!({}));
    {
        let mut w = api.world();
        let ef = format!("{}/checkout", ENVOYFILTERS);
        let status = format!("{}/checkout/status", ROLLOUTS);
        w.overrides.push((
            "PATCH".into(),
            ef.clone(),
            Behavior::Respond(409, status_body(409, "Conflict", "conflict")),
        ));
        w.overrides.push((
            "PATCH".into(),
            status.clone(),
            Behavior::Respond(500, status_body(500, "InternalError", "etcd is sad")),
        ));
        w.overrides.push(("PATCH".into(), status, Behavior::Hang));
        w.overrides.push((
            "GET".into(),
            format!("{}/checkout", ROLLOUTS),
            Behavior::Respond(503, status_body(503, "ServiceUnavailable", "try later")),
        ));
    }
    let started = Instant::now();
    let c = controller(&api, "replica-a").await;
    api.until(
        "promoted despite the errors",
        Duration::from_secs(40),
        |w| condition_is(w, "checkout", "Promoted"),
    )
    .await;
    c.stop().await.expect("stopped cleanly");
    assert!(
        api.world().overrides.is_empty(),
        "every canned error was met"
    );
    // The hanging status write is given up after the request timeout (5 s), not waited for.
    assert!(started.elapsed() < Duration::from_secs(40));
    let weights: Vec<String> = api
        .exchanges()
        .into_iter()
        .filter(|e| e.method == "PATCH" && e.path.ends_with("/envoyfilters/checkout"))
        .map(|e| {
            e.body["metadata"]["annotations"]["meshcanary.io/canary-weight"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(weights.last().map(String::as_str), Some("100"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_controller_lease_a_second_replica_stands_by_and_takes_over_when_released() {
    let api = ApiServer::start().await;
    api.world()
        .put_rollout("checkout", rollout_spec("canary"), json!({}));
    let first = controller(&api, "replica-a").await;
    // The second replica waits: it GETs the Lease, sees it held, and writes nothing.
    let client = api.client();
    let standby = tokio::spawn(async move {
        lease::acquire(
            client,
            "meshcanary",
            "meshcanary-controller",
            &lease_options("replica-b"),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !standby.is_finished(),
        "the standby must not get the Lease while it is held"
    );
    let lease_lines: Vec<String> = api
        .exchanges()
        .iter()
        .filter(|e| e.path.starts_with(LEASES))
        .map(Exchange::line)
        .collect();
    assert_eq!(
        lease_lines.iter().filter(|l| l.starts_with("POST")).count(),
        1,
        "{lease_lines:?}"
    );
    assert_eq!(
        api.world().leases.len(),
        1,
        "one Lease for the controller, none per rollout"
    );
    first.stop().await.expect("stopped");
    // The first replica's leadership ends when its sinks are dropped: the Lease is
    // released (or, failing that, expires after 6 s), and the standby takes it over with
    // a precondition.
    let leader = tokio::time::timeout(Duration::from_secs(10), standby)
        .await
        .expect("standby took over in time")
        .expect("task")
        .expect("leadership");
    assert_eq!(leader.identity(), "replica-b");
    let lease = api
        .world()
        .leases
        .get("meshcanary-controller")
        .cloned()
        .unwrap_or_default();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    assert!(lease["spec"]["leaseTransitions"]
        .as_i64()
        .is_some_and(|t| t >= 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_resumes_the_analysis_from_the_status_not_just_the_step() {
    let api = ApiServer::start().await;
    let mut spec = rollout_spec("canary");
    spec["steps"] = json!([10, 50, 100]);
    spec["step_min_duration"] = json!("1h");
    api.world().put_rollout("checkout", spec, json!({}));
    let first = controller(&api, "replica-a").await;
    api.until(
        "evidence gathered at step 1",
        Duration::from_secs(10),
        |w| {
            w.rollouts.get("shop/checkout").is_some_and(|r| {
                r["status"]["record"]["state"]["canary"]["requests"]
                    .as_f64()
                    .is_some_and(|n| n >= 2000.0)
            })
        },
    )
    .await;
    first.stop().await.expect("stopped");
    let saved = api.rollout("checkout")["status"]["record"].clone();
    let saved_requests = saved["state"]["canary"]["requests"].as_f64().unwrap_or(0.0);
    api.world().exchanges.clear();

    // A new leader (the first released the Lease) reads the record from the status and
    // goes on with the same evidence: the same step, the canary's count only growing,
    // and no step re-applied from the start.
    let second = controller(&api, "replica-b").await;
    api.until("more evidence", Duration::from_secs(10), |w| {
        w.rollouts.get("shop/checkout").is_some_and(|r| {
            r["status"]["record"]["state"]["canary"]["requests"]
                .as_f64()
                .is_some_and(|n| n > saved_requests)
        })
    })
    .await;
    second.stop().await.expect("stopped");
    let now = api.rollout("checkout");
    assert_eq!(
        now["status"]["record"]["state"]["step"],
        saved["state"]["step"]
    );
    assert!(!saved["state"]["started_at"].is_null(), "{saved}");
    assert_eq!(
        now["status"]["record"]["state"]["started_at"],
        saved["state"]["started_at"]
    );
    // Every status the second controller wrote carries at least the saved evidence: the
    // analysis went on, it did not start over.
    let written: Vec<f64> = api
        .exchanges()
        .iter()
        .filter(|e| e.path.ends_with("/checkout/status"))
        .filter_map(|e| e.body["status"]["record"]["state"]["canary"]["requests"].as_f64())
        .collect();
    assert!(!written.is_empty());
    assert!(
        written.iter().all(|n| *n >= saved_requests),
        "{written:?} vs {saved_requests}"
    );
    assert_eq!(
        now["status"]["record"]["rollout"], saved["rollout"],
        "the same release"
    );
    assert_eq!(now["status"]["canaryWeight"], 10);
    let lines: Vec<String> = api.exchanges().iter().map(Exchange::line).collect();
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("GET {}/checkout", ROLLOUTS)),
        "the record is read from the Rollout: {lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshcanary_abort_rollout_is_a_merge_patch_of_the_abort_annotation() {
    let api = ApiServer::start().await;
    api.world()
        .put_rollout("checkout", rollout_spec("canary"), json!({}));
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: fake, user: u}}\ncurrent-context: c\n",
            api.addr
        ),
    )
    .expect("kubeconfig");
    let run = |args: Vec<&str>| {
        let kubeconfig = kubeconfig.clone();
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_meshcanary"))
                .args(&args)
                .env("KUBECONFIG", &kubeconfig)
                .output()
                .expect("meshcanary runs")
        })
    };
    let out = run(vec!["abort", "--rollout", "shop/checkout"])
        .await
        .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let patches: Vec<Exchange> = api
        .exchanges()
        .into_iter()
        .filter(|e| e.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 1);
    assert_eq!(
        patches[0].line(),
        format!("PATCH {}/checkout {}", ROLLOUTS, MERGE)
    );
    assert_eq!(
        query_param(&patches[0].query, "fieldManager"),
        Some("meshcanary-abort")
    );
    assert!(patches[0].body["metadata"]["annotations"]["meshcanary.io/abort"].is_string());
    assert_eq!(
        patches[0].body.as_object().map(|o| o.len()),
        Some(1),
        "metadata only: {}",
        patches[0].body
    );
    assert!(api.rollout("checkout")["metadata"]["annotations"]["meshcanary.io/abort"].is_string());
    // A Rollout that does not exist: exit 1, with the API server's answer.
    let out = run(vec!["abort", "--rollout", "shop/nope"])
        .await
        .expect("join");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shop/nope"));
}

/// A kubeconfig pointing at the fake API server, and a runner of the real binary with it.
fn cli(
    api: &ApiServer,
    dir: &std::path::Path,
) -> impl Fn(Vec<&str>) -> tokio::task::JoinHandle<std::process::Output> {
    let kubeconfig = dir.join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: fake, user: u}}\ncurrent-context: c\n",
            api.addr
        ),
    )
    .expect("kubeconfig");
    move |args: Vec<&str>| {
        let kubeconfig = kubeconfig.clone();
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_meshcanary"))
                .args(&args)
                .env("KUBECONFIG", &kubeconfig)
                .output()
                .expect("meshcanary runs")
        })
    }
}

/// The operator-mark patches (field manager `meshcanary-operator`) sent so far.
fn operator_patches(api: &ApiServer) -> Vec<Exchange> {
    api.exchanges()
        .into_iter()
        .filter(|e| {
            e.method == "PATCH"
                && query_param(&e.query, "fieldManager") == Some("meshcanary-operator")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_promote_rollout_are_annotation_merge_patches_acknowledged_in_the_status_fake_api_server(
) {
    let api = ApiServer::start().await;
    let mut spec = rollout_spec("canary");
    spec["step_min_duration"] = json!("1h");
    api.world().put_rollout("checkout", spec, json!({}));
    let c = controller(&api, "replica-a").await;
    api.until("at step 1", Duration::from_secs(10), |w| {
        w.rollouts
            .get("shop/checkout")
            .is_some_and(|r| r["status"]["canaryWeight"] == 50)
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let run = cli(&api, dir.path());
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    // pause: one merge patch of the annotation; the status says Paused, by whom.
    let out = run(vec![
        "pause",
        "--rollout",
        "shop/checkout",
        "--timeout",
        "10",
    ])
    .await
    .expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    let patches = operator_patches(&api);
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert_eq!(
        patches[0].line(),
        format!("PATCH {}/checkout {}", ROLLOUTS, MERGE)
    );
    let request = patches[0].body["metadata"]["annotations"]["meshcanary.io/pause"]
        .as_str()
        .expect("the pause annotation's value")
        .to_string();
    assert!(request.contains("via meshcanary pause"), "{request}");
    assert_eq!(patches[0].body.as_object().map(|o| o.len()), Some(1));
    let checkout = api.rollout("checkout");
    assert_eq!(checkout["status"]["phase"], "Paused", "{checkout}");
    let paused = condition(&checkout, "Paused");
    assert_eq!(
        (&paused["status"], &paused["reason"]),
        (&json!("True"), &json!("PausedByOperator"))
    );
    assert!(paused["message"]
        .as_str()
        .unwrap_or_default()
        .contains(&request));
    assert_eq!(
        checkout["status"]["record"]["control"]["paused"]["request"],
        json!(request)
    );

    // resume: the annotation removed (null), the Paused condition False.
    let out = run(vec![
        "resume",
        "--rollout",
        "shop/checkout",
        "--timeout",
        "10",
    ])
    .await
    .expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    let patches = operator_patches(&api);
    assert_eq!(patches.len(), 2);
    assert_eq!(
        patches[1].body,
        json!({"metadata": {"annotations": {"meshcanary.io/pause": null}}})
    );
    let checkout = api.rollout("checkout");
    assert_eq!(checkout["status"]["phase"], "Progressing");
    assert_eq!(condition(&checkout, "Paused")["status"], "False");

    // promote: the CLI sets the request, the controller removes it (null) and acts: the
    // last judged step is skipped, so the rollout completes.
    let out = run(vec![
        "promote",
        "--rollout",
        "shop/checkout",
        "--timeout",
        "10",
    ])
    .await
    .expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    api.until("promoted", Duration::from_secs(10), |w| {
        condition_is(w, "checkout", "Promoted")
    })
    .await;
    c.stop().await.expect("stopped cleanly");
    let patches = operator_patches(&api);
    assert_eq!(patches.len(), 4, "{patches:?}");
    assert!(patches[2].body["metadata"]["annotations"]["meshcanary.io/promote"].is_string());
    assert_eq!(
        patches[3].body,
        json!({"metadata": {"annotations": {"meshcanary.io/promote": null}}}),
        "the controller removes the request it read"
    );
    let checkout = api.rollout("checkout");
    assert_eq!(checkout["status"]["canaryWeight"], 100);
    let commands: Vec<Value> = checkout["status"]["record"]["control"]["commands"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let kinds: Vec<&str> = commands
        .iter()
        .filter_map(|c| c["command"].as_str())
        .collect();
    assert_eq!(kinds, vec!["pause", "resume", "promote"]);
    assert_eq!(commands[2]["accepted"], true);
    assert!(checkout["metadata"]["annotations"]
        .get("meshcanary.io/promote")
        .is_none_or(Value::is_null));
    // A Rollout no controller drives: not confirmed in time, exit 1, the mark withdrawn.
    let out = run(vec![
        "pause",
        "--rollout",
        "shop/checkout",
        "--timeout",
        "1",
    ])
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no controller confirmed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        operator_patches(&api).last().map(|p| p.body.clone()),
        Some(json!({"metadata": {"annotations": {"meshcanary.io/pause": null}}}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_edit_of_a_running_rollout_keeps_it_running_and_its_status_lists_the_problems() {
    let api = ApiServer::start().await;
    let mut spec = rollout_spec("canary");
    spec["step_min_duration"] = json!("1h");
    api.world().put_rollout("checkout", spec.clone(), json!({}));
    let c = controller(&api, "replica-a").await;
    api.until("at step 1", Duration::from_secs(10), |w| {
        w.rollouts
            .get("shop/checkout")
            .is_some_and(|r| r["status"]["canaryWeight"] == 50)
    })
    .await;
    spec["steps"] = json!([50, 90]);
    api.world().put_rollout("checkout", spec, json!({}));
    let marker = api.exchanges().len();
    api.until(
        "problems in a status the driver wrote",
        Duration::from_secs(10),
        |w| {
            w.exchanges[marker..].iter().any(|e| {
                e.path.ends_with("/checkout/status")
                    && e.body["status"]["phase"] == "Progressing"
                    && e.body["status"]["problems"][0]
                        .as_str()
                        .is_some_and(|p| p.starts_with("steps: the last step must be 100"))
            })
        },
    )
    .await;
    c.stop().await.expect("stopped cleanly");
    let applies = api
        .exchanges()
        .iter()
        .filter(|e| e.method == "PATCH" && e.path.ends_with("/envoyfilters/checkout"))
        .count();
    assert_eq!(
        applies, 1,
        "the running revision goes on at its step; nothing re-applied"
    );
    let events = api.world().events.clone();
    assert_eq!(
        events
            .iter()
            .filter(|e| e["reason"] == "InvalidSpec")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_rollouts_at_once_are_each_driven_to_their_end_by_one_controller() {
    let api = ApiServer::start().await;
    {
        let mut w = api.world();
        for i in 0..50 {
            let canary = if i % 10 == 9 { "broken" } else { "canary" };
            w.put_rollout(&format!("svc-{:02}", i), rollout_spec(canary), json!({}));
        }
    }
    let started = Instant::now();
    let c = controller(&api, "replica-a").await;
    api.until("all fifty finished", Duration::from_secs(60), |w| {
        (0..50).all(|i| {
            let name = format!("svc-{:02}", i);
            condition_is(w, &name, "Promoted") || condition_is(w, &name, "RolledBack")
        })
    })
    .await;
    let took = started.elapsed();
    c.stop().await.expect("stopped cleanly");
    let world = api.world();
    let rolled_back: Vec<&String> = world
        .rollouts
        .iter()
        .filter(|(_, r)| r["status"]["phase"] == "RolledBack")
        .map(|(k, _)| k)
        .collect();
    assert_eq!(rolled_back.len(), 5, "{rolled_back:?}");
    assert!(rolled_back.iter().all(|k| k.ends_with('9')));
    assert_eq!(world.envoy_filters.len(), 50, "one EnvoyFilter per Rollout");
    assert_eq!(world.leases.len(), 1, "one Lease for all of them");
    let lists = world
        .exchanges
        .iter()
        .filter(|e| e.path == ROLLOUTS && query_param(&e.query, "watch").is_none())
        .count();
    assert_eq!(lists, 1, "one LIST for fifty Rollouts");
    let _ = writeln_stderr(&format!(
        "fifty Rollouts (45 promoted, 5 rolled back) finished in {} ms, {} requests to the API server",
        took.as_millis(),
        world.exchanges.len()
    ));
}

/// Straight to the process's stderr (libtest captures `eprintln!`).
fn writeln_stderr(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stderr(), "{}", text)
}
