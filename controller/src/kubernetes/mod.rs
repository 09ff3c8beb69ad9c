//! How Kubernetes is spoken to for `Rollout` resources: the CRD ([`crd`]), the status
//! the controller writes ([`status`]).
//!
//! The one-rollout driver ([`crate::rollout`]) knows none of this; the EnvoyFilter
//! itself is written by [`crate::sink::kubernetes`].

pub mod crd;
pub mod status;
