//! A stand-in metric source for driver tests that need no proxy (`operator.rs`,
//! `kubernetes_rollouts_contract.rs`): steady traffic, healthy or broken.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use meshcanary_controller::source::{MetricSource, Query, Snapshot, SourceError, VariantCounts};

/// 1,000 more requests per variant at every read, none slow; the canary (the query's
/// first variant) fails half of them when `broken`.
pub struct SteadyCounters {
    broken: bool,
    reads: AtomicU64,
}

impl SteadyCounters {
    /// Counters starting from zero.
    pub fn new(broken: bool) -> SteadyCounters {
        SteadyCounters {
            broken,
            reads: AtomicU64::new(0),
        }
    }
}

impl MetricSource for SteadyCounters {
    async fn read(&self, query: &Query) -> Result<Snapshot, SourceError> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        let mut variants = BTreeMap::new();
        for variant in &query.variants {
            let canary = *variant == query.variants[0];
            let responses = 1000 * n;
            let errors = if canary && self.broken {
                responses / 2
            } else {
                0
            };
            variants.insert(
                variant.clone(),
                VariantCounts {
                    responses,
                    errors,
                    latency_samples: responses,
                    slow: 0,
                },
            );
        }
        Ok(Snapshot { variants })
    }

    fn describe(&self) -> String {
        "in-process counters".into()
    }
}
