//! `api`: a JSON API over HTTP(S), page after page — the `Link` header, a cursor in the page,
//! a page number or an offset — with bearer, basic, API-key header or OAuth2
//! client-credentials authentication. Each element of a page's item array is an item; its
//! content hash is over its JSON, so an item is new when anything in it changed.

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant},
};

use base64::Engine as _;
use capibara_shared::domain::connector::types::{ApiAuth, ApiConfig, Item, Pagination};
use serde_json::{json, Value};

use super::{snippet, Listing, Request, SourceError};
use crate::{fetch, http::OutboundPolicy};

pub async fn list(req: Request<'_>) -> Result<Listing, SourceError> {
    let config: ApiConfig = serde_json::from_value(req.config.clone())
        .map_err(|e| SourceError::Config(e.to_string()))?;
    let policy = super::policy(req.policy, config.max_bytes, config.timeout_s);
    let mut headers = super::headers(&config.headers, req.secrets);
    if let Some(auth) = &config.auth {
        headers.push(auth_header(auth, req.secrets, &policy).await?);
    }
    headers.push(("accept".into(), "application/json".into()));

    let resume = matches!(
        config.pagination,
        Some(Pagination::Cursor { resume: true, .. })
    );
    let mut cursor = req
        .cursor
        .and_then(|c| c.get("cursor"))
        .and_then(Value::as_str)
        .filter(|_| resume)
        .map(str::to_string);
    let mut url = page_url(&config, &config.url, cursor.as_deref(), 0, 0)?;
    let (mut items, mut bytes, mut seen) = (Vec::new(), 0u64, 0u64);
    let max_pages = config.max_pages.unwrap_or(10);
    let mut reporter = super::Reporter::default();
    for page in 0..max_pages {
        let got = fetch::get(&policy, &url, &headers, req.cancel).await?;
        if !(200..300).contains(&got.status) {
            return Err(super::status(&got));
        }
        bytes += got.body.len() as u64;
        let body: Value = serde_json::from_slice(&got.body)
            .map_err(|e| SourceError::Malformed(format!("page {} is not JSON: {e}", page + 1)))?;
        let found = page_items(&body, config.items.as_deref())?;
        let n = found.len() as u64;
        seen += n;
        items.extend(found.iter().map(|v| item(v, &config)));
        reporter
            .report(&req, u64::from(page) + 1, None, || {
                format!("page {} of at most {max_pages}: {seen} items", page + 1)
            })
            .await;
        let next = match &config.pagination {
            None => None,
            Some(Pagination::Link) => got
                .header("link")
                .and_then(next_link)
                .and_then(|l| got.url.join(&l).ok())
                .map(|u| u.to_string()),
            Some(Pagination::Cursor { cursor: at, .. }) => {
                let next = body.pointer(at).and_then(|c| match c {
                    Value::String(s) if !s.is_empty() => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                });
                if next.is_some() {
                    cursor = next.clone();
                }
                next.map(|c| page_url(&config, &config.url, Some(&c), 0, 0))
                    .transpose()?
            }
            Some(Pagination::Page { .. }) | Some(Pagination::Offset { .. }) if n == 0 => None,
            Some(Pagination::Page { .. }) => Some(page_url(
                &config,
                &config.url,
                None,
                u64::from(page) + 1,
                seen,
            )?),
            Some(Pagination::Offset { .. }) => Some(page_url(&config, &config.url, None, 0, seen)?),
        };
        match next {
            Some(n) => url = n,
            None => break,
        }
    }
    Ok(Listing {
        items,
        cursor: json!({"cursor": cursor.filter(|_| resume)}),
        bytes,
        ..Listing::default()
    })
}

/// The header that authenticates a request as `auth` says, with the connector's credential.
pub(super) async fn auth_header(
    auth: &ApiAuth,
    secrets: &std::collections::BTreeMap<String, String>,
    policy: &OutboundPolicy,
) -> Result<(String, String), SourceError> {
    let secret = secrets.get(auth.secret_place()).ok_or_else(|| {
        SourceError::Config(format!(
            "`auth` needs the secret `{}` in the connector's `secrets`",
            auth.secret_place()
        ))
    })?;
    Ok(match auth {
        ApiAuth::Bearer => ("authorization".into(), format!("Bearer {secret}")),
        ApiAuth::Basic { username } => (
            "authorization".into(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{secret}"))
            ),
        ),
        ApiAuth::Header { name } => (name.clone(), secret.clone()),
        ApiAuth::Oauth2 {
            token_url,
            client_id,
            scope,
        } => {
            let token =
                oauth2_token(policy, token_url, client_id, secret, scope.as_deref()).await?;
            ("authorization".into(), format!("Bearer {token}"))
        }
    })
}

