//! meshcanary's controller: reads per-variant metrics, reaches a verdict (promote a step,
//! hold, roll back) and writes the new policy where the proxies pick it up.
//!
//! The verdict is a pure function of (spec, state, observation) in [`verdict`]; metric
//! sources ([`source`]) and config sinks ([`sink`]) sit behind small traits. Three places
//! for three questions: what happens to one rollout is [`rollout`] (one tick at a time);
//! how many rollouts are run is [`fleet`] (each in its own task); how Kubernetes is
//! spoken to for `Rollout` resources is [`kubernetes`]. The spec ([`spec`]) is one set of
//! types for spec files and the `Rollout` CRD. [`report`] turns a run's event stream into
//! an HTML page. A rollout's webhooks ([`hooks`]: gates and calls around the verdict's
//! decision) and the relay of its events to `event` hooks and notification targets
//! ([`notify`]) run in its own task too.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod control;
pub mod fleet;
pub mod gateway;
pub mod hooks;
pub mod kubernetes;
pub mod notify;
pub mod output;
pub mod render;
pub mod report;
pub mod rollout;
pub mod sink;
pub mod source;
pub mod spec;
pub mod verdict;
