//! `meshcanary render SPEC --target gateway-api | envoy-gateway`: the documents are
//! checked against the published CRD schemas of Istio's WasmPlugin (1.30.3), the Gateway
//! API's HTTPRoute (v1.6.1, standard channel) and Envoy Gateway's EnvoyExtensionPolicy
//! (v1.9.0): `tests/schemas/` restates, for every field the documents use, the rules of
//! each published schema that the checker reads (each file's header names the
//! repository, path, release and commit it comes from). The checker is the one the
//! `Rollout` CRD uses (`spec::schema_check`): types, fields, required, enums, bounds,
//! lengths, patterns, item counts, `allOf` / `anyOf`; not CEL rules. Their Envoy-side
//! configuration is loaded into real Envoy in `tests/tests/gateway_manifests.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use meshcanary_controller::spec::schema_check;
use meshcanary_policy::ConfigErrors;
use serde_json::{json, Value};

const POLICY: &str = r#"{
  "name": "checkout",
  "variants": ["stable", "canary"],
  "rules": [
    {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
    {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "checkout-v2",
      "weights": [{"variant": "canary", "weight": 10}, {"variant": "stable", "weight": 90}]}}
  ]
}"#;

const DIGEST: &str = "85310c1bd0d5ab1d6a8c1cbb9dfb8e2e6e0b0dc8c4e6f9d4f2f2a1b0c9d83831";

fn spec(wasm: &str, failure_policy: Option<&str>) -> String {
    let failure = failure_policy
        .map(|f| format!("    failure_policy: {f}\n"))
        .unwrap_or_default();
    format!(
        "policy: policy.json\nsplit_rule: rollout\ncanary: canary\nsteps: [5, 25, 50, 100]\n\
         sink:\n  kubernetes:\n    namespace: shop\n    name: checkout-canary\n    wasm: {wasm}\n{failure}"
    )
}

fn oci_wasm() -> String {
    format!("{{oci: {{url: \"oci://registry.example/meshcanary/filter@sha256:{DIGEST}\"}}}}")
}

fn folder(spec: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("policy.json"), POLICY).expect("policy");
    std::fs::write(dir.path().join("spec.yaml"), spec).expect("spec");
    dir
}

fn render(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshcanary"))
        .arg("render")
        .arg(dir.join("spec.yaml"))
        .args(args)
        // No cluster is needed: point every way of finding one at nothing.
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run meshcanary")
}

const BACKENDS: [&str; 4] = [
    "--backend",
    "stable=checkout-stable:8080",
    "--backend",
    "canary=checkout-canary:8080",
];

