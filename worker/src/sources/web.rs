//! `web`: a page over HTTP(S), parsed with html5ever (`scraper`) and read with CSS selectors —
//! the page as one item, or one item per element the `item` selector picks. robots.txt is
//! obeyed (parsed by `texting_robots`, kept an hour per origin), and requests of this process
//! to one host are spaced by `delay_ms` or the site's Crawl-delay, whichever is longer. The
//! cursor keeps the page's validators, so an unchanged page answers 304.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use capibara_shared::domain::connector::types::{Item, WebConfig, DEFAULT_DELAY_MS};
use scraper::{ElementRef, Html, Selector};
use serde_json::json;
use texting_robots::Robot;

use super::{Listing, Request, SourceError};
use crate::{fetch, http::OutboundPolicy};

/// The name robots.txt rules are matched against.
pub const AGENT: &str = "Capibara-Connector";

pub async fn list(req: Request<'_>) -> Result<Listing, SourceError> {
    let config: WebConfig = serde_json::from_value(req.config.clone())
        .map_err(|e| SourceError::Config(e.to_string()))?;
    let mut headers = super::headers(&config.headers, req.secrets);
    let policy = super::policy(req.policy, config.max_bytes, config.timeout_s);
    let url = capibara_shared::outbound::parse_url(&config.url)
        .map_err(|e| SourceError::Config(e.to_string()))?;
    let host = url.host_str().unwrap_or("").to_string();
    let robot = robots(&policy, &url, req.cancel).await?;
    if !robot.allowed(url.as_str()) {
        return Err(SourceError::Refused(format!(
            "{}/robots.txt disallows {} for {AGENT}",
            url.origin().ascii_serialization(),
            url.path()
        )));
    }
    let crawl_delay = robot
        .delay
        .filter(|d| d.is_finite() && *d > 0.0)
        .map(|d| Duration::from_secs_f32(d.min(60.0)))
        .unwrap_or_default();
    let delay =
        Duration::from_millis(config.delay_ms.unwrap_or(DEFAULT_DELAY_MS).into()).max(crawl_delay);
    fetch::pause(&host, delay).await;

    super::validators(&mut headers, req.cursor);
    headers.push((
        "accept".into(),
        "text/html, application/xhtml+xml;q=0.9, */*;q=0.5".into(),
    ));
    let got = fetch::get(&policy, url.as_str(), &headers, req.cancel).await?;
    if got.status == 304 {
        return Ok(super::not_modified(req.cursor));
    }
    if !(200..300).contains(&got.status) {
        return Err(super::status(&got));
    }
    let page = String::from_utf8_lossy(&got.body);
    let items = read(&page, &got.url, &config)?;
    Ok(Listing {
        cursor: json!({
            "etag": got.header("etag"),
            "last_modified": got.header("last-modified"),
        }),
        items,
        bytes: got.body.len() as u64,
        ..Listing::default()
    })
}

/// How long a robots.txt is kept.
const ROBOTS_TTL: Duration = Duration::from_secs(3600);

/// robots.txt rules by origin, with when they were read.
type RobotsCache = HashMap<String, (Instant, Arc<Robot>)>;

static ROBOTS: LazyLock<Mutex<RobotsCache>> = LazyLock::new(Default::default);

