//! The Istio manifests, proven as far as a machine without a cluster can: the Envoy
//! configuration each EnvoyFilter / WasmPlugin carries is lifted out and loaded into real
//! Envoy with the real module, and a request is routed by it; the committed EnvoyFilter is
//! exactly what `meshcanary render` produces; the kustomization builds.

use std::path::PathBuf;
use std::time::Duration;

use meshcanary_e2e::{
    assert_no_wasm_failure, get, paths, Envoy, EnvoyConfig, FilterSource, Upstream,
};
use serde_json::{json, Value};

/// Where the sample mounts the module inside `istio-proxy`.
const PROXY_WASM_PATH: &str = "/var/local/lib/wasm/meshcanary_filter.wasm";

fn manifest(relative: &str) -> PathBuf {
    paths::repo().join("manifests/istio").join(relative)
}

fn read_yaml(relative: &str) -> Value {
    let text = std::fs::read_to_string(manifest(relative)).expect("manifest");
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Replaces the module path on the proxy with this build's module, wherever it appears.
fn with_local_module(mut value: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::String(s) if s == PROXY_WASM_PATH => *s = paths::wasm().display().to_string(),
            Value::Array(items) => items.iter_mut().for_each(walk),
            Value::Object(map) => map.values_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut value);
    value
}

/// The patch values of an EnvoyFilter with this `applyTo`.
fn patches(envoy_filter: &Value, apply_to: &str) -> Vec<Value> {
    envoy_filter["spec"]["configPatches"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["applyTo"] == apply_to)
        .map(|p| p["patch"]["value"].clone())
        .collect()
}

