//! `rss`: RSS 0.9x/1.0/2.0, Atom and JSON Feed over HTTP(S), parsed by feed-rs. The cursor keeps
//! the response's validators (`ETag`, `Last-Modified`), sent back as `If-None-Match` /
//! `If-Modified-Since`, so an unchanged feed costs one request and no parse.

use capibara_shared::domain::connector::types::{Item, RssConfig};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::{Listing, Request, SourceError};
use crate::fetch;

pub async fn list(req: Request<'_>) -> Result<Listing, SourceError> {
    let config: RssConfig = serde_json::from_value(req.config.clone())
        .map_err(|e| SourceError::Config(e.to_string()))?;
    let mut headers = super::headers(&config.headers, req.secrets);
    headers.push((
        "accept".into(),
        "application/rss+xml, application/atom+xml, application/feed+json, application/xml;q=0.9, */*;q=0.8".into(),
    ));
    super::validators(&mut headers, req.cursor);
    let text = |k: &str| req.cursor.and_then(|c| c.get(k)).and_then(Value::as_str);
    let policy = super::policy(req.policy, config.max_bytes, config.timeout_s);
    let got = fetch::get(&policy, &config.url, &headers, req.cancel).await?;
    if got.status == 304 {
        return Ok(super::not_modified(req.cursor));
    }
    if !(200..300).contains(&got.status) {
        return Err(super::status(&got));
    }
    let items = parse(&got.body, got.url.as_str())?;
    let newest = items
        .iter()
        .filter_map(|i| i.published.or(i.updated))
        .max()
        .or_else(|| text("newest").and_then(|t| t.parse::<DateTime<Utc>>().ok()));
    Ok(Listing {
        cursor: json!({
            "etag": got.header("etag"),
            "last_modified": got.header("last-modified"),
            "newest": newest,
        }),
        items,
        bytes: got.body.len() as u64,
        ..Listing::default()
    })
}

/// The entries of a feed document, as items (links resolved against `base`).
pub fn parse(body: &[u8], base: &str) -> Result<Vec<Item>, SourceError> {
    let feed = feed_rs::parser::Builder::new()
        .base_uri(Some(base))
        .build()
        .parse(body)
        .map_err(|e| SourceError::Malformed(format!("not a feed: {e}")))?;
    Ok(feed
        .entries
        .into_iter()
        .map(|e| {
            let title = e.title.map(|t| t.content);
            let url = e
                .links
                .iter()
                .find(|l| l.rel.as_deref().is_none_or(|r| r == "alternate"))
                .or(e.links.first())
                .map(|l| l.href.clone());
            let summary = e.summary.map(|t| t.content);
            let content = e.content.and_then(|c| c.body);
            let hash = Item::content_hash(
                title.as_deref(),
                url.as_deref(),
                summary.as_deref(),
                content.as_deref(),
            );
            Item {
                id: e.id,
                hash,
                title,
                url,
                summary,
                content,
                published: e.published,
                updated: e.updated,
                authors: e.authors.into_iter().filter_map(|p| p.name).collect(),
                categories: e.categories.into_iter().map(|c| c.term).collect(),
                fields: Default::default(),
                data: None,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSS: &str = r#"<?xml version="1.0"?>
<rss version="2.0"><channel><title>t</title><link>http://x.test/</link><description>d</description>
<item><title>First</title><link>/posts/1</link><guid>a1</guid><pubDate>Tue, 01 Dec 2026 10:00:00 GMT</pubDate><description>one</description></item>
<item><title>Second</title><link>http://x.test/posts/2</link><guid>a2</guid><description>two</description></item>
</channel></rss>"#;

    const ATOM: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>t</title><id>urn:f</id><updated>2026-12-01T10:00:00Z</updated>
<entry><title>A</title><id>urn:a</id><updated>2026-12-02T10:00:00Z</updated><link href="http://x.test/a"/><summary>s</summary><author><name>Ann</name></author></entry>
</feed>"#;

    #[test]
    fn rss_and_atom_entries_become_items_with_resolved_links() {
        let items = parse(RSS.as_bytes(), "http://x.test/feed.xml").unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].title.as_deref(), Some("First"));
        assert_eq!(items[0].url.as_deref(), Some("http://x.test/posts/1"));
        assert_eq!(items[0].id, "a1");
        assert_eq!(
            items[0].published.map(|d| d.to_rfc3339()),
            Some("2026-12-01T10:00:00+00:00".into())
        );
        assert_ne!(items[0].hash, items[1].hash);
        let atom = parse(ATOM.as_bytes(), "http://x.test/atom").unwrap();
        assert_eq!(atom[0].authors, vec!["Ann".to_string()]);
        assert_eq!(atom[0].summary.as_deref(), Some("s"));
    }

    #[test]
    fn malformed_documents_are_refused_with_a_reason() {
        for bad in ["", "<html><body>hi</body></html>", "<rss><channel><item>"] {
            assert!(
                matches!(
                    parse(bad.as_bytes(), "http://x.test/"),
                    Err(SourceError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }
}
