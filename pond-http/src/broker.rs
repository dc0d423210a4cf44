//! The credential broker: a reverse proxy on 127.0.0.1 between an agent CLI and its model API.
//! It holds the real key (unsealed only in this process), accepts only the per-task dummy key,
//! swaps it for the real one in `Authorization` / `x-api-key`, streams responses back
//! unbuffered, and meters token usage from them. The agent's environment carries only the dummy
//! key and the broker's URL.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Which API the broker fronts: how the key is sent and how errors and usage look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// OpenAI (`Authorization: Bearer`), Responses/Chat APIs.
    Openai,
    /// Anthropic (`x-api-key`), Messages API.
    Anthropic,
}

/// Tokens metered from the responses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Requests relayed.
    pub requests: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// The last error status (4xx/5xx) the provider answered, if any.
    pub last_error: Option<u16>,
}

/// Settings of one broker (one per task).
#[derive(Clone)]
pub struct BrokerConfig {
    /// The provider's base URL (e.g. `https://api.openai.com`), without a trailing slash.
    pub upstream: String,
    /// The provider.
    pub provider: Provider,
    /// The real key.
    pub real_key: String,
    /// The only key the broker accepts from the agent.
    pub dummy_key: String,
    /// What its calls may spend; past it, the response is cut off and calls are refused.
    pub limit: Option<pond_core::agents::BrokerLimit>,
    /// Where each call is booked, and the run and project budgets read before each call.
    pub account: Option<Arc<dyn pond_core::agents::SpendAccount>>,
}

impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a key.
        f.debug_struct("BrokerConfig").field("upstream", &self.upstream).field("provider", &self.provider).finish()
    }
}

/// The upstream client: HTTPS (webpki roots) or plain HTTP, async, so a call the stage no longer
/// needs is dropped — its connection closed — the moment the stage ends, however the provider
/// stalls (a blocking client could only give up at its read timeout).
type Upstream = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<Bytes>,
>;

/// Longest wait for the provider's next bytes (a slow model's first byte included).
const UPSTREAM_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

struct Shared {
    config: BrokerConfig,
    client: Upstream,
    /// Turns true when the stage ends: calls in flight stop waiting and reading.
    stop_signal: watch::Receiver<bool>,
    usage: Mutex<Usage>,
    /// Why it stopped relaying (its budget ran out).
    exhausted: Mutex<Option<String>>,
    /// Calls relayed whose metering has not ended (an agent may have what it needs from a
    /// response, and exit, before the broker has read and booked all of it).
    in_flight: std::sync::atomic::AtomicUsize,
    /// Tokens (input, output) metered so far of the responses still streaming: with `usage`,
    /// what the stage has spent at this moment, so responses in flight together are held to the
    /// budgets as one.
    streaming: Mutex<(u64, u64)>,
    /// Tokens (input, output) of this stage's calls booked in the store so far: what the run's
    /// and project's caps already count of this stage when they are read.
    booked: Mutex<(u64, u64)>,
}

