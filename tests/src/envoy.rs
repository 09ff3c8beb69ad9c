//! A real Envoy process for a test: configuration rendering, start-up (with the admin
//! and listener ports chosen by the kernel, so tests never collide), stats and logs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use meshcanary_policy::envoy::{ecds_document, wasm_filter_config, FailurePolicy};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::paths;

/// Name of the filter in every configuration (and of the ECDS resource).
pub const FILTER_NAME: &str = "meshcanary";

/// How long a stats read waits for the filter's counts to reach Envoy: the filter flushes
/// them every 100 ms (`metrics::FLUSH_PERIOD` in the filter), plus a margin for a busy
/// worker.
pub const FILTER_FLUSH_WAIT: Duration = Duration::from_millis(250);

/// Where the filter gets its policy from.
#[derive(Debug, Clone)]
pub enum FilterSource {
    /// No meshcanary filter at all (plain Envoy).
    None,
    /// The policy JSON inline in the listener configuration.
    Inline(String),
    /// Extension config discovery from a watched file (see [`write_ecds`]).
    Ecds(PathBuf),
    /// An HTTP filter entry given as it is (`{"name": …, "typed_config" | "config_discovery": …}`),
    /// e.g. lifted from an Istio EnvoyFilter patch.
    Raw(Value),
}

/// A cluster on loopback.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Cluster name.
    pub name: String,
    /// Its single endpoint.
    pub addr: SocketAddr,
}

/// Everything a test varies in the Envoy configuration.
#[derive(Debug, Clone)]
pub struct EnvoyConfig {
    /// Where the filter's policy comes from.
    pub filter: FilterSource,
    /// Upstream clusters.
    pub clusters: Vec<Cluster>,
    /// `(decision header value, cluster)` routes, checked in order.
    pub routes: Vec<(String, String)>,
    /// Cluster for requests no route above matched.
    pub default_cluster: String,
    /// Header the routes match on.
    pub decision_header: String,
    /// Worker threads.
    pub concurrency: u32,
    /// Envoy's limit on request headers (its default is 100).
    pub max_request_headers: u32,
    /// Accept HTTP/1.0 requests (Envoy answers them 426 by default).
    pub accept_http_10: bool,
    /// Envoy's limit on the size of request headers, KiB (its default is 60).
    pub max_request_headers_kb: u32,
    /// Bootstrap `stats_flush_interval`; `None` leaves Envoy's default (5 s). Histograms in
    /// the admin output (and `/stats/prometheus`) only change at a flush, so tests that read
    /// latency histograms shorten it.
    pub stats_flush_interval: Option<Duration>,
}

impl EnvoyConfig {
    /// Two variants, `stable` and `canary`, each on its own cluster; default `stable`.
    pub fn stable_canary(filter: FilterSource, stable: SocketAddr, canary: SocketAddr) -> Self {
        EnvoyConfig {
            filter,
            clusters: vec![
                Cluster {
                    name: "stable".into(),
                    addr: stable,
                },
                Cluster {
                    name: "canary".into(),
                    addr: canary,
                },
            ],
            routes: vec![
                ("canary".into(), "canary".into()),
                ("stable".into(), "stable".into()),
            ],
            default_cluster: "stable".into(),
            decision_header: "x-meshcanary-variant".into(),
            concurrency: 2,
            max_request_headers: 100,
            accept_http_10: false,
            max_request_headers_kb: 60,
            stats_flush_interval: None,
        }
    }

    /// The bootstrap configuration as JSON.
    pub fn render(&self) -> Value {
        let mut routes: Vec<Value> = self
            .routes
            .iter()
            .map(|(value, cluster)| {
                json!({
                    "match": {"prefix": "/", "headers": [
                        {"name": self.decision_header, "string_match": {"exact": value}}
                    ]},
                    "route": {"cluster": cluster}
                })
            })
            .collect();
        routes.push(json!({"match": {"prefix": "/"}, "route": {"cluster": self.default_cluster}}));
        let mut http_filters = Vec::new();
        match &self.filter {
            FilterSource::None => {}
            FilterSource::Inline(policy) => http_filters.push(json!({
                "name": FILTER_NAME,
                "typed_config": wasm_filter(policy, &paths::wasm()),
            })),
            FilterSource::Raw(filter) => http_filters.push(filter.clone()),
            FilterSource::Ecds(path) => http_filters.push(json!({
                "name": FILTER_NAME,
                "config_discovery": {
                    "config_source": {
                        "path_config_source": {
                            "path": path,
                            "watched_directory": {"path": path.parent().unwrap_or(Path::new("/"))}
                        },
                        "resource_api_version": "V3"
                    },
                    "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"]
                }
            })),
        }
        http_filters.push(json!({
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
        }));
        let clusters: Vec<Value> = self
            .clusters
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {"cluster_name": c.name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                        "address": {"socket_address": {"address": c.addr.ip().to_string(), "port_value": c.addr.port()}}
                    }}]}]}
                })
            })
            .collect();
        let mut bootstrap = json!({
            "node": {"id": "meshcanary-test", "cluster": "meshcanary-test"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [{
                    "name": "main",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "ingress",
                            "common_http_protocol_options": {"max_headers_count": self.max_request_headers},
                            "http_protocol_options": {"accept_http_10": self.accept_http_10},
                            "max_request_headers_kb": self.max_request_headers_kb,
                            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
                            "http_filters": http_filters
                        }
                    }]}]
                }],
                "clusters": clusters
            }
        });
        if let Some(interval) = self.stats_flush_interval {
            // Protobuf JSON spells a Duration as seconds with a fraction and an `s`.
            bootstrap["stats_flush_interval"] = json!(format!(
                "{}.{:09}s",
                interval.as_secs(),
                interval.subsec_nanos()
            ));
        }
        bootstrap
    }
}

