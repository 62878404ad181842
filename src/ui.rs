//! The operations dashboard at `/ui`: a page of plain HTML, CSS and
//! JavaScript built into the binary, which uses taskql's own GraphQL API
//! (queries over HTTP, `taskEvents` over the websocket). Nothing is loaded
//! from elsewhere, so no third-party script runs next to a token.
use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// The page only talks to its own origin; scripts and styles are its own files.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// A short fingerprint of an asset, put in its URL: browsers may keep an
/// asset for a day, and a new binary's page asks for new URLs.
fn fingerprint(content: &str) -> String {
    // FNV-1a: stable across builds and Rust versions, unlike `DefaultHasher`.
    let hash = content
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{:012x}", hash >> 16)
}

static PAGE: LazyLock<String> = LazyLock::new(|| {
    INDEX
        .replace("{{APP_JS}}", &fingerprint(APP_JS))
        .replace("{{APP_CSS}}", &fingerprint(APP_CSS))
});

/// GET /ui and GET /ui/assets/{name}.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/assets/{name}", get(asset))
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Always asked again, so a new binary's page (and assets) show at once.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE.as_str(),
    )
        .into_response()
}

async fn asset(Path(name): Path<String>) -> Response {
    let (body, content_type) = match name.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=86400"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_its_assets_by_fingerprint() {
        assert!(!PAGE.contains("{{"), "every placeholder is filled");
        assert!(PAGE.contains(&format!("/ui/assets/app.js?v={}", fingerprint(APP_JS))));
        assert_ne!(fingerprint("a"), fingerprint("b"));
    }
}
