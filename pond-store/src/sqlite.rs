//! `SqliteStore`: the embedded default. One file in WAL mode; all writes go through a pool of
//! one connection with `BEGIN IMMEDIATE`, so writers queue in-process instead of failing with
//! `SQLITE_BUSY`, while reads use their own connections and never wait for writers.
//!
//! Durability: `synchronous = NORMAL` in WAL mode survives a killed process (every committed
//! transaction is in the WAL); a power cut may lose the last transactions before a checkpoint.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use pond_core::ids::{BlobId, RunId, TokenId};
use pond_core::run::{AttemptOutcome, Run, RunSnapshot, Stage, MAX_LOST_LEASES};
use pond_core::store::{
    Artifact, BlobMeta, Claim, ClaimLine, ClaimQuery, InsertOutcome, LeaseStatus, LogLine, NewLogLine, RunMutation,
    RunQuery, Store, TokenRecord, BLOB_CHUNK_BYTES,
};
use pond_core::time::Timestamp;
use pond_core::StoreError;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::batch::{group_commit, queue_write, Queued, Rows};
use crate::rows::{
    artifact_from_row, attempt_from_row, attestation_column, blob_from_row, corrupt, db_err, encryption_column,
    log_from_row, requirement_columns, role_text, run_from_row, stage_from_row, token_from_row, ts,
};
use crate::sha256_hex;

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite store.
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    inserts: tokio::sync::mpsc::Sender<Queued<RunSnapshot, InsertOutcome>>,
}

/// Most submits committed together.
const INSERT_BATCH: usize = 128;

/// Rows a multi-row statement carries: SQLite allows 32,766 parameters, and a stage row has 18.
const ROWS_PER_STATEMENT: usize = 500;

/// Inserts runs in one transaction, or finds the run each one's idempotency key names (also one
/// inserted earlier in the same batch). Rows go in a few multi-row statements, not a few each.
async fn insert_batch(writer: &SqlitePool, snapshots: &[&RunSnapshot]) -> Result<Vec<InsertOutcome>, StoreError> {
    let mut tx = begin_immediate(writer).await?;
    let mut outcomes: Vec<Option<InsertOutcome>> = Vec::with_capacity(snapshots.len());
    let mut fresh: Vec<&RunSnapshot> = Vec::with_capacity(snapshots.len());
    let mut keys: std::collections::HashMap<(&str, &str), usize> = Default::default();
    for snapshot in snapshots {
        let run = &snapshot.run;
        let Some(key) = &run.idempotency_key else {
            fresh.push(snapshot);
            outcomes.push(Some(InsertOutcome::Created));
            continue;
        };
        if let Some(&first) = keys.get(&(run.project_id.as_str(), key.as_str())) {
            outcomes.push(Some(InsertOutcome::Existing(Box::new(snapshots[first].clone()))));
            continue;
        }
        let existing: Option<String> =
            sqlx::query_scalar("SELECT id FROM runs WHERE project_id = ? AND idempotency_key = ?")
                .bind(&run.project_id)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        match existing {
            Some(existing) => {
                let id = RunId::from_str(&existing).map_err(corrupt)?;
                let found = load_snapshots(&mut tx, &[id]).await?.pop();
                let found = found.ok_or_else(|| corrupt("idempotent run vanished"))?;
                outcomes.push(Some(InsertOutcome::Existing(Box::new(found))));
            }
            None => {
                keys.insert((run.project_id.as_str(), key.as_str()), outcomes.len());
                fresh.push(snapshot);
                outcomes.push(Some(InsertOutcome::Created));
            }
        }
    }
    write_rows(&mut tx, &Rows::of(fresh.iter().map(|s| (None, *s)))).await?;
    let at = crate::wall_clock();
    let events: Vec<_> = fresh.iter().flat_map(|s| pond_core::events::changes(None, s, at)).collect();
    write_events(&mut tx, &events).await?;
    tx.commit().await.map_err(db_err)?;
    Ok(outcomes.into_iter().flatten().collect())
}

/// A write transaction on the writer connection (never one left inside a transaction: see
/// [`discard_if_in_transaction`]).
async fn begin_immediate(writer: &SqlitePool) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
    writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_err)
}

/// The pools' check before handing out a connection: one still inside a transaction is closed
/// instead (SQLite rolls back what it held). A caller dropped while sqlx's answer to its `BEGIN`
/// was in flight leaves exactly that: a transaction no `Transaction` value owns, so nothing
/// rolls it back — later autocommit writes on that connection would join it and never commit,
/// and every `BEGIN IMMEDIATE` would fail (seen in the stress test after lease renewals, which
/// are given up after a while, timed out under load). Checked after the release ping has
/// flushed the rollbacks that dropped transactions queue. (sqlx runs it on every `acquire`,
/// `begin` and query on a pool; its `try_acquire`/`try_begin` skip it — do not use them.)
fn discard_if_in_transaction(
    conn: &mut sqlx::SqliteConnection,
    _meta: sqlx::pool::PoolConnectionMetadata,
) -> futures_util::future::BoxFuture<'_, Result<bool, sqlx::Error>> {
    let open = sqlx::Connection::is_in_transaction(conn);
    if open {
        tracing::warn!("closing a SQLite connection left inside a transaction nobody holds");
    }
    Box::pin(async move { Ok(!open) })
}

/// The index expression that tells queued stages' requirements apart (`stages_ready_by_route`,
/// migration 0010): `<pool_tags>|<pool_caps>`, `|` for a stage with none (a local one). Neither
/// JSON list can hold a `|` (see `valid_tag`, `valid_capability_pattern`).
const ROUTE_KEY: &str = "(COALESCE(pool_tags, '') || '|' || COALESCE(pool_caps, ''))";