/// How often a streaming response reads the run's and project's caps again, so what other
/// stages (on any node) booked meanwhile counts against it before it ends.
const CAPS_REREAD: std::time::Duration = std::time::Duration::from_millis(500);
/// The longest a streaming response waits for such a read (it keeps the caps it has otherwise).
const CAPS_READ_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A running broker.
pub struct Broker {
    /// Where the agent reaches it.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

impl Broker {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Usage metered so far.
    pub fn usage(&self) -> Usage {
        *self.shared.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls still being read and metered.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits (at most `limit`) until no call is being read and metered, so [`Broker::usage`]
    /// counts every call the agent made.
    pub async fn settle(&self, limit: std::time::Duration) {
        let until = tokio::time::Instant::now() + limit;
        while self.in_flight() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Why it stopped relaying, if its budget ran out.
    pub fn exhausted(&self) -> Option<String> {
        self.shared.exhausted.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops it: no new call is taken, and calls in flight stop waiting to retry and stop
    /// reading their response at its next bytes (the provider sees the connection close).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a broker on a free port of 127.0.0.1.
pub async fn start(config: BrokerConfig) -> std::io::Result<Broker> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
    http.enforce_http(false);
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        // The process's trust store: an internal model gateway's authority via --ca-cert.
        .with_tls_config((*crate::tls::client_config()).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    // No redirects: the legacy client never follows one.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(tls);
    let (stop, stopped) = watch::channel(false);
    let shared = Arc::new(Shared {
        config,
        client,
        stop_signal: stopped.clone(),
        usage: Mutex::default(),
        exhausted: Mutex::default(),
        streaming: Mutex::default(),
        booked: Mutex::default(),
        in_flight: Default::default(),
    });
    let app = Router::new().fallback(relay).with_state(shared.clone());
    let mut stopped = stopped;
    tokio::spawn(async move {
        let until = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let _ = axum::serve(listener, app).with_graceful_shutdown(until).await;
    });
    Ok(Broker { addr, shared, stop })
}

fn refuse(provider: Provider, status: StatusCode, message: &str) -> Response {
    // In the provider's own error format, so the CLI reports it sensibly.
    let body = match provider {
        Provider::Openai => {
            serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"}})
        }
        Provider::Anthropic => {
            serde_json::json!({"type": "error", "error": {"type": "authentication_error", "message": message}})
        }
    };
    (status, axum::Json(body)).into_response()
}

fn presented_key(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.to_string());
    }
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::to_string)
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// The provider API calls an agent needs: method and the path's last segments (after any base
/// path such as `/v1`). Anything else is refused before it reaches the provider with the real
/// key: the broker is no general relay.
fn allowed_call(provider: Provider, method: &str, path: &str) -> bool {
    let path = path.split('?').next().unwrap_or("").trim_end_matches('/');
    // The provider's URL parser removes `.`/`..` segments (percent-encoded too): a path that
    // has any, or any escape or `;`, could match here and reach another endpoint there.
    if path.contains('%') || path.contains(';') || path.split('/').any(|seg| seg == "." || seg == "..") {
        return false;
    }
    let (posts, gets): (&[&str], &[&str]) = match provider {
        Provider::Openai => (&["/responses", "/chat/completions", "/completions", "/embeddings"], &["/models"]),
        Provider::Anthropic => (&["/messages", "/messages/count_tokens"], &["/models"]),
    };
    let model_lookup = path.rsplit_once("/models/").is_some_and(|(_, id)| !id.is_empty() && !id.contains('/'));
    match method {
        "POST" => posts.iter().any(|p| path.ends_with(p)),
        "GET" => gets.iter().any(|p| path.ends_with(p)) || model_lookup,
        _ => false,
    }
}

/// Replaces every occurrence of the secrets in a byte stream, whatever the chunking: the last
/// `longest - 1` bytes are held back until the next chunk shows whether a secret goes on there.
struct Redactor {
    secrets: Vec<Vec<u8>>,
    held: Vec<u8>,
}

pub use pond_core::exec::REDACTED;

impl Redactor {
    fn new(secrets: &[&str]) -> Self {
        let secrets = secrets.iter().filter(|s| s.len() >= 8).map(|s| s.as_bytes().to_vec()).collect();
        Redactor { secrets, held: Vec::new() }
    }

    fn redact(&self, bytes: &[u8]) -> Vec<u8> {
        let secrets: Vec<&[u8]> = self.secrets.iter().map(Vec::as_slice).collect();
        pond_core::exec::redact(bytes, &secrets)
    }

    /// Bytes safe to send now: everything but a tail that could be the start of a secret
    /// (so a stream's events go out whole and at once unless they end like a key begins).
    fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.held.extend_from_slice(chunk);
        let mut text = self.redact(&self.held);
        let keep = self
            .secrets
            .iter()
            .filter_map(|secret| (1..secret.len().min(text.len() + 1)).rev().find(|&k| text.ends_with(&secret[..k])))
            .max()
            .unwrap_or(0);
        self.held = text.split_off(text.len() - keep);
        text
    }

    /// What is left at the end.
    fn finish(&mut self) -> Vec<u8> {
        let held = std::mem::take(&mut self.held);
        self.redact(&held)
    }

    fn text(&self, value: &str) -> String {
        String::from_utf8_lossy(&self.redact(value.as_bytes())).into_owned()
    }
}

/// The stage's spend (input, output tokens) at this moment: its ended calls and what its
/// responses still streaming have metered.
fn stage_spend(shared: &Shared) -> (u64, u64) {
    // Streaming first: a call ending in between moves its tokens into the ended total before it
    // leaves the streaming one, so it is counted twice at worst, never missed.
    let streaming = *shared.streaming.lock().unwrap_or_else(|p| p.into_inner());
    let ended = {
        let u = shared.usage.lock().unwrap_or_else(|p| p.into_inner());
        (u.input_tokens, u.output_tokens)
    };
    (ended.0 + streaming.0, ended.1 + streaming.1)
}

async fn relay(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let config = &shared.config;
    // Only the per-task dummy key; a wrong one never reaches the provider.
    if presented_key(req.headers()).as_deref() != Some(config.dummy_key.as_str()) {
        return refuse(config.provider, StatusCode::UNAUTHORIZED, "pond broker: unknown key");
    }
    if let Some(why) = shared.exhausted.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return refuse(config.provider, StatusCode::TOO_MANY_REQUESTS, &format!("pond broker: {why}"));
    }
    // The run's and project's budgets as they stand now, with what every other stage booked.
    // What this stage had booked is read first: a call booked in between is then counted
    // twice (safe), never missed.
    let booked_at_caps = *shared.booked.lock().unwrap_or_else(|p| p.into_inner());
    let caps = match &config.account {
        Some(account) => match account.caps().await {
            Ok(caps) => caps,
            // Not knowing what is left, pond does not spend.
            Err(e) => {
                return refuse(
                    config.provider,
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("pond broker: reading the budgets: {e}"),
                )
            }
        },
        None => Vec::new(),
    };
    // The same reckoning as while a response streams: the stage's ended calls not yet booked
    // and its responses streaming count too, and so does its own limit.
    let spent_now = stage_spend(&shared);
    let prices = config.account.as_ref().map(|a| a.prices()).unwrap_or((0.0, 0.0));
    let (extra_in, extra_out) =
        (spent_now.0.saturating_sub(booked_at_caps.0), spent_now.1.saturating_sub(booked_at_caps.1));
    let extra_cost = extra_in as f64 / 1e6 * prices.0 + extra_out as f64 / 1e6 * prices.1;
    let over = caps
        .iter()
        .find_map(|cap| cap.passed(extra_in + extra_out, extra_cost))
        .or_else(|| config.limit.as_ref().and_then(|limit| limit.passed(spent_now.0, spent_now.1)));
    if let Some(why) = over {
        // Spent for certain only by what is stored or ended; what is still streaming (or counted
        // twice for a moment) refuses this call without ending the stage.
        let ended = *shared.usage.lock().unwrap_or_else(|p| p.into_inner());
        let definite = caps.iter().any(|cap| cap.passed(0, 0.0).is_some())
            || config.limit.as_ref().is_some_and(|l| l.passed(ended.input_tokens, ended.output_tokens).is_some());
        if definite {
            *shared.exhausted.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
        }
        return refuse(config.provider, StatusCode::TOO_MANY_REQUESTS, &format!("pond broker: {why}"));
    }
    let shown_path = req.uri().path().chars().take(100).collect::<String>();
    if !allowed_call(config.provider, req.method().as_str(), req.uri().path()) {
        return refuse(
            config.provider,
            StatusCode::FORBIDDEN,
            &format!("pond broker: {} {shown_path} is not a model API call this broker relays", req.method()),
        );
    }
    let method = req.method().as_str().to_string();
    let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in req.headers() {
        let name = name.as_str();
        // `host` names the broker; the client names the provider.
        if HOP_BY_HOP.contains(&name)
            || name == "host"
            || name == "authorization"
            || name == "x-api-key"
            || name == "accept-encoding"
            || name == "content-length"
        {
            continue;
        }
        if let Ok(v) = value.to_str() {
            headers.push((name.to_string(), v.to_string()));
        }
    }
    let body = match axum::body::to_bytes(req.into_body(), 64 * 1024 * 1024).await {
        Ok(b) => b,
        Err(e) => return refuse(config.provider, StatusCode::BAD_REQUEST, &format!("reading the request: {e}")),
    };
    // Under a budget every call must report what it costs.
    let metered = config.limit.is_some() || !caps.is_empty();
    let body = match metered {
        true => match metered_body(&path, body) {
            Ok(b) => b,
            Err(why) => return refuse(config.provider, StatusCode::BAD_REQUEST, &format!("pond broker: {why}")),
        },
        false => body,
    };
    // What this stage spends beyond what it had booked when the caps were read — calls that
    // ended since, and every response streaming — counts against them on top of that.
    let (mut caps, mut booked_at_caps, mut caps_read) = (caps, booked_at_caps, tokio::time::Instant::now());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let (head_tx, head_rx) = tokio::sync::oneshot::channel::<Result<(u16, Vec<(String, String)>), String>>();
    let worker = shared.clone();
    // Counted from here to the end of metering (the guard drops at the end of the task).
    let flight = InFlight::new(shared.clone());
    tokio::spawn(async move {
        let _flight = flight;
        let config = &worker.config;
        let send = || {
            let mut request =
                axum::http::Request::builder().method(method.as_str()).uri(format!("{}{path}", config.upstream));
            for (name, value) in &headers {
                request = request.header(name.as_str(), value.as_str());
            }
            // Metering reads the stream, so ask for it uncompressed.
            request = request.header("accept-encoding", "identity");
            request = match config.provider {
                Provider::Openai => request.header("authorization", format!("Bearer {}", config.real_key)),
                Provider::Anthropic => request.header("x-api-key", config.real_key.as_str()),
            };
            let request = request.body(http_body_util::Full::new(body.clone()));
            let client = worker.client.clone();
            async move {
                let request = request.map_err(|e| e.to_string())?;
                match tokio::time::timeout(UPSTREAM_READ_TIMEOUT, client.request(request)).await {
                    Ok(Ok(response)) => Ok(response),
                    Ok(Err(e)) => Err(upstream_error(&e)),
                    Err(_) => Err(format!("no answer within {}s", UPSTREAM_READ_TIMEOUT.as_secs())),
                }
            }
        };
        // A provider that asks to be called again later (429/503 with `Retry-After`) is, after
        // that wait, up to RETRIES times while the wait is short: the agent sees a slow answer,
        // not a failure. A longer wait, or the stage ending, hands the answer on as it is. The
        // stage ending also drops a call in flight (its connection closes at once).
        let mut retries = 0;
        let response = loop {
            let sent = tokio::select! {
                sent = send() => sent,
                _ = worker.stopped() => break None,
            };
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    let _ = head_tx.send(Err(e));
                    return;
                }
            };
            let wait = retry_after(response.status().as_u16(), |name| {
                response.headers().get(name).and_then(|v| v.to_str().ok())
            });
            match wait {
                Some(wait) if retries < RETRIES && !worker.is_stopped() => {
                    retries += 1;
                    drop(response);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = worker.stopped() => break None,
                    }
                }
                _ => break Some(response),
            }
        };
        let Some(response) = response else {
            let _ = head_tx.send(Err("the stage ended before the provider answered".into()));
            return;
        };
        let status = response.status().as_u16();
        if status >= 400 {
            worker.usage.lock().unwrap_or_else(|p| p.into_inner()).last_error = Some(status);
        }
        // Whatever the provider sends back — an error body echoing the key, a header, a
        // stream — reaches the agent with the real key redacted.
        let mut redactor = Redactor::new(&[&config.real_key]);
        let head: Vec<(String, String)> = response
            .headers()
            .iter()
            .filter(|(n, _)| !HOP_BY_HOP.contains(&n.as_str()) && n.as_str() != "content-length")
            .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str().to_string(), redactor.text(v))))
            .collect();
        if head_tx.send(Ok((status, head))).is_err() {
            return;
        }
        let mut body = response.into_body();
        let mut meter = Meter::default();
        // What of this response is counted in the shared `streaming` total.
        let mut counted = (0u64, 0u64);
        let mut gone = false;
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(UPSTREAM_READ_TIMEOUT, http_body_util::BodyExt::frame(&mut body)) => next,
                _ = worker.stopped() => {
                    let _ = tx.try_send(Err(std::io::Error::other("the stage ended")));
                    break;
                }
            };
            let chunk = match next {
                Err(_) => {
                    let why = format!("the provider sent nothing for {}s", UPSTREAM_READ_TIMEOUT.as_secs());
                    let _ = tx.try_send(Err(std::io::Error::other(why)));
                    break;
                }
                Ok(None) => {
                    let rest = redactor.finish();
                    if !rest.is_empty() {
                        tokio::select! {
                            _ = tx.send(Ok(Bytes::from(rest))) => {}
                            _ = worker.stopped() => {}
                        }
                    }
                    break;
                }
                Ok(Some(Err(e))) => {
                    let _ = tx.try_send(Err(std::io::Error::other(e.to_string())));
                    break;
                }
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue, // trailers
                },
            };
            meter.feed(&chunk);
            // This response's tokens so far join the stage's streaming total.
            {
                let mut streaming = worker.streaming.lock().unwrap_or_else(|p| p.into_inner());
                streaming.0 += meter.input.saturating_sub(counted.0);
                streaming.1 += meter.output.saturating_sub(counted.1);
                counted = (counted.0.max(meter.input), counted.1.max(meter.output));
            }
            // The stage's spend now: calls that ended, and every response streaming (this one
            // included). Past a budget: this response goes no further (the agent sees it cut
            // off), nor does any other of the stage's in flight, and no call after it is
            // relayed; what was metered is accounted.
            let (input, output) = stage_spend(&worker);
            // Other stages' calls, on any node, count once booked: the caps are read again while
            // this response streams.
            // Only where a budget applies; a slow store delays a chunk by at most a second.
            if let Some(account) = config.account.as_ref().filter(|_| !caps.is_empty()) {
                if caps_read.elapsed() >= CAPS_REREAD {
                    let booked = *worker.booked.lock().unwrap_or_else(|p| p.into_inner());
                    if let Ok(Ok(fresh)) = tokio::time::timeout(CAPS_READ_LIMIT, account.caps()).await {
                        (caps, booked_at_caps) = (fresh, booked);
                    }
                    caps_read = tokio::time::Instant::now();
                }
            }
            let (extra_in, extra_out) =
                (input.saturating_sub(booked_at_caps.0), output.saturating_sub(booked_at_caps.1));
            let cost = extra_in as f64 / 1e6 * prices.0 + extra_out as f64 / 1e6 * prices.1;
            let over_cap = caps.iter().find_map(|cap| cap.passed(extra_in + extra_out, cost));
            let over_stage = config.limit.as_ref().and_then(|limit| limit.passed(input, output));
            let spent_elsewhere = worker.exhausted.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(why) = spent_elsewhere {
                let _ = tx.try_send(Err(std::io::Error::other(why)));
                break;
            }
            if let Some(why) = over_stage.or(over_cap) {
                *worker.exhausted.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
                let _ = tx.try_send(Err(std::io::Error::other(why)));
                break;
            }
            // Each read goes out as it arrives (less what may be the start of a key): streams
            // stay unbuffered. An agent that went away stops getting it, but the response is
            // still read to its end: what it costs is metered.
            let out = redactor.feed(&chunk);
            // An agent that stops reading does not hold the call past the stage's end.
            if !gone && !out.is_empty() {
                let sent = tokio::select! {
                    sent = tx.send(Ok(Bytes::from(out))) => sent.is_ok(),
                    _ = worker.stopped() => {
                        let _ = tx.try_send(Err(std::io::Error::other("the stage ended")));
                        break;
                    }
                };
                gone = !sent;
            }
        }
        // The connection is released (or closed, when the response was not read to its end)
        // here, not at a read timeout.
        drop(body);
        meter.finish();
        // Under a budget, a successful call whose cost cannot be read is not let through again:
        // pond stops rather than spend unmetered.
        // (Listing models and counting tokens cost nothing and say no usage.)
        let billed = method == "POST" && !path.split('?').next().unwrap_or_default().ends_with("/count_tokens");
        if metered && billed && (200..300).contains(&status) && !meter.found {
            worker.exhausted.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| {
                format!(
                    "{}: a model call reported no usage, so the budget cannot be kept",
                    pond_core::agents::BUDGET_EXHAUSTED
                )
            });
        }
        let provider = match config.provider {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
        };
        metrics::counter!("pond_broker_tokens_total", "provider" => provider, "kind" => "input").increment(meter.input);
        metrics::counter!("pond_broker_tokens_total", "provider" => provider, "kind" => "output")
            .increment(meter.output);
        {
            // Into the ended calls first, then out of the streaming total: the stage's spend is
            // never under-read in between.
            let mut usage = worker.usage.lock().unwrap_or_else(|p| p.into_inner());
            usage.requests += 1;
            usage.input_tokens += meter.input;
            usage.output_tokens += meter.output;
            drop(usage);
            let mut streaming = worker.streaming.lock().unwrap_or_else(|p| p.into_inner());
            streaming.0 = streaming.0.saturating_sub(counted.0);
            streaming.1 = streaming.1.saturating_sub(counted.1);
        }
        // Booked as it ends, so the next call (of any stage) reads it against the budgets. A call
        // that cannot be booked stops the broker: pond does not spend what it cannot account.
        if let Some(account) = &config.account {
            let call =
                pond_core::usage::TokenUsage { requests: 1, input_tokens: meter.input, output_tokens: meter.output };
            let booked = account.book(call).await;
            if booked.is_ok() {
                let mut booked = worker.booked.lock().unwrap_or_else(|p| p.into_inner());
                booked.0 += meter.input;
                booked.1 += meter.output;
            }
            if let Err(e) = booked {
                worker.exhausted.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| {
                    format!("{}: a model call's usage could not be booked ({e})", pond_core::agents::BUDGET_EXHAUSTED)
                });
            }
        }
    });
    let (status, head) = match head_rx.await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => {
            let e = Redactor::new(&[&config.real_key]).text(&e);
            return refuse(config.provider, StatusCode::BAD_GATEWAY, &format!("pond broker: upstream: {e}"));
        }
        Err(_) => return refuse(config.provider, StatusCode::BAD_GATEWAY, "pond broker: upstream failed"),
    };
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (name, value) in head {
        if let (Ok(name), Ok(value)) =
            (axum::http::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value))
        {
            response.headers_mut().append(name, value);
        }
    }
    response
}

