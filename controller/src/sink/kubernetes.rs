//! The Kubernetes sink: the policy lives in an Istio `EnvoyFilter`
//! (`networking.istio.io/v1alpha3`, plural `envoyfilters`), which the controller writes
//! through the Kubernetes API by server-side apply, as a [`DynamicObject`].
//!
//! # What is written
//!
//! The EnvoyFilter follows Istio's documented ECDS pattern, "Distributing WebAssembly
//! Modules" (istio.io `docs/ops/configuration/extensibility/wasm-module-distribution`,
//! source `istio/istio.io` `content/en/docs/ops/configuration/extensibility/wasm-module-distribution/index.md`),
//! with the Wasm message typed directly as in the `wasm-example` of the EnvoyFilter
//! reference (`istio/api` `networking/v1alpha3/envoy_filter.proto`):
//!
//! 1. first, an `EXTENSION_CONFIG` patch (`operation: ADD`) whose value is the
//!    `TypedExtensionConfig` named after the filter, its `typed_config` the same Wasm
//!    message the ECDS file sink writes ([`wasm_filter_config_with_code`]), the module
//!    from a path on the proxy (`vm_config.code.local.filename`) or downloaded by the
//!    Istio agent (`vm_config.code.remote.http_uri.uri` + `sha256`: an `https://` module
//!    and its sha256, or an `oci://…@sha256:…` image and its manifest digest; the agent
//!    rewrites every ECDS resource with a remote Wasm module, whoever wrote it, in
//!    `istio/istio` `pkg/wasm/convert.go`, and pulls `oci://` images with
//!    `pkg/wasm/imagefetcher.go`). It has no `match`:
//!    istiod hands an added extension config to every proxy the EnvoyFilter selects whose
//!    filters ask for that name (`InsertedExtensionConfigurations`, `istio/istio`
//!    `pilot/pkg/networking/core/envoyfilter/extension_configuration_patch.go`), so one
//!    serves both contexts;
//! 2. for each context (`SIDECAR_OUTBOUND`, `GATEWAY`), an `HTTP_FILTER` patch inserting
//!    the filter before `envoy.filters.http.router` with `config_discovery`:
//!    `config_source: {ads: {}, initial_fetch_timeout: 0s}` and `type_urls` the Wasm
//!    type, exactly as the Istio page (a listener waits for its filter configuration
//!    instead of serving without it, and a module that fails to download keeps the
//!    previous listener in place).
//!
//! The HTTP_FILTER patches never carry the policy, so a weight change leaves the
//! listeners istiod generates unchanged and only the ECDS resource differs: Envoy keeps
//! its listeners (connections do not drain) and swaps the filter configuration.
//!
//! # The record
//!
//! The rollout record is the annotation [`RECORD_ANNOTATION`] (JSON), next to short
//! human-readable ones ([`STEP_ANNOTATION`], [`WEIGHT_ANNOTATION`], [`PHASE_ANNOTATION`],
//! [`REASON_ANNOTATION`], [`GENERATION_ANNOTATION`]) so that
//! `kubectl get envoyfilter NAME -o yaml` shows the rollout at a glance, and a restarted
//! controller resumes from it. No annotation key contains `istio.io`: istiod skips the
//! push for an EnvoyFilter update whose spec is unchanged unless a label or annotation
//! key contains `istio.io` (`needsPush`, `istio/istio` `pilot/pkg/bootstrap/config_compare.go`),
//! so the per-tick record saves cost the mesh nothing.
//!
//! # Writes
//!
//! Every write of the object is a server-side apply (`PATCH`,
//! `application/apply-patch+yaml`) under field manager [`FIELD_MANAGER`] with
//! `force=true`: the controller is the designated owner of what it applies (a GitOps tool
//! that created the object from `meshcanary render --sink kubernetes` included), and a
//! rollback to 0 % must not be blocked by a field-ownership conflict with another
//! manager. Keeping two *controllers* apart is the Lease's job, not SSA conflicts'.
//! Because an apply that leaves out a field it applied before deletes it, the record-only
//! [`ConfigSink::save`] re-applies the last applied spec with the new record.
//!
//! The operator's abort mark, [`ABORT_ANNOTATION`], is a JSON merge patch under field
//! manager [`ABORT_FIELD_MANAGER`]: the controller's applies never list it, so they
//! never remove it (`kubectl annotate envoyfilter NAME meshcanary.io/abort=yes` works too).
//!
//! # Single writer
//!
//! A `coordination.k8s.io/v1` Lease, `meshcanary-<name>` in the EnvoyFilter's namespace
//! ([`lease_name`]), taken by [`ConfigSink::claim`]: created when missing, taken over
//! when released or expired (`renewTime + leaseDurationSeconds` in the past) with a
//! `resourceVersion` precondition, otherwise refused with [`SinkError::Busy`]. A
//! background task renews it (again with a `resourceVersion` precondition). A failed
//! precondition, or no successful renewal for two thirds of the lease duration (the
//! renew deadline, like client-go's 10 s of 15 s), means the lease is lost, and every
//! later write of this sink fails with `Busy`; the last third is the margin for a write
//! in flight and for clock skew. Dropping the claim releases the Lease (unless the
//! runtime is already shutting down); a crashed controller's Lease expires after
//! [`Options::lease_duration`]. Expiry compares the Lease's `renewTime` with this
//! machine's clock, so clocks must agree to well under a third of the lease duration.
//!
//! Why a Lease rather than `resourceVersion` preconditions on the EnvoyFilter: a second
//! controller is refused before it writes anything (with preconditions alone, the
//! newcomer's first write can win and the running controller is the one that fails);
//! operators' writes to the EnvoyFilter (the abort mark, `kubectl annotate`, a GitOps
//! sync) do not turn into conflicts for the controller; and a crashed controller's claim
//! expires by itself, like the ECDS file sink's OS lock.
//!
//! # Confirmation
//!
//! [`ConfigSink::apply`] returns once the API server accepted the write. The proxies'
//! ECDS acknowledgements are not visible through the Kubernetes API (istiod debounces
//! and pushes asynchronously, usually well under a second); check them with
//! `istioctl proxy-status` / `istioctl proxy-config`, and watch istiod's
//! `pilot_total_xds_rejects{type="type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"}`
//! for a configuration the proxies refused.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::core::Status;
use kube::Client;
use serde_json::{json, Map, Value};

