//! `http.request`'s input and output (docs/http.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::input::KindInput;
use crate::domain::FieldError;

/// Longest `timeout_ms`: five minutes.
pub const MAX_TIMEOUT_MS: u64 = 300_000;
/// Most response bytes kept in the output (the default and the most `max_response_bytes` may
/// ask, unless the body goes to an artifact).
pub const MAX_RESPONSE_BYTES: u64 = 10 * 1024 * 1024;
/// Most bytes a response streamed into an artifact may have.
pub const MAX_DOWNLOAD_BYTES: u64 = 1024 * 1024 * 1024;

/// The methods `http.request` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    #[default]
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Options => "OPTIONS",
        }
    }
}

/// Credentials from a namespace secret (`/v1/secrets`), read by the worker when it sends: the
/// value never appears in the job's input or history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum HttpAuth {
    /// `Authorization: Bearer <the secret>`.
    Bearer {
        #[schema(min_length = 1, max_length = 100)]
        secret: String,
    },
    /// `Authorization: Basic base64(<username>:<the secret>)`.
    Basic {
        #[schema(min_length = 1, max_length = 200)]
        username: String,
        #[schema(min_length = 1, max_length = 100)]
        secret: String,
    },
}

/// How the response body becomes the output's `body`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ResponseAs {
    /// Parsed as JSON (a body that is not JSON fails the job with `invalid_response`).
    Json,
    /// As text (lossy UTF-8).
    Text,
    /// Streamed into the job's artifact `artifact_name`, with progress, not into the output
    /// (a large file: up to `max_response_bytes`, at most 1 GiB).
    Artifact,
}

/// `http.request`: one HTTP call through the outbound guard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpRequestInput {
    /// Default `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub method: Option<HttpMethod>,
    /// An `http` or `https` URL.
    #[schema(
        min_length = 1,
        max_length = 2048,
        pattern = "^[hH][tT][tT][pP][sS]?://"
    )]
    pub url: String,
    /// Request headers (at most 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub headers: Option<BTreeMap<String, String>>,
    /// Query parameters added to the URL's (at most 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub query: Option<BTreeMap<String, String>>,
    /// A text body (Content-Type default `text/plain; charset=utf-8`). At most one of `body`,
    /// `json` and `form`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 1048576)]
    pub body: Option<String>,
    /// A JSON body (Content-Type `application/json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub json: Option<Value>,
    /// A form body (`application/x-www-form-urlencoded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub form: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub auth: Option<HttpAuth>,
    /// The whole call: connect, send, read the response (default 30,000, at most 300,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 300000)]
    pub timeout_ms: Option<u64>,
    /// Statuses that succeed (default: any 2xx). Another status fails the job: retried for
    /// 408, 429 and 5xx, not for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_items = 1, max_items = 50)]
    pub expect_status: Option<Vec<u16>>,
    /// `json` or `text` (default: `json` when the response says it is JSON, else `text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub response: Option<ResponseAs>,
    /// Response bytes read at most (default and most: 10 MiB; with `response: artifact`,
    /// default and most 1 GiB); a longer body fails the job with `response_too_large`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1073741824)]
    pub max_response_bytes: Option<u64>,
    /// With `response: artifact`: the artifact's name (default `response.bin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        nullable = false,
        min_length = 1,
        max_length = 128,
        pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]*$"
    )]
    pub artifact_name: Option<String>,
    /// A token bucket for the host, shared by every worker: at most `count` calls per
    /// `period_s` on average, `burst` of them back to back. A call that finds no token waits
    /// for one (up to 2 s in place, longer as a deferral that uses no attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub rate_limit: Option<RateLimit>,
}

/// `http.request`'s `rate_limit` (docs/http.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Calls per period (1-100,000).
    #[schema(minimum = 1, maximum = 100000)]
    pub count: u32,
    /// The period in seconds (1-86,400; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 86400)]
    pub period_s: Option<u32>,
    /// Calls that may go back to back after a quiet spell (1-100,000; default 1: evenly
    /// spaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 100000)]
    pub burst: Option<u32>,
}

