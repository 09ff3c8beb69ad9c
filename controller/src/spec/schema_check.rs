//! Checks a JSON value against the `Rollout` CRD's own schema (the OpenAPI v3 subset of
//! Kubernetes' structural schemas), reporting every problem with its path, and removes
//! each offending value so the typed read of the rest succeeds.
//!
//! It applies the schema the way the API server does with strict field validation
//! (`kubectl apply`'s default): an object with `properties` is closed unless it says
//! `x-kubernetes-preserve-unknown-fields`, so an unknown field is an error, not silently
//! dropped. The one liberty: `x-kubernetes-int-or-string` (used for durations) also
//! takes a fractional number here, as spec files always have.
//!
//! Besides types, `properties`, `additionalProperties`, `required`, `enum`, `minimum` /
//! `maximum` and the integer formats, it checks `minLength` / `maxLength` (in characters,
//! as the API server counts them), `pattern` (the API server's regular expressions are
//! RE2's, which the `regex` crate follows) and `minItems` / `maxItems`, so vendored schemas
//! of other projects' CRDs (Gateway API, Envoy Gateway, Istio) are checked as far as a
//! structural schema goes, and `allOf` (every part must hold) and `anyOf` (one must).
//! Not checked: `x-kubernetes-validations` (CEL rules), `oneOf`, `not`, `format` beyond
//! the integer ranges, and list-map uniqueness.

use meshcanary_policy::walk::{join, kind};
use meshcanary_policy::ConfigErrors;
use serde_json::Value;

/// Better words for what is expected at a path (indices written `[]`), e.g.
/// `steps[]` → `a whole percentage`. `None`: the generic words.
pub type Wording = fn(&str) -> Option<&'static str>;

/// Checks `value` against `schema` at `path`; returns whether the value may stay (a
/// value of the wrong type or an unknown field is reported and must be removed).
pub fn check(
    value: &mut Value,
    schema: &Value,
    path: &str,
    wording: Wording,
    errors: &mut ConfigErrors,
) -> bool {
    let Some(schema) = schema.as_object() else {
        return true;
    };
    let flag = |name: &str| schema.get(name).and_then(Value::as_bool) == Some(true);
    if value.is_null() && flag("nullable") {
        return true;
    }
    let mismatch = |errors: &mut ConfigErrors, expected: &str, value: &Value| {
        match wording(&generic_path(path)) {
            Some(words) => errors.push(path, format!("expected {}, found {}", words, value)),
            None => errors.push(
                path,
                format!("expected {}, found {}", expected, kind(value)),
            ),
        }
        false
    };
    if flag("x-kubernetes-int-or-string") {
        return match &*value {
            Value::Number(_) | Value::String(_) => true,
            other => mismatch(errors, "a string or a number", other),
        };
    }
    let kept = match schema.get("type").and_then(Value::as_str) {
        None => true,
        Some("object") => {
            if value.is_object() {
                check_object(value, schema, path, wording, errors)
            } else {
                mismatch(errors, "an object", value)
            }
        }
        Some("array") => match &mut *value {
            Value::Array(items) => {
                check_length(items.len(), "items", schema, path, errors);
                let items_schema = schema.get("items").cloned().unwrap_or(Value::Null);
                let mut position = 0;
                items.retain_mut(|item| {
                    let keep = check(
                        item,
                        &items_schema,
                        &format!("{}[{}]", path, position),
                        wording,
                        errors,
                    );
                    position += 1;
                    keep
                });
                true
            }
            other => mismatch(errors, "a list", &*other),
        },
        Some("string") => match &*value {
            Value::String(text) => check_string(text, schema, path, errors),
            other @ (Value::Number(_) | Value::Bool(_)) => {
                mismatch(errors, "a string (quote it)", other)
            }
            other => mismatch(errors, "a string", other),
        },
        Some("integer") => match &*value {
            Value::Number(n) if n.is_u64() || n.is_i64() => {
                check_bounds(n.as_f64().unwrap_or(0.0), schema, path, value, errors)
            }
            other => mismatch(errors, "a whole number", other),
        },
        Some("number") => match &*value {
            Value::Number(_) => true,
            other => mismatch(errors, "a number", other),
        },
        Some("boolean") => match &*value {
            Value::Bool(_) => true,
            other => mismatch(errors, "true or false", other),
        },
        Some(_) => true,
    };
    if !kept {
        return false;
    }
    if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
        for part in parts {
            if !check(value, part, path, wording, errors) {
                return false;
            }
        }
    }
    if let Some(choices) = schema.get("anyOf").and_then(Value::as_array) {
        let mut first_problems = None;
        let fits = choices.iter().any(|choice| {
            let mut trial = value.clone();
            let mut found = ConfigErrors::default();
            check(&mut trial, choice, path, wording, &mut found);
            let fits = found.is_empty();
            if first_problems.is_none() {
                first_problems = Some(found);
            }
            fits
        });
        if !fits && !choices.is_empty() {
            let why: Vec<String> = first_problems
                .iter()
                .flat_map(|f| f.iter().map(ToString::to_string))
                .collect();
            errors.push(
                path,
                format!(
                    "fits none of the {} schemas of anyOf (the first: {})",
                    choices.len(),
                    why.join("; ")
                ),
            );
            return false;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        let allowed: Vec<&Value> = allowed.iter().filter(|v| !v.is_null()).collect();
        if !allowed.contains(&&*value) {
            let words = match wording(&generic_path(path)) {
                Some(words) => words.to_string(),
                None => one_of(&allowed),
            };
            errors.push(path, format!("expected {}, found {}", words, value));
            return false;
        }
    }
    true
}

