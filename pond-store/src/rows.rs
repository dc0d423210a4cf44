//! Decoding rows into pond's types, shared by the SQLite and PostgreSQL stores: both store the
//! same columns (ids as text, times as milliseconds, JSON as text), so one decoder per type
//! serves both through the small [`Columns`] trait.

use std::str::FromStr;

use pond_core::definition::Definition;
use pond_core::ids::{BlobId, RunId, TokenId};
use pond_core::routing::Requirements;
use pond_core::run::{Attempt, AttemptOutcome, Run, RunState, Stage, StageState};
use pond_core::source::Source;
use pond_core::store::{Artifact, BlobMeta, LogLine, LogStream, NewLogLine, Role, TokenRecord};
use pond_core::time::Timestamp;
use pond_core::StoreError;
use sqlx::Row;

/// Maps a database error to the store's error kinds: unreachable → `Unavailable` (the API says
/// 503 and callers retry), uniqueness → `Conflict`, bad bytes → `Corrupt`.
pub(crate) fn db_err(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(d.message().to_string()),
        // Class 08 (connection exception), 57P0x (shutdown / cannot connect now), 53300 (too many connections).
        sqlx::Error::Database(d)
            if d.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300") =>
        {
            StoreError::Unavailable(d.message().to_string())
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::Io(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => StoreError::Unavailable(e.to_string()),
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreError::Corrupt(e.to_string()),
        other => StoreError::Backend(other.to_string()),
    }
}

pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// A pooled stage's requirements as the two JSON columns `pool_tags` and `pool_caps`.
pub(crate) fn requirement_columns(stage: &Stage) -> (Option<String>, Option<String>) {
    match &stage.requirements {
        Some(r) => (
            Some(serde_json::to_string(&r.tags).unwrap_or_else(|_| "[]".into())),
            Some(serde_json::to_string(&r.capabilities).unwrap_or_else(|_| "[]".into())),
        ),
        None => (None, None),
    }
}

/// A run's encryption (its recipients) as its JSON column.
pub(crate) fn encryption_column(run: &Run) -> Option<String> {
    run.encryption.as_ref().and_then(|e| serde_json::to_string(e).ok())
}

/// An attempt's attestation as its JSON column.
pub(crate) fn attestation_column(attempt: &Attempt) -> Option<String> {
    attempt.attestation.as_ref().and_then(|a| serde_json::to_string(a).ok())
}

/// `stage_counts` rows (state, pooled, ready, count) as the trait returns them; a state pond
/// does not know is left out.
pub(crate) fn stage_counts(rows: Vec<(String, bool, bool, i64)>) -> Vec<pond_core::store::StageCount> {
    rows.into_iter()
        .filter_map(|(state, pooled, ready, count)| {
            let state = pond_core::run::StageState::parse(&state)?;
            Some(pond_core::store::StageCount { state, pooled, ready, count: count.max(0) as u64 })
        })
        .collect()
}

pub(crate) fn ts(t: Option<Timestamp>) -> Option<i64> {
    t.map(Timestamp::as_millis)
}

/// Typed column access over either backend's rows.
pub(crate) trait Columns {
    fn text(&self, col: &str) -> Result<String, StoreError>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, col: &str) -> Result<i64, StoreError>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError>;
    fn flag(&self, col: &str) -> Result<bool, StoreError>;

    fn time(&self, col: &str) -> Result<Timestamp, StoreError> {
        self.int(col).map(Timestamp::from_millis)
    }
    fn opt_time(&self, col: &str) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.opt_int(col)?.map(Timestamp::from_millis))
    }
    fn parsed<T: FromStr>(&self, col: &str) -> Result<T, StoreError>
    where
        T::Err: std::fmt::Display,
    {
        let text = self.text(col)?;
        text.parse().map_err(|e| corrupt(format!("{col} `{text}`: {e}")))
    }
}

