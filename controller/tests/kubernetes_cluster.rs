//! The Kubernetes sink against a REAL cluster, opt-in: set `MESHCANARY_KUBECONFIG` to a
//! kubeconfig file (and optionally `MESHCANARY_NAMESPACE`, default `default`) of a
//! cluster with Istio's CRDs installed (kind + `istioctl install`, or any cluster where
//! that identity may get/create/patch/delete envoyfilters and leases in the namespace).
//! Unset, the test prints why it did nothing and passes, so CI without a cluster stays
//! green. It applies an EnvoyFilter, reads the record back, checks a second controller
//! is refused and the abort mark, then deletes what it created. The second test installs
//! the `Rollout` CRD and shows what only a real API server does with it: schema
//! enforcement, the status subresource, garbage collection of an owned EnvoyFilter.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, DynamicObject};
use meshcanary_controller::sink::kubernetes::{envoy_filter_resource, lease_name, Kubernetes};
use meshcanary_controller::sink::{ConfigSink, Record, RolloutId, SinkError};
use meshcanary_controller::spec::{KubernetesSpec, PatchContext, WasmCode};
use meshcanary_controller::verdict::State;
use meshcanary_policy::envoy::FailurePolicy;
use serde_json::json;

fn note(text: &str) {
    // Straight to the process's stderr: libtest would capture `eprintln!`.
    let _ = writeln!(std::io::stderr(), "{}", text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_reads_back_and_deletes_on_a_real_cluster() {
    let Some(kubeconfig) = std::env::var_os("MESHCANARY_KUBECONFIG").map(PathBuf::from) else {
        note("kubernetes_cluster: skipped, MESHCANARY_KUBECONFIG is not set (set it to a kubeconfig of a cluster with Istio installed to run this test; see the README)");
        return;
    };
    let namespace = std::env::var("MESHCANARY_NAMESPACE").unwrap_or_else(|_| "default".into());
    let name = format!("meshcanary-cluster-test-{}", std::process::id());
    let spec = KubernetesSpec {
        namespace: namespace.clone(),
        name: name.clone(),
        workload_selector: Some(BTreeMap::from([(
            "app".to_string(),
            "meshcanary-cluster-test".to_string(),
        )])),
        filter_name: "meshcanary".to_string(),
        wasm: WasmCode::Local("/var/local/lib/wasm/meshcanary_filter.wasm".to_string()),
        context: vec![PatchContext::SidecarOutbound, PatchContext::Gateway],
        kubeconfig: Some(kubeconfig.clone()),
        failure_policy: FailurePolicy::Reload,
    };
    note(&format!(
        "kubernetes_cluster: using {} namespace {} EnvoyFilter {}",
        kubeconfig.display(),
        namespace,
        name
    ));
    let result = exercise(&spec).await;

    // Clean up whatever happened above.
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig"),
        &Default::default(),
    )
    .await
    .expect("kubeconfig");
    let client = kube::Client::try_from(config).expect("client");
    let filters: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &envoy_filter_resource());
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    let deleted = filters.delete(&name, &DeleteParams::default()).await;
    let _ = leases
        .delete(&lease_name(&name), &DeleteParams::default())
        .await;
    result.expect("the sink against a real cluster");
    deleted.expect("the EnvoyFilter existed and was deleted");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        filters.get_opt(&name).await.expect("get").is_none(),
        "deleted"
    );
}

async fn exercise(spec: &KubernetesSpec) -> Result<(), String> {
    let steps = vec![5, 25, 50, 100];
    let sink = Kubernetes::new(spec.clone(), steps.clone());
    let claim = sink.claim().await.map_err(|e| e.to_string())?;
    let mut state = State::start(Duration::from_secs(1_785_000_000));
    state.step = 1;
    let record = Record {
        rollout: RolloutId {
            policy: "checkout".into(),
            split_rule: "rollout".into(),
            canary: "canary".into(),
            revision: "cluster-test".into(),
        },
        applied_weight: 25,
        generation: 2,
        state,
        updated_unix_ms: 1_785_000_000_000,
        control: Default::default(),
        hooks: Default::default(),
    };
    let policy = json!({
        "name": "checkout", "variants": ["stable", "canary"],
        "rules": [{"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "s",
            "weights": [{"variant": "canary", "weight": 2500}, {"variant": "stable", "weight": 7500}]}}]
    });
    sink.apply(&policy, &record)
        .await
        .map_err(|e| e.to_string())?;
    sink.save(&record).await.map_err(|e| e.to_string())?;

    // A second controller is refused while the first holds the Lease.
    let other = Kubernetes::new(spec.clone(), steps.clone());
    match other.claim().await {
        Err(SinkError::Busy(_)) => {}
        Err(e) => return Err(format!("second claim: expected Busy, got {}", e)),
        Ok(_) => return Err("a second controller got the Lease".into()),
    }
    drop(claim);

    // A restarted controller reads the same record back.
    let restarted = Kubernetes::new(spec.clone(), steps);
    let _claim = restarted.claim().await.map_err(|e| e.to_string())?;
    let loaded = restarted.load().await.map_err(|e| e.to_string())?;
    if loaded.as_ref() != Some(&record) {
        return Err(format!("read back {:?}, wrote {:?}", loaded, record));
    }
    restarted
        .set_abort_mark(true)
        .await
        .map_err(|e| e.to_string())?;
    restarted.save(&record).await.map_err(|e| e.to_string())?;
    if !restarted.abort_marked().await.map_err(|e| e.to_string())? {
        return Err("the abort mark did not survive the controller's apply".into());
    }
    restarted
        .set_abort_mark(false)
        .await
        .map_err(|e| e.to_string())?;
    if restarted.abort_marked().await.map_err(|e| e.to_string())? {
        return Err("the abort mark was not cleared".into());
    }
    Ok(())
}

