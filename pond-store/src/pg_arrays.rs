//! Rows as column arrays for PostgreSQL's `UNNEST`: a batch of any size is written by one
//! statement, and several tables' batches can share one (data-modifying `WITH` clauses), so a
//! batch costs the same round trips whether it holds one run or a hundred.

use pond_core::events::NewEvent;
use pond_core::ids::RunId;
use pond_core::run::{AttemptOutcome, Run, Stage};
use pond_core::store::NewLogLine;
use pond_core::StoreError;
use sqlx::postgres::PgArguments;
use sqlx::Postgres;

use crate::batch::Rows;
use crate::rows::{attestation_column, corrupt, encryption_column, requirement_columns, ts};

pub(crate) type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// `$first::T1[], $(first+1)::T2[], …`: the parameters of an `UNNEST` over columns of `types`.
pub(crate) fn unnest_params(first: usize, types: &[&str]) -> String {
    types.iter().enumerate().map(|(i, t)| format!("${}::{t}[]", first + i)).collect::<Vec<_>>().join(", ")
}

/// New runs' columns, in [`RunArrays::COLUMNS`] order.
pub(crate) struct RunArrays<'a> {
    ids: Vec<String>,
    projects: Vec<&'a str>,
    states: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
    definitions: Vec<String>,
    sources: Vec<String>,
    cancels: Vec<bool>,
    errors: Vec<Option<&'a str>>,
    created: Vec<i64>,
    started: Vec<Option<i64>>,
    finished: Vec<Option<i64>>,
    encryptions: Vec<Option<String>>,
    digests: Vec<Option<&'a str>>,
}

impl<'a> RunArrays<'a> {
    pub const COLUMNS: &'static str = "id, project_id, state, idempotency_key, definition, sources, cancel_requested, \
                                       error, created_at, started_at, finished_at, encryption, request_digest";
    pub const TYPES: [&'static str; 13] = [
        "TEXT", "TEXT", "TEXT", "TEXT", "TEXT", "TEXT", "BOOLEAN", "TEXT", "BIGINT", "BIGINT", "BIGINT", "TEXT", "TEXT",
    ];

    pub fn of(runs: &[&'a Run]) -> Result<Self, StoreError> {
        let mut a = RunArrays {
            ids: Vec::with_capacity(runs.len()),
            projects: Vec::with_capacity(runs.len()),
            states: Vec::with_capacity(runs.len()),
            keys: Vec::with_capacity(runs.len()),
            definitions: Vec::with_capacity(runs.len()),
            sources: Vec::with_capacity(runs.len()),
            cancels: Vec::with_capacity(runs.len()),
            errors: Vec::with_capacity(runs.len()),
            created: Vec::with_capacity(runs.len()),
            started: Vec::with_capacity(runs.len()),
            finished: Vec::with_capacity(runs.len()),
            encryptions: Vec::with_capacity(runs.len()),
            digests: Vec::with_capacity(runs.len()),
        };
        for run in runs {
            a.ids.push(run.id.to_string());
            a.projects.push(run.project_id.as_str());
            a.states.push(run.state.as_str());
            a.keys.push(run.idempotency_key.as_deref());
            a.definitions.push(serde_json::to_string(&run.definition).map_err(corrupt)?);
            a.sources.push(serde_json::to_string(&run.sources).map_err(corrupt)?);
            a.cancels.push(run.cancel_requested);
            a.errors.push(run.error.as_deref());
            a.created.push(run.created_at.as_millis());
            a.started.push(ts(run.started_at));
            a.finished.push(ts(run.finished_at));
            a.encryptions.push(encryption_column(run));
            a.digests.push(run.request_digest.as_deref());
        }
        Ok(a)
    }

    pub fn bind<'q>(&'q self, q: PgQuery<'q>) -> PgQuery<'q> {
        q.bind(&self.ids)
            .bind(&self.projects)
            .bind(&self.states)
            .bind(&self.keys)
            .bind(&self.definitions)
            .bind(&self.sources)
            .bind(&self.cancels)
            .bind(&self.errors)
            .bind(&self.created)
            .bind(&self.started)
            .bind(&self.finished)
            .bind(&self.encryptions)
            .bind(&self.digests)
    }
}

/// Stages' columns, in [`StageArrays::COLUMNS`] order.
pub(crate) struct StageArrays<'a> {
    run_ids: Vec<String>,
    keys: Vec<&'a str>,
    positions: Vec<i64>,
    kinds: Vec<&'a str>,
    states: Vec<&'a str>,
    ready: Vec<Option<i64>>,
    attempts: Vec<i64>,
    failures: Vec<i64>,
    lost_leases: Vec<i64>,
    owners: Vec<Option<&'a str>>,
    expiries: Vec<Option<i64>>,
    cancels: Vec<bool>,
    started: Vec<Option<i64>>,
    finished: Vec<Option<i64>>,
    errors: Vec<Option<&'a str>>,
    exit_codes: Vec<Option<i64>>,
    tags: Vec<Option<String>>,
    caps: Vec<Option<String>>,
}