use super::ecds_file::wasm_filter_config_with_code;
use super::{ConfigSink, Record, SinkError};
use crate::control::{MarkKind, Marks};
use crate::spec::{KubernetesSpec, RolloutSpec, SinkSpec, WasmCode};
use crate::verdict::Phase;

/// The EnvoyFilter's API group.
pub const GROUP: &str = "networking.istio.io";
/// The EnvoyFilter's API version.
pub const VERSION: &str = "v1alpha3";
/// The EnvoyFilter's kind.
pub const KIND: &str = "EnvoyFilter";
/// The EnvoyFilter's resource (plural).
pub const PLURAL: &str = "envoyfilters";
/// The field manager of every apply of the EnvoyFilter (and of the Lease's writes).
pub const FIELD_MANAGER: &str = "meshcanary";
/// The field manager of the abort mark.
pub const ABORT_FIELD_MANAGER: &str = "meshcanary-abort";
/// The rollout record ([`Record`] as JSON).
pub const RECORD_ANNOTATION: &str = "meshcanary.io/rollout";
/// `2/5`: the step being judged, of how many.
pub const STEP_ANNOTATION: &str = "meshcanary.io/step";
/// The canary's weight, in percent, of the policy written.
pub const WEIGHT_ANNOTATION: &str = "meshcanary.io/canary-weight";
/// `progressing`, `promoted`, `rolled-back` or `aborted`.
pub const PHASE_ANNOTATION: &str = "meshcanary.io/phase";
/// The last verdict's reason, in words.
pub const REASON_ANNOTATION: &str = "meshcanary.io/reason";
/// The record's generation (the version of the policy written).
pub const GENERATION_ANNOTATION: &str = "meshcanary.io/generation";
/// Present when an operator asked to abort.
pub const ABORT_ANNOTATION: &str = "meshcanary.io/abort";
/// Present while an operator's pause stands (`meshcanary pause`); its value says who
/// asked. Removing it resumes.
pub const PAUSE_ANNOTATION: &str = "meshcanary.io/pause";
/// An operator's promote request (`meshcanary promote`): the value names the request,
/// a first word `force` forces it; the controller removes it once read.
pub const PROMOTE_ANNOTATION: &str = "meshcanary.io/promote";
/// The field manager of the pause and promote marks.
pub const OPERATOR_FIELD_MANAGER: &str = "meshcanary-operator";
/// The label on everything this sink creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshcanary");
/// The Wasm filter's type URL, the only one `config_discovery` accepts.
pub const WASM_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// The filter the meshcanary filter is inserted before.
pub const ROUTER_FILTER: &str = "envoy.filters.http.router";
/// The network filter holding the HTTP filters.
pub const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";

const ENVOYFILTERS: &str = "envoyfilters.networking.istio.io";
const LEASES: &str = "leases.coordination.k8s.io";

/// Timing and identity of the sink; the defaults suit a real cluster, tests shorten them.
#[derive(Debug, Clone)]
pub struct Options {
    /// `holderIdentity` written into the Lease: host name, process id and a nonce.
    pub identity: String,
    /// `leaseDurationSeconds`: how long a Lease lasts without renewal (whole seconds,
    /// at least 1). Default 15 s.
    pub lease_duration: Duration,
    /// How often the claim renews the Lease. Default 5 s.
    pub renew_every: Duration,
    /// How long one API request may take before it counts as failed. Default 5 s (at
    /// most the margin between the renew deadline and the lease duration).
    pub request_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            identity: default_identity(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// `<host>_<pid>_<nonce>`: unique per process, and says where the holder runs.
fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown-host".to_string());
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{}_{}_{:08x}", host, std::process::id(), nonce)
}

/// The Lease that makes one controller the EnvoyFilter's only writer.
pub fn lease_name(envoy_filter: &str) -> String {
    format!("meshcanary-{}", envoy_filter)
}

/// The EnvoyFilter's resource, for [`Api::namespaced_with`].
pub fn envoy_filter_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

/// The EnvoyFilter's `spec` for a policy (see the module documentation).
pub fn envoy_filter_spec(spec: &KubernetesSpec, policy: &Value) -> Value {
    let name = spec.filter_name.as_str();
    let code = match &spec.wasm {
        WasmCode::Local(path) => json!({"local": {"filename": path}}),
        WasmCode::Http { url, sha256 } => {
            json!({"remote": {"http_uri": {"uri": url}, "sha256": sha256}})
        }
        // The Istio agent pulls oci:// URIs itself and compares `sha256` with the pulled
        // manifest's digest. It allows a pull 5 s unless told otherwise; istiod gives a
        // WasmPlugin's pull 30 s, and so does this.
        WasmCode::Oci { url, digest } => {
            json!({"remote": {"http_uri": {"uri": url, "timeout": "30s"}, "sha256": digest}})
        }
    };
    let mut patches = vec![json!({
        "applyTo": "EXTENSION_CONFIG",
        "patch": {
            "operation": "ADD",
            "value": {
                "name": name,
                "typed_config": wasm_filter_config_with_code(name, code, policy, spec.failure_policy),
            }
        }
    })];
    for context in &spec.context {
        patches.push(json!({
            "applyTo": "HTTP_FILTER",
            "match": {
                "context": context.as_str(),
                "listener": {"filterChain": {"filter": {
                    "name": HCM_FILTER,
                    "subFilter": {"name": ROUTER_FILTER}
                }}}
            },
            "patch": {
                "operation": "INSERT_BEFORE",
                "value": {
                    "name": name,
                    "config_discovery": {
                        "config_source": {"ads": {}, "initial_fetch_timeout": "0s"},
                        "type_urls": [WASM_TYPE_URL]
                    }
                }
            }
        }));
    }
    let mut out = json!({ "configPatches": patches });
    if let Some(labels) = &spec.workload_selector {
        out["workloadSelector"] = json!({ "labels": labels });
    }
    out
}

/// The phase as one word, for [`PHASE_ANNOTATION`].
fn phase_word(phase: &Phase) -> &'static str {
    match phase {
        Phase::Progressing => "progressing",
        Phase::Promoted => "promoted",
        Phase::RolledBack { .. } => "rolled-back",
        Phase::Aborted => "aborted",
    }
}

