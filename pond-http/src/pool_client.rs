//! Clients of the pool protocol: admin pool calls and orchestrator calls on [`Client`], and
//! [`HttpWorkerClient`], the worker's side (toward its orchestrator) implementing
//! [`pond_core::pool::WorkerClient`].

use std::io::Read;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use pond_core::engine::JobReport;
use pond_core::pool::{Job, JobId, PoolMember, WorkerCallError, WorkerClient};
use pond_core::run::StageOutcome;

use pond_core::time::Millis;

use crate::client::{encode_path, Body, Client, ClientError};
use crate::pool_wire::{
    ClaimRequest, ClaimResponse, CodeCreated, CreateCode, EnrollOrchestrator, EnrollWorker, Enrolled, Heartbeat,
    JobLine, JobLines, JobResult, JobTicket, PoolList, ResultAck, WorkerClaim,
};

/// A raw response, for relaying: status, content type, body.
pub struct Relayed {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
    /// A job input's sidecar header, passed on.
    pub sidecar: Option<String>,
    /// What pond said beside an error that a client acts on (`Retry-After`, `WWW-Authenticate`),
    /// passed on.
    pub advice: Vec<(&'static str, String)>,
}

impl Client {
    /// `POST /v1/admin/enroll`: a one-time enrollment code.
    pub fn create_enroll_code(&self, request: &CreateCode) -> Result<CodeCreated, ClientError> {
        let body = serde_json::to_value(request).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.json(self.request("POST", "/v1/admin/enroll"), Some(Body::Json(body)))
    }

    /// `GET /v1/admin/pools`.
    pub fn pools(&self) -> Result<PoolList, ClientError> {
        self.json(self.request("GET", "/v1/admin/pools"), None)
    }

    /// `POST /v1/admin/pools/workers/{id}/drain`.
    pub fn drain_worker(&self, worker: &str, draining: bool) -> Result<PoolMember, ClientError> {
        let path = format!("/v1/admin/pools/workers/{}/drain", encode_path(worker));
        self.json(self.request("POST", &path), Some(Body::Json(serde_json::json!({ "draining": draining }))))
    }

    /// `POST /v1/admin/pools/workers/{id}/endorse`.
    pub fn endorse_worker(&self, worker: &str, fingerprint: &str) -> Result<PoolMember, ClientError> {
        let path = format!("/v1/admin/pools/workers/{}/endorse", encode_path(worker));
        self.json(self.request("POST", &path), Some(Body::Json(serde_json::json!({ "fingerprint": fingerprint }))))
    }

    /// `POST /v1/admin/pools/members/{id}/revoke`.
    pub fn revoke_member(&self, member: &str) -> Result<PoolMember, ClientError> {
        let path = format!("/v1/admin/pools/members/{}/revoke", encode_path(member));
        self.json(self.request("POST", &path), None)
    }

    /// `POST /v1/admin/credentials`.
    pub fn put_credential(
        &self,
        request: &crate::pool_wire::PutCredential,
    ) -> Result<pond_core::credentials::CredentialView, ClientError> {
        let body = serde_json::to_value(request).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.json(self.request("POST", "/v1/admin/credentials"), Some(Body::Json(body)))
    }

    /// `GET /v1/admin/credentials`.
    pub fn credentials(&self) -> Result<crate::pool_wire::CredentialList, ClientError> {
        self.json(self.request("GET", "/v1/admin/credentials"), None)
    }

    /// `DELETE /v1/admin/credentials/{name}`.
    pub fn remove_credential(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("/v1/admin/credentials/{}", encode_path(name));
        self.send(self.request("DELETE", &path), None).map(|_| ())
    }

