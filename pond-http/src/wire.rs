//! JSON shapes of the `/v1` API, shared by the server and the typed client.

use pond_core::definition::Definition;
use pond_core::ids::{BlobId, RunId, TokenId};
use pond_core::run::{Attempt, RunSnapshot, RunState, StageState};
use pond_core::source::Source;
use pond_core::store::{Artifact, LogLine, Role, TokenRecord};
use pond_core::time::Timestamp;
use serde::{Deserialize, Serialize};

/// A run as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RunView {
    /// Id.
    pub id: RunId,
    /// Project.
    pub project_id: String,
    /// State.
    pub state: RunState,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// A cancel is pending or happened.
    pub cancel_requested: bool,
    /// Submitted.
    pub created_at: Timestamp,
    /// First stage started.
    pub started_at: Option<Timestamp>,
    /// Ended.
    pub finished_at: Option<Timestamp>,
    /// Sources with what they resolved to (commit, input_sha).
    pub sources: Vec<Source>,
    /// Stages in definition order.
    pub stages: Vec<StageView>,
    /// The workflow snapshot.
    pub definition: Definition,
    /// A confidential run's recipients and the consumer's signed request covering them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<pond_core::run::Encryption>,
    /// Things the submitter should know (e.g. a pooled stage no enrolled worker could take).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A stage as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct StageView {
    /// Key.
    pub key: String,
    /// Display name.
    pub name: String,
    /// Executor kind.
    pub executor: String,
    /// `local` (run by a server) or `pool` (run by a pool worker).
    pub placement: String,
    /// For a pooled stage, what its worker must offer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requirements: Option<pond_core::routing::Requirements>,
    /// For a queued pooled stage no enrolled worker could take: what it waits for, and the fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// For a pooled stage whose last attempt reported: whether pond verified the worker's
    /// signed result (signature under its pinned key, input it was issued).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attestation_verified: Option<bool>,
    /// State.
    pub state: StageState,
    /// Attempts started.
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// When a queued stage may start (after backoff).
    pub ready_at: Option<Timestamp>,
    /// Started.
    pub started_at: Option<Timestamp>,
    /// Ended.
    pub finished_at: Option<Timestamp>,
    /// Last error.
    pub error: Option<String>,
    /// Last exit code.
    pub exit_code: Option<i32>,
    /// Attempt history.
    pub attempts: Vec<Attempt>,
}

impl RunView {
    /// Says, for each queued pooled stage no enrolled worker could take, what it waits for
    /// (given the pool members enrolled now).
    pub fn explain_waiting(&mut self, members: &[pond_core::pool::PoolMember]) {
        for stage in &mut self.stages {
            if stage.state != StageState::Queued {
                continue;
            }
            if let Some(required) = &stage.requirements {
                stage.waiting_for = pond_core::pool::waiting_for(required, &self.project_id, members);
            }
        }
    }
}

impl From<RunSnapshot> for RunView {
    fn from(s: RunSnapshot) -> Self {
        let stages = s
            .stages
            .iter()
            .map(|st| {
                let def = &s.run.definition.stages[st.position as usize];
                StageView {
                    key: st.key.clone(),
                    name: def.display_name().to_string(),
                    executor: def.executor.kind().to_string(),
                    placement: if st.requirements.is_some() { "pool" } else { "local" }.into(),
                    requirements: st.requirements.clone(),
                    waiting_for: None,
                    attestation_verified: s
                        .attempts
                        .iter()
                        .rev()
                        .find(|a| a.stage_key == st.key && a.attestation.is_some())
                        .and_then(|a| a.attestation.as_ref().map(|x| x.verified)),
                    state: st.state,
                    attempt: st.attempt,
                    max_attempts: def.effective_max_attempts(),
                    ready_at: if st.state == StageState::Queued { st.ready_at } else { None },
                    started_at: st.started_at,
                    finished_at: st.finished_at,
                    error: st.error.clone(),
                    exit_code: st.exit_code,
                    attempts: s.attempts.iter().filter(|a| a.stage_key == st.key).cloned().collect(),
                }
            })
            .collect();
        let r = s.run;
        RunView {
            id: r.id,
            project_id: r.project_id,
            state: r.state,
            error: r.error,
            cancel_requested: r.cancel_requested,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            sources: r.sources,
            stages,
            definition: r.definition,
            encryption: r.encryption,
            warnings: Vec::new(),
        }
    }
}

