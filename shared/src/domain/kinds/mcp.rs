//! `mcp.call`'s input and output (docs/mcp.md): one tool call on a remote MCP server.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{http::HttpAuth, input::KindInput};
use crate::domain::FieldError;

/// Longest `timeout_ms`: five minutes (as `http.request`).
pub const MAX_TIMEOUT_MS: u64 = 300_000;

/// `mcp.call`: call `tool` with `arguments` on the MCP server at `server` (streamable HTTP).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct McpCallInput {
    /// The server's MCP endpoint: an `http` or `https` URL (e.g. `https://host/mcp`).
    #[schema(
        min_length = 1,
        max_length = 2048,
        pattern = "^[hH][tT][tT][pP][sS]?://"
    )]
    pub server: String,
    /// The tool's name, as the server's `tools/list` gives it.
    #[schema(min_length = 1, max_length = 128)]
    pub tool: String,
    /// The tool's arguments (default `{}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object, nullable = false)]
    pub arguments: Option<Map<String, Value>>,
    /// Extra request headers (at most 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub headers: Option<BTreeMap<String, String>>,
    /// Credentials from a namespace secret, as `http.request`'s `auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub auth: Option<HttpAuth>,
    /// The whole exchange (default 60,000, at most 300,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 300000)]
    pub timeout_ms: Option<u64>,
}

/// Where an MCP tool lives: `mcp.call`'s input without `tool` and `arguments` (what
/// `POST /v1/orchestrate` takes in mode `mcp`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct McpServer {
    /// The server's MCP endpoint: an `http` or `https` URL (e.g. `https://host/mcp`).
    #[schema(
        min_length = 1,
        max_length = 2048,
        pattern = "^[hH][tT][tT][pP][sS]?://"
    )]
    pub server: String,
    /// Extra request headers (at most 20; names of letters, digits, '-' and '_').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub headers: Option<BTreeMap<String, String>>,
    /// Credentials from a namespace secret, as `http.request`'s `auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub auth: Option<HttpAuth>,
    /// The whole exchange in ms (default 60,000, at most 300,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 300000)]
    pub timeout_ms: Option<u64>,
}

impl McpServer {
    /// The `mcp.call` input that calls `tool` with `arguments` on this server.
    pub fn call(self, tool: &str, arguments: Map<String, Value>) -> McpCallInput {
        McpCallInput {
            server: self.server,
            tool: tool.to_string(),
            arguments: Some(arguments),
            headers: self.headers,
            auth: self.auth,
            timeout_ms: self.timeout_ms,
        }
    }
}

impl McpCallInput {
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms.unwrap_or(60_000)
    }
}

impl KindInput for McpCallInput {
    fn check(&self) -> Result<(), FieldError> {
        crate::outbound::parse_url(&self.server)
            .map_err(|e| FieldError::new("server", e.to_string()))?;
        if self.headers.as_ref().is_some_and(|h| h.len() > 20) {
            return Err(FieldError::new("headers", "at most 20 entries"));
        }
        for name in self.headers.iter().flat_map(|h| h.keys()) {
            super::http::check_header_name(name, self.auth.is_some())?;
            let lower = name.to_ascii_lowercase();
            if lower.starts_with("mcp-") || lower == "content-type" || lower == "accept" {
                return Err(FieldError::new(
                    format!("headers.{name}"),
                    "is set by the MCP transport",
                ));
            }
        }
        Ok(())
    }
}

/// `mcp.call`'s published schema: the derived one, with header names and `auth`'s forms.
pub fn mcp_schema() -> Value {
    use serde_json::json;
    let mut s = super::input::schema::<McpCallInput>();
    s["properties"]["headers"]["propertyNames"] = json!({"pattern": "^[A-Za-z0-9_-]+$"});
    s["properties"]["headers"]["maxProperties"] = json!(20);
    s["properties"]["auth"] = super::http::http_schema()["properties"]["auth"].clone();
    s
}

/// `mcp.call`'s output: the tool's result as the server gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct McpCallOutput {
    /// The result's content blocks (`text`, `image`, `resource_link`, …).
    #[schema(value_type = Vec<Object>)]
    pub content: Vec<Value>,
    /// The result's structured content, when the tool gave one.
    #[serde(
        rename = "structuredContent",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<Object>)]
    pub structured_content: Option<Value>,
    /// Always false in an output: a tool that answers `isError` fails the job.
    #[serde(rename = "isError")]
    pub is_error: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::kinds::input;
    use serde_json::json;

    #[test]
    fn inputs_name_the_bad_field() {
        let field = |v| input::parse::<McpCallInput>(&v).err().map(|e| e.field);
        assert_eq!(
            field(json!({"server": "https://x.test/mcp", "tool": "add", "arguments": {"a": 1}})),
            None
        );
        assert_eq!(
            field(json!({"server": "ftp://x", "tool": "t"})),
            Some("server".into())
        );
        assert_eq!(
            field(json!({"server": "https://x", "tool": ""})),
            Some("tool".into())
        );
        assert_eq!(
            field(json!({"server": "https://x", "tool": "t", "headers": {"Mcp-Session-Id": "1"}})),
            Some("headers.Mcp-Session-Id".into())
        );
        assert_eq!(
            field(json!({"server": "https://x", "tool": "t", "arguments": [1]})),
            Some("arguments".into())
        );
    }
}
