//! Where `connector.fetch` gets items from: one module per connector type. A source turns a
//! config and the connector's cursor into the items the source lists now and the cursor after
//! them; which of them are new is the executor's business
//! ([`crate::executors::connector`]).

pub mod api;
pub mod rss;
pub mod web;

use std::{collections::BTreeMap, time::Duration};

use capibara_shared::domain::connector::types::Item;
use serde_json::Value;

use crate::fetch::GetError;

/// What a source listed.
#[derive(Debug)]
pub struct Listing {
    /// Every item the source lists now, in its order.
    pub items: Vec<Item>,
    /// The cursor after this listing.
    pub cursor: Value,
    /// The source said nothing changed since the cursor (HTTP 304): `items` is empty.
    pub not_modified: bool,
    /// Bytes downloaded.
    pub bytes: u64,
}

/// What a source needs besides its config.
pub struct Request<'a> {
    pub config: &'a Value,
    /// Secret values by the place the connector put them (`headers.Authorization`).
    pub secrets: &'a BTreeMap<String, String>,
    /// The connector's cursor (`None`: the first fetch, or an inline config).
    pub cursor: Option<&'a Value>,
    pub policy: &'a crate::http::OutboundPolicy,
    pub cancel: &'a tokio_util::sync::CancellationToken,
}

/// Why a source listed nothing.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Get(#[from] GetError),
    /// The source answered with a status that is not a listing.
    #[error("the source answered HTTP {status}: {snippet}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        snippet: String,
    },
    /// The answer is not what the type reads (malformed XML, not a feed).
    #[error("{0}")]
    Malformed(String),
    /// The source refuses to be read (robots.txt disallows the page).
    #[error("{0}")]
    Refused(String),
    /// The config does not fit the type (checked at submission; a bug if it happens).
    #[error("{0}")]
    Config(String),
}

/// The first characters of a body, for error messages.
pub fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)])
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}
