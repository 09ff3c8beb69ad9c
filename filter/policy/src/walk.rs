//! A JSON walker that collects every problem with its path instead of stopping at the
//! first: the policy decoder is built on it, and so is the controller's spec reader,
//! so both report errors the same way (`rules[2].split.weights: …`).

use serde_json::{Map, Value};

use crate::error::ConfigErrors;

/// Walks a document and collects errors.
#[derive(Debug, Default)]
pub struct Walker {
    /// Every problem found so far, in the order found.
    pub errors: ConfigErrors,
}

impl Walker {
    /// Records a problem at `path`.
    pub fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(path, message);
    }

    /// The object at `path`, after reporting fields not in `allowed`.
    pub fn object<'v>(
        &mut self,
        value: &'v Value,
        path: &str,
        allowed: &[&str],
    ) -> Option<&'v Map<String, Value>> {
        let map = match value.as_object() {
            Some(map) => map,
            None => {
                self.error(path, format!("expected an object, found {}", kind(value)));
                return None;
            }
        };
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) {
                self.error(
                    &join(path, key),
                    format!("unknown field; expected one of: {}", allowed.join(", ")),
                );
            }
        }
        Some(map)
    }

    /// The string at `path`.
    pub fn string<'v>(&mut self, value: &'v Value, path: &str) -> Option<&'v str> {
        match value.as_str() {
            Some(s) => Some(s),
            None => {
                self.error(path, format!("expected a string, found {}", kind(value)));
                None
            }
        }
    }

    /// Field `field` of `map`, reporting it when missing.
    pub fn required<'v>(
        &mut self,
        map: &'v Map<String, Value>,
        path: &str,
        field: &str,
    ) -> Option<&'v Value> {
        let found = map.get(field);
        if found.is_none() {
            self.error(&join(path, field), "required field is missing");
        }
        found
    }

    /// The errors, or `value` when there were none.
    pub fn finish<T>(self, value: Option<T>) -> Result<T, ConfigErrors> {
        match value {
            Some(v) if self.errors.is_empty() => Ok(v),
            _ => Err(self.errors),
        }
    }
}

/// `path.field`, or `field` at the root.
pub fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{}.{}", path, field)
    }
}

/// A JSON value as error messages show it: numbers, booleans and null as written (a
/// fraction to six decimals), strings quoted, lists and objects by their kind. `Value`'s
/// own `Display` would link serde_json's serializer and a float printer into the filter
/// module: about 7 KB of its 300 KB budget.
pub fn shown(value: &Value) -> String {
    match value {
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => u.to_string(),
            (_, Some(i), _) => i.to_string(),
            (_, _, Some(x)) => decimal(x),
            _ => kind(value).to_string(),
        },
        Value::String(s) => format!("{:?}", s),
        Value::Bool(true) => "true".to_string(),
        Value::Bool(false) => "false".to_string(),
        _ => kind(value).to_string(),
    }
}

/// `x` with up to six decimals (at least one), or a description past 10^15, where that
/// would no longer be exact.
fn decimal(x: f64) -> String {
    // (NaN cannot come from JSON; `>=` would let it through anyway, so test for "not below".)
    if x.abs().partial_cmp(&1e15) != Some(std::cmp::Ordering::Less) {
        return "a number beyond ±10^15".to_string();
    }
    let millionths = (x.abs() * 1e6).round() as u64;
    let sign = if x < 0.0 { "-" } else { "" };
    let mut text = format!(
        "{}{}.{:06}",
        sign,
        millionths / 1_000_000,
        millionths % 1_000_000
    );
    while text.ends_with('0') && !text.ends_with(".0") {
        text.pop();
    }
    text
}

/// What a JSON value is, for messages ("expected a string, found a list").
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::shown;
    use serde_json::json;

    #[test]
    fn values_are_shown_as_written() {
        let cases = [
            (json!(-1), "-1"),
            (json!(18_446_744_073_709_551_615u64), "18446744073709551615"),
            (json!(10.5), "10.5"),
            (json!(90.0), "90.0"),
            (json!(-0.25), "-0.25"),
            (json!(0.000_000_1), "0.0"),
            (json!(1e20), "a number beyond ±10^15"),
            (json!("ten \"10\""), r#""ten \"10\"""#),
            (json!(true), "true"),
            (json!(null), "null"),
            (json!([1]), "a list"),
            (json!({"a": 1}), "an object"),
        ];
        for (value, expected) in cases {
            assert_eq!(shown(&value), expected, "{value}");
        }
    }
}
