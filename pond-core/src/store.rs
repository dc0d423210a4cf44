//! The `Store` trait: everything pond persists. Implementations live in `pond-store` (memory,
//! SQLite, PostgreSQL) and all pass one conformance suite.
//!
//! Each method is atomic. Run state changes go through [`Store::update_run`], which applies a
//! pure mutation from [`crate::run`] inside the backend's transaction, so the state machine
//! stays in pond-core while the store supplies the isolation.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, StoreError};
use crate::ids::{BlobId, RunId, TokenId};
use crate::run::{Run, RunSnapshot, RunState, Stage};
use crate::time::Timestamp;

/// Size of the chunks blobs (artifacts, bundles) are stored in.
pub const BLOB_CHUNK_BYTES: usize = 1024 * 1024;

/// What [`Store::insert_run`] did.
#[derive(Debug)]
pub enum InsertOutcome {
    /// The run was stored.
    Created,
    /// A run with the same project and idempotency key exists; it is returned instead.
    Existing(Box<RunSnapshot>),
}

/// A page request over runs, newest first.
#[derive(Clone, Debug, Default)]
pub struct RunQuery {
    /// Only these projects; `None` for all.
    pub projects: Option<Vec<String>>,
    /// Only runs in this state.
    pub state: Option<RunState>,
    /// Only runs older than this one (the cursor).
    pub before: Option<RunId>,
    /// Only runs whose id, idempotency key, error or definition (stage keys, names, commands)
    /// contains this text, ASCII letters matched in either case.
    pub text: Option<String>,
    /// Page size.
    pub limit: u32,
}

impl RunQuery {
    /// The `LIKE` pattern for [`RunQuery::text`]: the text with `\`, `%` and `_` escaped (the
    /// stores' `LIKE … ESCAPE '\'`), between two `%`.
    pub fn like_pattern(&self) -> Option<String> {
        self.text.as_ref().map(|t| {
            let mut pattern = String::with_capacity(t.len() + 2);
            pattern.push('%');
            for c in t.chars() {
                if matches!(c, '\\' | '%' | '_') {
                    pattern.push('\\');
                }
                pattern.push(c);
            }
            pattern.push('%');
            pattern
        })
    }

    /// Whether `run` matches [`RunQuery::text`] (the in-memory store's form of the stores' `LIKE`).
    pub fn matches_text(&self, run: &crate::run::Run) -> bool {
        let Some(text) = &self.text else { return true };
        let needle = text.to_ascii_lowercase();
        let definition = serde_json::to_string(&run.definition).unwrap_or_default();
        [Some(run.id.to_string()), run.idempotency_key.clone(), run.error.clone(), Some(definition)]
            .into_iter()
            .flatten()
            .any(|hay| hay.to_ascii_lowercase().contains(&needle))
    }
}

/// A request to claim ready stages.
#[derive(Clone, Debug)]
pub struct ClaimQuery {
    /// Who takes the lease.
    pub owner: String,
    /// Only stages whose executor kind is one of these.
    pub kinds: Vec<String>,
    /// The claim time.
    pub now: Timestamp,
    /// When the new leases expire.
    pub lease_until: Timestamp,
    /// At most this many stages.
    pub limit: u32,
    /// For a pool worker's claim: what it offers. Only stages whose requirements it meets
    /// (see [`crate::routing::admits`]) are taken, and only while the worker (`owner`) holds
    /// no live lease: a worker runs one job at a time, so pond never gives a busy one another —
    /// not even to an older long poll still waiting on another node behind a load balancer.
    pub offer: Option<crate::routing::WorkerOffer>,
}

/// A stage taken by a claim, with its run.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The run (with its definition).
    pub run: Run,
    /// The stage as claimed: running, with the new attempt number.
    pub stage: Stage,
}

/// Stages of unfinished runs in one state and placement (the queue-depth gauges).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageCount {
    /// `queued` or `running`.
    pub state: crate::run::StageState,
    /// Whether a pool worker runs it (else a server).
    pub pooled: bool,
    /// Queued only: whether it may start now (its needs met, its backoff over).
    pub ready: bool,
    /// How many.
    pub count: u64,
}