/// `value` with every object's keys in sorted order, whatever serde_json's map is.
fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for key in keys {
                out.insert(key.clone(), sorted(&map[key]));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// Deterministic YAML for a JSON value: keys sorted, two-space indentation, no folded
/// or literal block scalars (long strings stay on one line, as `kubectl` prints them).
pub fn to_yaml(value: &Value) -> Result<String, String> {
    let options = serde_saphyr::ser_options! {
        prefer_block_scalars: false,
    };
    serde_saphyr::to_string_with_options(&sorted(value), options).map_err(|e| e.to_string())
}

/// Why `meshcanary render SPEC --sink kubernetes` cannot print a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The spec has no `sink.kubernetes` section.
    #[error(
        "--sink kubernetes needs a sink.kubernetes section in the spec (namespace, name, wasm, and optionally workload_selector, filter_name, context); this spec's sink is {0}"
    )]
    NotKubernetes(&'static str),
    /// The policy or the object could not be rendered.
    #[error("cannot render the EnvoyFilter: {0}")]
    Render(String),
}

/// What `meshcanary render SPEC --sink kubernetes` prints, without contacting a cluster:
/// the EnvoyFilter as the controller's first apply writes it (the first step's weight),
/// minus the rollout record, which only a controller writes. A controller that finds
/// this object starts the rollout afresh. Same spec and policy, same bytes.
pub fn render_manifest(spec: &RolloutSpec) -> Result<String, ManifestError> {
    let kubernetes = match &spec.sink {
        SinkSpec::Kubernetes(k) => k.clone(),
        SinkSpec::EcdsFile(_) => return Err(ManifestError::NotKubernetes("ecds_file")),
    };
    let weight = spec.judge.steps.first().copied().unwrap_or(0);
    let policy = spec.policy_at(weight).map_err(ManifestError::Render)?;
    // A fixed clock: the same spec and policy must give the same bytes.
    let record = Record {
        applied_weight: weight,
        ..Record::new(spec.id(), Duration::ZERO)
    };
    let contexts: Vec<&str> = kubernetes.context.iter().map(|c| c.as_str()).collect();
    let sink = Kubernetes::new(kubernetes, spec.judge.steps.clone());
    let mut yaml = sink
        .render(&policy, &record)
        .map_err(|e| ManifestError::Render(e.to_string()))?;
    if !yaml.ends_with('\n') {
        yaml.push('\n');
    }
    Ok(format!(
        "# meshcanary: the Istio EnvoyFilter of rollout {policy:?}, split rule {rule:?}, canary {canary:?}.\n\
         # It installs the meshcanary Wasm filter before {router} ({contexts})\n\
         # and delivers its policy by ECDS (EXTENSION_CONFIG + config_discovery), so a weight change\n\
         # does not drain listeners. The canary starts at {weight} %; the controller then moves it by\n\
         # server-side apply and records the rollout in the meshcanary.io/* annotations.\n\
         # Generated by `meshcanary render SPEC --sink kubernetes`: edit the spec, not this file.\n{yaml}",
        policy = record.rollout.policy,
        rule = record.rollout.split_rule,
        canary = record.rollout.canary,
        router = ROUTER_FILTER,
        contexts = contexts.join(", "),
        weight = weight,
        yaml = yaml,
    ))
}

/// One API request, for error messages.
struct Req {
    method: &'static str,
    verb: &'static str,
    resource: &'static str,
    namespace: String,
    name: String,
}

impl Req {
    fn envoy_filter(method: &'static str, verb: &'static str, spec: &KubernetesSpec) -> Req {
        Req {
            method,
            verb,
            resource: ENVOYFILTERS,
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
        }
    }

    fn lease(method: &'static str, verb: &'static str, ctx: &LeaseCtx) -> Req {
        Req {
            method,
            verb,
            resource: LEASES,
            namespace: ctx.namespace.clone(),
            name: ctx.name.clone(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} {} {}/{}",
            self.method, self.resource, self.namespace, self.name
        )
    }

    fn plural(&self) -> &str {
        self.resource.split('.').next().unwrap_or(self.resource)
    }

