//! `meshcanary render --target gateway-api | envoy-gateway`, proven as far as a machine
//! without a cluster can: the module is packaged as an OCI image (`meshcanary-oci`, what
//! `make oci` runs), the documents are rendered for that image's digest, and each
//! document's Envoy-side configuration is built from it the way its implementation
//! translates it, then loaded into real Envoy with real upstreams on loopback:
//!
//! * the image is resolved by the digest the document pins, the manifest's bytes are
//!   checked against it (what Istio's agent and Envoy Gateway's fetcher compare `sha256`
//!   with), and `plugin.wasm` is taken from its last layer: that module is what Envoy runs;
//! * WasmPlugin (Istio, Gateway `targetRefs`): the Wasm HTTP filter before the router of
//!   the Gateway's listener, `root_id` = `pluginName`, `configuration` = `pluginConfig` as
//!   JSON text, `failure_policy` from `failStrategy`; it runs for every route of the Gateway;
//! * EnvoyExtensionPolicy (Envoy Gateway, on the HTTPRoute): the Wasm filter on the
//!   listener with `disabled: true`, enabled per route by an empty `FilterConfig` on the
//!   targeted HTTPRoute's routes only, `vm_id` = Envoy Gateway's resource name, `name`,
//!   `root_id`, `configuration` = `config` as JSON text and `fail_open` = `failOpen`
//!   (the facts of Envoy Gateway v1.9.0's `internal/xds/translator/wasm.go`);
//! * HTTPRoute: a virtual host per `hostnames`, a route per rule match (`PathPrefix` →
//!   `prefix`, `Exact` header → `string_match.exact`), more header matches first (Gateway
//!   API's precedence), each to a cluster for its `backendRef`.
//!
//! What only a cluster shows is not claimed here: istiod's and Envoy Gateway's own
//! translators, their image pulls from a registry, and the API servers' CEL rules (the
//! documents' schemas are checked in `controller/tests/gateway_render.rs`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshcanary_e2e::{
    assert_no_wasm_failure, get, paths, Cluster, Envoy, EnvoyConfig, FilterSource, Upstream,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const OCI: &str = env!("CARGO_BIN_EXE_meshcanary-oci");
const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const STRING_VALUE: &str = "type.googleapis.com/google.protobuf.StringValue";
const HOST: &str = "shop.example.com";

const POLICY: &str = r#"{
  "name": "checkout",
  "variants": ["stable", "canary"],
  "rules": [
    {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
    {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "checkout-v2",
      "missing": "fallback",
      "weights": [{"variant": "canary", "weight": 10}, {"variant": "stable", "weight": 90}]}}
  ]
}"#;

/// The module packaged as an OCI image layout, and the image's manifest digest (hex).
struct Image {
    _dir: tempfile::TempDir,
    layout: PathBuf,
    digest: String,
}

fn build_image(module: &Path) -> Image {
    let dir = tempfile::tempdir().expect("temp dir");
    let layout = dir.path().join("oci");
    let out = std::process::Command::new(OCI)
        .args(["--module", &module.display().to_string(), "--out"])
        .arg(&layout)
        .output()
        .expect("run meshcanary-oci");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
            .expect("index JSON");
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .and_then(|d| d.strip_prefix("sha256:"))
        .expect("a sha256 manifest digest")
        .to_string();
    Image {
        _dir: dir,
        layout,
        digest,
    }
}

