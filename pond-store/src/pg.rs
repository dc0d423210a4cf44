//! `PgStore`: the production store. Any number of stateless `pond server` nodes share one
//! database; nothing lives only in one node's memory.
//!
//! - Claims take due stages with `FOR UPDATE SKIP LOCKED` in index order (so their cost does
//!   not grow with the queue) and set a lease; expired leases are taken the same way.
//! - Lock order is the same everywhere — a run's stage rows (by position), then run rows (by
//!   id) — and a transaction that still loses a deadlock or serialization race is retried.
//! - Log positions are per run, allocated under a counter row's lock, so they become visible
//!   in order and a follower's cursor never skips a late commit.
//! - [`PgStore::relay_changes`] tells other nodes about this node's writes with one coalesced
//!   `NOTIFY` (not one per row: a NOTIFY in every transaction serializes commits) and wakes
//!   local waiters on theirs (`LISTEN`), with the waiters' own fallback poll as a safety net.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pond_core::ids::{BlobId, RunId, TokenId};
use pond_core::run::{Run, RunSnapshot, Stage, MAX_LOST_LEASES};
use pond_core::store::{
    Artifact, BlobMeta, Claim, ClaimLine, ClaimQuery, InsertOutcome, LeaseStatus, LogLine, NewLogLine, RunMutation,
    RunQuery, Store, TokenRecord, BLOB_CHUNK_BYTES,
};
use pond_core::time::Timestamp;
use pond_core::StoreError;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, PgPool, Row};
use tokio::task::JoinHandle;

use crate::batch::{group_commit, queue_write, Queued, Rows};
use crate::pg_arrays::{insert_runs_statement, Changes, EventArrays, RunArrays, StageArrays};
use crate::rows::{
    artifact_from_row, attempt_from_row, blob_from_row, corrupt, db_err, log_from_row, role_text, run_from_row,
    stage_from_row, token_from_row, ts, Columns,
};
use crate::{sha256_hex, WatchedStore};

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The channel nodes announce their writes on.
pub const CHANGE_CHANNEL: &str = "pond_changes";

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Submits waiting for the next group commit. Each answer is its own: a lookup after the
    /// commit that fails fails that submit only (the batch is never replayed once committed).
    inserts: tokio::sync::mpsc::Sender<Queued<RunSnapshot, Result<InsertOutcome, StoreError>>>,
    /// Transparency-log leaves waiting for the next group commit (answered with their index).
    leaves: tokio::sync::mpsc::Sender<Queued<NewLeaf, Result<u64, StoreError>>>,
}

/// A transparency-log leaf to append.
struct NewLeaf {
    run: RunId,
    leaf: String,
    hash: [u8; 32],
    at: Timestamp,
}

/// Most leaves appended together (one turn on the log's table lock, one commit).
const LEAF_BATCH: usize = 256;

/// Most submits committed together (one transaction, one WAL sync).
const INSERT_BATCH: usize = 128;

/// Submit batches committing at once: while one waits for its WAL sync, the next forms.
const INSERT_CONCURRENCY: usize = 2;

/// A failure inside a transaction: database errors are kept raw until the retry decision.
enum Fail {
    Db(sqlx::Error),
    Store(StoreError),
}

impl From<sqlx::Error> for Fail {
    fn from(e: sqlx::Error) -> Self {
        Fail::Db(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

impl Fail {
    /// Deadlock (40P01) or serialization failure (40001): the transaction may simply be run again.
    fn retryable(&self) -> bool {
        matches!(self, Fail::Db(sqlx::Error::Database(d)) if matches!(d.code().as_deref(), Some("40P01" | "40001")))
    }

    fn into_store(self) -> StoreError {
        match self {
            Fail::Db(e) => db_err(e),
            Fail::Store(e) => e,
        }
    }
}

const TX_TRIES: u32 = 5;

/// The pool's check before handing out a connection: one inside a transaction is closed
/// instead (the server rolls it back). sqlx leaves exactly that when a caller is dropped while
/// its `BEGIN` is in flight (its guard rolls back only transactions it has counted), and every
/// autocommit write on that connection would then join a transaction that never commits — 6
/// of 600 acknowledged writes were lost so in `tests/abandoned_writes.rs` before this check. A
/// statement that is not its transaction's first has a later start than its transaction.
/// (sqlx runs it on every `acquire`, `begin` and query on the pool; its `try_acquire`/
/// `try_begin` skip it — do not use them. Nor nested `begin`s: a cancelled one rolls back the
/// outer transaction in sqlx 0.8 and leaves its `Transaction` committing nothing.)
/// Whether a statement sent now starts its own transaction. Sent with the simple query
/// protocol: one message, so the statement's start and an implicit transaction's are the same
/// instant (with Parse/Bind/Execute they are not, and every connection would look busy).
async fn statement_starts_its_transaction(conn: &mut sqlx::PgConnection) -> Result<bool, sqlx::Error> {
    let row = sqlx::Executor::fetch_one(conn, sqlx::raw_sql("SELECT statement_timestamp() = transaction_timestamp()"))
        .await?;
    sqlx::Row::try_get(&row, 0)
}

fn discard_if_in_transaction(
    conn: &mut sqlx::PgConnection,
    _meta: sqlx::pool::PoolConnectionMetadata,
) -> futures_util::future::BoxFuture<'_, Result<bool, sqlx::Error>> {
    Box::pin(async move {
        let first = statement_starts_its_transaction(conn).await?;
        if !first {
            tracing::warn!("closing a PostgreSQL connection left inside a transaction nobody holds");
        }
        Ok(first)
    })
}

/// Whether a stage of the kinds `$2` holds a lease that ran out before `$1` (a claim takes
/// such stages over).
const EXPIRED_LEASE_EXISTS: &str = "EXISTS (SELECT 1 FROM stages WHERE state = 'running' AND lease_expires_at <= $1
                                  AND NOT cancel_requested AND executor_kind = ANY($2))";

/// Runs a claim's `SELECT <bool>` pre-check (`$1` now, `$2` the kinds) on its connection.
async fn any_due(conn: &mut PgConnection, sql: &str, now: i64, kinds: &[String]) -> Result<bool, Fail> {
    Ok(sqlx::query_scalar(sql).bind(now).bind(kinds).fetch_one(conn).await?)
}

/// The index expression that tells queued stages' requirements apart (`stages_ready_by_route`,
/// migration 0010): a stage with none (a local one) has `md5('|')`.
const ROUTE_KEY: &str = "md5(COALESCE(pool_tags, '') || '|' || COALESCE(pool_caps, ''))";

impl PgStore {
    /// Connects with a pool of `max_connections` and applies migrations (under sqlx's advisory
    /// lock, so several nodes starting at once migrate once).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Backend(format!("bad database URL: {e}")))?
            .application_name("pond")
            .disable_statement_logging();
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .min_connections(0)
            // While the database is away, callers hear "unavailable" quickly (the API answers
            // 503) instead of hanging; the pool reconnects by itself when it is back.
            .acquire_timeout(Duration::from_secs(3))
            // Instead of sqlx's ping, a query that is the ping and also tells whether the
            // connection is inside a transaction nobody holds (one round trip either way).
            .test_before_acquire(false)
            .before_acquire(discard_if_in_transaction)
            .connect_with(options)
            .await
            .map_err(db_err)?;
        MIGRATOR.run(&pool).await.map_err(|e| StoreError::Backend(format!("migrating the database: {e}")))?;
        let (inserts, queue) = tokio::sync::mpsc::channel(4 * INSERT_BATCH);
        let batch_pool = pool.clone();
        tokio::spawn(group_commit(queue, INSERT_BATCH, INSERT_CONCURRENCY, move |snapshots| {
            let pool = batch_pool.clone();
            Box::pin(async move { insert_batch(&pool, snapshots).await })
        }));
        // Appends take turns on the log's table lock until they commit: one at a time, every
        // pooled result waited for every other's WAL sync. A batch takes one turn.
        let (leaves, leaf_queue) = tokio::sync::mpsc::channel(LEAF_BATCH);
        let leaf_pool = pool.clone();
        tokio::spawn(group_commit(leaf_queue, LEAF_BATCH, 1, move |leaves| {
            let pool = leaf_pool.clone();
            // A failed batch fails every leaf in it (never retried leaf by leaf: a commit whose
            // outcome is unknown may have stored them, and a retry would store them twice).
            Box::pin(async move {
                Ok(match append_leaves(&pool, leaves).await {
                    Ok(indices) => indices.into_iter().map(Ok).collect(),
                    Err(e) => leaves
                        .iter()
                        .map(|_| {
                            Err(match &e {
                                StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
                                other => StoreError::Backend(other.to_string()),
                            })
                        })
                        .collect(),
                })
            })
        }));
        Ok(PgStore { pool, inserts, leaves })
    }