    /// The verbs the controller's Role must grant on this resource.
    fn needed_verbs(&self) -> &'static str {
        if self.resource == LEASES {
            "get, create, update"
        } else {
            "get, create, patch"
        }
    }
}

/// A failed request: the object is missing (which callers may expect), or anything else.
enum Failure {
    ObjectMissing,
    Other(SinkError),
}

impl Failure {
    fn into_sink(self, req: &Req) -> SinkError {
        match self {
            Failure::ObjectMissing => SinkError::Api {
                request: req.describe(),
                reason: "not found".to_string(),
            },
            Failure::Other(e) => e,
        }
    }
}

/// `kubectl`'s verb in a Forbidden message: `… cannot patch resource "envoyfilters" …`.
fn verb_in(message: &str) -> Option<&str> {
    let rest = message.split(" cannot ").nth(1)?;
    let verb = rest.split_whitespace().next()?;
    rest.contains("resource").then_some(verb)
}

/// Turns an API server's answer into a sink error that says what to do.
fn classify_status(req: &Req, status: &Status) -> Failure {
    let request = req.describe();
    let server = if status.message.is_empty() {
        status.reason.clone()
    } else {
        status.message.clone()
    };
    let api = |reason: String| {
        Failure::Other(SinkError::Api {
            request: request.clone(),
            reason,
        })
    };
    match status.code {
        404 => {
            let details = status
                .details
                .as_ref()
                .filter(|_| status.reason == "NotFound");
            match details {
                Some(d) if d.kind == req.plural() && d.name == req.name => Failure::ObjectMissing,
                Some(d) if d.kind == "namespaces" => api(format!(
                    "namespace {:?} does not exist (API server: {})",
                    d.name, server
                )),
                _ if req.resource == ENVOYFILTERS => api(format!(
                    "the API server does not serve {}/{} {}: Istio is not installed in this cluster (the EnvoyFilter CRD {} is missing; `kubectl get crd {}` shows it once Istio is installed) (API server: {})",
                    GROUP, VERSION, PLURAL, ENVOYFILTERS, ENVOYFILTERS, server.trim()
                )),
                _ => api(format!(
                    "the API server does not serve {} (API server: {})",
                    req.resource,
                    server.trim()
                )),
            }
        }
        403 => {
            let verb = verb_in(&status.message).unwrap_or(req.verb);
            api(format!(
                "forbidden: RBAC does not let this controller {} {} in namespace {}; grant it with a Role bound to the controller's service account (verbs {} on {}) (API server: {})",
                verb,
                req.resource,
                req.namespace,
                req.needed_verbs(),
                req.resource,
                server
            ))
        }
        401 => api(format!(
            "unauthorized: the API server rejected the controller's credentials (API server: {})",
            server
        )),
        409 => Failure::Other(SinkError::Busy(format!("{}: {}", request, server))),
        400 | 422 => api(format!(
            "the API server refused the object as invalid: {}",
            server
        )),
        code => api(format!("HTTP {} {}: {}", code, status.reason, server)),
    }
}

fn classify(req: &Req, error: kube::Error) -> Failure {
    match error {
        kube::Error::Api(status) => classify_status(req, &status),
        other => Failure::Other(SinkError::Api {
            request: req.describe(),
            reason: format!("cannot reach the Kubernetes API server: {}", other),
        }),
    }
}

