//! Pond's side of the pool protocol: `/v1/orch/*` for orchestrators (enrollment, the claim
//! long poll, and the job calls they relay for their workers) and the admin pool routes
//! (`/v1/admin/enroll`, `/v1/admin/pools`, drain).
//!
//! Every connection dials inward: orchestrators call pond, workers call their orchestrator.
//! An orchestrator proves itself with its bearer token; a job call also carries the worker's
//! own token (`pond-worker-token`), so an orchestrator cannot act for a worker it does not hold
//! the credential of, and a worker cannot act on a job leased to another.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use pond_core::engine::JobReport;
use pond_core::pool::{JobId, MemberKind, PoolError, PoolMember};
use pond_core::run::StageOutcome;
use pond_core::store::{Claim, LeaseStatus, Store};
use pond_core::time::Millis;
use rand::RngCore;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::{read_body, ApiJson};
use crate::auth::Principal;
use crate::boundary::{body_limit, ApiPath as Path, LogLinesJson, LOG_BATCH_BYTES, SMALL_BODY_BYTES};
use crate::error::ApiError;
use crate::pool_wire::{
    ClaimRequest, ClaimResponse, CodeCreated, CreateCode, Drain, EnrollOrchestrator, EnrollWorker, Enrolled, Heartbeat,
    JobLines, JobResult, JobTicket, MemberView, PoolList, ResultAck, WORKER_TOKEN_HEADER,
};
use crate::state::AppState;

/// Longest claim long poll.
pub const MAX_CLAIM_WAIT: Duration = Duration::from_secs(30);
/// How often an idle long poll re-checks without a wake-up (backoffs that came due).
const CLAIM_RECHECK: Duration = Duration::from_millis(500);

/// The `/v1` routes of pools, each group with the body limit its routes need. Handlers take
/// their credential extractor first: a caller is authenticated before its path or body is.
pub fn routes(limits: &crate::state::Limits) -> OpenApiRouter<AppState> {
    // A worker's artifacts are bounded like bundles; a confidential run's are sealed, which adds
    // 17 bytes per 64 KiB chunk and a 24-byte header — well inside the allowance.
    let artifact_bytes = limits.max_bundle_bytes.saturating_add(limits.max_bundle_bytes / 1024 + 64 * 1024);
    let artifacts = OpenApiRouter::new().routes(routes!(artifact)).route_layer(body_limit(artifact_bytes));
    let logs = OpenApiRouter::new().routes(routes!(logs)).route_layer(body_limit(LOG_BATCH_BYTES));
    let small = OpenApiRouter::new()
        .routes(routes!(enroll_orchestrator))
        .routes(routes!(enroll_worker))
        .routes(routes!(worker_me))
        .routes(routes!(orchestrator_me))
        .routes(routes!(claim))
        .routes(routes!(heartbeat))
        .routes(routes!(input))
        .routes(routes!(result))
        .routes(routes!(release))
        .routes(routes!(create_code))
        .routes(routes!(list_pools))
        .routes(routes!(drain))
        .routes(routes!(revoke))
        .routes(routes!(endorse))
        .routes(routes!(put_credential, list_credentials))
        .routes(routes!(remove_credential))
        .route_layer(body_limit(SMALL_BODY_BYTES));
    small.merge(logs).merge(artifacts)
}

