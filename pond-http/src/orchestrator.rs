//! The orchestrator: one per pool. It polls pond for its workers and serves them a small API,
//! so every connection dials inward (pond never dials the pool; the orchestrator never dials a
//! worker).
//!
//! Workers long-poll `POST /v1/worker/claim`. The orchestrator batches the idle ones into
//! `POST /v1/orch/claim` long polls toward pond (each worker covered by at most one poll at a
//! time; a worker that arrives while a poll is out starts a new poll for the uncovered ones),
//! and hands each job to the waiting worker it was claimed for. A job whose worker went away
//! meanwhile is handed back to pond at once. Job calls
//! (`/v1/worker/jobs/…`: input, heartbeat, logs, artifacts, result, release) are relayed to
//! `/v1/orch/jobs/…` with the worker's own credential beside the orchestrator's.
//!
//! The orchestrator keeps nothing that matters: its credential is in a file, leases live in
//! pond. Restarted, it picks up where it was; workers retry until it is back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::{Json, Router};
use pond_core::pool::PoolMember;
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::boundary::{body_limit, json_errors, read_body, ApiPath as UrlPath, LOG_BATCH_BYTES, SMALL_BODY_BYTES};
use crate::client::{Client, ClientError};
use crate::error::ApiError;
use crate::pool_wire::{ClaimRequest, Enrolled, JobTicket, WorkerClaim, WORKER_TOKEN_HEADER};

/// Settings of an orchestrator.
#[derive(Clone, Debug)]
pub struct OrchestratorConfig {
    /// Pond's URL.
    pub server: String,
    /// Where workers reach this orchestrator.
    pub listen: SocketAddr,
    /// Where the credential is kept (`orchestrator.json`, 0600).
    pub state_dir: PathBuf,
    /// An enrollment code, needed only the first time.
    pub enroll_code: Option<String>,
    /// A label shown by `pond pool ls`.
    pub name: String,
    /// Longest long poll toward pond.
    pub claim_wait: Duration,
    /// Serve workers over HTTPS with this certificate and key; `None`: plain HTTP.
    pub tls: Option<crate::tls::TlsFiles>,
}

impl OrchestratorConfig {
    /// Defaults for `server`, keeping state in `state_dir`.
    pub fn new(server: &str, state_dir: PathBuf) -> Self {
        OrchestratorConfig {
            server: server.trim_end_matches('/').to_string(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8430)),
            state_dir,
            enroll_code: None,
            name: "orchestrator".into(),
            claim_wait: Duration::from_secs(20),
            tls: None,
        }
    }
}

/// Why an orchestrator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrchestratorError {
    /// No credential on disk and no code given.
    #[error("not enrolled: pass --enroll <code> (from `pond admin enroll create --pool …`) the first time")]
    NotEnrolled,
    /// Enrollment was refused or pond is unreachable.
    #[error("enrolling with {server}: {error}")]
    Enroll {
        /// Pond's URL.
        server: String,
        /// The failure.
        error: ClientError,
    },
    /// A file or socket failed.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        error: std::io::Error,
    },
    /// The TLS certificate or key cannot be used.
    #[error("--tls-cert/--tls-key: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// The credential file (`orchestrator.json` in the state directory).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Credential {
    pub(crate) server: String,
    pub(crate) token: String,
    pub(crate) member: PoolMember,
}

/// The credential file's name in the state directory.
pub(crate) const CREDENTIAL_FILE: &str = "orchestrator.json";

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> OrchestratorError {
    let context = context.into();
    move |error| OrchestratorError::Io { context, error }
}

