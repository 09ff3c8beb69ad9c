//! What the filter module does per request, counted without a clock: the real `.wasm`
//! runs in-process under the `wasmi` interpreter with fuel metering, against stub
//! proxy-wasm host functions ([`host`]), driven through the same callbacks Envoy makes.
//!
//! Fuel is wasmi's instruction count (one unit per instruction of its register bytecode,
//! bulk memory operations one per 64 bytes), so the numbers depend only on the module
//! and on the pinned wasmi version, never on the machine's load: they can guard every
//! commit. Host calls are counted per kind. What a host call costs inside Envoy is
//! measured by `make bench-host-calls`; this harness says how many are made.
#![forbid(unsafe_code)]

pub mod baseline;
pub mod host;
pub mod profile;
pub mod scenarios;

use std::collections::BTreeMap;
use std::fmt;

use meshcanary_policy::{Placement, Policy};
use wasmi::{CompilationMode, Config, Engine, Extern, Instance, Linker, Module, Store};

pub use host::HostState;

/// Fuel given to a store; far more than any run uses.
const FUEL: u64 = u64::MAX / 4;

/// Anything that stops a measurement, with what was happening.
#[derive(Debug)]
pub struct CostError(pub String);

impl fmt::Display for CostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CostError {}

/// A `Result` of this crate.
pub type Result<T> = std::result::Result<T, CostError>;

fn err(context: &str) -> impl FnOnce(wasmi::Error) -> CostError + '_ {
    move |e| CostError(format!("{context}: {e}"))
}

/// One request as Envoy's connection manager hands it to the filter.
#[derive(Debug, Clone)]
pub struct Request {
    /// Request headers in Envoy's order: pseudo-headers, then the rest, lower-case.
    pub headers: Vec<(String, String)>,
}

/// A compiled filter module, ready to be instantiated once per measurement.
pub struct FilterModule {
    engine: Engine,
    module: Module,
}

impl FilterModule {
    /// Compiles `wasm` eagerly (lazy translation would charge compilation to the first
    /// requests).
    pub fn new(wasm: &[u8]) -> Result<FilterModule> {
        let mut config = Config::default();
        config.consume_fuel(true);
        config.compilation_mode(CompilationMode::Eager);
        let engine = Engine::new(&config);
        let module = Module::new(&engine, wasm).map_err(err("compiling the module"))?;
        Ok(FilterModule { engine, module })
    }

    /// A fresh VM (one Envoy worker's) with `configuration` as its plugin configuration,
    /// started and configured as Envoy does.
    pub fn start(&self, configuration: &str) -> Result<Vm> {
        let mut store = Store::new(
            &self.engine,
            HostState::new(configuration.as_bytes().to_vec()),
        );
        store.set_fuel(FUEL).map_err(err("setting fuel"))?;
        let mut linker = Linker::new(&self.engine);
        host::define(&mut linker).map_err(err("defining host functions"))?;
        // Imports the harness does not serve trap with their name when called, so a module
        // that starts using one fails loudly instead of measuring a path it did not take.
        for import in self.module.imports() {
            if let wasmi::ExternType::Func(ty) = import.ty() {
                let name = format!("{}::{}", import.module(), import.name());
                let _already_defined = linker.func_new(
                    import.module(),
                    import.name(),
                    ty.clone(),
                    move |_, _, _| {
                        Err(wasmi::Error::new(format!(
                            "the module called {name}, which the cost harness does not implement"
                        )))
                    },
                );
            }
        }
        let instance = linker
            .instantiate_and_start(&mut store, &self.module)
            .map_err(err("instantiating the module"))?;
        let mut vm = Vm {
            store,
            instance,
            next_context: ROOT_CONTEXT + 1,
        };
        if vm.has_export("_initialize") {
            vm.call0("_initialize", ())?;
        }
        vm.call0("proxy_on_context_create", (ROOT_CONTEXT, 0))?;
        if vm.call1("proxy_on_vm_start", (ROOT_CONTEXT, 0))? == 0 {
            return Err(vm.refusal("proxy_on_vm_start returned false"));
        }
        let size = configuration.len() as i32;
        if vm.call1("proxy_on_configure", (ROOT_CONTEXT, size))? == 0 {
            return Err(vm.refusal("proxy_on_configure refused the configuration"));
        }
        Ok(vm)
    }
}