/// The URL of a page: `base` with the pagination's query parameters (a cursor, the `page`-th
/// page after `start`, an offset of `offset` items).
fn page_url(
    config: &ApiConfig,
    base: &str,
    cursor: Option<&str>,
    page: u64,
    offset: u64,
) -> Result<String, SourceError> {
    let mut url = url::Url::parse(base).map_err(|e| SourceError::Config(e.to_string()))?;
    let set = |url: &mut url::Url, k: &str, v: &str| {
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(q, _)| q != k)
            .map(|(a, b)| (a.into_owned(), b.into_owned()))
            .collect();
        url.query_pairs_mut()
            .clear()
            .extend_pairs(kept)
            .append_pair(k, v);
    };
    match &config.pagination {
        Some(Pagination::Cursor { param, .. }) => {
            if let Some(c) = cursor {
                set(&mut url, param, c);
            }
        }
        Some(Pagination::Page { param, start }) => {
            set(&mut url, param, &(start.unwrap_or(1) + page).to_string());
        }
        Some(Pagination::Offset {
            param,
            limit_param,
            limit,
        }) => {
            set(&mut url, param, &offset.to_string());
            if let (Some(lp), Some(l)) = (limit_param, limit) {
                set(&mut url, lp, &l.to_string());
            }
        }
        Some(Pagination::Link) | None => {}
    }
    Ok(url.to_string())
}

/// The `rel="next"` target of a `Link` header (RFC 8288).
pub fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .filter_map(|p| p.trim().split_once('='))
            .any(|(k, v)| {
                k.trim().eq_ignore_ascii_case("rel")
                    && v.trim()
                        .trim_matches('"')
                        .split_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
            })
            .then(|| target.to_string())
    })
}

/// The item array of a page.
fn page_items<'a>(body: &'a Value, at: Option<&str>) -> Result<&'a Vec<Value>, SourceError> {
    let found = match at {
        Some(p) => body.pointer(p),
        None if body.is_array() => Some(body),
        None => ["/items", "/data", "/results"]
            .iter()
            .find_map(|p| body.pointer(p).filter(|v| v.is_array())),
    };
    found.and_then(Value::as_array).ok_or_else(|| {
        SourceError::Malformed(format!(
            "the page has no array of items at {} (set the config's `items` to a JSON Pointer)",
            at.unwrap_or("the top, /items, /data or /results")
        ))
    })
}

