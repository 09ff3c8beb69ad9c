//! meshcanary's policy core: the policy document, its validation, the per-request
//! routing decision and sticky bucketing.
//!
//! This crate knows nothing of proxy-wasm or Envoy: the filter feeds it request values
//! and the controller reuses it to render and check policies, so both agree by
//! construction. It builds natively and for wasm32.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod bucket;
pub mod bytes;
pub mod decide;
pub mod envoy;
pub mod error;
pub mod headers;
pub mod index;
pub mod mirror;
pub mod policy;
pub mod walk;

pub use bucket::HashKind;
pub use decide::{Decision, Placement, RequestInputs};
pub use error::{ConfigError, ConfigErrors};
pub use mirror::{Compare, Marker, Mirror, MirrorChoice, SkipReason};
pub use policy::{Action, Condition, MissingKey, Policy, Rule, Split, SplitKey, Subject, Test};
pub use walk::Walker;
