//! Request extractors whose failures use the error envelope and name the offending field, instead of
//! axum's plain-text rejections.

use std::collections::HashMap;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON body decoded with the path of the field that failed (e.g. `vcpu_count: invalid type ...`).
pub(crate) struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(status, "PAYLOAD_TOO_LARGE", "request body is too large")
            } else {
                ApiError::validation(format!("could not read the request body: {e}"))
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::validation("request body is required (JSON)"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // serde_json appends " at line L column C"; useful for syntax errors, noise for a named field.
        let msg = match (path.as_str(), inner.classify()) {
            (".", _) | (_, serde_json::error::Category::Syntax | serde_json::error::Category::Eof) => {
                format!("invalid JSON body: {msg}")
            }
            (p, _) => format!("{p}: {}", msg.rsplit_once(" at line ").map_or(msg.as_str(), |(m, _)| m)),
        };
        ApiError::validation(msg)
    })
}

/// Query parameters as text; handlers parse each one with a message naming it.
pub(crate) struct QueryMap(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryMap {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        let map = serde_urlencoded_map(q).map_err(|e| ApiError::validation(format!("invalid query string: {e}")))?;
        if let Some((k, _)) = map.iter().find(|(k, v)| k.contains('\0') || v.contains('\0')) {
            let k = k.escape_debug();
            return Err(ApiError::validation(format!("query parameter '{k}' must not contain NUL bytes")));
        }
        Ok(QueryMap(map))
    }
}

fn serde_urlencoded_map(q: &str) -> Result<HashMap<String, String>, String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(q).map(|v| v.into_iter().collect()).map_err(|e| e.to_string())
}

impl QueryMap {
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// An optional integer parameter within `range`.
    pub(crate) fn int<T>(&self, key: &str, range: std::ops::RangeInclusive<T>) -> Result<Option<T>, ApiError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        let bad =
            || ApiError::validation(format!("{key} must be an integer between {} and {}", range.start(), range.end()));
        let v: T = raw.trim().parse().map_err(|_| bad())?;
        if !range.contains(&v) {
            return Err(bad());
        }
        Ok(Some(v))
    }

    pub(crate) fn bool(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None => Ok(false),
            Some("true" | "1" | "") => Ok(true),
            Some("false" | "0") => Ok(false),
            Some(other) => Err(ApiError::validation(format!("{key} must be true or false, got '{other}'"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperfleet_types::CreateMachine;

    fn msg(json: &str) -> String {
        parse_json::<CreateMachine>(json.as_bytes()).err().unwrap().message
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            msg(r#"{"name": "a", "vcpu_count": "two"}"#),
            "vcpu_count: invalid type: string \"two\", expected i64"
        );
        assert!(msg(r#"{"name": "a", "colour": 1}"#).contains("unknown field `colour`"));
        assert!(msg(r#"{"name": "a", "network": {"egress": "maybe"}}"#).starts_with("network.egress: "));
        assert!(msg(r#"{"name": "a",#"#).starts_with("invalid JSON body"));
        assert_eq!(msg("  "), "request body is required (JSON)");
        assert!(msg("[1]").contains("invalid type"));
    }

    #[test]
    fn query_decoding() {
        let m = serde_urlencoded_map("path=%2Ftmp%2Fa+b&x=1&flag").unwrap();
        assert_eq!(m["path"], "/tmp/a b");
        assert_eq!(m["flag"], "");
    }
}
