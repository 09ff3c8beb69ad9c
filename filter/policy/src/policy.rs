//! The policy document (the filter's JSON configuration) and its validation.
//!
//! Parsing goes through `serde_json::Value` and a hand-written walker rather than derived
//! deserializers, because derived ones stop at the first problem: here every problem is
//! collected with its path, unknown fields included. The result is already *compiled*:
//! header names lower-cased, variants resolved to indices, weights checked, request
//! inputs de-duplicated, so nothing is parsed or looked up by name per request.

use serde_json::Value;

use crate::bucket::{HashKind, Weights};
use crate::error::ConfigErrors;
use crate::index::RuleIndex;
use crate::mirror::Mirror;
use crate::walk::Walker;
pub(crate) use crate::walk::{join, kind, shown};

/// Default name of the request header that carries the decision.
pub const DEFAULT_DECISION_HEADER: &str = "x-meshcanary-variant";

/// Longest name (policy, rule, variant) accepted; names become parts of metric names.
pub const MAX_NAME_LEN: usize = 64;

/// A validated, compiled routing policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Names the policy in metrics and logs: `[a-z0-9_-]{1,64}`.
    pub name: String,
    /// Request header (lower-case) that receives the decision; any client value is replaced.
    pub decision_header: String,
    /// The versions a request can be sent to; the first is the fallback.
    pub variants: Vec<String>,
    /// Ordered rules; the first that matches decides.
    pub rules: Vec<Rule>,
    /// Shadow traffic: copies of eligible requests sent to a shadow cluster.
    pub mirror: Option<Mirror>,
    /// Lower-case request header names the rules read, each once (`cookie` and `:path`
    /// included when cookie or query conditions exist). Conditions refer to them by index.
    pub inputs: Vec<String>,
    /// Which rules a request can match, built from `rules` when the policy is decoded
    /// (so `rules` are read, never changed, afterwards).
    pub(crate) index: RuleIndex,
}

/// One routing rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Names the rule in metrics and logs: `[a-z0-9_-]{1,64}`, unique in the policy.
    pub name: String,
    /// Conditions that must all hold for the rule to apply (empty: always).
    pub when: Vec<Condition>,
    /// What the rule does when it applies.
    pub action: Action,
}

/// What a matching rule decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the request to this variant (index into [`Policy::variants`]).
    Variant(usize),
    /// Split requests between variants by weight.
    Split(Split),
}

/// A weighted split between variants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Where the sticky key comes from.
    pub by: SplitKey,
    /// Mixed into the hash so that different rollouts get independent cohorts.
    pub salt: String,
    /// Variant indices (into [`Policy::variants`]), in the order the weights list them.
    pub variants: Vec<usize>,
    /// Relative weights, aligned with `variants`.
    pub weights: Weights,
    /// What happens when the key is absent from the request.
    pub missing: MissingKey,
    /// Which function maps keys to buckets.
    pub hash: HashKind,
}

/// Source of a split's sticky key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitKey {
    /// A request header; the value is the input at this index.
    Header(usize),
    /// A cookie with this name, read from the `cookie` header input at this index.
    Cookie { name: String, input: usize },
    /// No key: every request is drawn independently.
    Random,
}

/// Behaviour of a keyed split when the request carries no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKey {
    /// Draw a random bucket for this request (not sticky).
    Random,
    /// Send the request to the policy's fallback variant (the first).
    Fallback,
}

/// A test on one part of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Which part of the request is tested.
    pub subject: Subject,
    /// The test applied to it.
    pub test: Test,
}

/// The part of a request a condition reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A request header; the value is the input at this index.
    Header(usize),
    /// A cookie with this name, read from the `cookie` header input at this index.
    Cookie { name: String, input: usize },
    /// A query parameter with this name, read from the `:path` input at this index.
    Query { name: String, input: usize },
}

/// A test on a value (compared as bytes, so non-UTF-8 values simply do not match).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    /// The value equals this string exactly.
    Equals(String),
    /// The value starts with this string.
    Prefix(String),
    /// The value equals one of these strings (sorted, without duplicates: the compiled
    /// policy looks a value up by binary search).
    In(Vec<String>),
    /// The value is present (`true`) or absent (`false`).
    Present(bool),
}