/// The `envoy.extensions.filters.http.wasm.v3.Wasm` message for a policy, exactly as the
/// controller's ECDS sink renders it (with its default failure policy).
pub fn wasm_filter(policy_json: &str, wasm: &Path) -> Value {
    wasm_filter_config(
        FILTER_NAME,
        wasm,
        &policy_value(policy_json),
        FailurePolicy::default(),
    )
}

/// Writes the ECDS file Envoy watches, atomically (temporary file, then rename), with
/// `version` as its `version_info`, rendered by the controller's own ECDS sink code.
pub fn write_ecds(path: &Path, version: &str, policy_json: &str) {
    if let Err(e) = try_write_ecds(path, version, &policy_value(policy_json)) {
        panic!("{e}");
    }
}

/// [`write_ecds`] for programs (the demo): the policy as a JSON value, and a failure to
/// write reported, not panicked.
pub fn try_write_ecds(path: &Path, version: &str, policy: &Value) -> Result<(), String> {
    let response = ecds_document(
        FILTER_NAME,
        &paths::wasm(),
        policy,
        FailurePolicy::default(),
        version,
    );
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(&response).map_err(|e| format!("ECDS document: {e}"))?;
    std::fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    // The rename is what makes the update atomic: Envoy never reads a half-written file.
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("cannot move {} into place: {e}", path.display()))
}

fn policy_value(policy_json: &str) -> Value {
    serde_json::from_str(policy_json).expect("test policies are JSON (valid or not as policies)")
}

/// `VmRSS` of a process (an Envoy's, say: [`Envoy::pid`]), KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// A running Envoy; killed when dropped.
pub struct Envoy {
    child: Child,
    dir: tempfile::TempDir,
    /// Admin endpoint, e.g. `http://127.0.0.1:41234`.
    pub admin: String,
    /// The HTTP listener.
    pub listener: SocketAddr,
    http: reqwest::Client,
}

impl Envoy {
    /// Starts Envoy and waits until it is ready; `Err` carries its log when it refused
    /// the configuration or did not become ready in time.
    pub async fn start(config: &EnvoyConfig) -> Result<Envoy, String> {
        let rendered = serde_json::to_string_pretty(&config.render()).expect("json");
        Self::start_with_file(&rendered, "envoy.json", config.concurrency).await
    }

    /// Starts Envoy from a configuration text (`file_name` decides JSON or YAML), run
    /// from the repository root so relative paths in it resolve as for a user.
    pub async fn start_with_file(
        contents: &str,
        file_name: &str,
        concurrency: u32,
    ) -> Result<Envoy, String> {
        Self::start_under(
            &[],
            contents,
            file_name,
            concurrency,
            Duration::from_secs(30),
        )
        .await
    }

