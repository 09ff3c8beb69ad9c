//! The rollout spec's validation: every problem at once, each with its path.

use std::path::PathBuf;

use meshcanary_controller::spec::{
    KubernetesSpec, PatchContext, RolloutSpec, SinkSpec, SourceSpec, WasmCode,
};
use meshcanary_controller::verdict::OnNoData;
use meshcanary_policy::envoy::FailurePolicy;

const POLICY: &str = r#"{
  "name": "checkout",
  "variants": ["stable", "canary"],
  "rules": [
    {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
    {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "checkout-v2",
      "weights": [{"variant": "canary", "weight": 10}, {"variant": "stable", "weight": 90}]}}
  ]
}"#;

/// A folder with `policy.json`, and the spec text parsed as if it were `spec.yaml` there.
fn parse(spec: &str) -> (tempfile::TempDir, Result<RolloutSpec, Vec<String>>) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("policy.json"), POLICY).expect("policy");
    let file: PathBuf = dir.path().join("spec.yaml");
    let parsed =
        RolloutSpec::parse(spec, &file).map_err(|e| e.iter().map(ToString::to_string).collect());
    (dir, parsed)
}

const VALID: &str = r#"
policy: policy.json
split_rule: rollout
canary: canary
steps: [5, 25, 50, 100]
step_min_duration: 10s
interval: 1s
analysis:
  error_ceiling: 0.2
  max_error_rate: 0.01
  latency_threshold_ms: 500
  max_slow_rate: 0.01
  min_requests: 300
  alpha: 0.001
  no_data_timeout: 60s
  on_no_data: hold
source:
  envoy_admin: ["http://127.0.0.1:9901"]
sink:
  ecds_file: {path: policy.ecds.yaml, filter_name: meshcanary, wasm: meshcanary_filter.wasm}
"#;

#[test]
fn the_issue_example_is_valid_and_read_exactly() {
    let (dir, parsed) = parse(VALID);
    let spec = parsed.expect("valid spec");
    assert_eq!(spec.judge.steps, vec![5, 25, 50, 100]);
    assert_eq!(spec.judge.step_min_duration.as_secs(), 10);
    assert_eq!(spec.interval.as_secs(), 1);
    assert_eq!(spec.judge.analysis.on_no_data, OnNoData::Hold);
    assert_eq!(spec.judge.analysis.min_requests, 300);
    assert_eq!(spec.baseline(), vec!["stable".to_string()]);
    assert_eq!(
        spec.source,
        SourceSpec::EnvoyAdmin(vec!["http://127.0.0.1:9901".into()])
    );
    let SinkSpec::EcdsFile(ecds) = &spec.sink else {
        panic!("expected the ecds_file sink, got {:?}", spec.sink);
    };
    assert_eq!(
        ecds.path,
        dir.path().join("policy.ecds.yaml"),
        "relative to the spec's folder"
    );
    assert_eq!(
        ecds.admin,
        vec!["http://127.0.0.1:9901".to_string()],
        "confirmed through the source's admin"
    );
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let bad = r#"
policy: policy.json
split_rule: qa
canary: blue
steps: [50, 25, 100.5]
step_min_duration: soon
interval: 10ms
analysis:
  error_ceiling: 2
  max_error_rate: "low"
  latency_threshold_ms: 300
  alpha: 1.5
  on_no_data: panic
  colour: red
source:
  envoy_admin: ["127.0.0.1:9901"]
sink:
  ecds_file: {path: /no/such/folder/x.yaml}
extra: 1
"#;
    let (_dir, parsed) = parse(bad);
    let errors = parsed.expect_err("invalid spec");
    for expected in [
        "extra: unknown field",
        "split_rule: rule \"qa\" is not a split",
        "steps[2]: expected a whole percentage, found 100.5",
        "step_min_duration: \"soon\" is not a duration",
        "interval: must be at least 100ms",
        "analysis.colour: unknown field",
        "analysis.max_error_rate: expected a number, found a string",
        "analysis.latency_threshold_ms: 300 is not a latency histogram bucket boundary",
        "analysis.on_no_data: expected \"rollback\" or \"hold\"",
        "source.envoy_admin[0]: expected an http:// URL",
        "sink.ecds_file.path: folder of /no/such/folder/x.yaml does not exist",
        "sink.ecds_file.wasm: required field is missing",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "missing {expected:?} in:\n{}",
            errors.join("\n")
        );
    }
    // Range rules come from the verdict's own spec, reported in the same run.
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("analysis.error_ceiling")),
        "{}",
        errors.join("\n")
    );
    assert!(
        errors.iter().any(|e| e.starts_with("analysis.alpha")),
        "{}",
        errors.join("\n")
    );
}