impl Policy {
    /// Parses and validates a policy document, reporting every problem at once.
    pub fn from_json(bytes: &[u8]) -> Result<Policy, ConfigErrors> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(value) => Policy::from_value(&value),
            Err(e) => {
                let mut errors = ConfigErrors::default();
                errors.push("", format!("not valid JSON: {}", e));
                Err(errors)
            }
        }
    }

    /// Validates an already parsed document, reporting every problem at once.
    pub fn from_value(value: &Value) -> Result<Policy, ConfigErrors> {
        let mut cx = Decoder::default();
        let policy = cx.policy(value);
        match policy {
            Some(policy) if cx.walker.errors.is_empty() => Ok(policy),
            _ => Err(cx.walker.errors),
        }
    }

    /// Index of the rule with this name.
    pub fn rule_index(&self, name: &str) -> Option<usize> {
        self.rules.iter().position(|r| r.name == name)
    }

    /// Index of the variant with this name.
    pub fn variant_index(&self, name: &str) -> Option<usize> {
        self.variants.iter().position(|v| v == name)
    }
}

/// Walks a JSON document, collecting errors with their paths.
#[derive(Default)]
pub(crate) struct Decoder {
    /// Collects errors with their paths (shared with the controller's spec reader).
    walker: Walker,
    inputs: Vec<String>,
    /// The policy's name once decoded; default salts are derived from it.
    policy_name: Option<String>,
}

impl std::ops::Deref for Decoder {
    type Target = Walker;
    fn deref(&self) -> &Walker {
        &self.walker
    }
}

impl std::ops::DerefMut for Decoder {
    fn deref_mut(&mut self) -> &mut Walker {
        &mut self.walker
    }
}

const POLICY_FIELDS: &[&str] = &["name", "decision_header", "variants", "rules", "mirror"];
const RULE_FIELDS: &[&str] = &["name", "when", "variant", "split"];
const SPLIT_FIELDS: &[&str] = &["by", "salt", "weights", "missing", "hash"];
const WEIGHT_FIELDS: &[&str] = &["variant", "weight"];
const SUBJECTS: &[&str] = &["header", "cookie", "query"];
const TESTS: &[&str] = &["equals", "prefix", "in", "present"];

impl Decoder {
    /// A name used in metrics: `[a-z0-9_-]{1,64}`.
    pub(crate) fn name(&mut self, value: &Value, path: &str) -> Option<String> {
        let s = self.string(value, path)?;
        if s.is_empty() || s.len() > MAX_NAME_LEN {
            self.error(
                path,
                format!("must be 1 to {} characters long", MAX_NAME_LEN),
            );
            return None;
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            self.error(
                path,
                format!("{:?} may contain only a-z, 0-9, '_' and '-'", s),
            );
            return None;
        }
        Some(s.to_string())
    }

    /// A header name, lower-cased. Pseudo-headers (`:path`, `:authority`…) are allowed.
    pub(crate) fn header_name(&mut self, value: &Value, path: &str) -> Option<String> {
        let s = self.string(value, path)?;
        let body = s.strip_prefix(':').unwrap_or(s);
        if body.is_empty() || !body.bytes().all(is_token_byte) {
            self.error(path, format!("{:?} is not a valid header name", s));
            return None;
        }
        Some(s.to_ascii_lowercase())
    }

    /// Index of a request input (header name), registering it once.
    pub(crate) fn input(&mut self, header: &str) -> usize {
        if let Some(i) = self.inputs.iter().position(|h| h == header) {
            return i;
        }
        self.inputs.push(header.to_string());
        self.inputs.len() - 1
    }