    /// A registry call (`/v1/admin/models`, `/v1/admin/harnesses…`): JSON in, JSON out.
    pub fn admin_json(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let response = self.send(self.request(method, path), body.map(Body::Json))?;
        if response.status() == 204 {
            return Ok(serde_json::Value::Null);
        }
        response.into_json().map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `POST /v1/orch/enroll`: an orchestrator redeems its code.
    pub fn enroll_orchestrator(&self, code: &str, name: &str) -> Result<Enrolled, ClientError> {
        let body = EnrollOrchestrator { code: code.into(), name: Some(name.into()) };
        let body = serde_json::to_value(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.json(self.request("POST", "/v1/orch/enroll"), Some(Body::Json(body)))
    }

    /// `POST /v1/orch/claim`: the orchestrator's long poll for its idle workers.
    /// `worker_versions`: the [`crate::pool_wire::WORKER_VERSIONS_HEADER`] value (empty: none).
    pub fn orch_claim(&self, request: &ClaimRequest, worker_versions: &str) -> Result<ClaimResponse, ClientError> {
        let body = serde_json::to_value(request).map_err(|e| ClientError::Decode(e.to_string()))?;
        let mut req = self.request("POST", "/v1/orch/claim");
        if !worker_versions.is_empty() {
            req = req.set(crate::pool_wire::WORKER_VERSIONS_HEADER, worker_versions);
        }
        self.json(req, Some(Body::Json(body)))
    }

    /// Sends a request as is and returns whatever the server answered (for relays): only a
    /// transport failure is an error.
    pub fn relay(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        content_type: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<Relayed, ClientError> {
        let mut req = self.request(method, path);
        for (name, value) in headers {
            req = req.set(name, value);
        }
        if let Some(ct) = content_type {
            req = req.set("Content-Type", ct);
        }
        let url = req.url().to_string();
        let result = if body.is_empty() && method == "GET" { req.call() } else { req.send_bytes(body) };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(crate::client::transport(url, &t)),
        };
        let status = response.status();
        let content_type = response.header("Content-Type").map(str::to_string);
        let sidecar = response.header(crate::pool_wire::INPUT_SIDECAR_HEADER).map(str::to_string);
        let advice = ["retry-after", "www-authenticate"]
            .into_iter()
            .filter_map(|name| response.header(name).map(|value| (name, value.to_string())))
            .collect();
        let mut bytes = Vec::new();
        response.into_reader().read_to_end(&mut bytes)?;
        Ok(Relayed { status, content_type, body: bytes, sidecar, advice })
    }
}

/// A worker's connection to its orchestrator.
#[derive(Clone)]
pub struct HttpWorkerClient {
    client: Client,
    /// Pond's ticket key and this worker's id: a ticket is accepted only if pond signed it,
    /// for this worker.
    pinned: Option<([u8; 32], String)>,
}

fn call_error(e: ClientError) -> WorkerCallError {
    match e {
        ClientError::Api { status: 409, .. } => WorkerCallError::LeaseLost(e.to_string()),
        ClientError::Api { status, .. } if status == 502 || status == 503 || status == 504 => {
            WorkerCallError::Unavailable(e.to_string())
        }
        ClientError::Transport { .. } | ClientError::Io(_) => WorkerCallError::Unavailable(e.to_string()),
        other => WorkerCallError::Refused(other.to_string()),
    }
}

impl HttpWorkerClient {
    /// A client for the orchestrator at `base`, speaking as the worker whose token is `token`.
    pub fn new(base: &str, token: &str) -> Self {
        HttpWorkerClient { client: Client::new(base, Some(token.to_string())), pinned: None }
    }

    /// Accepts only tickets signed with `pond_key` (base64, from enrollment) for `worker_id`.
    pub fn pinned(mut self, pond_key: &str, worker_id: &str) -> Result<Self, String> {
        let key = pond_core::pool::decode_key(pond_key).map_err(|e| format!("pond's ticket key {e}"))?;
        self.pinned = Some((key, worker_id.to_string()));
        Ok(self)
    }

    /// Enrolls a worker through the orchestrator at `base` (no credential yet).
    pub fn enroll(base: &str, request: &EnrollWorker) -> Result<Enrolled, ClientError> {
        let client = Client::new(base, None);
        let body = serde_json::to_value(request).map_err(|e| ClientError::Decode(e.to_string()))?;
        client.json(client.request("POST", "/v1/worker/enroll"), Some(Body::Json(body)))
    }

    /// Who the orchestrator (and pond behind it) say this worker is.
    pub fn whoami(&self) -> Result<PoolMember, ClientError> {
        self.client.json(self.client.request("GET", "/v1/worker/me"), None)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Client) -> Result<T, ClientError> + Send + 'static,
    ) -> Result<T, WorkerCallError> {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || f(&client))
            .await
            .map_err(|e| WorkerCallError::Unavailable(e.to_string()))?
            .map_err(call_error)
    }
}

fn job_path(job: &JobId, tail: &str) -> String {
    format!("/v1/worker/jobs/{job}/{tail}")
}

/// Checks that pond signed `ticket` (with the key the worker pinned at enrollment) and that it
/// is for `worker`: an orchestrator cannot alter what a worker runs, nor hand it another's job.
pub fn check_ticket(ticket: &JobTicket, pond_key: &[u8; 32], worker: &str) -> Result<(), String> {
    let signed = ticket
        .signature
        .as_deref()
        .is_some_and(|s| pond_core::pool::verify_ticket(pond_key, &ticket.signed_bytes(), s));
    if !signed {
        return Err("a job ticket pond did not sign (or that was altered on the way); refused".into());
    }
    if ticket.worker_id != worker {
        return Err(format!("a job ticket for worker {}, not this one; refused", ticket.worker_id));
    }
    Ok(())
}

/// Turns a ticket into the core's job.
pub fn ticket_job(ticket: JobTicket) -> Result<Job, String> {
    let id: JobId = ticket.job_id.parse()?;
    Ok(Job {
        id,
        run: ticket.run,
        lease: Millis(ticket.lease_ms),
        input_sha256: ticket.input_sha256,
        credentials: ticket.credentials,
        agent: ticket.agent,
        items: ticket.items,
    })
}

#[async_trait]
impl WorkerClient for HttpWorkerClient {
    async fn claim(&self, wait: Millis) -> Result<Option<Job>, WorkerCallError> {
        let ticket = self
            .blocking(move |c| {
                let body = serde_json::to_value(WorkerClaim { wait_ms: Some(wait.0) })
                    .map_err(|e| ClientError::Decode(e.to_string()))?;
                let response = c.send(c.request("POST", "/v1/worker/claim"), Some(Body::Json(body)))?;
                if response.status() == 204 {
                    return Ok(None);
                }
                response.into_json::<JobTicket>().map(Some).map_err(|e| ClientError::Decode(e.to_string()))
            })
            .await?;
        let Some(ticket) = ticket else { return Ok(None) };
        if let Some((key, worker)) = &self.pinned {
            check_ticket(&ticket, key, worker).map_err(WorkerCallError::Refused)?;
        }
        ticket_job(ticket).map(Some).map_err(WorkerCallError::Refused)
    }

