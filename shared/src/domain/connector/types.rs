//! The connector types (`GET /v1/connector-types`): each one's typed config, from which its
//! JSON Schema is derived and against which a definition is checked, an example, where it takes
//! secrets, and what its cursor holds. And `connector.fetch`'s input.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::storage;
use crate::domain::{
    kinds::input::{self, KindInput},
    FieldError,
};

/// A connector type.
#[derive(Debug, Clone, Copy)]
pub struct ConnectorType {
    pub name: &'static str,
    pub description: &'static str,
    /// Check a config (errors name the field within it).
    pub validate: fn(&Value) -> Result<(), FieldError>,
    /// The config's JSON Schema.
    pub schema: fn() -> Value,
    /// A config that works (documentation and `GET /v1/connector-types`).
    pub example: fn() -> Value,
    /// Whether a secret may be put at this place of the config.
    pub secret_place: fn(&str) -> bool,
    /// The places, in words.
    pub secret_places: &'static str,
    /// The places, as a regular expression (the published schema of `secrets`' keys); empty:
    /// the type takes no secrets.
    pub secret_pattern: &'static str,
    /// What the cursor holds, in words.
    pub cursor: &'static str,
    /// The secret places a (valid) config cannot do without: the credential of an `auth`
    /// method. A connector without them is refused when it is saved.
    pub needs_secrets: fn(&Value) -> Option<&'static str>,
}

