//! Which rules a request can match, found without trying every rule in turn.
//!
//! A long policy tests a few parts of the request many times over: a tenant header, a
//! cookie, a query parameter, each against many values. Trying 100 such rules one by one
//! cost 3.6 times the bench policy per request (`make bench-costs`). The index, built once
//! per configuration, instead reads each distinct part once per decision and rules out, a
//! 64-rule word at a time, every rule that value cannot satisfy:
//! - an absent part rules out every rule with a condition needing it present (`equals`,
//!   `prefix`, `in`, `present: true`);
//! - a present part rules out every rule with `present: false` on it, and every rule with
//!   an `equals` or `in` condition on it that does not list the value (one binary search
//!   over all such values of that part).
//!
//! The rules left are tried in order, every condition checked on the values already
//! read, so the first that holds is the first the ordered scan would find
//! (`tests/rule_index.rs` and the `policy_json` fuzz target compare the two). A policy
//! of a few rules skips the narrowing: trying them in order on the values read is
//! cheaper than combining the rule sets.

use std::borrow::Cow;

use crate::decide::{cookie_value, query_value, RequestInputs};
use crate::policy::{Rule, Subject, Test};

/// The rule index of one policy (see the module's documentation).
///
/// Everything is kept in flat vectors of a few element types: every distinct vector
/// type costs the module its own copy of the vector code, and the module has a size
/// budget (300 KB).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleIndex {
    /// The distinct request parts the rules' conditions test.
    subjects: Vec<Subject>,
    /// Each condition's part (its index in `subjects`), rule after rule.
    slots: Vec<usize>,
    /// Where each rule's conditions start in `slots`.
    starts: Vec<usize>,
    /// Three rule sets per part, `words` words each (bit `r % 64` of word `r / 64` is rule
    /// `r`): the rules it rules out when absent, those it rules out when present
    /// (`present: false`), and those with an `equals` or `in` condition on it.
    sets: Vec<u64>,
    /// Every `equals` and `in` value with its part, sorted and without duplicates.
    listed: Vec<(usize, String)>,
    /// For each entry of `listed`, `words` words: the rules that list it.
    listings: Vec<u64>,
    /// Words per rule set.
    words: usize,
}

/// Policies with at most this many rules are tried rule by rule, on the part values read
/// once; longer ones are narrowed down by the rule sets first.
const TRY_IN_ORDER_UP_TO: usize = 8;

/// Which of a part's three rule sets.
const IF_ABSENT: usize = 0;
const IF_PRESENT: usize = 1;
const VALUED: usize = 2;

/// The values an `equals` or `in` test accepts (none for the other tests).
fn listed_values(test: &Test) -> &[String] {
    match test {
        Test::Equals(value) => std::slice::from_ref(value),
        Test::In(values) => values,
        Test::Prefix(_) | Test::Present(_) => &[],
    }
}

fn insert(set: &mut [u64], rule: usize) {
    if let Some(word) = set.get_mut(rule / 64) {
        *word |= 1 << (rule % 64);
    }
}

impl RuleIndex {
    /// Indexes `rules` (the policy's, in order).
    pub fn new(rules: &[Rule]) -> RuleIndex {
        let words = (rules.len() + 63) / 64;
        let mut index = RuleIndex {
            words,
            ..RuleIndex::default()
        };
        for (rule_index, rule) in rules.iter().enumerate() {
            index.starts.push(index.slots.len());
            for condition in &rule.when {
                let slot = index.slot(&condition.subject);
                index.slots.push(slot);
                let kind = match condition.test {
                    Test::Present(false) => IF_PRESENT,
                    _ => IF_ABSENT,
                };
                insert(index.set_mut(slot, kind), rule_index);
                for value in listed_values(&condition.test) {
                    insert(index.set_mut(slot, VALUED), rule_index);
                    let entry = (slot, value.clone());
                    if let Err(at) = index.listed.binary_search(&entry) {
                        index.listed.insert(at, entry);
                    }
                }
            }
        }
        index.listings = vec![0; index.listed.len() * words];
        for (rule_index, rule) in rules.iter().enumerate() {
            for condition in &rule.when {
                let slot = index.subjects.iter().position(|s| *s == condition.subject);
                for value in listed_values(&condition.test) {
                    if let Some(at) = slot.and_then(|slot| index.listing(slot, value.as_bytes())) {
                        insert(
                            &mut index.listings[at * words..(at + 1) * words],
                            rule_index,
                        );
                    }
                }
            }
        }
        index
    }

    /// The index of `subject` in `subjects`, added (with three empty rule sets) if new.
    fn slot(&mut self, subject: &Subject) -> usize {
        if let Some(slot) = self.subjects.iter().position(|s| s == subject) {
            return slot;
        }
        self.subjects.push(subject.clone());
        self.sets.resize(self.sets.len() + 3 * self.words, 0);
        self.subjects.len() - 1
    }

    fn set(&self, slot: usize, kind: usize) -> &[u64] {
        let start = (slot * 3 + kind) * self.words;
        self.sets.get(start..start + self.words).unwrap_or_default()
    }