fn text_at(v: &Value, at: Option<&str>) -> Option<String> {
    match v.pointer(at?)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn item(v: &Value, config: &ApiConfig) -> Item {
    json_item(
        v,
        config.id.as_deref(),
        config.title.as_deref(),
        config.link.as_deref(),
    )
}

/// An item of a JSON record: its id, title and URL at those JSON Pointers (`id` defaults to
/// `/id`, else the hash), its hash over its JSON, the record in `data`.
pub(super) fn json_item(
    v: &Value,
    id: Option<&str>,
    title: Option<&str>,
    link: Option<&str>,
) -> Item {
    let json = v.to_string();
    let hash = Item::content_hash(None, None, None, Some(&json));
    Item {
        id: text_at(v, Some(id.unwrap_or("/id"))).unwrap_or_else(|| hash.clone()),
        hash,
        title: text_at(v, title),
        url: text_at(v, link),
        summary: None,
        content: None,
        published: None,
        updated: None,
        authors: Vec::new(),
        categories: Vec::new(),
        fields: Default::default(),
        data: Some(v.clone()),
    }
}

/// OAuth2 access tokens by (token URL, client id, scope), until a minute before they expire.
type Tokens = HashMap<(String, String, Option<String>), (String, Instant)>;

static TOKENS: LazyLock<Mutex<Tokens>> = LazyLock::new(Default::default);

/// An access token for `client_id` from `token_url` (client credentials, RFC 6749 §4.4; the
/// client authenticates with HTTP Basic, §2.3.1), kept until it expires.
async fn oauth2_token(
    policy: &OutboundPolicy,
    token_url: &str,
    client_id: &str,
    secret: &str,
    scope: Option<&str>,
) -> Result<String, SourceError> {
    let key = (
        token_url.to_string(),
        client_id.to_string(),
        scope.map(str::to_string),
    );
    if let Some((t, until)) = TOKENS.lock().expect("tokens").get(&key) {
        if Instant::now() < *until {
            return Ok(t.clone());
        }
    }
    let form = {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if let Some(s) = scope {
            form.append_pair("scope", s);
        }
        form.finish()
    };
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        enc(client_id),
        enc(secret)
    ));
    let res = crate::http::post(
        &OutboundPolicy {
            max_response_bytes: 64 * 1024,
            ..policy.clone()
        },
        token_url,
        &[
            (
                "content-type".into(),
                "application/x-www-form-urlencoded".into(),
            ),
            ("accept".into(), "application/json".into()),
            ("authorization".into(), format!("Basic {basic}")),
        ],
        form.into_bytes(),
    )
    .await
    .map_err(|e| SourceError::Get(fetch::GetError::Http(e)))?;
    if !(200..300).contains(&res.status) {
        return Err(SourceError::Status {
            status: res.status,
            retry_after: res.retry_after,
            snippet: format!("the token endpoint refused: {}", snippet(&res.body)),
        });
    }
    let body: Value = serde_json::from_slice(&res.body).map_err(|e| {
        SourceError::Malformed(format!("the token endpoint's answer is not JSON: {e}"))
    })?;
    let token = body["access_token"]
        .as_str()
        .ok_or_else(|| SourceError::Malformed("the token endpoint sent no access_token".into()))?
        .to_string();
    let ttl = body["expires_in"]
        .as_u64()
        .unwrap_or(300)
        .saturating_sub(60);
    let mut tokens = TOKENS.lock().expect("tokens");
    if tokens.len() > 1000 {
        tokens.clear();
    }
    tokens.insert(
        key,
        (token.clone(), Instant::now() + Duration::from_secs(ttl)),
    );
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_link_is_found_among_others() {
        let h = r#"<https://api.test/x?page=1>; rel="prev", <https://api.test/x?page=3>; rel="next", <https://api.test/x?page=9>; rel="last""#;
        assert_eq!(next_link(h).as_deref(), Some("https://api.test/x?page=3"));
        assert_eq!(
            next_link(r#"</p2>; rel="next last""#).as_deref(),
            Some("/p2")
        );
        assert_eq!(next_link(r#"<https://api.test/x>; rel="prev""#), None);
    }

    #[test]
    fn page_urls_carry_the_pagination_parameters() {
        let config = |p: Value| -> ApiConfig {
            serde_json::from_value(
                json!({"url": "http://api.test/items?q=1&page=7", "pagination": p}),
            )
            .unwrap()
        };
        let c = config(json!({"type": "page", "param": "page"}));
        assert_eq!(
            page_url(&c, &c.url, None, 2, 0).unwrap(),
            "http://api.test/items?q=1&page=3"
        );
        let c = config(
            json!({"type": "offset", "param": "offset", "limit_param": "limit", "limit": 50}),
        );
        assert_eq!(
            page_url(&c, &c.url, None, 0, 100).unwrap(),
            "http://api.test/items?q=1&page=7&offset=100&limit=50"
        );
        let c = config(json!({"type": "cursor", "cursor": "/next", "param": "after"}));
        assert_eq!(
            page_url(&c, &c.url, Some("a b"), 0, 0).unwrap(),
            "http://api.test/items?q=1&page=7&after=a+b"
        );
    }

    #[test]
    fn items_are_found_by_pointer_or_by_the_usual_names() {
        let body = json!({"data": [{"id": 1}, {"id": 2}]});
        assert_eq!(page_items(&body, None).unwrap().len(), 2);
        assert_eq!(page_items(&json!([{"id": 1}]), None).unwrap().len(), 1);
        assert!(page_items(&body, Some("/nope")).is_err());
        let c: ApiConfig =
            serde_json::from_value(json!({"url": "http://x.test/", "title": "/t"})).unwrap();
        let i = item(&json!({"id": 7, "t": "seven"}), &c);
        assert_eq!((i.id.as_str(), i.title.as_deref()), ("7", Some("seven")));
        assert_ne!(i.hash, item(&json!({"id": 7, "t": "SEVEN"}), &c).hash);
    }
}
