//! The web dashboard at `/ui` (docs/dashboard.md): static files embedded in the binary at build
//! time (no CDN, no build step; docs/dashboard-design.md says why). The pages call only the
//! public `/v1` API with the key the user signs in with.
//!
//! Every answer carries a strict Content-Security-Policy (scripts and styles from this origin
//! only, no inline code, `connect-src 'self'`), `nosniff` and no framing. Files are revalidated
//! (`no-cache` with an ETag): an upgraded binary never serves stale scripts.

use axum::{
    extract::Path,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Redirect, Response},
    routing::get,
    Router,
};
use sha2::{Digest, Sha256};

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $ct:expr) => {
        Asset {
            name: $name,
            content_type: $ct,
            body: include_bytes!(concat!("../ui/", $name)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("dag.js", JS),
    asset!("pages/overview.js", JS),
    asset!("pages/workers.js", JS),
    asset!("pages/jobs.js", JS),
    asset!("pages/job.js", JS),
    asset!("pages/workflows.js", JS),
    asset!("pages/schedules.js", JS),
    asset!("pages/triggers.js", JS),
    asset!("pages/deliveries.js", JS),
    asset!("pages/subscriptions.js", JS),
];

/// The dashboard's Content-Security-Policy: nothing inline, nothing from elsewhere. `blob:`
/// media plays TTS audio fetched with the key; `data:` images are the SVG icons.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; media-src 'self' blob:; connect-src 'self'; font-src 'self'; \
    manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `/ui` (redirects to `/ui/`), `/ui/` (the page) and `/ui/<file>`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|h: HeaderMap| async move { serve("index.html", &h) }),
        )
        .route(
            "/ui/{*path}",
            get(|Path(p): Path<String>, h: HeaderMap| async move { serve(&p, &h) }),
        )
}

fn etag(body: &[u8]) -> String {
    format!("\"{}\"", &hex::encode(Sha256::digest(body))[..20])
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return crate::error::ApiError::NotFound(format!("no dashboard file `{name}`"))
            .into_response();
    };
    let tag = etag(asset.body);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut res = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_module_the_app_imports_is_embedded() {
        let app = std::str::from_utf8(ASSETS[3].body).unwrap();
        assert_eq!(ASSETS[3].name, "app.js");
        for line in app.lines().filter(|l| l.starts_with("import")) {
            let file = line.split('"').nth(1).unwrap().trim_start_matches("./");
            assert!(
                ASSETS.iter().any(|a| a.name == file),
                "app.js imports {file}, which is not embedded"
            );
        }
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let html = std::str::from_utf8(ASSETS[0].body).unwrap();
        assert!(!html.contains("<script>") && !html.contains("style="));
        assert!(!html.contains("onclick"));
    }
}