impl Image {
    /// What a fetcher does with a reference pinned by digest: the manifest blob of that
    /// digest (its bytes must hash to it, else the pull fails), then `plugin.wasm` from
    /// the last layer, written to a file for Envoy.
    fn pull(&self, reference: &str, sha256: &str, into: &Path) -> PathBuf {
        let (_, digest) = reference
            .split_once("@sha256:")
            .expect("the reference is pinned by digest");
        assert_eq!(
            digest, sha256,
            "sha256 is the image digest the reference pins"
        );
        let blob =
            |hex: &str| std::fs::read(self.layout.join("blobs/sha256").join(hex)).expect("blob");
        let manifest_bytes = blob(digest);
        assert_eq!(
            hex(&Sha256::digest(&manifest_bytes)),
            digest,
            "the pulled manifest hashes to the pinned digest"
        );
        let manifest: Value = serde_json::from_slice(&manifest_bytes).expect("manifest");
        let layer = manifest["layers"]
            .as_array()
            .and_then(|l| l.last())
            .and_then(|l| l["digest"].as_str())
            .and_then(|d| d.strip_prefix("sha256:"))
            .expect("a last layer");
        let layer_bytes = blob(layer);
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&layer_bytes[..]));
        let mut module = Vec::new();
        for entry in archive.entries().expect("tar") {
            let mut entry = entry.expect("tar entry");
            if entry.path().expect("entry path").to_str() == Some("plugin.wasm") {
                entry.read_to_end(&mut module).expect("plugin.wasm");
            }
        }
        assert!(module.starts_with(b"\0asm"), "plugin.wasm is a Wasm module");
        let path = into.join("plugin.wasm");
        std::fs::write(&path, module).expect("write module");
        path
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `meshcanary render` of a rollout whose module is `image`, for `target`; its documents
/// by kind.
fn render(image: &Image, target: &str, failure_policy: Option<&str>) -> BTreeMap<String, Value> {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("policy.json"), POLICY).expect("policy");
    // The first step is 25 %: enough canary users among 400 to see the split.
    let mut spec = format!(
        "policy: policy.json\nsplit_rule: rollout\ncanary: canary\nsteps: [25, 50, 100]\n\
         sink:\n  kubernetes:\n    namespace: shop\n    name: checkout-canary\n    \
         wasm: {{oci: {{url: \"oci://registry.example/meshcanary/filter@sha256:{}\"}}}}\n",
        image.digest
    );
    if let Some(policy) = failure_policy {
        spec.push_str(&format!("    failure_policy: {policy}\n"));
    }
    std::fs::write(dir.path().join("spec.yaml"), spec).expect("spec");
    let out = std::process::Command::new(paths::meshcanary_bin())
        .arg("render")
        .arg(dir.path().join("spec.yaml"))
        .args([
            "--target",
            target,
            "--gateway",
            "infra/edge",
            "--hostname",
            HOST,
        ])
        .args(["--backend", "stable=checkout-stable:8080"])
        .args(["--backend", "canary=checkout-canary:8080"])
        .output()
        .expect("meshcanary render");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .split("\n---\n")
        .map(|doc| {
            let value: Value = serde_saphyr::from_str(doc).expect("YAML");
            (
                value["kind"].as_str().unwrap_or_default().to_string(),
                value,
            )
        })
        .collect()
}

/// The cluster name for a `backendRef`.
fn cluster_name(backend_ref: &Value) -> String {
    format!(
        "{}:{}",
        backend_ref["name"].as_str().unwrap_or(""),
        backend_ref["port"]
    )
}

/// The Envoy routes of an HTTPRoute: one per rule match, more header matches first.
fn envoy_routes(route: &Value) -> Vec<Value> {
    let mut out: Vec<(usize, Value)> = Vec::new();
    for rule in route["spec"]["rules"].as_array().expect("rules") {
        let backends = rule["backendRefs"].as_array().expect("backendRefs");
        assert_eq!(
            backends.len(),
            1,
            "one backend per rule: no weights to translate"
        );
        for m in rule["matches"].as_array().expect("matches") {
            assert_eq!(m["path"]["type"], "PathPrefix");
            let headers: Vec<Value> = m["headers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| {
                    assert_eq!(h["type"], "Exact");
                    json!({"name": h["name"], "string_match": {"exact": h["value"]}})
                })
                .collect();
            let mut envoy_match = json!({"prefix": m["path"]["value"]});
            if !headers.is_empty() {
                envoy_match["headers"] = json!(headers);
            }
            out.push((
                headers.len(),
                json!({"match": envoy_match, "route": {"cluster": cluster_name(&backends[0])}}),
            ));
        }
    }
    // Gateway API: among equal paths, the match with more header matches wins.
    out.sort_by_key(|(headers, _)| std::cmp::Reverse(*headers));
    out.into_iter().map(|(_, r)| r).collect()
}

