//! The `imap` connector type's config: the messages of one mailbox folder, read over IMAP
//! (docs/connectors.md#imap). The cursor is the folder's UIDVALIDITY and the highest UID listed.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::domain::{
    kinds::input::{self, KindInput, SmtpTls},
    FieldError,
};

/// Most messages one fetch lists by default; the rest come with the next fetch.
pub const DEFAULT_MAX_MESSAGES: u32 = 100;

/// How an `imap` connector secures its connection (as `mail.send`'s `smtp.tls`): `tls` (IMAPS,
/// port 993), `starttls` (port 143, upgraded before logging in) or `none`.
pub type ImapTls = SmtpTls;

/// Config of an `imap` connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImapConfig {
    /// The server's host name or IPv4 address (the TLS certificate must name it). Private and
    /// loopback addresses are refused unless `CAPIBARA_OUTBOUND_ALLOW_PRIVATE=true`.
    #[schema(
        min_length = 1,
        max_length = 253,
        pattern = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$"
    )]
    pub host: String,
    /// The server's port (993 for TLS, 143 for STARTTLS or plain).
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u32,
    /// `tls`, `starttls` or `none` (plain IMAP: a trusted network or a local server only).
    #[schema(inline)]
    pub tls: ImapTls,
    /// The user to log in as; the password is the connector's secret at `auth.password`.
    #[schema(min_length = 1, max_length = 256)]
    pub username: String,
    /// The folder (mailbox) to read (default `INBOX`).
    #[serde(default = "inbox")]
    #[schema(
        min_length = 1,
        max_length = 512,
        pattern = r"^[^\x00-\x1f\x7f]+$",
        default = "INBOX"
    )]
    pub folder: String,
    /// Only messages not yet marked `\Seen` (default false: every message). Messages are read
    /// with BODY.PEEK, so fetching never marks them seen.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unseen_only: bool,
    /// Most messages one fetch reads (default 100, at most 1000), oldest UID first; the rest
    /// come with the next fetch. Keep it at or below the fetch's `max_items`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000, nullable = false)]
    pub max_messages: Option<u32>,
    /// Most bytes one fetch downloads (the messages together; default 10 MiB, 1 KiB to
    /// 100 MiB): past it the fetch fails with `response_too_large`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1024, maximum = 104_857_600, nullable = false)]
    pub max_bytes: Option<u64>,
    /// Seconds the whole fetch may take (default 30, 1-300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 300, nullable = false)]
    pub timeout_s: Option<u32>,
}

fn inbox() -> String {
    "INBOX".into()
}

impl KindInput for ImapConfig {
    fn check(&self) -> Result<(), FieldError> {
        crate::outbound::parse_url(&format!("http://{}:{}/", self.host, self.port))
            .map_err(|e| FieldError::new("host", e.to_string()))?;
        Ok(())
    }
}

/// The `imap` config's JSON Schema.
pub fn imap_schema() -> Value {
    input::schema::<ImapConfig>()
}

/// Where an `imap` connector takes secrets: its password.
pub fn imap_secret_place(place: &str) -> bool {
    place == "auth.password"
}

/// An `imap` connector cannot log in without its password.
pub fn imap_needs_secrets(_config: &Value) -> Option<&'static str> {
    Some("auth.password")
}