/// Whether a lease is still held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Still held; `cancel_requested` tells the holder to stop.
    Held {
        /// A cancel is pending.
        cancel_requested: bool,
    },
    /// Another attempt took over, or the stage ended: stop and drop the result.
    Lost,
}

/// Which stream a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// Pond's own messages about the run (transitions, retries, errors).
    System,
}

impl LogStream {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::System => "system",
        }
    }
    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "stdout" => LogStream::Stdout,
            "stderr" => LogStream::Stderr,
            "system" => LogStream::System,
            _ => return None,
        })
    }
}

/// How a stored line's `text` holds its bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum LineEncoding {
    /// The bytes are UTF-8 text without NUL, stored as they are.
    #[default]
    Utf8,
    /// Standard base64 (with padding) of bytes that are not: any bytes round-trip exactly.
    Base64,
}

impl LineEncoding {
    fn is_utf8(&self) -> bool {
        *self == LineEncoding::Utf8
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A log line to append.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NewLogLine {
    /// The stage it belongs to, if any.
    pub stage: Option<String>,
    /// The attempt (0 for run-level lines).
    pub attempt: u32,
    /// Where it came from.
    pub stream: LogStream,
    /// When it was produced.
    pub at: Timestamp,
    /// The line's bytes without its newline, as `encoding` says.
    pub text: String,
    /// `base64` when the bytes are not UTF-8 text without NUL (absent: `utf8`).
    #[serde(default, skip_serializing_if = "LineEncoding::is_utf8")]
    pub encoding: LineEncoding,
    /// The line goes on in the next record of the same stage, attempt and stream: it was longer
    /// than one record holds (16 KiB). Readers join the pieces with nothing between them.
    #[serde(default, skip_serializing_if = "is_false")]
    pub continued: bool,
    /// The producer's number for this line within its attempt's output (0, 1, 2, …): a line
    /// delivered twice (a retried batch) is stored once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line_seq: Option<u64>,
}

impl NewLogLine {
    /// A whole line of UTF-8 text (pond's own messages, tests).
    pub fn text(stage: Option<String>, attempt: u32, stream: LogStream, at: Timestamp, text: String) -> Self {
        NewLogLine { stage, attempt, stream, at, text, encoding: LineEncoding::Utf8, continued: false, line_seq: None }
    }

    /// A line (or piece of one) of output bytes, stored as text when they are UTF-8 without NUL
    /// and as base64 otherwise.
    pub fn output(stage: &str, attempt: u32, at: Timestamp, line: &crate::exec::OutputLine, seq: u64) -> Self {
        let (text, encoding) = encode_line(&line.bytes);
        NewLogLine {
            stage: Some(stage.to_string()),
            attempt,
            stream: line.stream,
            at,
            text,
            encoding,
            continued: line.continued,
            line_seq: Some(seq),
        }
    }

    /// The line's bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, String> {
        match self.encoding {
            LineEncoding::Utf8 => Ok(self.text.as_bytes().to_vec()),
            LineEncoding::Base64 => base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &self.text)
                .map_err(|e| format!("a base64 log line does not decode: {e}")),
        }
    }
}

/// `bytes` as stored: the text itself when it is UTF-8 without NUL, else base64.
pub fn encode_line(bytes: &[u8]) -> (String, LineEncoding) {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => (text.to_string(), LineEncoding::Utf8),
        _ => (base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes), LineEncoding::Base64),
    }
}

/// A stored log line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogLine {
    /// Position in the run's log; strictly increasing, the cursor for reads.
    pub seq: i64,
    /// The line.
    #[serde(flatten)]
    pub line: NewLogLine,
}

/// A stored blob's description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    /// Its id.
    pub id: BlobId,
    /// The project it belongs to.
    pub project_id: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// When it was stored.
    pub created_at: Timestamp,
}

impl BlobMeta {
    /// Number of chunks the blob is stored in.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(BLOB_CHUNK_BYTES as u64)
    }
}

/// An artifact of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Artifact {
    /// The run.
    pub run_id: RunId,
    /// Its name, unique within the run (a relative path such as `reports/a.json`).
    pub name: String,
    /// The stage that produced it.
    pub stage: String,
    /// The attempt of that stage that produced it (what a pooled result's signed manifest is
    /// compared with: this attempt's artifacts, whatever the clocks said).
    pub attempt: u32,
    /// Where its bytes are.
    pub blob_id: BlobId,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// When it was stored.
    pub created_at: Timestamp,
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Role {
    /// Everything, including `/v1/admin`.
    Admin,
    /// Runs of the token's projects.
    Consumer,
}

