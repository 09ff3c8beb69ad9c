//! The Envoy configurations `make bench` measures, and the policy they share.
//!
//! Every bootstrap starts from the e2e harness's own rendering
//! ([`EnvoyConfig::render`]: admin, listener, connection manager, clusters, the Wasm
//! filter exactly as the controller writes it) and then swaps the route table or the
//! filter, so the bench and the tests run the same Envoy setup.
//!
//! Two families:
//! * **throughput** (rows 1–5): Envoy answers itself (`direct_response`), so a row's cost
//!   is Envoy plus whatever filter it runs, with no upstream hop to dilute it;
//! * **latency** (rows 4b–4d, 5b, 5c): a real upstream answers after a fixed delay, and
//!   a shadow twenty times slower receives every GET in 4c (meshcanary's mirroring) and
//!   5c (Envoy's own, the control), to show mirroring never holds the primary back; 4d
//!   mirrors to a fast shadow, to tell the cost of copying from the cost of slowness.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use meshcanary_e2e::envoy::wasm_filter;
use meshcanary_e2e::{Cluster, EnvoyConfig, FilterSource};
use serde_json::{json, Value};

/// Envoy worker threads in every configuration (stated in the output).
pub const WORKERS: u32 = 1;

/// The policy's name, as it appears in metric names.
pub const POLICY_NAME: &str = "bench";

/// The header the filter writes and the routes read.
const DECISION_HEADER: &str = "x-meshcanary-variant";

/// Cluster that receives shadow copies.
pub const SHADOW_CLUSTER: &str = "shadow";

/// Copies allowed in flight per worker: high enough that every GET is mirrored even to
/// the slow shadow (≈ 3,000 requests/s × 0.1 s), so nothing is skipped to protect memory.
const MAX_IN_FLIGHT: u32 = 2_000;

/// The host calls meshcanary makes on a request of row 3, as `bench-probe` configuration:
/// the request header map (one read, from two policy inputs on), the decision header,
/// the clock at request and at response, `:status`, and the latency histogram.
const MESHCANARY_HOST_CALLS: &str =
    "request_headers_whole_map 1, set_request_header 1, clock 2, response_status 1, histogram_record 1";

/// A realistic routing policy: three header/cookie rules, then a sticky 10 % split on a
/// header key. `requests.lua` sends a mix that reaches every rule.
pub fn policy(mirror: bool) -> Value {
    let mut policy = json!({
        "name": POLICY_NAME,
        "decision_header": DECISION_HEADER,
        "variants": ["stable", "canary"],
        "rules": [
            {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
            {"name": "beta", "when": [{"cookie": "plan", "in": ["beta", "internal"]}], "variant": "canary"},
            {"name": "staff", "when": [{"header": "x-user-id", "prefix": "staff-"}], "variant": "canary"},
            {"name": "rollout", "split": {
                "by": {"header": "x-user-id"}, "salt": "checkout-v2",
                "weights": [{"variant": "canary", "weight": 10}, {"variant": "stable", "weight": 90}]
            }}
        ]
    });
    if mirror {
        policy["mirror"] = json!({
            "cluster": SHADOW_CLUSTER,
            "methods": ["GET"],
            "max_in_flight": MAX_IN_FLIGHT,
        });
    }
    policy
}

/// Which table a configuration belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Direct responses: requests/s is the point.
    Throughput,
    /// A real upstream with a fixed delay: p50/p99 are the point.
    Latency,
}

/// One configuration to measure.
pub struct Setup {
    /// Stable identifier (JSON key).
    pub id: String,
    /// Row label in the table.
    pub row: String,
    /// What it is, for the table.
    pub title: String,
    /// Which table it belongs to.
    pub family: Family,
    /// The Envoy bootstrap.
    pub bootstrap: Value,
    /// Latency rows: the configuration this one is compared with (the same routing
    /// without mirroring; itself for the baselines).
    pub baseline: String,
}

/// Where the configurations send traffic.
pub struct Addresses {
    /// The primary upstream of the latency rows (stable and canary both point at it).
    pub primary: SocketAddr,
    /// A fast shadow (rows 4 and 4d).
    pub fast_shadow: SocketAddr,
    /// The slow shadow (row 4c).
    pub slow_shadow: SocketAddr,
}