impl SqliteStore {
    /// Claims in one transaction; with `line`, the claimed stages' progress lines go in it too.
    async fn claim(&self, query: &ClaimQuery, line: Option<ClaimLine<'_>>) -> Result<Vec<Claim>, StoreError> {
        if query.kinds.is_empty() || query.limit == 0 {
            return Ok(Vec::new());
        }
        if query.offer.is_none() {
            // The local driver is woken by every change of any run, pooled ones included, and
            // most wake-ups find nothing of its own: a reader says so without taking the one
            // writer (and its lock) from the submits and results queued behind it.
            let kinds = (0..query.kinds.len()).map(|i| format!("?{}", i + 2)).collect::<Vec<_>>().join(", ");
            let sql = format!(
                "SELECT EXISTS (SELECT 1 FROM stages INDEXED BY stages_ready_by_route
                                 WHERE state = 'queued' AND ready_at IS NOT NULL AND ready_at <= ?1
                                   AND executor_kind IN ({kinds}) AND {ROUTE_KEY} = '|')
                     OR EXISTS (SELECT 1 FROM stages INDEXED BY stages_leased
                                 WHERE state = 'running' AND lease_expires_at <= ?1 AND cancel_requested = 0
                                   AND executor_kind IN ({kinds}))"
            );
            let mut check = sqlx::query_scalar::<_, bool>(&sql).bind(query.now.as_millis());
            for kind in &query.kinds {
                check = check.bind(kind);
            }
            if !check.fetch_one(&self.reader).await.map_err(db_err)? {
                return Ok(Vec::new());
            }
        }
        // A pool worker's claim takes only stages whose required tags are all among the worker's
        // and whose every capability pattern GLOB-matches one of its capabilities.
        // A bring-your-own host takes only byo work of the project it is pinned to: the stage
        // must require `pool:byo`, and `tenant:<the run's project>` must be one of the host's
        // tags (see `routing::admits`).
        let byo_only = query.offer.as_ref().is_some_and(|o| o.tags.contains(pond_core::routing::BYO_TAG));
        let offer = match &query.offer {
            Some(_) if byo_only => {
                "AND pool_tags IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM json_each(pool_tags) t WHERE t.value NOT IN (SELECT value FROM json_each(?5)))
                 AND NOT EXISTS (SELECT 1 FROM json_each(pool_caps) p
                                  WHERE NOT EXISTS (SELECT 1 FROM json_each(?6) c WHERE c.value GLOB p.value))
                 AND EXISTS (SELECT 1 FROM json_each(pool_tags) b WHERE b.value = 'pool:byo')
                 AND EXISTS (SELECT 1 FROM runs r WHERE r.id = stages.run_id
                              AND ('tenant:' || r.project_id) IN (SELECT value FROM json_each(?5)))"
            }
            Some(_) => {
                "AND pool_tags IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM json_each(pool_tags) t WHERE t.value NOT IN (SELECT value FROM json_each(?5)))
                 AND NOT EXISTS (SELECT 1 FROM json_each(pool_caps) p
                                  WHERE NOT EXISTS (SELECT 1 FROM json_each(?6) c WHERE c.value GLOB p.value))"
            }
            None => "",
        };
        // A worker runs one job at a time: none for a worker that holds a live lease. (The one
        // writer connection serializes claims, so the check and the claim cannot interleave.)
        let idle = if query.offer.is_some() {
            "AND NOT EXISTS (SELECT 1 FROM stages busy
                              WHERE busy.state = 'running' AND busy.lease_owner = ?1 AND busy.lease_expires_at > ?3)"
        } else {
            ""
        };
        let offer_json = query.offer.as_ref().map(|o| {
            (
                serde_json::to_string(&o.tags).unwrap_or_else(|_| "[]".into()),
                serde_json::to_string(&o.capabilities).unwrap_or_else(|_| "[]".into()),
            )
        });
        let now = query.now.as_millis();
        let mut tx = self.begin().await?;
        // One statement claims the whole batch. Expressions in SET see each row as it was, so
        // `state = 'running'` tells the re-claim of an expired lease from a first claim.
        // Numbered parameters: ?1 owner, ?2 lease end, ?3 now, ?4 limit, ?5 the worker's tags,
        // ?6 its capabilities, ?7… the executor kinds, then the routes a worker's claim walks.
        //
        // Each arm takes its first `limit` rows in due order from an index and stops, and only
        // those are sorted: one arm per route — an executor kind and the requirements a worker
        // must meet (`stages_ready_by_route`). A local driver's routes are its kinds with no
        // requirements; a worker's are the requirement sets queued for its kind that it is
        // admitted to, found first (see `routes_to_walk`), so a backlog it cannot take (another
        // pool's, another tenant's) is never read. One arm per route because `IN (…)` over the
        // index yields rows out of due order, and SQLite would then sort every queued stage of
        // those routes. The index is named: left to choose, SQLite walked the former
        // `stages_ready` (every kind in due order, dropped in migration 0010) and filtered,
        // which for a kind with nothing queued reads the whole queue (82 ms per claim with
        // 100,000 queued, seen with the bundled SQLite after ANALYZE; `pond bench
        // --claim-latency`).
        let kinds = (0..query.kinds.len()).map(|i| format!("?{}", i + 7)).collect::<Vec<_>>().join(", ");
        let mut arms: Vec<String> = Vec::new();
        let mut route_params: Vec<String> = Vec::new();
        match &query.offer {
            None => arms.extend((0..query.kinds.len()).map(|i| {
                format!(
                    "SELECT * FROM (SELECT run_id, key, ready_at AS due FROM stages INDEXED BY stages_ready_by_route
                      WHERE state = 'queued' AND ready_at IS NOT NULL AND ready_at <= ?3 AND executor_kind = ?{}
                        AND {ROUTE_KEY} = '|'
                      ORDER BY ready_at LIMIT ?4)",
                    i + 7
                )
            })),
            Some(worker) => {
                for (i, kind) in query.kinds.iter().enumerate() {
                    let found: Vec<(String, Option<i64>)> = sqlx::query_as(&format!(
                        "WITH RECURSIVE routes(route) AS (
                           SELECT (SELECT {ROUTE_KEY} AS rk FROM stages INDEXED BY stages_ready_by_route
                                    WHERE state = 'queued' AND ready_at IS NOT NULL AND executor_kind = ?1
                                    ORDER BY rk LIMIT 1)
                           UNION ALL
                           SELECT (SELECT {ROUTE_KEY} AS rk FROM stages INDEXED BY stages_ready_by_route
                                    WHERE state = 'queued' AND ready_at IS NOT NULL AND executor_kind = ?1
                                      AND {ROUTE_KEY} > r.route
                                    ORDER BY rk LIMIT 1)
                             FROM routes r WHERE r.route IS NOT NULL)
                         SELECT route, (SELECT ready_at FROM stages INDEXED BY stages_ready_by_route
                                         WHERE state = 'queued' AND ready_at IS NOT NULL AND executor_kind = ?1
                                           AND {ROUTE_KEY} = routes.route
                                         ORDER BY ready_at LIMIT 1)
                           FROM routes WHERE route IS NOT NULL"
                    ))
                    .bind(kind)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db_err)?;
                    let found = found
                        .into_iter()
                        .filter_map(|(route, due)| {
                            let (tags, caps) = route.split_once('|')?;
                            let (tags, caps) = (Some(tags.to_string()), Some(caps.to_string()));
                            Some(crate::rows::QueuedRoute { key: route, tags, caps, due: due? })
                        })
                        .collect();
                    for route in crate::rows::routes_to_walk(found, worker, now, query.limit as usize) {
                        let n = 7 + query.kinds.len() + route_params.len();
                        arms.push(format!(
                            "SELECT * FROM (SELECT run_id, key, ready_at AS due FROM stages INDEXED BY stages_ready_by_route
                              WHERE state = 'queued' AND ready_at IS NOT NULL AND ready_at <= ?3 AND executor_kind = ?{}
                                AND {ROUTE_KEY} = ?{n} {offer}
                              ORDER BY ready_at LIMIT ?4)",
                            i + 7
                        ));
                        route_params.push(route.key);
                    }
                }
            }
        }
        arms.push(format!(
            "SELECT * FROM (SELECT run_id, key, lease_expires_at AS due FROM stages INDEXED BY stages_leased
              WHERE state = 'running' AND lease_expires_at <= ?3 AND cancel_requested = 0 AND executor_kind IN ({kinds}) {offer}
              ORDER BY lease_expires_at LIMIT ?4)"
        ));
        let claim = format!(
            "UPDATE stages SET state = 'running', attempt = attempt + 1,
                    lost_leases = lost_leases + (state = 'running'),
                    lease_owner = ?1, lease_expires_at = ?2, started_at = COALESCE(started_at, ?3)
              WHERE (run_id, key) IN (
                SELECT run_id, key FROM ({}) ORDER BY due LIMIT ?4) {idle}
              RETURNING *",
            arms.join(" UNION ALL ")
        );
        let (tags, caps) = offer_json.unwrap_or_default();
        let mut q = sqlx::query(&claim)
            .bind(&query.owner)
            .bind(query.lease_until.as_millis())
            .bind(now)
            .bind(query.limit as i64)
            .bind(tags)
            .bind(caps);
        for k in &query.kinds {
            q = q.bind(k);
        }
        for p in &route_params {
            q = q.bind(p);
        }
        let rows = q.fetch_all(&mut *tx).await.map_err(db_err)?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut claimed: Vec<(String, Stage)> = Vec::with_capacity(rows.len());
        for row in &rows {
            claimed.push((row.try_get::<String, _>("run_id").map_err(db_err)?, stage_from_row(row)?));
        }
        // Which runs this claim starts (read before they are marked running below).
        let mut claimed_runs: Vec<&String> = claimed.iter().map(|(r, _)| r).collect();
        claimed_runs.sort();
        claimed_runs.dedup();
        let queued_sql =
            format!("SELECT id FROM runs WHERE state = 'queued' AND id IN ({})", placeholders(claimed_runs.len()));
        let mut queued_query = sqlx::query_scalar::<_, String>(&queued_sql);
        for id in &claimed_runs {
            queued_query = queued_query.bind(*id);
        }
        let mut queued_runs: std::collections::HashSet<String> =
            queued_query.fetch_all(&mut *tx).await.map_err(db_err)?.into_iter().collect();
        // Attempts of re-claimed stages that never reported: their holder vanished. (Only a
        // re-claim of an expired lease can leave one, so first claims skip the statement.)
        let reclaimed: Vec<&(String, Stage)> = claimed.iter().filter(|(_, s)| s.lost_leases > 0).collect();
        // Stages taken over from an expired lease (their earlier attempt was still open).
        let mut taken_over: std::collections::HashSet<(String, String)> = Default::default();
        if !reclaimed.is_empty() {
            let pairs = vec!["(?, ?)"; reclaimed.len()].join(", ");
            let lost_sql = format!(
                "UPDATE attempts SET outcome = 'lease_expired', finished_at = ?,
                        error = 'lease expired: the node running this attempt stopped renewing it'
                  WHERE outcome IS NULL AND (run_id, stage_key) IN (VALUES {pairs})
                    AND number < (SELECT s.attempt FROM stages s WHERE s.run_id = attempts.run_id AND s.key = attempts.stage_key)"
            );
            let lost_sql = format!("{lost_sql} RETURNING run_id, stage_key");
            let mut lost = sqlx::query_as::<_, (String, String)>(&lost_sql).bind(now);
            for (run, stage) in &reclaimed {
                lost = lost.bind(run).bind(&stage.key);
            }
            taken_over.extend(lost.fetch_all(&mut *tx).await.map_err(db_err)?);
        }
        let mut insert = sqlx::query_builder::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO attempts (run_id, stage_key, number, owner, started_at) ",
        );
        insert.push_values(&claimed, |mut b, (run, stage)| {
            b.push_bind(run)
                .push_bind(&stage.key)
                .push_bind(stage.attempt as i64)
                .push_bind(&query.owner)
                .push_bind(now);
        });
        insert.build().execute(&mut *tx).await.map_err(db_err)?;
        let mut run_ids: Vec<&String> = claimed.iter().map(|(r, _)| r).collect();
        run_ids.sort();
        run_ids.dedup();
        let runs_sql = format!(
            "UPDATE runs SET state = CASE WHEN state = 'queued' THEN 'running' ELSE state END,
                    started_at = COALESCE(started_at, ?) WHERE id IN ({}) RETURNING *",
            placeholders(run_ids.len())
        );
        let mut update_runs = sqlx::query(&runs_sql).bind(now);
        for id in &run_ids {
            update_runs = update_runs.bind(*id);
        }
        let mut runs: std::collections::HashMap<String, Run> = std::collections::HashMap::new();
        for row in update_runs.fetch_all(&mut *tx).await.map_err(db_err)? {
            let run = run_from_row(&row)?;
            runs.insert(run.id.to_string(), run);
        }
        let at = crate::wall_clock();
        let mut events = Vec::new();
        for (run, stage) in &claimed {
            let run = runs.get(run).ok_or_else(|| corrupt(format!("claimed a stage of missing run {run}")))?;
            let taken = taken_over.contains(&(run.id.to_string(), stage.key.clone()));
            let was = if taken { "running" } else { "queued" };
            events.extend(pond_core::events::claimed(run, stage, queued_runs.remove(&run.id.to_string()), was, at));
        }
        write_events(&mut tx, &events).await?;
        let claims = claimed
            .into_iter()
            .map(|(run, stage)| {
                let run =
                    runs.get(&run).cloned().ok_or_else(|| corrupt(format!("claimed a stage of missing run {run}")))?;
                Ok(Claim { run, stage })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        if let Some(line) = line {
            let lines: Vec<(RunId, NewLogLine)> =
                claims.iter().filter_map(|c| line(c).map(|l| (c.run.id, l))).collect();
            let keys: Vec<String> = lines.iter().map(|(run, _)| run.to_string()).collect();
            let rows: Vec<(&str, &NewLogLine)> =
                keys.iter().map(String::as_str).zip(lines.iter().map(|(_, l)| l)).collect();
            write_log_lines(&mut tx, &rows).await?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(claims)
    }

    /// [`Store::update_runs`] in one transaction: three reads load every run of the batch, the
    /// mutations run in memory, and the rows that changed go back in a few multi-row statements.
    async fn try_update_runs(
        &self,
        changes: &mut [(RunId, RunMutation<'_>)],
    ) -> Result<Vec<Result<RunSnapshot, StoreError>>, StoreError> {
        let mut ids: Vec<RunId> = changes.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        let mut tx = self.begin().await?;
        let loaded = load_snapshots(&mut tx, &ids).await?;
        let applied = crate::batch::apply(loaded, changes);
        // Nothing applied (every mutation refused): nothing to commit.
        if applied.results.iter().all(Result::is_err) {
            return Ok(applied.results);
        }
        write_rows(&mut tx, &Rows::of(applied.runs.iter().map(|(b, a)| (Some(b), a)))).await?;
        write_events(&mut tx, &applied.events).await?;
        let keys: Vec<String> = applied.lines.iter().map(|(run, _)| run.to_string()).collect();
        let lines: Vec<(&str, &NewLogLine)> =
            keys.iter().map(String::as_str).zip(applied.lines.iter().map(|(_, l)| l)).collect();
        write_log_lines(&mut tx, &lines).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(applied.results)
    }

    /// Copies the database at `path` into a new file `to`, consistent as of one moment, while a
    /// server may be using it (SQLite's `VACUUM INTO` on a connection of its own; writers wait
    /// at most for the copy's read, never for a lock it holds).
    pub async fn backup(path: &Path, to: &Path) -> Result<(), StoreError> {
        if to.exists() {
            return Err(StoreError::Conflict(format!("{} exists; a backup never overwrites", to.display())));
        }
        let options = SqliteConnectOptions::new().filename(path).busy_timeout(Duration::from_secs(30));
        let mut conn = sqlx::ConnectOptions::connect(&options).await.map_err(db_err)?;
        sqlx::query("VACUUM INTO ?")
            .bind(to.to_string_lossy().into_owned())
            .execute(&mut conn)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// Benchmark support: writes `n` one-stage runs of `backlog`'s kind straight into the tables
    /// (project [`crate::BACKLOG_PROJECT`]), in one transaction. Call it once per kind.
    pub async fn seed_runs(&self, n: u64, backlog: crate::Backlog, now: Timestamp) -> Result<(), StoreError> {
        // UUIDv7-shaped ids an hour old (the bench's own runs sort after them), told apart by
        // kind and a counter.
        let ms = (now.as_millis() - 3_600_000).max(0);
        let id = format!(
            "printf('%08x-%04x-7%03x-8000-%012x', {}, {}, {}, i)",
            (ms >> 16) & 0xffff_ffff,
            ms & 0xffff,
            backlog as u8
        );
        let seq = "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < ?1)";
        let (ready_at, attempt, started_at, finished_at) = backlog.stage_times(now);
        let (tags, caps) = backlog.requirements().unzip();
        let mut tx = self.begin().await?;
        sqlx::query(&format!(
            "{seq} INSERT INTO runs (id, project_id, state, definition, sources, created_at, started_at, finished_at)
             SELECT {id}, ?2, ?3, ?4, '[]', ?5, ?6, ?7 FROM seq"
        ))
        .bind(n as i64)
        .bind(crate::BACKLOG_PROJECT)
        .bind(backlog.state())
        .bind(backlog.definition())
        .bind(now.as_millis())
        .bind(started_at)
        .bind(finished_at)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        sqlx::query(&format!(
            "{seq} INSERT INTO stages (run_id, key, position, executor_kind, state, ready_at, attempt,
                                       started_at, finished_at, pool_tags, pool_caps)
             SELECT {id}, 's', 0, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9 FROM seq"
        ))
        .bind(n as i64)
        .bind(backlog.executor_kind())
        .bind(backlog.state())
        .bind(ready_at)
        .bind(attempt)
        .bind(started_at)
        .bind(finished_at)
        .bind(tags)
        .bind(caps)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if backlog == crate::Backlog::Finished {
            sqlx::query(&format!(
                "{seq} INSERT INTO attempts (run_id, stage_key, number, owner, started_at, finished_at, outcome)
                 SELECT {id}, 's', 1, 'seed', ?2, ?2, 'succeeded' FROM seq"
            ))
            .bind(n as i64)
            .bind(now.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        sqlx::query("ANALYZE").execute(&self.writer).await.map_err(db_err)?;
        Ok(())
    }

    /// Opens (creating if needed) the database file at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .pragma("temp_store", "memory");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .before_acquire(discard_if_in_transaction)
            .connect_with(options.clone())
            .await
            .map_err(db_err)?;
        MIGRATOR.run(&writer).await.map_err(|e| StoreError::Backend(format!("migrating {}: {e}", path.display())))?;
        // Readers map the file (up to 1 GiB) instead of copying pages with read(2): a scan of
        // the runs table (a text search over 100k runs) took 32 ms p50 instead of 101.
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .before_acquire(discard_if_in_transaction)
            .connect_with(options.read_only(true).pragma("mmap_size", "1073741824"))
            .await
            .map_err(db_err)?;
        let (inserts, queue) = tokio::sync::mpsc::channel(4 * INSERT_BATCH);
        let batch_writer = writer.clone();
        tokio::spawn(group_commit(queue, INSERT_BATCH, 1, move |snapshots| {
            let writer = batch_writer.clone();
            Box::pin(async move { insert_batch(&writer, snapshots).await })
        }));
        Ok(SqliteStore { writer, reader, inserts })
    }

    /// Closes both pools (their connections checkpoint and release the file).
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        begin_immediate(&self.writer).await
    }

    /// Inserts log lines in one transaction.
    async fn insert_log_lines<'a>(
        &self,
        lines: impl ExactSizeIterator<Item = (&'a str, &'a NewLogLine)>,
    ) -> Result<(), StoreError> {
        if lines.len() == 0 {
            return Ok(());
        }
        let lines: Vec<_> = lines.collect();
        let mut tx = self.begin().await?;
        write_log_lines(&mut tx, &lines).await?;
        tx.commit().await.map_err(db_err)
    }
}

/// Inserts log lines, many rows per statement, inside the caller's transaction.
async fn write_log_lines(conn: &mut SqliteConnection, lines: &[(&str, &NewLogLine)]) -> Result<(), StoreError> {
    // 8 parameters a row; SQLite allows 32766 per statement. A line whose producer number is
    // already stored (a retried batch) is skipped.
    for chunk in lines.chunks(500) {
        let mut sql = String::from(
            "INSERT OR IGNORE INTO logs (run_id, stage, attempt, stream, at, text, flags, line_seq) VALUES ",
        );
        sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", "));
        let mut q = sqlx::query(&sql);
        for (run, line) in chunk {
            q = q
                .bind(*run)
                .bind(&line.stage)
                .bind(line.attempt as i64)
                .bind(line.stream.as_str())
                .bind(line.at.as_millis())
                .bind(&line.text)
                .bind(crate::rows::log_flags(line))
                .bind(line.line_seq.map(|n| n as i64));
        }
        q.execute(&mut *conn).await.map_err(db_err)?;
    }
    Ok(())
}