/// The robots.txt rules of `url`'s origin for [`AGENT`]: from this process's cache, or fetched
/// (through the same guard). A missing one (4xx) allows everything; an unavailable one (5xx,
/// no answer) is an error to retry later (RFC 9309 §2.3.1.4: assume complete disallow).
async fn robots(
    policy: &OutboundPolicy,
    url: &url::Url,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Arc<Robot>, SourceError> {
    let origin = url.origin().ascii_serialization();
    if let Some((at, r)) = ROBOTS.lock().expect("robots").get(&origin) {
        if at.elapsed() < ROBOTS_TTL {
            return Ok(r.clone());
        }
    }
    let policy = OutboundPolicy {
        max_response_bytes: 512 * 1024,
        ..policy.clone()
    };
    let got = match fetch::get(&policy, &format!("{origin}/robots.txt"), &[], cancel).await {
        Ok(got) => got,
        // RFC 9309 §2.4: only the first 500 KiB need be read.
        Err(fetch::GetError::TooLarge(_)) => {
            return Err(SourceError::Refused(format!(
                "{origin}/robots.txt is larger than 512 KiB"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let txt: &[u8] = match got.status {
        200..=299 => &got.body,
        400..=499 => b"",
        status => {
            return Err(SourceError::Status {
                status,
                retry_after: got.retry_after,
                snippet: format!("{origin}/robots.txt is unavailable"),
            })
        }
    };
    let robot = Arc::new(
        Robot::new(AGENT, txt)
            .unwrap_or_else(|_| Robot::new(AGENT, b"").expect("an empty robots.txt parses")),
    );
    let mut cache = ROBOTS.lock().expect("robots");
    if cache.len() > 10_000 {
        cache.clear();
    }
    cache.insert(origin, (Instant::now(), robot.clone()));
    Ok(robot)
}

fn selector(field: &str, s: &str) -> Result<Selector, SourceError> {
    Selector::parse(s).map_err(|e| SourceError::Config(format!("{field}: {e}")))
}

/// The visible text of `el` ([`crate::content::html::element_text`]: scripts, styles and the
/// like left out, blocks on lines of their own).
fn visible_text(el: ElementRef<'_>) -> String {
    crate::content::html::element_text(el)
}

/// The page's items under `config`'s selectors; links resolved against `base` (the page's
/// URL after redirects, or its `<base href>`).
pub fn read(page: &str, base: &url::Url, config: &WebConfig) -> Result<Vec<Item>, SourceError> {
    let doc = Html::parse_document(page);
    let base = Selector::parse("base[href]")
        .ok()
        .and_then(|s| doc.select(&s).next())
        .and_then(|b| b.value().attr("href"))
        .and_then(|h| base.join(h).ok())
        .unwrap_or_else(|| base.clone());
    let resolve = |href: &str| base.join(href.trim()).ok().map(|u| u.to_string());
    let title_sel = config
        .title
        .as_deref()
        .map(|s| selector("title", s))
        .transpose()?;
    let link_sel = selector("link", config.link.as_deref().unwrap_or("a[href]"))?;
    let content_sel = config
        .content
        .as_deref()
        .map(|s| selector("content", s))
        .transpose()?;
    let lists: Vec<(String, Selector)> = config
        .lists
        .iter()
        .map(|(k, s)| Ok((k.clone(), selector(&format!("lists.{k}"), s)?)))
        .collect::<Result<_, SourceError>>()?;
    let texts = |root: ElementRef<'_>, sel: &Selector| -> Vec<String> {
        root.select(sel)
            .map(visible_text)
            .filter(|t| !t.is_empty())
            .collect()
    };
    let fields = |root: ElementRef<'_>| -> BTreeMap<String, Vec<String>> {
        lists
            .iter()
            .map(|(k, sel)| (k.clone(), texts(root, sel)))
            .collect()
    };
    let item = |id: Option<String>,
                title: Option<String>,
                url: Option<String>,
                content: String,
                fields: BTreeMap<String, Vec<String>>| {
        let content = (!content.is_empty()).then_some(content);
        let hash = Item::content_hash(title.as_deref(), url.as_deref(), None, content.as_deref());
        Item {
            id: id.or_else(|| url.clone()).unwrap_or_else(|| hash.clone()),
            hash,
            title,
            url,
            summary: None,
            content,
            published: None,
            updated: None,
            authors: Vec::new(),
            categories: Vec::new(),
            fields,
            data: None,
        }
    };
    let root = doc.root_element();
    let Some(item_sel) = config.item.as_deref() else {
        // The page is one item.
        let title = match &title_sel {
            Some(sel) => texts(root, sel).into_iter().next(),
            None => Selector::parse("title")
                .ok()
                .and_then(|s| doc.select(&s).next())
                .map(visible_text_all),
        };
        let content = match &content_sel {
            Some(sel) => texts(root, sel).join("\n"),
            None => Selector::parse("body")
                .ok()
                .and_then(|s| doc.select(&s).next())
                .map(visible_text)
                .unwrap_or_default(),
        };
        let mut f = fields(root);
        let links: Vec<String> = root
            .select(&link_sel)
            .filter_map(|a| a.value().attr("href"))
            .filter_map(&resolve)
            .collect();
        f.entry("links".into()).or_insert(links);
        return Ok(vec![item(
            Some(base.to_string()),
            title.filter(|t| !t.is_empty()),
            Some(base.to_string()),
            content,
            f,
        )]);
    };
    let item_sel = selector("item", item_sel)?;
    let heading = Selector::parse("h1, h2, h3, h4, h5, h6").expect("a selector");
    Ok(root
        .select(&item_sel)
        .map(|el| {
            let title = texts(el, title_sel.as_ref().unwrap_or(&heading))
                .into_iter()
                .next();
            let url = el
                .select(&link_sel)
                .next()
                .or_else(|| link_sel.matches(&el).then_some(el))
                .and_then(|a| a.value().attr("href"))
                .and_then(&resolve);
            let content = match &content_sel {
                Some(sel) => texts(el, sel).join("\n"),
                None => visible_text(el),
            };
            item(None, title, url, content, fields(el))
        })
        .collect())
}

/// Text of an element that is hidden by nature (`<title>` lives in `head`).
fn visible_text_all(el: ElementRef<'_>) -> String {
    el.text()
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    const PAGE: &str = r#"<!doctype html><html><head><title> The  Blog </title>
<style>.x{}</style><script>var hidden = 1;</script></head><body>
<nav><a href="/about">About</a></nav>
<article><h2>First post</h2><a href="posts/1.html">read</a><p>Hello <b>world</b>.</p>
  <span class="tag">rust</span><span class="tag">jobs</span></article>
<article><h2>Second post</h2><a href="https://other.test/2">read</a><p>Bye.</p><script>x()</script></article>
</body></html>"#;

    fn config(v: Value) -> WebConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn items_come_from_selectors_with_links_resolved_and_scripts_left_out() {
        let base = url::Url::parse("http://site.test/blog/index.html").unwrap();
        let items = read(
            PAGE,
            &base,
            &config(
                json!({"url": "http://site.test/", "item": "article", "content": "p",
                           "lists": {"tags": ".tag"}}),
            ),
        )
        .unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].title.as_deref(), Some("First post"));
        assert_eq!(
            items[0].url.as_deref(),
            Some("http://site.test/blog/posts/1.html")
        );
        assert_eq!(items[0].content.as_deref(), Some("Hello world."));
        assert_eq!(items[0].fields["tags"], vec!["rust", "jobs"]);
        assert_eq!(items[1].url.as_deref(), Some("https://other.test/2"));
        assert!(!items[1].content.as_deref().unwrap().contains("x()"));
        assert_ne!(items[0].hash, items[1].hash);
    }

    #[test]
    fn without_an_item_selector_the_page_is_one_item_with_its_links() {
        let base = url::Url::parse("http://site.test/blog/").unwrap();
        let items = read(PAGE, &base, &config(json!({"url": "http://site.test/"}))).unwrap();
        assert_eq!(items.len(), 1);
        let page = &items[0];
        assert_eq!(page.title.as_deref(), Some("The Blog"));
        let content = page.content.as_deref().unwrap();
        assert!(
            content.contains("Hello world") && !content.contains("hidden"),
            "{content}"
        );
        assert_eq!(
            page.fields["links"],
            vec![
                "http://site.test/about",
                "http://site.test/blog/posts/1.html",
                "https://other.test/2"
            ]
        );
    }

    #[test]
    fn robots_rules_are_matched_for_our_agent() {
        let r = Robot::new(
            AGENT,
            b"User-agent: *\nDisallow: /private\nCrawl-delay: 2\n",
        )
        .unwrap();
        assert!(r.allowed("http://site.test/blog"));
        assert!(!r.allowed("http://site.test/private/x"));
        assert_eq!(r.delay, Some(2.0));
    }
}