/// Every connector type of this build.
pub const TYPES: &[ConnectorType] = &[
    ConnectorType {
        name: "rss",
        description: "An RSS 0.9x/1.0/2.0, Atom or JSON Feed feed over HTTP(S), parsed with the \
                  feed-rs library. Items are the feed's entries; new ones are those whose \
                  content was never returned before.",
        validate: input::check::<RssConfig>,
        schema: rss_schema,
        example: || json!({"url": "https://blog.rust-lang.org/feed.xml"}),
        secret_place: header_place,
        secret_places: "`headers.<Header-Name>` (e.g. `headers.Authorization`)",
        secret_pattern: "^headers\\.[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$",
        cursor: "{etag, last_modified, newest}: the validators of the last response (sent back as \
             If-None-Match / If-Modified-Since, so an unchanged feed answers 304) and the newest \
             item date seen",
        needs_secrets: |_| None,
    },
    ConnectorType {
        name: "web",
        description:
            "A web page over HTTP(S), parsed like a browser does (html5ever) and read with \
                  CSS selectors: the page as one item, or one item per element `item` selects, \
                  with title, link (relative URLs resolved), content and named lists. \
                  robots.txt is obeyed and requests to one host are spaced by `delay_ms` (or \
                  the site's Crawl-delay, if longer).",
        validate: input::check::<WebConfig>,
        schema: web_schema,
        example: || {
            json!({"url": "https://blog.rust-lang.org/", "item": "article, li.post",
                       "title": "h2, h3", "link": "a[href]"})
        },
        secret_place: header_place,
        secret_places: "`headers.<Header-Name>` (e.g. `headers.Authorization`)",
        secret_pattern: "^headers\\.[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$",
        cursor: "{etag, last_modified}: the validators of the last response (an unchanged page \
             answers 304)",
        needs_secrets: |_| None,
    },
    ConnectorType {
        name: "api",
        description: "A JSON API over HTTP(S): the items of each page (a JSON Pointer to the \
                      array), page after page (Link header, a cursor in the page, a page number \
                      or an offset), with bearer, basic, API-key header or OAuth2 \
                      client-credentials authentication. New items are those whose JSON was \
                      never returned before.",
        validate: input::check::<ApiConfig>,
        schema: api_schema,
        example: || {
            json!({"url": "https://api.github.com/repos/rust-lang/rust/releases",
                   "pagination": {"type": "link"}, "max_pages": 3,
                   "title": "/name", "link": "/html_url", "auth": {"type": "bearer"}})
        },
        secret_place: api_secret_place,
        secret_places: "`headers.<Header-Name>`, and the credential of `auth`: `auth.token` \
                        (bearer), `auth.password` (basic), `auth.value` (header), \
                        `auth.client_secret` (oauth2)",
        secret_pattern: "^(headers\\.[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}|auth\\.(token|password|value|client_secret))$",
        cursor: "{cursor}: with `pagination.resume`, the last cursor of a cursor-paginated API; \
                 otherwise every fetch walks from the first page",
        needs_secrets: auth_secret,
    },
    ConnectorType {
        name: "graphql",
        description: "A GraphQL query over HTTP(S): the items at a JSON Pointer of the answer, \
                      page after page by the connection's end cursor (passed back as a query \
                      variable), with the `api` type's authentication. New items are those \
                      whose JSON was never returned before.",
        validate: input::check::<GraphqlConfig>,
        schema: graphql_schema,
        example: || {
            json!({"url": "https://api.github.com/graphql",
                   "query": "query($after: String) { repository(owner: \"rust-lang\", name: \"rust\") { issues(first: 50, after: $after) { nodes { id title url } pageInfo { endCursor hasNextPage } } } }",
                   "items": "/data/repository/issues/nodes",
                   "end_cursor": "/data/repository/issues/pageInfo/endCursor",
                   "has_next_page": "/data/repository/issues/pageInfo/hasNextPage",
                   "title": "/title", "link": "/url", "max_pages": 2, "auth": {"type": "bearer"}})
        },
        secret_place: api_secret_place,
        secret_places: "`headers.<Header-Name>`, and the credential of `auth` (as for `api`)",
        secret_pattern: "^(headers\\.[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}|auth\\.(token|password|value|client_secret))$",
        cursor: "{cursor}: with `resume`, the last end cursor; otherwise every fetch starts at \
                 the first page",
        needs_secrets: auth_secret,
    },
    ConnectorType {
        name: "files",
        description: "Files in a directory the operator shares with the workers \
                      (`CAPIBARA_FILES_ROOT`; each namespace reads its own `<root>/<namespace>/`), \
                      matched by a glob, recursively. Types are detected from the content \
                      (infer) and the name; text is extracted from txt, md, html, json, csv, xml \
                      and pdf (pdf-extract). Items are the files; new ones are those modified \
                      since the newest seen whose content was never returned before.",
        validate: input::check::<storage::FilesConfig>,
        schema: storage::files_schema,
        example: || json!({"path": "reports", "glob": "**/*.{md,pdf}"}),
        secret_place: |_| false,
        secret_places: "none",
        secret_pattern: "",
        cursor: "{modified_after}: the newest modification time seen; older files are not read \
                 again",
        needs_secrets: |_| None,
    },
    ConnectorType {
        name: "s3",
        description: "Objects of an S3-compatible bucket (AWS S3, MinIO, R2, …) under a prefix, \
                      matched by a glob, read with the object_store library; text is extracted \
                      as for `files`. New items are objects modified since the newest seen whose \
                      content was never returned before.",
        validate: input::check::<storage::S3Config>,
        schema: storage::s3_schema,
        example: || json!({"bucket": "reports", "prefix": "2026/", "region": "eu-west-1"}),
        secret_place: storage::s3_secret_place,
        secret_places: "`auth.access_key_id`, `auth.secret_access_key` and `auth.session_token` \
                        (none: anonymous requests, for public buckets)",
        secret_pattern: "^auth\\.(access_key_id|secret_access_key|session_token)$",
        cursor: "{modified_after}: the newest object modification time seen; older objects are \
                 not read again",
        needs_secrets: |_| None,
    },
    ConnectorType {
        name: "imap",
        description: "The messages of one folder of an IMAP mailbox (async-imap; TLS, STARTTLS \
                      or plain), parsed with mailparse: subject, sender, date, the text body \
                      (HTML as text) and the headers; attachments are stored as artifacts of the \
                      fetch. New items are messages with a UID above the last listed (optionally \
                      unseen ones only); messages are never marked seen.",
        validate: input::check::<super::imap::ImapConfig>,
        schema: super::imap::imap_schema,
        example: || {
            json!({"host": "imap.example.com", "port": 993, "tls": "tls",
                   "username": "reports@example.com", "folder": "INBOX"})
        },
        secret_place: super::imap::imap_secret_place,
        secret_places: "`auth.password` (required)",
        secret_pattern: "^auth\\.password$",
        cursor: "{uidvalidity, last_uid}: the folder's UIDVALIDITY and the highest UID listed; a \
                 new UIDVALIDITY (the folder was rebuilt) lists the folder from the start",
        needs_secrets: super::imap::imap_needs_secrets,
    },
];

