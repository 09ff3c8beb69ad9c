//! The ECDS file sink: a standalone Envoy watches a file holding the filter's
//! configuration (`config_discovery` with a `path_config_source`); the controller
//! replaces it atomically and confirms through Envoy's admin that it was applied.
//!
//! Next to the file live `<file>.state.json` (the rollout record, written atomically
//! after each step, so a restart resumes), `<file>.lock` (an OS file lock held while
//! a controller drives the rollout; the OS releases it if the process dies) and, after
//! `meshcanary abort`, `<file>.abort`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use meshcanary_policy::envoy::{
    ecds_document, wasm_filter_config, wasm_filter_config_with_code, FailurePolicy,
};

use super::{ConfigSink, Record, SinkError};
use crate::spec::EcdsFileSpec;

/// How long the sink waits for Envoy to report a new version.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);

/// The ECDS file sink.
pub struct EcdsFile {
    spec: EcdsFileSpec,
    http: reqwest::Client,
}

impl EcdsFile {
    /// A sink for this part of the spec.
    pub fn new(spec: EcdsFileSpec) -> EcdsFile {
        EcdsFile {
            spec,
            http: reqwest::Client::new(),
        }
    }

    fn state_path(&self) -> PathBuf {
        sibling(&self.spec.path, ".state.json")
    }

    fn abort_path(&self) -> PathBuf {
        sibling(&self.spec.path, ".abort")
    }

    fn lock_path(&self) -> PathBuf {
        sibling(&self.spec.path, ".lock")
    }

    /// Reads one ECDS statistic (counter or text read-out) from one admin endpoint.
    async fn ecds_stats(&self, admin: &str) -> Result<(Option<String>, u64), String> {
        let prefix = format!(
            "extension_config_discovery.http_filter.{}.",
            self.spec.filter_name
        );
        let url = format!(
            "{}/stats?format=json&filter=^{}",
            admin,
            prefix.replace('.', "\\.")
        );
        let body: Value = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|e| format!("{}: {}", admin, e))?
            .json()
            .await
            .map_err(|e| format!("{}: {}", admin, e))?;
        let mut version = None;
        let mut failures = 0;
        for stat in body["stats"].as_array().into_iter().flatten() {
            let name = stat["name"].as_str().unwrap_or_default();
            match name.strip_prefix(&prefix) {
                Some("version_text") => version = stat["value"].as_str().map(str::to_string),
                Some("config_fail") | Some("update_rejected") => {
                    failures += stat["value"].as_u64().unwrap_or(0)
                }
                _ => {}
            }
        }
        Ok((version, failures))
    }
}

/// `<file><suffix>`, e.g. `policy.ecds.yaml.state.json`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, flushed,
/// then renamed over the target (Envoy reacts to the move, never to a half-written file).
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SinkError> {
    let io = |e: std::io::Error| SinkError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let tmp = sibling(path, ".tmp");
    {
        use std::io::Write;
        let mut file = File::create(&tmp).map_err(io)?;
        file.write_all(bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// The version Envoy reports for a record: policy name, revision and generation.
pub fn version_of(record: &Record) -> String {
    // The revision keeps a new release's first write distinct from any earlier version.
    let revision = record
        .rollout
        .revision
        .get(..8)
        .unwrap_or(&record.rollout.revision);
    format!(
        "{}-{}-{}",
        record.rollout.policy, revision, record.generation
    )
}

impl ConfigSink for EcdsFile {
    type Claim = File;

    async fn claim(&self) -> Result<File, SinkError> {
        let path = self.lock_path();
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| SinkError::Io {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(_) => Err(SinkError::Busy(format!("{} is locked", path.display()))),
        }
    }

    async fn load(&self) -> Result<Option<Record>, SinkError> {
        let path = self.state_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(SinkError::Io {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SinkError::BadRecord {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
    }

    async fn apply(&self, policy: &Value, record: &Record) -> Result<(), SinkError> {
        let version = version_of(record);
        let mut failures_before = Vec::with_capacity(self.spec.admin.len());
        for admin in &self.spec.admin {
            failures_before.push(self.ecds_stats(admin).await.map(|(_, f)| f).unwrap_or(0));
        }
        // Record first: if we die between the two writes, the restart re-applies it.
        self.save(record).await?;
        let rendered = self.render(policy, record)?;
        write_atomically(&self.spec.path, rendered.as_bytes())?;
        let deadline = Instant::now() + CONFIRM_TIMEOUT;
        let mut detail = String::from("no admin endpoint answered yet");
        loop {
            let mut confirmed = 0;
            for (admin, before) in self.spec.admin.iter().zip(&failures_before) {
                match self.ecds_stats(admin).await {
                    Ok((Some(v), _)) if v == version => confirmed += 1,
                    Ok((_, failures)) if failures > *before => {
                        return Err(SinkError::Refused {
                            version,
                            reason: format!("{} counted a rejected update (see its log)", admin),
                        })
                    }
                    Ok((seen, _)) => detail = format!("{} reports version {:?}", admin, seen),
                    Err(e) => detail = e,
                }
            }
            if confirmed == self.spec.admin.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(SinkError::NotConfirmed {
                    version,
                    seconds: CONFIRM_TIMEOUT.as_secs(),
                    detail,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every admin endpoint reports the record's version (a restarted Envoy reads the
    /// file again; one that came back with another file does not).
    async fn is_live(&self, record: &Record) -> Result<bool, SinkError> {
        let version = version_of(record);
        for admin in &self.spec.admin {
            match self.ecds_stats(admin).await {
                Ok((Some(v), _)) if v == version => {}
                Ok(_) => return Ok(false),
                Err(detail) => return Err(SinkError::Unverifiable { version, detail }),
            }
        }
        Ok(true)
    }

    async fn save(&self, record: &Record) -> Result<(), SinkError> {
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| SinkError::Io {
            path: self.state_path().display().to_string(),
            reason: e.to_string(),
        })?;
        write_atomically(&self.state_path(), &bytes)
    }

    async fn set_abort_mark(&self, on: bool) -> Result<(), SinkError> {
        let path = self.abort_path();
        let result = if on {
            write_atomically(&path, b"aborted by an operator\n")
        } else {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(SinkError::Io {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }),
                _ => Ok(()),
            }
        };
        result
    }

    async fn abort_marked(&self) -> Result<bool, SinkError> {
        Ok(self.abort_path().exists())
    }

    fn render(&self, policy: &Value, record: &Record) -> Result<String, SinkError> {
        let document = ecds_document(
            &self.spec.filter_name,
            &self.spec.wasm,
            policy,
            self.spec.failure_policy,
            &version_of(record),
        );
        // JSON is valid YAML, so the file may be named .yaml or .json.
        serde_json::to_string_pretty(&document).map_err(|e| SinkError::Io {
            path: self.spec.path.display().to_string(),
            reason: e.to_string(),
        })
    }

    fn describe(&self) -> String {
        format!(
            "ECDS file {} (confirmed via {})",
            self.spec.path.display(),
            self.spec.admin.join(", ")
        )
    }
}
