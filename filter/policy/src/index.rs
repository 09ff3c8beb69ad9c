//! Which rules a request can match, found without trying every rule in turn.
//!
//! A long policy tests a few parts of the request many times over: a tenant header, a
//! cookie, a query parameter, each against many values. Trying 100 such rules one by one
//! cost 3.6 times the bench policy per request (`make bench-costs`). The index, built once
//! per configuration, instead reads each distinct part once per decision and rules out,
//! 256 rules at a time (one fixed-size set of four 64-bit words), every rule that value
//! cannot satisfy:
//! - an absent part rules out every rule with a condition needing it present (`equals`,
//!   `prefix`, `in`, `present: true`);
//! - a present part rules out every rule with `present: false` on it, and every rule with
//!   an `equals` or `in` condition on it that does not list the value (one binary search
//!   over all such values of that part).
//!
//! The rules left are tried in order, every condition checked on the values already
//! read, so the first that holds is the first the ordered scan would find; blocks of 256
//! rules are narrowed in order, and the first block with a match ends the search
//! (`tests/rule_index.rs` and the `policy_json` fuzz target compare the two). A policy
//! of a few rules skips the narrowing: trying them in order on the values read is
//! cheaper than combining the rule sets.

use std::borrow::Cow;

use crate::decide::{cookie_value, query_value, RequestInputs};
use crate::policy::{Rule, Subject, Test};

/// 256 rules, one bit each (bit `r % 64` of word `r / 64`): the rules of one block.
/// A fixed size, so that combining two sets is four word operations without a bounds
/// check, which in the size-optimized module a slice of words did not give.
type RuleSet = [u64; 4];

/// Rules per [`RuleSet`].
const BLOCK: usize = 256;

const NO_RULES: RuleSet = [0; 4];

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
    /// For each block of 256 rules, for each part, three rule sets: the rules it rules
    /// out when absent, those it rules out when present (`present: false`), and those
    /// with an `equals` or `in` condition on it. Set `kind` of part `slot` in `block` is
    /// at `(block * subjects.len() + slot) * 3 + kind`.
    sets: Vec<RuleSet>,
    /// Every `equals` and `in` value with its part, sorted and without duplicates.
    listed: Vec<(usize, String)>,
    /// Where each part's values start in `listed`, and (last) its length: a lookup
    /// searches only that part's values, and compares only the values.
    listed_starts: Vec<usize>,
    /// For each block, for each entry of `listed`, the rules that list it (at
    /// `block * listed.len() + entry`).
    listings: Vec<RuleSet>,
    /// For each block, the rules it holds (the last block's spare bits clear).
    blocks: Vec<RuleSet>,
    /// When the rules test at most [`PRESENCE_TABLE_UP_TO`] parts: for each block and
    /// each combination of present parts (bit `slot` set for a present part), the rules
    /// of the block that combination leaves, every presence test applied ahead of time
    /// (at `block << subjects.len() | presence`). Empty when more parts are tested.
    by_presence: Vec<RuleSet>,
    /// The parts with an `equals` or `in` condition on them, in order.
    valued: Vec<usize>,
}

/// Most parts for which [`RuleIndex::by_presence`] is built: 2⁸ sets of 32 bytes per
/// block of rules.
const PRESENCE_TABLE_UP_TO: usize = 8;

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

/// Adds rule `rule` (of the whole policy) to the set at `at`, if there is one.
fn insert(sets: &mut [RuleSet], at: usize, rule: usize) {
    let in_block = rule % BLOCK;
    if let Some(word) = sets.get_mut(at).and_then(|set| set.get_mut(in_block / 64)) {
        *word |= 1 << (in_block % 64);
    }
}

impl RuleIndex {
    /// Indexes `rules` (the policy's, in order).
    pub fn new(rules: &[Rule]) -> RuleIndex {
        let mut index = RuleIndex::default();
        for rule in rules {
            index.starts.push(index.slots.len());
            for condition in &rule.when {
                let slot = match index.subjects.iter().position(|s| *s == condition.subject) {
                    Some(slot) => slot,
                    None => {
                        index.subjects.push(condition.subject.clone());
                        index.subjects.len() - 1
                    }
                };
                index.slots.push(slot);
                for value in listed_values(&condition.test) {
                    let entry = (slot, value.clone());
                    if let Err(at) = index.listed.binary_search(&entry) {
                        index.listed.insert(at, entry);
                    }
                }
            }
        }
        index.listed_starts = (0..=index.subjects.len())
            .map(|slot| index.listed.partition_point(|(s, _)| *s < slot))
            .collect();
        let blocks = (rules.len() + BLOCK - 1) / BLOCK;
        let parts = index.subjects.len();
        index.sets = vec![NO_RULES; blocks * parts * 3];
        index.listings = vec![NO_RULES; blocks * index.listed.len()];
        index.blocks = vec![NO_RULES; blocks];
        for (rule_index, rule) in rules.iter().enumerate() {
            let block = rule_index / BLOCK;
            insert(&mut index.blocks, block, rule_index);
            let slots = index
                .starts
                .get(rule_index)
                .and_then(|start| index.slots.get(*start..))
                .unwrap_or_default();
            for (condition, slot) in rule.when.iter().zip(slots) {
                let set = (block * parts + slot) * 3;
                let kind = match condition.test {
                    Test::Present(false) => IF_PRESENT,
                    _ => IF_ABSENT,
                };
                insert(&mut index.sets, set + kind, rule_index);
                for value in listed_values(&condition.test) {
                    insert(&mut index.sets, set + VALUED, rule_index);
                    if let Some(at) = index.listing(*slot, value.as_bytes()) {
                        let entry = block * index.listed.len() + at;
                        insert(&mut index.listings, entry, rule_index);
                    }
                }
            }
        }
        index.valued = (0..parts)
            .filter(|slot| index.listed_starts.get(*slot) < index.listed_starts.get(slot + 1))
            .collect();
        if parts <= PRESENCE_TABLE_UP_TO {
            index.by_presence = (0..blocks << parts)
                .map(|at| {
                    let (block, presence) = (at >> parts, at & ((1 << parts) - 1));
                    index.left_by_presence(block, |slot| presence & 1 << slot != 0)
                })
                .collect();
        }
        index
    }