/// Every configuration, in the order each round runs them.
/// (The meshcanary rows load the module the e2e harness uses: `MESHCANARY_WASM`, else
/// `target/wasm/meshcanary_filter.wasm`.)
pub fn all(addrs: &Addresses, empty_wasm: &Path, probe_wasm: &Path) -> Vec<Setup> {
    let policy_plain = policy(false).to_string();
    let policy_mirror = policy(true).to_string();
    let direct_routes = direct_routes();

    // Row 2b: the floor the targets are set against — a filter that only writes one
    // request header (the probe, writing the decision header once).
    let one_header = probe(addrs, probe_wasm, "set_request_header 1");

    // Row 2c: the host calls row 3 makes on every request and nothing else — the floor
    // for any filter doing meshcanary's job this way (row 3 minus it is the module's own
    // work). Counters are not in it: the filter counts them in the module and flushes
    // them every 100 ms.
    let host_call_floor = probe(addrs, probe_wasm, MESHCANARY_HOST_CALLS);

    let mut native = base(addrs, FilterSource::None, addrs.fast_shadow);
    set_routes(&mut native, direct_routes.clone());
    keep_clusters(&mut native, &[]);

    let mut routed = base(
        addrs,
        FilterSource::Inline(policy_plain.clone()),
        addrs.fast_shadow,
    );
    set_routes(&mut routed, direct_routes.clone());
    keep_clusters(&mut routed, &[]);

    let mut mirrored = base(
        addrs,
        FilterSource::Inline(policy_mirror.clone()),
        addrs.fast_shadow,
    );
    set_routes(&mut mirrored, direct_routes);
    keep_clusters(&mut mirrored, &[SHADOW_CLUSTER]);

    // Row 5: Envoy's own route matching does the policy's job. Direct responses have no
    // cluster to weigh, so the 10 % split is a route-level percentage (`runtime_fraction`,
    // the cluster-free form of a weighted split; like weighted clusters it is not sticky).
    let mut native_routing = base(addrs, FilterSource::None, addrs.fast_shadow);
    set_routes(
        &mut native_routing,
        native_rule_routes(direct("canary"), |rest| {
            rest.push(json!({
                "match": {"prefix": "/", "runtime_fraction": {
                    "default_value": {"numerator": 10, "denominator": "HUNDRED"},
                    "runtime_key": "bench.canary_percent"
                }},
                "direct_response": direct("canary")["direct_response"],
            }));
            rest.push(catch_all(direct("stable")));
        }),
    );
    keep_clusters(&mut native_routing, &[]);

    // Latency family: the harness's default routes (decision header -> cluster).
    let upstream_plain = base(addrs, FilterSource::Inline(policy_plain), addrs.slow_shadow);
    let upstream_mirror = base(
        addrs,
        FilterSource::Inline(policy_mirror.clone()),
        addrs.slow_shadow,
    );
    // The same with a shadow as fast as Envoy's own answers: separates what a copy costs
    // from what the shadow's slowness costs.
    let upstream_mirror_fast = base(
        addrs,
        FilterSource::Inline(policy_mirror),
        addrs.fast_shadow,
    );
    let mut upstream_native = base(addrs, FilterSource::None, addrs.slow_shadow);
    set_routes(
        &mut upstream_native,
        native_rule_routes(json!({"route": {"cluster": "canary"}}), |rest| {
            rest.push(catch_all(
                json!({"route": {"weighted_clusters": {"clusters": [
                    {"name": "canary", "weight": 10},
                    {"name": "stable", "weight": 90}
                ]}}}),
            ));
        }),
    );

    // Row 5c: as 5b, plus Envoy's own mirroring of every request to the same slow
    // shadow: the control for 4c (what any mirroring costs this machine).
    let mut native_mirror = upstream_native.clone();
    let mirror_policy = json!([{"cluster": SHADOW_CLUSTER}]);
    if let Some(routes) = connection_manager(&mut native_mirror)["route_config"]["virtual_hosts"][0]
        ["routes"]
        .as_array_mut()
    {
        for route in routes {
            route["route"]["request_mirror_policies"] = mirror_policy.clone();
        }
    }

    vec![
        Setup {
            id: "native".into(),
            row: "1".into(),
            title: "native Envoy, direct response, no filter".into(),
            family: Family::Throughput,
            bootstrap: native,
            baseline: "native".into(),
        },
        empty_row(addrs, empty_wasm),
        Setup {
            id: "one_header_wasm".into(),
            row: "2b".into(),
            title: "Envoy + a wasm filter that only writes one request header (bench_probe.wasm)"
                .into(),
            family: Family::Throughput,
            bootstrap: one_header,
            baseline: "one_header_wasm".into(),
        },
        Setup {
            id: "host_call_floor_wasm".into(),
            row: "2c".into(),
            title: "Envoy + a wasm filter that only makes row 3's host calls (bench_probe.wasm)"
                .into(),
            family: Family::Throughput,
            bootstrap: host_call_floor,
            baseline: "host_call_floor_wasm".into(),
        },
        Setup {
            id: "meshcanary".into(),
            row: "3".into(),
            title: ROW_3_TITLE.into(),
            family: Family::Throughput,
            bootstrap: routed,
            baseline: "meshcanary".into(),
        },
        Setup {
            id: "meshcanary_mirror".into(),
            row: "4".into(),
            title: "as 3 + every GET mirrored to a shadow upstream".into(),
            family: Family::Throughput,
            bootstrap: mirrored,
            baseline: "meshcanary_mirror".into(),
        },
        Setup {
            id: "native_routing".into(),
            row: "5".into(),
            title: "native Envoy routing: header-match routes + 10 % route fraction".into(),
            family: Family::Throughput,
            bootstrap: native_routing,
            baseline: "native_routing".into(),
        },
        Setup {
            id: "upstream_meshcanary".into(),
            row: "4b".into(),
            title: "meshcanary routing to a real upstream, no mirroring".into(),
            family: Family::Latency,
            bootstrap: upstream_plain,
            baseline: "upstream_meshcanary".into(),
        },
        Setup {
            id: "upstream_meshcanary_slow_shadow".into(),
            row: "4c".into(),
            title: "as 4b + every GET mirrored to a 20× slower shadow".into(),
            family: Family::Latency,
            bootstrap: upstream_mirror,
            baseline: "upstream_meshcanary".into(),
        },
        Setup {
            id: "upstream_meshcanary_fast_shadow".into(),
            row: "4d".into(),
            title: "as 4b + every GET mirrored to a fast shadow (answers at once)".into(),
            family: Family::Latency,
            bootstrap: upstream_mirror_fast,
            baseline: "upstream_meshcanary".into(),
        },
        Setup {
            id: "upstream_native_weighted".into(),
            row: "5b".into(),
            title: "native Envoy routing: header-match routes + weighted_clusters".into(),
            family: Family::Latency,
            bootstrap: upstream_native,
            baseline: "upstream_native_weighted".into(),
        },
        Setup {
            id: "upstream_native_slow_mirror".into(),
            row: "5c".into(),
            title:
                "as 5b + Envoy's own mirroring (request_mirror_policies) to the 20× slower shadow"
                    .into(),
            family: Family::Latency,
            bootstrap: native_mirror,
            baseline: "upstream_native_weighted".into(),
        },
    ]
}