/// Renders `target` for Gateway `infra/edge` and returns the printed text's documents.
fn documents(spec_text: &str, target: &str, extra: &[&str]) -> (String, Vec<Value>) {
    let dir = folder(spec_text);
    let mut args = vec!["--target", target, "--gateway", "infra/edge"];
    args.extend(BACKENDS);
    args.extend(extra);
    let out = render(dir.path(), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let docs = text
        .split("\n---\n")
        .map(|d| serde_saphyr::from_str(d).unwrap_or_else(|e| panic!("{e}:\n{d}")))
        .collect();
    (text, docs)
}

fn schema(file: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/schemas")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("vendored schema");
    assert!(
        text.starts_with("# The rules of CRD") && text.contains("# Source: github.com/"),
        "{file}: the header naming its source"
    );
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

const WASM_PLUGIN_SCHEMA: &str = "istio-1.30.3-wasmplugin-v1alpha1.yaml";
const HTTP_ROUTE_SCHEMA: &str = "gateway-api-v1.6.1-httproute-v1.yaml";
const EEP_SCHEMA: &str = "envoy-gateway-v1.9.0-envoyextensionpolicy-v1alpha1.yaml";

/// Every problem the schema finds in a whole document (apiVersion, kind, metadata, spec).
fn problems(document: &Value, schema_file: &str) -> Vec<String> {
    let mut document = document.clone();
    let mut schema = schema(schema_file);
    // The API server knows apiVersion, kind and metadata of every object, whether the
    // CRD's schema lists them (Gateway API, Envoy Gateway) or not (Istio's).
    for (field, kind) in [
        ("apiVersion", "string"),
        ("kind", "string"),
        ("metadata", "object"),
    ] {
        if schema["properties"].get(field).is_none() {
            schema["properties"][field] = json!({"type": kind});
        }
    }
    let mut errors = ConfigErrors::default();
    schema_check::check(&mut document, &schema, "", |_| None, &mut errors);
    errors.iter().map(ToString::to_string).collect()
}

fn assert_routes_on_the_decision_header(route: &Value) {
    assert_eq!(route["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(route["kind"], "HTTPRoute");
    assert_eq!(route["metadata"]["namespace"], "shop");
    assert_eq!(route["metadata"]["name"], "checkout-canary");
    assert_eq!(
        route["spec"]["parentRefs"],
        json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "infra", "name": "edge"}])
    );
    assert_eq!(
        route["spec"]["rules"],
        json!([
            {"name": "canary",
             "matches": [{"path": {"type": "PathPrefix", "value": "/"},
                          "headers": [{"type": "Exact", "name": "x-meshcanary-variant", "value": "canary"}]}],
             "backendRefs": [{"group": "", "kind": "Service", "name": "checkout-canary", "port": 8080}]},
            {"name": "stable",
             "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
             "backendRefs": [{"group": "", "kind": "Service", "name": "checkout-stable", "port": 8080}]}
        ])
    );
    assert_eq!(
        problems(route, HTTP_ROUTE_SCHEMA),
        Vec::<String>::new(),
        "the HTTPRoute against the Gateway API v1.6.1 schema"
    );
}

/// The policy the first step writes: the canary at 5 % (500 of 10,000).
fn assert_first_step_policy(policy: &Value) {
    assert_eq!(policy["name"], "checkout");
    assert_eq!(
        policy["rules"][1]["split"]["weights"][0],
        json!({"variant": "canary", "weight": 500})
    );
}

#[test]
fn gateway_api_renders_a_wasmplugin_on_the_gateway_and_an_httproute_valid_against_their_schemas() {
    let (text, docs) = documents(
        &spec(&oci_wasm(), None),
        "gateway-api",
        &["--hostname", "shop.example.com"],
    );
    assert!(
        text.starts_with("# meshcanary: rollout \"checkout\""),
        "{text}"
    );
    assert_eq!(docs.len(), 2);
    let plugin = &docs[0];
    assert_eq!(plugin["apiVersion"], "extensions.istio.io/v1alpha1");
    assert_eq!(plugin["kind"], "WasmPlugin");
    // A WasmPlugin can only target objects in its own namespace: the Gateway's.
    assert_eq!(plugin["metadata"]["namespace"], "infra");
    assert_eq!(
        plugin["metadata"]["annotations"]["meshcanary.io/canary-weight"],
        "5"
    );
    assert_eq!(
        plugin["spec"]["targetRefs"],
        json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"}])
    );
    assert_eq!(
        plugin["spec"]["url"],
        format!("oci://registry.example/meshcanary/filter@sha256:{DIGEST}")
    );
    assert_eq!(plugin["spec"]["sha256"], DIGEST);
    // A downloaded module: the Kubernetes sink's default failure policy is FAIL_OPEN.
    assert_eq!(plugin["spec"]["failStrategy"], "FAIL_OPEN");
    assert_eq!(plugin["spec"]["pluginName"], "meshcanary");
    assert_first_step_policy(&plugin["spec"]["pluginConfig"]);
    assert_eq!(
        problems(plugin, WASM_PLUGIN_SCHEMA),
        Vec::<String>::new(),
        "the WasmPlugin against Istio 1.30.3's schema"
    );
    assert_eq!(docs[1]["spec"]["hostnames"], json!(["shop.example.com"]));
    assert_routes_on_the_decision_header(&docs[1]);
}

#[test]
fn envoy_gateway_renders_an_extension_policy_on_the_httproute_valid_against_their_schemas() {
    let (_, docs) = documents(&spec(&oci_wasm(), None), "envoy-gateway", &[]);
    assert_eq!(docs.len(), 2);
    let policy = &docs[0];
    assert_eq!(policy["apiVersion"], "gateway.envoyproxy.io/v1alpha1");
    assert_eq!(policy["kind"], "EnvoyExtensionPolicy");
    assert_eq!(policy["metadata"]["namespace"], "shop");
    assert_eq!(
        policy["spec"]["targetRefs"],
        json!([{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "checkout-canary"}])
    );
    let wasm = &policy["spec"]["wasm"];
    assert_eq!(wasm.as_array().map(Vec::len), Some(1));
    assert_eq!(
        wasm[0]["code"],
        json!({"type": "Image", "image": {
            "url": format!("registry.example/meshcanary/filter@sha256:{DIGEST}"),
            "sha256": DIGEST}})
    );
    assert_eq!(wasm[0]["failOpen"], true, "fail open, knowingly");
    assert_eq!(wasm[0]["rootID"], "meshcanary");
    assert_first_step_policy(&wasm[0]["config"]);
    assert_eq!(
        problems(policy, EEP_SCHEMA),
        Vec::<String>::new(),
        "the EnvoyExtensionPolicy against Envoy Gateway v1.9.0's schema"
    );
    assert!(docs[1]["spec"].get("hostnames").is_none());
    assert_routes_on_the_decision_header(&docs[1]);
}

#[test]
fn an_explicit_fail_closed_and_an_https_module_are_carried_over() {
    let sha = "ab".repeat(32);
    let http = format!(
        "{{http: {{url: \"https://modules.example/meshcanary.wasm\", sha256: \"{sha}\"}}}}"
    );
    let (_, docs) = documents(&spec(&http, Some("FAIL_CLOSED")), "envoy-gateway", &[]);
    let wasm = &docs[0]["spec"]["wasm"][0];
    assert_eq!(wasm["failOpen"], false);
    assert_eq!(
        wasm["code"],
        json!({"type": "HTTP", "http": {"url": "https://modules.example/meshcanary.wasm", "sha256": sha}})
    );
    assert_eq!(problems(&docs[0], EEP_SCHEMA), Vec::<String>::new());
    let (_, docs) = documents(&spec(&http, Some("FAIL_CLOSED")), "gateway-api", &[]);
    assert_eq!(docs[0]["spec"]["failStrategy"], "FAIL_CLOSE");
    assert_eq!(docs[0]["spec"]["sha256"], sha);
    assert_eq!(problems(&docs[0], WASM_PLUGIN_SCHEMA), Vec::<String>::new());
    // A module on the proxy's disk, for Istio: file://, and FAIL_RELOAD by default.
    let (_, docs) = documents(
        &spec("{local: /var/local/lib/wasm/meshcanary_filter.wasm}", None),
        "gateway-api",
        &[],
    );
    assert_eq!(
        docs[0]["spec"]["url"],
        "file:///var/local/lib/wasm/meshcanary_filter.wasm"
    );
    assert_eq!(docs[0]["spec"]["failStrategy"], "FAIL_RELOAD");
    assert!(docs[0]["spec"].get("sha256").is_none());
    assert_eq!(problems(&docs[0], WASM_PLUGIN_SCHEMA), Vec::<String>::new());
}

#[test]
fn the_schemas_catch_what_the_api_server_would_refuse() {
    // The check is not vacuous: documents broken the way a hand edit breaks them are
    // refused, each problem with its path.
    let (_, docs) = documents(&spec(&oci_wasm(), None), "envoy-gateway", &[]);
    let mut route = docs[1].clone();
    route["spec"]["rules"][0]["matches"][0]["headers"][0]["type"] = json!("Prefix");
    route["spec"]["rules"][0]["matches"][0]["headers"][0]["name"] = json!("x meshcanary");
    route["spec"]["rules"][0]["backendRefs"][0]["port"] = json!(70000);
    route["spec"]["parentRefs"][0]["namespace"] = json!("Infra");
    route["spec"]["rules"][1]["colour"] = json!("red");
    let found = problems(&route, HTTP_ROUTE_SCHEMA);
    for expected in [
        "spec.rules[0].matches[0].headers[0].type: expected \"Exact\" or \"RegularExpression\", found \"Prefix\"",
        "spec.rules[0].matches[0].headers[0].name: \"x meshcanary\" does not match the pattern",
        "spec.rules[0].backendRefs[0].port: expected a whole number from 1 to 65535, found 70000",
        "spec.parentRefs[0].namespace: \"Infra\" does not match the pattern",
        "spec.rules[1].colour: unknown field",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(expected)),
            "missing {expected:?} in {found:#?}"
        );
    }
    let mut policy = docs[0].clone();
    policy["spec"]["wasm"][0]["failOpen"] = json!("yes");
    policy["spec"]["wasm"][0]["code"]["type"] = json!("File");
    policy["spec"]["targetRefs"][0]
        .as_object_mut()
        .map(|r| r.remove("name"));
    let found = problems(&policy, EEP_SCHEMA);
    for expected in [
        "spec.wasm[0].failOpen: expected true or false, found a string",
        "spec.wasm[0].code.type: expected \"HTTP\" or \"Image\", found \"File\"",
        "spec.targetRefs[0].name: required field is missing",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(expected)),
            "missing {expected:?} in {found:#?}"
        );
    }
    let (_, docs) = documents(&spec(&oci_wasm(), None), "gateway-api", &[]);
    let mut plugin = docs[0].clone();
    plugin["spec"]["failStrategy"] = json!("FAIL_CLOSED");
    let found = problems(&plugin, WASM_PLUGIN_SCHEMA);
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("spec.failStrategy: expected one of \"FAIL_CLOSE\"")),
        "{found:#?}"
    );
}