    fn set_mut(&mut self, slot: usize, kind: usize) -> &mut [u64] {
        let start = (slot * 3 + kind) * self.words;
        self.sets
            .get_mut(start..start + self.words)
            .unwrap_or_default()
    }

    /// Where `value` of part `slot` is in `listed`.
    fn listing(&self, slot: usize, value: &[u8]) -> Option<usize> {
        self.listed
            .binary_search_by(|(s, v)| s.cmp(&slot).then_with(|| v.as_bytes().cmp(value)))
            .ok()
    }

    /// The first of `rules` (those the index was built from) whose conditions all hold
    /// for `request`, with its index.
    pub fn first_match<'p, R: RequestInputs + ?Sized>(
        &self,
        rules: &'p [Rule],
        request: &R,
    ) -> Option<(usize, &'p Rule)> {
        // Up to eight parts' values on the stack, like the rule sets below: a heap
        // allocation per decision is a cost every request would pay.
        let mut on_stack: [Option<Cow<[u8]>>; 8] = Default::default();
        if let Some(values) = on_stack.get_mut(..self.subjects.len()) {
            for (value, subject) in values.iter_mut().zip(&self.subjects) {
                *value = subject_value(subject, request);
            }
            return self.first_match_among(rules, values);
        }
        let values: Vec<Option<Cow<[u8]>>> = self
            .subjects
            .iter()
            .map(|subject| subject_value(subject, request))
            .collect();
        self.first_match_among(rules, &values)
    }

    /// [`first_match`](Self::first_match), given the value of each part.
    fn first_match_among<'p>(
        &self,
        rules: &'p [Rule],
        values: &[Option<Cow<[u8]>>],
    ) -> Option<(usize, &'p Rule)> {
        // A short policy is cheaper to try rule by rule than to narrow down: the rule
        // sets cost a few hundred instructions a decision (`make bench-costs`).
        if rules.len() <= TRY_IN_ORDER_UP_TO {
            return rules
                .iter()
                .enumerate()
                .find(|(rule, found)| self.holds(*rule, found, values));
        }
        // Up to 256 rules on the stack: a heap allocation per decision is a cost every
        // request would pay.
        let mut on_stack = [!0u64; 4];
        let mut on_heap = Vec::new();
        let candidates: &mut [u64] = if self.words <= on_stack.len() {
            &mut on_stack[..self.words]
        } else {
            on_heap.resize(self.words, !0);
            &mut on_heap
        };
        for (slot, value) in values.iter().enumerate() {
            let value = match value {
                None => {
                    remove(candidates, self.set(slot, IF_ABSENT));
                    continue;
                }
                Some(value) => value,
            };
            remove(candidates, self.set(slot, IF_PRESENT));
            let valued = self.set(slot, VALUED);
            if valued.iter().all(|word| *word == 0) {
                continue;
            }
            let listing = self
                .listing(slot, value)
                .and_then(|at| self.listings.get(at * self.words..(at + 1) * self.words));
            for (word, candidate) in candidates.iter_mut().enumerate() {
                let listed = listing.and_then(|set| set.get(word)).copied().unwrap_or(0);
                *candidate &= !valued.get(word).copied().unwrap_or(0) | listed;
            }
        }
        for (word, bits) in candidates.iter().enumerate() {
            let mut bits = *bits;
            while bits != 0 {
                let rule = word * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                // None past the last rule: the last word's spare bits.
                let found = rules.get(rule)?;
                let holds = self.holds(rule, found, values);
                if holds {
                    return Some((rule, found));
                }
            }
        }
        None
    }
}

impl RuleIndex {
    /// Whether every condition of `rule` (number `index`) holds for these part values.
    fn holds(&self, index: usize, rule: &Rule, values: &[Option<Cow<[u8]>>]) -> bool {
        let start = self.starts.get(index).copied().unwrap_or(usize::MAX);
        let slots = self.slots.get(start..).unwrap_or_default();
        rule.when.len() <= slots.len()
            && rule.when.iter().zip(slots).all(|(condition, slot)| {
                condition
                    .test
                    .check(values.get(*slot).and_then(|v| v.as_deref()))
            })
    }
}

/// Removes `excluded` from `candidates` (an empty `excluded` removes nothing).
fn remove(candidates: &mut [u64], excluded: &[u64]) {
    for (candidate, excluded) in candidates.iter_mut().zip(excluded) {
        *candidate &= !excluded;
    }
}

/// The value of one request part: a header's, a cookie's, a decoded query parameter's.
pub(crate) fn subject_value<'r, R: RequestInputs + ?Sized>(
    subject: &Subject,
    request: &'r R,
) -> Option<Cow<'r, [u8]>> {
    match subject {
        Subject::Header(input) => request.input(*input).map(Cow::Borrowed),
        Subject::Cookie { name, input } => request
            .input(*input)
            .and_then(|header| cookie_value(header, name.as_bytes()))
            .map(Cow::Borrowed),
        Subject::Query { name, input } => request
            .input(*input)
            .and_then(|path| query_value(path, name.as_bytes()))
            .map(Cow::Owned),
    }
}