    /// As [`start_with_file`](Self::start_with_file), with Envoy run by `wrapper` (a
    /// command and its arguments, Envoy's command line appended: `valgrind
    /// --tool=callgrind …`), which may take up to `ready_within` to get it ready. The
    /// wrapper must run Envoy in its own process (as valgrind does): [`pid`](Self::pid)
    /// is the wrapper's.
    pub async fn start_under(
        wrapper: &[String],
        contents: &str,
        file_name: &str,
        concurrency: u32,
        ready_within: Duration,
    ) -> Result<Envoy, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join(file_name);
        std::fs::write(&config_path, contents).expect("write config");
        let admin_path = dir.path().join("admin-address");
        let log_path = dir.path().join("envoy.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(paths::envoy());
                command
            }
            None => Command::new(paths::envoy()),
        };
        let mut child = command
            .arg("-c")
            .arg(&config_path)
            .arg("--concurrency")
            .arg(concurrency.to_string())
            .current_dir(paths::repo())
            .arg("--disable-hot-restart")
            .args(["--log-level", "warn", "--component-log-level", "wasm:info"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {}", paths::envoy().display(), e))?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .expect("http client");
        let deadline = Instant::now() + ready_within;
        let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let admin = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("envoy exited with {}:\n{}", status, read_log()));
            }
            if let Ok(addr) = std::fs::read_to_string(&admin_path) {
                if !addr.trim().is_empty() {
                    break format!("http://{}", addr.trim());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "envoy wrote no admin address in time:\n{}",
                    read_log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("envoy exited with {}:\n{}", status, read_log()));
            }
            let ready = http.get(format!("{}/ready", admin)).send().await;
            if matches!(&ready, Ok(r) if r.status().is_success()) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "envoy did not become ready in time:\n{}",
                    read_log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let listeners: Value = http
            .get(format!("{}/listeners?format=json", admin))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let socket = &listeners["listener_statuses"][0]["local_address"]["socket_address"];
        let listener = format!(
            "{}:{}",
            socket["address"].as_str().unwrap_or("127.0.0.1"),
            socket["port_value"].as_u64().unwrap_or(0)
        )
        .parse()
        .map_err(|e| format!("listener address in {}: {}", listeners, e))?;
        Ok(Envoy {
            child,
            dir,
            admin,
            listener,
            http,
        })
    }

    /// A URL on the HTTP listener.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.listener, path_and_query)
    }

    /// A shared HTTP client (keep-alive pool).
    pub fn client(&self) -> &reqwest::Client {
        &self.http
    }

    /// Envoy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// A scratch directory that lives as long as this Envoy.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// All counters and gauges (`/stats?format=json`), by full name, once everything
    /// counted before the call has reached Envoy: the filter adds its counts to Envoy's
    /// stats every 100 ms, so this first waits [`FILTER_FLUSH_WAIT`].
    pub async fn stats(&self) -> HashMap<String, u64> {
        tokio::time::sleep(FILTER_FLUSH_WAIT).await;
        self.stats_now().await
    }

    /// All counters and gauges as Envoy has them right now.
    async fn stats_now(&self) -> HashMap<String, u64> {
        self.stats_json()
            .await
            .iter()
            .filter_map(|s| Some((s["name"].as_str()?.to_string(), s["value"].as_u64()?)))
            .collect()
    }

    /// Text read-outs (such as ECDS `version_text`), by full name.
    pub async fn text_stats(&self) -> HashMap<String, String> {
        self.stats_json()
            .await
            .iter()
            .filter_map(|s| {
                Some((
                    s["name"].as_str()?.to_string(),
                    s["value"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    async fn stats_json(&self) -> Vec<Value> {
        let body: Value = match self
            .http
            .get(format!("{}/stats?format=json", self.admin))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        body["stats"].as_array().cloned().unwrap_or_default()
    }

    /// One counter (0 when absent).
    pub async fn counter(&self, name: &str) -> u64 {
        self.stats().await.get(name).copied().unwrap_or(0)
    }

    /// Waits until the ECDS resource reports `version` as applied.
    pub async fn wait_ecds_version(&self, version: &str, timeout: Duration) -> Result<(), String> {
        let name = format!(
            "extension_config_discovery.http_filter.{}.version_text",
            FILTER_NAME
        );
        let deadline = Instant::now() + timeout;
        loop {
            let texts = self.text_stats().await;
            if texts.get(&name).map(String::as_str) == Some(version) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "ECDS version {:?} not applied; {} = {:?}",
                    version,
                    name,
                    texts.get(&name)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Envoy's process id (for reading its memory in `/proc`); `None` once it has exited.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops Envoy now.
    pub async fn stop(mut self) {
        self.kill().await;
    }

    /// Kills Envoy now (SIGKILL, as a crash or an OOM kill would), keeping its log.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

impl Envoy {
    /// Waits until all counters and gauges together satisfy `done` (say, until every
    /// counter a test expects has reached its value: counters only grow, so a read after
    /// that is not stale); returns them as last read either way, for the assertions.
    pub async fn wait_stats(
        &self,
        timeout: Duration,
        done: impl Fn(&HashMap<String, u64>) -> bool,
    ) -> HashMap<String, u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats_now().await;
            if done(&stats) || Instant::now() > deadline {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until counter `name` satisfies `done`; returns its last value either way.
    pub async fn wait_counter(
        &self,
        name: &str,
        timeout: Duration,
        done: impl Fn(u64) -> bool,
    ) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.stats_now().await.get(name).copied().unwrap_or(0);
            if done(value) || Instant::now() > deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
