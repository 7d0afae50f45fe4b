//! The status page at `/`: one HTML file, a script and a style sheet, all compiled into
//! the binary (no CDN, no build step). The page reads the JSON API with the token the
//! user types, kept in the browser tab's session storage; the files themselves hold no
//! state, so they need no token.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

const HTML: &str = include_str!("page/status.html");
const SCRIPT: &str = include_str!("page/status.js");
const STYLE: &str = include_str!("page/status.css");

/// Only this listener's own files and API: an injected name cannot load anything.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// The status page: services, pools, backends and recent traffic, refreshed every 2 s.
#[utoipa::path(get, path = "/", tag = "probes", security(()),
    responses((status = 200, description = "the status page", content_type = "text/html", body = String)))]
pub(super) async fn status_page() -> Response {
    asset("text/html; charset=utf-8", HTML)
}

#[utoipa::path(get, path = "/assets/status.js", tag = "probes", security(()),
    responses((status = 200, description = "the status page's script", content_type = "text/javascript", body = String)))]
pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

#[utoipa::path(get, path = "/assets/status.css", tag = "probes", security(()),
    responses((status = 200, description = "the status page's style sheet", content_type = "text/css", body = String)))]
pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