/// The type named `name`.
pub fn find(name: &str) -> Option<&'static ConnectorType> {
    TYPES.iter().find(|t| t.name == name)
}

/// The names of every type.
pub fn names() -> Vec<&'static str> {
    TYPES.iter().map(|t| t.name).collect()
}

/// A config's URL: http(s), a host, no user info (the rest is checked by
/// [`crate::outbound::parse_url`]).
pub const URL_PATTERN: &str = "^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[!#-~]*)?$";
/// An HTTP header name (a token).
pub const HEADER_NAME_PATTERN: &str = "^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$";
/// An HTTP header value: visible ASCII, spaces and tabs.
pub const HEADER_VALUE_PATTERN: &str = "^[\\t -~]*$";

/// The `rss` config's schema: derived, with what the derivation cannot state.
fn rss_schema() -> Value {
    http_schema(input::schema::<RssConfig>())
}

/// What an HTTP type's derived schema does not state: the URL's shape, the headers' names and
/// values.
fn http_schema(mut s: Value) -> Value {
    s["properties"]["url"]["pattern"] = json!(URL_PATTERN);
    s["properties"]["headers"]["propertyNames"] = json!({"pattern": HEADER_NAME_PATTERN});
    s["properties"]["headers"]["additionalProperties"] =
        json!({"type": "string", "pattern": HEADER_VALUE_PATTERN, "maxLength": 8192});
    s
}

/// `connector.fetch`'s input schema: a connector by id, or an inline connector of one of the
/// types (its config checked against the type's schema).
pub fn fetch_schema() -> Value {
    fetch_schema_of(&names())
}

/// Families of connector types, as the seed endpoints `POST /v1/content/connectors/{family}`
/// name them, with the types of this build in each (none yet in some).
pub const FAMILIES: &[(&str, &[&str])] = &[
    ("web", &["rss", "web"]),
    ("api", &["api", "graphql"]),
    ("communication", &["imap"]),
    ("filesystem", &["files", "s3"]),
];

/// The types of `family`, if it is one.
pub fn family(name: &str) -> Option<&'static [&'static str]> {
    FAMILIES.iter().find(|(f, _)| *f == name).map(|(_, t)| *t)
}

/// [`fetch_schema`] with inline connectors of `types` only.
pub fn fetch_schema_of(types: &[&str]) -> Value {
    let derived = input::schema::<ConnectorFetchInput>();
    let mut common = derived["properties"].clone();
    for k in ["connector_id", "type", "config"] {
        common.as_object_mut().expect("properties").remove(k);
    }
    let mut by_id = common.clone();
    by_id["connector_id"] = derived["properties"]["connector_id"].clone();
    let mut variants = vec![json!({
        "title": "a connector",
        "type": "object",
        "properties": by_id,
        "required": ["connector_id"],
        "additionalProperties": false,
    })];
    for t in TYPES.iter().filter(|t| types.contains(&t.name)) {
        let mut p = common.clone();
        p["type"] = json!({"const": t.name});
        p["config"] = (t.schema)();
        variants.push(json!({
            "title": format!("an inline `{}` connector", t.name),
            "type": "object",
            "properties": p,
            "required": ["type", "config"],
            "additionalProperties": false,
        }));
    }
    json!({
        "description": derived.get("description").cloned().unwrap_or_else(|| json!("connector.fetch")),
        "oneOf": variants,
    })
}

fn header_place(place: &str) -> bool {
    place
        .strip_prefix("headers.")
        .is_some_and(valid_header_name)
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Default largest response a fetch reads.
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Default time one request may take.
pub const DEFAULT_TIMEOUT_S: u32 = 30;

/// Config of an `rss` connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RssConfig {
    /// The feed's http(s) URL. Private and loopback addresses are refused unless
    /// `CAPIBARA_OUTBOUND_ALLOW_PRIVATE=true`.
    #[schema(max_length = 2048)]
    pub url: String,
    /// Extra request headers. Secret values go in the connector's `secrets`
    /// (`headers.Authorization` → a secret's name), not here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Largest response read, in bytes (default 10 MiB, at most 100 MiB); a longer one fails
    /// the fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1024, maximum = 104_857_600, nullable = false)]
    pub max_bytes: Option<u64>,
    /// Seconds one request may take (default 30, 1-300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 300, nullable = false)]
    pub timeout_s: Option<u32>,
}