#[test]
fn an_invalid_base_policy_is_reported_under_policy() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("policy.json"),
        r#"{"name": "x", "variants": []}"#,
    )
    .expect("policy");
    let errors = RolloutSpec::parse(VALID, &dir.path().join("spec.yaml")).expect_err("invalid");
    let text = errors.to_string();
    assert!(
        text.contains("policy: ") && text.contains("variants: must list at least one variant"),
        "{text}"
    );
}

#[test]
fn not_yaml_and_missing_fields() {
    let (_dir, parsed) = parse("policy: [unclosed");
    assert!(parsed.expect_err("invalid")[0].starts_with("not valid YAML"));
    let (_dir, parsed) = parse("{}");
    let errors = parsed.expect_err("invalid");
    for field in ["policy", "split_rule", "canary", "steps", "sink"] {
        assert!(
            errors.contains(&format!("{field}: required field is missing")),
            "{field}: {errors:?}"
        );
    }
}

/// `VALID` with another sink section.
fn with_sink(sink: &str) -> String {
    let head = VALID.split("sink:").next().unwrap_or_default();
    format!("{head}sink:\n{sink}")
}

#[test]
fn the_kubernetes_sink_is_read_with_its_defaults() {
    let (dir, parsed) = parse(&with_sink(
        "  kubernetes:\n    namespace: shop\n    name: checkout-canary\n    workload_selector: {labels: {app: frontend, \"app.kubernetes.io/part-of\": shop}}\n    wasm: {local: /var/local/lib/wasm/meshcanary_filter.wasm}\n    kubeconfig: kube/config\n",
    ));
    let spec = parsed.expect("valid spec");
    assert_eq!(
        spec.sink,
        SinkSpec::Kubernetes(KubernetesSpec {
            namespace: "shop".into(),
            name: "checkout-canary".into(),
            workload_selector: Some(
                [("app", "frontend"), ("app.kubernetes.io/part-of", "shop")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            ),
            filter_name: "meshcanary".into(),
            wasm: WasmCode::Local("/var/local/lib/wasm/meshcanary_filter.wasm".into()),
            context: vec![PatchContext::SidecarOutbound, PatchContext::Gateway],
            kubeconfig: Some(dir.path().join("kube/config")),
            failure_policy: FailurePolicy::Reload,
        })
    );

    let (_dir, parsed) = parse(&with_sink(
        "  kubernetes:\n    namespace: shop\n    name: checkout-canary\n    filter_name: shop.meshcanary\n    context: [GATEWAY]\n    wasm:\n      http: {url: \"https://example.com/f.wasm\", sha256: \"ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789\"}\n",
    ));
    let spec = parsed.expect("valid spec");
    let SinkSpec::Kubernetes(k) = &spec.sink else {
        panic!("expected the kubernetes sink, got {:?}", spec.sink);
    };
    assert_eq!(k.workload_selector, None, "every workload in the namespace");
    assert_eq!(k.filter_name, "shop.meshcanary");
    assert_eq!(k.context, vec![PatchContext::Gateway]);
    assert_eq!(
        k.wasm,
        WasmCode::Http {
            url: "https://example.com/f.wasm".into(),
            sha256: "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789".into(),
        }
    );
    assert_eq!(
        k.failure_policy,
        FailurePolicy::Open,
        "a module the Istio agent downloads fails open: under any other policy a failed download installs a deny-all filter"
    );
}

#[test]
fn an_oci_module_is_pinned_by_its_image_digest_and_fails_open() {
    let digest = "8531412b1f02df78e0bdf891272d03a174945575c0da0e80df9b6ee6af953831";
    for url in [
        format!("oci://registry.internal:5000/meshcanary/filter@sha256:{digest}"),
        // A tag may stand before the digest; the digest is what is pulled.
        format!("oci://registry.internal/team/meshcanary/filter:0.1.0@sha256:{digest}"),
    ] {
        let (_dir, parsed) = parse(&with_sink(&format!(
            "  kubernetes:\n    namespace: shop\n    name: checkout\n    wasm:\n      oci: {{url: \"{url}\"}}\n"
        )));
        let SinkSpec::Kubernetes(k) = parsed.expect("valid spec").sink else {
            panic!("expected the kubernetes sink");
        };
        assert_eq!(
            k.wasm,
            WasmCode::Oci {
                url: url.clone(),
                digest: digest.into()
            }
        );
        assert_eq!(
            k.failure_policy,
            FailurePolicy::Open,
            "a module the Istio agent pulls fails open, as an http one"
        );
    }

    for (url, expected) in [
        (
            "oci://registry.internal/meshcanary/filter:0.1.0".to_string(),
            "a tag alone is mutable, pin the image by its digest",
        ),
        (
            "oci://registry.internal/meshcanary/filter".to_string(),
            "a tag alone is mutable",
        ),
        (
            format!(
                "oci://registry.internal/meshcanary/filter@sha256:{}",
                digest.to_uppercase()
            ),
            "the digest must be sha256: and 64 lower-case hex digits",
        ),
        (
            "oci://registry.internal/meshcanary/filter@sha256:abc".to_string(),
            "the digest must be sha256: and 64 lower-case hex digits",
        ),
        (
            format!("https://registry.internal/meshcanary/filter@sha256:{digest}"),
            "expected oci://REGISTRY/REPOSITORY@sha256:DIGEST",
        ),
        (
            format!("oci://registry.internal@sha256:{digest}"),
            "no repository after the registry",
        ),
        (
            format!("oci:///meshcanary/filter@sha256:{digest}"),
            "no registry host",
        ),
        (
            format!("oci://registry.internal/MeshCanary/filter@sha256:{digest}"),
            "is not a repository name",
        ),
        (
            format!("oci://registry.internal/meshcanary/filter:-x@sha256:{digest}"),
            "\"-x\" is not a tag",
        ),
    ] {
        let (_dir, parsed) = parse(&with_sink(&format!(
            "  kubernetes:\n    namespace: shop\n    name: checkout\n    wasm:\n      oci: {{url: \"{url}\"}}\n"
        )));
        let errors = parsed.expect_err(&url);
        let prefix = format!("sink.kubernetes.wasm.oci.url: {url:?}: ");
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(&prefix) && e.contains(expected)),
            "missing {prefix:?}…{expected:?} in:\n{}",
            errors.join("\n")
        );
    }

    let (_dir, parsed) = parse(&with_sink(
        "  kubernetes:\n    namespace: shop\n    name: checkout\n    wasm:\n      oci: {sha256: abc}\n",
    ));
    let errors = parsed.expect_err("no url");
    for expected in [
        "sink.kubernetes.wasm.oci.sha256: unknown field",
        "sink.kubernetes.wasm.oci.url: required field is missing",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "missing {expected:?} in:\n{}",
            errors.join("\n")
        );
    }
    let (_dir, parsed) = parse(&with_sink(&format!(
        "  kubernetes:\n    namespace: shop\n    name: checkout\n    wasm:\n      local: /m.wasm\n      oci: {{url: \"oci://r/m@sha256:{digest}\"}}\n"
    )));
    let errors = parsed.expect_err("two sources");
    assert!(
        errors
            .iter()
            .any(|e| e == "sink.kubernetes.wasm: expected exactly one of local, http, oci"),
        "{}",
        errors.join("\n")
    );
}

