//! CONTRACT tests of the Kubernetes sink, not cluster tests: no API server can run here,
//! so the sink talks to a local HTTP server on 127.0.0.1 that answers as the Kubernetes
//! API server does (paths, verbs, content types, `resourceVersion`, `Status` objects for
//! errors, `404 page not found` for a resource the server does not serve), and each test
//! asserts the exact exchange. `tests/kubernetes_cluster.rs` runs against a real cluster
//! when `MESHCANARY_KUBECONFIG` is set.
//!
//! The fake's server-side apply is a simplified model: each field manager's last applied
//! configuration, merged in the order the managers first applied (JSON merge patches
//! are one more layer). That is enough to show what the sink relies on: a manager's
//! re-apply replaces its own fields (so leaving one out removes it) and leaves other
//! managers' fields alone.

mod api_server;

use api_server::Exchange;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use meshcanary_controller::sink::kubernetes::{
    Kubernetes, Options, ABORT_ANNOTATION, RECORD_ANNOTATION,
};
use meshcanary_controller::sink::{ConfigSink, Record, RolloutId, SinkError};
use meshcanary_controller::spec::{KubernetesSpec, PatchContext, WasmCode};
use meshcanary_controller::verdict::State;
use meshcanary_policy::envoy::FailurePolicy;
use serde_json::{json, Value};

const NS: &str = "shop";
const NAME: &str = "checkout-canary";
const EF_PATH: &str =
    "/apis/networking.istio.io/v1alpha3/namespaces/shop/envoyfilters/checkout-canary";
const LEASES_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/shop/leases";
const LEASE_PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/shop/leases/meshcanary-checkout-canary";
const APPLY: &str = "application/apply-patch+yaml";
const MERGE: &str = "application/merge-patch+json";
const JSON: &str = "application/json";

// ---------------------------------------------------------------------------------------
// The fake API server.

impl Exchange {
    /// `METHOD path?query content-type`, for exact comparisons.
    fn line(&self) -> String {
        let target = if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        };
        format!("{} {} {}", self.method, target, self.content_type)
            .trim_end()
            .to_string()
    }
}

/// A canned answer for one method and path, instead of the emulation.
#[derive(Clone)]
enum Behavior {
    Respond(u16, &'static str, String),
    /// Accept the request and never answer.
    Hang,
}

#[derive(Default)]
struct World {
    /// Whether the EnvoyFilter CRD is installed (Istio is).
    crd_installed: bool,
    /// Leases by item path.
    leases: BTreeMap<String, Value>,
    /// EnvoyFilters by item path: the managers' layers, in first-apply order.
    layers: BTreeMap<String, Vec<(String, Value)>>,
    /// EnvoyFilters by item path: what the server answers.
    live: BTreeMap<String, Value>,
    resource_version: u64,
    exchanges: Vec<Exchange>,
    overrides: Vec<(String, String, Behavior)>,
}

type Shared = Arc<Mutex<World>>;

fn lock(world: &Shared) -> MutexGuard<'_, World> {
    world.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `Status` object as the API server writes it.
fn status(code: u16, reason: &str, message: &str, details: Value) -> (u16, &'static str, String) {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code
    });
    if !details.is_null() {
        body["details"] = details;
    }
    (code, JSON, body.to_string())
}

fn not_found(group: &str, plural: &str, name: &str) -> (u16, &'static str, String) {
    status(
        404,
        "NotFound",
        &format!("{}.{} \"{}\" not found", plural, group, name),
        json!({"name": name, "group": group, "kind": plural}),
    )
}

/// RFC 7386 JSON merge patch (an applied configuration has no nulls: a deep merge).
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

impl World {
    fn next_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    /// Recomputes a live EnvoyFilter from its layers.
    fn rebuild(&mut self, path: &str) {
        let mut live = json!({});
        for (_, layer) in self.layers.get(path).into_iter().flatten() {
            merge(&mut live, layer);
        }
        let previous = self.live.get(path).cloned();
        let generation = match &previous {
            Some(p) if p["spec"] == live["spec"] => p["metadata"]["generation"].clone(),
            Some(p) => json!(p["metadata"]["generation"].as_u64().unwrap_or(0) + 1),
            None => json!(1),
        };
        let version = self.next_version();
        let meta = &mut live["metadata"];
        meta["resourceVersion"] = json!(version);
        meta["uid"] = json!("6f2c1d7e-0000-4000-8000-000000000001");
        meta["creationTimestamp"] = json!("2026-08-01T10:00:00Z");
        meta["generation"] = generation;
        self.live.insert(path.to_string(), live);
    }

    fn handle(&mut self, ex: &Exchange) -> Behavior {
        if let Some((_, _, b)) = self
            .overrides
            .iter()
            .find(|(m, p, _)| *m == ex.method && *p == ex.path)
        {
            return b.clone();
        }
        let (code, ct, body) = self.answer(ex);
        Behavior::Respond(code, ct, body)
    }