/// Everything on the Gateway's listener: the filter, the HTTPRoute's routes under its
/// hostnames, and a route of another HTTPRoute (`/elsewhere`, not targeted by anything).
struct Listener {
    envoy: Envoy,
    stable: Upstream,
    canary: Upstream,
    elsewhere: Upstream,
}

async fn start_listener(
    route: &Value,
    filter: Value,
    enable_per_route: Option<&str>,
    workers: u32,
) -> Listener {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let elsewhere = Upstream::start("elsewhere").await;
    let mut routes = envoy_routes(route);
    if let Some(name) = enable_per_route {
        for r in &mut routes {
            r["typed_per_filter_config"] = json!({name: {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                "config": {}
            }});
        }
    }
    let hostnames = route["spec"]["hostnames"].clone();
    let mut config =
        EnvoyConfig::stable_canary(FilterSource::Raw(filter), stable.addr, canary.addr);
    config.clusters = vec![
        Cluster {
            name: "checkout-stable:8080".into(),
            addr: stable.addr,
        },
        Cluster {
            name: "checkout-canary:8080".into(),
            addr: canary.addr,
        },
        Cluster {
            name: "elsewhere".into(),
            addr: elsewhere.addr,
        },
    ];
    let mut bootstrap = config.render();
    let hcm = &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"];
    hcm["route_config"] = json!({"virtual_hosts": [
        {"name": "checkout", "domains": hostnames, "routes": routes},
        {"name": "other-route", "domains": ["elsewhere.example.com"],
         "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "elsewhere"}}]}
    ]});
    let envoy = Envoy::start_with_file(&bootstrap.to_string(), "envoy.json", workers)
        .await
        .unwrap_or_else(|log| panic!("Envoy refused the translated configuration:\n{log}"));
    Listener {
        envoy,
        stable,
        canary,
        elsewhere,
    }
}

/// The routing the policy promises, through the listener: the QA header reaches the
/// canary, a request without a key stable, a client cannot pick the canary by sending the
/// decision header itself, about a quarter of users reach the canary, and another
/// hostname is not this HTTPRoute's.
async fn assert_routing(listener: &Listener) {
    let envoy = &listener.envoy;
    let host = ("host", HOST.as_bytes());
    let qa = get(envoy, "/", &[host, ("x-canary", b"always")]).await;
    assert_eq!(
        (qa.status, qa.upstream.as_str()),
        (200, "canary"),
        "{}",
        envoy.log()
    );
    assert_eq!(get(envoy, "/", &[host]).await.upstream, "stable");
    assert_eq!(
        get(envoy, "/", &[host, ("x-meshcanary-variant", b"canary")])
            .await
            .upstream,
        "stable",
        "the filter replaces a client's decision header"
    );
    let mut canary_users = 0;
    for i in 0..400 {
        let user = format!("user-{i}");
        if get(envoy, "/", &[host, ("x-user-id", user.as_bytes())])
            .await
            .upstream
            == "canary"
        {
            canary_users += 1;
        }
    }
    eprintln!("{canary_users} of 400 users on the canary at 25 %");
    assert!(
        (60..=140).contains(&canary_users),
        "{canary_users} of 400 users on the canary at 25 %"
    );
    // Every request the canary got carried the decision, as the route matched it.
    for request in listener.canary.requests() {
        assert_eq!(
            request.header("x-meshcanary-variant").as_deref(),
            Some("canary")
        );
    }
    assert!(listener
        .stable
        .requests()
        .iter()
        .all(|r| r.header("x-meshcanary-variant").as_deref() == Some("stable")));
    assert_eq!(
        get(envoy, "/", &[("host", b"other.example.com")])
            .await
            .status,
        404
    );
    assert_no_wasm_failure(&envoy.log());
}

/// Whether the filter ran for a request of the other route: its decision header.
async fn decided_elsewhere(listener: &Listener) -> Option<String> {
    let answer = get(&listener.envoy, "/", &[("host", b"elsewhere.example.com")]).await;
    assert_eq!(answer.upstream, "elsewhere");
    listener
        .elsewhere
        .requests()
        .last()
        .and_then(|r| r.header("x-meshcanary-variant"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_api_wasmplugin_and_httproute_route_requests_in_real_envoy() {
    let image = build_image(&paths::wasm());
    let docs = render(&image, "gateway-api", None);
    let plugin = &docs["WasmPlugin"];
    let route = &docs["HTTPRoute"];
    assert_eq!(plugin["spec"]["targetRefs"][0]["kind"], "Gateway");
    assert_eq!(
        plugin["spec"]["targetRefs"][0]["name"],
        route["spec"]["parentRefs"][0]["name"]
    );
    let url = plugin["spec"]["url"].as_str().expect("url");
    let reference = url.strip_prefix("oci://").expect("an oci:// image");
    let pulled = tempfile::tempdir().expect("temp dir");
    let module = image.pull(
        reference,
        plugin["spec"]["sha256"].as_str().expect("sha256"),
        pulled.path(),
    );
    let failure_policy = match plugin["spec"]["failStrategy"].as_str() {
        Some("FAIL_CLOSE") => "FAIL_CLOSED",
        Some(other) => other,
        None => panic!("no failStrategy"),
    };
    assert_eq!(failure_policy, "FAIL_OPEN", "a pulled module fails open");
    let filter = json!({
        "name": "meshcanary",
        "typed_config": {"@type": WASM_TYPE, "config": {
            "name": format!("{}.{}", plugin["metadata"]["namespace"].as_str().unwrap_or(""), plugin["metadata"]["name"].as_str().unwrap_or("")),
            "root_id": plugin["spec"]["pluginName"],
            "vm_config": {"runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": module}}},
            "configuration": {"@type": STRING_VALUE, "value": plugin["spec"]["pluginConfig"].to_string()},
            "failure_policy": failure_policy,
        }}
    });
    let listener = start_listener(route, filter, None, 2).await;
    assert_routing(&listener).await;
    // Attached to the Gateway: the filter decides for every route on it.
    assert_eq!(
        decided_elsewhere(&listener).await.as_deref(),
        Some("stable")
    );
}

/// Envoy Gateway's translation of a rendered EnvoyExtensionPolicy (on `route`), with the
/// module pulled from `image`: the listener's filter and its name, which the targeted
/// HTTPRoute's routes enable.
fn envoy_gateway_filter(
    image: &Image,
    policy: &Value,
    route: &Value,
    into: &Path,
) -> (Value, String) {
    assert_eq!(policy["spec"]["targetRefs"][0]["kind"], "HTTPRoute");
    assert_eq!(
        policy["spec"]["targetRefs"][0]["name"],
        route["metadata"]["name"]
    );
    let wasm = &policy["spec"]["wasm"][0];
    assert_eq!(wasm["code"]["type"], "Image");
    let module = image.pull(
        wasm["code"]["image"]["url"].as_str().expect("image url"),
        wasm["code"]["image"]["sha256"].as_str().expect("sha256"),
        into,
    );
    // Envoy Gateway's names: `envoyextensionpolicy/<namespace>/<name>/wasm/<index>` for
    // the VM and (prefixed) the filter, the `wasm` entry's name for the plugin.
    let resource = format!(
        "envoyextensionpolicy/{}/{}/wasm/0",
        policy["metadata"]["namespace"].as_str().unwrap_or(""),
        policy["metadata"]["name"].as_str().unwrap_or("")
    );
    let filter_name = format!("envoy.filters.http.wasm/{resource}");
    let filter = json!({
        "name": filter_name,
        "disabled": true,
        "typed_config": {"@type": WASM_TYPE, "config": {
            "name": wasm["name"],
            "root_id": wasm["rootID"],
            "vm_config": {"vm_id": resource, "runtime": "envoy.wasm.runtime.v8",
                          "code": {"local": {"filename": module}}},
            "configuration": {"@type": STRING_VALUE, "value": wasm["config"].to_string()},
            "fail_open": wasm["failOpen"],
        }}
    });
    (filter, filter_name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envoy_gateway_extension_policy_and_httproute_route_requests_in_real_envoy() {
    let image = build_image(&paths::wasm());
    let docs = render(&image, "envoy-gateway", None);
    let policy = &docs["EnvoyExtensionPolicy"];
    let route = &docs["HTTPRoute"];
    assert_eq!(policy["spec"]["wasm"][0]["failOpen"], true);
    let pulled = tempfile::tempdir().expect("temp dir");
    let (filter, filter_name) = envoy_gateway_filter(&image, policy, route, pulled.path());
    let listener = start_listener(route, filter, Some(&filter_name), 2).await;
    assert_routing(&listener).await;
    // On the HTTPRoute only: another route of the same listener is not decided.
    assert_eq!(decided_elsewhere(&listener).await, None);
    // Give the VM a moment to log anything it would, then check again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_no_wasm_failure(&listener.envoy.log());
}

/// The filter's test build traps on a request carrying this header (`make wasm-test-trap`).
const TRAP_HEADER: &str = "x-meshcanary-test-trap";

/// Under the rendered EnvoyExtensionPolicy, with the filter's test build (which traps on
/// a marked request) as the image: the QA request's answers before the trap, for the
/// trapping request, and for 20 QA requests after it (status, upstream). One worker, so
/// the trap takes the only VM.
async fn qa_answers_around_a_trap(failure_policy: Option<&str>) -> (Value, Vec<(u16, String)>) {
    let image = build_image(&paths::trap_wasm());
    let docs = render(&image, "envoy-gateway", failure_policy);
    let policy = docs["EnvoyExtensionPolicy"].clone();
    let route = &docs["HTTPRoute"];
    let pulled = tempfile::tempdir().expect("temp dir");
    let (filter, filter_name) = envoy_gateway_filter(&image, &policy, route, pulled.path());
    let listener = start_listener(route, filter, Some(&filter_name), 1).await;
    let envoy = &listener.envoy;
    let qa: [(&str, &[u8]); 2] = [("host", HOST.as_bytes()), ("x-canary", b"always")];
    let mut answers = Vec::new();
    let before = get(envoy, "/", &qa).await;
    answers.push((before.status, before.upstream));
    let trapped = get(envoy, "/", &[qa[0], qa[1], (TRAP_HEADER, b"1")]).await;
    answers.push((trapped.status, trapped.upstream));
    for _ in 0..20 {
        let after = get(envoy, "/", &qa).await;
        answers.push((after.status, after.upstream));
    }
    assert!(
        envoy.log().contains("test-trap build: trapping"),
        "the module trapped: {}",
        envoy.log()
    );
    (policy["spec"]["wasm"][0]["failOpen"].clone(), answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_gateway_fail_open_keeps_traffic_flowing_to_stable_after_the_filter_fails() {
    let (fail_open, answers) = qa_answers_around_a_trap(None).await;
    assert_eq!(fail_open, true, "the default rendering fails open");
    eprintln!("failOpen: true: {answers:?}");
    assert_eq!(
        answers[0],
        (200, "canary".to_string()),
        "routed before the trap"
    );
    // The dead filter is bypassed: no decision header, the HTTPRoute's stable rule; the
    // trapping request itself passes too under Envoy's `fail_open`.
    for answer in &answers[1..] {
        assert_eq!(answer, &(200, "stable".to_string()), "{answers:?}");
    }
    // What `failOpen: false` (Envoy Gateway's default, rendered only for an explicit
    // FAIL_CLOSED) does instead: every request after the trap fails.
    let (fail_open, answers) = qa_answers_around_a_trap(Some("FAIL_CLOSED")).await;
    assert_eq!(fail_open, false);
    eprintln!("failOpen: false: {answers:?}");
    assert_eq!(answers[0], (200, "canary".to_string()));
    assert!(
        answers[1..].iter().all(|(status, _)| *status >= 500),
        "{answers:?}"
    );
}
