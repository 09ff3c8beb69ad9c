//! The `Rollout` CRD: the committed manifest is exactly what the Rust types generate, and
//! the example Rollouts validate against that schema (the one the API server enforces)
//! and read as rollout specs.

use std::path::PathBuf;

use meshcanary_controller::kubernetes::crd::crd_yaml;
use meshcanary_controller::spec::{
    document_schema, schema_check, RolloutOrigin, RolloutSpec, SinkSpec,
};
use meshcanary_policy::ConfigErrors;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// Every YAML document in a manifest file.
fn documents(relative: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join(relative)).expect("manifest");
    text.split("\n---\n")
        .map(|doc| serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{relative}: {e}")))
        .collect()
}

#[test]
fn the_committed_crd_is_what_the_types_generate() {
    let committed = std::fs::read_to_string(repo().join("manifests/istio/controller/crd.yaml"))
        .expect("committed CRD");
    let generated = crd_yaml().expect("CRD renders");
    assert!(
        committed == generated,
        "manifests/istio/controller/crd.yaml is stale: run `make crd` and commit it"
    );
    let crd: Value = serde_saphyr::from_str(&generated).expect("YAML");
    assert_eq!(crd["metadata"]["name"], "rollouts.meshcanary.io");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert!(
        version["subresources"]["status"].is_object(),
        "status subresource"
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for column in ["Phase", "Canary", "Step", "Age"] {
        assert!(columns.contains(&column), "{columns:?}");
    }
    // Every spec field carries its doc comment as its description.
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    for (field, schema) in spec.as_object().expect("spec properties") {
        assert!(
            schema["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "spec.{field} has no description"
        );
    }
}

/// The schema's problems of a Rollout's spec.
fn schema_problems(spec: &Value) -> Vec<String> {
    let mut spec = spec.clone();
    let mut errors = ConfigErrors::default();
    schema_check::check(&mut spec, document_schema(), "", |_| None, &mut errors);
    errors.iter().map(ToString::to_string).collect()
}

#[test]
fn the_example_rollouts_validate_against_the_generated_schema() {
    let mut seen = 0;
    for file in [
        "manifests/istio/rollouts/checkout.yaml",
        "manifests/istio/rollouts/checkout-configmap.yaml",
    ] {
        let docs = documents(file);
        let config_map = docs.iter().find(|d| d["kind"] == "ConfigMap").cloned();
        for doc in docs.iter().filter(|d| d["kind"] == "Rollout") {
            seen += 1;
            assert_eq!(doc["apiVersion"], "meshcanary.io/v1alpha1", "{file}");
            assert_eq!(
                schema_problems(&doc["spec"]),
                Vec::<String>::new(),
                "{file}"
            );
            let referenced = config_map.as_ref().map(|cm| {
                cm["data"]["policy.json"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| "no key".to_string())
            });
            let origin = RolloutOrigin {
                namespace: doc["metadata"]["namespace"].as_str().unwrap_or("").into(),
                name: doc["metadata"]["name"].as_str().unwrap_or("").into(),
                referenced_policy: referenced,
            };
            let spec = RolloutSpec::from_rollout(&doc["spec"], &origin)
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            let SinkSpec::Kubernetes(k) = &spec.sink else {
                panic!("{file}: a Rollout writes an EnvoyFilter");
            };
            assert_eq!(k.namespace, "shop", "the Rollout's namespace");
            assert_eq!(spec.judge.steps, vec![5, 25, 50, 100]);
        }
    }
    assert_eq!(seen, 2);
}

#[test]
fn a_bad_rollout_reports_every_problem_with_its_path() {
    let spec: Value = serde_saphyr::from_str(
        r#"
policy: policy.json
split_rule: rollout
steps: [5, "x", 100]
interval: [1]
analysis: {alpha: high, colour: red}
sink:
  ecds_file: {path: x.yaml, wasm: f.wasm}
  kubernetes: {namespace: other, kubeconfig: k, wasm: {local: /m.wasm}}
"#,
    )
    .expect("YAML");
    let origin = RolloutOrigin {
        namespace: "shop".into(),
        name: "checkout".into(),
        referenced_policy: None,
    };
    let errors: Vec<String> = RolloutSpec::from_rollout(&spec, &origin)
        .expect_err("invalid")
        .iter()
        .map(ToString::to_string)
        .collect();
    for expected in [
        "canary: required field is missing",
        "steps[1]: expected a whole percentage, found \"x\"",
        "interval: expected a string or a number, found a list",
        "analysis.alpha: expected a number, found a string",
        "analysis.colour: unknown field",
        "policy: \"policy.json\": a Rollout cannot name a file",
        "sink.ecds_file: a Rollout writes an Istio EnvoyFilter",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "missing {expected:?} in:\n{}",
            errors.join("\n")
        );
    }
    // The same problems, as the schema alone sees them (what the API server refuses).
    let schema_only = schema_problems(&spec);
    assert!(
        schema_only
            .iter()
            .any(|e| e.starts_with("canary: required")),
        "{schema_only:?}"
    );
    assert!(
        !schema_only.iter().any(|e| e.starts_with("policy")),
        "{schema_only:?}"
    );

    let spec: Value = serde_saphyr::from_str(
        "policy_from: {config_map_key_ref: {name: p, key: k}}\nsplit_rule: rollout\ncanary: canary\nsteps: [100]\nsink: {kubernetes: {namespace: other, kubeconfig: k, wasm: {local: /m.wasm}}}\n",
    )
    .expect("YAML");
    let origin = RolloutOrigin {
        referenced_policy: Some(Err("ConfigMap shop/p has no key k".into())),
        ..origin
    };
    let errors = RolloutSpec::from_rollout(&spec, &origin)
        .expect_err("invalid")
        .to_string();
    for expected in [
        "policy_from: ConfigMap shop/p has no key k",
        "sink.kubernetes.namespace: \"other\": a Rollout's EnvoyFilter is in the Rollout's own namespace",
        "sink.kubernetes.kubeconfig: a Rollout is driven with the controller's own credentials",
    ] {
        assert!(errors.contains(expected), "missing {expected:?} in:\n{errors}");
    }
}