/// Writes `data` to `path` readable by the owner only.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A started orchestrator.
pub struct RunningOrchestrator {
    /// Where workers reach it.
    pub addr: SocketAddr,
    /// Whether it serves HTTPS.
    pub https: bool,
    /// Its enrollment.
    pub member: PoolMember,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningOrchestrator {
    /// `http://addr`.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops serving and polling.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

struct Waiter {
    generation: u64,
    /// The worker's pinned tags and capabilities: what pond matches jobs against.
    offer: (Vec<String>, Vec<String>),
    /// The pond version in its `User-Agent`.
    version: Option<String>,
    deliver: oneshot::Sender<JobTicket>,
}

#[derive(Default)]
struct Queue {
    waiters: HashMap<String, Waiter>,
    /// Which poll covers each waiting worker.
    covered: HashMap<String, u64>,
    polls: u64,
    /// Workers pond refused (draining, unknown): not polled for again until then.
    refused_until: HashMap<String, Instant>,
    generation: u64,
    /// The worker versions pond has been told of, and when (sent again when one changes, or
    /// after [`VERSIONS_RETOLD`]).
    versions_told: HashMap<String, (String, Instant)>,
}

struct Orch {
    pond: Client,
    config: OrchestratorConfig,
    queue: Mutex<Queue>,
    kick: Notify,
    /// Worker credentials seen, by token: the member and when pond last vouched for it.
    workers: Mutex<HashMap<String, (PoolMember, Instant)>>,
    /// Bounds the credential checks in flight: 1,000 workers arriving at once must not become
    /// 1,000 blocking calls (threads) toward pond.
    checks: tokio::sync::Semaphore,
}

/// How often a worker's version is told to pond again though it did not change.
const VERSIONS_RETOLD: Duration = Duration::from_secs(600);

/// How long a worker pond refused (draining) is left out of polls before it is asked for again.
const REFUSED_PAUSE: Duration = Duration::from_secs(2);

/// Largest artifact relayed for a job (pond applies its own, usually smaller, limit).
const MAX_RELAYED_ARTIFACT: usize = 512 * 1024 * 1024;

/// How long pond's word on a worker credential is trusted before asking again.
const WORKER_AUTH_TTL: Duration = Duration::from_secs(30);

impl Orch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `job` to its worker if it is waiting; otherwise (it went away, or got a job from an
    /// overlapping poll) gives it back to pond at once, so it is queued again instead of sitting
    /// on a lease nobody renews.
    fn deliver(self: &Arc<Self>, job: JobTicket) {
        let waiter = self.lock().waiters.remove(&job.worker_id);
        let job = match waiter {
            Some(w) => match w.deliver.send(job) {
                Ok(()) => return,
                Err(job) => job,
            },
            None => job,
        };
        self.clone().hand_back(job);
    }

    /// The worker whose bearer token `headers` carry, as pond vouches for it (cached for a
    /// while). Pond's own refusal of the credential (401, 404) is a 401; any other answer of
    /// pond's (a 503 while its database is away, …) is passed on as pond gave it, so a valid
    /// worker is never told its credential is unknown because pond had a bad moment.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<(PoolMember, String), Response> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("missing the worker's bearer token".into()).into_response())?
            .to_string();
        if let Some((m, at)) = self.workers.lock().unwrap_or_else(|p| p.into_inner()).get(&token) {
            if at.elapsed() < WORKER_AUTH_TTL {
                return Ok((m.clone(), token));
            }
        }
        let _permit = self.checks.acquire().await.map_err(|e| ApiError::Internal(e.to_string()).into_response())?;
        // Another request may have asked for the same credential while this one waited.
        if let Some((m, at)) = self.workers.lock().unwrap_or_else(|p| p.into_inner()).get(&token) {
            if at.elapsed() < WORKER_AUTH_TTL {
                return Ok((m.clone(), token));
            }
        }
        let pond = self.pond.clone();
        let t = token.clone();
        let answer = tokio::task::spawn_blocking(move || {
            pond.relay("GET", "/v1/orch/workers/me", &[], None, &[(WORKER_TOKEN_HEADER, &t)])
        })
        .await;
        let answer = match answer {
            Ok(Ok(answer)) => answer,
            other => return Err(respond(other)),
        };
        match answer.status {
            200 => {}
            401 | 404 => {
                return Err(ApiError::Unauthorized("pond does not know this worker credential".into()).into_response())
            }
            _ => return Err(respond(Ok(Ok(answer)))),
        }
        let member: PoolMember = serde_json::from_slice(&answer.body)
            .map_err(|e| ApiError::Internal(format!("pond's answer about a worker: {e}")).into_response())?;
        self.workers.lock().unwrap_or_else(|p| p.into_inner()).insert(token.clone(), (member.clone(), Instant::now()));
        Ok((member, token))
    }

    fn token_of(&self, worker: &str) -> Option<String> {
        let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers.iter().find(|(_, (m, _))| m.id == worker).map(|(t, _)| t.clone())
    }

    /// The loop that turns waiting workers into long polls toward pond, and hands back jobs
    /// whose worker never came for them.
    async fn poll_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.kick.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
            let poll = {
                let mut q = self.lock();
                let now = Instant::now();
                q.refused_until.retain(|_, until| *until > now);
                let eligible: Vec<String> =
                    q.waiters.keys().filter(|w| !q.refused_until.contains_key(*w)).cloned().collect();
                // A worker no poll covers starts a new poll for every waiting worker (pond ends
                // the older one, so the pool holds one poll, not one per worker) — unless a
                // covered waiting worker offers the same: any job it could take would go to that
                // one, and the next poll covers it anyway.
                let covered_offers: std::collections::HashSet<&(Vec<String>, Vec<String>)> =
                    q.covered.keys().filter_map(|w| q.waiters.get(w)).map(|w| &w.offer).collect();
                let needed = eligible.iter().any(|w| {
                    !q.covered.contains_key(w) && q.waiters.get(w).is_some_and(|x| !covered_offers.contains(&x.offer))
                });
                if needed {
                    q.polls += 1;
                    let n = q.polls;
                    for w in &eligible {
                        q.covered.insert(w.clone(), n);
                    }
                    Some((n, eligible))
                } else {
                    None
                }
            };
            if let Some((n, workers)) = poll {
                tokio::spawn(self.clone().poll(n, workers));
            }
        }
    }

    fn hand_back(self: Arc<Self>, job: JobTicket) {
        tokio::task::spawn_blocking(move || {
            let Some(token) = self.token_of(&job.worker_id) else { return };
            let path = format!("/v1/orch/jobs/{}/release", job.job_id);
            match self.pond.relay("POST", &path, &[], None, &[(WORKER_TOKEN_HEADER, &token)]) {
                Ok(r) if r.status < 300 => {
                    tracing::info!(job = %job.job_id, "handed back a job its worker did not collect")
                }
                Ok(r) => tracing::warn!(job = %job.job_id, status = r.status, "handing back a job was refused"),
                Err(e) => tracing::warn!(job = %job.job_id, error = %e, "handing back a job failed"),
            }
        });
    }

    async fn poll(self: Arc<Self>, number: u64, workers: Vec<String>) {
        let request =
            ClaimRequest { workers: workers.clone(), wait_ms: Some(self.config.claim_wait.as_millis() as u64) };
        // The versions pond has not heard lately (a header: a pond that predates it ignores
        // it), at most 4 KB of them a claim (proxies refuse long header lines); each is told
        // again every 10 minutes, so one an older pond or a failed write missed arrives later.
        let untold: Vec<(String, String)> = {
            let q = self.lock();
            let mut bytes = 0;
            workers
                .iter()
                .filter_map(|w| Some((w.clone(), q.waiters.get(w)?.version.clone()?)))
                .filter(|(w, v)| {
                    q.versions_told.get(w).is_none_or(|(told, at)| told != v || at.elapsed() > VERSIONS_RETOLD)
                })
                .take_while(|(w, v)| {
                    bytes += w.len() + v.len() + 2;
                    bytes <= 4096
                })
                .collect()
        };
        let header = untold.iter().map(|(w, v)| format!("{w}={v}")).collect::<Vec<_>>().join(",");
        let pond = self.pond.clone();
        let answer = tokio::task::spawn_blocking(move || pond.orch_claim(&request, &header)).await;
        let mut failed = false;
        match answer {
            Ok(Ok(response)) => {
                {
                    let now = Instant::now();
                    let mut q = self.lock();
                    for (w, v) in untold.into_iter().filter(|(w, _)| !response.refused.contains(w)) {
                        q.versions_told.insert(w, (v, now));
                    }
                }
                for job in response.jobs {
                    self.deliver(job);
                }
                if !response.refused.is_empty() {
                    // A refused worker (draining, revoked, unknown) is asked about again before
                    // its credential is trusted again: a revoked one then gets 401 here too.
                    self.workers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|_, (m, _)| !response.refused.contains(&m.id));
                    let mut q = self.lock();
                    let until = Instant::now() + REFUSED_PAUSE;
                    for w in response.refused {
                        q.refused_until.insert(w, until);
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "claiming from pond failed");
                failed = true;
            }
            Err(e) => {
                tracing::warn!(error = %e, "claim task failed");
                failed = true;
            }
        }
        if failed {
            // Pond is away or refused: do not spin.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        {
            let mut q = self.lock();
            for w in &workers {
                if q.covered.get(w) == Some(&number) {
                    q.covered.remove(w);
                }
            }
        }
        self.kick.notify_one();
    }
}

