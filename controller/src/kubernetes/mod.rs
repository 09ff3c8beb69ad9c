//! How Kubernetes is spoken to for `Rollout` resources: the CRD ([`crd`]), the status the
//! controller writes ([`status`]), the sink that drives one Rollout ([`rollout_sink`]),
//! the controller-wide leadership ([`lease`]) and the watch of every Rollout that feeds
//! the scheduler ([`watch`]).
//!
//! The one-rollout driver ([`crate::rollout`]) and the scheduler of many
//! ([`crate::fleet`]) know none of this; the EnvoyFilter's shape is
//! [`crate::sink::kubernetes`]'s.

pub mod crd;
pub mod lease;
pub mod rollout_sink;
pub mod status;
pub mod watch;