    /// Where `value` of part `slot` is in `listed`.
    fn listing(&self, slot: usize, value: &[u8]) -> Option<usize> {
        let start = *self.listed_starts.get(slot)?;
        let end = *self.listed_starts.get(slot + 1)?;
        let found = self
            .listed
            .get(start..end)?
            .binary_search_by(|(_, v)| v.as_bytes().cmp(value))
            .ok()?;
        Some(start + found)
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
            // Bit `slot` set for each present part: the presence table's index.
            let mut presence = 0;
            for (slot, (value, subject)) in values.iter_mut().zip(&self.subjects).enumerate() {
                *value = subject_value(subject, request);
                presence |= usize::from(value.is_some()) << slot;
            }
            return self.first_match_among(rules, values, presence);
        }
        let values: Vec<Option<Cow<[u8]>>> = self
            .subjects
            .iter()
            .map(|subject| subject_value(subject, request))
            .collect();
        self.first_match_among(rules, &values, 0)
    }

    /// [`first_match`](Self::first_match), given the value of each part and, for at
    /// most eight parts, their presence (bit `slot` set for a present part).
    fn first_match_among<'p>(
        &self,
        rules: &'p [Rule],
        values: &[Option<Cow<[u8]>>],
        presence: usize,
    ) -> Option<(usize, &'p Rule)> {
        // A short policy is cheaper to try rule by rule than to narrow down: the rule
        // sets cost a few hundred instructions a decision (`make bench-costs`).
        if rules.len() <= TRY_IN_ORDER_UP_TO {
            return rules
                .iter()
                .enumerate()
                .find(|(rule, found)| self.holds(*rule, found, values));
        }
        // Block by block: the first block holding a match holds the first match.
        let parts = self.subjects.len();
        let present = |slot: usize| matches!(values.get(slot), Some(Some(_)));
        for block in 0..self.blocks.len() {
            let tabled = match self.by_presence.is_empty() {
                true => None,
                false => self.by_presence.get(block << parts | presence),
            };
            let mut candidates = match tabled {
                Some(left) => *left,
                None => self.left_by_presence(block, present),
            };
            for slot in &self.valued {
                let value = match values.get(*slot) {
                    Some(Some(value)) => value,
                    _ => continue,
                };
                let set = (block * parts + slot) * 3 + VALUED;
                let valued = self.sets.get(set).unwrap_or(&NO_RULES);
                if is_empty(valued) {
                    continue;
                }
                let listed = self
                    .listing(*slot, value)
                    .and_then(|at| self.listings.get(block * self.listed.len() + at))
                    .unwrap_or(&NO_RULES);
                keep_listed(&mut candidates, valued, listed);
            }
            for (word, bits) in candidates.iter().enumerate() {
                let mut bits = *bits;
                while bits != 0 {
                    let rule = block * BLOCK + word * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    if let Some(found) = rules.get(rule) {
                        if self.holds(rule, found, values) {
                            return Some((rule, found));
                        }
                    }
                }
            }
        }
        None
    }
}

impl RuleIndex {
    /// The rules of `block` left once the rules needing an absent part, and those
    /// needing a `present` part absent, are removed.
    fn left_by_presence(&self, block: usize, present: impl Fn(usize) -> bool) -> RuleSet {
        let parts = self.subjects.len();
        let mut left = self.blocks.get(block).copied().unwrap_or(NO_RULES);
        for slot in 0..parts {
            let kind = if present(slot) { IF_PRESENT } else { IF_ABSENT };
            if let Some(excluded) = self.sets.get((block * parts + slot) * 3 + kind) {
                remove(&mut left, excluded);
            }
        }
        left
    }

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

// The set operations spell out their four words: at `opt-level = "z"` a loop over
// zipped words stays a chain of calls, and `==` on arrays a call to `memcmp`.

/// Removes `excluded` from `candidates`.
fn remove(candidates: &mut RuleSet, excluded: &RuleSet) {
    candidates[0] &= !excluded[0];
    candidates[1] &= !excluded[1];
    candidates[2] &= !excluded[2];
    candidates[3] &= !excluded[3];
}

/// Removes from `candidates` the rules of `valued` that are not in `listed`: the rules
/// testing a part's value whose list does not hold the request's value.
fn keep_listed(candidates: &mut RuleSet, valued: &RuleSet, listed: &RuleSet) {
    candidates[0] &= !valued[0] | listed[0];
    candidates[1] &= !valued[1] | listed[1];
    candidates[2] &= !valued[2] | listed[2];
    candidates[3] &= !valued[3] | listed[3];
}

fn is_empty(set: &RuleSet) -> bool {
    set[0] | set[1] | set[2] | set[3] == 0
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