/// Envoy with `filter` in front of stable and canary upstreams; checks the routing of the
/// sample policy: the QA header reaches the canary, a request without any key stable.
async fn assert_routes(filter: FilterSource, canary_users_expected: bool) -> Envoy {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let config = EnvoyConfig::stable_canary(filter, stable.addr, canary.addr);
    let envoy = Envoy::start(&config)
        .await
        .expect("envoy accepts the manifest's configuration");
    let mut qa = None;
    // ECDS resources arrive just after start: allow them a moment.
    for _ in 0..100 {
        qa = Some(get(&envoy, "/", &[("x-canary", b"always")]).await);
        if qa.as_ref().is_some_and(|a| a.status == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        qa.map(|a| a.upstream).as_deref(),
        Some("canary"),
        "{}",
        envoy.log()
    );
    assert_eq!(get(&envoy, "/", &[]).await.upstream, "stable");
    // The split sends some users to the canary (5 % or 10 % by the manifest).
    let mut canary_users = 0;
    for i in 0..400 {
        if get(
            &envoy,
            "/",
            &[("x-user-id", format!("user-{i}").as_bytes())],
        )
        .await
        .upstream
            == "canary"
        {
            canary_users += 1;
        }
    }
    assert_eq!(
        canary_users > 0,
        canary_users_expected,
        "{canary_users} of 400 users on canary"
    );
    assert_no_wasm_failure(&envoy.log());
    envoy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ecds_envoyfilter_routes_requests_in_real_envoy() {
    let envoy_filter = with_local_module(read_yaml("envoyfilter.yaml"));
    let extension = patches(&envoy_filter, "EXTENSION_CONFIG");
    let http_filters = patches(&envoy_filter, "HTTP_FILTER");
    assert_eq!(extension.len(), 1, "one extension config");
    assert_eq!(http_filters.len(), 2, "outbound sidecars and gateways");
    // Istio serves the extension config over ADS; here the same resource comes from a
    // file Envoy watches, which is the same discovery protocol (ECDS) over another source.
    let dir = tempfile::tempdir().expect("temp dir");
    let ecds = dir.path().join("extension.json");
    let response = json!({"version_info": "manifest", "resources": [
        {"@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
         "name": extension[0]["name"], "typed_config": extension[0]["typed_config"]}
    ]});
    std::fs::write(&ecds, response.to_string()).expect("ECDS file");
    let mut filter = http_filters[0].clone();
    assert_eq!(
        filter["name"], extension[0]["name"],
        "the filter discovers the extension by name"
    );
    assert_eq!(
        filter["config_discovery"]["type_urls"],
        json!(["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"])
    );
    filter["config_discovery"]["config_source"] = json!({
        "path_config_source": {"path": ecds, "watched_directory": {"path": dir.path()}},
        "resource_api_version": "V3"
    });
    assert_routes(FilterSource::Raw(filter), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inline_envoyfilter_routes_requests_in_real_envoy() {
    let envoy_filter = with_local_module(read_yaml("alternatives/envoyfilter-inline.yaml"));
    let filters = patches(&envoy_filter, "HTTP_FILTER");
    assert_eq!(filters.len(), 1);
    assert_routes(FilterSource::Raw(filters[0].clone()), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wasmplugin_policy_routes_requests_in_real_envoy() {
    let plugin = read_yaml("alternatives/wasmplugin.yaml");
    assert_eq!(plugin["spec"]["url"], format!("file://{PROXY_WASM_PATH}"));
    assert_eq!(plugin["spec"]["failStrategy"], "FAIL_RELOAD");
    // Its commented OCI alternative: pinned by digest, the same digest as sha256, and
    // failing open (a failed pull must not install a deny-all filter).
    let text = std::fs::read_to_string(manifest("alternatives/wasmplugin.yaml")).expect("read");
    let commented: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("# "))
        .collect();
    let oci = commented
        .iter()
        .find_map(|l| l.strip_prefix("url: oci://"))
        .expect("a commented oci:// url");
    let (_, digest) = oci.split_once("@sha256:").expect("pinned by digest");
    assert!(commented.contains(&format!("sha256: {digest}").as_str()));
    assert!(commented.contains(&"failStrategy: FAIL_OPEN"));
    // Istio hands pluginConfig to the module as its JSON configuration.
    let policy = plugin["spec"]["pluginConfig"].to_string();
    assert_routes(FilterSource::Inline(policy), true).await;
}

#[test]
fn the_committed_envoyfilter_is_exactly_what_meshcanary_render_writes() {
    let out = std::process::Command::new(paths::meshcanary_bin())
        .args([
            "render",
            &manifest("controller/rollout.yaml").display().to_string(),
            "--sink",
            "kubernetes",
        ])
        .output()
        .expect("meshcanary render");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed =
        std::fs::read_to_string(manifest("envoyfilter.yaml")).expect("envoyfilter.yaml");
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "manifests/istio/envoyfilter.yaml is stale: run `make manifests`"
    );
}

#[test]
fn the_sample_policy_and_rollout_are_valid() {
    for file in ["controller/policy.json", "controller/rollout.yaml"] {
        let out = std::process::Command::new(paths::meshcanary_bin())
            .args(["validate", &manifest(file).display().to_string()])
            .output()
            .expect("meshcanary validate");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn kubectl_kustomize_builds_the_sample() {
    let kubectl = std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output();
    if kubectl.is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "kubectl not found: apt-get install kubernetes-client (make toolchain does)"
        );
        eprintln!("kubectl_kustomize_builds_the_sample: NOT RUN (no kubectl)");
        return;
    }
    for folder in ["manifests/istio", "manifests/istio/alternatives"] {
        let out = std::process::Command::new("kubectl")
            .args([
                "kustomize",
                &paths::repo().join(folder).display().to_string(),
            ])
            .output()
            .expect("kubectl kustomize");
        assert!(
            out.status.success(),
            "{folder}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        if folder == "manifests/istio" {
            for kind in [
                "kind: EnvoyFilter",
                "kind: VirtualService",
                "kind: DestinationRule",
                "kind: Role",
                "kind: RoleBinding",
                "kind: ServiceAccount",
                "kind: ConfigMap",
                "name: meshcanary-controller",
                // serve --kubernetes: the Rollout CRD, cluster-wide rights, the mode.
                "kind: CustomResourceDefinition",
                "name: rollouts.meshcanary.io",
                "kind: ClusterRole",
                "kind: ClusterRoleBinding",
                "- --kubernetes",
                "- rollouts/status",
            ] {
                assert!(text.contains(kind), "{folder}: no {kind}");
            }
        }
    }
}