/// An HTTP type's URL (an http(s) URL: [`crate::outbound::parse_url`]) and headers.
fn check_http(url: &str, headers: &BTreeMap<String, String>) -> Result<(), FieldError> {
    crate::outbound::parse_url(url).map_err(|e| FieldError::new("url", e.to_string()))?;
    check_headers(headers)
}

/// Request headers: valid names, values of visible ASCII.
fn check_headers(headers: &BTreeMap<String, String>) -> Result<(), FieldError> {
    for (name, value) in headers {
        if !valid_header_name(name) {
            return Err(FieldError::new(
                format!("headers.{name}"),
                "is not a valid HTTP header name",
            ));
        }
        if value.len() > 8192
            || !value
                .bytes()
                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
        {
            return Err(FieldError::new(
                format!("headers.{name}"),
                "must be at most 8192 characters of visible ASCII, spaces and tabs",
            ));
        }
    }
    Ok(())
}

impl KindInput for RssConfig {
    fn check(&self) -> Result<(), FieldError> {
        check_http(&self.url, &self.headers)
    }
}

/// Config of a `web` connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// The page's http(s) URL. Private and loopback addresses are refused unless
    /// `CAPIBARA_OUTBOUND_ALLOW_PRIVATE=true`.
    #[schema(max_length = 2048)]
    pub url: String,
    /// CSS selector of the page's items (each match is one item); absent: the page is one item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_length = 1, max_length = 500)]
    pub item: Option<String>,
    /// CSS selector of an item's title (default: the first heading; for the whole page, its
    /// `<title>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_length = 1, max_length = 500)]
    pub title: Option<String>,
    /// CSS selector of an item's link (default `a[href]`; for the whole page, the page's URL):
    /// the first match's `href`, resolved against the page's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_length = 1, max_length = 500)]
    pub link: Option<String>,
    /// CSS selector of an item's content: the visible text of every match (default: the
    /// item's own text; for the whole page, `body`'s). Scripts and styles are left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_length = 1, max_length = 500)]
    pub content: Option<String>,
    /// Named lists: name → CSS selector; each list holds the text of every match in the item
    /// (or the page), in the item's `fields.<name>`. When the page is one item, `fields.links`
    /// lists every link of the page.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lists: BTreeMap<String, String>,
    /// Extra request headers (secret values go in the connector's `secrets`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Milliseconds between two requests of one worker to the page's host (default 1000, at
    /// most 60000); robots.txt's Crawl-delay wins when longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 60_000, nullable = false)]
    pub delay_ms: Option<u32>,
    /// Largest response read, in bytes (default 10 MiB, at most 100 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1024, maximum = 104_857_600, nullable = false)]
    pub max_bytes: Option<u64>,
    /// Seconds one request may take (default 30, 1-300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 300, nullable = false)]
    pub timeout_s: Option<u32>,
}

/// Default pause between two requests of one worker to one host (`web` connectors).
pub const DEFAULT_DELAY_MS: u32 = 1000;

impl KindInput for WebConfig {
    fn check(&self) -> Result<(), FieldError> {
        check_http(&self.url, &self.headers)?;
        for (field, sel) in [
            ("item", &self.item),
            ("title", &self.title),
            ("link", &self.link),
            ("content", &self.content),
        ] {
            if let Some(sel) = sel {
                check_selector(field, sel)?;
            }
        }
        if self.lists.len() > 20 {
            return Err(FieldError::new("lists", "at most 20 lists"));
        }
        for (name, sel) in &self.lists {
            if name.is_empty() || name.chars().count() > 64 {
                return Err(FieldError::new(
                    format!("lists.{name}"),
                    "names are 1-64 characters",
                ));
            }
            check_selector(&format!("lists.{name}"), sel)?;
        }
        Ok(())
    }
}

/// A CSS selector that parses (`scraper`'s parser, the one the worker uses).
fn check_selector(field: &str, sel: &str) -> Result<(), FieldError> {
    if sel.trim().is_empty() || sel.chars().count() > 500 {
        return Err(FieldError::new(field, "must be 1-500 characters"));
    }
    scraper::Selector::parse(sel)
        .map(drop)
        .map_err(|e| FieldError::new(field, format!("is not a CSS selector: {e}")))
}