/// What only a real API server shows about `Rollout`s: the generated CRD is accepted
/// (structural schema) and enforced (a wrong type is refused), the status subresource
/// takes the controller's merge patch, and deleting a Rollout garbage-collects the
/// EnvoyFilter it owns. Same opt-in as above; it needs rights on CRDs too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_api_server_enforces_the_rollout_crd_and_collects_an_owned_envoy_filter() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams, PostParams};
    use kube::CustomResourceExt;
    use meshcanary_controller::kubernetes::crd::Rollout;
    use meshcanary_controller::kubernetes::rollout_sink::{RolloutHandle, RolloutSink};
    use meshcanary_controller::spec::{RolloutOrigin, RolloutSpec};

    let Some(kubeconfig) = std::env::var_os("MESHCANARY_KUBECONFIG").map(PathBuf::from) else {
        note("kubernetes_cluster: skipped, MESHCANARY_KUBECONFIG is not set");
        return;
    };
    let namespace = std::env::var("MESHCANARY_NAMESPACE").unwrap_or_else(|_| "default".into());
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig"),
        &Default::default(),
    )
    .await
    .expect("config");
    meshcanary_controller::sink::kubernetes::prepare_tls();
    let client = kube::Client::try_from(config).expect("client");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "rollouts.meshcanary.io",
        &PatchParams::apply("meshcanary-test").force(),
        &Patch::Apply(&Rollout::crd()),
    )
    .await
    .expect("the API server accepts the generated CRD");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rollouts: Api<Rollout> = Api::namespaced(client.clone(), &namespace);
    let name = format!("meshcanary-cluster-test-{}", std::process::id());
    let spec = json!({
        "policy": {"name": "checkout", "variants": ["stable", "canary"], "rules": [{"name": "rollout",
            "split": {"by": {"header": "x-user-id"}, "salt": "s",
            "weights": [{"variant": "canary", "weight": 0}, {"variant": "stable", "weight": 100}]}}]},
        "split_rule": "rollout", "canary": "canary", "steps": [10, 100],
        "sink": {"kubernetes": {"wasm": {"local": "/var/local/lib/wasm/meshcanary_filter.wasm"}}}
    });
    let mut wrong: Rollout = serde_json::from_value(json!({
        "apiVersion": "meshcanary.io/v1alpha1", "kind": "Rollout",
        "metadata": {"name": format!("{}-wrong", name)}, "spec": spec.clone()
    }))
    .expect("object");
    wrong.spec.steps = None;
    assert!(
        rollouts
            .create(&PostParams::default(), &wrong)
            .await
            .is_err(),
        "a Rollout without steps is refused by the API server (required in the schema)"
    );
    let object: Rollout = serde_json::from_value(json!({
        "apiVersion": "meshcanary.io/v1alpha1", "kind": "Rollout",
        "metadata": {"name": name}, "spec": spec.clone()
    }))
    .expect("object");
    let created = rollouts
        .create(&PostParams::default(), &object)
        .await
        .expect("create the Rollout");
    let origin = RolloutOrigin {
        namespace: namespace.clone(),
        name: name.clone(),
        referenced_policy: None,
    };
    let rollout_spec = RolloutSpec::from_rollout(&spec, &origin).expect("valid spec");
    let handle = std::sync::Arc::new(RolloutHandle::new(
        &namespace,
        &name,
        created.metadata.uid.as_deref().unwrap_or_default(),
    ));
    handle.observe(&created);
    let leader = meshcanary_controller::kubernetes::lease::acquire(
        client.clone(),
        &namespace,
        &format!("{}-lease", name),
        &Default::default(),
    )
    .await
    .expect("lease");
    let recorder = kube::runtime::events::Recorder::new(client.clone(), "meshcanary-test".into());
    let sink = RolloutSink::new(
        client.clone(),
        handle,
        rollout_spec.clone(),
        leader,
        recorder,
    )
    .expect("a kubernetes sink");
    let mut record = Record::new(rollout_spec.id(), std::time::Duration::from_secs(1));
    record.applied_weight = 10;
    record.generation = 1;
    let policy = rollout_spec.policy_at(10).expect("policy");
    sink.apply(&policy, &record)
        .await
        .expect("apply and status");
    let read = sink.load().await.expect("load").expect("a record");
    assert_eq!(read.applied_weight, 10);
    let envoy_filters: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &envoy_filter_resource());
    assert!(envoy_filters.get_opt(&name).await.expect("get").is_some());
    rollouts
        .delete(&name, &DeleteParams::foreground())
        .await
        .expect("delete the Rollout");
    let mut gone = false;
    for _ in 0..60 {
        if envoy_filters.get_opt(&name).await.expect("get").is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        gone,
        "the owned EnvoyFilter is garbage-collected with its Rollout"
    );
}