/// The root context's id, as Envoy numbers it for the first plugin.
const ROOT_CONTEXT: i32 = 1;

/// Fuel spent by one request, by phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestFuel {
    /// `proxy_on_context_create` and `proxy_on_request_headers`.
    pub request: u64,
    /// `proxy_on_response_headers` and `proxy_on_response_body`.
    pub response: u64,
    /// `proxy_on_log`, `proxy_on_done` and `proxy_on_delete`.
    pub end: u64,
    /// The root context's part of a shadow copy: `proxy_on_queue_ready` (the stream's
    /// hand-over; the copy sent) and `proxy_on_http_call_response` (the shadow's answer).
    /// Zero without mirroring.
    pub copy: u64,
}

impl RequestFuel {
    /// The whole request.
    pub fn total(&self) -> u64 {
        self.request + self.response + self.end + self.copy
    }
}

/// One VM of the module (one Envoy worker's), with its stub host.
pub struct Vm {
    store: Store<HostState>,
    instance: Instance,
    next_context: i32,
}

impl Vm {
    fn has_export(&self, name: &str) -> bool {
        self.instance.get_export(&self.store, name).is_some()
    }

    fn func<P: wasmi::WasmParams, R: wasmi::WasmResults>(
        &self,
        name: &str,
    ) -> Result<wasmi::TypedFunc<P, R>> {
        self.instance
            .get_export(&self.store, name)
            .and_then(Extern::into_func)
            .ok_or_else(|| CostError(format!("the module exports no {name}")))?
            .typed::<P, R>(&self.store)
            .map_err(|e| CostError(format!("{name} has an unexpected signature: {e}")))
    }

    fn call0<P: wasmi::WasmParams>(&mut self, name: &str, params: P) -> Result<()> {
        let func = self.func::<P, ()>(name)?;
        func.call(&mut self.store, params)
            .map_err(|e| self.trapped(name, e))
    }

    fn call1<P: wasmi::WasmParams>(&mut self, name: &str, params: P) -> Result<i32> {
        let func = self.func::<P, i32>(name)?;
        func.call(&mut self.store, params)
            .map_err(|e| self.trapped(name, e))
    }

    fn trapped(&self, name: &str, e: wasmi::Error) -> CostError {
        self.refusal(&format!("{name} trapped: {e}"))
    }

    fn refusal(&self, what: &str) -> CostError {
        let warnings = &self.store.data().warnings;
        CostError(format!("{what}; the module logged: {warnings:?}"))
    }

    fn fuel(&self) -> Result<u64> {
        self.store
            .get_fuel()
            .map_err(|e| CostError(format!("reading fuel: {e}")))
    }

    /// The stub host's state: metrics, counted calls, the last request's headers.
    pub fn host(&self) -> &HostState {
        self.store.data()
    }

    /// Clears the host-call counts.
    pub fn reset_calls(&mut self) {
        self.store.data_mut().calls.clear();
    }

    /// Forgets the fuel charged to functions so far (an instrumented module's).
    pub fn reset_profile(&mut self) {
        self.store.data_mut().profile.reset();
    }

    /// Runs one request through the module as Envoy does for a GET answered by a direct
    /// response: context created, request headers (end of stream), response headers,
    /// the response body in one chunk, then log, done and delete. Returns its fuel.
    pub fn request(&mut self, request: &Request) -> Result<RequestFuel> {
        let context = self.next_context;
        self.next_context += 1;
        let state = self.store.data_mut();
        state.request_headers = request
            .headers
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        state.response_headers = response_headers();
        let headers = request.headers.len() as i32;
        let start = self.fuel()?;
        self.call0("proxy_on_context_create", (context, ROOT_CONTEXT))?;
        self.call1("proxy_on_request_headers", (context, headers, 1))?;
        let requested = self.fuel()?;
        let response_count = self.store.data().response_headers.len() as i32;
        self.call1("proxy_on_response_headers", (context, response_count, 0))?;
        self.call1("proxy_on_response_body", (context, 7, 1))?;
        let responded = self.fuel()?;
        self.call0("proxy_on_log", context)?;
        self.call1("proxy_on_done", context)?;
        self.call0("proxy_on_delete", context)?;
        let ended = self.fuel()?;
        self.deliver_copies()?;
        let copied = self.fuel()?;
        Ok(RequestFuel {
            request: start - requested,
            response: requested - responded,
            end: responded - ended,
            copy: ended - copied,
        })
    }