    fn answer(&mut self, ex: &Exchange) -> (u16, &'static str, String) {
        let path = ex.path.as_str();
        if path.starts_with("/apis/networking.istio.io/") {
            if !self.crd_installed {
                // What kube-apiserver's not-found handler answers for an unserved path.
                return (
                    404,
                    "text/plain; charset=utf-8",
                    "404 page not found\n".into(),
                );
            }
            return self.envoy_filter(ex);
        }
        if path == LEASES_PATH && ex.method == "POST" {
            let name = ex.body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let item = format!("{}/{}", LEASES_PATH, name);
            if self.leases.contains_key(&item) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("leases.coordination.k8s.io \"{}\" already exists", name),
                    json!({"name": name, "group": "coordination.k8s.io", "kind": "leases"}),
                );
            }
            let mut lease = ex.body.clone();
            lease["metadata"]["resourceVersion"] = json!(self.next_version());
            lease["metadata"]["uid"] = json!("0d7c2b1a-0000-4000-8000-000000000002");
            lease["metadata"]["creationTimestamp"] = json!("2026-08-01T10:00:00Z");
            self.leases.insert(item, lease.clone());
            return (201, JSON, lease.to_string());
        }
        if let Some(name) = path.strip_prefix(&format!("{}/", LEASES_PATH)) {
            let stored = self.leases.get(path).cloned();
            return match (ex.method.as_str(), stored) {
                ("GET", Some(lease)) => (200, JSON, lease.to_string()),
                (_, None) => not_found("coordination.k8s.io", "leases", name),
                ("PUT", Some(lease)) => {
                    if ex.body["metadata"]["resourceVersion"]
                        != lease["metadata"]["resourceVersion"]
                    {
                        return status(
                            409,
                            "Conflict",
                            &format!("Operation cannot be fulfilled on leases.coordination.k8s.io \"{}\": the object has been modified; please apply your changes to the latest version and try again", name),
                            json!({"name": name, "group": "coordination.k8s.io", "kind": "leases"}),
                        );
                    }
                    let mut next = ex.body.clone();
                    next["metadata"]["resourceVersion"] = json!(self.next_version());
                    self.leases.insert(path.to_string(), next.clone());
                    (200, JSON, next.to_string())
                }
                _ => status(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                    Value::Null,
                ),
            };
        }
        (
            404,
            "text/plain; charset=utf-8",
            "404 page not found\n".into(),
        )
    }

    fn envoy_filter(&mut self, ex: &Exchange) -> (u16, &'static str, String) {
        let path = ex.path.as_str();
        let name = path.rsplit('/').next().unwrap_or_default().to_string();
        let missing = || not_found("networking.istio.io", "envoyfilters", &name);
        match (ex.method.as_str(), ex.content_type.as_str()) {
            ("GET", _) => match self.live.get(path) {
                Some(o) => (200, JSON, o.to_string()),
                None => missing(),
            },
            ("PATCH", APPLY) => {
                let manager = match query_param(&ex.query, "fieldManager") {
                    Some(m) => m.to_string(),
                    None => {
                        return status(
                            400,
                            "BadRequest",
                            "PATCH /: fieldManager is required for apply requests",
                            Value::Null,
                        )
                    }
                };
                if ex.body["kind"] != "EnvoyFilter"
                    || ex.body["apiVersion"] != "networking.istio.io/v1alpha3"
                    || ex.body["metadata"]["name"] != json!(name)
                {
                    return status(
                        400,
                        "BadRequest",
                        "the body of the request does not match the request's kind or name",
                        Value::Null,
                    );
                }
                let created = !self.live.contains_key(path);
                let layers = self.layers.entry(path.to_string()).or_default();
                match layers.iter_mut().find(|(m, _)| *m == manager) {
                    Some(layer) => layer.1 = ex.body.clone(),
                    None => layers.push((manager, ex.body.clone())),
                }
                self.rebuild(path);
                let code = if created { 201 } else { 200 };
                (code, JSON, self.live[path].to_string())
            }
            ("PATCH", MERGE) => {
                if !self.live.contains_key(path) {
                    return missing();
                }
                let manager = format!(
                    "update:{}",
                    query_param(&ex.query, "fieldManager").unwrap_or("unknown")
                );
                let layers = self.layers.entry(path.to_string()).or_default();
                match layers.iter_mut().find(|(m, _)| *m == manager) {
                    Some(layer) => merge(&mut layer.1, &ex.body),
                    None => layers.push((manager, ex.body.clone())),
                }
                self.rebuild(path);
                (200, JSON, self.live[path].to_string())
            }
            _ => status(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format",
                Value::Null,
            ),
        }
    }
}

async fn serve(
    world: Shared,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let exchange = Exchange::read(request).await;
    let behavior = {
        let mut w = lock(&world);
        w.exchanges.push(exchange.clone());
        w.handle(&exchange)
    };
    match behavior {
        Behavior::Respond(code, ct, body) => Ok(Response::builder()
            .status(code)
            .header("content-type", ct)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()),
        Behavior::Hang => {
            std::future::pending::<()>().await;
            Ok(Response::default())
        }
    }
}

/// A fake API server on 127.0.0.1, with Istio installed.
struct ApiServer {
    addr: SocketAddr,
    world: Shared,
}

impl ApiServer {
    async fn start() -> ApiServer {
        let world: Shared = Arc::new(Mutex::new(World {
            crd_installed: true,
            ..World::default()
        }));
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

    fn lines(&self) -> Vec<String> {
        self.exchanges().iter().map(Exchange::line).collect()
    }

    fn clear(&self) {
        self.world().exchanges.clear();
    }

    fn answer(&self, method: &str, path: &str, behavior: Behavior) {
        self.world()
            .overrides
            .push((method.to_string(), path.to_string(), behavior));
    }

    /// A kube client pointed at the fake: plain HTTP, no credentials.
    fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().expect("url");
        let mut config = kube::Config::new(url);
        config.default_namespace = NS.to_string();
        kube::Client::try_from(config).expect("client")
    }

