//! The per-request decision: which rule applies and which variant the request gets.
//!
//! Values are compared as bytes, so a header that is not valid UTF-8 cannot match a
//! string test and never needs decoding. Nothing here allocates on the common paths
//! except query-parameter decoding, which only happens for query conditions.

use crate::bucket::{flagd_hash, fnv_position, HashKind};
use crate::bytes::{find_either, split_at_byte};
use crate::index::subject_value;
use crate::policy::{Action, Condition, MissingKey, Policy, Split, SplitKey, Test};

/// The request as the policy sees it: the values of [`Policy::inputs`], by index.
pub trait RequestInputs {
    /// Value of input `index` (a lower-case header name from [`Policy::inputs`]), if present.
    fn input(&self, index: usize) -> Option<&[u8]>;
}

impl<T: AsRef<[u8]>> RequestInputs for [Option<T>] {
    fn input(&self, index: usize) -> Option<&[u8]> {
        self.get(index).and_then(|v| v.as_ref().map(AsRef::as_ref))
    }
}

impl<T: AsRef<[u8]>> RequestInputs for Vec<Option<T>> {
    fn input(&self, index: usize) -> Option<&[u8]> {
        self.as_slice().input(index)
    }
}

/// What the policy decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Index into [`Policy::variants`].
    pub variant: usize,
    /// Index of the rule that decided, or `None` when the fallback applied.
    pub rule: Option<usize>,
    /// How a split rule placed the request, when one decided.
    pub placement: Option<Placement>,
}

/// How a split placed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// By the request's key: the same key always lands in the same variant.
    Sticky,
    /// By a random draw, as the split asks (`by: "random"`).
    Random,
    /// By a random draw because the key was missing (`missing: "random"`).
    KeyMissingRandom,
    /// To the fallback variant because the key was missing (`missing: "fallback"`).
    KeyMissingFallback,
}

impl Placement {
    /// True when the split wanted a key and the request had none.
    pub fn key_missing(self) -> bool {
        matches!(
            self,
            Placement::KeyMissingRandom | Placement::KeyMissingFallback
        )
    }
}

impl Policy {
    /// Decides where a request goes. `random` is called at most once, only when a
    /// random draw is needed, and must return a uniformly distributed `u64`.
    pub fn decide<R, F>(&self, request: &R, random: F) -> Decision
    where
        R: RequestInputs + ?Sized,
        F: FnOnce() -> u64,
    {
        let (index, rule) = match self.index.first_match(&self.rules, request) {
            Some(found) => found,
            None => {
                return Decision {
                    variant: 0,
                    rule: None,
                    placement: None,
                }
            }
        };
        match &rule.action {
            Action::Variant(variant) => Decision {
                variant: *variant,
                rule: Some(index),
                placement: None,
            },
            Action::Split(split) => {
                let (variant, placement) = split.place(request, random);
                Decision {
                    variant,
                    rule: Some(index),
                    placement: Some(placement),
                }
            }
        }
    }
}

impl Split {
    /// The sticky key of this request, if the split has one and the request carries it.
    pub fn key<'r, R: RequestInputs + ?Sized>(&self, request: &'r R) -> Option<&'r [u8]> {
        match &self.by {
            SplitKey::Header(input) => request.input(*input).filter(|v| !v.is_empty()),
            SplitKey::Cookie { name, input } => request
                .input(*input)
                .and_then(|header| cookie_value(header, name.as_bytes()))
                .filter(|v| !v.is_empty()),
            SplitKey::Random => None,
        }
    }

    /// The variant (index into the policy's variants) a key is placed in.
    pub fn variant_for_key(&self, key: &[u8]) -> usize {
        let entry = match self.hash {
            HashKind::Fnv => self
                .weights
                .pick_u64(fnv_position(self.salt.as_bytes(), key)),
            HashKind::Flagd => self.weights.pick_u32(flagd_hash(self.salt.as_bytes(), key)),
        };
        self.variants[entry]
    }

    fn place<R: RequestInputs + ?Sized, F: FnOnce() -> u64>(
        &self,
        request: &R,
        random: F,
    ) -> (usize, Placement) {
        if let Some(key) = self.key(request) {
            return (self.variant_for_key(key), Placement::Sticky);
        }
        let placement = match (&self.by, self.missing) {
            (SplitKey::Random, _) => Placement::Random,
            (_, MissingKey::Random) => Placement::KeyMissingRandom,
            (_, MissingKey::Fallback) => return (0, Placement::KeyMissingFallback),
        };
        (self.variants[self.weights.pick_u64(random())], placement)
    }
}

impl Condition {
    /// True when the request satisfies this condition.
    pub fn matches<R: RequestInputs + ?Sized>(&self, request: &R) -> bool {
        self.test
            .check(subject_value(&self.subject, request).as_deref())
    }
}