/// The `web` config's schema: derived, with what the derivation cannot state. A selector's
/// syntax is checked when the connector is saved (`x-css-selector` marks those fields).
fn web_schema() -> Value {
    let mut s = http_schema(input::schema::<WebConfig>());
    s["properties"]["lists"]["maxProperties"] = json!(20);
    s["properties"]["lists"]["propertyNames"] = json!({"minLength": 1, "maxLength": 64});
    for f in ["item", "title", "link", "content"] {
        s["properties"][f]["x-css-selector"] = json!(true);
    }
    s
}

/// Config of an `api` connector: a JSON API over HTTP(S), page after page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The first page's http(s) URL. Private and loopback addresses are refused unless
    /// `CAPIBARA_OUTBOUND_ALLOW_PRIVATE=true`.
    #[schema(max_length = 2048)]
    pub url: String,
    /// JSON Pointer (RFC 6901) to the array of items in a page, e.g. `/data` (default: the page
    /// itself when it is an array, else the first of `/items`, `/data`, `/results`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 200, pattern = "^(/[^/]*)*$")]
    pub items: Option<String>,
    /// JSON Pointer within an item to its id (default `/id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 200, pattern = "^(/[^/]*)*$")]
    pub id: Option<String>,
    /// JSON Pointer within an item to its title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 200, pattern = "^(/[^/]*)*$")]
    pub title: Option<String>,
    /// JSON Pointer within an item to its URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 200, pattern = "^(/[^/]*)*$")]
    pub link: Option<String>,
    /// How to get the next page (default: one page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, inline)]
    pub pagination: Option<Pagination>,
    /// Pages read at most in one fetch (1-1000, default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000, nullable = false)]
    pub max_pages: Option<u32>,
    /// How to authenticate (the credential itself is a secret of the connector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, inline)]
    pub auth: Option<ApiAuth>,
    /// Extra request headers (secret values go in the connector's `secrets`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Largest page read, in bytes (default 10 MiB, at most 100 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1024, maximum = 104_857_600, nullable = false)]
    pub max_bytes: Option<u64>,
    /// Seconds one request may take (default 30, 1-300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 300, nullable = false)]
    pub timeout_s: Option<u32>,
}

/// How an `api` connector finds the next page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Pagination {
    /// The response's `Link: <…>; rel="next"` header (RFC 8288), as GitHub's API sends it.
    Link,
    /// A cursor in the page (`cursor`, a JSON Pointer such as `/meta/next_cursor`) sent back as
    /// the query parameter `param`; an absent, null or empty cursor ends the walk. With
    /// `resume`, the next fetch starts from the last cursor instead of the first page (APIs
    /// whose cursor means "after this point").
    Cursor {
        #[schema(max_length = 200, pattern = "^(/[^/]*)*$")]
        cursor: String,
        #[schema(min_length = 1, max_length = 100)]
        param: String,
        #[serde(default)]
        resume: bool,
    },
    /// A page number in the query parameter `param`, from `start` (default 1); a page with no
    /// items ends the walk.
    Page {
        #[schema(min_length = 1, max_length = 100)]
        param: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(nullable = false, minimum = 0)]
        start: Option<u64>,
    },
    /// An offset in the query parameter `param`, moved by the number of items each page held;
    /// `limit_param` = `limit` is sent with it when given. A page with no items ends the walk.
    Offset {
        #[schema(min_length = 1, max_length = 100)]
        param: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(nullable = false, min_length = 1, max_length = 100)]
        limit_param: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(nullable = false, minimum = 1, maximum = 10_000)]
        limit: Option<u32>,
    },
}

/// How an `api` connector authenticates. The credential is a secret of the connector, at the
/// place named.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApiAuth {
    /// `Authorization: Bearer <secret auth.token>`.
    Bearer,
    /// `Authorization: Basic` with `username` and the password `<secret auth.password>`.
    Basic {
        #[schema(max_length = 200)]
        username: String,
    },
    /// A header `name` holding `<secret auth.value>` (an API key).
    Header {
        #[schema(
            min_length = 1,
            max_length = 128,
            pattern = "^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$"
        )]
        name: String,
    },
    /// OAuth 2.0 client credentials (RFC 6749 §4.4): a token from `token_url` for `client_id`
    /// and `<secret auth.client_secret>` (sent with HTTP Basic), kept until it expires.
    Oauth2 {
        #[schema(max_length = 2048)]
        token_url: String,
        #[schema(min_length = 1, max_length = 500)]
        client_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(nullable = false, max_length = 1000)]
        scope: Option<String>,
    },
}