/// Starts an orchestrator: loads its credential (or enrolls with the code), serves workers and
/// polls pond.
pub async fn start(config: OrchestratorConfig) -> Result<RunningOrchestrator, OrchestratorError> {
    let tls = config.tls.as_ref().map(crate::tls::ServerTls::load).transpose()?;
    std::fs::create_dir_all(&config.state_dir).map_err(io(format!("creating {}", config.state_dir.display())))?;
    // It holds the orchestrator's credential: its owner's alone, whatever the umask.
    std::fs::set_permissions(&config.state_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io(format!("securing {}", config.state_dir.display())))?;
    let path = config.state_dir.join(CREDENTIAL_FILE);
    let credential = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<Credential>(&bytes).map_err(|e| OrchestratorError::Io {
            context: format!("reading {}", path.display()),
            error: std::io::Error::other(e),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let code = config.enroll_code.clone().ok_or(OrchestratorError::NotEnrolled)?;
            let (server, name) = (config.server.clone(), config.name.clone());
            let enrolled: Enrolled =
                tokio::task::spawn_blocking(move || Client::new(&server, None).enroll_orchestrator(&code, &name))
                    .await
                    .map_err(|e| io("enrolling")(std::io::Error::other(e)))?
                    .map_err(|error| OrchestratorError::Enroll { server: config.server.clone(), error })?;
            let credential =
                Credential { server: config.server.clone(), token: enrolled.token, member: enrolled.member };
            let bytes = serde_json::to_vec_pretty(&credential).map_err(|e| io("encoding")(std::io::Error::other(e)))?;
            write_private(&path, &bytes).map_err(io(format!("writing {}", path.display())))?;
            credential
        }
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    };
    let orch = Arc::new(Orch {
        pond: Client::new(&credential.server, Some(credential.token.clone())),
        config: config.clone(),
        queue: Mutex::default(),
        kick: Notify::new(),
        workers: Mutex::default(),
        checks: tokio::sync::Semaphore::new(8),
    });
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.map_err(io(format!("listening on {}", config.listen)))?;
    let addr = listener.local_addr().map_err(io("reading the bound address"))?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let router = worker_api(orch.clone());
    let mut stop = shutdown_rx.clone();
    let http = tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = crate::tls::serve(listener, tls, router, stopped).await {
            tracing::error!(error = %e, "orchestrator http server stopped");
        }
    });
    let polling = tokio::spawn(orch.clone().poll_loop(shutdown_rx));
    let https = config.tls.is_some();
    Ok(RunningOrchestrator { addr, https, member: credential.member, shutdown, tasks: vec![http, polling] })
}