/// An object: known fields checked, unknown ones reported (unless the schema keeps
/// them), required ones present.
fn check_object(
    value: &mut Value,
    schema: &serde_json::Map<String, Value>,
    path: &str,
    wording: Wording,
    errors: &mut ConfigErrors,
) -> bool {
    let Some(map) = value.as_object_mut() else {
        return false;
    };
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    let open = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true);
    let known: Vec<&str> = properties
        .map(|p| p.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let mut remove = Vec::new();
    for (key, field) in map.iter_mut() {
        let field_path = join(path, key);
        let field_schema = properties.and_then(|p| p.get(key)).or(additional);
        let keep = match field_schema {
            Some(s) => check(field, s, &field_path, wording, errors),
            None if open || properties.is_none() => true,
            None => {
                errors.push(
                    &field_path,
                    format!("unknown field; expected one of: {}", known.join(", ")),
                );
                false
            }
        };
        if !keep {
            remove.push(key.clone());
        }
    }
    for key in remove {
        map.remove(&key);
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if map.get(name).is_none_or(Value::is_null) {
                errors.push(&join(path, name), "required field is missing");
            }
        }
    }
    true
}

/// `minLength` / `maxLength` / `minItems` / `maxItems`: a count against its bounds
/// (`unit` is `characters` or `items`). Reported, but the value stays: it has the right
/// type, so the typed read of the rest is not disturbed by it.
fn check_length(
    count: usize,
    unit: &str,
    schema: &serde_json::Map<String, Value>,
    path: &str,
    errors: &mut ConfigErrors,
) {
    let (min_key, max_key) = if unit == "items" {
        ("minItems", "maxItems")
    } else {
        ("minLength", "maxLength")
    };
    let count = count as u64;
    if let Some(min) = schema.get(min_key).and_then(Value::as_u64) {
        if count < min {
            errors.push(
                path,
                format!("has {} {}, at least {} expected", count, unit, min),
            );
        }
    }
    if let Some(max) = schema.get(max_key).and_then(Value::as_u64) {
        if count > max {
            errors.push(
                path,
                format!("has {} {}, at most {} allowed", count, unit, max),
            );
        }
    }
}

/// A string's length and `pattern`. A pattern this checker cannot compile is reported as
/// a problem too: a check that silently did not run would pass anything.
fn check_string(
    text: &str,
    schema: &serde_json::Map<String, Value>,
    path: &str,
    errors: &mut ConfigErrors,
) -> bool {
    check_length(text.chars().count(), "characters", schema, path, errors);
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match regex::Regex::new(pattern) {
            Ok(re) if re.is_match(text) => {}
            Ok(_) => errors.push(
                path,
                format!("{:?} does not match the pattern {}", text, pattern),
            ),
            Err(e) => errors.push(
                path,
                format!("the schema's pattern {} cannot be checked: {}", pattern, e),
            ),
        }
    }
    true
}

