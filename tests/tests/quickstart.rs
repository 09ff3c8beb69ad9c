//! The README's quick start, exactly as a newcomer runs it: the committed example
//! configuration, with only its ports changed so tests never collide.

use std::time::Duration;

use meshcanary_e2e::{assert_no_wasm_failure, get, paths, Envoy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_example_routes_as_the_readme_says() {
    let example = std::fs::read_to_string(paths::repo().join("examples/quickstart/envoy.yaml"))
        .expect("examples/quickstart/envoy.yaml");
    let config = example
        .replace("port_value: 10000", "port_value: 0")
        .replace("port_value: 9901", "port_value: 0")
        .replace(
            "target/wasm/meshcanary_filter.wasm",
            &paths::wasm().display().to_string(),
        );
    assert_ne!(
        config, example,
        "the example's ports were found and replaced"
    );
    let envoy = Envoy::start_with_file(&config, "envoy.yaml", 1)
        .await
        .expect("the example starts");

    assert_eq!(get(&envoy, "/", &[]).await.body, b"stable\n");
    assert_eq!(
        get(&envoy, "/", &[("x-canary", b"always")]).await.body,
        b"canary\n"
    );
    assert_eq!(
        get(&envoy, "/", &[("cookie", b"plan=beta")]).await.body,
        b"canary\n"
    );
    let first = get(&envoy, "/", &[("x-user-id", b"user-7")]).await.body;
    for _ in 0..10 {
        assert_eq!(
            get(&envoy, "/", &[("x-user-id", b"user-7")]).await.body,
            first
        );
    }
    // The filter flushes its counts every 100 ms, later on a busy machine: wait for the
    // count (bounded), then check it.
    let qa = "wasmcustom.meshcanary.checkout.rule.qa.matches";
    assert_eq!(
        envoy
            .wait_counter(qa, Duration::from_secs(10), |v| v == 1)
            .await,
        1
    );
    assert_no_wasm_failure(&envoy.log());
}