/// The worker API. Every route has a body limit fitting what it relays (checked before
/// anything else); every route but enrollment (whose credential is the code in its body)
/// authenticates the worker before its body is read; every error answer is JSON.
fn worker_api(orch: Arc<Orch>) -> Router {
    let (routes, _) = worker_routes(Some(orch.clone())).split_for_parts();
    routes
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|method: Method, uri: axum::http::Uri| async move {
            ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
        })
        .route_layer(axum::middleware::from_fn(crate::metrics::count_requests))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn(crate::metrics::access_log))
        .with_state(orch)
}

/// The orchestrator's OpenAPI document: what [`worker_api`]'s routes say of themselves.
pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    crate::openapi::finish(worker_routes(None).into_openapi())
}

/// Every route of the worker API, each documented by its handler's `#[utoipa::path]` (a route
/// is registered only through `routes!`). `orch` is what authenticates workers; without one
/// (for the document alone) the routes are the same, unauthenticated.
fn worker_routes(orch: Option<Arc<Orch>>) -> OpenApiRouter<Arc<Orch>> {
    let authenticated = |router: OpenApiRouter<Arc<Orch>>| match &orch {
        Some(orch) => router.route_layer(axum::middleware::from_fn_with_state(orch.clone(), require_worker)),
        None => router,
    };
    let small = OpenApiRouter::new()
        .routes(routes!(me))
        .routes(routes!(claim))
        .routes(routes!(relay_heartbeat))
        .routes(routes!(relay_input))
        .routes(routes!(relay_result))
        .routes(routes!(relay_release));
    let small = authenticated(small).route_layer(body_limit(SMALL_BODY_BYTES));
    let logs = authenticated(OpenApiRouter::new().routes(routes!(relay_logs))).route_layer(body_limit(LOG_BATCH_BYTES));
    let artifacts = authenticated(OpenApiRouter::new().routes(routes!(relay_artifact)))
        .route_layer(body_limit(MAX_RELAYED_ARTIFACT));
    let open = OpenApiRouter::new()
        .routes(routes!(enroll))
        .routes(routes!(healthz))
        .routes(routes!(crate::openapi::orchestrator_openapi_json))
        .route_layer(body_limit(SMALL_BODY_BYTES));
    OpenApiRouter::with_openapi(crate::openapi::orchestrator_base())
        .merge(small)
        .merge(logs)
        .merge(artifacts)
        .merge(open)
}