impl<'a> StageArrays<'a> {
    pub const COLUMNS: &'static str = "run_id, key, position, executor_kind, state, ready_at, attempt, failures, \
                                       lost_leases, lease_owner, lease_expires_at, cancel_requested, started_at, \
                                       finished_at, error, exit_code, pool_tags, pool_caps";
    pub const TYPES: [&'static str; 18] = [
        "TEXT", "TEXT", "BIGINT", "TEXT", "TEXT", "BIGINT", "BIGINT", "BIGINT", "BIGINT", "TEXT", "BIGINT", "BOOLEAN",
        "BIGINT", "BIGINT", "TEXT", "BIGINT", "TEXT", "TEXT",
    ];

    pub fn of(stages: &[(RunId, &'a Stage)]) -> Self {
        let n = stages.len();
        let mut a = StageArrays {
            run_ids: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            positions: Vec::with_capacity(n),
            kinds: Vec::with_capacity(n),
            states: Vec::with_capacity(n),
            ready: Vec::with_capacity(n),
            attempts: Vec::with_capacity(n),
            failures: Vec::with_capacity(n),
            lost_leases: Vec::with_capacity(n),
            owners: Vec::with_capacity(n),
            expiries: Vec::with_capacity(n),
            cancels: Vec::with_capacity(n),
            started: Vec::with_capacity(n),
            finished: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
            exit_codes: Vec::with_capacity(n),
            tags: Vec::with_capacity(n),
            caps: Vec::with_capacity(n),
        };
        for (run, s) in stages {
            let (tags, caps) = requirement_columns(s);
            a.run_ids.push(run.to_string());
            a.keys.push(&s.key);
            a.positions.push(s.position as i64);
            a.kinds.push(&s.executor_kind);
            a.states.push(s.state.as_str());
            a.ready.push(ts(s.ready_at));
            a.attempts.push(s.attempt as i64);
            a.failures.push(s.failures as i64);
            a.lost_leases.push(s.lost_leases as i64);
            a.owners.push(s.lease_owner.as_deref());
            a.expiries.push(ts(s.lease_expires_at));
            a.cancels.push(s.cancel_requested);
            a.started.push(ts(s.started_at));
            a.finished.push(ts(s.finished_at));
            a.errors.push(s.error.as_deref());
            a.exit_codes.push(s.exit_code.map(|c| c as i64));
            a.tags.push(tags);
            a.caps.push(caps);
        }
        a
    }

    pub fn bind<'q>(&'q self, q: PgQuery<'q>) -> PgQuery<'q> {
        q.bind(&self.run_ids)
            .bind(&self.keys)
            .bind(&self.positions)
            .bind(&self.kinds)
            .bind(&self.states)
            .bind(&self.ready)
            .bind(&self.attempts)
            .bind(&self.failures)
            .bind(&self.lost_leases)
            .bind(&self.owners)
            .bind(&self.expiries)
            .bind(&self.cancels)
            .bind(&self.started)
            .bind(&self.finished)
            .bind(&self.errors)
            .bind(&self.exit_codes)
            .bind(&self.tags)
            .bind(&self.caps)
    }
}

/// Events' columns, in [`EventArrays::COLUMNS`] order.
pub(crate) struct EventArrays<'a> {
    kinds: Vec<&'a str>,
    projects: Vec<&'a str>,
    runs: Vec<String>,
    stages: Vec<Option<&'a str>>,
    attempts: Vec<Option<i64>>,
    states: Vec<&'a str>,
    previous: Vec<Option<&'a str>>,
    ats: Vec<i64>,
}

impl<'a> EventArrays<'a> {
    pub const COLUMNS: &'static str = "type, project_id, run_id, stage, attempt, state, previous_state, at";
    pub const TYPES: [&'static str; 8] = ["TEXT", "TEXT", "TEXT", "TEXT", "BIGINT", "TEXT", "TEXT", "BIGINT"];

    pub fn of(events: &'a [NewEvent]) -> Self {
        EventArrays {
            kinds: events.iter().map(|e| e.kind.as_str()).collect(),
            projects: events.iter().map(|e| e.project_id.as_str()).collect(),
            runs: events.iter().map(|e| e.run_id.to_string()).collect(),
            stages: events.iter().map(|e| e.stage.as_deref()).collect(),
            attempts: events.iter().map(|e| e.attempt.map(|n| n as i64)).collect(),
            states: events.iter().map(|e| e.state.as_str()).collect(),
            previous: events.iter().map(|e| e.previous_state.as_deref()).collect(),
            ats: events.iter().map(|e| e.at.as_millis()).collect(),
        }
    }

    pub fn bind<'q>(&'q self, q: PgQuery<'q>) -> PgQuery<'q> {
        q.bind(&self.kinds)
            .bind(&self.projects)
            .bind(&self.runs)
            .bind(&self.stages)
            .bind(&self.attempts)
            .bind(&self.states)
            .bind(&self.previous)
            .bind(&self.ats)
    }
}

/// Inserts new runs with their stages and events in one statement (so one implicit
/// transaction): a run whose idempotency key is already taken in its project (or earlier in
/// the same batch) is skipped with its stages and events. Returns the ids inserted.
pub(crate) fn insert_runs_statement() -> String {
    let runs = unnest_params(1, &RunArrays::TYPES);
    let stages = unnest_params(1 + RunArrays::TYPES.len(), &StageArrays::TYPES);
    let events = unnest_params(1 + RunArrays::TYPES.len() + StageArrays::TYPES.len(), &EventArrays::TYPES);
    let (run_cols, stage_cols, event_cols) = (RunArrays::COLUMNS, StageArrays::COLUMNS, EventArrays::COLUMNS);
    // A stage's and an event's run are their third and first columns; WITH ORDINALITY keeps
    // the events' order in their ids. The stages' foreign key is checked at the end of the
    // statement, when the runs inserted above are there.
    format!(
        "WITH inserted AS (
           INSERT INTO runs ({run_cols}) SELECT * FROM UNNEST({runs})
           ON CONFLICT (project_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
           RETURNING id),
         new_stages AS (
           INSERT INTO stages ({stage_cols})
           SELECT * FROM UNNEST({stages}) AS s({stage_cols}) WHERE s.run_id IN (SELECT id FROM inserted)),
         new_events AS (
           INSERT INTO events ({event_cols})
           SELECT {event_cols} FROM UNNEST({events}) WITH ORDINALITY AS e({event_cols}, n)
            WHERE e.run_id IN (SELECT id FROM inserted) ORDER BY n)
         SELECT id FROM inserted"
    )
}

/// Changed runs' columns (what a run's update may change), in [`RunUpdateArrays::COLUMNS`] order.
struct RunUpdateArrays<'a> {
    ids: Vec<String>,
    states: Vec<&'a str>,
    sources: Vec<String>,
    cancels: Vec<bool>,
    errors: Vec<Option<&'a str>>,
    started: Vec<Option<i64>>,
    finished: Vec<Option<i64>>,
}

impl<'a> RunUpdateArrays<'a> {
    const COLUMNS: &'static str = "id, state, sources, cancel_requested, error, started_at, finished_at";
    const TYPES: [&'static str; 7] = ["TEXT", "TEXT", "TEXT", "BOOLEAN", "TEXT", "BIGINT", "BIGINT"];

    fn of(runs: &[&'a Run]) -> Result<Self, StoreError> {
        let mut a = RunUpdateArrays {
            ids: Vec::with_capacity(runs.len()),
            states: Vec::with_capacity(runs.len()),
            sources: Vec::with_capacity(runs.len()),
            cancels: Vec::with_capacity(runs.len()),
            errors: Vec::with_capacity(runs.len()),
            started: Vec::with_capacity(runs.len()),
            finished: Vec::with_capacity(runs.len()),
        };
        for run in runs {
            a.ids.push(run.id.to_string());
            a.states.push(run.state.as_str());
            a.sources.push(serde_json::to_string(&run.sources).map_err(corrupt)?);
            a.cancels.push(run.cancel_requested);
            a.errors.push(run.error.as_deref());
            a.started.push(ts(run.started_at));
            a.finished.push(ts(run.finished_at));
        }
        Ok(a)
    }

    fn bind<'q>(&'q self, q: PgQuery<'q>) -> PgQuery<'q> {
        q.bind(&self.ids)
            .bind(&self.states)
            .bind(&self.sources)
            .bind(&self.cancels)
            .bind(&self.errors)
            .bind(&self.started)
            .bind(&self.finished)
    }
}

/// Attempts' columns, in [`AttemptArrays::COLUMNS`] order.
struct AttemptArrays<'a> {
    runs: Vec<String>,
    keys: Vec<&'a str>,
    numbers: Vec<i64>,
    owners: Vec<&'a str>,
    started: Vec<i64>,
    finished: Vec<Option<i64>>,
    outcomes: Vec<Option<&'static str>>,
    errors: Vec<Option<&'a str>>,
    attestations: Vec<Option<String>>,
}

impl<'a> AttemptArrays<'a> {
    const COLUMNS: &'static str =
        "run_id, stage_key, number, owner, started_at, finished_at, outcome, error, attestation";
    const TYPES: [&'static str; 9] = ["TEXT", "TEXT", "BIGINT", "TEXT", "BIGINT", "BIGINT", "TEXT", "TEXT", "TEXT"];

    fn of(attempts: &[(RunId, &'a pond_core::run::Attempt)]) -> Self {
        AttemptArrays {
            runs: attempts.iter().map(|(run, _)| run.to_string()).collect(),
            keys: attempts.iter().map(|(_, a)| a.stage_key.as_str()).collect(),
            numbers: attempts.iter().map(|(_, a)| a.number as i64).collect(),
            owners: attempts.iter().map(|(_, a)| a.owner.as_str()).collect(),
            started: attempts.iter().map(|(_, a)| a.started_at.as_millis()).collect(),
            finished: attempts.iter().map(|(_, a)| ts(a.finished_at)).collect(),
            outcomes: attempts.iter().map(|(_, a)| a.outcome.map(AttemptOutcome::as_str)).collect(),
            errors: attempts.iter().map(|(_, a)| a.error.as_deref()).collect(),
            attestations: attempts.iter().map(|(_, a)| attestation_column(a)).collect(),
        }
    }

    fn bind<'q>(&'q self, q: PgQuery<'q>) -> PgQuery<'q> {
        q.bind(&self.runs)
            .bind(&self.keys)
            .bind(&self.numbers)
            .bind(&self.owners)
            .bind(&self.started)
            .bind(&self.finished)
            .bind(&self.outcomes)
            .bind(&self.errors)
            .bind(&self.attestations)
    }
}

/// Log lines' columns, grouped by run (in run id order) with how far before the run's new
/// last position each goes, in [`LogLineArrays::COLUMNS`] order.
struct LogLineArrays<'a> {
    runs: Vec<String>,
    backs: Vec<i64>,
    stages: Vec<Option<&'a str>>,
    attempts: Vec<i64>,
    streams: Vec<&'a str>,
    ats: Vec<i64>,
    texts: Vec<&'a str>,
    flags: Vec<i64>,
    line_seqs: Vec<Option<i64>>,
}

impl<'a> LogLineArrays<'a> {
    const COLUMNS: &'static str = "run_id, back, stage, attempt, stream, at, text, flags, line_seq";
    const TYPES: [&'static str; 9] = ["TEXT", "BIGINT", "TEXT", "BIGINT", "TEXT", "BIGINT", "TEXT", "BIGINT", "BIGINT"];

    fn of(lines: &[(RunId, &'a NewLogLine)]) -> Self {
        let mut by_run: std::collections::BTreeMap<String, Vec<&NewLogLine>> = Default::default();
        for (run, line) in lines {
            by_run.entry(run.to_string()).or_default().push(line);
        }
        let n = lines.len();
        let mut a = LogLineArrays {
            runs: Vec::with_capacity(n),
            backs: Vec::with_capacity(n),
            stages: Vec::with_capacity(n),
            attempts: Vec::with_capacity(n),
            streams: Vec::with_capacity(n),
            ats: Vec::with_capacity(n),
            texts: Vec::with_capacity(n),
            flags: Vec::with_capacity(n),
            line_seqs: Vec::with_capacity(n),
        };
        for (run, run_lines) in by_run {
            for (i, l) in run_lines.iter().enumerate() {
                a.runs.push(run.clone());
                // How far before the run's new last position the line goes (0: the last).
                a.backs.push((run_lines.len() - 1 - i) as i64);
                a.stages.push(l.stage.as_deref());
                a.attempts.push(l.attempt as i64);
                a.streams.push(l.stream.as_str());
                a.ats.push(l.at.as_millis());
                a.texts.push(l.text.as_str());
                a.flags.push(crate::rows::log_flags(l));
                a.line_seqs.push(l.line_seq.map(|n| n as i64));
            }
        }
        a
    }

    fn bind<'q>(&'q self, q: PgQuery<'q>) -> PgQuery<'q> {
        q.bind(&self.runs)
            .bind(&self.backs)
            .bind(&self.stages)
            .bind(&self.attempts)
            .bind(&self.streams)
            .bind(&self.ats)
            .bind(&self.texts)
            .bind(&self.flags)
            .bind(&self.line_seqs)
    }
}

/// What one write of the engine's changes puts in the database — runs updated, stages and
/// attempts upserted, log lines and events appended — written by one statement however many
/// runs and tables it touches (each table's rows a data-modifying `WITH` clause over arrays).
/// Inside a transaction the rows' locks are already held (loaded `FOR UPDATE`); alone, the
/// statement is its own transaction.
pub(crate) struct Changes<'a> {
    runs: Option<RunUpdateArrays<'a>>,
    stages: Option<StageArrays<'a>>,
    attempts: Option<AttemptArrays<'a>>,
    lines: Option<LogLineArrays<'a>>,
    events: Option<EventArrays<'a>>,
}

impl<'a> Changes<'a> {
    pub fn of(rows: &Rows<'a>, lines: &[(RunId, &'a NewLogLine)], events: &'a [NewEvent]) -> Result<Self, StoreError> {
        Ok(Changes {
            runs: (!rows.updated_runs.is_empty()).then(|| RunUpdateArrays::of(&rows.updated_runs)).transpose()?,
            stages: (!rows.stages.is_empty()).then(|| StageArrays::of(&rows.stages)),
            attempts: (!rows.attempts.is_empty()).then(|| AttemptArrays::of(&rows.attempts)),
            lines: (!lines.is_empty()).then(|| LogLineArrays::of(lines)),
            events: (!events.is_empty()).then(|| EventArrays::of(events)),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_none()
            && self.stages.is_none()
            && self.attempts.is_none()
            && self.lines.is_none()
            && self.events.is_none()
    }

    /// The statement (its parameters in the order [`Changes::bind`] binds them).
    pub fn sql(&self) -> String {
        let mut clauses = Vec::new();
        let mut next = 1;
        let mut params = |types: &[&str]| {
            let p = unnest_params(next, types);
            next += types.len();
            p
        };
        if self.runs.is_some() {
            let (cols, u) = (RunUpdateArrays::COLUMNS, params(&RunUpdateArrays::TYPES));
            clauses.push(format!(
                "updated_runs AS (
                   UPDATE runs r SET state = u.state, sources = u.sources, cancel_requested = u.cancel_requested,
                                     error = u.error, started_at = u.started_at, finished_at = u.finished_at
                     FROM UNNEST({u}) AS u({cols}) WHERE r.id = u.id)"
            ));
        }
        if self.stages.is_some() {
            let (cols, u) = (StageArrays::COLUMNS, params(&StageArrays::TYPES));
            clauses.push(format!(
                "upserted_stages AS (
                   INSERT INTO stages ({cols}) SELECT * FROM UNNEST({u})
                   ON CONFLICT (run_id, key) DO UPDATE SET
                      state = EXCLUDED.state, ready_at = EXCLUDED.ready_at, attempt = EXCLUDED.attempt,
                      failures = EXCLUDED.failures, lost_leases = EXCLUDED.lost_leases,
                      lease_owner = EXCLUDED.lease_owner, lease_expires_at = EXCLUDED.lease_expires_at,
                      cancel_requested = EXCLUDED.cancel_requested, started_at = EXCLUDED.started_at,
                      finished_at = EXCLUDED.finished_at, error = EXCLUDED.error, exit_code = EXCLUDED.exit_code)"
            ));
        }
        if self.attempts.is_some() {
            let (cols, u) = (AttemptArrays::COLUMNS, params(&AttemptArrays::TYPES));
            clauses.push(format!(
                "upserted_attempts AS (
                   INSERT INTO attempts ({cols}) SELECT * FROM UNNEST({u})
                   ON CONFLICT (run_id, stage_key, number) DO UPDATE SET
                      finished_at = EXCLUDED.finished_at, outcome = EXCLUDED.outcome, error = EXCLUDED.error,
                      attestation = EXCLUDED.attestation)"
            ));
        }
        if self.lines.is_some() {
            // Each run's counter moves on by its lines (the counter rows taken in run id order,
            // locked until commit, so a follower never skips a line committed late), and the
            // lines take the positions just below the new values. A line whose producer number
            // is already stored (a retried batch) is skipped; its position stays unused
            // (positions only need to grow).
            let (cols, u) = (LogLineArrays::COLUMNS, params(&LogLineArrays::TYPES));
            clauses.push(format!("new_lines AS (SELECT * FROM UNNEST({u}) AS t({cols}))"));
            clauses.push(
                "counted AS (
                   INSERT INTO log_counters (run_id, seq)
                   SELECT run_id, count(*) FROM new_lines GROUP BY run_id ORDER BY run_id
                   ON CONFLICT (run_id) DO UPDATE SET seq = log_counters.seq + EXCLUDED.seq
                   RETURNING run_id, seq)"
                    .into(),
            );
            clauses.push(
                "logged AS (
                   INSERT INTO logs (run_id, seq, stage, attempt, stream, at, text, flags, line_seq)
                   SELECT l.run_id, c.seq - l.back, l.stage, l.attempt, l.stream, l.at, l.text, l.flags, l.line_seq
                     FROM new_lines l JOIN counted c ON c.run_id = l.run_id
                   ON CONFLICT DO NOTHING)"
                    .into(),
            );
        }
        if self.events.is_some() {
            // WITH ORDINALITY keeps the events' order in their ids. They get no position here:
            // positions are given after commit (`PgStore::sequence_events`), so writers do not
            // queue on a shared counter.
            let (cols, u) = (EventArrays::COLUMNS, params(&EventArrays::TYPES));
            clauses.push(format!(
                "new_events AS (
                   INSERT INTO events ({cols}) SELECT {cols} FROM UNNEST({u}) WITH ORDINALITY AS e({cols}, n) ORDER BY n)"
            ));
        }
        format!("WITH {} SELECT 1", clauses.join(",\n"))
    }

    pub fn bind<'q>(&'q self, mut q: PgQuery<'q>) -> PgQuery<'q> {
        if let Some(a) = &self.runs {
            q = a.bind(q);
        }
        if let Some(a) = &self.stages {
            q = a.bind(q);
        }
        if let Some(a) = &self.attempts {
            q = a.bind(q);
        }
        if let Some(a) = &self.lines {
            q = a.bind(q);
        }
        if let Some(a) = &self.events {
            q = a.bind(q);
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unnest_parameters_are_numbered_from_where_they_start() {
        assert_eq!(unnest_params(3, &["TEXT", "BIGINT"]), "$3::TEXT[], $4::BIGINT[]");
        let sql = insert_runs_statement();
        let last = RunArrays::TYPES.len() + StageArrays::TYPES.len() + EventArrays::TYPES.len();
        assert!(sql.contains(&format!("${last}::BIGINT[]")), "{sql}");
        assert!(!sql.contains(&format!("${}::", last + 1)), "{sql}");
    }
}