/// One call being relayed and metered, in [`Shared::in_flight`] while it lives.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: Arc<Shared>) -> Self {
        shared.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How often a call the provider asked to retry later is retried by the broker.
const RETRIES: u32 = 3;
/// The longest `Retry-After` the broker waits out itself.
const LONGEST_RETRY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long the provider asks to wait before calling again: a 429 or 503 with `retry-after-ms`,
/// or `Retry-After` in seconds or as an HTTP date; `None` when it does not say, or says longer
/// than [`LONGEST_RETRY_WAIT`].
fn retry_after<'a>(status: u16, header: impl Fn(&str) -> Option<&'a str>) -> Option<std::time::Duration> {
    if status != 429 && status != 503 {
        return None;
    }
    let wait = if let Some(ms) = header("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        let longest = LONGEST_RETRY_WAIT.as_secs_f64() * 1000.0;
        (ms.is_finite() && (0.0..=longest).contains(&ms)).then(|| std::time::Duration::from_secs_f64(ms / 1000.0))?
    } else {
        let value = header("retry-after")?.trim();
        match value.parse::<u64>() {
            Ok(secs) => std::time::Duration::from_secs(secs),
            Err(_) => {
                let at = httpdate::parse_http_date(value).ok()?;
                at.duration_since(std::time::SystemTime::now()).unwrap_or_default()
            }
        }
    };
    (wait <= LONGEST_RETRY_WAIT).then_some(wait)
}