/// The orchestrator is up.
#[utoipa::path(get, path = "/healthz", tag = "meta", security(()),
    responses((status = 200, description = "Up, and its version.", body = crate::wire::OrchestratorHealth)))]
async fn healthz() -> Json<crate::wire::OrchestratorHealth> {
    Json(crate::wire::OrchestratorHealth { status: "ok".into(), version: env!("CARGO_PKG_VERSION").into() })
}

/// A worker pond vouched for, and the credential it presented.
#[derive(Clone)]
struct WorkerAuth {
    member: PoolMember,
    token: String,
}

/// Authenticates the worker (see [`Orch::authenticate`]) before the handler, and so before
/// its body, runs.
async fn require_worker(
    State(orch): State<Arc<Orch>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match orch.authenticate(req.headers()).await {
        Ok((member, token)) => {
            req.extensions_mut().insert(WorkerAuth { member, token });
            req.extensions_mut().insert(orch.clone());
            next.run(req).await
        }
        Err(refused) => refused,
    }
}

#[utoipa::path(post, path = "/v1/worker/enroll", summary = "Enroll this worker", tag = "worker", security(()),
    description = "Relayed to pond (`POST /v1/orch/workers/enroll`) with the orchestrator's credential; the code in the body is the worker's.",
    request_body(content = crate::pool_wire::EnrollWorker, content_type = "application/json"),
    responses(
        (status = 201, description = "Enrolled: the worker's credential (shown once) and pond's ticket-signing key.", body = crate::pool_wire::Enrolled),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 404, response = crate::openapi::NotFound),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn enroll(State(orch): State<Arc<Orch>>, body: Body) -> Response {
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let pond = orch.pond.clone();
    let relayed = tokio::task::spawn_blocking(move || {
        pond.relay("POST", "/v1/orch/workers/enroll", &body, Some("application/json"), &[])
    })
    .await;
    respond(relayed)
}

