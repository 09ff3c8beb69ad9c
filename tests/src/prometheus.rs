//! A real Prometheus (Debian's package) on loopback, scraping Envoys' `/stats/prometheus`
//! every second, for the tests of the Prometheus metric source.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;

/// One scrape job: its name, the path scraped and the `http://host:port` of each target.
#[derive(Debug, Clone)]
pub struct ScrapeJob {
    /// `job_name` (the series' `job` label).
    pub name: &'static str,
    /// The path scraped on every target.
    pub metrics_path: &'static str,
    /// The targets, as `http://host:port` or `host:port`.
    pub urls: Vec<String>,
}

/// A real Prometheus on loopback with its own storage; killed when dropped.
pub struct PrometheusServer {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    /// Its HTTP API, e.g. `http://127.0.0.1:41234`.
    pub url: String,
}

impl PrometheusServer {
    /// The binary: `$MESHCANARY_PROMETHEUS`, else Debian's.
    pub fn binary() -> PathBuf {
        std::env::var_os("MESHCANARY_PROMETHEUS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/prometheus"))
    }

    /// Starts Prometheus scraping `/stats/prometheus` of each admin URL every second, and
    /// waits until it is ready.
    pub async fn start(admin_urls: &[String]) -> PrometheusServer {
        Self::start_jobs(&[ScrapeJob {
            name: "meshcanary",
            metrics_path: "/stats/prometheus",
            urls: admin_urls.to_vec(),
        }])
        .await
    }

    /// Starts Prometheus scraping every job's URLs every second (e.g. Envoys'
    /// `/stats/prometheus` and a controller's `/metrics`), and waits until it is ready.
    pub async fn start_jobs(jobs: &[ScrapeJob]) -> PrometheusServer {
        let scrape_configs: Vec<serde_json::Value> = jobs
            .iter()
            .map(|job| {
                let targets: Vec<String> = job
                    .urls
                    .iter()
                    .map(|url| url.trim_start_matches("http://").to_string())
                    .collect();
                json!({
                    "job_name": job.name,
                    "metrics_path": job.metrics_path,
                    "static_configs": [{"targets": targets}]
                })
            })
            .collect();
        let config = json!({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": scrape_configs
        });
        // The port is picked by binding and releasing it; another process could take it in
        // between, so a start that dies is retried on a fresh port.
        let mut last_log = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("temp dir");
            // YAML is a superset of JSON, so the JSON text is a valid prometheus.yml.
            let config_path = dir.path().join("prometheus.yml");
            std::fs::write(&config_path, config.to_string()).expect("write prometheus.yml");
            let log_path = dir.path().join("prometheus.log");
            let log = std::fs::File::create(&log_path).expect("log file");
            let port = {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                listener.local_addr().expect("local address").port()
            };
            let mut child = tokio::process::Command::new(Self::binary())
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .expect("start prometheus");
            let url = format!("http://127.0.0.1:{port}");
            let client = reqwest::Client::new();
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    break;
                }
                let ready = client.get(format!("{url}/-/ready")).send().await;
                if matches!(&ready, Ok(r) if r.status().is_success()) {
                    return PrometheusServer { child, dir, url };
                }
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    panic!("prometheus did not become ready in 15 s:\n{log}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("prometheus exited at start three times; last log:\n{last_log}");
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        // kill_on_drop would do it too; doing it here first keeps the order explicit (the
        // process dies before its storage directory is removed).
        let _ = self.child.start_kill();
    }
}

/// Whether Prometheus can run here; when it cannot, CI fails and a developer is told.
pub fn prometheus_available(test: &str) -> bool {
    let binary = PrometheusServer::binary();
    if binary.exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test}: {} not found; install it with `apt-get install prometheus` (or set \
             MESHCANARY_PROMETHEUS)",
            binary.display()
        );
    }
    eprintln!(
        "{test}: NOT RUN: {} not found (apt-get install prometheus, or set MESHCANARY_PROMETHEUS)",
        binary.display()
    );
    false
}