/// A stored API token. The secret itself is never stored, only its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Its id (shown, never secret).
    pub id: TokenId,
    /// A label.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Projects a consumer token may use.
    pub projects: Vec<String>,
    /// SHA-256 of the secret, hex.
    #[serde(skip_serializing)]
    pub secret_sha256: String,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it was revoked.
    pub revoked_at: Option<Timestamp>,
}

/// The mutation `update_run` applies inside its transaction. It returns log lines describing
/// the change, which the store appends to the run's log in the same transaction.
pub type RunMutation<'a> = &'a mut (dyn FnMut(&mut RunSnapshot) -> Result<Vec<NewLogLine>, CoreError> + Send);

/// The progress line a claim writes for a stage it hands out (`None`: none).
pub type ClaimLine<'a> = &'a (dyn Fn(&Claim) -> Option<NewLogLine> + Sync);

/// Everything pond persists: runs, stages, attempts, logs, blobs, artifacts, tokens.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a new run. With an idempotency key already used in the project, stores nothing
    /// and returns the existing run.
    async fn insert_run(&self, snapshot: &RunSnapshot) -> Result<InsertOutcome, StoreError>;
    /// A run with its stages and attempts.
    async fn get_run(&self, id: RunId) -> Result<Option<RunSnapshot>, StoreError>;
    /// Runs, newest first.
    async fn list_runs(&self, query: &RunQuery) -> Result<Vec<Run>, StoreError>;
    /// Applies `mutate` to the run atomically, with the log lines it returns, and returns the
    /// result. If `mutate` fails nothing is written and the error comes back as
    /// [`StoreError::Rejected`].
    async fn update_run(&self, id: RunId, mutate: RunMutation<'_>) -> Result<RunSnapshot, StoreError>;
    /// Applies several mutations, each as [`Store::update_run`] would and in the order given
    /// (a later one for the same run sees what the earlier ones did), committed together where
    /// the backend can: a batch of completions is one transaction, not one each. Results come
    /// back in the same order. A mutation that fails leaves its run as the earlier ones left it
    /// and does not stop the others; a store error fails only the items it touched.
    async fn update_runs(&self, changes: &mut [(RunId, RunMutation<'_>)]) -> Vec<Result<RunSnapshot, StoreError>> {
        let mut results = Vec::with_capacity(changes.len());
        for (id, mutate) in changes.iter_mut() {
            results.push(self.update_run(*id, &mut **mutate).await);
        }
        results
    }
    /// Claims up to `limit` claimable stages (see [`Stage::claimable`]); no stage is ever
    /// handed to two claimers for the same attempt.
    async fn claim_stages(&self, query: &ClaimQuery) -> Result<Vec<Claim>, StoreError>;
    /// [`Store::claim_stages`], also writing the progress line `line` gives for each stage
    /// claimed — in the claim's own transaction where the backend can (one commit, not two).
    /// A failed line write never undoes the claim.
    async fn claim_stages_logged(&self, query: &ClaimQuery, line: ClaimLine<'_>) -> Result<Vec<Claim>, StoreError> {
        let claims = self.claim_stages(query).await?;
        let lines: Vec<(RunId, NewLogLine)> = claims.iter().filter_map(|c| line(c).map(|l| (c.run.id, l))).collect();
        let _ = self.append_log_batch(&lines).await;
        Ok(claims)
    }
    /// Extends the lease of a running attempt held by `owner`.
    async fn renew_lease(
        &self,
        run: RunId,
        stage: &str,
        attempt: u32,
        owner: &str,
        until: Timestamp,
    ) -> Result<LeaseStatus, StoreError>;
    /// Runs with a running stage whose lease expired while a cancel was pending, or that lost
    /// its lease too often: they need [`RunSnapshot::reap`].
    async fn runs_to_reap(&self, now: Timestamp, limit: u32) -> Result<Vec<RunId>, StoreError>;
    /// Queued and running stages by state, placement and (queued) readiness at `now`.
    async fn stage_counts(&self, now: Timestamp) -> Result<Vec<StageCount>, StoreError>;
    /// Lets every running lease expire at `now`. Only for a store that one node owns
    /// exclusively (SQLite), at start-up: the previous process is known to be dead.
    async fn expire_all_leases(&self, now: Timestamp) -> Result<u64, StoreError>;

    /// Events (run and stage state changes, written by [`Store::insert_run`],
    /// [`Store::update_run`] and [`Store::claim_stages`] in the change's own transaction) with
    /// `seq > after`, oldest first; only those of `projects` when given. Positions grow in commit
    /// order across every node, so reading on from the last position seen misses nothing.
    async fn read_events(
        &self,
        after: i64,
        projects: Option<&[String]>,
        limit: u32,
    ) -> Result<Vec<crate::events::Event>, StoreError>;
    /// The position of the newest event (0 when there is none).
    async fn last_event_seq(&self) -> Result<i64, StoreError>;
    /// Deletes events written before `before` and positioned below `below` (retention, short of
    /// what a webhook has yet to deliver); returns how many. Positions are never reused.
    async fn prune_events(&self, before: Timestamp, below: i64) -> Result<u64, StoreError>;

    /// Appends log lines to a run's log, in order.
    async fn append_logs(&self, run: RunId, lines: &[NewLogLine]) -> Result<(), StoreError>;
    /// Appends lines to the logs of several runs, in order; one transaction where the backend
    /// can (the engine batches its own progress lines this way).
    async fn append_log_batch(&self, lines: &[(RunId, NewLogLine)]) -> Result<(), StoreError> {
        for (run, line) in lines {
            self.append_logs(*run, std::slice::from_ref(line)).await?;
        }
        Ok(())
    }
    /// Log lines with `seq > after`, oldest first.
    async fn read_logs(&self, run: RunId, after: i64, limit: u32) -> Result<Vec<LogLine>, StoreError>;

    /// Stores bytes in chunks.
    async fn put_blob(&self, project_id: &str, data: &[u8], now: Timestamp) -> Result<BlobMeta, StoreError>;
    /// A blob's description.
    async fn blob_meta(&self, id: BlobId) -> Result<Option<BlobMeta>, StoreError>;
    /// Deletes a blob (absent: nothing to do).
    async fn delete_blob(&self, id: BlobId) -> Result<(), StoreError>;
    /// Up to `limit` blobs with ids after `after`, in id order (the key re-seal's walk).
    async fn list_blobs(&self, after: Option<BlobId>, limit: u32) -> Result<Vec<BlobMeta>, StoreError>;
    /// Replaces a blob's bytes under the same id, atomically, if its SHA-256 is still
    /// `expected_sha256`; returns whether it did (`false`: changed or gone meanwhile).
    async fn replace_blob(&self, id: BlobId, expected_sha256: &str, data: &[u8]) -> Result<bool, StoreError>;
    /// Up to `limit` runs that ended before `finished_before`, oldest first: retention's
    /// candidates for [`Store::delete_finished_run`].
    async fn finished_runs(&self, finished_before: Timestamp, limit: u32) -> Result<Vec<RunId>, StoreError>;
    /// Deletes `run` if it ended before `finished_before`, with its stages, attempts, logs and
    /// artifacts and the blobs of those artifacts (retention); `None` when it is no such run
    /// (another node deleted it first). A large log is deleted in slices first, so no one
    /// transaction holds the writer long. Events and transparency-log leaves stay (they have
    /// their own retention, or none: the log is append-only).
    async fn delete_finished_run(
        &self,
        run: RunId,
        finished_before: Timestamp,
    ) -> Result<Option<RunSnapshot>, StoreError>;
    /// Chunk `index` of a blob (each [`BLOB_CHUNK_BYTES`] long but the last).
    async fn read_blob_chunk(&self, id: BlobId, index: u64) -> Result<Vec<u8>, StoreError>;

    /// The first `len` bytes of a blob (fewer if it is shorter): what tells a sealed value's key
    /// without reading the rest. Stores that can read part of a chunk do.
    async fn read_blob_prefix(&self, id: BlobId, len: usize) -> Result<Vec<u8>, StoreError> {
        let mut chunk = self.read_blob_chunk(id, 0).await?;
        chunk.truncate(len);
        Ok(chunk)
    }

    /// Records an artifact, atomically with the check that its attempt may still write: the
    /// stage is running that attempt under `holder`'s lease and its output is not closed
    /// ([`Store::close_output`]). An artifact of the same name from an earlier attempt of the
    /// same stage is replaced; one from another stage is never replaced. Refusals are
    /// [`StoreError::Conflict`] saying which rule.
    ///
    /// `run_cap` bounds the run's stored artifact bytes (the new one counted, one it replaces
    /// not): a write that would pass it is refused (`Conflict`), checked in the same atomic
    /// step as the write, so concurrent writers cannot pass it together.
    async fn put_artifact(&self, artifact: &Artifact, holder: &str, run_cap: u64) -> Result<(), StoreError>;
    /// Closes an attempt's output before its result is judged: from then on no artifact of
    /// that attempt is accepted, so what was verified is what stays stored. Returns whether
    /// `holder` still holds the running attempt (closing twice is fine).
    async fn close_output(&self, run: RunId, stage: &str, attempt: u32, holder: &str) -> Result<bool, StoreError>;
    /// A run's artifacts by name.
    async fn list_artifacts(&self, run: RunId) -> Result<Vec<Artifact>, StoreError>;
    /// One artifact.
    async fn get_artifact(&self, run: RunId, name: &str) -> Result<Option<Artifact>, StoreError>;

    /// Appends a leaf (about `run`) to the transparency log, at the next index, which it
    /// returns. Appends from several nodes take turns; a leaf is never changed or removed.
    async fn append_leaf(&self, run: RunId, leaf: &str, leaf_hash: &[u8; 32], at: Timestamp)
        -> Result<u64, StoreError>;
    /// The hashes of the log's leaves from index `from` up to (not including) `to` (to the end
    /// with `None`), in order.
    async fn leaf_hashes(&self, from: u64, to: Option<u64>) -> Result<Vec<[u8; 32]>, StoreError>;
    /// A run's leaves, `(index, leaf)` in index order.
    async fn run_leaves(&self, run: RunId) -> Result<Vec<(u64, String)>, StoreError>;
    /// The leaves of several runs, `(run, index, leaf)` in index order: one read for a claim's
    /// whole batch.
    async fn leaves_of_runs(&self, runs: &[RunId]) -> Result<Vec<(RunId, u64, String)>, StoreError> {
        let mut all = Vec::new();
        for run in runs {
            all.extend(self.run_leaves(*run).await?.into_iter().map(|(i, l)| (*run, i, l)));
        }
        all.sort_by_key(|(_, i, _)| *i);
        Ok(all)
    }

    /// Stores a token.
    async fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// Stores `token` only if no unrevoked admin token exists, atomically, so that nodes
    /// starting at once make one admin token between them. Returns whether it was stored.
    async fn insert_first_admin(&self, token: &TokenRecord) -> Result<bool, StoreError>;
    /// The token whose secret hashes to `secret_sha256`.
    async fn find_token(&self, secret_sha256: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// All tokens.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Revokes a token; false when there is none.
    async fn revoke_token(&self, id: TokenId, now: Timestamp) -> Result<bool, StoreError>;

    /// A small record (pool bookkeeping: enrollment codes, members, job inputs) by kind and key.
    async fn get_record(&self, kind: &str, key: &str) -> Result<Option<String>, StoreError>;
    /// Every record of a kind, as (key, body).
    async fn list_records(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError>;
    /// Writes a record unconditionally.
    async fn put_record(&self, kind: &str, key: &str, body: &str) -> Result<(), StoreError>;
    /// Deletes a record (absent: nothing to do).
    async fn delete_record(&self, kind: &str, key: &str) -> Result<(), StoreError>;
    /// Writes a record only if its body is `expected` now (`None`: only if absent), atomically.
    /// Returns whether it wrote.
    async fn swap_record(&self, kind: &str, key: &str, expected: Option<&str>, body: &str) -> Result<bool, StoreError>;
}

/// Reads a whole blob (for callers that need it in memory, such as bundle extraction).
pub async fn read_blob(store: &dyn Store, meta: &BlobMeta) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(meta.size as usize);
    for i in 0..meta.chunk_count() {
        out.extend_from_slice(&store.read_blob_chunk(meta.id, i).await?);
    }
    Ok(out)
}