#[utoipa::path(get, path = "/v1/worker/me", summary = "This worker, as pond knows it", tag = "worker", security(("worker" = [])),
    responses(
        (status = 200, description = "The worker, as pond knows it.", body = PoolMember),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn me(State(orch): State<Arc<Orch>>, Extension(auth): Extension<WorkerAuth>) -> Response {
    // Asked of pond now, not answered from the authentication cache: `pond worker --check`
    // reads it to learn whether the credential still holds, and a revocation must show at once.
    // Relayed like any job call, beside the shared authentication path: a worker asking often
    // neither waits for nor holds up other workers' checks, and the cache changes only with
    // pond's answer.
    let (pond, token) = (orch.pond.clone(), auth.token.clone());
    let answer = tokio::task::spawn_blocking(move || {
        pond.relay("GET", "/v1/orch/workers/me", &[], None, &[(WORKER_TOKEN_HEADER, &token)])
    })
    .await;
    let answer = match answer {
        Ok(Ok(answer)) => answer,
        other => return respond(other),
    };
    match answer.status {
        200 => match serde_json::from_slice::<PoolMember>(&answer.body) {
            Ok(member) => {
                orch.workers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(auth.token, (member.clone(), Instant::now()));
                Json(member).into_response()
            }
            Err(e) => ApiError::Internal(format!("pond's answer about a worker: {e}")).into_response(),
        },
        401 | 404 => {
            orch.workers.lock().unwrap_or_else(|p| p.into_inner()).remove(&auth.token);
            ApiError::Unauthorized("pond does not know this worker credential".into()).into_response()
        }
        _ => respond(Ok(Ok(answer))),
    }
}

/// A worker's long poll: a job (200) or nothing within the wait (204).
#[utoipa::path(post, path = "/v1/worker/claim", summary = "Wait for a job", tag = "worker", security(("worker" = [])),
    description = "Long poll for a job (`wait_ms`, default 20 s, at most 60 s). An empty body waits the default.",
    request_body(content = Option<WorkerClaim>, content_type = "application/json"),
    responses(
        (status = 200, description = "A job, its ticket signed by pond.", body = JobTicket),
        (status = 204, description = "No job within the wait."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn claim(
    State(orch): State<Arc<Orch>>,
    Extension(auth): Extension<WorkerAuth>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let worker = auth.member;
    let version =
        crate::pool_wire::agent_version(headers.get(axum::http::header::USER_AGENT).and_then(|v| v.to_str().ok()));
    let body = read_body(body).await?;
    let request: WorkerClaim = if body.is_empty() {
        WorkerClaim::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body is not a claim: {e}")))?
    };
    let wait = Duration::from_millis(request.wait_ms.unwrap_or(20_000)).min(Duration::from_secs(60));
    let (tx, rx) = oneshot::channel();
    let generation = {
        let mut q = orch.lock();
        q.generation += 1;
        let generation = q.generation;
        let offer = (worker.tags.clone(), worker.capabilities.clone());
        q.waiters.insert(worker.id.clone(), Waiter { generation, offer, version, deliver: tx });
        generation
    };
    orch.kick.notify_one();
    let mut rx = rx;
    let waiting = orch.lock().waiters.len();
    metrics::gauge!("pond_orchestrator_waiting_workers").set(waiting as f64);
    match tokio::time::timeout(wait, &mut rx).await {
        Ok(Ok(job)) => {
            metrics::counter!("pond_orchestrator_jobs_handed_total").increment(1);
            Ok(Json(job).into_response())
        }
        _ => {
            {
                let mut q = orch.lock();
                if q.waiters.get(&worker.id).is_some_and(|w| w.generation == generation) {
                    q.waiters.remove(&worker.id);
                }
            }
            // A job delivered between the timeout and the removal above is this worker's.
            rx.close();
            match rx.try_recv() {
                Ok(job) => Ok(Json(job).into_response()),
                Err(_) => Ok(StatusCode::NO_CONTENT.into_response()),
            }
        }
    }
}

/// Relays a job call to pond with the worker's credential beside the orchestrator's.
/// The pond path a worker's job call maps to: `<job id>/<call>`, with only the calls the
/// protocol has and the artifact name re-encoded, so no `..` or other path can reach another
/// pond route with the orchestrator's credential.
fn job_call_path(rest: &str) -> Option<String> {
    let (job, call) = rest.split_once('/')?;
    let job: pond_core::pool::JobId = job.parse().ok()?;
    let call = match call {
        "heartbeat" | "input" | "logs" | "result" | "release" => call.to_string(),
        _ => {
            let name = call.strip_prefix("artifacts/")?;
            if !pond_core::engine::valid_artifact_name(
                name.strip_suffix(pond_core::seal::SIDECAR_SUFFIX).unwrap_or(name),
            ) {
                return None;
            }
            format!("artifacts/{}", crate::client::encode_path(name))
        }
    };
    Some(format!("/v1/orch/jobs/{job}/{call}"))
}

/// A relayed job call's parts: the worker (authenticated by `require_worker`) and the request.
struct JobCall {
    orch: Arc<Orch>,
    auth: WorkerAuth,
    method: Method,
    headers: HeaderMap,
    body: Body,
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for JobCall {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, _: &S) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        let missing = || ApiError::Internal("a job call reached its handler unauthenticated".into()).into_response();
        let orch = parts.extensions.get::<Arc<Orch>>().cloned().ok_or_else(missing)?;
        let auth = parts.extensions.get::<WorkerAuth>().cloned().ok_or_else(missing)?;
        Ok(JobCall { orch, auth, method: parts.method, headers: parts.headers, body })
    }
}

impl JobCall {
    async fn relay(self, rest: &str) -> Response {
        relay_job(self.orch, self.auth, rest, self.method, self.headers, self.body).await
    }
}

#[utoipa::path(post, path = "/v1/worker/jobs/{job}/heartbeat", summary = "Renew a job's lease", tag = "worker", security(("worker" = [])),
    params(("job" = String, Path, description = "The job: `<run>.<stage>.<attempt>`.")),
    responses(
        (status = 200, description = "The lease is renewed.", body = crate::pool_wire::Heartbeat),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn relay_heartbeat(UrlPath(job): UrlPath<String>, call: JobCall) -> Response {
    call.relay(&format!("{job}/heartbeat")).await
}

#[utoipa::path(get, path = "/v1/worker/jobs/{job}/input", summary = "A job's input, sealed to this worker", tag = "worker", security(("worker" = [])),
    params(("job" = String, Path, description = "The job: `<run>.<stage>.<attempt>`.")),
    responses(
        (status = 200, description = "The job's input sealed to the worker.", content_type = "application/octet-stream", body = crate::openapi::Binary,
            headers(("pond-input-sidecar" = String, description = "The input's `.pondkey` sidecar, sealed to the worker."))),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn relay_input(UrlPath(job): UrlPath<String>, call: JobCall) -> Response {
    call.relay(&format!("{job}/input")).await
}

#[utoipa::path(post, path = "/v1/worker/jobs/{job}/result", summary = "Report a job's signed result", tag = "worker", security(("worker" = [])),
    params(("job" = String, Path, description = "The job: `<run>.<stage>.<attempt>`.")),
    request_body(content = crate::pool_wire::JobResult, content_type = "application/json"),
    responses(
        (status = 200, description = "Applied; whether pond verified the attestation.", body = crate::pool_wire::ResultAck),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn relay_result(UrlPath(job): UrlPath<String>, call: JobCall) -> Response {
    call.relay(&format!("{job}/result")).await
}

#[utoipa::path(post, path = "/v1/worker/jobs/{job}/release", summary = "Hand a job back", tag = "worker", security(("worker" = [])),
    params(("job" = String, Path, description = "The job: `<run>.<stage>.<attempt>`.")),
    responses(
        (status = 204, description = "Handed back."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn relay_release(UrlPath(job): UrlPath<String>, call: JobCall) -> Response {
    call.relay(&format!("{job}/release")).await
}

#[utoipa::path(post, path = "/v1/worker/jobs/{job}/logs", summary = "Append a batch of a job's log lines", tag = "worker", security(("worker" = [])),
    params(("job" = String, Path, description = "The job: `<run>.<stage>.<attempt>`.")),
    request_body(content = crate::pool_wire::JobLines, content_type = "application/json"),
    responses(
        (status = 204, description = "Stored (a batch sent again is stored once)."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn relay_logs(UrlPath(job): UrlPath<String>, call: JobCall) -> Response {
    call.relay(&format!("{job}/logs")).await
}

#[utoipa::path(put, path = "/v1/worker/jobs/{job}/artifacts/{*name}", summary = "Store a job's artifact", tag = "worker", security(("worker" = [])),
    params(("job" = String, Path, description = "The job: `<run>.<stage>.<attempt>`."), ("name" = String, Path, description = "The artifact's name (may hold `/`).")),
    request_body(content = Option<crate::openapi::Binary>, content_type = "application/octet-stream", description = "The artifact's bytes (none: an empty file)."),
    responses(
        (status = 204, description = "Stored."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn relay_artifact(UrlPath((job, name)): UrlPath<(String, String)>, call: JobCall) -> Response {
    call.relay(&format!("{job}/artifacts/{name}")).await
}

/// Relays a job call (`rest`: `<job>/<call>`) to pond, with the worker's credential beside the
/// orchestrator's, and answers what pond answered.
async fn relay_job(
    orch: Arc<Orch>,
    auth: WorkerAuth,
    rest: &str,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(path) = job_call_path(rest) else {
        return ApiError::NotFound(format!("no job call `{rest}`")).into_response();
    };
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|h| h.to_str().ok()).map(str::to_string);
    let pond = orch.pond.clone();
    let token = auth.token;
    let relayed = tokio::task::spawn_blocking(move || {
        pond.relay(method.as_str(), &path, &body, content_type.as_deref(), &[(WORKER_TOKEN_HEADER, &token)])
    })
    .await;
    respond(relayed)
}

fn respond(relayed: Result<Result<crate::pool_client::Relayed, ClientError>, tokio::task::JoinError>) -> Response {
    match relayed {
        Ok(Ok(r)) => {
            let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut response = (status, Body::from(r.body)).into_response();
            if let Some(ct) = r.content_type.and_then(|c| header::HeaderValue::from_str(&c).ok()) {
                response.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            if let Some(sidecar) = r.sidecar.and_then(|c| header::HeaderValue::from_str(&c).ok()) {
                response.headers_mut().insert(crate::pool_wire::INPUT_SIDECAR_HEADER, sidecar);
            }
            // The documented headers of pond's 401 and 503 reach the worker with them.
            for (name, value) in r.advice {
                if let Ok(value) = header::HeaderValue::from_str(&value) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
        // Only a transport failure: pond's own answers, errors included, are passed on above.
        Ok(Err(e)) => ApiError::Unavailable(format!("pond is unreachable: {e}")).into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}