/// `minimum` / `maximum` and the integer formats' ranges.
fn check_bounds(
    number: f64,
    schema: &serde_json::Map<String, Value>,
    path: &str,
    value: &Value,
    errors: &mut ConfigErrors,
) -> bool {
    let (format_min, format_max) = match schema.get("format").and_then(Value::as_str) {
        Some("uint8") => (Some(0.0), Some(f64::from(u8::MAX))),
        Some("uint16") => (Some(0.0), Some(f64::from(u16::MAX))),
        Some("uint32") => (Some(0.0), Some(f64::from(u32::MAX))),
        Some("uint64") | Some("uint") => (Some(0.0), None),
        Some("int32") => (Some(f64::from(i32::MIN)), Some(f64::from(i32::MAX))),
        _ => (None, None),
    };
    let min = schema.get("minimum").and_then(Value::as_f64).or(format_min);
    let max = schema.get("maximum").and_then(Value::as_f64).or(format_max);
    let ok = min.is_none_or(|m| number >= m) && max.is_none_or(|m| number <= m);
    if !ok {
        let range = match (min, max) {
            (Some(a), Some(b)) => format!("from {} to {}", a, b),
            (Some(a), None) => format!("of at least {}", a),
            (None, Some(b)) => format!("of at most {}", b),
            (None, None) => String::new(),
        };
        errors.push(
            path,
            format!("expected a whole number {}, found {}", range, value),
        );
    }
    ok
}

/// `"a" or "b"`, or `one of "a", "b", "c"`.
fn one_of(values: &[&Value]) -> String {
    let words: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    match words.as_slice() {
        [one] => one.clone(),
        [a, b] => format!("{} or {}", a, b),
        many => format!("one of {}", many.join(", ")),
    }
}

/// The path with every `[index]` written `[]`.
fn generic_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn no_words(_: &str) -> Option<&'static str> {
        None
    }

    fn run(mut value: Value, schema: Value) -> (Value, Vec<String>) {
        let mut errors = ConfigErrors::default();
        check(&mut value, &schema, "", no_words, &mut errors);
        (value, errors.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn every_problem_is_reported_and_removed() {
        let schema = json!({"type": "object", "required": ["a", "b"], "properties": {
            "a": {"type": "integer", "format": "uint32", "minimum": 0},
            "b": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}},
            "m": {"type": "object", "additionalProperties": {"type": "string"}},
            "d": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]}
        }});
        let (value, errors) = run(
            json!({"a": -1, "b": ["x", "z", 3], "m": {"k": 1, "j": "ok"}, "d": [1], "e": true}),
            schema,
        );
        assert_eq!(
            errors,
            vec![
                "a: expected a whole number from 0 to 4294967295, found -1",
                "b[1]: expected \"x\" or \"y\", found \"z\"",
                "b[2]: expected a string (quote it), found a number",
                "d: expected a string or a number, found a list",
                "e: unknown field; expected one of: a, b, d, m",
                "m.k: expected a string (quote it), found a number",
                "a: required field is missing",
            ]
        );
        assert_eq!(value, json!({"b": ["x"], "m": {"j": "ok"}}));
    }

    #[test]
    fn lengths_patterns_and_item_counts() {
        let schema = json!({"type": "object", "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 5, "pattern": "^[a-z]+$"},
            "list": {"type": "array", "maxItems": 2, "items": {"type": "integer"}},
            "bad": {"type": "string", "pattern": "(unclosed"}
        }});
        let (value, errors) = run(
            json!({"name": "Ab-cdef", "list": [1, 2, 3], "bad": "x"}),
            schema.clone(),
        );
        assert_eq!(
            errors,
            vec![
                "bad: the schema's pattern (unclosed cannot be checked: regex parse error:\n    (unclosed\n    ^\nerror: unclosed group",
                "list: has 3 items, at most 2 allowed",
                "name: has 7 characters, at most 5 allowed",
                "name: \"Ab-cdef\" does not match the pattern ^[a-z]+$",
            ]
        );
        assert_eq!(
            value,
            json!({"name": "Ab-cdef", "list": [1, 2, 3], "bad": "x"})
        );
        let (_, errors) = run(json!({"name": "", "list": []}), schema);
        assert_eq!(
            errors,
            vec![
                "name: has 0 characters, at least 1 expected",
                "name: \"\" does not match the pattern ^[a-z]+$",
            ]
        );
    }

    #[test]
    fn all_of_and_any_of() {
        let schema = json!({"type": "object", "properties": {
            "t": {"type": "string", "allOf": [{"enum": ["a", "b"]}, {"enum": ["a", "b", "c"]}]},
            "u": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}
        }});
        let (_, errors) = run(json!({"t": "a", "u": "ab"}), schema.clone());
        assert!(errors.is_empty(), "{errors:?}");
        let (value, errors) = run(json!({"t": "c", "u": "abc"}), schema);
        assert_eq!(
            errors,
            vec![
                "t: expected \"a\" or \"b\", found \"c\"",
                "u: fits none of the 2 schemas of anyOf (the first: u: expected a whole number, found a string)",
            ]
        );
        assert_eq!(value, json!({}));
    }

    #[test]
    fn generic_paths_drop_indices() {
        assert_eq!(generic_path("a[12].b[3]"), "a[].b[]");
    }
}