/// `--compare`: row 2 (the empty filter), then row 3 — the bench policy on the same
/// routes — once per module, so two builds of the filter are measured side by side.
pub fn compare(addrs: &Addresses, empty_wasm: &Path, modules: &[PathBuf]) -> Vec<Setup> {
    let policy = policy(false).to_string();
    let mut all = vec![empty_row(addrs, empty_wasm)];
    for (i, wasm) in modules.iter().enumerate() {
        all.push(throughput_row(
            format!("module_{}", i + 1),
            format!("3.{}", i + 1),
            format!("as row 3, module {}", wasm.display()),
            direct_with_module(addrs, wasm, &policy),
        ));
    }
    all
}

/// `--instructions --policies`: row 3 with the bench policy and once per policy given
/// (its label, its JSON), next to the empty filter: how the filter's cost grows with the
/// policy, in Envoy.
pub fn policies(
    addrs: &Addresses,
    empty_wasm: &Path,
    wasm: &Path,
    policies: &[(String, Value)],
) -> Vec<Setup> {
    let mut all = vec![
        empty_row(addrs, empty_wasm),
        throughput_row(
            "meshcanary".into(),
            "3".into(),
            ROW_3_TITLE.into(),
            direct_with_module(addrs, wasm, &policy(false).to_string()),
        ),
    ];
    for (i, (label, policy)) in policies.iter().enumerate() {
        all.push(throughput_row(
            format!("policy_{}", i + 1),
            format!("3p.{}", i + 1),
            format!("as row 3, policy {label}"),
            direct_with_module(addrs, wasm, &policy.to_string()),
        ));
    }
    all
}

/// Row 3's title, in every mode that measures it.
const ROW_3_TITLE: &str = "Envoy + meshcanary, 3 header/cookie rules + sticky split";

/// A throughput row (Envoy answers itself) that is its own baseline.
fn throughput_row(id: String, row: String, title: String, bootstrap: Value) -> Setup {
    Setup {
        baseline: id.clone(),
        id,
        row,
        title,
        family: Family::Throughput,
        bootstrap,
    }
}