/// Loads runs with their stages and attempts: three statements for the lot (per 500 runs).
/// Runs that do not exist are left out.
async fn load_snapshots(conn: &mut SqliteConnection, ids: &[RunId]) -> Result<Vec<RunSnapshot>, StoreError> {
    let (mut runs, mut stages, mut attempts) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let keys: Vec<String> = chunk.iter().map(RunId::to_string).collect();
        let marks = placeholders(keys.len());
        let sql = [
            format!("SELECT * FROM runs WHERE id IN ({marks})"),
            format!("SELECT * FROM stages WHERE run_id IN ({marks}) ORDER BY run_id, position"),
            format!("SELECT * FROM attempts WHERE run_id IN ({marks}) ORDER BY run_id, started_at, stage_key, number"),
        ];
        let mut rows = Vec::with_capacity(3);
        for sql in &sql {
            let mut q = sqlx::query(sql);
            for key in &keys {
                q = q.bind(key);
            }
            rows.push(q.fetch_all(&mut *conn).await.map_err(db_err)?);
        }
        for row in &rows[0] {
            runs.push(run_from_row(row)?);
        }
        for row in &rows[1] {
            stages.push((run_id_of(row, "run_id")?, stage_from_row(row)?));
        }
        for row in &rows[2] {
            attempts.push((run_id_of(row, "run_id")?, attempt_from_row(row)?));
        }
    }
    Ok(crate::batch::assemble(runs, stages, attempts))
}