/// Runs one request with a deadline.
async fn timed<T>(
    timeout: Duration,
    req: &Req,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(classify(req, e)),
        Err(_) => Err(Failure::Other(SinkError::Api {
            request: req.describe(),
            reason: format!(
                "the Kubernetes API server did not answer within {} ms",
                timeout.as_millis()
            ),
        })),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Installs ring as rustls's process-wide provider unless one is installed already:
/// kube builds its TLS configuration from the process default, and two compiled-in
/// providers without an installed default panic at the first client.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The Kubernetes sink.
pub struct Kubernetes {
    spec: KubernetesSpec,
    steps: Vec<u32>,
    options: Options,
    client: tokio::sync::OnceCell<Client>,
    /// The EnvoyFilter's spec as last applied (or loaded with this controller's record):
    /// [`ConfigSink::save`] applies it again, since an apply that left it out would
    /// delete it.
    last_spec: Mutex<Option<Value>>,
    /// The claim's state, once this sink claimed the Lease.
    lease: Mutex<Option<Arc<LeaseShared>>>,
}

impl Kubernetes {
    /// A sink for this part of the spec and the rollout's steps (for the step
    /// annotation). The client is made on first use: `render` needs none.
    pub fn new(spec: KubernetesSpec, steps: Vec<u32>) -> Kubernetes {
        Kubernetes {
            spec,
            steps,
            options: Options::default(),
            client: tokio::sync::OnceCell::new(),
            last_spec: Mutex::new(None),
            lease: Mutex::new(None),
        }
    }

    /// Uses `client` instead of one made from the kubeconfig (tests, embedding).
    pub fn with_client(mut self, client: Client) -> Kubernetes {
        self.client = tokio::sync::OnceCell::new_with(Some(client));
        self
    }

    /// Other timing or identity.
    pub fn with_options(mut self, options: Options) -> Kubernetes {
        self.options = options;
        self
    }

    /// The options in use.
    pub fn options(&self) -> &Options {
        &self.options
    }

    async fn client(&self) -> Result<Client, SinkError> {
        let made = self
            .client
            .get_or_try_init(|| async {
                install_crypto_provider();
                let config = match &self.spec.kubeconfig {
                    Some(path) => {
                        let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                            SinkError::Io {
                                path: path.display().to_string(),
                                reason: format!("not a usable kubeconfig: {}", e),
                            }
                        })?;
                        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                            .await
                            .map_err(|e| SinkError::Io {
                                path: path.display().to_string(),
                                reason: format!("not a usable kubeconfig: {}", e),
                            })?
                    }
                    None => kube::Config::infer().await.map_err(|e| SinkError::Api {
                        request: "connect".to_string(),
                        reason: format!(
                            "no Kubernetes configuration found (in-cluster, KUBECONFIG, ~/.kube/config; or set sink.kubernetes.kubeconfig; `meshcanary render SPEC --sink kubernetes` needs none): {}",
                            e
                        ),
                    })?,
                };
                Client::try_from(config).map_err(|e| SinkError::Api {
                    request: "connect".to_string(),
                    reason: format!("cannot make a Kubernetes client: {}", e),
                })
            })
            .await?;
        Ok(made.clone())
    }

    async fn envoy_filters(&self) -> Result<Api<DynamicObject>, SinkError> {
        Ok(Api::namespaced_with(
            self.client().await?,
            &self.spec.namespace,
            &envoy_filter_resource(),
        ))
    }

    async fn lease_ctx(&self) -> Result<LeaseCtx, SinkError> {
        Ok(LeaseCtx {
            api: Api::namespaced(self.client().await?, &self.spec.namespace),
            namespace: self.spec.namespace.clone(),
            name: lease_name(&self.spec.name),
            identity: self.options.identity.clone(),
            duration: self.options.lease_duration.max(Duration::from_secs(1)),
            deadline: renew_deadline(self.options.lease_duration),
            renew_every: self.options.renew_every,
            timeout: self.options.request_timeout,
        })
    }

    /// The annotations written with `record`. A record of generation 0 (nothing applied
    /// by a controller yet: [`render_manifest`]) is not written, so a controller that
    /// finds the object starts afresh.
    pub fn annotations(&self, record: &Record) -> Result<BTreeMap<String, String>, SinkError> {
        let mut out = BTreeMap::new();
        out.insert(
            STEP_ANNOTATION.to_string(),
            format!("{}/{}", record.state.step + 1, self.steps.len()),
        );
        out.insert(
            WEIGHT_ANNOTATION.to_string(),
            record.applied_weight.to_string(),
        );
        out.insert(
            PHASE_ANNOTATION.to_string(),
            phase_word(&record.state.phase).to_string(),
        );
        if !record.state.reason.is_empty() {
            out.insert(REASON_ANNOTATION.to_string(), record.state.reason.clone());
        }
        out.insert(
            GENERATION_ANNOTATION.to_string(),
            record.generation.to_string(),
        );
        if record.generation > 0 {
            let json = serde_json::to_string(record).map_err(|e| SinkError::BadRecord {
                path: self.record_location(),
                reason: e.to_string(),
            })?;
            out.insert(RECORD_ANNOTATION.to_string(), json);
        }
        Ok(out)
    }

    /// The whole object an apply sends: the EnvoyFilter for `spec` with `record`.
    fn object(&self, spec: Value, record: &Record) -> Result<DynamicObject, SinkError> {
        let mut object = DynamicObject::new(&self.spec.name, &envoy_filter_resource())
            .within(&self.spec.namespace)
            .data(json!({ "spec": spec }));
        object.metadata.labels = Some(BTreeMap::from([(
            MANAGED_BY.0.to_string(),
            MANAGED_BY.1.to_string(),
        )]));
        object.metadata.annotations = Some(self.annotations(record)?);
        Ok(object)
    }

    /// The EnvoyFilter an apply of `policy` with `record` sends, as JSON.
    pub fn envoy_filter(&self, policy: &Value, record: &Record) -> Result<Value, SinkError> {
        let object = self.object(envoy_filter_spec(&self.spec, policy), record)?;
        serde_json::to_value(&object).map_err(|e| SinkError::Io {
            path: self.record_location(),
            reason: e.to_string(),
        })
    }

    fn record_location(&self) -> String {
        format!(
            "{} {}/{} annotation {}",
            ENVOYFILTERS, self.spec.namespace, self.spec.name, RECORD_ANNOTATION
        )
    }

    /// Fails when this sink claimed the Lease and no longer holds it.
    fn check_claim(&self) -> Result<(), SinkError> {
        let shared = match lock(&self.lease).clone() {
            Some(shared) => shared,
            None => return Ok(()),
        };
        let state = lock(&shared.state);
        let name = format!(
            "Lease {}/{}",
            self.spec.namespace,
            lease_name(&self.spec.name)
        );
        if let Some(why) = &state.lost {
            return Err(SinkError::Busy(format!(
                "this controller lost {}: {}",
                name, why
            )));
        }
        let since = state.renewed_at.elapsed();
        if since >= renew_deadline(self.options.lease_duration) {
            return Err(SinkError::Busy(format!(
                "this controller's {} may expire: not renewed for {} ms",
                name,
                since.as_millis()
            )));
        }
        Ok(())
    }

    /// GET the EnvoyFilter; `None` when it does not exist.
    async fn get(&self) -> Result<Option<DynamicObject>, SinkError> {
        let api = self.envoy_filters().await?;
        let req = Req::envoy_filter("GET", "get", &self.spec);
        match timed(self.options.request_timeout, &req, api.get(&self.spec.name)).await {
            Ok(object) => Ok(Some(object)),
            Err(Failure::ObjectMissing) => Ok(None),
            Err(Failure::Other(e)) => Err(e),
        }
    }

    /// Server-side apply of the whole object under [`FIELD_MANAGER`], forced.
    async fn apply_object(&self, spec: Value, record: &Record) -> Result<(), SinkError> {
        self.check_claim()?;
        let object = self.object(spec.clone(), record)?;
        let api = self.envoy_filters().await?;
        let req = Req::envoy_filter("PATCH", "patch", &self.spec);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let applied = timed(
            self.options.request_timeout,
            &req,
            api.patch(&self.spec.name, &params, &Patch::Apply(&object)),
        )
        .await
        .map_err(|f| f.into_sink(&req))?;
        *lock(&self.last_spec) = Some(spec);
        tracing::debug!(
            resource_version = applied.metadata.resource_version.as_deref().unwrap_or(""),
            generation = record.generation,
            "applied EnvoyFilter {}/{}",
            self.spec.namespace,
            self.spec.name
        );
        Ok(())
    }

    /// A JSON merge patch of the abort annotation under [`ABORT_FIELD_MANAGER`];
    /// nothing to do when the EnvoyFilter does not exist.
    async fn patch_abort(&self, value: Value) -> Result<(), SinkError> {
        self.patch_annotation(ABORT_ANNOTATION, value, ABORT_FIELD_MANAGER)
            .await
    }

    /// A JSON merge patch of one annotation (a string sets it, null removes it) under
    /// `manager`; nothing to do when the EnvoyFilter does not exist.
    async fn patch_annotation(
        &self,
        annotation: &str,
        value: Value,
        manager: &str,
    ) -> Result<(), SinkError> {
        let api = self.envoy_filters().await?;
        let req = Req::envoy_filter("PATCH", "patch", &self.spec);
        let patch = json!({"metadata": {"annotations": {annotation: value}}});
        let params = PatchParams {
            field_manager: Some(manager.to_string()),
            ..PatchParams::default()
        };
        match timed(
            self.options.request_timeout,
            &req,
            api.patch(&self.spec.name, &params, &Patch::Merge(&patch)),
        )
        .await
        {
            Ok(_) | Err(Failure::ObjectMissing) => Ok(()),
            Err(Failure::Other(e)) => Err(e),
        }
    }
}