#[test]
fn the_documents_are_the_same_bytes_every_time() {
    for target in ["gateway-api", "envoy-gateway"] {
        let (first, _) = documents(&spec(&oci_wasm(), None), target, &[]);
        let (second, _) = documents(&spec(&oci_wasm(), None), target, &[]);
        assert_eq!(first, second, "{target}");
        assert!(first.ends_with('\n') && !first.ends_with("\n\n"));
    }
}

#[test]
fn what_cannot_be_rendered_is_a_usage_error_that_says_why() {
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            spec("{local: /var/local/lib/wasm/meshcanary_filter.wasm}", None),
            vec!["--target", "envoy-gateway", "--gateway", "infra/edge"],
            "is a file on the proxy, which Envoy Gateway cannot load",
        ),
        (
            spec(&oci_wasm(), None),
            vec!["--target", "gateway-api", "--gateway", "infra/edge", "--backend", "blue=b:80"],
            "the policy has no variant \"blue\"",
        ),
        (
            spec(&oci_wasm(), None),
            vec!["--target", "gateway-api", "--gateway", "infra/edge", "--hostname", "shop.example.com:8080"],
            "--hostname \"shop.example.com:8080\": expected a lower-case DNS name",
        ),
        (
            "policy: policy.json\nsplit_rule: rollout\ncanary: canary\nsteps: [5, 100]\nsink:\n  ecds_file: {path: p.yaml, wasm: f.wasm}\n".to_string(),
            vec!["--target", "gateway-api", "--gateway", "infra/edge"],
            "--target gateway-api needs a sink.kubernetes section",
        ),
        (
            spec(&oci_wasm(), None),
            vec!["--target", "gateway-api", "--gateway", "edge"],
            "expected NAMESPACE/NAME",
        ),
    ];
    for (spec_text, mut args, expected) in cases {
        let dir = folder(&spec_text);
        if !args.contains(&"--backend") {
            args.extend(BACKENDS);
        } else {
            args.extend(&BACKENDS[..2]);
        }
        let out = render(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // A variant without a backend, and the flags' own rules (clap: exit 2 too).
    let dir = folder(&spec(&oci_wasm(), None));
    let out = render(
        dir.path(),
        &[
            "--target",
            "gateway-api",
            "--gateway",
            "infra/edge",
            "--backend",
            "stable=s:80",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(
        "no --backend canary=SERVICE:PORT: every variant of the policy needs its Service"
    ));
    for args in [
        vec!["--target", "gateway-api"],
        vec!["--gateway", "infra/edge"],
        vec![
            "--sink",
            "kubernetes",
            "--target",
            "gateway-api",
            "--gateway",
            "infra/edge",
            "--backend",
            "stable=s:80",
        ],
    ] {
        let out = render(dir.path(), &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
    }
}