    /// The pool (for benchmarks and tests that seed data directly).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Benchmark support: writes `n` one-stage runs of `backlog`'s kind straight into the tables
    /// (project [`crate::BACKLOG_PROJECT`]), in one transaction, so a benchmark can start from a
    /// million stored or queued runs in seconds.
    pub async fn seed_runs(&self, n: u64, backlog: crate::Backlog, now: Timestamp) -> Result<(), StoreError> {
        let (ready_at, attempt, started_at, finished_at) = backlog.stage_times(now);
        let (tags, caps) = backlog.requirements().unzip();
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        sqlx::query(
            "WITH r AS (
                INSERT INTO runs (id, project_id, state, definition, sources, created_at, started_at, finished_at)
                SELECT gen_random_uuid()::TEXT, $1, $2, $3, '[]', $4, $5, $6 FROM generate_series(1, $7)
                RETURNING id)
             INSERT INTO stages (run_id, key, position, executor_kind, state, ready_at, attempt,
                                 started_at, finished_at, pool_tags, pool_caps)
             SELECT id, 's', 0, $8, $2, $9, $10, $5, $6, $11, $12 FROM r",
        )
        .bind(crate::BACKLOG_PROJECT)
        .bind(backlog.state())
        .bind(backlog.definition())
        .bind(now.as_millis())
        .bind(started_at)
        .bind(finished_at)
        .bind(n as i64)
        .bind(backlog.executor_kind())
        .bind(ready_at)
        .bind(attempt)
        .bind(tags)
        .bind(caps)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if backlog == crate::Backlog::Finished {
            sqlx::query(
                "INSERT INTO attempts (run_id, stage_key, number, owner, started_at, finished_at, outcome)
                 SELECT id, 's', 1, 'seed', $1, $1, 'succeeded' FROM runs
                  WHERE project_id = $2 AND state = 'succeeded'
                    AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.run_id = runs.id)",
            )
            .bind(now.as_millis())
            .bind(crate::BACKLOG_PROJECT)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        sqlx::query("ANALYZE").execute(&self.pool).await.map_err(db_err)?;
        Ok(())
    }

    /// Relays changes between this node and the others: local writes seen by `watched` become
    /// one coalesced `NOTIFY` (at most every few milliseconds), and other nodes' notifications
    /// wake this node's waiters. Runs until the returned tasks are aborted.
    pub fn relay_changes(&self, watched: Arc<WatchedStore>, node_id: String) -> Vec<JoinHandle<()>> {
        let notify_pool = self.pool.clone();
        let me = node_id.clone();
        let outgoing_watch = watched.clone();
        let outgoing = tokio::spawn(async move {
            let mut runs = outgoing_watch.local_runs_changed();
            let mut output = outgoing_watch.local_output_changed();
            let mut members = outgoing_watch.local_members_changed();
            loop {
                let kind = tokio::select! {
                    // A pool member's change first and on its own: other nodes drop their cached
                    // credentials on it (a revocation holds on every node at once).
                    r = members.changed() => {
                        if r.is_err() { return; }
                        members.borrow_and_update();
                        // Sent until it goes through (the others' caches also expire on their
                        // own meanwhile: see `Pools`).
                        while sqlx::query("SELECT pg_notify($1, $2)")
                            .bind(CHANGE_CHANNEL)
                            .bind(format!("{me} members"))
                            .execute(&notify_pool)
                            .await
                            .is_err()
                        {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        continue;
                    }
                    r = runs.changed() => { if r.is_err() { return; } "runs" }
                    r = output.changed() => { if r.is_err() { return; } "output" }
                };
                // Let a burst of writes collapse into one notification.
                tokio::time::sleep(Duration::from_millis(2)).await;
                let kind = if runs.has_changed().unwrap_or(false) { "runs" } else { kind };
                runs.borrow_and_update();
                output.borrow_and_update();
                let sent = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANGE_CHANNEL)
                    .bind(format!("{me} {kind}"))
                    .execute(&notify_pool)
                    .await;
                if sent.is_err() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        let listen_pool = self.pool.clone();
        let incoming = tokio::spawn(async move {
            loop {
                let mut listener = match PgListener::connect_with(&listen_pool).await {
                    Ok(l) => l,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                if listener.listen(CHANGE_CHANNEL).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                // Whatever happened while not listening: let waiters look once.
                watched.announce_remote(true);
                watched.announce_remote_members();
                // `Ok(None)` or an error: the connection dropped; reconnect and listen again.
                while let Ok(Some(n)) = listener.try_recv().await {
                    let mut parts = n.payload().splitn(2, ' ');
                    let (from, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or("runs"));
                    if from == node_id {
                        continue;
                    }
                    if kind == "members" {
                        watched.announce_remote_members();
                    } else {
                        watched.announce_remote(kind == "runs");
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        vec![outgoing, incoming]
    }

    /// Gives committed events without a position the next positions, in `id` order, under one
    /// advisory lock (any node may do it; they take turns). An event committed later is
    /// numbered later, so a reader that has read up to `n` never misses one below `n`. Events
    /// of one run keep their order: a run's next change takes its row lock, so it inserts
    /// (and gets its ids) only after the previous one committed.
    ///
    /// `wait`: wait for the lock when another node holds it (retention, `last_event_seq`);
    /// otherwise a reader that finds it taken reads what is numbered already — still a prefix
    /// of the order, so correct — instead of tying up a connection.
    async fn sequence_events(&self, wait: bool) -> Result<(), StoreError> {
        loop {
            let pending: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM events WHERE seq IS NULL)")
                .fetch_one(&self.pool)
                .await
                .map_err(db_err)?;
            if !pending {
                return Ok(());
            }
            let mut tx = self.pool.begin().await.map_err(db_err)?;
            let lock = if wait {
                "SELECT pg_advisory_xact_lock(hashtextextended('pond-events', 11))::TEXT = ''"
            } else {
                "SELECT pg_try_advisory_xact_lock(hashtextextended('pond-events', 11))"
            };
            let got: bool = sqlx::query_scalar(lock).fetch_one(&mut *tx).await.map_err(db_err)?;
            if !wait && !got {
                return Ok(());
            }
            // A statement after the lock: its snapshot sees the positions the previous holder gave.
            let numbered = sqlx::query(
                "UPDATE events e SET seq = b.base + n.rn
                   FROM (SELECT id, row_number() OVER (ORDER BY id) AS rn
                           FROM (SELECT id FROM events WHERE seq IS NULL ORDER BY id LIMIT 10000) t) n,
                        (SELECT COALESCE(MAX(seq), 0) AS base FROM events) b
                  WHERE e.id = n.id",
            )
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected();
            tx.commit().await.map_err(db_err)?;
            if numbered < 10_000 {
                return Ok(());
            }
        }
    }

    async fn claim(&self, query: &ClaimQuery, line: Option<ClaimLine<'_>>) -> Result<Vec<Claim>, StoreError> {
        let mut tries = 0;
        loop {
            match self.try_claim(query, line).await {
                Err(f) if f.retryable() && tries < TX_TRIES => tries += 1,
                result => return result.map_err(Fail::into_store),
            }
        }
    }

    /// [`Store::update_runs`] in one transaction: the batch's runs are loaded and locked with
    /// three statements (stages, then runs, in id order, as every writer takes them), the
    /// mutations run in memory, and what changed goes back in a few statements over arrays.
    async fn try_update_runs(
        &self,
        changes: &mut [(RunId, RunMutation<'_>)],
    ) -> Result<Vec<Result<RunSnapshot, StoreError>>, Fail> {
        let mut ids: Vec<RunId> = changes.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        let mut tx = self.pool.begin().await?;
        let loaded = load_snapshots(&mut tx, &ids, true).await?;
        let applied = crate::batch::apply(loaded, changes);
        // Nothing applied (every mutation refused): nothing to commit.
        if applied.results.iter().all(Result::is_err) {
            return Ok(applied.results);
        }
        let rows = Rows::of(applied.runs.iter().map(|(b, a)| (Some(b), a)));
        let lines: Vec<(RunId, &NewLogLine)> = applied.lines.iter().map(|(id, l)| (*id, l)).collect();
        write_changes(&mut tx, &rows, &lines, &applied.events).await?;
        tx.commit().await?;
        Ok(applied.results)
    }

    async fn try_claim(&self, query: &ClaimQuery, line: Option<ClaimLine<'_>>) -> Result<Vec<Claim>, Fail> {
        let now = query.now.as_millis();
        // One connection for the whole claim (each pool checkout costs a round trip of its own).
        let mut conn = self.pool.acquire().await?;
        // A worker's routes are found before the transaction, outside it: when nothing queued
        // is for the worker and no lease has expired (an idle pool, a wake-up that found the
        // queue drained), the claim ends there, without a transaction, a lock or a rollback —
        // three statements instead of seven. (Read-committed statements see what is committed
        // when each starts, inside a transaction or not: finding them first changes nothing.)
        let mut worker_walks: Vec<(&String, Vec<String>)> = Vec::new();
        if let Some(worker) = &query.offer {
            for kind in &query.kinds {
                let found: Vec<(String, Option<String>, Option<String>, Option<i64>)> = sqlx::query_as(&format!(
                    "WITH RECURSIVE routes(route, tags, caps) AS (
                       (SELECT {ROUTE_KEY}, pool_tags, pool_caps FROM stages
                         WHERE state = 'queued' AND ready_at IS NOT NULL AND executor_kind = $1
                         ORDER BY {ROUTE_KEY} LIMIT 1)
                       UNION ALL
                       SELECT n.route, n.tags, n.caps FROM routes r CROSS JOIN LATERAL (
                         SELECT {ROUTE_KEY} AS route, pool_tags AS tags, pool_caps AS caps FROM stages
                          WHERE state = 'queued' AND ready_at IS NOT NULL AND executor_kind = $1 AND {ROUTE_KEY} > r.route
                          ORDER BY {ROUTE_KEY} LIMIT 1) n)
                     SELECT r.route, r.tags, r.caps,
                            (SELECT ready_at FROM stages
                              WHERE state = 'queued' AND ready_at IS NOT NULL AND executor_kind = $1 AND {ROUTE_KEY} = r.route
                              ORDER BY ready_at LIMIT 1)
                       FROM routes r"
                ))
                .bind(kind)
                .fetch_all(&mut *conn)
                .await?;
                let found = found
                    .into_iter()
                    .filter_map(|(key, tags, caps, due)| Some(crate::rows::QueuedRoute { key, tags, caps, due: due? }))
                    .collect();
                let routes = crate::rows::routes_to_walk(found, worker, now, query.limit as usize);
                if !routes.is_empty() {
                    worker_walks.push((kind, routes.into_iter().map(|r| r.key).collect()));
                }
            }
            if worker_walks.is_empty() {
                // Any expired lease of these kinds (the transaction's first candidate select
                // narrows it to what the worker is admitted to).
                if !any_due(&mut conn, &format!("SELECT {EXPIRED_LEASE_EXISTS}"), now, &query.kinds).await? {
                    return Ok(Vec::new());
                }
            }
        }
        if query.offer.is_none() {
            // The local driver is woken by every change of any run, pooled ones included, and
            // most wake-ups find nothing of its own: one statement says so, rather than a
            // transaction of four that rolls back.
            let sql = format!(
                "SELECT EXISTS (SELECT 1 FROM UNNEST($2::TEXT[]) AS k(kind) CROSS JOIN LATERAL (
                          SELECT 1 FROM stages
                           WHERE state = 'queued' AND ready_at IS NOT NULL AND ready_at <= $1
                             AND executor_kind = k.kind AND {ROUTE_KEY} = md5('|') LIMIT 1) q)
                     OR {EXPIRED_LEASE_EXISTS}"
            );
            if !any_due(&mut conn, &sql, now, &query.kinds).await? {
                return Ok(Vec::new());
            }
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        if query.offer.is_some() {
            // A worker runs one job at a time: none for a worker that holds a live lease. Claims
            // for one worker from several nodes (an older long poll still waiting behind a load
            // balancer) take turns on a transaction lock keyed by the worker, so the check and
            // the claim cannot interleave.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))")
                .bind(&query.owner)
                .execute(&mut *tx)
                .await?;
            let busy: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM stages WHERE state = 'running' AND lease_owner = $1 AND lease_expires_at > $2)",
            )
            .bind(&query.owner)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            if busy {
                tx.commit().await?;
                return Ok(Vec::new());
            }
        }
        // Expired leases first (rare), then queued stages, each walked in index order.
        // A pool worker's claim takes only stages whose required tags are all among the worker's
        // ($6) and whose every capability glob matches one of its capabilities ($7), the glob
        // turned into a LIKE pattern (patterns hold no `[`, see `valid_capability_pattern`).
        let byo_only = query.offer.as_ref().is_some_and(|o| o.tags.contains(pond_core::routing::BYO_TAG));
        // A bring-your-own host takes only byo work of the project it is pinned to (see
        // `routing::admits`): the stage requires `pool:byo` and the host has `tenant:<project>`.
        let byo = if byo_only {
            "AND pool_tags::jsonb @> '[\"pool:byo\"]'::jsonb
             AND EXISTS (SELECT 1 FROM runs r WHERE r.id = stages.run_id AND ('tenant:' || r.project_id) = ANY($6))"
        } else {
            ""
        };
        let offer = if query.offer.is_some() {
            r"AND pool_tags IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements_text(pool_tags::jsonb) t(v) WHERE NOT (t.v = ANY($6)))
              AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements_text(pool_caps::jsonb) p(v)
                               WHERE NOT EXISTS (SELECT 1 FROM UNNEST($7::TEXT[]) c(v) WHERE c.v LIKE
                                   replace(replace(replace(replace(replace(p.v, '', '\'), '%', '\%'), '_', '\_'), '*', '%'), '?', '_')))"
        } else {
            "AND $6::TEXT[] IS NULL AND $7::TEXT[] IS NULL"
        };
        let (offer_tags, offer_caps): (Option<Vec<String>>, Option<Vec<String>>) = match &query.offer {
            Some(o) => (Some(o.tags.iter().cloned().collect()), Some(o.capabilities.clone())),
            None => (None, None),
        };
        // Queued stages are walked one route at a time (an executor kind and the requirements
        // a worker must meet, indexed by `stages_ready_by_route`), each walk stopping after
        // `want` rows. A local driver's routes are its kinds with no requirements; a worker's
        // are the requirement sets queued for its kind that it is admitted to, found first (see
        // `routes_to_walk`), so a backlog it cannot take — another pool's, another tenant's —
        // is never read (78 ms per claim behind 100,000 such stages when it was). With
        // `executor_kind = ANY($2)` over one index for every kind, the planner walked every kind
        // in due order and filtered (15–40 ms per claim with 100,000 queued of another kind).
        // Rows a route locked beyond the outer LIMIT stay locked until this short transaction
        // ends; other claimers skip them meanwhile.
        // Each candidate select; one that walks a worker's routes takes its kind and route keys
        // as two parameters of its own, after the seven every select shares.
        let mut candidates: Vec<String> = vec![format!(
            "SELECT run_id, key FROM stages
              WHERE state = 'running' AND lease_expires_at <= $1 AND NOT cancel_requested AND executor_kind = ANY($2) {offer} {byo}
              ORDER BY lease_expires_at LIMIT $3 FOR UPDATE SKIP LOCKED"
        )];
        let walks: Vec<(&String, Vec<String>)> = match &query.offer {
            None => {
                candidates.push(format!(
                    "SELECT q.run_id, q.key FROM UNNEST($2::TEXT[]) AS k(kind) CROSS JOIN LATERAL (
                    SELECT run_id, key, ready_at FROM stages
                     WHERE state = 'queued' AND ready_at IS NOT NULL AND ready_at <= $1 AND executor_kind = k.kind
                       AND {ROUTE_KEY} = md5('|') {offer}
                     ORDER BY ready_at LIMIT $3 FOR UPDATE SKIP LOCKED) q
                  ORDER BY q.ready_at LIMIT $3"
                ));
                Vec::new()
            }
            Some(_) => {
                for i in 0..worker_walks.len() {
                    let (kind, routes) = (8 + 2 * i, 9 + 2 * i);
                    candidates.push(format!(
                        "SELECT q.run_id, q.key FROM UNNEST(${routes}::TEXT[]) AS r(route) CROSS JOIN LATERAL (
                            SELECT run_id, key, ready_at FROM stages
                             WHERE state = 'queued' AND ready_at IS NOT NULL AND ready_at <= $1 AND executor_kind = ${kind}
                               AND ${kind} = ANY($2) AND {ROUTE_KEY} = r.route {offer} {byo}
                             ORDER BY ready_at LIMIT $3 FOR UPDATE SKIP LOCKED) q
                          ORDER BY q.ready_at LIMIT $3"
                    ));
                }
                worker_walks
            }
        };
        // One statement takes them (expired leases first, then each walk, up to the limit),
        // leases them and opens their attempts.
        let withs: Vec<String> =
            candidates.iter().enumerate().map(|(i, select)| format!("candidates_{i} AS ({select})")).collect();
        let union: Vec<String> =
            (0..candidates.len()).map(|i| format!("SELECT run_id, key FROM candidates_{i}")).collect();
        let sql = format!(
            "WITH {},
                  picked AS ({} LIMIT $3),
                  claimed AS (
                    UPDATE stages s SET state = 'running', attempt = s.attempt + 1,
                           lost_leases = s.lost_leases + CASE WHEN s.state = 'running' THEN 1 ELSE 0 END,
                           lease_owner = $4, lease_expires_at = $5, started_at = COALESCE(s.started_at, $1)
                      FROM picked WHERE s.run_id = picked.run_id AND s.key = picked.key
                    RETURNING s.*),
                  opened AS (
                    INSERT INTO attempts (run_id, stage_key, number, owner, started_at)
                    SELECT run_id, key, attempt, $4, $1 FROM claimed)
             SELECT * FROM claimed",
            withs.join(",\n"),
            union.join(" UNION ALL ")
        );
        let mut statement = sqlx::query(&sql)
            .bind(now)
            .bind(&query.kinds)
            .bind(query.limit as i64)
            .bind(&query.owner)
            .bind(query.lease_until.as_millis())
            .bind(&offer_tags)
            .bind(&offer_caps);
        for (kind, routes) in &walks {
            statement = statement.bind(*kind).bind(routes);
        }
        let mut stages: Vec<Stage> = Vec::new();
        let mut run_ids: Vec<String> = Vec::new();
        for row in &statement.fetch_all(&mut *tx).await? {
            run_ids.push(row.try_get::<String, _>("run_id")?);
            stages.push(stage_from_row(row)?);
        }
        if stages.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<&str> = stages.iter().map(|s| s.key.as_str()).collect();
        let numbers: Vec<i64> = stages.iter().map(|s| s.attempt as i64).collect();
        // Attempts of re-claimed stages that never reported: their holder vanished. (Only a
        // re-claim of an expired lease can leave one, so first claims skip the statement.)
        // Stages taken over from an expired lease (their earlier attempt was still open).
        let mut taken_over: std::collections::HashSet<(String, String)> = Default::default();
        if stages.iter().any(|s| s.lost_leases > 0) {
            let closed: Vec<(String, String)> = sqlx::query_as(
                "UPDATE attempts a SET outcome = 'lease_expired', finished_at = $1,
                        error = 'lease expired: the node running this attempt stopped renewing it'
                   FROM UNNEST($2::TEXT[], $3::TEXT[], $4::BIGINT[]) AS c(run_id, stage_key, number)
                  WHERE a.run_id = c.run_id AND a.stage_key = c.stage_key AND a.number < c.number AND a.outcome IS NULL
                 RETURNING a.run_id, a.stage_key",
            )
            .bind(now)
            .bind(&run_ids)
            .bind(&keys)
            .bind(&numbers)
            .fetch_all(&mut *tx)
            .await?;
            taken_over.extend(closed);
        }
        let mut unique = run_ids.clone();
        unique.sort();
        unique.dedup();
        // Run rows are locked in id order, after the stage rows: the order every writer uses.
        let rows = sqlx::query(
            "WITH locked AS (SELECT id, state AS was FROM runs WHERE id = ANY($2) ORDER BY id FOR UPDATE)
             UPDATE runs SET state = CASE WHEN runs.state = 'queued' THEN 'running' ELSE runs.state END,
                    started_at = COALESCE(started_at, $1)
               FROM locked WHERE runs.id = locked.id
             RETURNING runs.*, locked.was",
        )
        .bind(now)
        .bind(&unique)
        .fetch_all(&mut *tx)
        .await?;
        let mut runs = std::collections::HashMap::new();
        let mut queued_runs = std::collections::HashSet::new();
        for row in &rows {
            let run = run_from_row(row)?;
            if row.try_get::<String, _>("was")? == "queued" {
                queued_runs.insert(run.id.to_string());
            }
            runs.insert(run.id.to_string(), run);
        }
        let at = crate::wall_clock();
        let mut events = Vec::new();
        for (run, stage) in run_ids.iter().zip(&stages) {
            let run = runs.get(run).ok_or_else(|| corrupt(format!("claimed a stage of missing run {run}")))?;
            let was = if taken_over.contains(&(run.id.to_string(), stage.key.clone())) { "running" } else { "queued" };
            events.extend(pond_core::events::claimed(run, stage, queued_runs.remove(&run.id.to_string()), was, at));
        }
        let mut claims = Vec::with_capacity(stages.len());
        for (run, stage) in run_ids.into_iter().zip(stages) {
            let run =
                runs.get(&run).cloned().ok_or_else(|| corrupt(format!("claimed a stage of missing run {run}")))?;
            claims.push(Claim { run, stage });
        }
        // The events and the stages' started lines in one statement.
        let lines: Vec<(RunId, NewLogLine)> = match line {
            Some(line) => claims.iter().filter_map(|c| line(c).map(|l| (c.run.id, l))).collect(),
            None => Vec::new(),
        };
        let lines: Vec<(RunId, &NewLogLine)> = lines.iter().map(|(id, l)| (*id, l)).collect();
        write_changes(&mut tx, &Rows::default(), &lines, &events).await?;
        tx.commit().await?;
        Ok(claims)
    }

    async fn insert_logs(&self, lines: &[(RunId, &NewLogLine)]) -> Result<(), StoreError> {
        if lines.is_empty() {
            return Ok(());
        }
        // One statement, its own transaction.
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        write_changes(&mut conn, &Rows::default(), lines, &[]).await.map_err(Fail::into_store)
    }
}

/// Writes runs' changed rows, log lines and events in one statement (see [`Changes`]). Log
/// positions come from each run's counter row, locked until commit and taken in run id order
/// so concurrent writers cannot deadlock; events get their positions after commit.
async fn write_changes(
    conn: &mut PgConnection,
    rows: &Rows<'_>,
    lines: &[(RunId, &NewLogLine)],
    events: &[pond_core::events::NewEvent],
) -> Result<(), Fail> {
    let changes = Changes::of(rows, lines, events)?;
    if changes.is_empty() {
        return Ok(());
    }
    let sql = changes.sql();
    changes.bind(sqlx::query(&sql)).execute(&mut *conn).await?;
    Ok(())
}

/// Loads runs with their stages and attempts, one statement for the lot (one snapshot, so a
/// run is never shown with stages of another moment); with `lock`, the stages and then the
/// runs are locked, in id order — the order every writer takes them — and their attempts read
/// after (two statements). (The three tables' rows
/// come back as `to_jsonb` objects, tagged by table; `UNION ALL` reads its branches in order,
/// so the stage rows are locked before the run rows.) Runs that do not exist are left out.
async fn load_snapshots(conn: &mut PgConnection, ids: &[RunId], lock: bool) -> Result<Vec<RunSnapshot>, Fail> {
    let keys: Vec<String> = ids.iter().map(RunId::to_string).collect();
    let lock_clause = if lock { " FOR UPDATE" } else { "" };
    // Locked, the attempts are read by a second statement, once the locks are held: the first
    // statement's snapshot is taken before it waits for a lock, and only its locked rows are
    // re-read at their newest when the holder commits — its attempts would be the older ones.
    let attempts_part =
        if lock { "" } else { " UNION ALL SELECT 2, to_jsonb(a) FROM attempts a WHERE a.run_id = ANY($1)" };
    let sql = format!(
        "WITH s AS (SELECT * FROM stages WHERE run_id = ANY($1) ORDER BY run_id, position{lock_clause}),
              r AS (SELECT * FROM runs WHERE id = ANY($1) ORDER BY id{lock_clause})
         SELECT 0 AS part, to_jsonb(s) AS row FROM s
         UNION ALL SELECT 1, to_jsonb(r) FROM r{attempts_part}"
    );
    let mut rows: Vec<(i32, sqlx::types::Json<serde_json::Map<String, serde_json::Value>>)> =
        sqlx::query_as(&sql).bind(&keys).fetch_all(&mut *conn).await?;
    if lock {
        let attempt_rows: Vec<(i32, sqlx::types::Json<serde_json::Map<String, serde_json::Value>>)> =
            sqlx::query_as("SELECT 2, to_jsonb(a) FROM attempts a WHERE a.run_id = ANY($1)")
                .bind(&keys)
                .fetch_all(&mut *conn)
                .await?;
        rows.extend(attempt_rows);
    }
    let (mut runs, mut stages, mut attempts) = (Vec::new(), Vec::new(), Vec::new());
    for (part, sqlx::types::Json(row)) in &rows {
        match part {
            0 => stages.push((row.parsed::<RunId>("run_id")?, row.int("position")?, stage_from_row(row)?)),
            1 => runs.push(run_from_row(row)?),
            _ => attempts.push((row.parsed::<RunId>("run_id")?, attempt_from_row(row)?)),
        }
    }
    // The order the snapshots keep: runs by id, stages by position, attempts as they started.
    runs.sort_by_key(|r| r.id);
    stages.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    attempts.sort_by(|(ra, a), (rb, b)| {
        (ra, a.started_at, &a.stage_key, a.number).cmp(&(rb, b.started_at, &b.stage_key, b.number))
    });
    let stages = stages.into_iter().map(|(run, _, stage)| (run, stage)).collect();
    let mut snapshots = crate::batch::assemble(runs, stages, attempts);
    if !lock {
        // Every run has a stage: one read without any was being deleted (retention).
        snapshots.retain(|s| !s.stages.is_empty());
    }
    Ok(snapshots)
}

async fn load_snapshot(conn: &mut PgConnection, id: RunId, lock: bool) -> Result<Option<RunSnapshot>, Fail> {
    Ok(load_snapshots(conn, &[id], lock).await?.pop())
}

/// Inserts runs in one transaction (see [`crate::batch::group_commit`]): runs whose idempotency
/// key is taken are found after the commit (ON CONFLICT waited for the other submit to commit,
/// so its run is visible then).
async fn insert_batch(
    pool: &PgPool,
    snapshots: &[&RunSnapshot],
) -> Result<Vec<Result<InsertOutcome, StoreError>>, StoreError> {
    let mut tries = 0;
    let inserted = loop {
        match try_insert_batch(pool, snapshots).await {
            Err(f) if f.retryable() && tries < TX_TRIES => tries += 1,
            result => break result.map_err(Fail::into_store)?,
        }
    };
    let mut outcomes = Vec::with_capacity(snapshots.len());
    for snapshot in snapshots {
        if inserted.contains(&snapshot.run.id.to_string()) {
            outcomes.push(Ok(InsertOutcome::Created));
        } else {
            outcomes.push(existing_run(pool, &snapshot.run).await);
        }
    }
    Ok(outcomes)
}

/// The run stored under `run`'s idempotency key (its insert found the key taken).
async fn existing_run(pool: &PgPool, run: &Run) -> Result<InsertOutcome, StoreError> {
    let existing: String = sqlx::query_scalar("SELECT id FROM runs WHERE project_id = $1 AND idempotency_key = $2")
        .bind(&run.project_id)
        .bind(&run.idempotency_key)
        .fetch_one(pool)
        .await
        .map_err(db_err)?;
    let existing = RunId::from_str(&existing).map_err(corrupt)?;
    let mut conn = pool.acquire().await.map_err(db_err)?;
    let found = load_snapshot(&mut conn, existing, false).await.map_err(Fail::into_store)?;
    Ok(InsertOutcome::Existing(Box::new(found.ok_or_else(|| corrupt("idempotent run vanished"))?)))
}

async fn try_insert_batch(
    pool: &PgPool,
    snapshots: &[&RunSnapshot],
) -> Result<std::collections::HashSet<String>, Fail> {
    // A new run has no attempts yet (the engine submits it queued); the statement writes none.
    if let Some(s) = snapshots.iter().find(|s| !s.attempts.is_empty()) {
        return Err(Fail::Store(StoreError::Backend(format!("run {} was submitted with attempts", s.run.id))));
    }
    let runs: Vec<&Run> = snapshots.iter().map(|s| &s.run).collect();
    let runs = RunArrays::of(&runs)?;
    let stages: Vec<(RunId, &Stage)> =
        snapshots.iter().flat_map(|s| s.stages.iter().map(|stage| (s.run.id, stage))).collect();
    let stages = StageArrays::of(&stages);
    let at = crate::wall_clock();
    let events: Vec<_> = snapshots.iter().flat_map(|s| pond_core::events::changes(None, s, at)).collect();
    let events = EventArrays::of(&events);
    // One statement, so one implicit transaction: a batch costs a round trip (and the pool's
    // check of the connection), not a BEGIN, three inserts and a COMMIT.
    let sql = insert_runs_statement();
    let query = events.bind(stages.bind(runs.bind(sqlx::query(&sql))));
    let inserted: Vec<String> =
        query.fetch_all(pool).await?.iter().map(|row| row.try_get(0)).collect::<Result<_, _>>()?;
    Ok(inserted.into_iter().collect())
}

/// Appends leaves in one transaction, in order, after the log's last: appends from several
/// nodes take turns on the table lock (reads are not blocked), so indices have no gaps and no
/// duplicates. Returns each leaf's index.
async fn append_leaves(pool: &PgPool, leaves: &[&NewLeaf]) -> Result<Vec<u64>, StoreError> {
    let runs: Vec<String> = leaves.iter().map(|l| l.run.to_string()).collect();
    let texts: Vec<&str> = leaves.iter().map(|l| l.leaf.as_str()).collect();
    let hashes: Vec<&[u8]> = leaves.iter().map(|l| l.hash.as_slice()).collect();
    let ats: Vec<i64> = leaves.iter().map(|l| l.at.as_millis()).collect();
    let mut tx = pool.begin().await.map_err(db_err)?;
    sqlx::query("LOCK TABLE transparency_log IN EXCLUSIVE MODE").execute(&mut *tx).await.map_err(db_err)?;
    // The n-th leaf of the batch goes n - 1 after the log's end, so the indices, sorted, are
    // the leaves' in order.
    let mut indices: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO transparency_log (idx, run_id, leaf, leaf_hash, created_at)
         SELECT (SELECT COALESCE(MAX(idx) + 1, 0) FROM transparency_log) + u.n - 1, u.run_id, u.leaf, u.hash, u.at
           FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BYTEA[], $4::BIGINT[]) WITH ORDINALITY AS u(run_id, leaf, hash, at, n)
         RETURNING idx",
    )
    .bind(&runs)
    .bind(&texts)
    .bind(&hashes)
    .bind(&ats)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    indices.sort_unstable();
    Ok(indices.into_iter().map(|i| i as u64).collect())
}

#[async_trait]
impl Store for PgStore {
    async fn insert_run(&self, snapshot: &RunSnapshot) -> Result<InsertOutcome, StoreError> {
        queue_write(&self.inserts, snapshot.clone(), "PostgreSQL insert").await?
    }

    async fn get_run(&self, id: RunId) -> Result<Option<RunSnapshot>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        load_snapshot(&mut conn, id, false).await.map_err(Fail::into_store)
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<Vec<Run>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM runs
              WHERE ($1::TEXT[] IS NULL OR project_id = ANY($1))
                AND ($2::TEXT IS NULL OR state = $2)
                AND ($3::TEXT IS NULL OR id < $3)
                AND ($5::TEXT IS NULL OR id LIKE $5 OR lower(idempotency_key COLLATE \"C\") LIKE $5
                     OR lower(error COLLATE \"C\") LIKE $5 OR lower(definition COLLATE \"C\") LIKE $5)
              ORDER BY id DESC LIMIT $4",
        )
        .bind(query.projects.as_ref())
        .bind(query.state.map(|s| s.as_str()))
        .bind(query.before.map(|b| b.to_string()))
        .bind(query.limit as i64)
        // LIKE's default escape character is `\`, as the pattern assumes. ASCII letters match
        // in either case, as on SQLite: `lower()` under the "C" collation folds only those, and
        // scans 100k definitions in a third of the time of `ILIKE` or a locale's `lower()`
        // (39 against 95 and 87 ms). Ids are lowercase already.
        .bind(query.like_pattern().map(|p| p.to_ascii_lowercase()))
        // A search is planned with its pattern (an unnamed statement), not a generic plan made
        // for any pattern.
        .persistent(query.text.is_none())
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(run_from_row).collect()
    }

    async fn update_run(&self, id: RunId, mutate: RunMutation<'_>) -> Result<RunSnapshot, StoreError> {
        let mut changes = [(id, mutate)];
        self.update_runs(&mut changes).await.pop().unwrap_or_else(|| Err(StoreError::NotFound(format!("run {id}"))))
    }

    async fn update_runs(&self, changes: &mut [(RunId, RunMutation<'_>)]) -> Vec<Result<RunSnapshot, StoreError>> {
        let mut tries = 0;
        let failed = loop {
            match self.try_update_runs(changes).await {
                Ok(results) => return results,
                Err(f) if f.retryable() && tries < TX_TRIES => tries += 1,
                Err(f) => break f.into_store(),
            }
        };
        if changes.len() == 1 {
            return vec![Err(failed)];
        }
        // A failed batch: each item on its own, so one cannot fail the others.
        let mut results = Vec::with_capacity(changes.len());
        for one in changes.chunks_mut(1) {
            results.extend(self.update_runs(one).await);
        }
        results
    }

    async fn claim_stages(&self, query: &ClaimQuery) -> Result<Vec<Claim>, StoreError> {
        if query.kinds.is_empty() || query.limit == 0 {
            return Ok(Vec::new());
        }
        self.claim(query, None).await
    }

    async fn claim_stages_logged(&self, query: &ClaimQuery, line: ClaimLine<'_>) -> Result<Vec<Claim>, StoreError> {
        if query.kinds.is_empty() || query.limit == 0 {
            return Ok(Vec::new());
        }
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
        let cancel: Option<bool> = sqlx::query_scalar(
            "UPDATE stages SET lease_expires_at = $1
              WHERE run_id = $2 AND key = $3 AND attempt = $4 AND lease_owner = $5 AND state = 'running'
              RETURNING cancel_requested",
        )
        .bind(until.as_millis())
        .bind(run.to_string())
        .bind(stage)
        .bind(attempt as i64)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(match cancel {
            Some(cancel_requested) => LeaseStatus::Held { cancel_requested },
            None => LeaseStatus::Lost,
        })
    }

    async fn stage_counts(&self, now: Timestamp) -> Result<Vec<pond_core::store::StageCount>, StoreError> {
        let rows: Vec<(String, bool, bool, i64)> = sqlx::query_as(
            "SELECT state, pool_tags IS NOT NULL AS pooled, (state = 'queued' AND ready_at IS NOT NULL AND ready_at <= $1) AS ready, COUNT(*)
               FROM stages WHERE state IN ('queued', 'running')
              GROUP BY 1, 2, 3",
        )
        .bind(now.as_millis())
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(crate::rows::stage_counts(rows))
    }

    async fn runs_to_reap(&self, now: Timestamp, limit: u32) -> Result<Vec<RunId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT run_id FROM stages
              WHERE state = 'running' AND lease_expires_at <= $1 AND (cancel_requested OR lost_leases > $2)
              LIMIT $3",
        )
        .bind(now.as_millis())
        .bind(MAX_LOST_LEASES as i64)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        ids.iter().map(|s| RunId::from_str(s).map_err(corrupt)).collect()
    }

    async fn expire_all_leases(&self, now: Timestamp) -> Result<u64, StoreError> {
        let done =
            sqlx::query("UPDATE stages SET lease_expires_at = $1 WHERE state = 'running' AND executor_kind <> 'pool'")
                .bind(now.as_millis())
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn list_blobs(&self, after: Option<BlobId>, limit: u32) -> Result<Vec<BlobMeta>, StoreError> {
        let rows = sqlx::query("SELECT * FROM blobs WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after.map(|a| a.to_string()).unwrap_or_default())
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(blob_from_row).collect()
    }

    async fn replace_blob(&self, id: BlobId, expected_sha256: &str, data: &[u8]) -> Result<bool, StoreError> {
        let id = id.to_string();
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let updated = sqlx::query("UPDATE blobs SET size = $1, sha256 = $2 WHERE id = $3 AND sha256 = $4")
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
        sqlx::query("DELETE FROM blob_chunks WHERE blob_id = $1").bind(&id).execute(&mut *tx).await.map_err(db_err)?;
        insert_chunks(&mut tx, &id, data).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    async fn delete_blob(&self, id: BlobId) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // The blob's row first, then its chunks: the order `replace_blob` takes them in, so the
        // two never wait on each other crosswise.
        for sql in [
            "SELECT 1 FROM blobs WHERE id = $1 FOR UPDATE",
            "DELETE FROM blob_chunks WHERE blob_id = $1",
            "DELETE FROM blobs WHERE id = $1",
        ] {
            sqlx::query(sql).bind(id.to_string()).execute(&mut *tx).await.map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    async fn finished_runs(&self, finished_before: Timestamp, limit: u32) -> Result<Vec<RunId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM runs WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < $1
              ORDER BY finished_at LIMIT $2",
        )
        .bind(finished_before.as_millis())
        .bind(limit as i64)
        .fetch_all(&self.pool)
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
        // The log and the artifacts' chunks first, in slices (each its own statement): no one
        // transaction holds the run long or writes a burst of WAL.
        let slices = [
            "DELETE FROM logs WHERE run_id = $1 AND seq IN (SELECT seq FROM logs WHERE run_id = $1 LIMIT 5000)
               AND EXISTS (SELECT 1 FROM runs WHERE id = $1 AND state IN ('succeeded', 'failed', 'cancelled') AND finished_at < $2)",
            "DELETE FROM blob_chunks c USING (SELECT c2.blob_id, c2.idx FROM blob_chunks c2 JOIN artifacts a ON a.blob_id = c2.blob_id
                 WHERE a.run_id = $1 LIMIT 64) s
               WHERE c.blob_id = s.blob_id AND c.idx = s.idx
                 AND EXISTS (SELECT 1 FROM runs WHERE id = $1 AND state IN ('succeeded', 'failed', 'cancelled') AND finished_at < $2)",
        ];
        for slice in slices {
            loop {
                let done = sqlx::query(slice)
                    .bind(&id)
                    .bind(finished_before.as_millis())
                    .execute(&self.pool)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                if done == 0 {
                    break;
                }
            }
        }
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // Locked as every writer locks a run: its stage rows, then the run row.
        let Some(snapshot) = load_snapshot(&mut tx, run, true).await.map_err(Fail::into_store)? else {
            return Ok(None);
        };
        if !snapshot.run.state.is_terminal() || snapshot.run.finished_at.is_none_or(|t| t >= finished_before) {
            return Ok(None);
        }
        let blobs: Vec<String> = sqlx::query_scalar("SELECT DISTINCT blob_id FROM artifacts WHERE run_id = $1")
            .bind(&id)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        for sql in [
            "DELETE FROM logs WHERE run_id = $1",
            "DELETE FROM log_counters WHERE run_id = $1",
            "DELETE FROM attempts WHERE run_id = $1",
            "DELETE FROM stages WHERE run_id = $1",
            "DELETE FROM artifacts WHERE run_id = $1",
            "DELETE FROM runs WHERE id = $1",
        ] {
            sqlx::query(sql).bind(&id).execute(&mut *tx).await.map_err(db_err)?;
        }
        // Blobs no remaining artifact holds.
        sqlx::query(
            "WITH gone AS (SELECT b FROM UNNEST($1::TEXT[]) b WHERE NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.blob_id = b))
             , chunks AS (DELETE FROM blob_chunks WHERE blob_id IN (SELECT b FROM gone))
             DELETE FROM blobs WHERE id IN (SELECT b FROM gone)",
        )
        .bind(&blobs)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(Some(snapshot))
    }

    async fn read_events(
        &self,
        after: i64,
        projects: Option<&[String]>,
        limit: u32,
    ) -> Result<Vec<pond_core::events::Event>, StoreError> {
        self.sequence_events(false).await?;
        let rows = sqlx::query(
            "SELECT * FROM events WHERE seq > $1 AND ($2::TEXT[] IS NULL OR project_id = ANY($2)) ORDER BY seq LIMIT $3",
        )
        .bind(after)
        .bind(projects)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(crate::rows::event_from_row).collect()
    }

    async fn last_event_seq(&self) -> Result<i64, StoreError> {
        self.sequence_events(true).await?;
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM events").fetch_one(&self.pool).await.map_err(db_err)
    }

    async fn prune_events(&self, before: Timestamp, below: i64) -> Result<u64, StoreError> {
        self.sequence_events(true).await?;
        // The newest event always stays: positions continue from it. In slices, so no one
        // statement holds many rows.
        let mut total = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM events WHERE id IN (
                    SELECT id FROM events WHERE at < $1 AND seq < $2 AND seq < (SELECT MAX(seq) FROM events)
                     ORDER BY seq LIMIT 5000)",
            )
            .bind(before.as_millis())
            .bind(below)
            .execute(&self.pool)
            .await
            .map_err(db_err)?
            .rows_affected();
            total += done;
            if done < 5000 {
                return Ok(total);
            }
        }
    }

    async fn delete_record(&self, kind: &str, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM records WHERE kind = $1 AND key = $2")
            .bind(kind)
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn append_logs(&self, run: RunId, lines: &[NewLogLine]) -> Result<(), StoreError> {
        let lines: Vec<(RunId, &NewLogLine)> = lines.iter().map(|l| (run, l)).collect();
        self.insert_logs(&lines).await
    }

    async fn append_log_batch(&self, lines: &[(RunId, NewLogLine)]) -> Result<(), StoreError> {
        let lines: Vec<(RunId, &NewLogLine)> = lines.iter().map(|(r, l)| (*r, l)).collect();
        self.insert_logs(&lines).await
    }

    async fn read_logs(&self, run: RunId, after: i64, limit: u32) -> Result<Vec<LogLine>, StoreError> {
        sqlx::query("SELECT * FROM logs WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3")
            .bind(run.to_string())
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
            .iter()
            .map(log_from_row)
            .collect()
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
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        sqlx::query("INSERT INTO blobs (id, project_id, size, sha256, created_at) VALUES ($1, $2, $3, $4, $5)")
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
        let row = sqlx::query("SELECT * FROM blobs WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.as_ref().map(blob_from_row).transpose()
    }

    async fn read_blob_chunk(&self, id: BlobId, index: u64) -> Result<Vec<u8>, StoreError> {
        let data: Option<Vec<u8>> = sqlx::query_scalar("SELECT data FROM blob_chunks WHERE blob_id = $1 AND idx = $2")
            .bind(id.to_string())
            .bind(index as i64)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        data.ok_or_else(|| StoreError::NotFound(format!("blob {id} chunk {index}")))
    }

    async fn read_blob_prefix(&self, id: BlobId, len: usize) -> Result<Vec<u8>, StoreError> {
        let data: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT substring(data FROM 1 FOR $1) FROM blob_chunks WHERE blob_id = $2 AND idx = 0")
                .bind(len as i32)
                .bind(id.to_string())
                .fetch_optional(&self.pool)
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
        let leaf = NewLeaf { run, leaf: leaf.to_string(), hash: *leaf_hash, at };
        queue_write(&self.leaves, leaf, "transparency log").await?
    }

    async fn leaf_hashes(&self, from: u64, to: Option<u64>) -> Result<Vec<[u8; 32]>, StoreError> {
        let from = from.min(i64::MAX as u64) as i64;
        let to = to.map_or(i64::MAX, |t| t.min(i64::MAX as u64) as i64);
        let rows: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT leaf_hash FROM transparency_log WHERE idx >= $1 AND idx < $2 ORDER BY idx")
                .bind(from)
                .bind(to)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
        rows.into_iter().map(|h| crate::leaf_hash_of(&h)).collect()
    }

    async fn run_leaves(&self, run: RunId) -> Result<Vec<(u64, String)>, StoreError> {
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT idx, leaf FROM transparency_log WHERE run_id = $1 ORDER BY idx")
                .bind(run.to_string())
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
        Ok(rows.into_iter().map(|(i, l)| (i.max(0) as u64, l)).collect())
    }

    async fn leaves_of_runs(&self, runs: &[RunId]) -> Result<Vec<(RunId, u64, String)>, StoreError> {
        let keys: Vec<String> = runs.iter().map(RunId::to_string).collect();
        let rows: Vec<(String, i64, String)> =
            sqlx::query_as("SELECT run_id, idx, leaf FROM transparency_log WHERE run_id = ANY($1) ORDER BY idx")
                .bind(&keys)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
        rows.into_iter()
            .map(|(run, i, leaf)| Ok((RunId::from_str(&run).map_err(corrupt)?, i.max(0) as u64, leaf)))
            .collect()
    }

    async fn put_artifact(&self, a: &Artifact, holder: &str, run_cap: u64) -> Result<(), StoreError> {
        // The stage row is share-locked until the write commits: closing the attempt's output
        // (an UPDATE of that row) waits for writes under way, and refuses later ones. Then the
        // run row, so the run's artifact writes take turns and the cap's sum cannot be passed by
        // two at once. Stage before run, the order every run update takes them in (the other
        // order could deadlock with a completion holding the stages and waiting for the run).
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let open: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM stages WHERE run_id = $1 AND key = $2 AND attempt = $3 AND lease_owner = $4 AND state = 'running'
                AND (output_closed_attempt IS NULL OR output_closed_attempt <> attempt)
             FOR SHARE",
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
        sqlx::query("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE")
            .bind(a.run_id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
        let others: i64 =
            sqlx::query_scalar("SELECT COALESCE(SUM(size), 0)::BIGINT FROM artifacts WHERE run_id = $1 AND name <> $2")
                .bind(a.run_id.to_string())
                .bind(&a.name)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
        if (others.max(0) as u64).saturating_add(a.size) > run_cap {
            return Err(crate::over_cap(a, others.max(0) as u64, run_cap));
        }
        let replaced: Option<String> =
            sqlx::query_scalar("SELECT blob_id FROM artifacts WHERE run_id = $1 AND name = $2")
                .bind(a.run_id.to_string())
                .bind(&a.name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        let written = sqlx::query(
            "INSERT INTO artifacts (run_id, name, stage, attempt, blob_id, size, sha256, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (run_id, name) DO UPDATE SET attempt = EXCLUDED.attempt, blob_id = EXCLUDED.blob_id,
                size = EXCLUDED.size, sha256 = EXCLUDED.sha256, created_at = EXCLUDED.created_at
             WHERE artifacts.stage = EXCLUDED.stage",
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
            let owner: String = sqlx::query_scalar("SELECT stage FROM artifacts WHERE run_id = $1 AND name = $2")
                .bind(a.run_id.to_string())
                .bind(&a.name)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
            return Err(crate::name_taken(a, &owner));
        }
        // The replaced artifact's blob goes when nothing else holds it.
        if let Some(old) = replaced.filter(|old| *old != a.blob_id.to_string()) {
            sqlx::query(
                "WITH gone AS (SELECT $1::TEXT AS b WHERE NOT EXISTS (SELECT 1 FROM artifacts WHERE blob_id = $1))
                 , chunks AS (DELETE FROM blob_chunks WHERE blob_id IN (SELECT b FROM gone))
                 DELETE FROM blobs WHERE id IN (SELECT b FROM gone)",
            )
            .bind(&old)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }

    async fn close_output(&self, run: RunId, stage: &str, attempt: u32, holder: &str) -> Result<bool, StoreError> {
        let closed = sqlx::query(
            "UPDATE stages SET output_closed_attempt = attempt
              WHERE run_id = $1 AND key = $2 AND attempt = $3 AND lease_owner = $4 AND state = 'running'",
        )
        .bind(run.to_string())
        .bind(stage)
        .bind(attempt as i64)
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(closed.rows_affected() == 1)
    }

    async fn list_artifacts(&self, run: RunId) -> Result<Vec<Artifact>, StoreError> {
        sqlx::query("SELECT * FROM artifacts WHERE run_id = $1 ORDER BY name")
            .bind(run.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
            .iter()
            .map(artifact_from_row)
            .collect()
    }

    async fn get_artifact(&self, run: RunId, name: &str) -> Result<Option<Artifact>, StoreError> {
        let row = sqlx::query("SELECT * FROM artifacts WHERE run_id = $1 AND name = $2")
            .bind(run.to_string())
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.as_ref().map(artifact_from_row).transpose()
    }

    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tokens (id, name, role, projects, secret_sha256, created_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(t.id.to_string())
        .bind(&t.name)
        .bind(role_text(t.role))
        .bind(serde_json::to_string(&t.projects).map_err(corrupt)?)
        .bind(&t.secret_sha256)
        .bind(t.created_at.as_millis())
        .bind(ts(t.revoked_at))
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn insert_first_admin(&self, token: &TokenRecord) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // Serializes the check-then-insert across nodes starting at the same moment.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('pond.first_admin'))")
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let exists: Option<String> =
            sqlx::query_scalar("SELECT id FROM tokens WHERE role = 'admin' AND revoked_at IS NULL LIMIT 1")
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        if exists.is_some() {
            return Ok(false);
        }
        sqlx::query("INSERT INTO tokens (id, name, role, projects, secret_sha256, created_at) VALUES ($1, $2, 'admin', $3, $4, $5)")
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
        let row = sqlx::query("SELECT * FROM tokens WHERE secret_sha256 = $1")
            .bind(secret_sha256)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        sqlx::query("SELECT * FROM tokens ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
            .iter()
            .map(token_from_row)
            .collect()
    }

    async fn revoke_token(&self, id: TokenId, now: Timestamp) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
            .bind(now.as_millis())
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn get_record(&self, kind: &str, key: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT body FROM records WHERE kind = $1 AND key = $2")
            .bind(kind)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)
    }

    async fn list_records(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
        sqlx::query_as("SELECT key, body FROM records WHERE kind = $1 ORDER BY key")
            .bind(kind)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)
    }

    async fn put_record(&self, kind: &str, key: &str, body: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO records (kind, key, body) VALUES ($1, $2, $3)
             ON CONFLICT (kind, key) DO UPDATE SET body = excluded.body",
        )
        .bind(kind)
        .bind(key)
        .bind(body)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn swap_record(&self, kind: &str, key: &str, expected: Option<&str>, body: &str) -> Result<bool, StoreError> {
        let done = match expected {
            None => sqlx::query(
                "INSERT INTO records (kind, key, body) VALUES ($1, $2, $3) ON CONFLICT (kind, key) DO NOTHING",
            )
            .bind(kind)
            .bind(key)
            .bind(body),
            Some(old) => sqlx::query("UPDATE records SET body = $3 WHERE kind = $1 AND key = $2 AND body = $4")
                .bind(kind)
                .bind(key)
                .bind(body)
                .bind(old),
        }
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }
}

/// A blob's bytes as its chunk rows (an empty blob is one empty chunk).
async fn insert_chunks(tx: &mut sqlx::PgConnection, id: &str, data: &[u8]) -> Result<(), StoreError> {
    let chunks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(BLOB_CHUNK_BYTES).collect() };
    for (i, chunk) in chunks.into_iter().enumerate() {
        sqlx::query("INSERT INTO blob_chunks (blob_id, idx, data) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(i as i64)
            .bind(chunk)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
    }
    Ok(())
}