    fn sink(&self, identity: &str) -> Kubernetes {
        self.sink_with(options(identity))
    }

    fn sink_with(&self, options: Options) -> Kubernetes {
        Kubernetes::new(kubernetes_spec(), steps())
            .with_client(self.client())
            .with_options(options)
    }
}

// ---------------------------------------------------------------------------------------
// The rollout under test.

fn steps() -> Vec<u32> {
    vec![5, 25, 50, 100]
}

fn kubernetes_spec() -> KubernetesSpec {
    KubernetesSpec {
        namespace: NS.to_string(),
        name: NAME.to_string(),
        workload_selector: Some(BTreeMap::from([(
            "app".to_string(),
            "frontend".to_string(),
        )])),
        filter_name: "meshcanary".to_string(),
        wasm: WasmCode::Local("/var/local/lib/wasm/meshcanary_filter.wasm".to_string()),
        context: vec![PatchContext::SidecarOutbound, PatchContext::Gateway],
        kubeconfig: None,
        failure_policy: FailurePolicy::Reload,
    }
}

fn options(identity: &str) -> Options {
    Options {
        identity: identity.to_string(),
        lease_duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(5),
        request_timeout: Duration::from_secs(2),
    }
}

fn policy(canary_bp: u64) -> Value {
    json!({
        "name": "checkout",
        "variants": ["stable", "canary"],
        "rules": [{"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "checkout-v2",
            "weights": [{"variant": "canary", "weight": canary_bp}, {"variant": "stable", "weight": 10_000 - canary_bp}]}}]
    })
}

/// A record in the middle of a rollout: step 2 of 4 (25 %), some evidence gathered.
fn record() -> Record {
    let mut state = State::start(Duration::from_millis(1_785_000_000_000));
    state.step = 1;
    state.step_started_at = Duration::from_millis(1_785_000_060_000);
    state.errors.llr = -1.25;
    state.errors.step_llr = -0.5;
    state.reason = "holding: 120 of 300 canary requests in this step".to_string();
    Record {
        rollout: RolloutId {
            policy: "checkout".to_string(),
            split_rule: "rollout".to_string(),
            canary: "canary".to_string(),
            revision: "r1".to_string(),
        },
        applied_weight: 25,
        generation: 3,
        state,
        updated_unix_ms: 1_785_000_070_000,
        control: Default::default(),
        hooks: Default::default(),
    }
}

/// The apply as kube-rs sends it. Its query starts with an empty parameter (`?&`), which
/// the API server's query parser skips.
fn ef_apply_line() -> String {
    format!(
        "PATCH {}?&force=true&fieldManager=meshcanary {}",
        EF_PATH, APPLY
    )
}

