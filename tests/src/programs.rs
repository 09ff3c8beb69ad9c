//! The crate's helper programs run as real processes, for the demo: `meshcanary-upstream`
//! (started on a kernel-chosen port, steered through its control endpoint) and
//! `meshcanary-load` (ended early with SIGTERM, its JSON summary read back).
//!
//! Every process is started with `kill_on_drop`, so whatever path the caller takes out
//! (an error, a deadline, a signal), dropping the handle stops the process.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::upstream::{CONTROL_PATH, STATS_PATH};

/// How long a program may take to say where it listens.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP client that only ever talks to loopback: no proxy from the environment (it
/// would take the request off the machine) and no redirects.
pub fn loopback_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

/// A running `meshcanary-upstream` process; killed when dropped.
pub struct UpstreamProgram {
    /// Its name (the `x-upstream` answer header).
    pub name: String,
    /// Where it listens (127.0.0.1, a port the kernel chose).
    pub addr: SocketAddr,
    child: Child,
    http: reqwest::Client,
}

impl UpstreamProgram {
    /// Starts `bin --name NAME --listen 127.0.0.1:0 ARGS…` and learns its port from its
    /// first stdout line (`listening ADDR`).
    pub async fn start(bin: &Path, name: &str, args: &[String]) -> Result<Self, String> {
        let mut child = Command::new(bin)
            .args(["--name", name, "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| format!("{name}: no stdout"))?;
        let mut first = String::new();
        let read =
            tokio::time::timeout(START_TIMEOUT, BufReader::new(stdout).read_line(&mut first)).await;
        match read {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) => return Err(format!("upstream {name} exited before listening")),
            Ok(Err(e)) => return Err(format!("upstream {name}: cannot read its stdout: {e}")),
            Err(_) => {
                return Err(format!(
                    "upstream {name} did not listen within {START_TIMEOUT:?}"
                ))
            }
        }
        let addr = first
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                format!("upstream {name}: expected `listening ADDR` first, got {first:?}")
            })?;
        Ok(UpstreamProgram {
            name: name.to_string(),
            addr,
            child,
            http: loopback_client()?,
        })
    }

    /// Changes its behaviour: `PUT /_control?QUERY` (e.g. `error_rate=0.1`).
    pub async fn control(&self, query: &str) -> Result<(), String> {
        let url = format!("http://{}{CONTROL_PATH}?{query}", self.addr);
        let response = self
            .http
            .put(&url)
            .send()
            .await
            .map_err(|e| format!("PUT {url}: {e}"))?;
        if response.status().is_success() {
            Ok(())
        } else {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            Err(format!("PUT {url}: {status} {}", body.trim()))
        }
    }

    /// Its counts and behaviour: `GET /_stats`.
    pub async fn stats(&self) -> Result<Value, String> {
        let url = format!("http://{}{STATS_PATH}", self.addr);
        self.http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("GET {url}: {e}"))
    }

    /// Stops it now and reaps it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A running `meshcanary-load` process; killed when dropped.
pub struct LoadProgram {
    child: Child,
    /// Collects its stdout (the summary line) until it exits.
    stdout: JoinHandle<String>,
}

impl LoadProgram {
    /// Starts `bin ARGS…` with its stdout captured.
    pub fn start(bin: &Path, args: &[String]) -> Result<Self, String> {
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut out = child
            .stdout
            .take()
            .ok_or_else(|| "meshcanary-load: no stdout".to_string())?;
        let stdout = tokio::spawn(async move {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text).await;
            text
        });
        Ok(LoadProgram { child, stdout })
    }

    /// Ends it early with SIGTERM (it stops sending, waits for the answers on their way)
    /// and returns its JSON summary; `limit` bounds the wait, after which it is killed.
    pub async fn stop(mut self, limit: Duration) -> Result<Value, String> {
        if let Some(pid) = self
            .child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            // Fails only if it has already exited, which is fine: its summary is printed.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.map_err(|e| format!("meshcanary-load: {e}"))?,
            Err(_) => {
                let _ = self.child.kill().await;
                return Err(format!(
                    "meshcanary-load did not stop within {limit:?} of SIGTERM"
                ));
            }
        };
        let stdout = self
            .stdout
            .await
            .map_err(|e| format!("meshcanary-load: {e}"))?;
        if !status.success() {
            return Err(format!("meshcanary-load exited with {status}"));
        }
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .map_err(|e| format!("meshcanary-load: summary {line:?} is not JSON: {e}"))
    }
}