impl ConfigSink for Kubernetes {
    type Claim = LeaseClaim;

    async fn claim(&self) -> Result<LeaseClaim, SinkError> {
        let ctx = self.lease_ctx().await?;
        let claim = hold_lease(ctx).await?;
        tracing::info!(
            "holding Lease {}/{} as {}",
            claim.ctx.namespace,
            claim.ctx.name,
            claim.ctx.identity
        );
        *lock(&self.lease) = Some(claim.shared.clone());
        Ok(claim)
    }

    async fn load(&self) -> Result<Option<Record>, SinkError> {
        let object = match self.get().await? {
            Some(object) => object,
            None => return Ok(None),
        };
        let json = match object
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RECORD_ANNOTATION))
        {
            Some(json) => json,
            None => return Ok(None),
        };
        let record: Record = serde_json::from_str(json).map_err(|e| SinkError::BadRecord {
            path: self.record_location(),
            reason: e.to_string(),
        })?;
        // The object carries this controller's record, so its spec is what was last
        // applied: `save` can re-apply it before any new `apply`.
        if let Some(spec) = object.data.get("spec") {
            *lock(&self.last_spec) = Some(spec.clone());
        }
        Ok(Some(record))
    }

    async fn apply(&self, policy: &Value, record: &Record) -> Result<(), SinkError> {
        self.apply_object(envoy_filter_spec(&self.spec, policy), record)
            .await
    }

    /// The EnvoyFilter still carries the record's generation (istiod brings restarted
    /// sidecars up to date by itself; what can be lost is the object, deleted or
    /// overwritten by someone else).
    async fn is_live(&self, record: &Record) -> Result<bool, SinkError> {
        let generation = record.generation.to_string();
        Ok(self
            .get()
            .await?
            .is_some_and(|o| annotation_is(&o, GENERATION_ANNOTATION, &generation)))
    }

    async fn save(&self, record: &Record) -> Result<(), SinkError> {
        self.check_claim()?;
        let known = lock(&self.last_spec).clone();
        let spec = match known {
            Some(spec) => spec,
            None => match self.get().await?.and_then(|o| o.data.get("spec").cloned()) {
                Some(spec) => spec,
                None => {
                    return Err(SinkError::Api {
                        request: Req::envoy_filter("PATCH", "patch", &self.spec).describe(),
                        reason: "nothing to save the record into: the EnvoyFilter does not exist yet (no policy was applied)".to_string(),
                    })
                }
            },
        };
        self.apply_object(spec, record).await
    }

    async fn set_abort_mark(&self, on: bool) -> Result<(), SinkError> {
        let value = if on {
            Value::String("aborted by an operator".to_string())
        } else {
            Value::Null
        };
        self.patch_abort(value).await
    }

    async fn abort_marked(&self) -> Result<bool, SinkError> {
        Ok(self.get().await?.is_some_and(|o| {
            o.metadata
                .annotations
                .is_some_and(|a| a.contains_key(ABORT_ANNOTATION))
        }))
    }

    /// One GET of the EnvoyFilter, as [`ConfigSink::abort_marked`] does: its abort,
    /// pause and promote annotations.
    async fn operator_marks(&self) -> Result<Marks, SinkError> {
        let annotations = self
            .get()
            .await?
            .and_then(|o| o.metadata.annotations)
            .unwrap_or_default();
        Ok(Marks {
            abort: annotations.contains_key(ABORT_ANNOTATION),
            pause: annotations.get(PAUSE_ANNOTATION).cloned(),
            promote: annotations.get(PROMOTE_ANNOTATION).cloned(),
        })
    }

    async fn set_operator_mark(&self, kind: MarkKind, text: Option<&str>) -> Result<(), SinkError> {
        let annotation = match kind {
            MarkKind::Pause => PAUSE_ANNOTATION,
            MarkKind::Promote => PROMOTE_ANNOTATION,
        };
        let value = text.map_or(Value::Null, |t| Value::String(t.to_string()));
        self.patch_annotation(annotation, value, OPERATOR_FIELD_MANAGER)
            .await
    }

    fn render(&self, policy: &Value, record: &Record) -> Result<String, SinkError> {
        to_yaml(&self.envoy_filter(policy, record)?).map_err(|e| SinkError::Io {
            path: self.record_location(),
            reason: e,
        })
    }

    fn describe(&self) -> String {
        format!(
            "EnvoyFilter {ns}/{name} ({GROUP}/{VERSION}, server-side apply as {FIELD_MANAGER}; single writer: Lease {ns}/{lease}; applied = accepted by the API server)",
            ns = self.spec.namespace,
            name = self.spec.name,
            lease = lease_name(&self.spec.name),
        )
    }
}

