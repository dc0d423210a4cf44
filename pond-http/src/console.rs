//! The console: a web page served at `/` that shows runs, pools, agents and keys, made of
//! files compiled into the binary (no CDN, nothing fetched at run time). It is a client of the
//! same `/v1` API as the CLI, signed in with an API key kept in the tab's session storage.
//!
//! Confidential runs stay sealed on the server: the page fetches ciphertext like any consumer
//! and opens it in the browser with the reader's X25519 key and a vendored libsodium
//! (`assets/console/sodium`, ISC), so plaintext never crosses the wire.
//!
//! Every answer carries a strict Content-Security-Policy: scripts only from this server (no
//! inline script, no `eval`; WebAssembly for libsodium), no HTML-from-text sinks at all (Trusted
//! Types with no policy), requests only to this server, no framing, and pictures only from here
//! or from `blob:` URLs the page made itself (artifact previews).
//!
//! What it does not protect against: the page is served by the same server whose storage it
//! does not trust with plaintext. A reader who does not trust the server's *code* either opens
//! runs with `pond run logs` or a libsodium client of their own; the console says so.

use std::sync::OnceLock;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::boundary::ApiPath as Path;
use crate::error::ApiError;

/// The policy every console answer carries.
const CSP: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; \
                   img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'";

/// The console's files: name under `/console/`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("console.js", "text/javascript; charset=utf-8", include_bytes!("../assets/console/console.js")),
    ("console.css", "text/css; charset=utf-8", include_bytes!("../assets/console/console.css")),
    ("open.js", "text/javascript; charset=utf-8", include_bytes!("../assets/console/open.js")),
    ("favicon.svg", "image/svg+xml", include_bytes!("../assets/console/favicon.svg")),
    // libsodium.js (ISC), vendored from npm; see `assets/console/sodium/README.md`.
    (
        "libsodium-wrappers.mjs",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/console/sodium/libsodium-wrappers.mjs"),
    ),
    (
        "libsodium-sumo.mjs",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/console/sodium/libsodium-sumo.mjs"),
    ),
    ("libsodium-LICENSE.txt", "text/plain; charset=utf-8", include_bytes!("../assets/console/sodium/LICENSE")),
];

const INDEX_HTML: &[u8] = include_bytes!("../assets/console/index.html");

/// The console's page.
#[utoipa::path(get, path = "/", tag = "meta", security(()),
    responses((status = 200, description = "The console (a web page served by pond itself; it signs in with an API key).", content_type = "text/html", body = String)))]
pub(crate) async fn console_page(headers: HeaderMap) -> Response {
    serve(&headers, "index.html", "text/html; charset=utf-8", INDEX_HTML)
}

/// One of the console's files.
#[utoipa::path(get, path = "/console/{file}", tag = "meta", security(()),
    params(("file" = String, Path, description = "The file's name, e.g. `console.js`.")),
    responses(
        (status = 200, description = "The file (script, style sheet, icon, or the vendored libsodium and its licence).", content_type = "text/javascript", body = String),
        (status = 404, response = crate::openapi::NotFound),
    ))]
pub(crate) async fn console_asset(headers: HeaderMap, Path(file): Path<String>) -> Result<Response, ApiError> {
    let (name, kind, bytes) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or_else(|| ApiError::NotFound(format!("the console has no file `{file}`")))?;
    Ok(serve(&headers, name, kind, bytes))
}

/// The console's files and their sizes (for BENCHMARKS: the page's own script and style, and
/// the vendored libsodium apart).
pub fn asset_sizes() -> Vec<(&'static str, usize)> {
    files().map(|(name, bytes)| (name, bytes.len())).collect()
}

/// An answer with the policy, revalidated on each load by its digest (an upgraded server's
/// files are never read from a stale cache).
fn serve(headers: &HeaderMap, name: &str, kind: &'static str, bytes: &'static [u8]) -> Response {
    let tag = etag(name);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|candidate| candidate.trim() == tag.to_str().unwrap_or_default()));
    let common = [
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        // No other origin's window keeps a handle on the page, nor embeds its files.
        (HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin")),
        (HeaderName::from_static("cross-origin-resource-policy"), HeaderValue::from_static("same-origin")),
        (
            HeaderName::from_static("permissions-policy"),
            HeaderValue::from_static("camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, tag),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (common, [(header::CONTENT_TYPE, HeaderValue::from_static(kind))], bytes).into_response()
}

/// A strong validator for each embedded file, computed once (every name served is in it).
fn etag(name: &str) -> HeaderValue {
    static TAGS: OnceLock<std::collections::HashMap<&'static str, HeaderValue>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        files()
            .filter_map(|(n, b)| {
                let text = format!("\"{}\"", hex::encode(&Sha256::digest(b)[..12]));
                Some((n, HeaderValue::from_str(&text).ok()?))
            })
            .collect()
    });
    tags.get(name).cloned().unwrap_or(HeaderValue::from_static("\"0\""))
}

/// The page and every file under `/console/`: (name, bytes).
fn files() -> impl Iterator<Item = (&'static str, &'static [u8])> {
    std::iter::once(("index.html", INDEX_HTML)).chain(ASSETS.iter().map(|(name, _, bytes)| (*name, *bytes)))
}