impl From<pond_core::credentials::CredentialError> for ApiError {
    fn from(e: pond_core::credentials::CredentialError) -> Self {
        use pond_core::credentials::CredentialError;
        match e {
            CredentialError::Invalid(f) => ApiError::Invalid(f),
            CredentialError::Unknown(_) => ApiError::NotFound(e.to_string()),
            CredentialError::NotAllowed { .. } => ApiError::Forbidden(e.to_string()),
            CredentialError::Store(s) => s.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

#[utoipa::path(post, path = "/admin/credentials", summary = "Register a credential", tag = "credentials", security(("bearer" = [])),
    request_body(content = crate::pool_wire::PutCredential, content_type = "application/json"),
    responses(
        (status = 201, description = "Saved (sealed at rest); the value is never returned.", body = pond_core::credentials::CredentialView,
            links(
                ("remove" = (operation_id = "remove_credential", parameters(("name" = "$response.body#/name")), description = "Remove it.")),
            )),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn put_credential(
    State(state): State<AppState>,
    who: Principal,
    ApiJson(req): ApiJson<crate::pool_wire::PutCredential>,
) -> Result<(axum::http::StatusCode, Json<pond_core::credentials::CredentialView>), ApiError> {
    who.require_admin()?;
    let view =
        state.engine.credentials().put(&req.name, &req.provider, req.env.as_deref(), &req.value, &req.projects).await?;
    Ok((axum::http::StatusCode::CREATED, Json(view)))
}

#[utoipa::path(get, path = "/admin/credentials", summary = "List credentials", tag = "credentials", security(("bearer" = [])),
    responses(
        (status = 200, description = "Every credential's name, provider, variable and key fingerprint; never a value.", body = crate::pool_wire::CredentialList),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn list_credentials(
    State(state): State<AppState>,
    who: Principal,
) -> Result<Json<crate::pool_wire::CredentialList>, ApiError> {
    who.require_admin()?;
    Ok(Json(crate::pool_wire::CredentialList { credentials: state.engine.credentials().list().await? }))
}

#[utoipa::path(delete, path = "/admin/credentials/{name}", summary = "Remove a credential", tag = "credentials", security(("bearer" = [])),
    params(("name" = String, Path, description = "The credential's name.")),
    responses(
        (status = 204, description = "Removed."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn remove_credential(
    State(state): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    who.require_admin()?;
    if state.engine.credentials().remove(&name).await? {
        Ok(axum::http::StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no credential `{name}`")))
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Invalid { field, reason } => ApiError::invalid(field, reason),
            PoolError::CodeUnknown | PoolError::CodeUsed | PoolError::CodeExpired(_) => {
                ApiError::Unauthorized(e.to_string())
            }
            PoolError::WrongRole { .. }
            | PoolError::WrongPool { .. }
            | PoolError::FingerprintMismatch { .. }
            | PoolError::TagNotGranted(_)
            | PoolError::CapabilityNotGranted(_) => ApiError::Forbidden(e.to_string()),
            PoolError::NoMember(_) => ApiError::NotFound(e.to_string()),
            PoolError::Store(s) => s.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

fn bearer(parts: &Parts) -> Result<String, ApiError> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::Unauthorized("missing bearer token (Authorization: Bearer <token>)".into()))
}

/// An authenticated orchestrator.
pub struct Orchestrator(pub PoolMember);

impl FromRequestParts<AppState> for Orchestrator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match state.pools.authenticate(&bearer(parts)?).await? {
            Some(m) if m.kind == MemberKind::Orchestrator => Ok(Orchestrator(m)),
            _ => Err(ApiError::Unauthorized("unknown orchestrator credential".into())),
        }
    }
}

/// An orchestrator relaying for one of its pool's workers (whose own token it presents).
pub struct Relayed {
    /// The orchestrator.
    pub orchestrator: PoolMember,
    /// The worker.
    pub worker: PoolMember,
}

impl FromRequestParts<AppState> for Relayed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Orchestrator(orchestrator) = Orchestrator::from_request_parts(parts, state).await?;
        let token =
            parts.headers.get(WORKER_TOKEN_HEADER).and_then(|h| h.to_str().ok()).filter(|t| !t.is_empty()).ok_or_else(
                || ApiError::Unauthorized(format!("missing the worker's credential ({WORKER_TOKEN_HEADER})")),
            )?;
        match state.pools.authenticate(token).await? {
            Some(worker) if worker.kind == MemberKind::Worker && worker.pool == orchestrator.pool => {
                Ok(Relayed { orchestrator, worker })
            }
            _ => Err(ApiError::Unauthorized("unknown worker credential for this pool".into())),
        }
    }
}

fn random_secret(prefix: &str) -> String {
    let mut raw = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    format!("{prefix}{}", hex::encode(raw))
}

fn member_id(prefix: &str) -> String {
    let mut raw = [0u8; 6];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    format!("{prefix}-{}", hex::encode(raw))
}

#[utoipa::path(post, path = "/admin/enroll", summary = "Mint an enrollment code", tag = "pools", security(("bearer" = [])),
    request_body(content = CreateCode, content_type = "application/json"),
    responses(
        (status = 201, description = "The code (shown once).", body = CodeCreated),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn create_code(
    State(state): State<AppState>,
    who: Principal,
    ApiJson(req): ApiJson<CreateCode>,
) -> Result<(axum::http::StatusCode, Json<CodeCreated>), ApiError> {
    who.require_admin()?;
    let role = match req.role.as_deref().unwrap_or("orchestrator") {
        "orchestrator" => MemberKind::Orchestrator,
        "worker" => MemberKind::Worker,
        other => return Err(ApiError::invalid("role", format!("`{other}` is not `orchestrator` or `worker`"))),
    };
    let secret = random_secret("pond_enroll_");
    let ttl = req.ttl.unwrap_or(Millis::from_secs(3600));
    let grants = pond_core::pool::Grants { tags: req.tags, capabilities: req.capabilities };
    let uses = req.uses.unwrap_or(1);
    let code = state.pools.create_code_for(&secret, &req.pool, role, grants, req.fingerprint, ttl, uses).await?;
    Ok((
        axum::http::StatusCode::CREATED,
        Json(CodeCreated {
            code: secret,
            pool: code.pool,
            role: role.as_str().into(),
            tags: code.tags,
            capabilities: code.capabilities,
            fingerprint: code.fingerprint,
            expires_at: code.expires_at.to_rfc3339(),
            uses: code.uses,
        }),
    ))
}

#[utoipa::path(post, path = "/orch/enroll", summary = "Enroll an orchestrator", tag = "orch", security(()),
    description = "Redeems an enrollment code (the credential is the code in the body): 401 for a code that is unknown, used up or expired.",
    request_body(content = EnrollOrchestrator, content_type = "application/json"),
    responses(
        (status = 201, description = "Enrolled: the orchestrator's credential (shown once).", body = Enrolled),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn enroll_orchestrator(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<EnrollOrchestrator>,
) -> Result<(axum::http::StatusCode, Json<Enrolled>), ApiError> {
    let token = random_secret("pond_orch_");
    let name = req.name.unwrap_or_else(|| "orchestrator".into());
    let member = state.pools.enroll_orchestrator(&req.code, member_id("orch"), &name, &token).await?;
    tracing::info!(id = %member.id, pool = %member.pool, "orchestrator enrolled");
    let pond_key = Some(pond_core::pool::ticket_public(&state.engine.config().identity_key));
    Ok((axum::http::StatusCode::CREATED, Json(Enrolled { member, token, pond_key })))
}

#[utoipa::path(post, path = "/orch/workers/enroll", summary = "Enroll a worker (relayed)", tag = "orch", security(("orchestrator" = [])),
    description = "Enrolls a worker with its code, relayed by its orchestrator: its keys and the tags and capabilities the code grants are pinned.",
    request_body(content = EnrollWorker, content_type = "application/json"),
    responses(
        (status = 201, description = "Enrolled: the worker's credential (shown once) and pond's ticket-signing key.", body = Enrolled),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 404, response = crate::openapi::NotFound),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn enroll_worker(
    State(state): State<AppState>,
    Orchestrator(orchestrator): Orchestrator,
    ApiJson(req): ApiJson<EnrollWorker>,
) -> Result<(axum::http::StatusCode, Json<Enrolled>), ApiError> {
    let sealing = pond_core::pool::decode_key(&req.sealing_key).map_err(|e| ApiError::invalid("sealing_key", e))?;
    let signing = pond_core::pool::decode_key(&req.signing_key).map_err(|e| ApiError::invalid("signing_key", e))?;
    let keys = pond_core::pool::WorkerKeys { sealing, signing };
    let token = random_secret("pond_worker_");
    let name = req.name.unwrap_or_else(|| "worker".into());
    let member = state
        .pools
        .enroll_worker(&orchestrator, &req.code, member_id("wrk"), &name, keys, req.tags, req.capabilities, &token)
        .await?;
    // The control plane vouches for the keys it just pinned: readers accept this worker's
    // signatures (attestations, log streams, artifacts) only with this endorsement.
    let member = state.pools.set_endorsement(&member.id, state.engine.endorse_worker(&member.id, &signing)).await?;
    tracing::info!(id = %member.id, pool = %member.pool, tags = ?member.tags, "worker enrolled");
    let pond_key = Some(pond_core::pool::ticket_public(&state.engine.config().identity_key));
    Ok((axum::http::StatusCode::CREATED, Json(Enrolled { member, token, pond_key })))
}

#[utoipa::path(get, path = "/orch/workers/me", summary = "The relayed worker, as pond knows it", tag = "orch", security(("orchestrator" = [], "worker_token" = [])),
    responses(
        (status = 200, description = "The worker whose credential is relayed.", body = PoolMember),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn worker_me(relayed: Relayed) -> Json<PoolMember> {
    Json(relayed.worker)
}

#[utoipa::path(get, path = "/orch/me", summary = "This orchestrator, as pond knows it", tag = "orch", security(("orchestrator" = [])),
    description = "What `pond orchestrator --check` asks to learn whether the saved credential is still accepted.",
    responses(
        (status = 200, description = "The orchestrator whose credential is presented.", body = PoolMember),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn orchestrator_me(Orchestrator(member): Orchestrator) -> Json<PoolMember> {
    Json(member)
}

/// Long poll: claims at most one job for each idle worker, waiting until some matching work
/// appears (woken by the store's change announcements) or the wait runs out.
#[utoipa::path(post, path = "/orch/claim", tag = "orch", security(("orchestrator" = [])),
    description = "Long poll: claims at most one job for each idle worker, waiting up to `wait_ms` (at most 30 s) for matching work. A newer poll of the same orchestrator ends this one.",
    request_body(content = ClaimRequest, content_type = "application/json"),
    params(("pond-worker-versions" = Option<String>, Header, description = "The pond versions the claim's workers reported to the orchestrator: `<worker id>=<version>`, comma-separated (only changes need be sent). The orchestrator's own version is read from its `User-Agent` (`pond/<version>`).")),
    responses(
        (status = 200, description = "Jobs claimed (at most one per worker) and the workers pond will not serve.", body = ClaimResponse),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn claim(
    State(state): State<AppState>,
    Orchestrator(orchestrator): Orchestrator,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<ClaimRequest>,
) -> Result<Json<ClaimResponse>, ApiError> {
    if req.workers.len() > 10_000 {
        return Err(ApiError::invalid("workers", "at most 10000 workers per claim"));
    }
    let wait = Duration::from_millis(req.wait_ms.unwrap_or(0)).min(MAX_CLAIM_WAIT);
    let mut idle = Vec::new();
    let mut refused = Vec::new();
    let mut ids = req.workers.clone();
    ids.sort();
    ids.dedup();
    for id in ids {
        match state.members.get(&state.pools, &id).await? {
            Some(m) if m.kind == MemberKind::Worker && m.pool == orchestrator.pool && !m.draining => idle.push(m),
            _ => refused.push(id),
        }
    }
    let mut seen: Vec<(&str, Option<&str>)> = vec![(orchestrator.id.as_str(), None)];
    seen.extend(idle.iter().map(|m| (m.id.as_str(), None)));
    state.seen.touch(&seen);
    // Versions: the orchestrator's own from its User-Agent, its workers' as it reports them —
    // only for this claim's idle workers (it speaks for no one else), one entry per worker (the
    // last), so a claim writes at most one record per member it names. Display only: a failed
    // write is logged, never fails the claim.
    let mut versions: HashMap<&str, &str> = HashMap::new();
    let own =
        crate::pool_wire::agent_version(headers.get(axum::http::header::USER_AGENT).and_then(|v| v.to_str().ok()));
    if let Some(own) = &own {
        versions.insert(orchestrator.id.as_str(), own.as_str());
    }
    let idle_ids: std::collections::HashSet<&str> = idle.iter().map(|m| m.id.as_str()).collect();
    let reported = headers.get(crate::pool_wire::WORKER_VERSIONS_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    for entry in reported.split(',').take(idle_ids.len()) {
        let Some((id, version)) = entry.trim().split_once('=') else { continue };
        if let (Some(id), Some(version)) = (idle_ids.get(id.trim()), pond_core::pool::reported_version(version)) {
            versions.insert(id, version);
        }
    }
    let versions: Vec<(&str, &str)> = versions.into_iter().collect();
    if let Err(e) = state.seen.note_versions(&state.pools, &versions).await {
        tracing::warn!(error = %e, "recording members' versions failed");
    }
    let deadline = Instant::now() + wait;
    let mut wake = state.store.runs_changed();
    // A newer poll of the same orchestrator (covering every worker it has waiting) ends this
    // one, so one orchestrator holds one poll per node, not one per worker that came idle.
    let (mine, mut superseded) = state.polls.begin(&orchestrator.id);
    loop {
        wake.borrow_and_update();
        // A newer poll covers these workers now: claim nothing more here.
        if *superseded.borrow_and_update() != mine {
            return Ok(Json(ClaimResponse { jobs: Vec::new(), refused }));
        }
        // A revocation made while this poll waits ends it: no job goes to a revoked
        // orchestrator (its record is cached, and the cache is emptied on any member's change).
        if !state.pools.member(&orchestrator.id).await?.is_some_and(|m| m.revoked_at.is_none()) {
            return Err(ApiError::Unauthorized("unknown orchestrator credential".into()));
        }
        let jobs = claim_round(&state, &idle).await;
        // Refused workers (draining, unknown) are reported at once, so the orchestrator stops
        // counting on this poll for them and asks again for them later.
        let done = !jobs.is_empty() || !refused.is_empty() || Instant::now() >= deadline;
        if done || *superseded.borrow_and_update() != mine {
            return Ok(Json(ClaimResponse { jobs, refused }));
        }
        let recheck = (Instant::now() + CLAIM_RECHECK).min(deadline);
        tokio::select! {
            _ = wake.changed() => {}
            _ = superseded.changed() => {}
            _ = tokio::time::sleep_until(recheck.into()) => {}
        }
    }
}

/// Workers recently read, for resolving the ids of a claim: an orchestrator with 1,000 idle
/// workers sends 1,000 ids per poll. Only active workers are cached (a drain is re-read before
/// every claim anyway, see `claim_round`), so an undone drain is never hidden by the cache.
#[derive(Default)]
pub struct MemberCache {
    entries: std::sync::Mutex<HashMap<String, (PoolMember, Instant)>>,
    /// Workers this node gave a job, until it reports (or a while passes): two overlapping
    /// polls of one orchestrator must not give one worker two jobs.
    busy: std::sync::Mutex<HashMap<String, Instant>>,
}

impl MemberCache {
    const TTL: Duration = Duration::from_secs(10);
    /// After this, a worker that never reported (it died; its lease expires) may be asked again.
    const BUSY_FOR: Duration = Duration::from_secs(10);

    /// Marks `worker` busy unless it already is; returns whether this call took it.
    fn reserve(&self, worker: &str) -> bool {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if busy.get(worker).is_some_and(|at| at.elapsed() < Self::BUSY_FOR) {
            return false;
        }
        if busy.len() > 100_000 {
            busy.retain(|_, at| at.elapsed() < Self::BUSY_FOR);
        }
        busy.insert(worker.to_string(), Instant::now());
        true
    }

    /// Forgets a member this node cached (it was revoked or drained here; other nodes see it
    /// within the cache's life).
    fn forget(&self, id: &str) {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// The worker reported (or was not given a job after all): it may be asked for again.
    fn release(&self, worker: &str) {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(worker);
    }

    async fn get(&self, pools: &pond_core::pool::Pools, id: &str) -> Result<Option<PoolMember>, ApiError> {
        {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((m, at)) = entries.get(id) {
                if at.elapsed() < Self::TTL {
                    return Ok(Some(m.clone()));
                }
            }
        }
        let member = pools.member(id).await?;
        if let Some(m) = member.as_ref().filter(|m| !m.draining) {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if entries.len() > 100_000 {
                entries.retain(|_, (_, at)| at.elapsed() < Self::TTL);
            }
            entries.insert(id.to_string(), (m.clone(), Instant::now()));
        }
        Ok(member)
    }
}

/// The newest claim poll of each orchestrator on this node.
#[derive(Default)]
pub struct Polls {
    newest: std::sync::Mutex<HashMap<String, tokio::sync::watch::Sender<u64>>>,
}

impl Polls {
    /// Registers a new poll of `orchestrator`; returns its number and a receiver that changes
    /// when a newer poll begins.
    fn begin(&self, orchestrator: &str) -> (u64, tokio::sync::watch::Receiver<u64>) {
        let mut newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        let sender = newest.entry(orchestrator.to_string()).or_insert_with(|| tokio::sync::watch::channel(0).0);
        let mut mine = 0;
        sender.send_modify(|n| {
            *n += 1;
            mine = *n;
        });
        (mine, sender.subscribe())
    }
}

/// One pass over the idle workers, grouped by what they offer: a group whose first claim finds
/// nothing is not asked again (the rest of it would find nothing either).
/// A store failure part-way returns the tickets already claimed (their leases are held; dropping
/// them would strand the jobs until the leases expire).
async fn claim_round(state: &AppState, idle: &[PoolMember]) -> Vec<JobTicket> {
    let mut groups: BTreeMap<(Vec<String>, Vec<String>), Vec<&PoolMember>> = BTreeMap::new();
    for m in idle {
        groups.entry((m.tags.clone(), m.capabilities.clone())).or_default().push(m);
    }
    let mut tickets = Vec::new();
    for workers in groups.values() {
        for worker in workers {
            // Reserved while its claim is in flight: an overlapping poll on this node skips it
            // meanwhile. Once claimed, the job's live lease is what keeps the worker busy — on
            // every node: the store refuses a claim for a worker holding one. (Holding the
            // reservation until the result came back to this node kept a worker idle up to
            // 10 s behind a load balancer, whose next node got its result: 60 pooled jobs took
            // 93 s over 3 nodes.)
            if !state.members.reserve(&worker.id) {
                continue;
            }
            match claim_one(state, worker).await {
                Ok(Some(ticket)) => {
                    state.members.release(&worker.id);
                    tickets.push(ticket)
                }
                Ok(None) => {
                    state.members.release(&worker.id);
                    break;
                }
                Err(e) => {
                    state.members.release(&worker.id);
                    tracing::warn!(error = %e, "claiming for a pool worker failed");
                    return tickets;
                }
            }
        }
    }
    tickets
}

/// Claims one job for `worker` (unless it was drained since the poll began); `None` when there
/// is nothing for it (or the claimed job could not be prepared and was failed).
async fn claim_one(state: &AppState, worker: &PoolMember) -> Result<Option<JobTicket>, ApiError> {
    match state.pools.member(&worker.id).await? {
        Some(now) if !now.draining && now.revoked_at.is_none() => {}
        _ => return Ok(None),
    }
    let Some(claim) = state.engine.claim_for_worker(worker, 1).await?.into_iter().next() else { return Ok(None) };
    ticket(state, worker, &claim).await
}

async fn ticket(state: &AppState, worker: &PoolMember, claim: &Claim) -> Result<Option<JobTicket>, ApiError> {
    let job = JobId { run: claim.run.id, stage: claim.stage.key.clone(), attempt: claim.stage.attempt };
    let input = match state.engine.job_input(claim).await {
        Ok(input) => input,
        Err(e) => {
            // The sources could not be fetched or packed: the attempt fails (and may retry).
            let outcome =
                StageOutcome::Failed { error: format!("preparing the job's input failed: {e}"), exit_code: None };
            let _ = state.engine.complete(claim, outcome).await;
            return Ok(None);
        }
    };
    let job_id = job.to_string();
    let prepared = match job_agent(state, claim).await {
        Ok(agent) => sealed_credentials(state, worker, claim, &job_id, agent.as_ref()).await.map(|c| (c, agent)),
        Err(e) => Err(e),
    };
    let items = match claim.run.definition.stages.get(claim.stage.position as usize) {
        Some(def) => match state.engine.foreach_items(&claim.run, def).await {
            Ok(items) => items,
            Err(e) => {
                let _ = state.engine.complete(claim, StageOutcome::Failed { error: e, exit_code: None }).await;
                return Ok(None);
            }
        },
        None => None,
    };
    let (credentials, agent) = match prepared {
        Ok(c) => c,
        Err(e) => {
            let outcome = StageOutcome::Failed { error: format!("credentials: {e}"), exit_code: None };
            let _ = state.engine.complete(claim, outcome).await;
            return Ok(None);
        }
    };
    // `pond pool ls` learns of the job within a second (written behind).
    state.seen.touch(&[(worker.id.as_str(), Some(job_id.as_str()))]);
    let mut ticket = JobTicket {
        job_id,
        worker_id: worker.id.clone(),
        run: claim.run.clone(),
        stage: claim.stage.key.clone(),
        attempt: claim.stage.attempt,
        lease_ms: state.engine.config().lease.0,
        input_sha256: input.sha256,
        input_size: input.size,
        credentials,
        agent,
        items,
        signature: None,
    };
    ticket.signature = Some(pond_core::pool::sign_ticket(&state.engine.config().identity_key, &ticket.signed_bytes()));
    Ok(Some(ticket))
}

/// An agent stage's harness and model, as registered now.
async fn job_agent(state: &AppState, claim: &Claim) -> Result<Option<pond_core::pool::JobAgent>, String> {
    let Some(def) = claim.run.definition.stages.get(claim.stage.position as usize) else { return Ok(None) };
    let pond_core::definition::ExecutorSpec::Swarm(swarm) = &def.executor else { return Ok(None) };
    let registry = state.engine.registry();
    let harness = registry
        .harness(&swarm.harness)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("harness `{}` is no longer registered", swarm.harness))?;
    let model = match &swarm.model_ref {
        Some(key) => Some(
            registry
                .model(key)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("model `{key}` is no longer registered"))?,
        ),
        None => None,
    };
    // The run's and project's budgets as they stand at the claim: the worker's broker holds the
    // job's calls to what is left of them (calls of other jobs at the same time are not seen).
    let ledger = pond_core::usage::Ledger::new(state.store_dyn());
    let now = state.engine.clock().now();
    let budgets = ledger
        .caps(&claim.run.project_id, claim.run.id, claim.run.definition.budget, now)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some(pond_core::pool::JobAgent { harness, model, budgets }))
}

/// How long a worker may take to start a job before its credentials expire.
const CREDENTIALS_TTL_SECS: i64 = 600;

/// The stage's credentials, sealed to the claiming worker's pinned X25519 key for this job.
async fn sealed_credentials(
    state: &AppState,
    worker: &PoolMember,
    claim: &Claim,
    job_id: &str,
    agent: Option<&pond_core::pool::JobAgent>,
) -> Result<Option<String>, String> {
    let Some(def) = claim.run.definition.stages.get(claim.stage.position as usize) else { return Ok(None) };
    let credentials = state.engine.credentials();
    let project = claim.run.project_id.as_str();
    let mut values = credentials.values(def.executor.credentials(), project).await.map_err(|e| e.to_string())?;
    // An agent stage's model key, for the worker's broker (never the agent's environment).
    if let Some(model) = agent.and_then(|a| a.model.as_ref()) {
        let key = credentials
            .values(std::slice::from_ref(&model.credential_name), project)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(value) = key.into_values().next() {
            values.insert(pond_core::pool::MODEL_KEY.to_string(), value);
        }
    }
    if values.is_empty() {
        return Ok(None);
    }
    let key = worker
        .sealing_key
        .as_deref()
        .and_then(|k| pond_core::pool::decode_key(k).ok())
        .ok_or_else(|| format!("worker {} has no sealing key", worker.id))?;
    let not_after = state.engine.clock().now().as_millis() / 1000 + CREDENTIALS_TTL_SECS;
    Ok(Some(pond_core::credentials::seal_credentials(&key, job_id, not_after, values)))
}

fn job_id(text: &str) -> Result<JobId, ApiError> {
    text.parse().map_err(|e: String| ApiError::NotFound(e))
}

/// The job, if `worker` still holds it (renewing its lease on the way).
async fn held(state: &AppState, job: &str, worker: &PoolMember) -> Result<(JobId, bool), ApiError> {
    let job = job_id(job)?;
    match state.engine.renew_job(&job, worker).await? {
        LeaseStatus::Held { cancel_requested } => Ok((job, cancel_requested)),
        LeaseStatus::Lost => Err(ApiError::Conflict(format!(
            "lease lost: job {job} is no longer held by {} (it expired or another attempt took over)",
            worker.id
        ))),
    }
}

#[utoipa::path(post, path = "/orch/jobs/{job}/heartbeat", summary = "Renew a job's lease", tag = "orch", security(("orchestrator" = [], "worker_token" = [])),
    params(("job" = String, Path, description = "The job: `<run>.<stage>.<attempt>`.")),
    responses(
        (status = 200, description = "The lease is renewed.", body = Heartbeat),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn heartbeat(
    State(state): State<AppState>,
    r: Relayed,
    Path(job): Path<String>,
) -> Result<Json<Heartbeat>, ApiError> {
    let (job, cancel_requested) = held(&state, &job, &r.worker).await?;
    let job = job.to_string();
    state.seen.touch(&[(r.worker.id.as_str(), Some(job.as_str())), (r.orchestrator.id.as_str(), None)]);
    Ok(Json(Heartbeat { cancel_requested }))
}

#[utoipa::path(get, path = "/orch/jobs/{job}/input", summary = "A job's input, sealed to its worker", tag = "orch", security(("orchestrator" = [], "worker_token" = [])),
    params(("job" = String, Path, description = "The job: `<run>.<stage>.<attempt>`.")),
    responses(
        (status = 200, description = "The job's input (a `tar.zst` checkout) sealed to the worker (secretstream).", content_type = "application/octet-stream", body = crate::openapi::Binary,
            headers(("pond-input-sidecar" = String, description = "The input's `.pondkey` sidecar, sealed to the worker."))),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn input(State(state): State<AppState>, r: Relayed, Path(job): Path<String>) -> Result<Response, ApiError> {
    let (job, _) = held(&state, &job, &r.worker).await?;
    let input = state
        .engine
        .issued_input(job.run)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no input was issued for job {job}")))?;
    let bytes = match input.blob_id {
        // A run without sources: the empty input.
        None => Vec::new(),
        Some(blob) => {
            use pond_core::server_keys::{open_sealed_blob, SealedBlobError};
            match open_sealed_blob(state.store.as_ref(), blob, &state.engine.at_rest_keys()).await {
                Ok((_, opened)) => opened,
                Err(SealedBlobError::Store(e)) => return Err(e.into()),
                Err(e) => return Err(ApiError::Internal(format!("the input of job {job}: {e}"))),
            }
        }
    };
    // Sealed to the claiming worker's pinned X25519 key: only it can open the checkout, not the
    // orchestrator that relays it.
    let sealing = r
        .worker
        .sealing_key
        .as_deref()
        .and_then(|k| pond_core::pool::decode_key(k).ok())
        .ok_or_else(|| ApiError::Internal(format!("worker {} has no sealing key", r.worker.id)))?;
    let (sealed, sidecar) = tokio::task::spawn_blocking(move || pond_core::seal::seal_artifact(&bytes, &[sealing]))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (axum::http::HeaderName::from_static(crate::pool_wire::INPUT_SIDECAR_HEADER), sidecar),
        ],
        sealed,
    )
        .into_response())
}

#[utoipa::path(post, path = "/orch/jobs/{job}/logs", summary = "Append a batch of a job's log lines", tag = "orch", security(("orchestrator" = [], "worker_token" = [])),
    params(("job" = String, Path, description = "The job: `<run>.<stage>.<attempt>`.")),
    request_body(content = JobLines, content_type = "application/json"),
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
async fn logs(
    State(state): State<AppState>,
    r: Relayed,
    Path(job): Path<String>,
    LogLinesJson(body): LogLinesJson<JobLines>,
) -> Result<axum::http::StatusCode, ApiError> {
    let (job, _) = held(&state, &job, &r.worker).await?;
    let lines = body
        .lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| l.into_line(i))
        .collect::<Result<Vec<_>, _>>()
        .map_err(pond_core::CoreError::from)?;
    state.engine.job_logs(&job, lines).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/orch/jobs/{job}/artifacts/{*name}", summary = "Store a job's artifact", tag = "orch", security(("orchestrator" = [], "worker_token" = [])),
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
async fn artifact(
    State(state): State<AppState>,
    r: Relayed,
    Path((job, name)): Path<(String, String)>,
    body: axum::body::Body,
) -> Result<axum::http::StatusCode, ApiError> {
    let (job, _) = held(&state, &job, &r.worker).await?;
    let data: Bytes = read_body(body).await?;
    let run = state.engine.get(job.run).await?;
    state.engine.job_artifact(&job, &r.worker, &run.run, &name, &data).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

fn digest(field: &str, text: &str) -> Result<[u8; 32], ApiError> {
    hex::decode(text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| ApiError::invalid(field, "must be 64 hex characters (a SHA-256)"))
}

#[utoipa::path(post, path = "/orch/jobs/{job}/result", summary = "Report a job's signed result", tag = "orch", security(("orchestrator" = [], "worker_token" = [])),
    params(("job" = String, Path, description = "The job: `<run>.<stage>.<attempt>`.")),
    request_body(content = JobResult, content_type = "application/json"),
    responses(
        (status = 200, description = "Applied; whether pond verified the attestation.", body = ResultAck),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn result(
    State(state): State<AppState>,
    r: Relayed,
    Path(job): Path<String>,
    ApiJson(body): ApiJson<JobResult>,
) -> Result<Json<ResultAck>, ApiError> {
    let job = job_id(&job)?;
    let outcome = match body.outcome.as_str() {
        "succeeded" => StageOutcome::Succeeded,
        "failed" => StageOutcome::Failed {
            error: body.error.clone().unwrap_or_else(|| "failed".into()),
            exit_code: body.exit_code,
        },
        "cancelled" => StageOutcome::Cancelled,
        other => return Err(ApiError::invalid("outcome", format!("`{other}` is not succeeded, failed or cancelled"))),
    };
    if let Some(u) = &body.usage {
        use pond_core::usage::{MAX_REPORTED_REQUESTS, MAX_REPORTED_TOKENS};
        if u.requests > MAX_REPORTED_REQUESTS
            || u.input_tokens > MAX_REPORTED_TOKENS
            || u.output_tokens > MAX_REPORTED_TOKENS
        {
            return Err(ApiError::invalid(
                "usage",
                format!("more than {MAX_REPORTED_REQUESTS} calls or {MAX_REPORTED_TOKENS} tokens for one job"),
            ));
        }
    }
    let signature = base64::engine::general_purpose::STANDARD
        .decode(&body.signature)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| ApiError::invalid("signature", "must be a base64 Ed25519 signature (64 bytes)"))?;
    let report = JobReport {
        outcome,
        input_sha256: digest("input_sha256", &body.input_sha256)?,
        output_sha256: digest("output_sha256", &body.output_sha256)?,
        signature,
        usage: body.usage,
    };
    // The job's model spend is booked before its result is taken: if the books cannot be
    // written the worker is answered with an error and sends the result again (booking the
    // attempt's total is idempotent), so no spend goes unbooked behind an accepted result.
    if let Some(usage) = body.usage {
        if let LeaseStatus::Held { .. } = state.engine.renew_job(&job, &r.worker).await? {
            book_job_usage(&state, &job, usage).await?;
        }
    }
    let snapshot = state.engine.complete_job(&job, &r.worker, &report).await?;
    state.members.release(&r.worker.id);
    state.seen.touch(&[(r.worker.id.as_str(), None)]);
    let record = snapshot
        .attempts
        .iter()
        .find(|a| a.stage_key == job.stage && a.number == job.attempt)
        .and_then(|a| a.attestation.clone());
    let (attestation_verified, detail) = match record {
        Some(a) => (a.verified, a.detail),
        None => (false, "no attestation recorded".into()),
    };
    Ok(Json(ResultAck { attestation_verified, detail }))
}

/// Books what a worker's broker metered for a job, as the attempt's whole spend (a result sent
/// again books nothing twice). The figures are the worker's: it held the model's key.
async fn book_job_usage(state: &AppState, job: &JobId, usage: pond_core::usage::TokenUsage) -> Result<(), ApiError> {
    let Some(snapshot) = state.store.get_run(job.run).await? else { return Ok(()) };
    let stage = snapshot.run.definition.stages.iter().find(|s| s.key == job.stage);
    let Some(pond_core::definition::ExecutorSpec::Swarm(swarm)) = stage.map(|s| &s.executor) else {
        // Only an agent stage's broker meters model calls: anything else reported is not booked.
        return Ok(());
    };
    let model_ref = swarm.model_ref.clone();
    let model = match &model_ref {
        Some(key) => state.engine.registry().model(key).await.ok().flatten(),
        None => None,
    };
    let spend = pond_core::usage::Spend::priced(usage, model.as_ref());
    let booked = pond_core::usage::Ledger::new(state.store_dyn())
        .book(
            &snapshot.run.project_id,
            snapshot.run.id,
            &job.stage,
            job.attempt,
            model_ref.as_deref(),
            spend,
            pond_core::usage::Booking::Total,
            state.engine.clock().now(),
        )
        .await?;
    // What this report changed (nothing when a result is sent again).
    crate::broker::record_spend(&snapshot.run.project_id, model_ref.as_deref(), &booked);
    Ok(())
}

#[utoipa::path(post, path = "/orch/jobs/{job}/release", summary = "Hand a job back", tag = "orch", security(("orchestrator" = [], "worker_token" = [])),
    params(("job" = String, Path, description = "The job: `<run>.<stage>.<attempt>`.")),
    responses(
        (status = 204, description = "Handed back: the stage is queued again."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn release(
    State(state): State<AppState>,
    r: Relayed,
    Path(job): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    let job = job_id(&job)?;
    state.engine.release_job(&job, &r.worker, "the worker gave it back").await?;
    state.members.release(&r.worker.id);
    state.seen.touch(&[(r.worker.id.as_str(), None)]);
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/admin/pools", summary = "List orchestrators and workers", tag = "pools", security(("bearer" = [])),
    responses(
        (status = 200, description = "Orchestrators and workers.", body = PoolList,
            links(
                ("drain" = (operation_id = "drain", parameters(("id" = "$response.body#/workers/0/id")), description = "Drain the first worker.")),
                ("endorse" = (operation_id = "endorse", parameters(("id" = "$response.body#/workers/0/id")), description = "Endorse the first worker's keys.")),
                ("revoke" = (operation_id = "revoke", parameters(("id" = "$response.body#/workers/0/id")), description = "Revoke the first worker.")),
            )),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn list_pools(State(state): State<AppState>, who: Principal) -> Result<Json<PoolList>, ApiError> {
    who.require_admin()?;
    let seen = state.pools.last_seen().await?;
    let versions = state.pools.versions().await?;
    let mut list = PoolList { orchestrators: Vec::new(), workers: Vec::new() };
    for member in state.pools.members().await? {
        let (last_seen, current_job) = match seen.get(&member.id) {
            Some((at, job)) => (Some(at.to_rfc3339()), job.clone()),
            None => (None, None),
        };
        let version = versions.get(&member.id).cloned();
        let view = MemberView { member, last_seen, current_job, version };
        match view.member.kind {
            MemberKind::Orchestrator => list.orchestrators.push(view),
            MemberKind::Worker => list.workers.push(view),
        }
    }
    Ok(Json(list))
}

/// `POST /v1/admin/pools/workers/{id}/endorse` body.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Endorse {
    /// The worker's fingerprint as `pond fingerprint` prints it on the worker's own host.
    fingerprint: String,
}

/// Endorses the keys of a worker enrolled before endorsements existed, once the operator has
/// compared its fingerprint on the worker's host: the keys stored for it must have exactly that
/// fingerprint (a key written into the database by someone else does not).
#[utoipa::path(post, path = "/admin/pools/workers/{id}/endorse", tag = "pools", security(("bearer" = [])),
    params(("id" = String, Path, description = "The worker's id.")),
    request_body(content = Endorse, content_type = "application/json"),
    responses(
        (status = 200, description = "The worker, its keys endorsed.", body = PoolMember),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 404, response = crate::openapi::NotFound),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn endorse(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Endorse>,
) -> Result<Json<PoolMember>, ApiError> {
    who.require_admin()?;
    let member = state.pools.find(&id).await?;
    let (Some(key), Some(stored)) = (member.signing_key_bytes(), member.fingerprint.as_deref()) else {
        return Err(ApiError::invalid("id", format!("`{id}` is not a worker with keys")));
    };
    if member.revoked_at.is_some() {
        return Err(ApiError::invalid("id", format!("`{id}` is revoked")));
    }
    if stored != body.fingerprint.trim() {
        return Err(ApiError::invalid(
            "fingerprint",
            format!(
                "the keys stored for `{}` have fingerprint {stored}, not the one given: do not endorse them",
                member.id
            ),
        ));
    }
    let endorsement = state.engine.endorse_worker(&member.id, &key);
    Ok(Json(state.pools.set_endorsement(&member.id, endorsement).await?))
}

/// Revokes a worker or an orchestrator: its credential stops working at once (see
/// [`pond_core::pool::Pools::revoke`]).
#[utoipa::path(post, path = "/admin/pools/members/{id}/revoke", tag = "pools", security(("bearer" = [])),
    params(("id" = String, Path, description = "The member's id.")),
    responses(
        (status = 200, description = "The member, revoked for good.", body = PoolMember),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 404, response = crate::openapi::NotFound),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn revoke(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<PoolMember>, ApiError> {
    who.require_admin()?;
    let member = state.pools.revoke(&id).await?;
    state.members.forget(&member.id);
    tracing::warn!(id = %member.id, kind = member.kind.as_str(), "pool member revoked");
    Ok(Json(member))
}

#[utoipa::path(post, path = "/admin/pools/workers/{id}/drain", summary = "Drain a worker (or undo it)", tag = "pools", security(("bearer" = [])),
    params(("id" = String, Path, description = "The worker's id.")),
    request_body(content = Drain, content_type = "application/json", description = "Optional: no body drains."),
    responses(
        (status = 200, description = "The worker, draining (or not).", body = PoolMember),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 404, response = crate::openapi::NotFound),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 422, response = crate::openapi::Invalid),
        (status = 503, response = crate::openapi::Unavailable),
    ))]
async fn drain(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    body: Option<ApiJson<Drain>>,
) -> Result<Json<PoolMember>, ApiError> {
    who.require_admin()?;
    // No body (or no JSON one) drains.
    let draining = body.and_then(|ApiJson(d)| d.draining).unwrap_or(true);
    let member = state.pools.find(&id).await?;
    if member.kind != MemberKind::Worker {
        return Err(ApiError::invalid("id", format!("`{id}` is an orchestrator; drain its workers")));
    }
    state.members.forget(&member.id);
    Ok(Json(state.pools.set_draining(&member.id, draining).await?))
}

/// Throttles last-seen writes: a member's idle record is rewritten at most every 30 s,
/// so 1,000 idle long-polling workers do not cost 1,000 writes per poll. Changes of the job a
/// member holds are noted at once but written behind, by [`flush_seen`] once a second: what
/// `pond pool ls` shows is display-only, and a pooled run used to pay two record writes on its
/// claim and result paths (a job shorter than the flush interval now costs none).
#[derive(Default)]
pub struct SeenThrottle {
    written: std::sync::Mutex<HashMap<String, (Instant, Option<String>)>>,
    /// Noted and not yet written: each member's latest job (`None`: idle).
    pending: std::sync::Mutex<HashMap<String, Option<String>>>,
    /// The version last written for each member.
    versions: std::sync::Mutex<HashMap<String, String>>,
}

/// How often noted last-seen changes are written.
const SEEN_FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Writes what [`SeenThrottle`] noted, once a second until `stop`, and once more then. A write
/// that fails is tried again at the next tick (unless the member was noted again meanwhile).
pub async fn flush_seen(
    seen: std::sync::Arc<SeenThrottle>,
    pools: std::sync::Arc<pond_core::pool::Pools>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(SEEN_FLUSH_EVERY) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let due: Vec<(String, Option<String>)> =
            seen.pending.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        if !due.is_empty() {
            let rows: Vec<(&str, Option<&str>)> = due.iter().map(|(id, job)| (id.as_str(), job.as_deref())).collect();
            if let Err(e) = pools.touch(&rows).await {
                tracing::warn!(error = %e, "writing pool members' last-seen times failed; trying again");
                let mut pending = seen.pending.lock().unwrap_or_else(|p| p.into_inner());
                for (id, job) in due {
                    pending.entry(id).or_insert(job);
                }
            }
        }
        if stopping {
            return;
        }
    }
}

impl SeenThrottle {
    const EVERY: Duration = Duration::from_secs(30);

    /// Writes the versions that changed since this node last wrote them.
    async fn note_versions(&self, pools: &pond_core::pool::Pools, versions: &[(&str, &str)]) -> Result<(), ApiError> {
        let changed: Vec<(&str, &str)> = {
            let mut known = self.versions.lock().unwrap_or_else(|p| p.into_inner());
            versions
                .iter()
                .filter(|(id, version)| known.insert(id.to_string(), version.to_string()).as_deref() != Some(*version))
                .copied()
                .collect()
        };
        if !changed.is_empty() {
            if let Err(e) = pools.note_versions(&changed).await {
                // Not written: forget them, so the next claim tries again.
                let mut known = self.versions.lock().unwrap_or_else(|p| p.into_inner());
                for (id, _) in &changed {
                    known.remove(*id);
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Notes that members were heard from, with the job each holds (written behind).
    fn touch(&self, seen: &[(&str, Option<&str>)]) {
        let due: Vec<(&str, Option<&str>)> = {
            let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            seen.iter()
                .filter(|(id, job)| {
                    let fresh = written
                        .get(*id)
                        .is_some_and(|(at, j)| now.duration_since(*at) < Self::EVERY && j.as_deref() == *job);
                    if !fresh {
                        written.insert(id.to_string(), (now, job.map(str::to_string)));
                    }
                    !fresh
                })
                .copied()
                .collect()
        };
        if !due.is_empty() {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for (id, job) in due {
                pending.insert(id.to_string(), job.map(str::to_string));
            }
        }
    }
}