#[test]
fn the_failure_policy_defaults_to_reload_and_is_read_in_both_sinks() {
    let (_dir, parsed) = parse(VALID);
    let SinkSpec::EcdsFile(ecds) = parsed.expect("valid spec").sink else {
        panic!("expected the ECDS file sink");
    };
    assert_eq!(ecds.failure_policy, FailurePolicy::Reload);

    for (name, expected) in [
        ("FAIL_RELOAD", FailurePolicy::Reload),
        ("FAIL_OPEN", FailurePolicy::Open),
        ("FAIL_CLOSED", FailurePolicy::Closed),
    ] {
        let (_dir, parsed) = parse(&with_sink(&format!(
            "  ecds_file: {{path: policy.ecds.yaml, wasm: m.wasm, failure_policy: {name}}}\n"
        )));
        let SinkSpec::EcdsFile(ecds) = parsed.expect("valid spec").sink else {
            panic!("expected the ECDS file sink");
        };
        assert_eq!(ecds.failure_policy, expected, "{name}");

        let (_dir, parsed) = parse(&with_sink(&format!(
            "  kubernetes:\n    namespace: shop\n    name: checkout\n    wasm: {{local: /m.wasm}}\n    failure_policy: {name}\n"
        )));
        let SinkSpec::Kubernetes(k) = parsed.expect("valid spec").sink else {
            panic!("expected the kubernetes sink");
        };
        assert_eq!(k.failure_policy, expected, "{name}");
    }

    let (_dir, parsed) = parse(&with_sink(
        "  kubernetes:\n    namespace: shop\n    name: checkout\n    wasm: {local: /m.wasm}\n    failure_policy: FAIL_CLOSE\n",
    ));
    let errors = parsed.expect_err("Istio's spelling is not Envoy's");
    assert!(
        errors.iter().any(|e| e
            == "sink.kubernetes.failure_policy: expected one of \"FAIL_RELOAD\", \"FAIL_OPEN\", \"FAIL_CLOSED\", found \"FAIL_CLOSE\""),
        "{}",
        errors.join("\n")
    );
    let (_dir, parsed) = parse(&with_sink(
        "  ecds_file: {path: policy.ecds.yaml, wasm: m.wasm, failure_policy: 3}\n",
    ));
    let errors = parsed.expect_err("not a name");
    assert!(
        errors
            .iter()
            .any(|e| e
                == "sink.ecds_file.failure_policy: expected a string (quote it), found a number"),
        "{}",
        errors.join("\n")
    );
}