impl ApiAuth {
    /// Each method (its `type`) and the secret place it reads its credential from.
    pub const SECRETS: &[(&str, &str)] = &[
        ("bearer", "auth.token"),
        ("basic", "auth.password"),
        ("header", "auth.value"),
        ("oauth2", "auth.client_secret"),
    ];

    /// The secret place this method reads its credential from.
    pub fn secret_place(&self) -> &'static str {
        match self {
            ApiAuth::Bearer => "auth.token",
            ApiAuth::Basic { .. } => "auth.password",
            ApiAuth::Header { .. } => "auth.value",
            ApiAuth::Oauth2 { .. } => "auth.client_secret",
        }
    }
}

/// The credential an `api` or `graphql` config's `auth` needs (`auth.type` → its place).
fn auth_secret(config: &Value) -> Option<&'static str> {
    let method = config.get("auth")?.get("type")?.as_str()?;
    ApiAuth::SECRETS
        .iter()
        .find(|(m, _)| *m == method)
        .map(|(_, place)| *place)
}

impl KindInput for ApiConfig {
    fn check(&self) -> Result<(), FieldError> {
        check_http(&self.url, &self.headers)?;
        if let Some(ApiAuth::Oauth2 { token_url, .. }) = &self.auth {
            crate::outbound::parse_url(token_url)
                .map_err(|e| FieldError::new("auth.token_url", e.to_string()))?;
        }
        Ok(())
    }
}

fn api_secret_place(place: &str) -> bool {
    header_place(place)
        || [
            "auth.token",
            "auth.password",
            "auth.value",
            "auth.client_secret",
        ]
        .contains(&place)
}

/// What the derivation does not state of `auth`: a token URL is a URL, and the methods take
/// no other fields.
fn auth_rules(s: &mut Value) {
    token_urls(s);
    closed(&mut s["properties"]["auth"]);
}

/// Every `token_url` property under `v` is a URL.
fn token_urls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(t) = m.get_mut("properties").and_then(|p| p.get_mut("token_url")) {
                t["pattern"] = json!(URL_PATTERN);
            }
            m.values_mut().for_each(token_urls);
        }
        Value::Array(a) => a.iter_mut().for_each(token_urls),
        _ => {}
    }
}
/// Object schemas under `v` allow no other properties (serde's `deny_unknown_fields` on
/// the tagged enums, which the derivation does not state).
fn closed(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.contains_key("properties") && !m.contains_key("additionalProperties") {
                m.insert("additionalProperties".into(), json!(false));
            }
            m.values_mut().for_each(closed);
        }
        Value::Array(a) => a.iter_mut().for_each(closed),
        _ => {}
    }
}
/// The `api` config's schema: derived, with what the derivation cannot state.
fn api_schema() -> Value {
    let mut s = http_schema(input::schema::<ApiConfig>());
    auth_rules(&mut s);
    closed(&mut s["properties"]["pagination"]);
    s
}