    fn policy(&mut self, value: &Value) -> Option<Policy> {
        let map = self.object(value, "", POLICY_FIELDS)?;
        let name = self
            .required(map, "", "name")
            .and_then(|v| self.name(v, "name"));
        self.policy_name = name.clone();
        let decision_header = match map.get("decision_header") {
            None => Some(DEFAULT_DECISION_HEADER.to_string()),
            Some(v) => self.header_name(v, "decision_header").and_then(|h| {
                if h.starts_with(':') {
                    self.error("decision_header", "must not be a pseudo-header");
                    None
                } else {
                    Some(h)
                }
            }),
        };
        let variants = self
            .required(map, "", "variants")
            .and_then(|v| self.variants(v));
        let rules = match (map.get("rules"), &variants) {
            (None, _) => Some(Vec::new()),
            (Some(v), Some(variants)) => self.rules(v, variants),
            // Without valid variants, rules cannot be resolved; still report their shape.
            (Some(v), None) => self.rules(v, &[]).map(|_| Vec::new()),
        };
        // Mirror sampling is sticky by the key of the policy's first keyed split.
        let sample_key = rules.as_ref().and_then(|rules| {
            rules.iter().find_map(|rule| match &rule.action {
                Action::Split(split) if split.by != SplitKey::Random => Some(split.by.clone()),
                _ => None,
            })
        });
        let mirror = match map.get("mirror") {
            None | Some(Value::Null) => Some(None),
            Some(v) => self.mirror(v, "mirror", sample_key).map(Some),
        };
        if let (Some(decision), Some(Some(mirror))) = (&decision_header, &mirror) {
            // The filter writes the decision header on every request, so as a marker it
            // would mark every request for the next hop, and a copy's marker would be
            // overwritten by its decision.
            if mirror.marker_header == *decision {
                self.error(
                    "mirror.marker_header",
                    format!(
                        "{:?} is the decision header; the marker needs a header of its own",
                        decision
                    ),
                );
            }
        }
        let rules = rules?;
        Some(Policy {
            name: name?,
            decision_header: decision_header?,
            variants: variants?,
            index: RuleIndex::new(&rules),
            rules,
            mirror: mirror?,
            inputs: std::mem::take(&mut self.inputs),
        })
    }