macro_rules! columns_for {
    ($row:ty) => {
        impl Columns for $row {
            fn text(&self, col: &str) -> Result<String, StoreError> {
                self.try_get(col).map_err(db_err)
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
                self.try_get(col).map_err(db_err)
            }
            fn int(&self, col: &str) -> Result<i64, StoreError> {
                self.try_get(col).map_err(db_err)
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError> {
                self.try_get(col).map_err(db_err)
            }
            fn flag(&self, col: &str) -> Result<bool, StoreError> {
                self.try_get(col).map_err(db_err)
            }
        }
    };
}

columns_for!(sqlx::sqlite::SqliteRow);
columns_for!(sqlx::postgres::PgRow);

/// A row as PostgreSQL's `to_jsonb` gives it (rows of several tables read by one statement).
impl Columns for serde_json::Map<String, serde_json::Value> {
    fn text(&self, col: &str) -> Result<String, StoreError> {
        self.opt_text(col)?.ok_or_else(|| corrupt(format!("column {col} is missing")))
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
        match self.get(col) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(corrupt(format!("column {col}: text expected, found {other}"))),
        }
    }
    fn int(&self, col: &str) -> Result<i64, StoreError> {
        self.opt_int(col)?.ok_or_else(|| corrupt(format!("column {col} is missing")))
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError> {
        match self.get(col) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => {
                v.as_i64().map(Some).ok_or_else(|| corrupt(format!("column {col}: integer expected, found {v}")))
            }
        }
    }
    fn flag(&self, col: &str) -> Result<bool, StoreError> {
        match self.get(col) {
            Some(serde_json::Value::Bool(b)) => Ok(*b),
            other => Err(corrupt(format!("column {col}: boolean expected, found {other:?}"))),
        }
    }
}

pub(crate) fn run_from_row(row: &impl Columns) -> Result<Run, StoreError> {
    let state = row.text("state")?;
    Ok(Run {
        id: row.parsed::<RunId>("id")?,
        project_id: row.text("project_id")?,
        state: RunState::parse(&state).ok_or_else(|| corrupt(format!("run state `{state}`")))?,
        definition: serde_json::from_str::<Definition>(&row.text("definition")?).map_err(corrupt)?,
        sources: serde_json::from_str::<Vec<Source>>(&row.text("sources")?).map_err(corrupt)?,
        idempotency_key: row.opt_text("idempotency_key")?,
        request_digest: row.opt_text("request_digest")?,
        cancel_requested: row.flag("cancel_requested")?,
        error: row.opt_text("error")?,
        created_at: row.time("created_at")?,
        started_at: row.opt_time("started_at")?,
        finished_at: row.opt_time("finished_at")?,
        encryption: match row.opt_text("encryption")? {
            Some(text) => Some(serde_json::from_str(&text).map_err(corrupt)?),
            None => None,
        },
    })
}

pub(crate) fn stage_from_row(row: &impl Columns) -> Result<Stage, StoreError> {
    let state = row.text("state")?;
    Ok(Stage {
        key: row.text("key")?,
        position: row.int("position")? as u32,
        executor_kind: row.text("executor_kind")?,
        state: StageState::parse(&state).ok_or_else(|| corrupt(format!("stage state `{state}`")))?,
        ready_at: row.opt_time("ready_at")?,
        attempt: row.int("attempt")? as u32,
        failures: row.int("failures")? as u32,
        lost_leases: row.int("lost_leases")? as u32,
        lease_owner: row.opt_text("lease_owner")?,
        lease_expires_at: row.opt_time("lease_expires_at")?,
        cancel_requested: row.flag("cancel_requested")?,
        started_at: row.opt_time("started_at")?,
        finished_at: row.opt_time("finished_at")?,
        error: row.opt_text("error")?,
        exit_code: row.opt_int("exit_code")?.map(|c| c as i32),
        requirements: match (row.opt_text("pool_tags")?, row.opt_text("pool_caps")?) {
            (Some(tags), caps) => Some(Requirements {
                tags: serde_json::from_str(&tags).map_err(corrupt)?,
                capabilities: serde_json::from_str(caps.as_deref().unwrap_or("[]")).map_err(corrupt)?,
            }),
            (None, _) => None,
        },
    })
}

pub(crate) fn attempt_from_row(row: &impl Columns) -> Result<Attempt, StoreError> {
    let outcome = match row.opt_text("outcome")? {
        Some(o) => Some(AttemptOutcome::parse(&o).ok_or_else(|| corrupt(format!("attempt outcome `{o}`")))?),
        None => None,
    };
    Ok(Attempt {
        stage_key: row.text("stage_key")?,
        number: row.int("number")? as u32,
        owner: row.text("owner")?,
        started_at: row.time("started_at")?,
        finished_at: row.opt_time("finished_at")?,
        outcome,
        error: row.opt_text("error")?,
        attestation: match row.opt_text("attestation")? {
            Some(text) => Some(serde_json::from_str(&text).map_err(corrupt)?),
            None => None,
        },
    })
}

pub(crate) fn blob_from_row(row: &impl Columns) -> Result<BlobMeta, StoreError> {
    Ok(BlobMeta {
        id: row.parsed::<BlobId>("id")?,
        project_id: row.text("project_id")?,
        size: row.int("size")? as u64,
        sha256: row.text("sha256")?,
        created_at: row.time("created_at")?,
    })
}

