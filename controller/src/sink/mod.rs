//! Config sinks: where the controller writes the policy (and, with it, the rollout's
//! record, so that a restarted controller resumes at the same step).

use std::future::Future;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::control::{Control, MarkKind, Marks};
use crate::verdict;

pub mod ecds_file;
pub mod kubernetes;

pub use crate::spec::RolloutId;

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
    /// The operator's commands as acknowledged (pause, resume, promote) and a dry run's
    /// rollbacks not applied; left out while empty.
    #[serde(default, skip_serializing_if = "Control::is_empty")]
    pub control: Control,
    /// What the webhooks said so far (gates passed, failures in a row), so that a restart
    /// neither forgets a failing hook nor asks a passed gate again. Left out while empty.
    #[serde(default, skip_serializing_if = "crate::hooks::HookState::is_empty")]
    pub hooks: crate::hooks::HookState,
}

impl Record {
    /// The record of a rollout that has written nothing yet, starting at `now` (wall-clock
    /// time since the Unix epoch, the engine's clock).
    pub fn new(rollout: RolloutId, now: std::time::Duration) -> Record {
        Record {
            rollout,
            applied_weight: 0,
            generation: 0,
            state: verdict::State::start(now),
            updated_unix_ms: u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
            control: Control::default(),
            hooks: crate::hooks::HookState::default(),
        }
    }
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
    /// Whether the proxies run a version could not be found out (asked after a restart).
    #[error("cannot tell whether the proxies run version {version}: {detail}")]
    Unverifiable {
        /// Version expected.
        version: String,
        /// What failed.
        detail: String,
    },
    /// The Kubernetes API server refused a request, or could not be reached in time.
    #[error("{request}: {reason}")]
    Api {
        /// The request, e.g. `PATCH envoyfilters.networking.istio.io shop/checkout`.
        request: String,
        /// What went wrong and what to do about it.
        reason: String,
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

    /// Becomes the rollout's only writer, or fails with [`SinkError::Busy`]. Async
    /// because a claim may need the network (the Kubernetes sink's Lease).
    fn claim(&self) -> impl Future<Output = Result<Self::Claim, SinkError>> + Send;

    /// The record saved with the last write, if any.
    fn load(&self) -> impl Future<Output = Result<Option<Record>, SinkError>> + Send;

    /// Writes `policy` with `record` and returns once the proxies confirmed it.
    fn apply(
        &self,
        policy: &Value,
        record: &Record,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Whether the proxies run the policy `record` was applied with, asked after a proxy
    /// restarted; `Ok(false)` makes the controller apply it again. A sink that cannot see
    /// the proxies one by one answers from what it wrote (the default: yes).
    fn is_live(&self, record: &Record) -> impl Future<Output = Result<bool, SinkError>> + Send {
        let _ = record;
        async { Ok(true) }
    }

    /// Saves the record alone (the policy is unchanged).
    fn save(&self, record: &Record) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Marks (or clears) an operator's abort. Kept apart from the record, which the
    /// running controller rewrites every tick, so the mark cannot be overwritten.
    fn set_abort_mark(&self, on: bool) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Whether an operator asked to abort.
    fn abort_marked(&self) -> impl Future<Output = Result<bool, SinkError>> + Send;

    /// Every operator mark (abort, pause, promote), read once per tick by the driver.
    /// The default knows the abort mark only (a sink without pause and promote).
    fn operator_marks(&self) -> impl Future<Output = Result<Marks, SinkError>> + Send {
        let abort = self.abort_marked();
        async move {
            Ok(Marks {
                abort: abort.await?,
                ..Marks::default()
            })
        }
    }

    /// Sets (`Some(text)`) or removes (`None`) a pause or promote mark; like the abort
    /// mark, kept apart from the record. The default refuses: the sink takes no
    /// commands.
    fn set_operator_mark(
        &self,
        kind: MarkKind,
        text: Option<&str>,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = text;
        let describe = self.describe();
        async move {
            Err(SinkError::Io {
                path: describe,
                reason: format!("this sink takes no {:?} mark", kind),
            })
        }
    }

    /// Exactly what [`ConfigSink::apply`] would write for `policy`.
    fn render(&self, policy: &Value, record: &Record) -> Result<String, SinkError>;

    /// One line naming the sink, for logs.
    fn describe(&self) -> String;
}

/// The sink a spec names: what the CLI drives.
pub enum AnySink {
    /// [`ecds_file::EcdsFile`].
    EcdsFile(ecds_file::EcdsFile),
    /// [`kubernetes::Kubernetes`] (boxed: it is much larger than the file sink).
    Kubernetes(Box<kubernetes::Kubernetes>),
}

/// The claim of an [`AnySink`].
pub enum AnyClaim {
    /// An OS file lock.
    File(std::fs::File),
    /// A Kubernetes Lease, renewed in the background.
    Lease(Box<kubernetes::LeaseClaim>),
}

impl AnySink {
    /// The sink for a validated spec (no I/O: the Kubernetes client is made on first use).
    pub fn new(spec: &crate::spec::RolloutSpec) -> AnySink {
        match &spec.sink {
            crate::spec::SinkSpec::EcdsFile(ecds) => {
                AnySink::EcdsFile(ecds_file::EcdsFile::new(ecds.clone()))
            }
            crate::spec::SinkSpec::Kubernetes(k) => AnySink::Kubernetes(Box::new(
                kubernetes::Kubernetes::new(k.clone(), spec.judge.steps.clone()),
            )),
        }
    }
}

impl ConfigSink for AnySink {
    type Claim = AnyClaim;

    async fn claim(&self) -> Result<AnyClaim, SinkError> {
        match self {
            AnySink::EcdsFile(s) => s.claim().await.map(AnyClaim::File),
            AnySink::Kubernetes(s) => s.claim().await.map(|c| AnyClaim::Lease(Box::new(c))),
        }
    }

    async fn load(&self) -> Result<Option<Record>, SinkError> {
        match self {
            AnySink::EcdsFile(s) => s.load().await,
            AnySink::Kubernetes(s) => s.load().await,
        }
    }

    async fn apply(&self, policy: &Value, record: &Record) -> Result<(), SinkError> {
        match self {
            AnySink::EcdsFile(s) => s.apply(policy, record).await,
            AnySink::Kubernetes(s) => s.apply(policy, record).await,
        }
    }

    async fn is_live(&self, record: &Record) -> Result<bool, SinkError> {
        match self {
            AnySink::EcdsFile(s) => s.is_live(record).await,
            AnySink::Kubernetes(s) => s.is_live(record).await,
        }
    }

    async fn save(&self, record: &Record) -> Result<(), SinkError> {
        match self {
            AnySink::EcdsFile(s) => s.save(record).await,
            AnySink::Kubernetes(s) => s.save(record).await,
        }
    }

    async fn set_abort_mark(&self, on: bool) -> Result<(), SinkError> {
        match self {
            AnySink::EcdsFile(s) => s.set_abort_mark(on).await,
            AnySink::Kubernetes(s) => s.set_abort_mark(on).await,
        }
    }

    async fn abort_marked(&self) -> Result<bool, SinkError> {
        match self {
            AnySink::EcdsFile(s) => s.abort_marked().await,
            AnySink::Kubernetes(s) => s.abort_marked().await,
        }
    }

    async fn operator_marks(&self) -> Result<Marks, SinkError> {
        match self {
            AnySink::EcdsFile(s) => s.operator_marks().await,
            AnySink::Kubernetes(s) => s.operator_marks().await,
        }
    }

    async fn set_operator_mark(&self, kind: MarkKind, text: Option<&str>) -> Result<(), SinkError> {
        match self {
            AnySink::EcdsFile(s) => s.set_operator_mark(kind, text).await,
            AnySink::Kubernetes(s) => s.set_operator_mark(kind, text).await,
        }
    }

    fn render(&self, policy: &Value, record: &Record) -> Result<String, SinkError> {
        match self {
            AnySink::EcdsFile(s) => s.render(policy, record),
            AnySink::Kubernetes(s) => s.render(policy, record),
        }
    }

    fn describe(&self) -> String {
        match self {
            AnySink::EcdsFile(s) => s.describe(),
            AnySink::Kubernetes(s) => s.describe(),
        }
    }
}
