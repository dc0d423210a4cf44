//! JSON decoding that names the failing field: `definition.stages[1].executor.argv`, not just
//! "invalid type". serde_path_to_error tracks the path, but a hand-written `Deserialize` that
//! decodes a nested value loses it; such impls call [`nested`], which carries the inner path
//! out inside the error text, and [`from_value_at`] joins the two.

use serde::de::DeserializeOwned;

use crate::error::FieldError;

// Separates an inner path from the message inside a serde error's text; a control character
// no JSON key or message produced here contains.
const MARK: char = '\u{1}';

/// Decodes `value`, naming the failing field under `prefix` on error.
pub fn from_value_at<T: DeserializeOwned>(value: serde_json::Value, prefix: &str) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let outer = e.path().to_string();
        let message = e.into_inner().to_string();
        let (inner, reason) = split(&message);
        let mut field = prefix.to_string();
        for part in [outer.as_str(), inner] {
            if part.is_empty() || part == "." {
                continue;
            }
            if !field.is_empty() && !part.starts_with('[') {
                field.push('.');
            }
            field.push_str(part);
        }
        // serde names a missing field in the message, not in the path: move it to the path.
        if let Some(missing) = reason.strip_prefix("missing field `").and_then(|r| r.strip_suffix('`')) {
            if !field.is_empty() {
                field.push('.');
            }
            field.push_str(missing);
            return FieldError::new(field, "is required");
        }
        if field.is_empty() {
            field.push_str("body");
        }
        FieldError::new(field, reason)
    })
}

fn split(message: &str) -> (&str, &str) {
    match message.strip_prefix(MARK).and_then(|m| m.split_once(MARK)) {
        Some((path, reason)) => (path, reason),
        None => ("", message),
    }
}

/// Decodes a nested value inside a hand-written `Deserialize`, keeping the inner path.
pub fn nested<T: DeserializeOwned, E: serde::de::Error>(value: serde_json::Value) -> Result<T, E> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let (inner, reason) = split(&message);
        let joined = match (path.as_str(), inner) {
            (".", i) | ("", i) => i.to_string(),
            (p, "") => p.to_string(),
            (p, i) => format!("{p}.{i}"),
        };
        nested_error(&joined, reason)
    })
}

/// An error at `path` inside the value being decoded.
pub fn nested_error<E: serde::de::Error>(path: &str, reason: &str) -> E {
    if path.is_empty() {
        E::custom(reason)
    } else {
        E::custom(format!("{MARK}{path}{MARK}{reason}"))
    }
}