async fn load_snapshot(conn: &mut SqliteConnection, id: RunId) -> Result<Option<RunSnapshot>, StoreError> {
    Ok(load_snapshots(conn, &[id]).await?.pop())
}

fn run_id_of(row: &sqlx::sqlite::SqliteRow, column: &str) -> Result<RunId, StoreError> {
    RunId::from_str(&row.try_get::<String, _>(column).map_err(db_err)?).map_err(corrupt)
}

/// Writes rows that changed, a few multi-row statements in all: runs inserted, runs updated,
/// stages upserted, attempts upserted.
async fn write_rows(conn: &mut SqliteConnection, rows: &Rows<'_>) -> Result<(), StoreError> {
    use sqlx::query_builder::QueryBuilder;
    for chunk in rows.inserted_runs.chunks(ROWS_PER_STATEMENT) {
        let mut insert = QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO runs (id, project_id, state, idempotency_key, definition, sources, cancel_requested, error,
                               created_at, started_at, finished_at, encryption, request_digest) ",
        );
        let mut encoded = Vec::with_capacity(chunk.len());
        for run in chunk {
            let definition = serde_json::to_string(&run.definition).map_err(corrupt)?;
            let sources = serde_json::to_string(&run.sources).map_err(corrupt)?;
            encoded.push((run, definition, sources));
        }
        insert.push_values(&encoded, |mut b, (run, definition, sources)| {
            b.push_bind(run.id.to_string())
                .push_bind(&run.project_id)
                .push_bind(run.state.as_str())
                .push_bind(&run.idempotency_key)
                .push_bind(definition)
                .push_bind(sources)
                .push_bind(run.cancel_requested)
                .push_bind(&run.error)
                .push_bind(run.created_at.as_millis())
                .push_bind(ts(run.started_at))
                .push_bind(ts(run.finished_at))
                .push_bind(encryption_column(run))
                .push_bind(&run.request_digest);
        });
        insert.build().execute(&mut *conn).await.map_err(db_err)?;
    }
    for chunk in rows.updated_runs.chunks(ROWS_PER_STATEMENT) {
        let mut encoded = Vec::with_capacity(chunk.len());
        for run in chunk {
            encoded.push((run, serde_json::to_string(&run.sources).map_err(corrupt)?));
        }
        let mut update = QueryBuilder::<sqlx::Sqlite>::new(
            "UPDATE runs SET state = v.column2, sources = v.column3, cancel_requested = v.column4, error = v.column5,
                             started_at = v.column6, finished_at = v.column7
               FROM (",
        );
        update.push_values(&encoded, |mut b, (run, sources)| {
            b.push_bind(run.id.to_string())
                .push_bind(run.state.as_str())
                .push_bind(sources)
                .push_bind(run.cancel_requested)
                .push_bind(&run.error)
                .push_bind(ts(run.started_at))
                .push_bind(ts(run.finished_at));
        });
        update.push(") AS v WHERE runs.id = v.column1");
        update.build().execute(&mut *conn).await.map_err(db_err)?;
    }
    for chunk in rows.stages.chunks(ROWS_PER_STATEMENT) {
        let mut upsert = QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO stages (run_id, key, position, executor_kind, state, ready_at, attempt, failures, lost_leases,
                                 lease_owner, lease_expires_at, cancel_requested, started_at, finished_at, error,
                                 exit_code, pool_tags, pool_caps) ",
        );
        upsert.push_values(chunk, |mut b, (run, s)| {
            let (pool_tags, pool_caps) = requirement_columns(s);
            b.push_bind(run.to_string())
                .push_bind(&s.key)
                .push_bind(s.position as i64)
                .push_bind(&s.executor_kind)
                .push_bind(s.state.as_str())
                .push_bind(ts(s.ready_at))
                .push_bind(s.attempt as i64)
                .push_bind(s.failures as i64)
                .push_bind(s.lost_leases as i64)
                .push_bind(&s.lease_owner)
                .push_bind(ts(s.lease_expires_at))
                .push_bind(s.cancel_requested)
                .push_bind(ts(s.started_at))
                .push_bind(ts(s.finished_at))
                .push_bind(&s.error)
                .push_bind(s.exit_code.map(|c| c as i64))
                .push_bind(pool_tags)
                .push_bind(pool_caps);
        });
        upsert.push(
            " ON CONFLICT (run_id, key) DO UPDATE SET
                state = excluded.state, ready_at = excluded.ready_at, attempt = excluded.attempt,
                failures = excluded.failures, lost_leases = excluded.lost_leases, lease_owner = excluded.lease_owner,
                lease_expires_at = excluded.lease_expires_at, cancel_requested = excluded.cancel_requested,
                started_at = excluded.started_at, finished_at = excluded.finished_at, error = excluded.error,
                exit_code = excluded.exit_code",
        );
        upsert.build().execute(&mut *conn).await.map_err(db_err)?;
    }
    for chunk in rows.attempts.chunks(ROWS_PER_STATEMENT) {
        let mut upsert = QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO attempts (run_id, stage_key, number, owner, started_at, finished_at, outcome, error, attestation) ",
        );
        upsert.push_values(chunk, |mut b, (run, a)| {
            b.push_bind(run.to_string())
                .push_bind(&a.stage_key)
                .push_bind(a.number as i64)
                .push_bind(&a.owner)
                .push_bind(a.started_at.as_millis())
                .push_bind(ts(a.finished_at))
                .push_bind(a.outcome.map(AttemptOutcome::as_str))
                .push_bind(&a.error)
                .push_bind(attestation_column(a));
        });
        upsert.push(
            " ON CONFLICT (run_id, stage_key, number) DO UPDATE SET
                finished_at = excluded.finished_at, outcome = excluded.outcome, error = excluded.error,
                attestation = excluded.attestation",
        );
        upsert.build().execute(&mut *conn).await.map_err(db_err)?;
    }
    Ok(())
}

