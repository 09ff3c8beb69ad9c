//! The controller-wide leadership of `meshcanary serve --kubernetes`: one
//! `coordination.k8s.io/v1` Lease (default `meshcanary-controller` in the controller's
//! namespace). A replica drives Rollouts only while it holds it; a standby replica waits
//! and takes over when the leader's Lease is released or expires. The Lease machinery
//! (create, take over with a `resourceVersion` precondition, renew, release) is the one
//! the single-spec Kubernetes sink uses ([`crate::sink::kubernetes::claim_lease`]).

use std::sync::Arc;
use std::time::Duration;

use kube::Client;

use crate::sink::kubernetes::{claim_lease, LeaseClaim, Options};
use crate::sink::SinkError;

/// The default Lease name.
pub const LEASE_NAME: &str = "meshcanary-controller";

/// A shared view of the leadership: every write of every Rollout checks it.
#[derive(Clone)]
pub struct Leader(Arc<LeaseClaim>);

impl Leader {
    /// Why leadership is lost; `None` while held.
    pub fn lost(&self) -> Option<String> {
        self.0.lost()
    }

    /// The identity the Lease is held as.
    pub fn identity(&self) -> String {
        self.0.identity().to_string()
    }
}

/// Waits until this process holds the Lease `namespace/name`, trying again every
/// `options.renew_every` while another replica holds it. Fails only on an error other
/// than "held by another" (RBAC, an unreachable API server) five times in a row.
pub async fn acquire(
    client: Client,
    namespace: &str,
    name: &str,
    options: &Options,
) -> Result<Leader, SinkError> {
    let mut failures = 0u32;
    let mut told = false;
    loop {
        match claim_lease(client.clone(), namespace, name, options).await {
            Ok(claim) => return Ok(Leader(Arc::new(claim))),
            Err(SinkError::Busy(why)) => {
                if !told {
                    tracing::info!("standing by: {}", why);
                    told = true;
                }
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                tracing::warn!("cannot take Lease {}/{}: {}", namespace, name, e);
                if failures >= 5 {
                    return Err(e);
                }
            }
        }
        tokio::time::sleep(options.renew_every.max(Duration::from_millis(50))).await;
    }
}