/// Config of a `graphql` connector: a GraphQL query over HTTP(S), page after page by cursor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GraphqlConfig {
    /// The endpoint's http(s) URL (POST, `application/json`).
    #[schema(max_length = 2048)]
    pub url: String,
    /// The query. When `end_cursor` is given, it takes the cursor as the variable
    /// `cursor_variable` (`$after: String`), null on the first page.
    #[schema(min_length = 1, max_length = 100_000)]
    pub query: String,
    /// Variables sent with every page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, nullable = false)]
    pub variables: Option<serde_json::Map<String, Value>>,
    /// JSON Pointer to the array of items in the answer, e.g. `/data/repository/issues/nodes`.
    #[schema(max_length = 200, pattern = "^(/[^/]*)+$")]
    pub items: String,
    /// JSON Pointer to the page's end cursor (`…/pageInfo/endCursor`): absent, one page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 200, pattern = "^(/[^/]*)+$")]
    pub end_cursor: Option<String>,
    /// JSON Pointer to whether there is a next page (`…/pageInfo/hasNextPage`; default: there
    /// is while the cursor is not null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 200, pattern = "^(/[^/]*)+$")]
    pub has_next_page: Option<String>,
    /// The query variable that carries the cursor (default `after`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        nullable = false,
        min_length = 1,
        max_length = 100,
        pattern = "^[_A-Za-z][_0-9A-Za-z]*$"
    )]
    pub cursor_variable: Option<String>,
    /// Start the next fetch from the last cursor instead of the first page.
    #[serde(default)]
    pub resume: bool,
    /// JSON Pointers within an item to its id (default `/id`), title and URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 200, pattern = "^(/[^/]*)*$")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 200, pattern = "^(/[^/]*)*$")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 200, pattern = "^(/[^/]*)*$")]
    pub link: Option<String>,
    /// Pages read at most in one fetch (1-1000, default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000, nullable = false)]
    pub max_pages: Option<u32>,
    /// How to authenticate (as for `api`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, inline)]
    pub auth: Option<ApiAuth>,
    /// Extra request headers (secret values go in the connector's `secrets`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Largest answer read, in bytes (default 10 MiB, at most 100 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1024, maximum = 104_857_600, nullable = false)]
    pub max_bytes: Option<u64>,
    /// Seconds one request may take (default 30, 1-300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 300, nullable = false)]
    pub timeout_s: Option<u32>,
}

impl KindInput for GraphqlConfig {
    fn check(&self) -> Result<(), FieldError> {
        check_http(&self.url, &self.headers)?;
        if let Some(ApiAuth::Oauth2 { token_url, .. }) = &self.auth {
            crate::outbound::parse_url(token_url)
                .map_err(|e| FieldError::new("auth.token_url", e.to_string()))?;
        }
        Ok(())
    }
}

/// The `graphql` config's schema: the `api` rules.
fn graphql_schema() -> Value {
    let mut s = http_schema(input::schema::<GraphqlConfig>());
    auth_rules(&mut s);
    s
}

/// `connector.fetch`: the new items of a connector (or of an inline config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectorFetchInput {
    /// A connector of this namespace: only items it never returned come back, and its cursor
    /// advances with the job's success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub connector_id: Option<Uuid>,
    /// Instead of `connector_id`: a connector type, with `config`. Nothing is remembered
    /// between such fetches (every item is new).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub connector_type: Option<String>,
    /// The inline connector's config (with `type`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, nullable = false)]
    pub config: Option<Value>,
    /// Most new items one fetch returns (1-100000, default 1000); the rest come with the next
    /// fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100_000, nullable = false)]
    pub max_items: Option<u32>,
    /// Only items published or updated after this time (items without a date are kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub since: Option<DateTime<Utc>>,
    /// How many of the new items the output lists inline (0-100, default 10); all of them are
    /// in the `items.jsonl` artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 100, nullable = false)]
    pub inline_items: Option<u32>,
}

impl ConnectorFetchInput {
    pub const DEFAULT_MAX_ITEMS: u32 = 1000;
    pub const DEFAULT_INLINE_ITEMS: u32 = 10;
}

impl KindInput for ConnectorFetchInput {
    fn check(&self) -> Result<(), FieldError> {
        match (&self.connector_id, &self.connector_type, &self.config) {
            (Some(_), None, None) => Ok(()),
            (Some(_), _, _) => Err(FieldError::new(
                "connector_id",
                "give either `connector_id` or an inline `type` and `config`, not both",
            )),
            (None, Some(t), Some(config)) => {
                let ty = find(t).ok_or_else(|| {
                    FieldError::new(
                        "type",
                        format!(
                            "unknown connector type `{t}`; available: {}",
                            names().join(", ")
                        ),
                    )
                })?;
                (ty.validate)(config).map_err(|e| e.under("config"))
            }
            (None, None, Some(_)) => Err(FieldError::new("type", "an inline config needs `type`")),
            (None, _, None) => Err(FieldError::new(
                "connector_id",
                "give `connector_id`, or an inline `type` and `config`",
            )),
        }
    }
}