/// What the Lease requests need.
#[derive(Clone)]
struct LeaseCtx {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
    /// Without a successful renewal for this long, the Lease counts as lost.
    deadline: Duration,
    renew_every: Duration,
    timeout: Duration,
}

/// Two thirds of the lease duration (itself at least 1 s): past it, this controller stops
/// writing, a third of the duration before another may take the Lease over.
fn renew_deadline(lease_duration: Duration) -> Duration {
    lease_duration.max(Duration::from_secs(1)) * 2 / 3
}

struct LeaseShared {
    state: Mutex<LeaseState>,
}

struct LeaseState {
    /// The Lease as last written by this controller (its `resourceVersion` is the
    /// precondition of the next write).
    lease: Lease,
    /// When the last successful write was sent.
    renewed_at: Instant,
    /// Why the Lease is no longer this controller's.
    lost: Option<String>,
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// How long `spec`'s holder still holds it, if at all.
fn remaining(spec: &LeaseSpec) -> Option<Duration> {
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?;
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    let left_ms = renewed.0.as_millisecond() + seconds * 1000 - Timestamp::now().as_millisecond();
    u64::try_from(left_ms)
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

impl LeaseCtx {
    fn params(&self) -> PostParams {
        PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PostParams::default()
        }
    }

    fn held_spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = now_micro();
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Creates the Lease, or takes it over when released or expired.
    async fn acquire(&self) -> Result<Lease, SinkError> {
        let get = Req::lease("GET", "get", self);
        let current = match timed(self.timeout, &get, self.api.get(&self.name)).await {
            Ok(lease) => lease,
            Err(Failure::ObjectMissing) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            MANAGED_BY.0.to_string(),
                            MANAGED_BY.1.to_string(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.held_spec(0, None)),
                };
                let create = Req::lease("POST", "create", self);
                return timed(
                    self.timeout,
                    &create,
                    self.api.create(&self.params(), &lease),
                )
                .await
                .map_err(|f| match f.into_sink(&create) {
                    SinkError::Busy(why) => SinkError::Busy(format!(
                        "Lease {}/{} was created by another controller first ({})",
                        self.namespace, self.name, why
                    )),
                    other => other,
                });
            }
            Err(Failure::Other(e)) => return Err(e),
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        if let (Some(holder), false) = (&holder, ours) {
            if let Some(left) = remaining(&spec) {
                return Err(SinkError::Busy(format!(
                    "Lease {}/{} is held by {} for {} more seconds unless renewed (a crashed controller's Lease expires after {} s)",
                    self.namespace,
                    self.name,
                    holder,
                    left.as_secs_f64().ceil(),
                    spec.lease_duration_seconds.unwrap_or(0)
                )));
            }
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours {
            spec.acquire_time.clone()
        } else {
            None
        };
        let mut next = current;
        // `metadata.resourceVersion` stays as read: the update's precondition.
        next.spec = Some(self.held_spec(transitions, acquired));
        let update = Req::lease("PUT", "update", self);
        timed(
            self.timeout,
            &update,
            self.api.replace(&self.name, &self.params(), &next),
        )
        .await
        .map_err(|f| match f.into_sink(&update) {
            SinkError::Busy(why) => SinkError::Busy(format!(
                "Lease {}/{} changed while this controller took it over: another controller got it first ({})",
                self.namespace, self.name, why
            )),
            other => other,
        })
    }

    /// One renewal: the Lease as held, `renewTime` now, `resourceVersion` as last seen.
    async fn renew_once(&self, held: &Lease) -> Result<Lease, Failure> {
        let mut next = held.clone();
        if let Some(spec) = next.spec.as_mut() {
            spec.renew_time = Some(now_micro());
        }
        let update = Req::lease("PUT", "update", self);
        timed(
            self.timeout,
            &update,
            self.api.replace(&self.name, &self.params(), &next),
        )
        .await
    }

    /// Gives the Lease up, so the next controller need not wait for it to expire.
    async fn release(&self, held: Lease) {
        let mut next = held;
        next.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            renew_time: Some(now_micro()),
            acquire_time: next.spec.as_ref().and_then(|s| s.acquire_time.clone()),
            lease_transitions: next.spec.as_ref().and_then(|s| s.lease_transitions),
            ..LeaseSpec::default()
        });
        let update = Req::lease("PUT", "update", self);
        let timeout = self.timeout.min(Duration::from_secs(2));
        match timed(
            timeout,
            &update,
            self.api.replace(&self.name, &self.params(), &next),
        )
        .await
        {
            Ok(_) => tracing::info!("released Lease {}/{}", self.namespace, self.name),
            Err(f) => tracing::warn!(
                "could not release Lease {}/{} (it expires by itself): {}",
                self.namespace,
                self.name,
                f.into_sink(&update)
            ),
        }
    }
}