/// Row 2: the empty module in the filter's place, same route table as rows 1 and 3.
fn empty_row(addrs: &Addresses, empty_wasm: &Path) -> Setup {
    throughput_row(
        "empty_wasm".into(),
        "2".into(),
        "Envoy + empty proxy-wasm filter (bench_empty.wasm)".into(),
        direct_with_module(addrs, empty_wasm, "{}"),
    )
}

/// Rows 1–3's route table: Envoy answers itself, `canary` when the decision header says
/// so, `stable` otherwise.
fn direct_routes() -> Value {
    json!([
        route_on(
            DECISION_HEADER,
            json!({"exact": "canary"}),
            direct("canary")
        ),
        catch_all(direct("stable")),
    ])
}

/// Row 2's configuration with `filter/bench-probe` in the empty filter's place, given its
/// plugin configuration (`"<call> <count>"`, plain text): `--host-calls`.
pub fn probe(addrs: &Addresses, probe_wasm: &Path, configuration: &str) -> Value {
    let mut bootstrap = direct_with_module(addrs, probe_wasm, "{}");
    http_filters(&mut bootstrap)[0]["typed_config"]["config"]["configuration"]["value"] =
        json!(configuration);
    bootstrap
}

/// Rows 1–3's routes (Envoy answers itself) with `wasm` as the filter, configured with
/// `policy` (JSON).
fn direct_with_module(addrs: &Addresses, wasm: &Path, policy: &str) -> Value {
    let mut bootstrap = base(addrs, FilterSource::Inline("{}".into()), addrs.fast_shadow);
    set_routes(&mut bootstrap, direct_routes());
    keep_clusters(&mut bootstrap, &[]);
    http_filters(&mut bootstrap)[0]["typed_config"] = wasm_filter(policy, wasm);
    bootstrap
}

/// Leaves only the clusters `names` in a bootstrap. The throughput rows answer directly
/// and need none (row 4 needs its shadow): every row then has the same minimal
/// configuration — one listener, one route table, no cluster it does not use.
fn keep_clusters(bootstrap: &mut Value, names: &[&str]) {
    if let Some(clusters) = bootstrap["static_resources"]["clusters"].as_array_mut() {
        clusters.retain(|c| names.iter().any(|n| c["name"] == *n));
    }
}

/// The harness's rendering with `stable` and `canary` on the primary upstream, a
/// `shadow` cluster, and one worker.
fn base(addrs: &Addresses, filter: FilterSource, shadow: SocketAddr) -> Value {
    let mut config = EnvoyConfig::stable_canary(filter, addrs.primary, addrs.primary);
    config.concurrency = WORKERS;
    config.clusters.push(Cluster {
        name: SHADOW_CLUSTER.into(),
        addr: shadow,
    });
    config.render()
}

/// The connection manager's configuration in a rendered bootstrap.
fn connection_manager(bootstrap: &mut Value) -> &mut Value {
    &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]
}

fn set_routes(bootstrap: &mut Value, routes: Value) {
    connection_manager(bootstrap)["route_config"]["virtual_hosts"][0]["routes"] = routes;
}

fn http_filters(bootstrap: &mut Value) -> &mut Value {
    &mut connection_manager(bootstrap)["http_filters"]
}

/// Envoy answers 200 with the variant's name, like the upstreams do.
fn direct(variant: &str) -> Value {
    json!({"direct_response": {"status": 200, "body": {"inline_string": format!("{variant}\n")}}})
}

/// A route for requests whose header `name` matches `string_match`.
fn route_on(name: &str, string_match: Value, action: Value) -> Value {
    let mut route = json!({"match": {"prefix": "/", "headers": [
        {"name": name, "string_match": string_match}
    ]}});
    merge(&mut route, action);
    route
}

fn catch_all(action: Value) -> Value {
    let mut route = json!({"match": {"prefix": "/"}});
    merge(&mut route, action);
    route
}

fn merge(route: &mut Value, action: Value) {
    if let (Some(route), Value::Object(action)) = (route.as_object_mut(), action) {
        route.extend(action);
    }
}

/// The policy's three rules as Envoy routes to `canary` (the cookie test is a regular
/// expression on the whole `cookie` header: Envoy has no cookie matcher), followed by
/// whatever `rest` adds for the split.
fn native_rule_routes(canary: Value, rest: impl FnOnce(&mut Vec<Value>)) -> Value {
    let mut routes = vec![
        route_on("x-canary", json!({"exact": "always"}), canary.clone()),
        route_on(
            "cookie",
            json!({"safe_regex": {"regex": r"(.*;)?\s*plan=(beta|internal)\s*(;.*)?"}}),
            canary.clone(),
        ),
        route_on("x-user-id", json!({"prefix": "staff-"}), canary),
    ];
    rest(&mut routes);
    Value::Array(routes)
}