/// One item a fetch returns (a line of `items.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Item {
    /// The source's id of the item (a feed entry's id or GUID).
    pub id: String,
    /// Content hash (128 bits of SHA-256, hex) over what the item says, not its id: the same
    /// content is one item, whatever id it is published under.
    pub hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authors: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// What else the type reads (a `web` connector's named lists, a page's links).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, Vec<String>>,
    /// The source's own record, as it sent it (an `api` connector's item).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

impl Item {
    /// The hash of an item's content: title, url, summary and content, each length-prefixed.
    pub fn content_hash(
        title: Option<&str>,
        url: Option<&str>,
        summary: Option<&str>,
        content: Option<&str>,
    ) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [title, url, summary, content] {
            let p = part.unwrap_or("").trim();
            h.update((p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
        }
        hex::encode(&h.finalize()[..16])
    }
}

/// `connector.fetch`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConnectorFetchOutput {
    /// Items the source listed.
    pub fetched: u64,
    /// Items returned as new (all in `items.jsonl`).
    pub new_items: u64,
    /// The first `inline_items` new items.
    pub items: Vec<Item>,
    /// The artifact with every new item, one JSON object per line (absent when none is new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    /// The connector's cursor after this fetch.
    #[schema(value_type = Object)]
    pub cursor: Value,
    /// The source answered "not modified" (HTTP 304): nothing was downloaded or parsed.
    pub not_modified: bool,
    /// More new items than `max_items` were found; the rest come with the next fetch.
    pub more: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_inputs_name_a_connector_or_carry_a_valid_inline_config() {
        let ok = |v: Value| input::parse::<ConnectorFetchInput>(&v);
        assert!(ok(json!({"connector_id": Uuid::now_v7()})).is_ok());
        assert!(ok(json!({"type": "rss", "config": {"url": "http://x.test/f"}})).is_ok());
        let field = |v: Value| ok(v).unwrap_err().field;
        assert_eq!(field(json!({})), "connector_id");
        assert_eq!(
            field(json!({"type": "rss", "config": {"url": "file:///etc/passwd"}})),
            "config.url"
        );
        assert_eq!(field(json!({"type": "nope", "config": {}})), "type");
        assert_eq!(field(json!({"config": {"url": "http://x.test/"}})), "type");
        assert_eq!(
            field(json!({"connector_id": Uuid::now_v7(), "max_items": 0})),
            "max_items"
        );
        assert_eq!(
            field(
                json!({"type": "rss", "config": {"url": "http://x.test/", "headers": {"a b": "c"}}})
            ),
            "config.headers.a b"
        );
    }

    #[test]
    fn every_type_publishes_a_schema_and_an_example_that_passes_it() {
        for t in TYPES {
            let schema = (t.schema)();
            assert_eq!(schema["type"], "object", "{}", t.name);
            (t.validate)(&(t.example)()).unwrap();
            assert!(jsonschema::is_valid(&schema, &(t.example)()), "{}", t.name);
        }
        let api = api_schema();
        assert!(
            api.to_string().contains("token_url\":{")
                && api.to_string().matches(URL_PATTERN).count() >= 2,
            "{api}"
        );
        let closed = jsonschema::validator_for(&api).unwrap();
        assert!(!closed.is_valid(
            &json!({"url": "http://x.test/", "pagination": {"type": "link", "extra": 1}})
        ));
        let fetch = jsonschema::validator_for(&fetch_schema()).unwrap();
        assert!(fetch.is_valid(&json!({"connector_id": Uuid::now_v7(), "max_items": 5})));
        assert!(fetch.is_valid(&json!({"type": "rss", "config": {"url": "https://x.test/f"}})));
        assert!(!fetch.is_valid(&json!({"type": "rss", "config": {"url": "ftp://x.test/f"}})));
        assert!(!fetch.is_valid(&json!({"connector_id": Uuid::now_v7(), "type": "rss"})));
        assert!(!fetch.is_valid(&json!({})));
    }

    #[test]
    fn the_content_hash_ignores_ids_and_separates_fields() {
        let a = Item::content_hash(Some("ab"), Some("c"), None, None);
        assert_eq!(a, Item::content_hash(Some(" ab "), Some("c"), None, None));
        assert_ne!(a, Item::content_hash(Some("a"), Some("bc"), None, None));
        assert_eq!(a.len(), 32);
    }
}