    async fn input(&self, job: &JobId) -> Result<(Vec<u8>, Option<String>), WorkerCallError> {
        let path = job_path(job, "input");
        self.blocking(move |c| {
            let response = c.send(c.request("GET", &path), None)?;
            let sidecar = response.header(crate::pool_wire::INPUT_SIDECAR_HEADER).map(str::to_string);
            let mut bytes = Vec::new();
            response.into_reader().read_to_end(&mut bytes)?;
            Ok((bytes, sidecar))
        })
        .await
    }

    async fn heartbeat(&self, job: &JobId) -> Result<bool, WorkerCallError> {
        let path = job_path(job, "heartbeat");
        let beat: Heartbeat = self.blocking(move |c| c.json(c.request("POST", &path), None)).await?;
        Ok(beat.cancel_requested)
    }

    async fn logs(&self, job: &JobId, lines: Vec<pond_core::store::NewLogLine>) -> Result<(), WorkerCallError> {
        let path = job_path(job, "logs");
        let body = JobLines { lines: lines.into_iter().map(JobLine::from_line).collect() };
        self.blocking(move |c| {
            let body = serde_json::to_value(body).map_err(|e| ClientError::Decode(e.to_string()))?;
            c.send(c.request("POST", &path), Some(Body::Json(body))).map(|_| ())
        })
        .await
    }

    async fn artifact(&self, job: &JobId, name: &str, data: Vec<u8>) -> Result<(), WorkerCallError> {
        let path = job_path(job, &format!("artifacts/{}", encode_path(name)));
        self.blocking(move |c| {
            c.send(c.request("PUT", &path), Some(Body::Bytes(&data, "application/octet-stream"))).map(|_| ())
        })
        .await
    }

    async fn result(&self, job: &JobId, report: &JobReport) -> Result<(bool, String), WorkerCallError> {
        let path = job_path(job, "result");
        let (outcome, error, exit_code) = match &report.outcome {
            StageOutcome::Succeeded => ("succeeded", None, None),
            StageOutcome::Failed { error, exit_code } => ("failed", Some(error.clone()), *exit_code),
            StageOutcome::Cancelled => ("cancelled", None, None),
        };
        let body = JobResult {
            outcome: outcome.into(),
            error,
            exit_code,
            input_sha256: hex::encode(report.input_sha256),
            output_sha256: hex::encode(report.output_sha256),
            signature: base64::engine::general_purpose::STANDARD.encode(report.signature),
            usage: report.usage,
        };
        let ack: ResultAck = self
            .blocking(move |c| {
                let body = serde_json::to_value(body).map_err(|e| ClientError::Decode(e.to_string()))?;
                c.json(c.request("POST", &path), Some(Body::Json(body)))
            })
            .await?;
        Ok((ack.attestation_verified, ack.detail))
    }

    async fn release(&self, job: &JobId) -> Result<(), WorkerCallError> {
        let path = job_path(job, "release");
        self.blocking(move |c| c.send(c.request("POST", &path), None).map(|_| ())).await
    }
}

/// Keeps the worker client behind an `Arc<dyn WorkerClient>`.
pub fn worker_client(base: &str, token: &str) -> Arc<dyn WorkerClient> {
    Arc::new(HttpWorkerClient::new(base, token))
}

/// Convenience for the enroll request.
pub fn enroll_request(
    code: &str,
    name: &str,
    identity: &pond_core::keys::WorkerIdentity,
    tags: Option<Vec<String>>,
    capabilities: Vec<String>,
) -> EnrollWorker {
    let b64 = |k: [u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
    EnrollWorker {
        code: code.into(),
        name: Some(name.into()),
        sealing_key: b64(identity.sealing_public()),
        signing_key: b64(identity.signing_public()),
        tags,
        capabilities,
    }
}
