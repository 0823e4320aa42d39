//! `graphql`: a GraphQL query over HTTP(S) (a POST of `{query, variables}` as JSON), page after
//! page by the connection's end cursor, which goes back as a query variable. Items are the
//! array at a JSON Pointer of the answer, read as the `api` type reads its records; the
//! authentication is the `api` type's.

use capibara_shared::domain::connector::types::GraphqlConfig;
use serde_json::{json, Value};

use super::{
    api::{auth_header, json_item},
    Listing, Request, SourceError,
};

pub async fn list(req: Request<'_>) -> Result<Listing, SourceError> {
    let config: GraphqlConfig = serde_json::from_value(req.config.clone())
        .map_err(|e| SourceError::Config(e.to_string()))?;
    let policy = super::policy(req.policy, config.max_bytes, config.timeout_s);
    let mut headers = super::headers(&config.headers, req.secrets);
    if let Some(auth) = &config.auth {
        headers.push(auth_header(auth, req.secrets, &policy).await?);
    }
    headers.push(("content-type".into(), "application/json".into()));
    headers.push((
        "accept".into(),
        "application/graphql-response+json, application/json".into(),
    ));
    let var = config.cursor_variable.as_deref().unwrap_or("after");
    let mut cursor: Option<Value> = req
        .cursor
        .and_then(|c| c.get("cursor"))
        .filter(|c| !c.is_null() && config.resume)
        .cloned();
    let (mut items, mut bytes) = (Vec::new(), 0u64);
    let mut reporter = super::Reporter::default();
    for page in 0..config.max_pages.unwrap_or(10) {
        let mut variables = config.variables.clone().unwrap_or_default();
        if config.end_cursor.is_some() {
            variables.insert(var.into(), cursor.clone().unwrap_or(Value::Null));
        }
        let body = serde_json::to_vec(&json!({"query": config.query, "variables": variables}))
            .expect("JSON");
        let res = tokio::select! {
            r = crate::http::post(&policy, &config.url, &headers, body) => r,
            () = req.cancel.cancelled() => return Err(crate::fetch::GetError::Canceled.into()),
        }
        .map_err(|e| SourceError::Get(crate::fetch::GetError::Http(e)))?;
        if res.truncated {
            return Err(crate::fetch::GetError::TooLarge(policy.max_response_bytes).into());
        }
        if !(200..300).contains(&res.status) {
            return Err(SourceError::Status {
                status: res.status,
                retry_after: res.retry_after,
                snippet: super::snippet(&res.body),
            });
        }
        bytes += res.body.len() as u64;
        let answer: Value = serde_json::from_slice(&res.body)
            .map_err(|e| SourceError::Malformed(format!("page {} is not JSON: {e}", page + 1)))?;
        let errors = answer["errors"].as_array().filter(|e| !e.is_empty());
        let Some(found) = answer.pointer(&config.items).and_then(Value::as_array) else {
            return Err(SourceError::Malformed(match errors {
                Some(e) => format!("the query failed: {}", Value::from(e.clone())),
                None => format!("the answer has no array of items at {}", config.items),
            }));
        };
        items.extend(found.iter().map(|v| {
            json_item(
                v,
                config.id.as_deref(),
                config.title.as_deref(),
                config.link.as_deref(),
            )
        }));
        let n = items.len();
        reporter
            .report(&req, u64::from(page) + 1, None, || {
                format!("page {}: {n} items", page + 1)
            })
            .await;
        let Some(at) = &config.end_cursor else { break };
        let next = answer.pointer(at).filter(|c| !c.is_null()).cloned();
        let more = match &config.has_next_page {
            Some(p) => answer.pointer(p).and_then(Value::as_bool).unwrap_or(false),
            None => next.is_some(),
        };
        if next.is_some() {
            cursor = next;
        }
        if !more || found.is_empty() {
            break;
        }
    }
    Ok(Listing {
        items,
        cursor: json!({"cursor": cursor.filter(|_| config.resume)}),
        bytes,
        ..Listing::default()
    })
}
