//! Errors of the client, and the parsing of the API's error bodies.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

use crate::api::{ErrorObject, HttpValidationError};

/// A non-2xx answer of the API, with what its body said.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// The HTTP status code.
    pub status: u16,
    /// The error message, or the validation issues joined, or the reason phrase.
    pub message: String,
    /// The server's reference for this error, when it gave one.
    pub ref_id: Option<String>,
    /// The `detail` object of an error body, or the `detail` list of a 422.
    pub detail: Option<Value>,
    /// How long the server asked the client to wait (`retry-after-ms` / `Retry-After`).
    pub retry_after: Option<Duration>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = reqwest::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        write!(f, "HTTP {} {reason}: {}", self.status, self.message)?;
        if let Some(r) = &self.ref_id {
            write!(f, " (ref_id {r})")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration cannot work (bad URL, batch size, …).
    #[error("client configuration: {0}")]
    Config(String),
    /// A caller-supplied input is unusable (e.g. a row key that is too long).
    #[error("input {index}: {message}")]
    InvalidInput { index: u64, message: String },
    /// No connection could be made; the request was not sent.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    /// The request was sent but no complete answer came back (timeout, reset, cut body).
    #[error("{endpoint}: no complete answer: {source}")]
    Transport {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    /// The API answered with an error status.
    #[error("{endpoint}: {error}")]
    Api {
        endpoint: String,
        error: Box<ApiError>,
    },
    /// A 2xx answer whose body is not what the API documents.
    #[error("{endpoint}: unexpected response body: {source}")]
    Decode {
        endpoint: String,
        #[source]
        source: serde_json::Error,
    },
    /// An SSE stream broke off (cut connection, incomplete frame, idle timeout).
    #[error("{endpoint}: stream interrupted: {reason}")]
    StreamCut { endpoint: String, reason: String },
    /// An SSE stream carried an `error` event.
    #[error("{endpoint}: stream error: {} (ref_id {})", .error.message, .error.ref_id)]
    StreamError {
        endpoint: String,
        error: ErrorObject,
    },
    /// The answer breaks a promise of the API (e.g. fewer run ids than inputs).
    #[error("{endpoint}: {message}")]
    Protocol { endpoint: String, message: String },
    /// Ctrl-C arrived (see [`crate::interrupt`]): the request was not sent.
    #[error("{endpoint}: not sent: interrupted")]
    Interrupted { endpoint: String },
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { error, .. } => Some(error.status),
            _ => None,
        }
    }

    /// The server's reference for the error, when it gave one.
    pub fn ref_id(&self) -> Option<&str> {
        match self {
            ClientError::Api { error, .. } => error.ref_id.as_deref(),
            ClientError::StreamError { error, .. } if !error.ref_id.is_empty() => {
                Some(&error.ref_id)
            }
            _ => None,
        }
    }

    /// The API error's details, when the answer was an error status.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api { error, .. } => Some(error),
            _ => None,
        }
    }

    /// True when trying again may succeed: connection problems, cut streams, 408, 429, 5xx.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Transport { .. }
            | ClientError::StreamCut { .. } => true,
            ClientError::Api { error, .. } => {
                matches!(error.status, 408 | 429) || error.status >= 500
            }
            _ => false,
        }
    }

    /// True for 401 and 403: the key is missing, wrong, or not allowed to do this.
    pub fn is_auth(&self) -> bool {
        matches!(self.status(), Some(401 | 403))
    }

    /// True when the request certainly did not reach the server, so re-sending a
    /// non-idempotent POST cannot duplicate anything.
    pub fn was_not_sent(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Interrupted { .. }
        )
    }

    /// How long the server asked to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        self.api_error().and_then(|e| e.retry_after)
    }

    /// Removes `secret` from every text the server put in this error, in case a server
    /// echoes the API key back.
    pub(crate) fn scrubbed(mut self, secret: &str) -> Self {
        match &mut self {
            ClientError::Api { error, .. } => {
                scrub_str(&mut error.message, secret);
                if let Some(d) = &mut error.detail {
                    scrub_value(d, secret);
                }
            }
            ClientError::StreamError { error, .. } => {
                scrub_str(&mut error.message, secret);
                scrub_str(&mut error.ref_id, secret);
                if let Some(d) = &mut error.detail {
                    scrub_value(d, secret);
                }
            }
            _ => {}
        }
        self
    }

    /// Classifies a reqwest failure of `endpoint`.
    pub(crate) fn from_reqwest(endpoint: &str, source: reqwest::Error) -> Self {
        let endpoint = endpoint.to_string();
        if source.is_connect() {
            ClientError::Connect { endpoint, source }
        } else {
            ClientError::Transport { endpoint, source }
        }
    }
}

fn scrub_str(s: &mut String, secret: &str) {
    if !secret.is_empty() && s.contains(secret) {
        *s = s.replace(secret, "<redacted>");
    }
}

fn scrub_value(v: &mut Value, secret: &str) {
    match v {
        Value::String(s) => scrub_str(s, secret),
        Value::Array(items) => items.iter_mut().for_each(|i| scrub_value(i, secret)),
        Value::Object(map) => {
            if map.keys().any(|k| k.contains(secret)) {
                *map = std::mem::take(map)
                    .into_iter()
                    .map(|(mut k, v)| {
                        scrub_str(&mut k, secret);
                        (k, v)
                    })
                    .collect();
            }
            map.values_mut().for_each(|i| scrub_value(i, secret));
        }
        _ => {}
    }
}

