//! What every request crosses before a handler sees it, for the server and the orchestrator
//! alike, so the guarantees are properties of the routers rather than of each handler:
//!
//! - **Bounded bodies**: each route group carries a [`body_limit`] layer (tower-http's
//!   `RequestBodyLimitLayer`). A declared `Content-Length` over the limit is answered 413 before
//!   anything else runs (authentication included); a body without one is cut off at the limit
//!   while it is read. Body extractors here set no limit of their own: the route's layer is the
//!   one place a limit is decided.
//! - **Authentication before the body**: the body extractors ([`ApiJson`], [`LogLinesJson`],
//!   [`read_body`] on a request) are `FromRequest`, which axum runs after every `FromRequestParts`
//!   extractor — the credential extractors (`Principal`, `Orchestrator`, `Relayed`) — so a
//!   refused caller's body is never read.
//! - **JSON errors**: [`json_errors`] turns any error response that is not JSON (axum's own
//!   rejections, the limit layer's 413, an unmatched method) into the [`ApiError`] shape.
//! - **No NUL in text**: [`ApiJson`], [`ApiPath`] and [`parse_query`] refuse U+0000 in any
//!   string, object key, path parameter or query value with a 422 naming the field. PostgreSQL
//!   TEXT cannot hold NUL; refusing it here makes SQLite and PostgreSQL answer alike.
//! - **Lingering close**: [`LingeringListener`] keeps reading (and discarding) what a client is
//!   still sending after an early answer (401, 409, 413 …) instead of resetting the connection,
//!   so a client that sends its whole body before reading — ureq does — gets the answer rather
//!   than "connection reset" (which the orchestrator would otherwise have to report as 503).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use pond_core::FieldError;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ApiError;

/// Bodies of routes that take a small JSON document or nothing at all.
pub const SMALL_BODY_BYTES: usize = 1024 * 1024;

/// A worker's batch of log lines: at most 512 lines of at most 16 KiB each
/// (`pond_exec::shell`), and JSON may spend 6 bytes on one (`\u0001`).
pub const LOG_BATCH_BYTES: usize = 64 * 1024 * 1024;

/// Why a text field was refused.
pub const NUL_REASON: &str = "must not contain a NUL character (U+0000)";

/// The per-route body limit: tower-http's `RequestBodyLimitLayer`, whose 413 (plain text, or
/// ours for a body cut off while it was read) is answered as JSON naming the limit.
pub fn body_limit(bytes: usize) -> BodyLimit {
    BodyLimit(bytes)
}

/// See [`body_limit`].
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(usize);

impl<S> tower::Layer<S> for BodyLimit {
    type Service = BodyLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyLimitService { inner: tower_http::limit::RequestBodyLimit::new(inner, self.0), bytes: self.0 }
    }
}

/// See [`body_limit`].
#[derive(Clone, Debug)]
pub struct BodyLimitService<S> {
    inner: tower_http::limit::RequestBodyLimit<S>,
    bytes: usize,
}

impl<S, B, RB> tower::Service<Request<B>> for BodyLimitService<S>
where
    tower_http::limit::RequestBodyLimit<S>: tower::Service<Request<B>, Response = axum::http::Response<RB>>,
    <tower_http::limit::RequestBodyLimit<S> as tower::Service<Request<B>>>::Future: Send + 'static,
    RB: axum::body::HttpBody<Data = Bytes> + Send + 'static,
    RB::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = <tower_http::limit::RequestBodyLimit<S> as tower::Service<Request<B>>>::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let bytes = self.bytes;
        let answer = self.inner.call(req);
        Box::pin(async move {
            let response = answer.await?;
            if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
                let message = format!("the request body exceeds {bytes} bytes, this route's limit");
                return Ok(ApiError::TooLarge(message).into_response());
            }
            Ok(response.map(Body::new))
        })
    }
}

/// Reads a whole body. The route's [`body_limit`] bounds it: going past the limit is a 413.
pub async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, usize::MAX).await.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                // The limit layer rewrites this to name the limit.
                return ApiError::TooLarge("the request body exceeds this route's limit".into());
            }
            source = s.source();
        }
        ApiError::BadRequest(format!("reading the body: {e}"))
    })
}

fn is_json(parts: &Parts) -> bool {
    parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json") || ct.contains("+json"))
}

/// Decodes a JSON object body: 400 for malformed JSON, 413 past the route's limit, 415 for a
/// non-JSON content type, 422 naming the field for a wrong shape or a NUL in any text.
async fn decode_json<T: DeserializeOwned>(req: Request<Body>, nul_allowed: fn(&str) -> bool) -> Result<T, ApiError> {
    let (parts, body) = req.into_parts();
    if !is_json(&parts) {
        return Err(ApiError::UnsupportedMediaType("send the body as Content-Type: application/json".into()));
    }
    let bytes = read_body(body).await?;
    decode_bytes(&bytes, nul_allowed)
}

fn decode_bytes<T: DeserializeOwned>(bytes: &[u8], nul_allowed: fn(&str) -> bool) -> Result<T, ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest(format!("body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid("body", "must be a JSON object"));
    }
    refuse_nul(&value, &mut String::new(), nul_allowed).map_err(ApiError::Invalid)?;
    pond_core::json::from_value_at(value, "").map_err(ApiError::Invalid)
}

/// A JSON object body decoded with field-path errors (see [`decode_json`]); NUL is refused in
/// every string and key.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request<Body>, _state: &S) -> Result<Self, Self::Rejection> {
        decode_json(req, |_| false).await.map(ApiJson)
    }
}