impl Shared {
    fn is_stopped(&self) -> bool {
        *self.stop_signal.borrow()
    }

    /// Resolves when the broker stops (at once if it has).
    async fn stopped(&self) {
        let mut signal = self.stop_signal.clone();
        let _ = signal.wait_for(|s| *s).await;
    }
}

/// An upstream failure in words, with its causes (hyper's own message is only the outermost).
fn upstream_error(e: &hyper_util::client::legacy::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Starts brokers for the swarm executor.
pub struct HttpKeyBroker;

struct Session(Broker);

impl pond_core::agents::BrokerSession for Session {
    fn url(&self) -> String {
        self.0.url()
    }
    fn usage(&self) -> (u64, u64, u64) {
        let u = self.0.usage();
        (u.requests, u.input_tokens, u.output_tokens)
    }
    fn last_error(&self) -> Option<u16> {
        self.0.usage().last_error
    }
    fn exhausted(&self) -> Option<String> {
        self.0.exhausted()
    }
    fn in_flight(&self) -> usize {
        self.0.in_flight()
    }
}

#[async_trait::async_trait]
impl pond_core::agents::KeyBroker for HttpKeyBroker {
    async fn start(
        &self,
        provider: &str,
        upstream: &str,
        real_key: &str,
        dummy_key: &str,
        limit: Option<pond_core::agents::BrokerLimit>,
        account: Option<Arc<dyn pond_core::agents::SpendAccount>>,
    ) -> Result<Box<dyn pond_core::agents::BrokerSession>, String> {
        let provider = match provider {
            "anthropic" => Provider::Anthropic,
            _ => Provider::Openai,
        };
        let config = BrokerConfig {
            upstream: upstream.trim_end_matches('/').to_string(),
            provider,
            real_key: real_key.to_string(),
            dummy_key: dummy_key.to_string(),
            limit,
            account,
        };
        start(config)
            .await
            .map(|b| Box::new(Session(b)) as Box<dyn pond_core::agents::BrokerSession>)
            .map_err(|e| e.to_string())
    }
}

/// Resolves agents from the server's registry and credentials (the real key is unsealed here,
/// in the process that runs the broker).
pub struct ServerAgents {
    /// Models and harnesses.
    pub registry: pond_core::agents::Registry,
    /// Credentials.
    pub credentials: pond_core::credentials::Credentials,
    /// Where stages' model calls are booked and budgets read, with the clock that dates them.
    pub ledger: Option<(pond_core::usage::Ledger, Arc<dyn pond_core::time::Clock>)>,
}

/// Model spend by project and model, as booked (local calls one by one, pooled jobs with their
/// result).
pub fn record_spend(project: &str, model: Option<&str>, spend: &pond_core::usage::Spend) {
    let (project, model) = (project.to_string(), model.unwrap_or("-").to_string());
    let labels = [("project", project), ("model", model)];
    metrics::counter!("pond_model_requests_total", &labels).increment(spend.requests);
    metrics::counter!("pond_model_input_tokens_total", &labels).increment(spend.input_tokens);
    metrics::counter!("pond_model_output_tokens_total", &labels).increment(spend.output_tokens);
    metrics::counter!("pond_model_cost_microusd_total", &labels).increment((spend.cost_usd * 1e6).round() as u64);
}

/// A local stage's account in the server's books.
struct LedgerAccount {
    ledger: pond_core::usage::Ledger,
    clock: Arc<dyn pond_core::time::Clock>,
    project: String,
    run: pond_core::ids::RunId,
    run_budget: Option<pond_core::definition::Budget>,
    stage: String,
    attempt: u32,
    model: Option<pond_core::agents::Model>,
}

#[async_trait::async_trait]
impl pond_core::agents::SpendAccount for LedgerAccount {
    async fn caps(&self) -> Result<Vec<pond_core::agents::BudgetCap>, String> {
        self.ledger.caps(&self.project, self.run, self.run_budget, self.clock.now()).await.map_err(|e| e.to_string())
    }

    async fn book(&self, usage: pond_core::usage::TokenUsage) -> Result<(), String> {
        let spend = pond_core::usage::Spend::priced(usage, self.model.as_ref());
        let model = self.model.as_ref().map(|m| m.key.as_str());
        // A store that is away for a moment is waited for (about 3 s) before the call is given
        // up as unbooked.
        let mut wait = std::time::Duration::from_millis(100);
        let mut last = String::new();
        for _ in 0..5 {
            let booked = self
                .ledger
                .book(
                    &self.project,
                    self.run,
                    &self.stage,
                    self.attempt,
                    model,
                    spend,
                    pond_core::usage::Booking::Add,
                    self.clock.now(),
                )
                .await;
            match booked {
                Ok(_) => {
                    record_spend(&self.project, model, &spend);
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
        Err(last)
    }

    fn prices(&self) -> (f64, f64) {
        self.model
            .as_ref()
            .map(|m| (m.input_usd_per_mtok.unwrap_or(0.0), m.output_usd_per_mtok.unwrap_or(0.0)))
            .unwrap_or((0.0, 0.0))
    }
}

#[async_trait::async_trait]
impl pond_core::agents::AgentResolver for ServerAgents {
    async fn resolve(
        &self,
        harness: &str,
        model: Option<&str>,
        project: &str,
    ) -> Result<pond_core::agents::ResolvedAgent, String> {
        let found = self.registry.harness(harness).await.map_err(|e| e.to_string())?;
        let harness = found.ok_or_else(|| format!("no harness `{harness}` is registered"))?;
        let model = match model {
            Some(key) => Some(
                self.registry
                    .model(key)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("no model `{key}` is registered"))?,
            ),
            None => None,
        };
        let real_key = match &model {
            Some(m) => {
                let values = self
                    .credentials
                    .values(std::slice::from_ref(&m.credential_name), project)
                    .await
                    .map_err(|e| e.to_string())?;
                values.into_values().next()
            }
            None => None,
        };
        Ok(pond_core::agents::ResolvedAgent { harness, model, real_key })
    }

    fn account(
        &self,
        run: &pond_core::run::Run,
        stage: &str,
        attempt: u32,
        model: Option<&pond_core::agents::Model>,
    ) -> Option<Arc<dyn pond_core::agents::SpendAccount>> {
        let (ledger, clock) = self.ledger.clone()?;
        Some(Arc::new(LedgerAccount {
            ledger,
            clock,
            project: run.project_id.clone(),
            run: run.id,
            run_budget: run.definition.budget,
            stage: stage.to_string(),
            attempt,
            model: model.cloned(),
        }))
    }
}

/// A request body as relayed under a budget: a streamed chat completion is asked to report its
/// usage (`stream_options.include_usage`), and a background response (billed, never streamed
/// back) is refused. Bodies that are not JSON objects pass as they are.
fn metered_body(path: &str, body: Bytes) -> Result<Bytes, String> {
    let Ok(serde_json::Value::Object(mut request)) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return Ok(body);
    };
    if request.get("background").and_then(|b| b.as_bool()) == Some(true) {
        return Err("a background response cannot be metered, so it is not relayed under a budget".into());
    }
    let path = path.split('?').next().unwrap_or(path);
    if path.ends_with("/completions") && request.get("stream").and_then(|s| s.as_bool()) == Some(true) {
        let options = request.entry("stream_options").or_insert_with(|| serde_json::json!({}));
        if let Some(options) = options.as_object_mut() {
            options.insert("include_usage".into(), true.into());
        }
        return serde_json::to_vec(&serde_json::Value::Object(request)).map(Bytes::from).map_err(|e| e.to_string());
    }
    Ok(body)
}

/// Reads token usage from a response as it streams: SSE `data:` lines or a plain JSON body.
/// OpenAI puts it in `response.completed` (`usage.input_tokens` / `output_tokens`); Anthropic
/// in `message_start` (input) and `message_delta` (cumulative output).
#[derive(Default)]
struct Meter {
    pending: Vec<u8>,
    input: u64,
    output: u64,
    /// The body is one JSON document (not an event stream): read whole at the end, however it
    /// is laid out over lines.
    whole: Option<bool>,
    /// A `usage` object was seen.
    found: bool,
}

impl Meter {
    fn feed(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        if self.whole.is_none() {
            if let Some(first) = self.pending.iter().find(|b| !b.is_ascii_whitespace()) {
                self.whole = Some(*first == b'{' || *first == b'[');
            }
        }
        if self.whole == Some(true) {
            // Kept whole (bounded) and read at the end.
            if self.pending.len() > 32 * 1024 * 1024 {
                self.pending.clear();
            }
            return;
        }
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.line(&line);
        }
        if self.pending.len() > 8 * 1024 * 1024 {
            self.pending.clear();
        }
    }

    fn line(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        let json = text.strip_prefix("data:").map(str::trim).unwrap_or(text);
        if !json.starts_with('{') {
            return;
        }
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(json) {
            self.usage_in(&value);
        }
    }

    fn finish(&mut self) {
        let rest = std::mem::take(&mut self.pending);
        self.line(&rest);
    }

    fn usage_in(&mut self, value: &serde_json::Value) {
        let serde_json::Value::Object(map) = value else { return };
        if let Some(usage) = map.get("usage").and_then(|u| u.as_object()) {
            self.found = true;
            let get = |k: &str| usage.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            // Anthropic counts cache reads and writes apart from `input_tokens`; OpenAI's
            // `input_tokens` already include its cached ones.
            let input = get("input_tokens").max(get("prompt_tokens"))
                + get("cache_creation_input_tokens")
                + get("cache_read_input_tokens");
            let output = get("output_tokens").max(get("completion_tokens"));
            // Counts within one response are cumulative: keep the largest.
            self.input = self.input.max(input);
            self.output = self.output.max(output);
        }
        for v in map.values() {
            if v.is_object() {
                self.usage_in(v);
            }
        }
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn a_secret_is_redacted_however_the_stream_is_cut() {
        let key = "sk-live-REAL-0123456789abcdef";
        let text = format!("error: invalid key {key}; again:{key}.");
        for cut in 1..text.len() {
            let mut r = Redactor::new(&[key]);
            let mut out = Vec::new();
            for chunk in text.as_bytes().chunks(cut) {
                out.extend(r.feed(chunk));
            }
            out.extend(r.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("error: invalid key {REDACTED}; again:{REDACTED}."),
                "chunks of {cut}"
            );
        }
        assert_eq!(Redactor::new(&[key]).text(&format!("Bearer {key}")), format!("Bearer {REDACTED}"));
    }

    #[test]
    fn only_model_calls_are_relayed() {
        let openai =
            [("POST", "/v1/responses"), ("POST", "/responses"), ("GET", "/v1/models"), ("GET", "/v1/models/gpt-5")];
        for (method, path) in openai {
            assert!(allowed_call(Provider::Openai, method, path), "{method} {path}");
        }
        let anthropic =
            [("POST", "/v1/messages"), ("POST", "/v1/messages?beta=true"), ("POST", "/v1/messages/count_tokens")];
        for (method, path) in anthropic {
            assert!(allowed_call(Provider::Anthropic, method, path), "{method} {path}");
        }
        for (method, path) in [
            ("GET", "/v1/responses"),
            ("DELETE", "/v1/models/x"),
            ("POST", "/v1/organization/api_keys"),
            ("POST", "/v1/files"),
            ("GET", "/admin"),
            ("POST", "/v1/messages"),
            ("GET", "/v1/chat/completions/models/%2e%2e"),
            ("GET", "/v1/files/f1/content/models/.."),
            ("GET", "/v1/models/%2fx"),
        ] {
            assert!(!allowed_call(Provider::Openai, method, path), "{method} {path}");
        }
    }
}