pub(crate) fn artifact_from_row(row: &impl Columns) -> Result<Artifact, StoreError> {
    Ok(Artifact {
        run_id: row.parsed::<RunId>("run_id")?,
        name: row.text("name")?,
        stage: row.text("stage")?,
        attempt: row.int("attempt")? as u32,
        blob_id: row.parsed::<BlobId>("blob_id")?,
        size: row.int("size")? as u64,
        sha256: row.text("sha256")?,
        created_at: row.time("created_at")?,
    })
}

pub(crate) fn role_text(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Consumer => "consumer",
    }
}

pub(crate) fn token_from_row(row: &impl Columns) -> Result<TokenRecord, StoreError> {
    let role = row.text("role")?;
    Ok(TokenRecord {
        id: row.parsed::<TokenId>("id")?,
        name: row.text("name")?,
        role: match role.as_str() {
            "admin" => Role::Admin,
            "consumer" => Role::Consumer,
            other => return Err(corrupt(format!("token role `{other}`"))),
        },
        projects: serde_json::from_str(&row.text("projects")?).map_err(corrupt)?,
        secret_sha256: row.text("secret_sha256")?,
        created_at: row.time("created_at")?,
        revoked_at: row.opt_time("revoked_at")?,
    })
}

/// `logs.flags`: the line continues in the next record.
pub(crate) const LOG_CONTINUED: i64 = 1;
/// `logs.flags`: `text` is base64.
pub(crate) const LOG_BASE64: i64 = 2;

/// A line's `logs.flags`.
pub(crate) fn log_flags(line: &NewLogLine) -> i64 {
    let mut flags = 0;
    if line.continued {
        flags |= LOG_CONTINUED;
    }
    if line.encoding == pond_core::store::LineEncoding::Base64 {
        flags |= LOG_BASE64;
    }
    flags
}

pub(crate) fn log_from_row(row: &impl Columns) -> Result<LogLine, StoreError> {
    let stream = row.text("stream")?;
    let flags = row.int("flags")?;
    Ok(LogLine {
        seq: row.int("seq")?,
        line: NewLogLine {
            stage: row.opt_text("stage")?,
            attempt: row.int("attempt")? as u32,
            stream: LogStream::parse(&stream).ok_or_else(|| corrupt(format!("log stream `{stream}`")))?,
            at: row.time("at")?,
            text: row.text("text")?,
            encoding: if flags & LOG_BASE64 != 0 {
                pond_core::store::LineEncoding::Base64
            } else {
                pond_core::store::LineEncoding::Utf8
            },
            continued: flags & LOG_CONTINUED != 0,
            line_seq: row.opt_int("line_seq")?.map(|n| n as u64),
        },
    })
}

pub(crate) fn event_from_row(row: &impl Columns) -> Result<pond_core::events::Event, StoreError> {
    Ok(pond_core::events::Event {
        seq: row.int("seq")?,
        event: pond_core::events::NewEvent {
            kind: row.text("type")?,
            project_id: row.text("project_id")?,
            run_id: row.parsed::<RunId>("run_id")?,
            stage: row.opt_text("stage")?,
            attempt: row.opt_int("attempt")?.map(|n| n as u32),
            state: row.text("state")?,
            previous_state: row.opt_text("previous_state")?,
            at: row.time("at")?,
        },
    })
}

/// A distinct set of requirements among the queued stages of one executor kind, as a claim
/// found it: what identifies it in the index, its `pool_tags` and `pool_caps` columns, and when
/// its first stage is due.
pub(crate) struct QueuedRoute<K> {
    pub key: K,
    pub tags: Option<String>,
    pub caps: Option<String>,
    pub due: i64,
}

/// The routes a claim of up to `limit` stages for `offer` at `now` walks: those the worker is
/// admitted to (`routing::admits_some_project`; the claim statement applies the whole rule to
/// each row) with a stage due, earliest first, at most `limit` of them — the `limit` stages due
/// first all lie in the `limit` routes whose first stage is due first.
pub(crate) fn routes_to_walk<K>(
    routes: Vec<QueuedRoute<K>>,
    offer: &pond_core::routing::WorkerOffer,
    now: i64,
    limit: usize,
) -> Vec<QueuedRoute<K>> {
    let mut admitted: Vec<QueuedRoute<K>> = routes
        .into_iter()
        .filter(|r| r.due <= now)
        .filter(|r| {
            let (Some(tags), Some(caps)) = (&r.tags, &r.caps) else { return false };
            let (Ok(tags), Ok(capabilities)) = (serde_json::from_str(tags), serde_json::from_str(caps)) else {
                return false;
            };
            pond_core::routing::admits_some_project(&pond_core::routing::Requirements { tags, capabilities }, offer)
        })
        .collect();
    admitted.sort_by_key(|r| r.due);
    admitted.truncate(limit);
    admitted
}