/// Builds the error of a non-2xx answer from its status, headers and body.
///
/// Reads `{"type":"error","error":{…}}`, the looser `{"error":{…}}`, FastAPI's
/// `{"detail":[{loc,msg,type}]}` and `{"detail":"…"}`; anything else keeps a short excerpt.
pub(crate) fn api_error_from_parts(
    status: u16,
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
) -> ApiError {
    let retry_after = super::retry::retry_after(headers, std::time::SystemTime::now());
    let mut err = ApiError {
        status,
        message: String::new(),
        ref_id: None,
        detail: None,
        retry_after,
    };
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut map)) => {
            if let Some(obj) = map.get("error").filter(|v| v.is_object()) {
                if let Ok(e) = serde_json::from_value::<ErrorObject>(obj.clone()) {
                    err.message = e.message;
                    err.ref_id = Some(e.ref_id).filter(|r| !r.is_empty());
                    err.detail = e.detail.or_else(|| obj.get("details").cloned());
                }
            } else if let Some(detail) = map.remove("detail") {
                err.message = validation_message(&detail);
                err.detail = Some(detail);
            }
        }
        Ok(_) | Err(_) => {
            let text = String::from_utf8_lossy(body);
            err.message = excerpt(text.trim(), 300);
        }
    }
    if err.message.is_empty() {
        err.message = "(no message)".to_string();
    }
    err
}

/// One line from a FastAPI `detail`: `loc.path: msg` per issue, joined with `; `.
fn validation_message(detail: &Value) -> String {
    if let Value::String(s) = detail {
        return s.clone();
    }
    match serde_json::from_value::<HttpValidationError>(serde_json::json!({ "detail": detail })) {
        Ok(v) => v
            .detail
            .iter()
            .map(|issue| {
                let loc = issue
                    .loc
                    .iter()
                    .map(|p| match p {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(".");
                if loc.is_empty() {
                    issue.msg.clone()
                } else {
                    format!("{loc}: {}", issue.msg)
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => excerpt(&detail.to_string(), 300),
    }
}

fn excerpt(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn parses_error_response_bodies() {
        let body = br#"{"type":"error","error":{"ref_id":"r-1","message":"TaskGroup not found","detail":null}}"#;
        let e = api_error_from_parts(404, &HeaderMap::new(), body);
        assert_eq!(e.message, "TaskGroup not found");
        assert_eq!(e.ref_id.as_deref(), Some("r-1"));
        assert_eq!(
            e.to_string(),
            "HTTP 404 Not Found: TaskGroup not found (ref_id r-1)"
        );
        let e = api_error_from_parts(
            402,
            &HeaderMap::new(),
            br#"{"error":{"message":"no credit"}}"#,
        );
        assert_eq!((e.message.as_str(), e.ref_id), ("no credit", None));
    }

    #[test]
    fn parses_fastapi_validation_bodies() {
        let body = br#"{"detail":[{"loc":["body","inputs",0,"processor"],"msg":"Field required","type":"missing"}]}"#;
        let e = api_error_from_parts(422, &HeaderMap::new(), body);
        assert_eq!(e.message, "body.inputs.0.processor: Field required");
        assert!(e.detail.as_ref().is_some_and(Value::is_array));
        let e = api_error_from_parts(422, &HeaderMap::new(), br#"{"detail":"bad"}"#);
        assert_eq!(e.message, "bad");
    }

    #[test]
    fn non_json_bodies_and_retry_after() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        let e = api_error_from_parts(503, &h, b"upstream down");
        assert_eq!(e.message, "upstream down");
        assert_eq!(e.retry_after, Some(Duration::from_secs(3)));
        let e = api_error_from_parts(500, &HeaderMap::new(), b"");
        assert_eq!(e.message, "(no message)");
    }

    #[test]
    fn echoed_secrets_are_scrubbed() {
        let body = br#"{"type":"error","error":{"ref_id":"r","message":"bad key sk-123","detail":{"sk-123":["sk-123"]}}}"#;
        let err = ClientError::Api {
            endpoint: "GET /x".into(),
            error: Box::new(api_error_from_parts(401, &HeaderMap::new(), body)),
        }
        .scrubbed("sk-123");
        let text = format!("{err} {err:?}");
        assert!(!text.contains("sk-123"), "{text}");
        assert!(text.contains("bad key <redacted>"), "{text}");
    }

    #[test]
    fn classification() {
        let api = |status| ClientError::Api {
            endpoint: "GET /x".into(),
            error: Box::new(ApiError {
                status,
                message: "m".into(),
                ref_id: None,
                detail: None,
                retry_after: None,
            }),
        };
        for s in [408, 429, 500, 502, 503] {
            assert!(api(s).is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 422] {
            assert!(!api(s).is_retryable(), "{s}");
        }
        assert!(api(401).is_auth() && api(403).is_auth() && !api(404).is_auth());
        assert_eq!(api(404).status(), Some(404));
    }
}