/// An optional JSON body: none when the body is empty (or only whitespace).
impl<T: DeserializeOwned, S: Send + Sync> axum::extract::OptionalFromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request<Body>, _state: &S) -> Result<Option<Self>, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let bytes = read_body(body).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        if !is_json(&parts) {
            return Err(ApiError::UnsupportedMediaType("send the body as Content-Type: application/json".into()));
        }
        decode_bytes(&bytes, |_| false).map(|v| Some(ApiJson(v)))
    }
}

/// [`ApiJson`] for a worker's batch of log lines (`{"lines": [{"stream", "text"}]}`): a line's
/// `text` is what the process printed and may hold NUL (the log store decides what to keep);
/// every other string is refused with NUL as in [`ApiJson`].
pub struct LogLinesJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for LogLinesJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request<Body>, _state: &S) -> Result<Self, Self::Rejection> {
        fn line_text(path: &str) -> bool {
            path.strip_prefix("lines[")
                .and_then(|rest| rest.split_once("].text"))
                .is_some_and(|(i, tail)| tail.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        }
        decode_json(req, line_text).await.map(LogLinesJson)
    }
}

/// The first string or key under `value` holding NUL, as a field error at its path (the paths
/// [`pond_core::json::from_value_at`] names: `definition.stages[1].key`).
fn refuse_nul(value: &serde_json::Value, path: &mut String, allowed: fn(&str) -> bool) -> Result<(), FieldError> {
    match value {
        serde_json::Value::String(s) if s.contains('\0') && !allowed(path) => {
            Err(FieldError::new(if path.is_empty() { "body" } else { path.as_str() }, NUL_REASON))
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                refuse_nul(item, path, allowed)?;
                path.truncate(len);
            }
            Ok(())
        }
        serde_json::Value::Object(map) => {
            for (key, item) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                // The key is shown with its NUL spelled out, so the field name itself is text.
                path.push_str(&key.replace('\0', "\\0"));
                if key.contains('\0') {
                    return Err(FieldError::new(path.as_str(), NUL_REASON));
                }
                refuse_nul(item, path, allowed)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Path parameters (axum's `Path`), refused with a 422 naming `path.<name>` when one holds
/// NUL, and with the [`ApiError`] shape when they do not decode.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let raw = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        for (name, value) in raw.iter() {
            if value.contains('\0') {
                return Err(ApiError::invalid(format!("path.{name}"), NUL_REASON));
            }
        }
        let axum::extract::Path(value) = axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        Ok(ApiPath(value))
    }
}

/// Decodes a query string into `T` (its fields as strings), naming `query.<name>` on error;
/// a value or name holding NUL is refused.
pub fn parse_query<T: DeserializeOwned>(query: Option<&str>) -> Result<T, ApiError> {
    let mut map = serde_json::Map::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()).into_owned() {
        if k.contains('\0') || v.contains('\0') {
            return Err(ApiError::invalid(format!("query.{}", k.replace('\0', "\\0")), NUL_REASON));
        }
        map.insert(k, serde_json::Value::String(v));
    }
    pond_core::json::from_value_at(serde_json::Value::Object(map), "query").map_err(ApiError::Invalid)
}

/// Middleware for a whole router: an error response that is not JSON (axum's rejections and
/// fallbacks, a layer's plain-text answer) is answered in the [`ApiError`] shape, with the same
/// status and the original text (clipped) as its message.
pub async fn json_errors(req: Request<Body>, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if json {
        return response;
    }
    let (parts, body) = response.into_parts();
    // Such bodies are a line of text; anything longer is not worth relaying.
    let text = axum::body::to_bytes(body, 4096).await.map(|b| String::from_utf8_lossy(&b).trim().to_string());
    let text = text.ok().filter(|t| !t.is_empty());
    let message = text.unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_lowercase());
    let mut answer = ApiError::from_status(status, message).into_response();
    // Keep what the original said beyond its body (`Allow`, `Retry-After`, …).
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().entry(name).or_insert_with(|| value.clone());
        }
    }
    answer
}

/// A TCP listener for `axum::serve` whose connections close gracefully: see [`LingeringStream`].
pub struct LingeringListener(pub tokio::net::TcpListener);

impl axum::serve::Listener for LingeringListener {
    type Io = LingeringStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (LingeringStream(Some(stream)), addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// How long a closed connection keeps discarding what its client still sends.
const LINGER_FOR: Duration = Duration::from_secs(30);
/// A lingering connection whose client sends nothing for this long is dropped.
const LINGER_IDLE: Duration = Duration::from_secs(2);

/// A server connection that, when hyper is done with it (it answered without reading the whole
/// body, e.g. 401 or 413), sends its FIN and then reads and discards whatever the client is
/// still sending — until the client closes, goes quiet for 2 s, or 30 s have passed — before
/// closing. Closing with unread data would send a reset, and a client still sending its body
/// would see "connection reset" instead of the answer waiting in its receive buffer.
/// Discarding costs a fixed buffer, never memory in proportion to the body.
pub struct LingeringStream(Option<tokio::net::TcpStream>);

impl LingeringStream {
    /// Reads the next bytes without taking them (see `TcpStream::peek`).
    pub async fn peek(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream().get_mut().peek(buf).await
    }

    fn stream(&mut self) -> Pin<&mut tokio::net::TcpStream> {
        // Taken only in `drop`.
        Pin::new(self.0.as_mut().expect("stream present until dropped"))
    }
}

impl AsyncRead for LingeringStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for LingeringStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_write_vectored())
    }
}

impl Drop for LingeringStream {
    fn drop(&mut self) {
        let Some(stream) = self.0.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(linger(stream));
    }
}

async fn linger(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The answer is out; the FIN says nothing more comes (hyper may have sent it already).
    let _ = stream.shutdown().await;
    let mut sink = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + LINGER_FOR;
    loop {
        let wait = LINGER_IDLE.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => continue,
            _ => return,
        }
    }
}
