//! JSON-RPC 2.0 messages of the Model Context Protocol, as the server reads and writes them.

use serde_json::{json, Value};

/// Protocol revisions this server speaks (the `initialize` handshake), newest first.
pub const VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
/// The API key lacks the role the method needs (implementation-defined range).
pub const FORBIDDEN: i64 = -32001;
/// `resources/read` of a URI that names nothing (the code the specification uses).
pub const RESOURCE_NOT_FOUND: i64 = -32002;

/// A JSON-RPC error object.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }
}

/// API errors become JSON-RPC errors; an internal one says nothing of its cause (it is logged).
impl From<crate::error::ApiError> for RpcError {
    fn from(e: crate::error::ApiError) -> Self {
        use crate::error::ApiError as E;
        match e {
            E::Forbidden(m) => RpcError::new(FORBIDDEN, m),
            E::NotFound(m) => RpcError::new(RESOURCE_NOT_FOUND, m),
            e @ (E::BadRequest(_) | E::Validation { .. } | E::PayloadTooLarge(_)) => {
                RpcError::invalid_params(e.to_string())
            }
            E::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "mcp request failed");
                RpcError::new(INTERNAL_ERROR, "internal error")
            }
            e => RpcError::new(INTERNAL_ERROR, e.to_string()),
        }
    }
}

/// One message a client POSTed.
#[derive(Debug)]
pub struct Incoming {
    /// Absent for notifications (and responses to server requests, which this server never
    /// makes).
    pub id: Option<Value>,
    pub method: Option<String>,
    pub params: Value,
}

impl Incoming {
    pub fn parse(body: &[u8]) -> Result<Incoming, RpcError> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| RpcError::new(PARSE_ERROR, format!("not JSON: {e}")))?;
        let Value::Object(m) = v else {
            return Err(RpcError::new(
                INVALID_REQUEST,
                "expected one JSON-RPC message (an object); batches are not supported",
            ));
        };
        if m.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Err(RpcError::new(INVALID_REQUEST, "`jsonrpc` must be \"2.0\""));
        }
        let id = m.get("id").filter(|v| !v.is_null()).cloned();
        if id
            .as_ref()
            .is_some_and(|i| !i.is_string() && !i.is_i64() && !i.is_u64())
        {
            return Err(RpcError::new(
                INVALID_REQUEST,
                "`id` must be a string or an integer",
            ));
        }
        Ok(Incoming {
            id,
            method: m.get("method").and_then(Value::as_str).map(str::to_string),
            params: m.get("params").cloned().unwrap_or_else(|| json!({})),
        })
    }

    /// The request's `_meta.progressToken`, when it asks for progress.
    pub fn progress_token(&self) -> Option<Value> {
        self.params
            .pointer("/_meta/progressToken")
            .filter(|t| t.is_string() || t.is_number())
            .cloned()
    }
}

/// The response to request `id`.
pub fn response(id: &Value, reply: Result<Value, RpcError>) -> Value {
    match reply {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(e) => json!({"jsonrpc": "2.0", "id": id,
                         "error": {"code": e.code, "message": e.message}}),
    }
}

/// The revision to answer an `initialize` that asked for `asked`: the same when known, else
/// the newest (the client then decides whether it can go on).
pub fn negotiate(asked: Option<&str>) -> &'static str {
    VERSIONS
        .iter()
        .find(|v| Some(**v) == asked)
        .copied()
        .unwrap_or(VERSIONS[0])
}

/// A `notifications/progress` for `token`.
pub fn progress(
    token: &Value,
    progress: f64,
    total: Option<f64>,
    message: Option<String>,
) -> Value {
    let mut params = json!({"progressToken": token, "progress": progress});
    if let Some(t) = total {
        params["total"] = json!(t);
    }
    if let Some(m) = message {
        params["message"] = json!(m);
    }
    json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_versions_are_echoed_and_others_get_the_newest() {
        assert_eq!(negotiate(Some("2025-06-18")), "2025-06-18");
        assert_eq!(negotiate(Some("2099-01-01")), VERSIONS[0]);
        assert_eq!(negotiate(None), VERSIONS[0]);
    }

    #[test]
    fn a_batch_or_a_message_without_jsonrpc_is_an_invalid_request() {
        assert_eq!(Incoming::parse(b"[]").unwrap_err().code, INVALID_REQUEST);
        assert_eq!(
            Incoming::parse(br#"{"id": 1, "method": "ping"}"#)
                .unwrap_err()
                .code,
            INVALID_REQUEST
        );
        assert_eq!(Incoming::parse(b"{").unwrap_err().code, PARSE_ERROR);
        let m = Incoming::parse(
            br#"{"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                 "params": {"_meta": {"progressToken": "t"}}}"#,
        )
        .unwrap();
        assert_eq!(m.progress_token(), Some(json!("t")));
        assert_eq!(m.id, Some(json!(7)));
    }
}