    /// What Envoy's event loop does next for a mirrored request: the `on_queue_ready`
    /// callbacks posted by the stream's enqueues, on the root; then the shadow's answer
    /// to every HTTP call the root sent (`200`, a 7-byte body), on the root too. (A
    /// direct response ends the stream first, as here.)
    fn deliver_copies(&mut self) -> Result<()> {
        let wakeups = std::mem::take(&mut self.store.data_mut().posted_wakeups);
        for queue in wakeups {
            self.call0("proxy_on_queue_ready", (ROOT_CONTEXT, queue as i32))?;
        }
        let answered = std::mem::take(&mut self.store.data_mut().calls_in_flight);
        for token in answered {
            let state = self.store.data_mut();
            state.call_response_headers = response_headers();
            let headers = state.call_response_headers.len() as i32;
            self.call0(
                "proxy_on_http_call_response",
                (ROOT_CONTEXT, token as i32, headers, 7, 0),
            )?;
        }
        Ok(())
    }

    /// Envoy's timer: `proxy_on_tick` on the root context. Returns its fuel.
    pub fn tick(&mut self) -> Result<u64> {
        let start = self.fuel()?;
        self.call0("proxy_on_tick", ROOT_CONTEXT)?;
        Ok(start - self.fuel()?)
    }
}

/// What Envoy's direct response carries when the filter sees it.
fn response_headers() -> Vec<(Vec<u8>, Vec<u8>)> {
    [
        (":status", "200"),
        ("content-length", "7"),
        ("content-type", "text/plain"),
    ]
    .iter()
    .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
    .collect()
}

/// Cost of one scenario: a policy and the requests it sees.
#[derive(Debug, Clone, PartialEq)]
pub struct Cost {
    /// Requests measured.
    pub requests: usize,
    /// Mean fuel per request, all phases.
    pub fuel_per_request: f64,
    /// Mean fuel per request, by phase.
    pub request_phase: f64,
    /// Mean fuel per request in the response phase.
    pub response_phase: f64,
    /// Mean fuel per request at the end of the stream.
    pub end_phase: f64,
    /// Mean fuel per request in the root's part of its shadow copy (zero without mirroring).
    pub copy_phase: f64,
    /// Host calls per request, by kind (including the callbacks into the allocator).
    pub host_calls: BTreeMap<String, f64>,
    /// Fuel of one `proxy_on_tick` after the requests (the metrics flush).
    pub tick: u64,
}

impl Cost {
    /// Host calls per request, every kind together, without the allocation callbacks.
    pub fn host_calls_total(&self) -> f64 {
        self.host_calls
            .iter()
            .filter(|(name, _)| name.as_str() != host::ALLOCATE_CALLBACK)
            .map(|(_, n)| n)
            .fold(0.0, |sum, n| sum + n)
    }
}

/// Measures `requests` under `configuration` (a meshcanary policy) in a fresh VM: one
/// pass to warm up (first allocations, lazily built tables), then one measured pass.
/// Every request's decision is checked against the policy core's, and the counters
/// against the requests sent.
pub fn measure(module: &FilterModule, configuration: &str, requests: &[Request]) -> Result<Cost> {
    measure_with_profile(module, configuration, requests).map(|(cost, _)| cost)
}

/// As [`measure`], with the fuel each function spent in the measured pass, for a module
/// instrumented by [`profile::instrument`] (empty for any other).
pub fn measure_with_profile(
    module: &FilterModule,
    configuration: &str,
    requests: &[Request],
) -> Result<(Cost, profile::Profile)> {
    let policy = Policy::from_json(configuration.as_bytes())
        .map_err(|e| CostError(format!("the scenario's policy is invalid: {e:?}")))?;
    run(module, configuration, requests, Some(&policy))
}

/// As [`measure`], for a module that is not meshcanary (the empty filter): nothing is
/// checked but that it runs.
pub fn measure_other(
    module: &FilterModule,
    configuration: &str,
    requests: &[Request],
) -> Result<Cost> {
    run(module, configuration, requests, None).map(|(cost, _)| cost)
}

