//! `meshcanary render SPEC --sink kubernetes`: the EnvoyFilter GitOps users commit.
//! Offline (no cluster), deterministic (same input, same bytes), and the same object the
//! controller's first apply writes, minus the rollout record.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshcanary_controller::rollout::{policy_at, rollout_id};
use meshcanary_controller::sink::kubernetes::{render_manifest, Kubernetes, RECORD_ANNOTATION};
use meshcanary_controller::sink::Record;
use meshcanary_controller::spec::{RolloutSpec, SinkSpec};
use meshcanary_controller::verdict::State;
use serde_json::Value;

const POLICY: &str = r#"{
  "name": "checkout",
  "variants": ["stable", "canary"],
  "rules": [
    {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "checkout-v2",
      "weights": [{"variant": "canary", "weight": 10}, {"variant": "stable", "weight": 90}]}}
  ]
}"#;

const SPEC: &str = r#"
policy: policy.json
split_rule: rollout
canary: canary
steps: [5, 25, 50, 100]
sink:
  kubernetes:
    namespace: shop
    name: checkout-canary
    workload_selector: {labels: {app: frontend}}
    wasm: {local: /var/local/lib/wasm/meshcanary_filter.wasm}
"#;

fn folder(spec: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("policy.json"), POLICY).expect("policy");
    std::fs::write(dir.path().join("spec.yaml"), spec).expect("spec");
    dir
}

fn render(cwd: &Path, spec: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshcanary"))
        .args(["render"])
        .arg(spec)
        .args(["--sink", "kubernetes"])
        .current_dir(cwd)
        // No cluster is needed: point every way of finding one at nothing.
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run meshcanary")
}

#[test]
fn the_manifest_is_the_same_bytes_however_it_is_invoked() {
    let dir = folder(SPEC);
    let first = render(dir.path(), Path::new("spec.yaml"));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = render(Path::new("/"), &dir.path().join("spec.yaml"));
    assert!(second.status.success());
    assert_eq!(first.stdout, second.stdout, "same input, same bytes");

    let text = String::from_utf8(first.stdout).expect("UTF-8");
    assert!(text.starts_with("# meshcanary: the Istio EnvoyFilter of rollout \"checkout\""));
    assert!(text.ends_with('\n') && !text.ends_with("\n\n"));
    let object: Value = serde_saphyr::from_str(&text).expect("the manifest is YAML");
    assert_eq!(object["apiVersion"], "networking.istio.io/v1alpha3");
    assert_eq!(object["kind"], "EnvoyFilter");
    assert_eq!(object["metadata"]["namespace"], "shop");
    assert_eq!(object["metadata"]["name"], "checkout-canary");
    let annotations = &object["metadata"]["annotations"];
    assert_eq!(annotations["meshcanary.io/step"], "1/4");
    assert_eq!(annotations["meshcanary.io/canary-weight"], "5");
    assert_eq!(annotations["meshcanary.io/phase"], "progressing");
    assert!(
        annotations.get(RECORD_ANNOTATION).is_none(),
        "no record: a controller that finds this object starts afresh"
    );
    let policy = object["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"]
        ["configuration"]["value"]
        .as_str()
        .expect("the policy");
    let policy: Value = serde_json::from_str(policy).expect("policy JSON");
    assert_eq!(
        policy["rules"][0]["split"]["weights"][0],
        serde_json::json!({"variant": "canary", "weight": 500})
    );
}

#[test]
fn the_manifest_is_what_the_first_apply_writes_minus_the_record() {
    let dir = folder(SPEC);
    let spec = RolloutSpec::load(&dir.path().join("spec.yaml")).expect("valid");
    let manifest: Value =
        serde_saphyr::from_str(&render_manifest(&spec).expect("renders")).expect("YAML");
    let SinkSpec::Kubernetes(k) = &spec.sink else {
        panic!("kubernetes sink expected");
    };
    let first = Record {
        rollout: rollout_id(&spec),
        applied_weight: 5,
        generation: 1,
        state: State::start(Duration::from_secs(1_785_000_000)),
        updated_unix_ms: 1_785_000_000_000,
        control: Default::default(),
        hooks: Default::default(),
    };
    let applied = Kubernetes::new(k.clone(), spec.judge.steps.clone())
        .envoy_filter(&policy_at(&spec, 5).expect("policy"), &first)
        .expect("object");
    assert_eq!(manifest["spec"], applied["spec"]);
    assert_eq!(manifest["apiVersion"], applied["apiVersion"]);
    assert_eq!(manifest["kind"], applied["kind"]);
    assert_eq!(
        manifest["metadata"]["labels"],
        applied["metadata"]["labels"]
    );
    let mut annotations = applied["metadata"]["annotations"].clone();
    let map = annotations.as_object_mut().expect("annotations");
    assert!(map.remove(RECORD_ANNOTATION).is_some());
    map.insert("meshcanary.io/generation".into(), "0".into());
    assert_eq!(manifest["metadata"]["annotations"], annotations);
}

#[test]
fn an_ecds_file_spec_needs_a_kubernetes_section() {
    let ecds = SPEC.split("sink:").next().unwrap_or_default().to_string()
        + "sink:\n  ecds_file: {path: policy.ecds.yaml, wasm: meshcanary_filter.wasm}\n";
    let dir = folder(&ecds);
    let out = render(dir.path(), Path::new("spec.yaml"));
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--sink kubernetes needs a sink.kubernetes section in the spec")
            && stderr.contains("this spec's sink is ecds_file"),
        "{stderr}"
    );
}
