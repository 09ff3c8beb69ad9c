//! Valid-ish policy documents: one of the repository's valid policies with a few edits
//! (a field replaced, removed or added, with values drawn from the policy's own
//! vocabulary), so that validation is exercised deep inside rules, splits and the mirror
//! section rather than stopping at the first syntax error. Same properties as
//! `policy_json`, plus: every accepted document decides a fixed set of requests.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Number, Value};

/// Field names and words of the policy language (and a few near misses).
const KEYS: &[&str] = &[
    "name",
    "decision_header",
    "variants",
    "rules",
    "mirror",
    "when",
    "variant",
    "split",
    "by",
    "salt",
    "weights",
    "missing",
    "hash",
    "weight",
    "header",
    "cookie",
    "query",
    "equals",
    "prefix",
    "in",
    "present",
    "cluster",
    "percent",
    "methods",
    "strip_headers",
    "marker_header",
    "authority_suffix",
    "max_body_bytes",
    "timeout_ms",
    "max_in_flight",
    "compare",
];
const WORDS: &[&str] = &[
    "stable",
    "canary",
    "shadow",
    "random",
    "fallback",
    "fnv",
    "flagd",
    "status",
    "body",
    "off",
    "GET",
    "POST",
    "x-user-id",
    "cookie",
    ":path",
    ":authority",
    ":method",
    "Cookie",
    "x-meshcanary-variant",
    "x-meshcanary-shadow",
    "uid",
    "-shadow",
    "",
    " ",
    "a:b",
    "é",
    "rollout",
    "qa",
    "x-canary",
    "always",
    "outbound|8080|shadow|checkout",
];

#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Big(u64),
    Float(f64),
    Word(u8),
    Text(String),
    Array(Vec<Json>),
    Object(Vec<(Key, Json)>),
}

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Other(String),
}

impl Key {
    fn text(&self) -> String {
        match self {
            Key::Known(i) => KEYS[*i as usize % KEYS.len()].to_string(),
            Key::Other(s) => s.clone(),
        }
    }
}

impl Json {
    fn value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Int(i) => Value::from(*i),
            Json::Big(u) => Value::from(*u),
            Json::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Json::Word(i) => Value::from(WORDS[*i as usize % WORDS.len()]),
            Json::Text(s) => Value::from(s.as_str()),
            Json::Array(items) => Value::Array(items.iter().map(Json::value).collect()),
            Json::Object(fields) => {
                Value::Object(fields.iter().map(|(k, v)| (k.text(), v.value())).collect())
            }
        }
    }
}

/// One edit somewhere in the document: `path` picks a child at each level (by position,
/// modulo the number of children) until it runs out or meets a scalar.
#[derive(Arbitrary, Debug)]
enum Edit {
    Replace { path: Vec<u8>, with: Json },
    Remove { path: Vec<u8> },
    Insert { path: Vec<u8>, key: Key, with: Json },
}

#[derive(Arbitrary, Debug)]
struct Input {
    base: u8,
    edits: Vec<Edit>,
}

fn walk<'v>(node: &'v mut Value, path: &[u8]) -> &'v mut Value {
    let (step, rest) = match path.split_first() {
        Some(split) => split,
        None => return node,
    };
    let len = match &*node {
        Value::Object(map) => map.len(),
        Value::Array(items) => items.len(),
        _ => 0,
    };
    if len == 0 {
        return node;
    }
    let i = *step as usize % len;
    match node {
        Value::Object(map) => match map.values_mut().nth(i) {
            Some(child) => walk(child, rest),
            None => unreachable!("index below the length"),
        },
        Value::Array(items) => walk(&mut items[i], rest),
        other => other,
    }
}

fn apply(doc: &mut Value, edit: &Edit) {
    match edit {
        Edit::Replace { path, with } => *walk(doc, path) = with.value(),
        Edit::Remove { path } => {
            let (last, parent) = match path.split_last() {
                Some(x) => x,
                None => return,
            };
            match walk(doc, parent) {
                Value::Object(map) if !map.is_empty() => {
                    let key = map.keys().nth(*last as usize % map.len()).cloned();
                    if let Some(k) = key {
                        map.remove(&k);
                    }
                }
                Value::Array(items) if !items.is_empty() => {
                    let i = *last as usize % items.len();
                    items.remove(i);
                }
                _ => {}
            }
        }
        Edit::Insert { path, key, with } => match walk(doc, path) {
            Value::Object(map) => {
                map.insert(key.text(), with.value());
            }
            Value::Array(items) => items.push(with.value()),
            _ => {}
        },
    }
}

/// The fixed policies as JSON values, parsed once.
fn base_documents() -> &'static [Value] {
    static BASES: OnceLock<Vec<Value>> = OnceLock::new();
    BASES.get_or_init(|| {
        meshcanary_fuzz::FIXED_POLICIES
            .iter()
            .map(|doc| serde_json::from_str(doc).unwrap_or_else(|_| Value::Object(Map::new())))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let u = Unstructured::new(data);
    let input = match Input::arbitrary_take_rest(u) {
        Ok(i) => i,
        Err(_) => return,
    };
    let bases = base_documents();
    let mut doc = bases[input.base as usize % bases.len()].clone();
    for edit in input.edits.iter().take(8) {
        apply(&mut doc, edit);
    }
    let text = doc.to_string();
    if let Some(policy) = meshcanary_fuzz::check_policy_bytes(text.as_bytes()) {
        // A few fixed requests: every accepted policy decides them consistently.
        let requests: [&[Option<&[u8]>]; 3] = [
            &[],
            &[
                Some(b"canary"),
                Some(b"uid=1; beta=yes"),
                Some(b"/?preview=1"),
            ],
            &[Some(b""), None, Some(b"GET"), Some(b"x"), Some(b"1")],
        ];
        for request in requests {
            meshcanary_fuzz::check_request(&policy, request, 0x9e37_79b9_7f4a_7c15);
        }
    }
});
