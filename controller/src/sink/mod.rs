//! Config sinks: where the controller writes the policy (and, with it, the rollout's
//! record, so that a restarted controller resumes at the same step).

use std::future::Future;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::verdict;

pub mod ecds_file;

/// Names one rollout; a record of another rollout is never resumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutId {
    /// The policy's `name`.
    pub policy: String,
    /// The split rule driven.
    pub split_rule: String,
    /// The variant under test.
    pub canary: String,
}

/// What the controller persists next to the policy it writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The rollout this record belongs to.
    pub rollout: RolloutId,
    /// Canary weight, in percent, of the last policy written.
    pub applied_weight: u32,
    /// Increases with every policy written; the sink's version of it.
    pub generation: u64,
    /// The verdict engine's state.
    pub state: verdict::State,
    /// Wall-clock time of the last write, in milliseconds since the Unix epoch.
    pub updated_unix_ms: u64,
}

/// Why a sink could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Reading or writing a file failed.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// Another controller drives this rollout.
    #[error("another controller is driving this rollout ({0}); refusing to write")]
    Busy(String),
    /// The proxies refused the new policy.
    #[error("the proxies refused version {version}: {reason}")]
    Refused {
        /// Version written.
        version: String,
        /// What the proxies said.
        reason: String,
    },
    /// The proxies did not confirm the new policy in time.
    #[error("version {version} not confirmed within {seconds} s: {detail}")]
    NotConfirmed {
        /// Version written.
        version: String,
        /// How long the sink waited.
        seconds: u64,
        /// The last thing it saw.
        detail: String,
    },
    /// The saved record cannot be read.
    #[error("the saved rollout record {path} is unreadable: {reason}")]
    BadRecord {
        /// The record's location.
        path: String,
        /// Why.
        reason: String,
    },
}

/// A place the controller writes the policy to.
pub trait ConfigSink {
    /// Proof that this process is the rollout's only writer; released on drop (and by
    /// the operating system if the process dies).
    type Claim: Send;

    /// Becomes the rollout's only writer, or fails with [`SinkError::Busy`].
    fn claim(&self) -> Result<Self::Claim, SinkError>;

    /// The record saved with the last write, if any.
    fn load(&self) -> impl Future<Output = Result<Option<Record>, SinkError>> + Send;

    /// Writes `policy` with `record` and returns once the proxies confirmed it.
    fn apply(
        &self,
        policy: &Value,
        record: &Record,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Saves the record alone (the policy is unchanged).
    fn save(&self, record: &Record) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Marks (or clears) an operator's abort. Kept apart from the record, which the
    /// running controller rewrites every tick, so the mark cannot be overwritten.
    fn set_abort_mark(&self, on: bool) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Whether an operator asked to abort.
    fn abort_marked(&self) -> impl Future<Output = Result<bool, SinkError>> + Send;

    /// Exactly what [`ConfigSink::apply`] would write for `policy`.
    fn render(&self, policy: &Value, record: &Record) -> Result<String, SinkError>;

    /// One line naming the sink, for logs.
    fn describe(&self) -> String;
}