/// Appends events inside the caller's transaction (the one writer makes rowid order commit order).
async fn write_events(conn: &mut SqliteConnection, events: &[pond_core::events::NewEvent]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut insert = sqlx::query_builder::QueryBuilder::<sqlx::Sqlite>::new(
        "INSERT INTO events (type, project_id, run_id, stage, attempt, state, previous_state, at) ",
    );
    insert.push_values(events, |mut b, e| {
        b.push_bind(&e.kind)
            .push_bind(&e.project_id)
            .push_bind(e.run_id.to_string())
            .push_bind(&e.stage)
            .push_bind(e.attempt.map(|n| n as i64))
            .push_bind(&e.state)
            .push_bind(&e.previous_state)
            .push_bind(e.at.as_millis());
    });
    insert.build().execute(&mut *conn).await.map_err(db_err)?;
    Ok(())
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_run(&self, snapshot: &RunSnapshot) -> Result<InsertOutcome, StoreError> {
        queue_write(&self.inserts, snapshot.clone(), "SQLite insert").await
    }

    async fn get_run(&self, id: RunId) -> Result<Option<RunSnapshot>, StoreError> {
        let mut conn = self.reader.acquire().await.map_err(db_err)?;
        load_snapshot(&mut conn, id).await
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<Vec<Run>, StoreError> {
        let mut sql = String::from("SELECT * FROM runs WHERE 1 = 1");
        if let Some(projects) = &query.projects {
            if projects.is_empty() {
                return Ok(Vec::new());
            }
            sql.push_str(&format!(" AND project_id IN ({})", placeholders(projects.len())));
        }
        if query.state.is_some() {
            sql.push_str(" AND state = ?");
        }
        if query.before.is_some() {
            sql.push_str(" AND id < ?");
        }
        let pattern = query.like_pattern();
        if pattern.is_some() {
            // SQLite's LIKE matches ASCII letters in either case.
            sql.push_str(
                " AND (id LIKE ? ESCAPE '\\' OR idempotency_key LIKE ? ESCAPE '\\' \
                   OR error LIKE ? ESCAPE '\\' OR definition LIKE ? ESCAPE '\\')",
            );
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?");
        let mut q = sqlx::query(&sql);
        for p in query.projects.iter().flatten() {
            q = q.bind(p);
        }
        if let Some(state) = query.state {
            q = q.bind(state.as_str());
        }
        if let Some(before) = query.before {
            q = q.bind(before.to_string());
        }
        if let Some(pattern) = &pattern {
            for _ in 0..4 {
                q = q.bind(pattern);
            }
        }
        q = q.bind(query.limit as i64);
        q.fetch_all(&self.reader).await.map_err(db_err)?.iter().map(run_from_row).collect()
    }

    async fn update_run(&self, id: RunId, mutate: RunMutation<'_>) -> Result<RunSnapshot, StoreError> {
        let mut changes = [(id, mutate)];
        self.update_runs(&mut changes).await.pop().unwrap_or_else(|| Err(StoreError::NotFound(format!("run {id}"))))
    }

    async fn update_runs(&self, changes: &mut [(RunId, RunMutation<'_>)]) -> Vec<Result<RunSnapshot, StoreError>> {
        match self.try_update_runs(changes).await {
            Ok(results) => results,
            // A failed batch: each item on its own, so one cannot fail the others.
            Err(_) if changes.len() > 1 => {
                let mut results = Vec::with_capacity(changes.len());
                for one in changes.chunks_mut(1) {
                    results.push(match self.try_update_runs(one).await {
                        Ok(mut r) => r.pop().unwrap_or_else(|| Err(StoreError::Backend("no result".into()))),
                        Err(e) => Err(e),
                    });
                }
                results
            }
            Err(e) => vec![Err(e)],
        }
    }

    async fn claim_stages(&self, query: &ClaimQuery) -> Result<Vec<Claim>, StoreError> {
        self.claim(query, None).await
    }

    async fn claim_stages_logged(&self, query: &ClaimQuery, line: ClaimLine<'_>) -> Result<Vec<Claim>, StoreError> {
        self.claim(query, Some(line)).await
    }

    async fn renew_lease(
        &self,
        run: RunId,
        stage: &str,
        attempt: u32,
        owner: &str,
        until: Timestamp,
    ) -> Result<LeaseStatus, StoreError> {
        let mut tx = self.begin().await?;
        let cancel: Option<bool> = sqlx::query_scalar(
            "UPDATE stages SET lease_expires_at = ?
              WHERE run_id = ? AND key = ? AND attempt = ? AND lease_owner = ? AND state = 'running'
              RETURNING cancel_requested",
        )
        .bind(until.as_millis())
        .bind(run.to_string())
        .bind(stage)
        .bind(attempt as i64)
        .bind(owner)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(match cancel {
            Some(cancel_requested) => LeaseStatus::Held { cancel_requested },
            None => LeaseStatus::Lost,
        })
    }

    async fn stage_counts(&self, now: Timestamp) -> Result<Vec<pond_core::store::StageCount>, StoreError> {
        let rows: Vec<(String, bool, bool, i64)> = sqlx::query_as(
            "SELECT state, pool_tags IS NOT NULL AS pooled, (state = 'queued' AND ready_at IS NOT NULL AND ready_at <= ?) AS ready, COUNT(*)
               FROM stages WHERE state IN ('queued', 'running')
              GROUP BY 1, 2, 3",
        )
        .bind(now.as_millis())
        .fetch_all(&self.reader)
        .await
        .map_err(db_err)?;
        Ok(crate::rows::stage_counts(rows))
    }

    async fn runs_to_reap(&self, now: Timestamp, limit: u32) -> Result<Vec<RunId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT run_id FROM stages
              WHERE state = 'running' AND lease_expires_at <= ? AND (cancel_requested = 1 OR lost_leases > ?)
              LIMIT ?",
        )
        .bind(now.as_millis())
        .bind(MAX_LOST_LEASES as i64)
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await
        .map_err(db_err)?;
        ids.iter().map(|s| RunId::from_str(s).map_err(corrupt)).collect()
    }

    async fn expire_all_leases(&self, now: Timestamp) -> Result<u64, StoreError> {
        // Pool workers' leases are not this process's: their workers still renew them.
        let done =
            sqlx::query("UPDATE stages SET lease_expires_at = ? WHERE state = 'running' AND executor_kind <> 'pool'")
                .bind(now.as_millis())
                .execute(&self.writer)
                .await
                .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn list_blobs(&self, after: Option<BlobId>, limit: u32) -> Result<Vec<BlobMeta>, StoreError> {
        let rows = sqlx::query("SELECT * FROM blobs WHERE id > ? ORDER BY id LIMIT ?")
            .bind(after.map(|a| a.to_string()).unwrap_or_default())
            .bind(limit as i64)
            .fetch_all(&self.reader)
            .await
            .map_err(db_err)?;
        rows.iter().map(blob_from_row).collect()
    }

    async fn replace_blob(&self, id: BlobId, expected_sha256: &str, data: &[u8]) -> Result<bool, StoreError> {
        let id = id.to_string();
        let mut tx = self.begin().await?;
        let updated = sqlx::query("UPDATE blobs SET size = ?, sha256 = ? WHERE id = ? AND sha256 = ?")
            .bind(data.len() as i64)
            .bind(sha256_hex(data))
            .bind(&id)
            .bind(expected_sha256)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        if updated.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM blob_chunks WHERE blob_id = ?").bind(&id).execute(&mut *tx).await.map_err(db_err)?;
        insert_chunks(&mut tx, &id, data).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    async fn delete_blob(&self, id: BlobId) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        for sql in ["DELETE FROM blob_chunks WHERE blob_id = ?", "DELETE FROM blobs WHERE id = ?"] {
            sqlx::query(sql).bind(id.to_string()).execute(&mut *tx).await.map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    async fn finished_runs(&self, finished_before: Timestamp, limit: u32) -> Result<Vec<RunId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM runs WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < ?
              ORDER BY finished_at LIMIT ?",
        )
        .bind(finished_before.as_millis())
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await
        .map_err(db_err)?;
        ids.iter().map(|id| RunId::from_str(id).map_err(corrupt)).collect()
    }

    async fn delete_finished_run(
        &self,
        run: RunId,
        finished_before: Timestamp,
    ) -> Result<Option<RunSnapshot>, StoreError> {
        let id = run.to_string();
        let ended = "SELECT EXISTS (SELECT 1 FROM runs WHERE id = ? AND state IN ('succeeded', 'failed', 'cancelled') AND finished_at < ?)";
        let is_ended: bool = sqlx::query_scalar(ended)
            .bind(&id)
            .bind(finished_before.as_millis())
            .fetch_one(&self.reader)
            .await
            .map_err(db_err)?;
        if !is_ended {
            return Ok(None);
        }
        // The log and the artifacts' chunks first, a slice per transaction: the one writer is
        // never held for a whole large run.
        let slices = [
            "DELETE FROM logs WHERE run_id = ?1 AND seq IN (SELECT seq FROM logs WHERE run_id = ?1 LIMIT 5000)",
            "DELETE FROM blob_chunks WHERE rowid IN (SELECT c.rowid FROM blob_chunks c JOIN artifacts a ON a.blob_id = c.blob_id
                WHERE a.run_id = ?1 LIMIT 64)",
        ];
        for slice in slices {
            loop {
                let mut tx = self.begin().await?;
                let done = sqlx::query(slice).bind(&id).execute(&mut *tx).await.map_err(db_err)?.rows_affected();
                tx.commit().await.map_err(db_err)?;
                if done == 0 {
                    break;
                }
            }
        }
        let mut tx = self.begin().await?;
        let still: bool = sqlx::query_scalar(ended)
            .bind(&id)
            .bind(finished_before.as_millis())
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
        if !still {
            return Ok(None);
        }
        let snapshot = load_snapshot(&mut tx, run).await?;
        let blobs: Vec<String> = sqlx::query_scalar("SELECT DISTINCT blob_id FROM artifacts WHERE run_id = ?")
            .bind(&id)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        for sql in [
            "DELETE FROM logs WHERE run_id = ?",
            "DELETE FROM attempts WHERE run_id = ?",
            "DELETE FROM stages WHERE run_id = ?",
            "DELETE FROM artifacts WHERE run_id = ?",
            "DELETE FROM runs WHERE id = ?",
        ] {
            sqlx::query(sql).bind(&id).execute(&mut *tx).await.map_err(db_err)?;
        }
        for blob in blobs {
            let held: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM artifacts WHERE blob_id = ?)")
                .bind(&blob)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
            if !held {
                for sql in ["DELETE FROM blob_chunks WHERE blob_id = ?", "DELETE FROM blobs WHERE id = ?"] {
                    sqlx::query(sql).bind(&blob).execute(&mut *tx).await.map_err(db_err)?;
                }
            }
        }
        tx.commit().await.map_err(db_err)?;
        Ok(snapshot)
    }

    async fn read_events(
        &self,
        after: i64,
        projects: Option<&[String]>,
        limit: u32,
    ) -> Result<Vec<pond_core::events::Event>, StoreError> {
        let mut sql = String::from("SELECT * FROM events WHERE seq > ?");
        if let Some(projects) = projects {
            if projects.is_empty() {
                return Ok(Vec::new());
            }
            sql.push_str(&format!(" AND project_id IN ({})", placeholders(projects.len())));
        }
        sql.push_str(" ORDER BY seq LIMIT ?");
        let mut q = sqlx::query(&sql).bind(after);
        for p in projects.into_iter().flatten() {
            q = q.bind(p);
        }
        let rows = q.bind(limit as i64).fetch_all(&self.reader).await.map_err(db_err)?;
        rows.iter().map(crate::rows::event_from_row).collect()
    }

    async fn last_event_seq(&self) -> Result<i64, StoreError> {
        // The AUTOINCREMENT counter, not MAX(seq): it stays put when old events are pruned.
        let last: Option<i64> = sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err)?;
        Ok(last.unwrap_or(0))
    }

    async fn prune_events(&self, before: Timestamp, below: i64) -> Result<u64, StoreError> {
        // In slices, so the one writer is never held long.
        let mut total = 0;
        loop {
            let mut tx = self.begin().await?;
            let done = sqlx::query(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE at < ? AND seq < ? ORDER BY seq LIMIT 5000)",
            )
            .bind(before.as_millis())
            .bind(below)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected();
            tx.commit().await.map_err(db_err)?;
            total += done;
            if done < 5000 {
                return Ok(total);
            }
        }
    }

    async fn append_logs(&self, run: RunId, lines: &[NewLogLine]) -> Result<(), StoreError> {
        let run = run.to_string();
        self.insert_log_lines(lines.iter().map(|l| (run.as_str(), l))).await
    }

    async fn append_log_batch(&self, lines: &[(RunId, NewLogLine)]) -> Result<(), StoreError> {
        let ids: Vec<String> = lines.iter().map(|(r, _)| r.to_string()).collect();
        self.insert_log_lines(ids.iter().map(String::as_str).zip(lines.iter().map(|(_, l)| l))).await
    }

    async fn read_logs(&self, run: RunId, after: i64, limit: u32) -> Result<Vec<LogLine>, StoreError> {
        let rows = sqlx::query("SELECT * FROM logs WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?")
            .bind(run.to_string())
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.reader)
            .await
            .map_err(db_err)?;
        rows.iter().map(log_from_row).collect()
    }

    async fn put_blob(&self, project_id: &str, data: &[u8], now: Timestamp) -> Result<BlobMeta, StoreError> {
        let meta = BlobMeta {
            id: BlobId::generate(now),
            project_id: project_id.to_string(),
            size: data.len() as u64,
            sha256: sha256_hex(data),
            created_at: now,
        };
        let id = meta.id.to_string();
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO blobs (id, project_id, size, sha256, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(&id)
            .bind(project_id)
            .bind(meta.size as i64)
            .bind(&meta.sha256)
            .bind(now.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        insert_chunks(&mut tx, &id, data).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(meta)
    }

    async fn blob_meta(&self, id: BlobId) -> Result<Option<BlobMeta>, StoreError> {
        let row = sqlx::query("SELECT * FROM blobs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err)?;
        row.as_ref().map(blob_from_row).transpose()
    }

    async fn read_blob_chunk(&self, id: BlobId, index: u64) -> Result<Vec<u8>, StoreError> {
        let data: Option<Vec<u8>> = sqlx::query_scalar("SELECT data FROM blob_chunks WHERE blob_id = ? AND idx = ?")
            .bind(id.to_string())
            .bind(index as i64)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err)?;
        data.ok_or_else(|| StoreError::NotFound(format!("blob {id} chunk {index}")))
    }

    async fn read_blob_prefix(&self, id: BlobId, len: usize) -> Result<Vec<u8>, StoreError> {
        let data: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT substr(data, 1, ?) FROM blob_chunks WHERE blob_id = ? AND idx = 0")
                .bind(len as i64)
                .bind(id.to_string())
                .fetch_optional(&self.reader)
                .await
                .map_err(db_err)?;
        data.ok_or_else(|| StoreError::NotFound(format!("blob {id} chunk 0")))
    }

    async fn append_leaf(
        &self,
        run: RunId,
        leaf: &str,
        leaf_hash: &[u8; 32],
        at: Timestamp,
    ) -> Result<u64, StoreError> {
        // The write transaction holds SQLite's write lock: indices are taken in turn.
        let mut tx = self.begin().await?;
        let idx: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(idx) + 1, 0) FROM transparency_log")
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::query("INSERT INTO transparency_log (idx, run_id, leaf, leaf_hash, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(idx)
            .bind(run.to_string())
            .bind(leaf)
            .bind(leaf_hash.as_slice())
            .bind(at.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(idx as u64)
    }

    async fn leaf_hashes(&self, from: u64, to: Option<u64>) -> Result<Vec<[u8; 32]>, StoreError> {
        let from = from.min(i64::MAX as u64) as i64;
        let to = to.map_or(i64::MAX, |t| t.min(i64::MAX as u64) as i64);
        let rows: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT leaf_hash FROM transparency_log WHERE idx >= ? AND idx < ? ORDER BY idx")
                .bind(from)
                .bind(to)
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
        rows.into_iter().map(|h| crate::leaf_hash_of(&h)).collect()
    }

    async fn run_leaves(&self, run: RunId) -> Result<Vec<(u64, String)>, StoreError> {
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT idx, leaf FROM transparency_log WHERE run_id = ? ORDER BY idx")
                .bind(run.to_string())
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
        Ok(rows.into_iter().map(|(i, l)| (i.max(0) as u64, l)).collect())
    }

    async fn leaves_of_runs(&self, runs: &[RunId]) -> Result<Vec<(RunId, u64, String)>, StoreError> {
        let mut all = Vec::new();
        for chunk in runs.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT run_id, idx, leaf FROM transparency_log WHERE run_id IN ({}) ORDER BY idx",
                placeholders(chunk.len())
            );
            let mut q = sqlx::query_as::<_, (String, i64, String)>(&sql);
            for run in chunk {
                q = q.bind(run.to_string());
            }
            for (run, i, leaf) in q.fetch_all(&self.reader).await.map_err(db_err)? {
                all.push((RunId::from_str(&run).map_err(corrupt)?, i.max(0) as u64, leaf));
            }
        }
        all.sort_by_key(|(_, i, _)| *i);
        Ok(all)
    }

    async fn put_artifact(&self, a: &Artifact, holder: &str, run_cap: u64) -> Result<(), StoreError> {
        // One write transaction: the attempt check and the write see the same stage row.
        let mut tx = self.begin().await?;
        let open: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM stages WHERE run_id = ? AND key = ? AND attempt = ? AND lease_owner = ? AND state = 'running'
                AND (output_closed_attempt IS NULL OR output_closed_attempt <> attempt)",
        )
        .bind(a.run_id.to_string())
        .bind(&a.stage)
        .bind(a.attempt as i64)
        .bind(holder)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        if open.is_none() {
            return Err(crate::attempt_not_writing(a));
        }
        // The transaction holds SQLite's write lock: no other artifact lands between the sum
        // and the write.
        let others: i64 =
            sqlx::query_scalar("SELECT COALESCE(SUM(size), 0) FROM artifacts WHERE run_id = ? AND name <> ?")
                .bind(a.run_id.to_string())
                .bind(&a.name)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
        if (others.max(0) as u64).saturating_add(a.size) > run_cap {
            return Err(crate::over_cap(a, others.max(0) as u64, run_cap));
        }
        let replaced: Option<String> =
            sqlx::query_scalar("SELECT blob_id FROM artifacts WHERE run_id = ? AND name = ?")
                .bind(a.run_id.to_string())
                .bind(&a.name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        let written = sqlx::query(
            "INSERT INTO artifacts (run_id, name, stage, attempt, blob_id, size, sha256, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (run_id, name) DO UPDATE SET attempt = excluded.attempt, blob_id = excluded.blob_id,
                size = excluded.size, sha256 = excluded.sha256, created_at = excluded.created_at
             WHERE artifacts.stage = excluded.stage",
        )
        .bind(a.run_id.to_string())
        .bind(&a.name)
        .bind(&a.stage)
        .bind(a.attempt as i64)
        .bind(a.blob_id.to_string())
        .bind(a.size as i64)
        .bind(&a.sha256)
        .bind(a.created_at.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if written.rows_affected() == 0 {
            let owner: String = sqlx::query_scalar("SELECT stage FROM artifacts WHERE run_id = ? AND name = ?")
                .bind(a.run_id.to_string())
                .bind(&a.name)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
            return Err(crate::name_taken(a, &owner));
        }
        // The replaced artifact's blob goes when nothing else holds it.
        if let Some(old) = replaced.filter(|old| *old != a.blob_id.to_string()) {
            let held: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM artifacts WHERE blob_id = ?)")
                .bind(&old)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
            if !held {
                for sql in ["DELETE FROM blob_chunks WHERE blob_id = ?", "DELETE FROM blobs WHERE id = ?"] {
                    sqlx::query(sql).bind(&old).execute(&mut *tx).await.map_err(db_err)?;
                }
            }
        }
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }

    async fn close_output(&self, run: RunId, stage: &str, attempt: u32, holder: &str) -> Result<bool, StoreError> {
        let closed = sqlx::query(
            "UPDATE stages SET output_closed_attempt = attempt
              WHERE run_id = ? AND key = ? AND attempt = ? AND lease_owner = ? AND state = 'running'",
        )
        .bind(run.to_string())
        .bind(stage)
        .bind(attempt as i64)
        .bind(holder)
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(closed.rows_affected() == 1)
    }

    async fn list_artifacts(&self, run: RunId) -> Result<Vec<Artifact>, StoreError> {
        sqlx::query("SELECT * FROM artifacts WHERE run_id = ? ORDER BY name")
            .bind(run.to_string())
            .fetch_all(&self.reader)
            .await
            .map_err(db_err)?
            .iter()
            .map(artifact_from_row)
            .collect()
    }

    async fn get_artifact(&self, run: RunId, name: &str) -> Result<Option<Artifact>, StoreError> {
        let row = sqlx::query("SELECT * FROM artifacts WHERE run_id = ? AND name = ?")
            .bind(run.to_string())
            .bind(name)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err)?;
        row.as_ref().map(artifact_from_row).transpose()
    }

    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let role = role_text(t.role);
        sqlx::query("INSERT INTO tokens (id, name, role, projects, secret_sha256, created_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(t.id.to_string())
            .bind(&t.name)
            .bind(role)
            .bind(serde_json::to_string(&t.projects).map_err(corrupt)?)
            .bind(&t.secret_sha256)
            .bind(t.created_at.as_millis())
            .bind(ts(t.revoked_at))
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn insert_first_admin(&self, token: &TokenRecord) -> Result<bool, StoreError> {
        // The writer connection serializes this check and insert against every other write.
        let mut tx = self.begin().await?;
        let exists: Option<String> =
            sqlx::query_scalar("SELECT id FROM tokens WHERE role = 'admin' AND revoked_at IS NULL LIMIT 1")
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        if exists.is_some() {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO tokens (id, name, role, projects, secret_sha256, created_at) VALUES (?, ?, 'admin', ?, ?, ?)",
        )
        .bind(token.id.to_string())
        .bind(&token.name)
        .bind(serde_json::to_string(&token.projects).map_err(corrupt)?)
        .bind(&token.secret_sha256)
        .bind(token.created_at.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    async fn find_token(&self, secret_sha256: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM tokens WHERE secret_sha256 = ?")
            .bind(secret_sha256)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err)?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        sqlx::query("SELECT * FROM tokens ORDER BY created_at, id")
            .fetch_all(&self.reader)
            .await
            .map_err(db_err)?
            .iter()
            .map(token_from_row)
            .collect()
    }

    async fn revoke_token(&self, id: TokenId, now: Timestamp) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")
            .bind(now.as_millis())
            .bind(id.to_string())
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn get_record(&self, kind: &str, key: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT body FROM records WHERE kind = ? AND key = ?")
            .bind(kind)
            .bind(key)
            .fetch_optional(&self.reader)
            .await
            .map_err(db_err)
    }

    async fn list_records(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
        sqlx::query_as("SELECT key, body FROM records WHERE kind = ? ORDER BY key")
            .bind(kind)
            .fetch_all(&self.reader)
            .await
            .map_err(db_err)
    }

    async fn put_record(&self, kind: &str, key: &str, body: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO records (kind, key, body) VALUES (?, ?, ?)
             ON CONFLICT (kind, key) DO UPDATE SET body = excluded.body",
        )
        .bind(kind)
        .bind(key)
        .bind(body)
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn delete_record(&self, kind: &str, key: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM records WHERE kind = ? AND key = ?")
            .bind(kind)
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    async fn swap_record(&self, kind: &str, key: &str, expected: Option<&str>, body: &str) -> Result<bool, StoreError> {
        let done = match expected {
            None => {
                sqlx::query("INSERT INTO records (kind, key, body) VALUES (?, ?, ?) ON CONFLICT (kind, key) DO NOTHING")
                    .bind(kind)
                    .bind(key)
                    .bind(body)
            }
            Some(old) => sqlx::query("UPDATE records SET body = ?3 WHERE kind = ?1 AND key = ?2 AND body = ?4")
                .bind(kind)
                .bind(key)
                .bind(body)
                .bind(old),
        }
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }
}

/// A blob's bytes as its chunk rows (an empty blob is one empty chunk).
async fn insert_chunks(tx: &mut sqlx::SqliteConnection, id: &str, data: &[u8]) -> Result<(), StoreError> {
    let chunks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(BLOB_CHUNK_BYTES).collect() };
    for (i, chunk) in chunks.into_iter().enumerate() {
        sqlx::query("INSERT INTO blob_chunks (blob_id, idx, data) VALUES (?, ?, ?)")
            .bind(id)
            .bind(i as i64)
            .bind(chunk)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
    }
    Ok(())
}