/// Renews the Lease until the claim is dropped or the Lease is lost.
async fn renew(ctx: LeaseCtx, shared: Arc<LeaseShared>) {
    loop {
        tokio::time::sleep(ctx.renew_every).await;
        let held = lock(&shared.state).lease.clone();
        let sent_at = Instant::now();
        let result = ctx.renew_once(&held).await;
        let mut state = lock(&shared.state);
        match result {
            Ok(lease) => {
                state.lease = lease;
                state.renewed_at = sent_at;
            }
            Err(Failure::ObjectMissing) => {
                state.lost = Some("the Lease was deleted".to_string());
            }
            Err(Failure::Other(SinkError::Busy(why))) => {
                state.lost = Some(format!("another writer changed the Lease ({})", why));
            }
            Err(Failure::Other(e)) => {
                let since = state.renewed_at.elapsed();
                tracing::warn!("cannot renew Lease {}/{}: {}", ctx.namespace, ctx.name, e);
                if since >= ctx.deadline {
                    state.lost = Some(format!(
                        "not renewed for {} ms, past the renew deadline (last error: {})",
                        since.as_millis(),
                        e
                    ));
                }
            }
        }
        if let Some(why) = &state.lost {
            tracing::error!(
                "lost Lease {}/{}: {}; this controller stops writing",
                ctx.namespace,
                ctx.name,
                why
            );
            return;
        }
    }
}

/// This controller's hold on the Lease: renewed in the background while it lives,
/// released when dropped: at once on a multi-threaded runtime, by a spawned task on a
/// current-thread one, not at all outside a runtime or while unwinding (the Lease then
/// expires after its duration).
pub struct LeaseClaim {
    shared: Arc<LeaseShared>,
    renewer: Option<tokio::task::JoinHandle<()>>,
    ctx: LeaseCtx,
}

impl LeaseClaim {
    /// The identity this claim holds the Lease as.
    pub fn identity(&self) -> &str {
        &self.ctx.identity
    }

    /// Why this claim no longer holds the Lease (lost to another writer, deleted, or not
    /// renewed within the renew deadline); `None` while it does.
    pub fn lost(&self) -> Option<String> {
        let state = lock(&self.shared.state);
        if let Some(why) = &state.lost {
            return Some(why.clone());
        }
        let since = state.renewed_at.elapsed();
        (since >= self.ctx.deadline).then(|| {
            format!(
                "not renewed for {} ms, past the renew deadline",
                since.as_millis()
            )
        })
    }
}

/// Claims the Lease `namespace/name` with `client` as `options.identity`: created when
/// missing, taken over when released or expired, otherwise [`SinkError::Busy`]; renewed
/// in the background while the claim lives (see the module documentation). This is the
/// controller-wide leadership of `meshcanary serve --kubernetes`.
pub async fn claim_lease(
    client: Client,
    namespace: &str,
    name: &str,
    options: &Options,
) -> Result<LeaseClaim, SinkError> {
    let ctx = LeaseCtx {
        api: Api::namespaced(client, namespace),
        namespace: namespace.to_string(),
        name: name.to_string(),
        identity: options.identity.clone(),
        duration: options.lease_duration.max(Duration::from_secs(1)),
        deadline: renew_deadline(options.lease_duration),
        renew_every: options.renew_every,
        timeout: options.request_timeout,
    };
    hold_lease(ctx).await
}

/// Acquires the Lease `ctx` names and keeps renewing it in the background.
async fn hold_lease(ctx: LeaseCtx) -> Result<LeaseClaim, SinkError> {
    let sent_at = Instant::now();
    let lease = ctx.acquire().await?;
    let shared = Arc::new(LeaseShared {
        state: Mutex::new(LeaseState {
            lease,
            renewed_at: sent_at,
            lost: None,
        }),
    });
    let renewer = tokio::spawn(renew(ctx.clone(), shared.clone()));
    Ok(LeaseClaim {
        shared,
        renewer: Some(renewer),
        ctx,
    })
}

/// Whether `object` carries `annotation` with exactly `value` (how the sinks tell that an
/// EnvoyFilter is still the one they wrote).
pub fn annotation_is(object: &DynamicObject, annotation: &str, value: &str) -> bool {
    object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotation))
        .is_some_and(|v| v == value)
}

/// Makes the process-wide TLS provider choice before a client is built by hand.
pub fn prepare_tls() {
    install_crypto_provider();
}

impl Drop for LeaseClaim {
    fn drop(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        if std::thread::panicking() {
            // No network while unwinding: the Lease expires by itself.
            return;
        }
        let held = {
            let mut state = lock(&self.shared.state);
            if state.lost.is_some() {
                return;
            }
            state.lost = Some("released by this controller".to_string());
            state.lease.clone()
        };
        let ctx = self.ctx.clone();
        let release = async move { ctx.release(held).await };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
                tokio::task::block_in_place(|| handle.block_on(release));
            } else {
                handle.spawn(release);
            }
        }
    }
}