impl Test {
    /// Applies the test to a value (`None`: absent).
    pub fn check(&self, value: Option<&[u8]>) -> bool {
        match (self, value) {
            (Test::Present(expected), value) => value.is_some() == *expected,
            (_, None) => false,
            (Test::Equals(s), Some(v)) => v == s.as_bytes(),
            // The prefix is UTF-8 and ends on a character boundary, so the value is UTF-8
            // exactly when the rest is: a value that is not UTF-8 never matches.
            (Test::Prefix(s), Some(v)) => {
                v.starts_with(s.as_bytes()) && std::str::from_utf8(&v[s.len()..]).is_ok()
            }
            // Sorted when compiled: a thousand values cost ten comparisons.
            (Test::In(list), Some(v)) => list.binary_search_by(|s| s.as_bytes().cmp(v)).is_ok(),
        }
    }
}

/// The value of cookie `name` in a `cookie` header (`a=1; b=2`). Malformed pairs are
/// skipped; surrounding double quotes are removed (RFC 6265 allows them).
pub fn cookie_value<'h>(header: &'h [u8], name: &[u8]) -> Option<&'h [u8]> {
    // One pass over the header: each pair is looked at only as far as its name, and only
    // the pair named `name` is trimmed (splitting and trimming every pair cost a cookie
    // rule most of its price in `make bench-costs`). The same pairs match as when every
    // pair is split at its first '=' and both sides trimmed: names are tokens, so `name`
    // holds no '=', space or ';'.
    let mut rest = header;
    loop {
        let (pair, after_pair) = split_at_byte(rest, b';');
        let pair = trim_ows_start(pair);
        // The first byte alone rules out most pairs, without a call to compare slices.
        let may_match = pair.first() == name.first() || name.is_empty();
        if let Some(after) = may_match.then(|| pair.strip_prefix(name)).flatten() {
            if let Some(value) = trim_ows_start(after).strip_prefix(b"=") {
                let value = trim_ows(value);
                return Some(
                    value
                        .strip_prefix(b"\"")
                        .and_then(|v| v.strip_suffix(b"\""))
                        .unwrap_or(value),
                );
            }
        }
        rest = after_pair?;
    }
}

/// The decoded value of query parameter `name` in a request path (`/p?a=1&b=x%20y`).
/// `+` means a space, `%XX` is decoded; a bad escape is kept as it is.
pub fn query_value(path: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    query_raw_value(path, name).map(percent_decode)
}

/// The value of query parameter `name` as the path has it, not yet decoded (the name
/// is compared decoded). See [`query_value`].
fn query_raw_value<'p>(path: &'p [u8], name: &[u8]) -> Option<&'p [u8]> {
    // A fragment never reaches a proxy, but a malformed client might send one; it ends
    // the query, and a '?' inside it starts none.
    let start = find_either(path, b'?', b'#').filter(|at| path.get(*at) == Some(&b'?'))?;
    let mut rest = split_at_byte(path.get(start + 1..)?, b'#').0;
    loop {
        let (pair, after_pair) = split_at_byte(rest, b'&');
        let (raw_name, raw_value) = split_at_byte(pair, b'=');
        // Decoding never lengthens a name: a shorter one cannot be `name`, and most
        // parameters are ruled out by that alone.
        if raw_name.len() >= name.len() && !raw_name.is_empty() && decodes_to(raw_name, name) {
            return Some(raw_value.unwrap_or_default());
        }
        rest = after_pair?;
    }
}

/// Whether `input` percent-decodes to `expected`, without building the decoded copy:
/// every parameter's name is compared, and allocating each one cost a query rule most
/// of its price (`make bench-costs`).
fn decodes_to(input: &[u8], expected: &[u8]) -> bool {
    let mut expected = expected.iter();
    let mut i = 0;
    while i < input.len() {
        let (byte, used) = decode_at(input, i);
        if expected.next() != Some(&byte) {
            return false;
        }
        i += used;
    }
    expected.next().is_none()
}

/// The byte that `input[i..]` decodes to, and how many input bytes it takes.
fn decode_at(input: &[u8], i: usize) -> (u8, usize) {
    match input[i] {
        b'+' => (b' ', 1),
        b'%' if i + 2 < input.len() => match (hex(input[i + 1]), hex(input[i + 2])) {
            (Some(hi), Some(lo)) => (hi << 4 | lo, 3),
            _ => (b'%', 1),
        },
        b => (b, 1),
    }
}

fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let (byte, used) = decode_at(input, i);
        out.push(byte);
        i += used;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Trims optional white space (spaces and tabs) from the start.
#[inline(always)]
fn trim_ows_start(mut s: &[u8]) -> &[u8] {
    while let Some((first, rest)) = s.split_first() {
        if *first != b' ' && *first != b'\t' {
            break;
        }
        s = rest;
    }
    s
}

/// Trims optional white space (spaces and tabs) from both ends.
fn trim_ows(s: &[u8]) -> &[u8] {
    let mut s = trim_ows_start(s);
    while let Some((last, rest)) = s.split_last() {
        if *last != b' ' && *last != b'\t' {
            break;
        }
        s = rest;
    }
    s
}