impl RateLimit {
    /// The time between two calls, in milliseconds.
    pub fn interval_ms(&self) -> f64 {
        self.period_s.unwrap_or(1) as f64 * 1000.0 / self.count.max(1) as f64
    }
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(1)
    }
    fn check(&self) -> Result<(), FieldError> {
        if !(1..=100_000).contains(&self.count) {
            return Err(FieldError::new(
                "rate_limit.count",
                "must be between 1 and 100000",
            ));
        }
        if self.period_s.is_some_and(|p| !(1..=86_400).contains(&p)) {
            return Err(FieldError::new(
                "rate_limit.period_s",
                "must be between 1 and 86400",
            ));
        }
        if self.burst.is_some_and(|b| !(1..=100_000).contains(&b)) {
            return Err(FieldError::new(
                "rate_limit.burst",
                "must be between 1 and 100000",
            ));
        }
        Ok(())
    }
}

impl HttpRequestInput {
    pub fn method(&self) -> HttpMethod {
        self.method.unwrap_or_default()
    }
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms.unwrap_or(30_000)
    }
    pub fn max_response_bytes(&self) -> u64 {
        self.max_response_bytes.unwrap_or(if self.to_artifact() {
            MAX_DOWNLOAD_BYTES
        } else {
            MAX_RESPONSE_BYTES
        })
    }
    /// Whether the body goes to an artifact.
    pub fn to_artifact(&self) -> bool {
        self.response == Some(ResponseAs::Artifact)
    }
    pub fn artifact_name(&self) -> &str {
        self.artifact_name.as_deref().unwrap_or("response.bin")
    }
    /// Whether `status` is one that succeeds.
    pub fn expected(&self, status: u16) -> bool {
        match &self.expect_status {
            Some(list) => list.contains(&status),
            None => (200..300).contains(&status),
        }
    }
}

impl KindInput for HttpRequestInput {
    fn check(&self) -> Result<(), FieldError> {
        crate::outbound::parse_url(&self.url).map_err(|e| FieldError::new("url", e.to_string()))?;
        let bodies = [
            self.body.is_some(),
            self.json.is_some(),
            self.form.is_some(),
        ];
        if bodies.iter().filter(|b| **b).count() > 1 {
            return Err(FieldError::new(
                if self.form.is_some() { "form" } else { "json" },
                "give at most one of `body`, `json` and `form`",
            ));
        }
        for (field, map) in [("headers", &self.headers), ("query", &self.query)] {
            if map.as_ref().is_some_and(|m| m.len() > 50) {
                return Err(FieldError::new(field, "at most 50 entries"));
            }
        }
        for name in self.headers.iter().flat_map(|h| h.keys()) {
            check_header_name(name, self.auth.is_some())?;
        }
        if !self.to_artifact() {
            if self.artifact_name.is_some() {
                return Err(FieldError::new(
                    "artifact_name",
                    "names the artifact of `response: artifact`",
                ));
            }
            if self
                .max_response_bytes
                .is_some_and(|n| n > MAX_RESPONSE_BYTES)
            {
                return Err(FieldError::new(
                    "max_response_bytes",
                    "at most 10 MiB (10485760) in the output; `response: artifact` takes up to 1 GiB",
                ));
            }
        }
        if let Some(i) = self
            .expect_status
            .iter()
            .flatten()
            .position(|s| !(100..=599).contains(s))
        {
            return Err(FieldError::new(
                format!("expect_status[{i}]"),
                "must be an HTTP status (100-599)",
            ));
        }
        if let Some(rate) = &self.rate_limit {
            rate.check()?;
        }
        Ok(())
    }
}

/// A header name an input gives (`headers.<name>`): letters, digits, `-` and `_`, and not
/// `Authorization` when `auth` sets it. Shared by the kinds that call out with headers.
pub fn check_header_name(name: &str, has_auth: bool) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    if !ok {
        return Err(FieldError::new(
            format!("headers.{name}"),
            "is not a header name (letters, digits, '-' and '_')",
        ));
    }
    if has_auth && name.eq_ignore_ascii_case("authorization") {
        return Err(FieldError::new(
            format!("headers.{name}"),
            "`auth` sets Authorization; give one of them",
        ));
    }
    Ok(())
}

