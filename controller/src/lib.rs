//! meshcanary's controller: reads per-variant metrics, reaches a verdict (promote a step,
//! hold, roll back) and writes the new policy where the proxies pick it up.
//!
//! The verdict is a pure function of (spec, state, observation) in [`verdict`]; metric
//! sources ([`source`]) and config sinks ([`sink`]) sit behind small traits, and
//! [`rollout`] ties them together one tick at a time; [`fleet`] runs many rollouts at
//! once, each in its own task.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod fleet;
pub mod kubernetes;
pub mod output;
pub mod render;
pub mod rollout;
pub mod sink;
pub mod source;
pub mod spec;
pub mod verdict;
