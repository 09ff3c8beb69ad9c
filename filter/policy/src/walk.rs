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