#[test]
fn every_kubernetes_sink_problem_is_reported_with_its_path() {
    let (_dir, parsed) = parse(&with_sink(
        "  kubernetes:\n    namespace: Shop_1\n    name: -canary\n    workload_selector: {labels: {app: 3, \"bad key!\": x}}\n    filter_name: \"\"\n    wasm: {local: relative.wasm, http: {url: x}}\n    context: [SIDECAR_INBOUND, GATEWAY, GATEWAY]\n    colour: red\n",
    ));
    let errors = parsed.expect_err("invalid spec");
    for expected in [
        "sink.kubernetes.colour: unknown field",
        "sink.kubernetes.namespace: \"Shop_1\" is not a valid Kubernetes name",
        "sink.kubernetes.name: \"-canary\" is not a valid Kubernetes name",
        "sink.kubernetes.workload_selector.labels.app: expected a string (quote it), found a number",
        "sink.kubernetes.workload_selector.labels.bad key!: not a valid label key",
        "sink.kubernetes.filter_name: must be a non-empty name without spaces",
        "sink.kubernetes.wasm: expected exactly one of local, http",
        "sink.kubernetes.context[0]: expected SIDECAR_OUTBOUND or GATEWAY",
        "sink.kubernetes.context[2]: GATEWAY is listed twice",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "missing {expected:?} in:\n{}",
            errors.join("\n")
        );
    }

    let (_dir, parsed) = parse(&with_sink(
        "  kubernetes:\n    wasm: {http: {url: \"ftp://x\", sha256: abc}}\n",
    ));
    let errors = parsed.expect_err("invalid spec");
    for expected in [
        "sink.kubernetes.namespace: required field is missing",
        "sink.kubernetes.name: required field is missing",
        "sink.kubernetes.wasm.http.url: expected an http:// or https:// URL",
        "sink.kubernetes.wasm.http.sha256: expected the module's SHA-256 as 64 hex digits",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "missing {expected:?} in:\n{}",
            errors.join("\n")
        );
    }

    let (_dir, parsed) = parse(&with_sink(
        "  kubernetes:\n    namespace: shop\n    name: c\n    wasm: {local: relative.wasm}\n  ecds_file: {path: x.yaml, wasm: f.wasm}\n",
    ));
    let errors = parsed.expect_err("invalid spec");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("sink: expected ecds_file or kubernetes (exactly one)")),
        "{}",
        errors.join("\n")
    );
}