/// `http.request`'s published schema: the derived one, with what serde's types cannot say
/// (header names, status ranges, at most one body).
pub fn http_schema() -> Value {
    use serde_json::json;
    let mut s = super::input::schema::<HttpRequestInput>();
    s["properties"]["headers"]["propertyNames"] = json!({"pattern": "^[A-Za-z0-9_-]+$"});
    s["properties"]["headers"]["maxProperties"] = json!(50);
    s["properties"]["query"]["maxProperties"] = json!(50);
    s["properties"]["expect_status"]["items"] =
        json!({"type": "integer", "minimum": 100, "maximum": 599});
    // Each form of `auth` with exactly its fields (serde refuses others).
    let name = json!({"type": "string", "minLength": 1, "maxLength": 100});
    s["properties"]["auth"] = json!({"oneOf": [
        {"type": "object", "required": ["type", "secret"], "additionalProperties": false,
         "properties": {"type": {"const": "bearer"}, "secret": name}},
        {"type": "object", "required": ["type", "username", "secret"], "additionalProperties": false,
         "properties": {"type": {"const": "basic"}, "secret": name,
                        "username": {"type": "string", "minLength": 1, "maxLength": 200}}}
    ]});
    // Without `response: artifact`: at most 10 MiB, and no artifact name.
    s["if"] = json!({"properties": {"response": {"const": "artifact"}}, "required": ["response"]});
    s["else"] = json!({"properties": {"max_response_bytes": {"maximum": MAX_RESPONSE_BYTES}},
                       "not": {"required": ["artifact_name"]}});
    s["not"] = json!({"anyOf": [
        {"required": ["body", "json"]},
        {"required": ["body", "form"]},
        {"required": ["json", "form"]}
    ]});
    s
}

/// `http.request`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HttpRequestOutput {
    pub status: u16,
    /// The response's headers (names in lower case; repeated ones joined with `, `).
    pub headers: BTreeMap<String, String>,
    /// The body: parsed JSON, or text (`null` for an empty body, or when it went to an
    /// artifact).
    #[schema(value_type = Object)]
    pub body: Value,
    /// With `response: artifact`: the stored body (also listed in the job's artifacts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub artifact: Option<crate::domain::job::Artifact>,
    /// The URL that answered (after redirects).
    pub url: String,
    pub duration_ms: f64,
    /// How long this attempt waited for the host's `rate_limit` before sending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_wait_ms: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::kinds::input;
    use serde_json::json;

    #[test]
    fn inputs_name_the_bad_field() {
        let field = |v| input::parse::<HttpRequestInput>(&v).err().map(|e| e.field);
        assert_eq!(field(json!({"url": "https://example.com/a"})), None);
        assert_eq!(
            field(
                json!({"url": "https://x.test", "method": "POST", "json": {"a": 1},
                         "auth": {"type": "bearer", "secret": "tok"}})
            ),
            None
        );
        assert_eq!(field(json!({"url": "ftp://x"})), Some("url".into()));
        assert_eq!(
            field(json!({"url": "https://x", "method": "GRAB"})),
            Some("method".into())
        );
        assert_eq!(
            field(json!({"url": "https://x", "body": "a", "json": {}})),
            Some("json".into())
        );
        assert_eq!(
            field(json!({"url": "https://x", "headers": {"bad name": "v"}})),
            Some("headers.bad name".into())
        );
        assert_eq!(
            field(
                json!({"url": "https://x", "headers": {"Authorization": "x"},
                         "auth": {"type": "bearer", "secret": "t"}})
            ),
            Some("headers.Authorization".into())
        );
        assert_eq!(
            field(json!({"url": "https://x", "expect_status": [200, 700]})),
            Some("expect_status[1]".into())
        );
        assert_eq!(
            field(json!({"url": "https://x", "timeout_ms": 300001})),
            Some("timeout_ms".into())
        );
    }
}
