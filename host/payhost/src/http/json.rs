//! Request bodies: JSON only, size- and depth-capped, errors naming the field at fault.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// How deeply a request body may nest.
pub const MAX_DEPTH: usize = 32;

/// A JSON body, sent as `application/json` (also when empty, which reads as `{}`).
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Exactly `application/json`: anything else (`text/plain; x=+json` included) is a type
        // a web page may send without a preflight.
        // Refused before the body is read (a client waiting for `100 Continue` then never
        // sends it). An empty body needs the type too: a page's form can POST nothing at all.
        if !super::access::is_json(req.headers().get(CONTENT_TYPE)) {
            return Err(unsupported_media_type());
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    "invalid_request_error",
                    "body_too_large",
                    e.body_text(),
                )
            } else {
                ApiError::bad_request("body", e.body_text())
            }
        })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        parse(bytes).map(ApiJson)
    }
}

pub(super) fn unsupported_media_type() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request_error",
        "unsupported_media_type",
        "send the body as application/json",
    )
}

/// Parses a JSON body, refusing excessive nesting and naming the field at fault.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if depth(bytes) > MAX_DEPTH {
        return Err(ApiError::bad_request(
            "body",
            format!("JSON nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = if path == "." { "body".to_owned() } else { path };
        ApiError::bad_request(&param, format!("{inner}"))
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request("body", format!("trailing characters: {e}")))?;
    Ok(value)
}

/// The deepest nesting of `[`/`{` outside strings.
fn depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// The optional `Idempotency-Key` header.
#[derive(Debug, Clone)]
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get("idempotency-key") {
            None => Ok(IdempotencyKey(None)),
            Some(v) => {
                let key = v.to_str().map_err(|_| {
                    ApiError::bad_request("Idempotency-Key", "must be visible ASCII")
                })?;
                if key.is_empty() || key.len() > 255 {
                    return Err(ApiError::bad_request(
                        "Idempotency-Key",
                        "must be 1 to 255 characters",
                    ));
                }
                // Each API key has its own keys: one client can neither replay nor block
                // another's request by guessing its Idempotency-Key.
                Ok(IdempotencyKey(Some(
                    match parts.extensions.get::<crate::auth::Caller>() {
                        Some(caller) => format!("{}/{key}", caller.key_id),
                        None => key.to_owned(),
                    },
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{StatusCode, depth, parse};

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(depth(br#"{"a": "[[[[{{{{", "b": [1, {"c": 2}]}"#), 3);
        assert_eq!(depth(br#""\"[""#), 0);
    }

    #[test]
    fn errors_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            amount: i64,
        }
        let e = parse::<T>(br#"{"amount": "ten"}"#).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let deep = "[".repeat(100);
        assert!(parse::<serde_json::Value>(deep.as_bytes()).is_err());
    }
}