    fn variants(&mut self, value: &Value) -> Option<Vec<String>> {
        let items = match value.as_array() {
            Some(items) => items,
            None => {
                self.error(
                    "variants",
                    format!("expected a list of names, found {}", kind(value)),
                );
                return None;
            }
        };
        if items.is_empty() {
            self.error("variants", "must list at least one variant");
            return None;
        }
        let mut names: Vec<String> = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("variants[{}]", i);
            match self.name(item, &path) {
                Some(n) if names.contains(&n) => {
                    self.error(&path, format!("duplicate variant {:?}", n));
                    ok = false;
                }
                Some(n) => names.push(n),
                None => ok = false,
            }
        }
        if ok {
            Some(names)
        } else {
            None
        }
    }

    fn rules(&mut self, value: &Value, variants: &[String]) -> Option<Vec<Rule>> {
        let items = match value.as_array() {
            Some(items) => items,
            None => {
                self.error(
                    "rules",
                    format!("expected a list of rules, found {}", kind(value)),
                );
                return None;
            }
        };
        let mut rules = Vec::with_capacity(items.len());
        let mut ok = true;
        let mut names: Vec<String> = Vec::new();
        let mut catch_all: Option<usize> = None;
        for (i, item) in items.iter().enumerate() {
            let path = format!("rules[{}]", i);
            if let Some(earlier) = catch_all {
                self.error(
                    &path,
                    format!("unreachable: rules[{}] applies to every request", earlier),
                );
                ok = false;
            }
            let (name, rule) = self.rule(item, &path, variants);
            // A rule's name and reachability are checked even when another part of it is
            // wrong, so that every problem is reported in the same round.
            if let Some(name) = name {
                if names.contains(&name) {
                    self.error(
                        &join(&path, "name"),
                        format!("duplicate rule name {:?}", name),
                    );
                    ok = false;
                }
                names.push(name);
            }
            if catch_all.is_none() && is_unconditional_split(item) {
                catch_all = Some(i);
            }
            match rule {
                Some(rule) => rules.push(rule),
                None => ok = false,
            }
        }
        if ok {
            Some(rules)
        } else {
            None
        }
    }

    /// The rule, and its name whenever the name itself is valid.
    fn rule(
        &mut self,
        value: &Value,
        path: &str,
        variants: &[String],
    ) -> (Option<String>, Option<Rule>) {
        let map = match self.object(value, path, RULE_FIELDS) {
            Some(map) => map,
            None => return (None, None),
        };
        let name = self
            .required(map, path, "name")
            .and_then(|v| self.name(v, &join(path, "name")));
        let when = match map.get("when") {
            None => Some(Vec::new()),
            Some(v) => self.conditions(v, &join(path, "when")),
        };
        let action = match (map.get("variant"), map.get("split")) {
            (Some(_), Some(_)) => {
                self.error(path, "a rule has either \"variant\" or \"split\", not both");
                None
            }
            (None, None) => {
                self.error(
                    path,
                    "a rule needs \"variant\" (with \"when\") or \"split\"",
                );
                None
            }
            (Some(v), None) => {
                if map
                    .get("when")
                    .map_or(true, |w| w.as_array().map_or(false, |a| a.is_empty()))
                {
                    self.error(
                        &join(path, "when"),
                        "a rule with \"variant\" needs at least one condition (the first variant is already the fallback)",
                    );
                }
                self.variant_ref(v, &join(path, "variant"), variants)
                    .map(Action::Variant)
            }
            (None, Some(v)) => self
                .split(v, &join(path, "split"), variants, name.as_deref())
                .map(Action::Split),
        };
        let rule = match (&name, when, action) {
            (Some(name), Some(when), Some(action)) => Some(Rule {
                name: name.clone(),
                when,
                action,
            }),
            _ => None,
        };
        (name, rule)
    }

    fn variant_ref(&mut self, value: &Value, path: &str, variants: &[String]) -> Option<usize> {
        let name = self.string(value, path)?;
        let found = variants.iter().position(|v| v == name);
        if found.is_none() && !variants.is_empty() {
            // Joined as `&str`s, as `Walker::object` joins field names: one instance of
            // `join` in the filter module instead of two (1.2 KB; the module has a size
            // budget).
            let variants: Vec<&str> = variants.iter().map(String::as_str).collect();
            self.error(
                path,
                format!(
                    "{:?} is not one of the policy's variants ({})",
                    name,
                    variants.join(", ")
                ),
            );
        }
        found
    }

    pub(crate) fn conditions(&mut self, value: &Value, path: &str) -> Option<Vec<Condition>> {
        let items = match value.as_array() {
            Some(items) => items,
            None => {
                self.error(
                    path,
                    format!("expected a list of conditions, found {}", kind(value)),
                );
                return None;
            }
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.condition(item, &format!("{}[{}]", path, i)) {
                Some(c) => out.push(c),
                None => ok = false,
            }
        }
        if ok {
            Some(out)
        } else {
            None
        }
    }

    fn condition(&mut self, value: &Value, path: &str) -> Option<Condition> {
        let mut allowed: Vec<&str> = SUBJECTS.to_vec();
        allowed.extend_from_slice(TESTS);
        let map = self.object(value, path, &allowed)?;
        let subjects: Vec<&str> = SUBJECTS
            .iter()
            .copied()
            .filter(|s| map.contains_key(*s))
            .collect();
        let tests: Vec<&str> = TESTS
            .iter()
            .copied()
            .filter(|t| map.contains_key(*t))
            .collect();
        if subjects.len() != 1 {
            self.error(
                path,
                format!(
                    "a condition needs exactly one of header, cookie, query (found {})",
                    subjects.len()
                ),
            );
        }
        if tests.len() != 1 {
            self.error(
                path,
                format!(
                    "a condition needs exactly one of equals, prefix, in, present (found {})",
                    tests.len()
                ),
            );
        }
        let subject = match subjects.first() {
            Some(&s) if subjects.len() == 1 => self.subject(s, &map[s], &join(path, s)),
            _ => None,
        };
        let test = match tests.first() {
            Some(&t) if tests.len() == 1 => self.test(t, &map[t], &join(path, t)),
            _ => None,
        };
        Some(Condition {
            subject: subject?,
            test: test?,
        })
    }

    fn subject(&mut self, kind_name: &str, value: &Value, path: &str) -> Option<Subject> {
        match kind_name {
            "header" => {
                let h = self.header_name(value, path)?;
                Some(Subject::Header(self.input(&h)))
            }
            "cookie" => {
                let name = self.cookie_name(value, path)?;
                let input = self.input("cookie");
                Some(Subject::Cookie { name, input })
            }
            _ => {
                let name = self.string(value, path)?;
                if name.is_empty() {
                    self.error(path, "query parameter name must not be empty");
                    return None;
                }
                let input = self.input(":path");
                Some(Subject::Query {
                    name: name.to_string(),
                    input,
                })
            }
        }
    }

    fn cookie_name(&mut self, value: &Value, path: &str) -> Option<String> {
        let name = self.string(value, path)?;
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            self.error(path, format!("{:?} is not a valid cookie name", name));
            return None;
        }
        Some(name.to_string())
    }

    fn test(&mut self, kind_name: &str, value: &Value, path: &str) -> Option<Test> {
        match kind_name {
            "equals" => self
                .string(value, path)
                .map(|s| Test::Equals(s.to_string())),
            "prefix" => self
                .string(value, path)
                .map(|s| Test::Prefix(s.to_string())),
            "present" => match value.as_bool() {
                Some(b) => Some(Test::Present(b)),
                None => {
                    self.error(
                        path,
                        format!("expected true or false, found {}", kind(value)),
                    );
                    None
                }
            },
            _ => {
                let items = match value.as_array() {
                    Some(items) => items,
                    None => {
                        self.error(
                            path,
                            format!("expected a list of strings, found {}", kind(value)),
                        );
                        return None;
                    }
                };
                if items.is_empty() {
                    self.error(path, "must list at least one value");
                    return None;
                }
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    match self.string(item, &format!("{}[{}]", path, i)) {
                        // Kept sorted and without duplicates by inserting in place (a
                        // sort routine would add kilobytes to the module for this alone).
                        Some(s) => {
                            if let Err(at) = out.binary_search_by(|v: &String| v.as_str().cmp(s)) {
                                out.insert(at, s.to_string());
                            }
                        }
                        None => ok = false,
                    }
                }
                if ok {
                    Some(Test::In(out))
                } else {
                    None
                }
            }
        }
    }

    fn split(
        &mut self,
        value: &Value,
        path: &str,
        variants: &[String],
        rule_name: Option<&str>,
    ) -> Option<Split> {
        let map = self.object(value, path, SPLIT_FIELDS)?;
        let by = self
            .required(map, path, "by")
            .and_then(|v| self.split_key(v, &join(path, "by")));
        let salt = match map.get("salt") {
            // Default: "<policy>/<rule>", so cohorts of different rollouts are independent.
            None => Some(format!(
                "{}/{}",
                self.policy_name.as_deref().unwrap_or_default(),
                rule_name.unwrap_or_default()
            )),
            Some(v) => self.string(v, &join(path, "salt")).map(str::to_string),
        };
        let weights = self
            .required(map, path, "weights")
            .and_then(|v| self.weights(v, &join(path, "weights"), variants));
        let missing = match map.get("missing") {
            None => Some(MissingKey::Random),
            Some(v) => match v.as_str() {
                Some("random") => Some(MissingKey::Random),
                Some("fallback") => Some(MissingKey::Fallback),
                _ => {
                    self.error(
                        &join(path, "missing"),
                        "expected \"random\" or \"fallback\"",
                    );
                    None
                }
            },
        };
        let hash = match map.get("hash") {
            None => Some(HashKind::Fnv),
            Some(v) => match v.as_str() {
                Some("fnv") => Some(HashKind::Fnv),
                Some("flagd") => Some(HashKind::Flagd),
                _ => {
                    self.error(&join(path, "hash"), "expected \"fnv\" or \"flagd\"");
                    None
                }
            },
        };
        let (split_variants, weights) = weights?;
        Some(Split {
            by: by?,
            salt: salt?,
            variants: split_variants,
            weights,
            missing: missing?,
            hash: hash?,
        })
    }

    fn split_key(&mut self, value: &Value, path: &str) -> Option<SplitKey> {
        if value.as_str() == Some("random") {
            return Some(SplitKey::Random);
        }
        if value.is_string() {
            self.error(
                path,
                "expected \"random\", {\"header\": NAME} or {\"cookie\": NAME}",
            );
            return None;
        }
        let map = self.object(value, path, &["header", "cookie"])?;
        match (map.get("header"), map.get("cookie")) {
            (Some(h), None) => {
                let h = self.header_name(h, &join(path, "header"))?;
                Some(SplitKey::Header(self.input(&h)))
            }
            (None, Some(c)) => {
                let name = self.cookie_name(c, &join(path, "cookie"))?;
                let input = self.input("cookie");
                Some(SplitKey::Cookie { name, input })
            }
            _ => {
                self.error(path, "expected exactly one of \"header\" or \"cookie\"");
                None
            }
        }
    }

    fn weights(
        &mut self,
        value: &Value,
        path: &str,
        variants: &[String],
    ) -> Option<(Vec<usize>, Weights)> {
        let items = match value.as_array() {
            Some(items) => items,
            None => {
                self.error(
                    path,
                    format!(
                        "expected a list of {{variant, weight}}, found {}",
                        kind(value)
                    ),
                );
                return None;
            }
        };
        if items.is_empty() {
            self.error(path, "must list at least one variant");
            return None;
        }
        let mut indices = Vec::with_capacity(items.len());
        let mut weights = Vec::with_capacity(items.len());
        // Every variant named so far, even in an entry whose weight is wrong.
        let mut listed: Vec<usize> = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{}[{}]", path, i);
            let map = match self.object(item, &item_path, WEIGHT_FIELDS) {
                Some(map) => map,
                None => {
                    ok = false;
                    continue;
                }
            };
            let variant = self
                .required(map, &item_path, "variant")
                .and_then(|v| self.variant_ref(v, &join(&item_path, "variant"), variants));
            let weight = self
                .required(map, &item_path, "weight")
                .and_then(|v| match v.as_u64() {
                    Some(w) => Some(w),
                    None => {
                        self.error(
                            &join(&item_path, "weight"),
                            format!("expected a non-negative integer, found {}", shown(v)),
                        );
                        None
                    }
                });
            if let Some(v) = variant {
                if listed.contains(&v) {
                    self.error(
                        &join(&item_path, "variant"),
                        format!("variant {:?} is listed twice", variants[v]),
                    );
                    ok = false;
                }
                listed.push(v);
            }
            match (variant, weight) {
                (Some(v), Some(w)) => {
                    indices.push(v);
                    weights.push(w);
                }
                _ => ok = false,
            }
        }
        if !ok {
            return None;
        }
        match Weights::new(weights.clone()) {
            Some(table) => Some((indices, table)),
            None => {
                let total: u128 = weights.iter().map(|w| u128::from(*w)).sum();
                if total == 0 {
                    self.error(path, "total weight must be greater than 0");
                } else {
                    self.error(
                        path,
                        format!(
                            "total weight {} is above the maximum {}",
                            total,
                            crate::bucket::MAX_TOTAL_WEIGHT
                        ),
                    );
                }
                None
            }
        }
    }
}

/// True for a rule that applies to every request: a split without conditions. (A
/// `variant` rule without conditions is refused for that alone, not taken as a catch-all.)
fn is_unconditional_split(rule: &Value) -> bool {
    rule.get("split").is_some()
        && rule.get("variant").is_none()
        && rule
            .get("when")
            .map_or(true, |w| w.as_array().map_or(false, |a| a.is_empty()))
}

/// RFC 9110 token characters (header and cookie names).
pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
