//! [`Client`]: a typed, blocking client for the `/v1` API (ureq), used by the CLI, the
//! benchmark and tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use pond_core::store::LogLine;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::error::ErrorBody;
use crate::wire::{ArtifactList, BundleCreated, KeyList, KeyView, LogEnd, LogPage, RunPage, RunView};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{} ({status}): {}", body.error.code, body.error.message)]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
    /// The server could not be reached.
    #[error("cannot reach {url}: {message}")]
    Transport {
        /// What was called.
        url: String,
        /// Why it failed.
        message: String,
    },
    /// The response was not what the API promises.
    #[error("unexpected response: {0}")]
    Decode(String),
    /// Writing a download failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The HTTP status, for API errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A transport failure, without ureq's repetition of the URL.
pub(crate) fn transport(url: String, t: &ureq::Transport) -> ClientError {
    let text = t.to_string();
    let mut message = text.strip_prefix(&format!("{url}: ")).unwrap_or(&text).to_string();
    if let Some(hint) = crate::tls::hint(&url, &message) {
        message = format!("{message} ({hint})");
    }
    ClientError::Transport { url, message }
}

/// A connection to one pond server.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

pub(crate) fn encode_path(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn encode_query(value: &str) -> String {
    encode_path(value).replace('/', "%2F")
}

impl Client {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:8420`).
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent = ureq::AgentBuilder::new()
            // Servers learn which release calls them (`pond pool ls` shows members' versions).
            .user_agent(concat!("pond/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(90))
            .max_idle_connections_per_host(64)
            .tls_config(crate::tls::client_config())
            .build();
        Client { base: base.trim_end_matches('/').to_string(), token, agent }
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn request(&self, method: &str, path: &str) -> ureq::Request {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.set("Authorization", &format!("Bearer {token}"));
        }
        req
    }

    pub(crate) fn send(&self, req: ureq::Request, body: Option<Body<'_>>) -> Result<ureq::Response, ClientError> {
        let url = req.url().to_string();
        let result = match body {
            None => req.call(),
            Some(Body::Json(v)) => req.send_json(v),
            Some(Body::Bytes(b, ct)) => req.set("Content-Type", ct).send_bytes(b),
        };
        match result {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(status, response)) => {
                let text = response.into_string().unwrap_or_default();
                let body = serde_json::from_str::<ErrorBody>(&text).unwrap_or_else(|_| ErrorBody {
                    error: crate::error::ErrorDetail {
                        code: "http_error".into(),
                        message: text.chars().take(500).collect(),
                        field: None,
                        reason: None,
                    },
                });
                Err(ClientError::Api { status, body })
            }
            Err(ureq::Error::Transport(t)) => Err(transport(url, &t)),
        }
    }

    pub(crate) fn json<T: DeserializeOwned>(
        &self,
        req: ureq::Request,
        body: Option<Body<'_>>,
    ) -> Result<T, ClientError> {
        let response = self.send(req, body)?;
        response.into_json::<T>().map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `POST /v1/runs`.
    pub fn submit(&self, body: &serde_json::Value, idempotency_key: Option<&str>) -> Result<RunView, ClientError> {
        let mut req = self.request("POST", "/v1/runs");
        if let Some(key) = idempotency_key {
            req = req.set("Idempotency-Key", key);
        }
        self.json(req, Some(Body::Json(body.clone())))
    }

    /// `GET /v1/runs/{id}`.
    pub fn get_run(&self, id: &str) -> Result<RunView, ClientError> {
        self.json(self.request("GET", &format!("/v1/runs/{}", encode_path(id))), None)
    }

    /// `GET /v1/runs/{id}/keys`: the keys of the nodes and workers that ran the run's attempts.
    pub fn run_keys(&self, id: &str) -> Result<crate::keys_api::RunKeys, ClientError> {
        self.json(self.request("GET", &format!("/v1/runs/{}/keys", encode_path(id))), None)
    }

    /// The server's largest bundle upload, from `/healthz` (64 MiB when it does not say).
    pub fn bundle_limit(&self) -> Result<u64, ClientError> {
        let health: serde_json::Value = self.json(self.request("GET", "/healthz"), None)?;
        Ok(health["limits"]["max_bundle_bytes"].as_u64().unwrap_or(64 << 20))
    }

    /// `GET /v1/log/tree-head`.
    pub fn tree_head(&self) -> Result<pond_core::transparency::TreeHead, ClientError> {
        self.json(self.request("GET", "/v1/log/tree-head"), None)
    }

    /// `GET /v1/log/consistency?first=&second=`.
    pub fn log_consistency(&self, first: u64, second: u64) -> Result<crate::keys_api::ConsistencyProof, ClientError> {
        self.json(self.request("GET", &format!("/v1/log/consistency?first={first}&second={second}")), None)
    }

    /// `GET /v1/runs/{id}/log?tree_size=`.
    pub fn run_log(&self, id: &str, tree_size: u64) -> Result<crate::keys_api::RunLog, ClientError> {
        self.json(self.request("GET", &format!("/v1/runs/{}/log?tree_size={tree_size}", encode_path(id))), None)
    }

    /// `GET /v1/keys`: the control plane's log-signing keys.
    pub fn keys(&self) -> Result<crate::keys_api::KeysDocument, ClientError> {
        self.json(self.request("GET", "/v1/keys"), None)
    }

    /// `GET /v1/runs`.
    pub fn list_runs(
        &self,
        project: Option<&str>,
        state: Option<&str>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<RunPage, ClientError> {
        self.search_runs(project, state, None, limit, cursor)
    }

    /// `GET /v1/runs` with `text`: runs whose id, idempotency key, error or definition holds it.
    pub fn search_runs(
        &self,
        project: Option<&str>,
        state: Option<&str>,
        text: Option<&str>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<RunPage, ClientError> {
        let mut query = Vec::new();
        if let Some(t) = text {
            query.push(format!("text={}", encode_query(t)));
        }
        if let Some(p) = project {
            query.push(format!("project={}", encode_query(p)));
        }
        if let Some(s) = state {
            query.push(format!("state={}", encode_query(s)));
        }
        if let Some(l) = limit {
            query.push(format!("limit={l}"));
        }
        if let Some(c) = cursor {
            query.push(format!("cursor={}", encode_query(c)));
        }
        let path = if query.is_empty() { "/v1/runs".to_string() } else { format!("/v1/runs?{}", query.join("&")) };
        self.json(self.request("GET", &path), None)
    }

    /// `POST /v1/runs/{id}/cancel`.
    pub fn cancel(&self, id: &str) -> Result<RunView, ClientError> {
        self.json(self.request("POST", &format!("/v1/runs/{}/cancel", encode_path(id))), None)
    }

    /// `POST /v1/runs/cancel`: every queued or running run of `project` (or only `state`).
    pub fn cancel_many(&self, project: &str, state: Option<&str>) -> Result<crate::wire::BulkCancelled, ClientError> {
        let body = serde_json::json!({"project": project, "state": state});
        self.json(self.request("POST", "/v1/runs/cancel"), Some(Body::Json(body)))
    }

    /// `GET /v1/runs/{id}/logs?after=…`.
    pub fn logs(&self, id: &str, after: i64, limit: u32) -> Result<LogPage, ClientError> {
        self.json(self.request("GET", &format!("/v1/runs/{}/logs?after={after}&limit={limit}", encode_path(id))), None)
    }

    /// Follows a run's log (`?follow=1`, server-sent events) until the run ends, calling
    /// `on_line` for each line. Reconnects from the last line seen when the connection drops.
    pub fn follow_logs(&self, id: &str, after: i64, on_line: &mut dyn FnMut(&LogLine)) -> Result<LogEnd, ClientError> {
        let mut cursor = after;
        let mut failures = 0;
        loop {
            let req = self.request("GET", &format!("/v1/runs/{}/logs?follow=1&after={cursor}", encode_path(id)));
            match self.send(req, None) {
                Ok(response) => {
                    failures = 0;
                    if let Some(end) = read_events(response.into_reader(), &mut cursor, on_line)? {
                        return Ok(end);
                    }
                }
                Err(e @ ClientError::Api { .. }) => return Err(e),
                Err(e) => {
                    failures += 1;
                    if failures > 30 {
                        return Err(e);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `GET /v1/runs/{id}/artifacts`.
    pub fn artifacts(&self, id: &str) -> Result<ArtifactList, ClientError> {
        self.json(self.request("GET", &format!("/v1/runs/{}/artifacts", encode_path(id))), None)
    }

    /// Downloads an artifact into `out`, checking its SHA-256 against the server's record.
    pub fn download_artifact(&self, id: &str, name: &str, out: &mut dyn Write) -> Result<u64, ClientError> {
        let req = self.request("GET", &format!("/v1/runs/{}/artifacts/{}", encode_path(id), encode_path(name)));
        let response = self.send(req, None)?;
        let expected = response.header("x-pond-sha256").map(str::to_string);
        let mut reader = response.into_reader();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            total += n as u64;
        }
        let got = hex::encode(hasher.finalize());
        match expected {
            Some(want) if want != got => {
                Err(ClientError::Decode(format!("artifact `{name}` arrived corrupted: sha256 {got}, expected {want}")))
            }
            _ => Ok(total),
        }
    }

    /// `POST /v1/bundles?project=…` with a `tar.zst` body.
    pub fn upload_bundle(&self, project: &str, data: &[u8]) -> Result<BundleCreated, ClientError> {
        let req = self.request("POST", &format!("/v1/bundles?project={}", encode_query(project)));
        self.json(req, Some(Body::Bytes(data, "application/zstd")))
    }

    /// `POST /v1/admin/keys`.
    pub fn create_key(&self, projects: &[String], name: Option<&str>) -> Result<KeyView, ClientError> {
        let body = serde_json::json!({"projects": projects, "name": name});
        self.json(self.request("POST", "/v1/admin/keys"), Some(Body::Json(body)))
    }

    /// `POST /v1/keys/rotate`: this client's token replaced by a new one (returned once).
    pub fn whoami(&self) -> Result<crate::wire::WhoAmI, ClientError> {
        self.json(self.request("GET", "/v1/whoami"), None)
    }

    /// `POST /v1/keys/rotate`.
    pub fn rotate_own_key(&self) -> Result<KeyView, ClientError> {
        self.json(self.request("POST", "/v1/keys/rotate"), None)
    }

    /// `GET /v1/admin/keys`.
    pub fn list_keys(&self) -> Result<KeyList, ClientError> {
        self.json(self.request("GET", "/v1/admin/keys"), None)
    }

    /// `DELETE /v1/admin/keys/{id}`.
    pub fn revoke_key(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.request("DELETE", &format!("/v1/admin/keys/{}", encode_path(id))), None).map(|_| ())
    }

    /// `GET /v1/usage?project=&from=&to=`: a project's model spend per day and model.
    pub fn usage(
        &self,
        project: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<crate::usage_api::ProjectUsage, ClientError> {
        let mut query = format!("project={}", encode_query(project));
        for (name, value) in [("from", from), ("to", to)] {
            if let Some(v) = value {
                query.push_str(&format!("&{name}={}", encode_query(v)));
            }
        }
        self.json(self.request("GET", &format!("/v1/usage?{query}")), None)
    }

    /// `GET /v1/runs/{id}/usage`: a run's model spend per stage attempt.
    pub fn run_usage(&self, id: &str) -> Result<pond_core::usage::RunUsage, ClientError> {
        self.json(self.request("GET", &format!("/v1/runs/{}/usage", encode_path(id))), None)
    }

    /// `GET /v1/admin/budgets`.
    pub fn budgets(&self) -> Result<Vec<crate::usage_api::ProjectBudget>, ClientError> {
        self.json(self.request("GET", "/v1/admin/budgets"), None)
    }

    /// `PUT /v1/admin/budgets/{project}`: a project's monthly budget.
    pub fn set_budget(
        &self,
        project: &str,
        budget: &pond_core::definition::Budget,
    ) -> Result<crate::usage_api::ProjectBudget, ClientError> {
        let body = serde_json::to_value(budget).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.json(self.request("PUT", &format!("/v1/admin/budgets/{}", encode_path(project))), Some(Body::Json(body)))
    }

    /// `DELETE /v1/admin/budgets/{project}`.
    pub fn clear_budget(&self, project: &str) -> Result<(), ClientError> {
        self.send(self.request("DELETE", &format!("/v1/admin/budgets/{}", encode_path(project))), None).map(|_| ())
    }
}

pub(crate) enum Body<'a> {
    Json(serde_json::Value),
    Bytes(&'a [u8], &'a str),
}

/// Reads server-sent events, calling `on(name, id, data)` for each, until the stream ends
/// (`Ok(true)`) or `on` says stop (`Ok(false)`).
pub(crate) fn for_each_event(
    reader: impl Read,
    on: &mut dyn FnMut(&str, Option<&str>, &str) -> Result<bool, ClientError>,
) -> Result<bool, ClientError> {
    let (mut event, mut data, mut id) = (String::new(), String::new(), None::<String>);
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { return Ok(true) };
        if line.is_empty() {
            if !event.is_empty() && !on(&event, id.as_deref(), &data)? {
                return Ok(false);
            }
            event.clear();
            data.clear();
            id = None;
        } else if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    Ok(true)
}

/// Reads a followed log until the stream ends (`None`) or an `end` event arrives.
fn read_events(
    reader: impl Read,
    cursor: &mut i64,
    on_line: &mut dyn FnMut(&LogLine),
) -> Result<Option<LogEnd>, ClientError> {
    let mut end = None;
    for_each_event(reader, &mut |event, _, data| match event {
        "log" => {
            let parsed: LogLine =
                serde_json::from_str(data).map_err(|e| ClientError::Decode(format!("log event: {e}")))?;
            *cursor = parsed.seq;
            on_line(&parsed);
            Ok(true)
        }
        "end" => {
            end = Some(serde_json::from_str(data).map_err(|e| ClientError::Decode(format!("end event: {e}")))?);
            Ok(false)
        }
        "error" => Err(ClientError::Decode(format!("server error while following: {data}"))),
        _ => Ok(true),
    })?;
    Ok(end)
}