// ---------------------------------------------------------------------------------------
// The exchange.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_is_a_forced_server_side_apply_of_exactly_the_rendered_object() {
    let api = ApiServer::start().await;
    let sink = api.sink("controller-a");
    let _claim = sink.claim().await.expect("claim");
    api.clear();
    let record = record();
    sink.apply(&policy(2500), &record).await.expect("apply");

    let exchanges = api.exchanges();
    assert_eq!(
        exchanges.iter().map(Exchange::line).collect::<Vec<_>>(),
        vec![ef_apply_line()]
    );
    let body = &exchanges[0].body;
    // Exactly what `render` prints (the body is JSON, which is YAML).
    let rendered = sink.render(&policy(2500), &record).expect("render");
    let rendered: Value = serde_saphyr::from_str(&rendered).expect("rendered YAML parses");
    assert_eq!(body, &rendered);
    // And what that is, field by field.
    assert_eq!(body["apiVersion"], "networking.istio.io/v1alpha3");
    assert_eq!(body["kind"], "EnvoyFilter");
    assert_eq!(body["metadata"]["name"], NAME);
    assert_eq!(body["metadata"]["namespace"], NS);
    assert!(
        body["metadata"].get("resourceVersion").is_none(),
        "apply carries no precondition"
    );
    assert_eq!(
        body["metadata"]["labels"],
        json!({"app.kubernetes.io/managed-by": "meshcanary"})
    );
    let annotations = &body["metadata"]["annotations"];
    assert_eq!(annotations["meshcanary.io/step"], "2/4");
    assert_eq!(annotations["meshcanary.io/canary-weight"], "25");
    assert_eq!(annotations["meshcanary.io/phase"], "progressing");
    assert_eq!(annotations["meshcanary.io/generation"], "3");
    assert_eq!(
        annotations["meshcanary.io/reason"],
        "holding: 120 of 300 canary requests in this step"
    );
    let saved: Record =
        serde_json::from_str(annotations[RECORD_ANNOTATION].as_str().expect("record"))
            .expect("record JSON");
    assert_eq!(saved, record);
    assert!(annotations.get(ABORT_ANNOTATION).is_none());

    let spec = &body["spec"];
    assert_eq!(
        spec["workloadSelector"],
        json!({"labels": {"app": "frontend"}})
    );
    let patches = spec["configPatches"].as_array().expect("patches");
    assert_eq!(patches.len(), 3);
    // 1. The ECDS resource, before the patches that use it.
    assert_eq!(patches[0]["applyTo"], "EXTENSION_CONFIG");
    assert!(patches[0].get("match").is_none());
    assert_eq!(patches[0]["patch"]["operation"], "ADD");
    assert_eq!(patches[0]["patch"]["value"]["name"], "meshcanary");
    let typed = &patches[0]["patch"]["value"]["typed_config"];
    assert_eq!(
        typed,
        &meshcanary_controller::sink::ecds_file::wasm_filter_config(
            "meshcanary",
            std::path::Path::new("/var/local/lib/wasm/meshcanary_filter.wasm"),
            &policy(2500),
            FailurePolicy::Reload
        ),
        "the same Wasm message as the ECDS file sink"
    );
    // 2. and 3. The filter before the router, configured by ECDS from ADS.
    for (patch, context) in patches[1..].iter().zip(["SIDECAR_OUTBOUND", "GATEWAY"]) {
        assert_eq!(
            patch,
            &json!({
                "applyTo": "HTTP_FILTER",
                "match": {"context": context, "listener": {"filterChain": {"filter": {
                    "name": "envoy.filters.network.http_connection_manager",
                    "subFilter": {"name": "envoy.filters.http.router"}}}}},
                "patch": {"operation": "INSERT_BEFORE", "value": {
                    "name": "meshcanary",
                    "config_discovery": {
                        "config_source": {"ads": {}, "initial_fetch_timeout": "0s"},
                        "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"]
                    }}}
            })
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_wasm_is_an_http_uri_with_its_sha256() {
    let api = ApiServer::start().await;
    let mut spec = kubernetes_spec();
    spec.wasm = WasmCode::Http {
        url: "https://artifacts.example.com/meshcanary_filter.wasm".to_string(),
        sha256: "ab".repeat(32),
    };
    spec.context = vec![PatchContext::Gateway];
    spec.workload_selector = None;
    let sink = Kubernetes::new(spec, steps())
        .with_client(api.client())
        .with_options(options("controller-a"));
    sink.apply(&policy(500), &record()).await.expect("apply");
    let body = &api.exchanges()[0].body;
    let patches = body["spec"]["configPatches"].as_array().expect("patches");
    assert_eq!(patches.len(), 2);
    assert_eq!(patches[1]["match"]["context"], "GATEWAY");
    assert!(body["spec"].get("workloadSelector").is_none());
    assert_eq!(
        patches[0]["patch"]["value"]["typed_config"]["config"]["vm_config"]["code"],
        json!({"remote": {"http_uri": {"uri": "https://artifacts.example.com/meshcanary_filter.wasm"}, "sha256": "ab".repeat(32)}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oci_module_is_an_http_uri_with_the_image_digest_as_its_sha256() {
    let api = ApiServer::start().await;
    let mut spec = kubernetes_spec();
    let digest = "8531412b1f02df78e0bdf891272d03a174945575c0da0e80df9b6ee6af953831";
    let url = format!("oci://registry.internal:5000/meshcanary/filter@sha256:{digest}");
    spec.wasm = WasmCode::Oci {
        url: url.clone(),
        digest: digest.to_string(),
    };
    spec.failure_policy = FailurePolicy::Open;
    let sink = Kubernetes::new(spec, steps())
        .with_client(api.client())
        .with_options(options("controller-a"));
    sink.apply(&policy(500), &record()).await.expect("apply");
    let body = &api.exchanges()[0].body;
    let config = &body["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"];
    // Istio's agent pulls the oci:// URI and checks `sha256` against the manifest digest.
    assert_eq!(
        config["vm_config"]["code"],
        json!({"remote": {"http_uri": {"uri": url, "timeout": "30s"}, "sha256": digest}})
    );
    assert_eq!(config["failure_policy"], "FAIL_OPEN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_is_deterministic_yaml() {
    let api = ApiServer::start().await;
    let a = api
        .sink("controller-a")
        .render(&policy(2500), &record())
        .expect("render");
    let b = api
        .sink("controller-b")
        .render(&policy(2500), &record())
        .expect("render");
    assert_eq!(a, b, "same input, same bytes");
    assert!(
        a.starts_with("apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata:\n")
    );
    // Sorted keys at every level, so the field order never depends on serde_json's map.
    let value: Value = serde_saphyr::from_str(&a).expect("parses");
    fn keys_sorted(v: &Value) -> bool {
        match v {
            Value::Object(m) => {
                let keys: Vec<&String> = m.keys().collect();
                keys.windows(2).all(|w| w[0] <= w[1]) && m.values().all(keys_sorted)
            }
            Value::Array(items) => items.iter().all(keys_sorted),
            _ => true,
        }
    }
    assert!(keys_sorted(&value));
    assert!(
        !a.contains(": >") && !a.contains(": |"),
        "no folded or literal blocks:\n{a}"
    );
    assert!(api.exchanges().is_empty(), "render talks to nobody");
}

// ---------------------------------------------------------------------------------------
// Single writer: the Lease.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_created_then_renewed_with_resource_version_preconditions() {
    let api = ApiServer::start().await;
    let sink = api.sink_with(Options {
        renew_every: Duration::from_millis(100),
        ..options("controller-a")
    });
    let claim = sink.claim().await.expect("claim");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let exchanges = api.exchanges();
    let lines: Vec<String> = exchanges.iter().map(Exchange::line).collect();
    assert_eq!(lines[0], format!("GET {}", LEASE_PATH));
    assert_eq!(
        lines[1],
        format!("POST {}?&fieldManager=meshcanary {}", LEASES_PATH, JSON)
    );
    let created = &exchanges[1].body;
    assert_eq!(created["apiVersion"], "coordination.k8s.io/v1");
    assert_eq!(created["kind"], "Lease");
    assert_eq!(created["metadata"]["name"], "meshcanary-checkout-canary");
    assert_eq!(created["metadata"]["namespace"], NS);
    assert_eq!(created["spec"]["holderIdentity"], "controller-a");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(created["spec"]["leaseTransitions"], 0);
    let renew_time = created["spec"]["renewTime"].as_str().expect("renewTime");
    assert_eq!(
        renew_time.len(),
        "2026-08-01T10:00:00.123456Z".len(),
        "MicroTime: {renew_time}"
    );
    // Renewals: PUT with the resourceVersion the previous answer carried.
    let renewals: Vec<&Exchange> = exchanges[2..].iter().collect();
    assert!(renewals.len() >= 2, "{:?}", lines);
    for (expected_version, renewal) in (1..).zip(renewals) {
        assert_eq!(
            renewal.line(),
            format!("PUT {}?&fieldManager=meshcanary {}", LEASE_PATH, JSON)
        );
        assert_eq!(
            renewal.body["metadata"]["resourceVersion"],
            expected_version.to_string()
        );
        assert_eq!(renewal.body["spec"]["holderIdentity"], "controller-a");
    }
    // Dropping the claim releases the Lease at once.
    drop(claim);
    let lease = api.world().leases[LEASE_PATH].clone();
    assert!(lease["spec"].get("holderIdentity").is_none(), "{lease}");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_controller_refuses_without_writing() {
    let api = ApiServer::start().await;
    let first = api.sink("controller-a");
    let _claim = first.claim().await.expect("first claim");
    api.clear();
    let second = api.sink("controller-b");
    match second.claim().await {
        Err(SinkError::Busy(why)) => {
            assert!(why.contains("held by controller-a"), "{why}");
            assert!(
                why.contains("Lease shop/meshcanary-checkout-canary"),
                "{why}"
            );
        }
        other => panic!("expected Busy, got {:?}", other.map(|_| ())),
    }
    assert_eq!(
        api.lines(),
        vec![format!("GET {}", LEASE_PATH)],
        "the second controller only looked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over_with_a_precondition() {
    let api = ApiServer::start().await;
    api.world().leases.insert(
        LEASE_PATH.to_string(),
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "meshcanary-checkout-canary", "namespace": NS, "resourceVersion": "41"},
            "spec": {"holderIdentity": "crashed-controller", "leaseDurationSeconds": 15,
                     "acquireTime": "2026-01-01T00:00:00.000000Z", "renewTime": "2026-01-01T00:00:10.000000Z",
                     "leaseTransitions": 3}
        }),
    );
    api.world().resource_version = 41;
    let sink = api.sink("controller-b");
    let _claim = sink.claim().await.expect("takes the expired lease");
    let exchanges = api.exchanges();
    assert_eq!(
        exchanges.iter().map(Exchange::line).collect::<Vec<_>>()[..2],
        [
            format!("GET {}", LEASE_PATH),
            format!("PUT {}?&fieldManager=meshcanary {}", LEASE_PATH, JSON)
        ]
    );
    let put = &exchanges[1].body;
    assert_eq!(put["metadata"]["resourceVersion"], "41", "the precondition");
    assert_eq!(put["spec"]["holderIdentity"], "controller-b");
    assert_eq!(put["spec"]["leaseTransitions"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_while_taking_over_is_busy() {
    let api = ApiServer::start().await;
    api.world().leases.insert(
        LEASE_PATH.to_string(),
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "meshcanary-checkout-canary", "namespace": NS, "resourceVersion": "7"},
            "spec": {"leaseDurationSeconds": 1, "renewTime": "2026-01-01T00:00:10.000000Z"}
        }),
    );
    let (code, ct, body) = status(
        409,
        "Conflict",
        "Operation cannot be fulfilled on leases.coordination.k8s.io \"meshcanary-checkout-canary\": the object has been modified; please apply your changes to the latest version and try again",
        json!({"name": "meshcanary-checkout-canary", "group": "coordination.k8s.io", "kind": "leases"}),
    );
    api.answer("PUT", LEASE_PATH, Behavior::Respond(code, ct, body));
    match api.sink("controller-b").claim().await {
        Err(SinkError::Busy(why)) => {
            assert!(why.contains("another controller got it first"), "{why}");
            assert!(why.contains("the object has been modified"), "{why}");
        }
        other => panic!("expected Busy, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_by_another_writer_stops_the_writes() {
    let api = ApiServer::start().await;
    let sink = api.sink_with(Options {
        renew_every: Duration::from_millis(100),
        ..options("controller-a")
    });
    let _claim = sink.claim().await.expect("claim");
    // Someone else writes the Lease: the next renewal's precondition fails.
    {
        let mut w = api.world();
        let version = w.next_version();
        let lease = w.leases.get_mut(LEASE_PATH).expect("lease");
        lease["metadata"]["resourceVersion"] = json!(version);
        lease["spec"]["holderIdentity"] = json!("controller-b");
    }
    // The renewal (every 100 ms) finds out; 1.4 s leaves it room on a loaded machine and
    // stays far inside the 10 s renew deadline.
    tokio::time::sleep(Duration::from_millis(1400)).await;
    api.clear();
    match sink.apply(&policy(500), &record()).await {
        Err(SinkError::Busy(why)) => {
            assert!(
                why.contains("lost Lease shop/meshcanary-checkout-canary"),
                "{why}"
            );
            assert!(why.contains("another writer changed the Lease"), "{why}");
        }
        other => panic!("expected Busy, got {:?}", other),
    }
    assert!(
        api.exchanges().is_empty(),
        "no write after losing the lease"
    );
}

// ---------------------------------------------------------------------------------------
// Errors the API server answers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_on_the_envoy_filter_is_busy() {
    let api = ApiServer::start().await;
    let (code, ct, body) = status(
        409,
        "Conflict",
        "Operation cannot be fulfilled on envoyfilters.networking.istio.io \"checkout-canary\": the object has been modified; please apply your changes to the latest version and try again",
        json!({"name": NAME, "group": "networking.istio.io", "kind": "envoyfilters"}),
    );
    api.answer("PATCH", EF_PATH, Behavior::Respond(code, ct, body));
    match api
        .sink("controller-a")
        .apply(&policy(500), &record())
        .await
    {
        Err(SinkError::Busy(why)) => {
            assert!(
                why.starts_with("PATCH envoyfilters.networking.istio.io shop/checkout-canary: "),
                "{why}"
            );
            assert!(why.contains("the object has been modified"), "{why}");
        }
        other => panic!("expected Busy, got {:?}", other),
    }
    assert_eq!(api.lines(), vec![ef_apply_line()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_names_the_missing_rbac_verb_and_resource() {
    let api = ApiServer::start().await;
    let (code, ct, body) = status(
        403,
        "Forbidden",
        "envoyfilters.networking.istio.io \"checkout-canary\" is forbidden: User \"system:serviceaccount:meshcanary:meshcanary\" cannot patch resource \"envoyfilters\" in API group \"networking.istio.io\" in the namespace \"shop\"",
        json!({"name": NAME, "group": "networking.istio.io", "kind": "envoyfilters"}),
    );
    api.answer("PATCH", EF_PATH, Behavior::Respond(code, ct, body));
    let error = api
        .sink("controller-a")
        .apply(&policy(500), &record())
        .await
        .expect_err("forbidden");
    let text = error.to_string();
    assert!(matches!(error, SinkError::Api { .. }), "{text}");
    assert!(
        text.contains("forbidden: RBAC does not let this controller patch envoyfilters.networking.istio.io in namespace shop"),
        "{text}"
    );
    assert!(
        text.contains("verbs get, create, patch on envoyfilters.networking.istio.io"),
        "{text}"
    );

    // The Lease: creating it needs `create` on leases.
    let (code, ct, body) = status(
        403,
        "Forbidden",
        "leases.coordination.k8s.io is forbidden: User \"system:serviceaccount:meshcanary:meshcanary\" cannot create resource \"leases\" in API group \"coordination.k8s.io\" in the namespace \"shop\"",
        json!({"group": "coordination.k8s.io", "kind": "leases"}),
    );
    api.answer("POST", LEASES_PATH, Behavior::Respond(code, ct, body));
    let text = api
        .sink("controller-a")
        .claim()
        .await
        .err()
        .expect("forbidden")
        .to_string();
    assert!(
        text.contains("forbidden: RBAC does not let this controller create leases.coordination.k8s.io in namespace shop"),
        "{text}"
    );
    assert!(
        text.contains("verbs get, create, update on leases.coordination.k8s.io"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_envoy_filter_crd_says_istio_is_not_installed() {
    let api = ApiServer::start().await;
    api.world().crd_installed = false;
    let sink = api.sink("controller-a");
    for error in [
        sink.apply(&policy(500), &record())
            .await
            .expect_err("no CRD"),
        sink.load().await.expect_err("no CRD"),
        sink.abort_marked().await.expect_err("no CRD"),
    ] {
        let text = error.to_string();
        assert!(text.contains("Istio is not installed"), "{text}");
        assert!(text.contains("envoyfilters.networking.istio.io"), "{text}");
        assert!(text.contains("404 page not found"), "{text}");
    }
    assert_eq!(
        api.lines(),
        vec![
            ef_apply_line(),
            format!("GET {}", EF_PATH),
            format!("GET {}", EF_PATH)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_live_after_a_restart_is_one_get_comparing_the_generation_annotation() {
    let api = ApiServer::start().await;
    let sink = api.sink("controller-a");
    let _claim = sink.claim().await.expect("claim");
    let mut record = record();
    // Nothing applied yet: not live.
    api.clear();
    assert!(!sink.is_live(&record).await.expect("is_live"));
    assert_eq!(api.lines(), vec![format!("GET {EF_PATH}")]);
    sink.apply(&policy(2500), &record).await.expect("apply");
    api.clear();
    assert!(sink.is_live(&record).await.expect("is_live"));
    assert_eq!(
        api.lines(),
        vec![format!("GET {EF_PATH}")],
        "one GET, nothing written"
    );
    // Someone else's object, or an older one, carries another generation.
    record.generation += 1;
    assert!(!sink.is_live(&record).await.expect("is_live"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_envoy_filter_is_no_record_yet() {
    let api = ApiServer::start().await;
    let sink = api.sink("controller-a");
    assert_eq!(sink.load().await.expect("load"), None);
    assert!(!sink.abort_marked().await.expect("abort_marked"));
    // Saving before anything was applied has nothing to save into.
    let text = sink
        .save(&record())
        .await
        .expect_err("nothing applied")
        .to_string();
    assert!(
        text.contains("the EnvoyFilter does not exist yet"),
        "{text}"
    );
    assert!(api.world().live.is_empty(), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_namespace_is_named() {
    let api = ApiServer::start().await;
    let (code, ct, body) = status(
        404,
        "NotFound",
        "namespaces \"shop\" not found",
        json!({"name": "shop", "kind": "namespaces"}),
    );
    api.answer("PATCH", EF_PATH, Behavior::Respond(code, ct, body));
    let text = api
        .sink("controller-a")
        .apply(&policy(500), &record())
        .await
        .expect_err("no namespace")
        .to_string();
    assert!(text.contains("namespace \"shop\" does not exist"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_that_does_not_answer_times_out() {
    let api = ApiServer::start().await;
    api.answer("GET", LEASE_PATH, Behavior::Hang);
    let sink = api.sink_with(Options {
        request_timeout: Duration::from_millis(300),
        ..options("controller-a")
    });
    let started = std::time::Instant::now();
    let text = sink.claim().await.err().expect("timeout").to_string();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        text,
        "GET leases.coordination.k8s.io shop/meshcanary-checkout-canary: the Kubernetes API server did not answer within 300 ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_cannot_be_renewed_in_time_stops_the_writes() {
    let api = ApiServer::start().await;
    let sink = api.sink_with(Options {
        lease_duration: Duration::from_secs(1),
        renew_every: Duration::from_millis(150),
        request_timeout: Duration::from_millis(150),
        ..options("controller-a")
    });
    let _claim = sink.claim().await.expect("claim");
    sink.apply(&policy(500), &record())
        .await
        .expect("apply while held");
    // From now on, renewals hang: after a whole lease duration, the lease is gone.
    api.answer("PUT", LEASE_PATH, Behavior::Hang);
    tokio::time::sleep(Duration::from_millis(1400)).await;
    api.clear();
    match sink.save(&record()).await {
        Err(SinkError::Busy(why)) => {
            assert!(
                why.contains("not renewed for") || why.contains("expired"),
                "{why}"
            );
        }
        other => panic!("expected Busy, got {:?}", other),
    }
    assert!(
        api.exchanges().is_empty(),
        "no write once the lease may be someone else's"
    );
}

// ---------------------------------------------------------------------------------------
// The record and the abort mark.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_round_trips_through_a_controller_restart() {
    let api = ApiServer::start().await;
    let written = record();
    {
        let before = api.sink("controller-a");
        let _claim = before.claim().await.expect("claim");
        before.apply(&policy(2500), &written).await.expect("apply");
        let mut later = written.clone();
        later.updated_unix_ms += 10_000;
        later.state.reason = "holding: 200 of 300 canary requests in this step".to_string();
        before.save(&later).await.expect("save");
        // The controller stops: its claim is dropped (the Lease released).
    }
    let applied_spec = api.world().live[EF_PATH]["spec"].clone();
    api.clear();

    // A restarted controller: a new process, identity and sink.
    let after = api.sink("controller-b");
    let _claim = after
        .claim()
        .await
        .expect("the released lease is free at once");
    let loaded = after.load().await.expect("load").expect("a record");
    assert_eq!(loaded.state.step, written.state.step, "same step");
    assert_eq!(loaded.applied_weight, 25);
    assert_eq!(loaded.generation, 3);
    assert_eq!(loaded.rollout, written.rollout);
    assert_eq!(loaded.state.errors, written.state.errors);
    assert_eq!(
        loaded.state.reason,
        "holding: 200 of 300 canary requests in this step"
    );
    // Saving before any apply re-applies the spec it found, so nothing is lost.
    after.save(&loaded).await.expect("save after restart");
    let exchanges = api.exchanges();
    let last = exchanges.last().expect("a write");
    assert_eq!(last.line(), ef_apply_line());
    assert_eq!(last.body["spec"], applied_spec);
    assert_eq!(api.world().live[EF_PATH]["spec"], applied_spec);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_abort_mark_is_a_merge_patch_the_applies_leave_alone() {
    let api = ApiServer::start().await;
    let sink = api.sink("controller-a");
    // Nothing to mark before the EnvoyFilter exists, and nothing is created.
    sink.set_abort_mark(true).await.expect("no object, no mark");
    assert!(api.world().live.is_empty());
    sink.apply(&policy(500), &record()).await.expect("apply");
    api.clear();

    sink.set_abort_mark(true).await.expect("mark");
    let exchanges = api.exchanges();
    assert_eq!(
        exchanges[0].line(),
        format!("PATCH {}?&fieldManager=meshcanary-abort {}", EF_PATH, MERGE)
    );
    assert_eq!(
        exchanges[0].body,
        json!({"metadata": {"annotations": {"meshcanary.io/abort": "aborted by an operator"}}})
    );
    assert!(sink.abort_marked().await.expect("read"));
    // The controller's next apply does not list the mark, and does not remove it.
    sink.save(&record()).await.expect("save");
    assert!(sink.abort_marked().await.expect("read"));
    assert_eq!(
        api.world().live[EF_PATH]["metadata"]["annotations"][RECORD_ANNOTATION],
        json!(serde_json::to_string(&record()).expect("json"))
    );

    api.clear();
    sink.set_abort_mark(false).await.expect("clear");
    assert_eq!(
        api.exchanges()[0].body,
        json!({"metadata": {"annotations": {"meshcanary.io/abort": null}}})
    );
    assert!(!sink.abort_marked().await.expect("read"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_promote_marks_are_merge_patches_and_one_get_reads_every_mark_fake_api_server() {
    use meshcanary_controller::control::{MarkKind, Marks};
    let api = ApiServer::start().await;
    let sink = api.sink("controller-a");
    sink.apply(&policy(500), &record()).await.expect("apply");
    api.clear();

    sink.set_operator_mark(MarkKind::Pause, Some("ops via meshcanary pause"))
        .await
        .expect("pause mark");
    sink.set_operator_mark(MarkKind::Promote, Some("force: ops"))
        .await
        .expect("promote mark");
    let exchanges = api.exchanges();
    assert_eq!(exchanges.len(), 2);
    for e in &exchanges {
        assert_eq!(
            e.line(),
            format!(
                "PATCH {}?&fieldManager=meshcanary-operator {}",
                EF_PATH, MERGE
            )
        );
    }
    assert_eq!(
        exchanges[0].body,
        json!({"metadata": {"annotations": {"meshcanary.io/pause": "ops via meshcanary pause"}}})
    );
    assert_eq!(
        exchanges[1].body,
        json!({"metadata": {"annotations": {"meshcanary.io/promote": "force: ops"}}})
    );

    // The driver's per-tick read: one GET, as abort_marked alone was.
    api.clear();
    let marks = sink.operator_marks().await.expect("marks");
    assert_eq!(
        marks,
        Marks {
            abort: false,
            pause: Some("ops via meshcanary pause".into()),
            promote: Some("force: ops".into()),
        }
    );
    let exchanges = api.exchanges();
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].method, "GET");
    // The controller's applies leave the marks alone; the promote request is removed.
    sink.save(&record()).await.expect("save");
    sink.set_operator_mark(MarkKind::Promote, None)
        .await
        .expect("remove");
    assert_eq!(
        api.exchanges().last().map(|e| e.body.clone()),
        Some(json!({"metadata": {"annotations": {"meshcanary.io/promote": null}}}))
    );
    let marks = sink.operator_marks().await.expect("marks");
    assert_eq!(marks.pause.as_deref(), Some("ops via meshcanary pause"));
    assert_eq!(marks.promote, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeconfig_named_in_the_spec_is_used_with_one_tls_provider() {
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = |server: &str| {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nobody\n    namespace: shop\ncurrent-context: fake\nusers:\n- name: nobody\n  user: {{}}\n"
        )
    };
    // Plain HTTP: the sink makes its own client from the file and reaches the fake.
    let plain = dir.path().join("plain.yaml");
    std::fs::write(&plain, kubeconfig(&format!("http://{}", api.addr))).expect("write");
    let mut spec = kubernetes_spec();
    spec.kubeconfig = Some(plain);
    let sink = Kubernetes::new(spec.clone(), steps()).with_options(options("controller-a"));
    assert_eq!(sink.load().await.expect("load"), None);
    assert_eq!(api.lines(), vec![format!("GET {}", EF_PATH)]);
    // HTTPS: building the TLS client must not panic over the CryptoProvider (ring is
    // the only one, installed explicitly); the handshake with a plain-HTTP server fails.
    let tls = dir.path().join("tls.yaml");
    std::fs::write(&tls, kubeconfig(&format!("https://{}", api.addr))).expect("write");
    spec.kubeconfig = Some(tls);
    let sink = Kubernetes::new(spec, steps()).with_options(options("controller-a"));
    let text = sink
        .load()
        .await
        .expect_err("TLS to a plain server")
        .to_string();
    assert!(
        text.contains("cannot reach the Kubernetes API server"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitops_seeded_envoy_filter_starts_a_fresh_rollout() {
    let api = ApiServer::start().await;
    // A GitOps tool applied the output of `meshcanary render SPEC --sink kubernetes`.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("policy.json"), policy(1000).to_string()).expect("policy");
    std::fs::write(
        dir.path().join("spec.yaml"),
        "policy: policy.json\nsplit_rule: rollout\ncanary: canary\nsteps: [5, 25, 50, 100]\nsink:\n  kubernetes:\n    namespace: shop\n    name: checkout-canary\n    workload_selector: {labels: {app: frontend}}\n    wasm: {local: /var/local/lib/wasm/meshcanary_filter.wasm}\n",
    )
    .expect("spec");
    let spec = meshcanary_controller::spec::RolloutSpec::load(&dir.path().join("spec.yaml"))
        .expect("valid spec");
    let manifest: Value = serde_saphyr::from_str(
        &meshcanary_controller::sink::kubernetes::render_manifest(&spec).expect("manifest"),
    )
    .expect("YAML");
    {
        let mut w = api.world();
        w.layers.insert(
            EF_PATH.to_string(),
            vec![("argocd-controller".to_string(), manifest.clone())],
        );
        w.rebuild(EF_PATH);
    }
    let sink = api.sink("controller-a");
    let _claim = sink.claim().await.expect("claim");
    assert_eq!(
        sink.load().await.expect("load"),
        None,
        "no record: a fresh rollout"
    );
    sink.apply(&policy(500), &record()).await.expect("apply");
    let live = api.world().live[EF_PATH].clone();
    assert_eq!(
        live["spec"], manifest["spec"],
        "the seed was the first step's object"
    );
    assert_eq!(live["metadata"]["annotations"]["meshcanary.io/step"], "2/4");
    assert!(live["metadata"]["annotations"]
        .get(RECORD_ANNOTATION)
        .is_some());
}