/// A run in a list (no stages).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RunSummary {
    /// Id.
    pub id: RunId,
    /// Project.
    pub project_id: String,
    /// State.
    pub state: RunState,
    /// Submitted.
    pub created_at: Timestamp,
    /// Ended.
    pub finished_at: Option<Timestamp>,
    /// Why it failed.
    pub error: Option<String>,
    /// Stage count.
    pub stages: usize,
}

/// A page of runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RunPage {
    /// Runs, newest first.
    pub runs: Vec<RunSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<RunId>,
}

/// A page of log lines.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LogPage {
    /// Lines, oldest first.
    pub lines: Vec<LogLine>,
    /// Pass as `after` for the next page.
    pub next_cursor: i64,
    /// The run's state when the page was read.
    pub run_state: RunState,
}

/// The artifacts of a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ArtifactList {
    /// By name.
    pub artifacts: Vec<Artifact>,
}

/// An uploaded bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct BundleCreated {
    /// Use as `sources[].config.bundle_id`.
    pub bundle_id: BlobId,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the upload, hex.
    pub sha256: String,
}

/// `POST /v1/admin/keys` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// Projects the key may use.
    pub projects: Vec<String>,
    /// A label.
    #[serde(default)]
    pub name: Option<String>,
}

/// An API key, with its secret only at creation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct KeyView {
    /// Id.
    pub id: TokenId,
    /// Label.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Projects.
    pub projects: Vec<String>,
    /// Created.
    pub created_at: Timestamp,
    /// Revoked.
    pub revoked_at: Option<Timestamp>,
    /// The secret: returned once, by the create call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl From<TokenRecord> for KeyView {
    fn from(t: TokenRecord) -> Self {
        KeyView {
            id: t.id,
            name: t.name,
            role: t.role,
            projects: t.projects,
            created_at: t.created_at,
            revoked_at: t.revoked_at,
            token: None,
        }
    }
}

/// The list of API keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct KeyList {
    /// Keys, oldest first.
    pub keys: Vec<KeyView>,
}

/// The `end` event of a followed log: the run's final state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LogEnd {
    /// Final state.
    pub state: RunState,
    /// Why it failed.
    pub error: Option<String>,
}

/// The answer to a bulk cancel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct BulkCancelled {
    /// Runs asked to stop by this call.
    pub cancelled: Vec<RunId>,
    /// Runs that could not be cancelled, with why; the others went on.
    pub failed: Vec<BulkFailure>,
}

/// One run a bulk cancel could not cancel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct BulkFailure {
    /// The run.
    pub id: RunId,
    /// Why.
    pub error: String,
}

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// The server's version.
    pub version: String,
    /// What the server accepts.
    pub limits: HealthLimits,
}

/// The limits `GET /healthz` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct HealthLimits {
    /// Largest source bundle `POST /v1/bundles` accepts.
    pub max_bundle_bytes: u64,
}

/// `GET /readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Ready {
    /// `ready`.
    pub status: String,
}

/// An orchestrator's `GET /healthz`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OrchestratorHealth {
    /// `ok`.
    pub status: String,
    /// The orchestrator's pond version.
    pub version: String,
}

/// `GET /v1/whoami`: the credential presented, as the API scopes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct WhoAmI {
    /// The key's id (`pond keys revoke` takes it).
    pub key_id: TokenId,
    /// `admin` or `consumer`.
    pub role: Role,
    /// The projects a consumer key may use (empty for an admin key, which sees every project).
    pub projects: Vec<String>,
}

/// `GET /v1/version`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Version {
    /// The server's version.
    pub version: String,
    /// The API (`v1`).
    pub api: String,
}