fn run(
    module: &FilterModule,
    configuration: &str,
    requests: &[Request],
    policy: Option<&Policy>,
) -> Result<(Cost, profile::Profile)> {
    if requests.is_empty() {
        return Err(CostError("no requests to measure".into()));
    }
    let mut vm = module.start(configuration)?;
    for request in requests {
        vm.request(request)?;
        if let Some(policy) = policy {
            check_decision(policy, request, vm.host())?;
        }
    }
    vm.tick()?;
    vm.reset_calls();
    vm.reset_profile();
    let mut sum = RequestFuel::default();
    for request in requests {
        let fuel = vm.request(request)?;
        sum.request += fuel.request;
        sum.response += fuel.response;
        sum.end += fuel.end;
        sum.copy += fuel.copy;
    }
    let profile = vm.host().profile.clone();
    let n = requests.len() as f64;
    let host_calls = vm
        .host()
        .calls
        .iter()
        .map(|(name, count)| (name.clone(), *count as f64 / n))
        .collect();
    let tick = vm.tick()?;
    if let Some(policy) = policy {
        check_counted(policy, vm.host(), 2 * requests.len())?;
        check_copied(policy, vm.host(), 2 * requests.len())?;
    }
    let cost = Cost {
        requests: requests.len(),
        fuel_per_request: sum.total() as f64 / n,
        request_phase: sum.request as f64 / n,
        response_phase: sum.response as f64 / n,
        end_phase: sum.end as f64 / n,
        copy_phase: sum.copy as f64 / n,
        host_calls,
        tick,
    };
    Ok((cost, profile))
}

/// The module must have written the decision the policy core makes natively (random
/// placements aside: any variant is right there). A harness that drove the module wrong
/// would measure a path requests never take.
fn check_decision(policy: &Policy, request: &Request, host: &HostState) -> Result<()> {
    let inputs: Vec<Option<&[u8]>> = policy
        .inputs
        .iter()
        .map(|name| {
            request
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_bytes())
        })
        .collect();
    let native = policy.decide(inputs.as_slice(), || 0);
    let written = host.request_header(policy.decision_header.as_bytes());
    let random = matches!(
        native.placement,
        Some(Placement::Random | Placement::KeyMissingRandom)
    );
    let expected = policy.variants[native.variant].as_bytes();
    match written {
        Some(value) if value == expected => Ok(()),
        Some(value) if random && policy.variants.iter().any(|v| v.as_bytes() == value) => Ok(()),
        other => Err(CostError(format!(
            "the module wrote {:?} for request {:?}; the policy core decides {:?}",
            other.map(String::from_utf8_lossy),
            request.headers,
            policy.variants[native.variant]
        ))),
    }
}

/// With mirroring, every request's copy must have been sent and its answer counted (the
/// counters flushed by the tick): proof that the measured path includes the copy's.
fn check_copied(policy: &Policy, host: &HostState, expected: usize) -> Result<()> {
    if policy.mirror.is_none() {
        return Ok(());
    }
    let count = |name: String| {
        host.metrics
            .iter()
            .find(|m| m.name == name)
            .map_or(0, |m| m.value)
    };
    let shadow = format!("meshcanary.{}.shadow", policy.name);
    let (sent, answered) = (
        count(format!("{shadow}.sent")),
        count(format!("{shadow}.responses.2xx")),
    );
    if sent != expected as i64 || answered != expected as i64 {
        return Err(CostError(format!(
            "the module sent {sent} copies and counted {answered} 2xx answers; {expected} requests were sent"
        )));
    }
    Ok(())
}

/// Every request must have reached the module's per-variant request counters (flushed by
/// the tick): proof that the measured path is the counting one.
fn check_counted(policy: &Policy, host: &HostState, expected: usize) -> Result<()> {
    let prefix = format!("meshcanary.{}.variant.", policy.name);
    let counted: i64 = host
        .metrics
        .iter()
        .filter(|m| m.name.starts_with(&prefix) && m.name.ends_with(".requests"))
        .map(|m| m.value)
        .sum();
    if counted != expected as i64 {
        return Err(CostError(format!(
            "the module counted {counted} requests in its variant counters, {expected} were sent"
        )));
    }
    Ok(())
}