#[test]
fn prometheus_sources_read_the_filter_or_istio_metrics() {
    let with_source = |source: &str| {
        VALID.replace(
            "source:\n  envoy_admin: [\"http://127.0.0.1:9901\"]\n",
            &format!("source:\n{source}"),
        )
    };
    // The sink still needs an admin to confirm ECDS updates.
    let admin = "  ecds_file: {path: policy.ecds.yaml, filter_name: meshcanary, wasm: meshcanary_filter.wasm, admin: [\"http://127.0.0.1:9901\"]}\n";
    let fix_sink = |text: String| {
        text.replace(
            "  ecds_file: {path: policy.ecds.yaml, filter_name: meshcanary, wasm: meshcanary_filter.wasm}\n",
            admin,
        )
    };
    let (_dir, parsed) = parse(&fix_sink(with_source(
        "  prometheus: {url: \"http://prom:9090\"}\n",
    )));
    let spec = parsed.expect("valid");
    assert!(matches!(
        spec.source,
        SourceSpec::Prometheus {
            metrics: meshcanary_controller::spec::PrometheusMetrics::Filter,
            ..
        }
    ));
    let istio = "  prometheus:\n    url: http://prom:9090\n    metrics: istio\n    destination_service: checkout.shop.svc.cluster.local\n    versions: {canary: v2}\n";
    let (_dir, parsed) = parse(&fix_sink(with_source(istio)));
    match parsed.expect("valid").source {
        SourceSpec::Prometheus {
            metrics:
                meshcanary_controller::spec::PrometheusMetrics::Istio {
                    destination_service,
                    reporter,
                    versions,
                },
            ..
        } => {
            assert_eq!(destination_service, "checkout.shop.svc.cluster.local");
            assert_eq!(reporter, "source");
            assert_eq!(versions.get("canary").map(String::as_str), Some("v2"));
        }
        other => panic!("unexpected source {other:?}"),
    }
    let bad = "  prometheus:\n    url: http://prom:9090\n    metrics: linkerd\n    reporter: sidecar\n    destination_service: x\n";
    let (_dir, parsed) = parse(&fix_sink(with_source(bad)));
    let errors = parsed.expect_err("invalid");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("source.prometheus.metrics: expected \"filter\" or \"istio\"")),
        "{errors:?}"
    );
    let missing = "  prometheus:\n    url: http://prom:9090\n    metrics: istio\n";
    let (_dir, parsed) = parse(&fix_sink(with_source(missing)));
    assert!(parsed
        .expect_err("invalid")
        .contains(&"source.prometheus.destination_service: required field is missing".to_string()));
}

#[test]
fn analysis_dry_run_is_off_by_default_read_when_set_and_must_be_a_boolean() {
    let (_dir, parsed) = parse(VALID);
    assert!(!parsed.expect("valid").dry_run, "off by default");
    let on = VALID.replace(
        "  on_no_data: hold\n",
        "  on_no_data: hold\n  dry_run: true\n",
    );
    let (_dir, parsed) = parse(&on);
    assert!(parsed.expect("valid").dry_run);
    let bad = VALID.replace(
        "  on_no_data: hold\n",
        "  on_no_data: hold\n  dry_run: sometimes\n",
    );
    let (_dir, parsed) = parse(&bad);
    let problems = parsed.expect_err("a string is not a boolean");
    assert!(
        problems.iter().any(|p| p.starts_with("analysis.dry_run:")),
        "{problems:?}"
    );
    // A different dry_run is a different release (the spec's revision changes).
    let (_d1, off) = parse(VALID);
    let (_d2, on) = parse(&on);
    assert_ne!(off.expect("valid").revision, on.expect("valid").revision);
}
