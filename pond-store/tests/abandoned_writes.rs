//! A caller that gives up on a write — while the write lock is held elsewhere (a lease renewal
//! under a timeout), or at any point of its transaction — must not leave a store connection
//! unusable, nor inside a transaction that later writes would join and never commit.

use std::sync::Arc;
use std::time::Duration;

use pond_core::definition::Definition;
use pond_core::ids::RunId;
use pond_core::run::RunSnapshot;
use pond_core::store::Store;
use pond_core::time::Timestamp;
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_given_up_while_waiting_for_the_lock_leaves_the_writer_usable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pond.db");
    let store: Arc<dyn Store> = Arc::new(pond_store::SqliteStore::open(&path).await.unwrap());
    let now = Timestamp::from_millis(1_800_000_000_000);
    let definition: Definition =
        serde_json::from_value(serde_json::json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]})).unwrap();
    let run = RunSnapshot::new(RunId::generate(now), "p".into(), definition, vec![], None, now);
    store.insert_run(&run).await.unwrap();

    // Someone else holds SQLite's write lock for a while.
    let mut other = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut other).await.unwrap();
    // Writes given up while they wait for it (as a timed-out lease renewal is).
    for _ in 0..5 {
        let renew = store.renew_lease(run.run.id, "a", 1, "n", now);
        assert!(tokio::time::timeout(Duration::from_millis(20), renew).await.is_err(), "the write waited");
    }
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    drop(other);

    // The store writes again.
    let cancelled = tokio::time::timeout(
        Duration::from_secs(20),
        store.update_run(run.run.id, &mut |s| {
            s.cancel("stop", now);
            Ok(Vec::new())
        }),
    )
    .await
    .expect("the write finished")
    .expect("the writer is usable");
    assert!(cancelled.run.state.is_terminal());
}

/// Polls `write` at most `polls` times, `pause_us` apart (the SQLite worker thread runs
/// meanwhile), then drops it unfinished — a caller giving up at an arbitrary point.
async fn give_up_after<F: std::future::Future>(write: F, polls: usize, pause_us: u64) -> bool {
    let mut write = std::pin::pin!(write);
    for _ in 0..polls {
        if futures_util::poll!(write.as_mut()).is_ready() {
            return true;
        }
        std::thread::sleep(Duration::from_micros(pause_us));
    }
    false
}

/// Abandons writes at every point of their transaction — before, during and after `BEGIN` is
/// answered, mid-statement, during `COMMIT` — each followed by an autocommit write; answers how
/// many of those were acknowledged.
async fn abandon_writes(store: Arc<dyn Store>) -> i64 {
    let now = Timestamp::from_millis(1_800_000_000_000);
    let definition: Definition =
        serde_json::from_value(serde_json::json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]})).unwrap();
    let run = RunSnapshot::new(RunId::generate(now), "p".into(), definition, vec![], None, now);
    store.insert_run(&run).await.unwrap();
    let mut acknowledged = 0;
    for round in 0..600u64 {
        let (polls, pause) = (1 + (round % 6) as usize, round % 97);
        if round % 2 == 0 {
            give_up_after(store.renew_lease(run.run.id, "a", 1, "n", now), polls, pause).await;
        } else {
            let mut unchanged = |_: &mut RunSnapshot| Ok(Vec::new());
            give_up_after(store.update_run(run.run.id, &mut unchanged), polls, pause).await;
        }
        // An autocommit write right after: it must succeed, and be kept.
        tokio::time::timeout(Duration::from_secs(20), store.put_record("check", &format!("{round:04}"), "kept"))
            .await
            .expect("the write finished")
            .unwrap_or_else(|e| panic!("round {round}: the writer is unusable: {e}"));
        acknowledged += 1;
    }
    acknowledged
}

/// Writes abandoned at any point never leave a connection inside a transaction nobody holds:
/// every later write succeeds and every acknowledged write is durable (read back through a
/// connection of its own). Without the pools' check, 111 of 600 acknowledged writes were lost
/// here: they had joined a transaction whose `BEGIN` answer was dropped with its caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_abandoned_at_any_point_leave_later_writes_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pond.db");
    let store: Arc<dyn Store> = Arc::new(pond_store::SqliteStore::open(&path).await.unwrap());
    let acknowledged = abandon_writes(store.clone()).await;
    drop(store);
    let mut own = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.unwrap();
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM records WHERE kind = 'check'").fetch_one(&mut own).await.unwrap();
    assert_eq!(kept, acknowledged, "acknowledged writes lost");
}

/// The same on PostgreSQL (6 of 600 lost without the pool's check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_abandoned_at_any_point_leave_later_writes_durable_on_postgres() {
    let Ok(server) = std::env::var("POND_TEST_DATABASE_URL") else {
        pond_store::missing_prerequisite(
            "POND_TEST_DATABASE_URL is not set (a PostgreSQL server URL; .ci/run sets it)",
        );
        return;
    };
    let db = pond_store::ScratchDatabase::create(&server, "cancel").await.expect("create a scratch database");
    let store: Arc<dyn Store> = Arc::new(pond_store::PgStore::connect(&db.url, 4).await.unwrap());
    let acknowledged = abandon_writes(store.clone()).await;
    let mut own = sqlx::PgConnection::connect(&db.url).await.unwrap();
    // The check closes only connections left in a transaction: 200 writes that nobody abandons
    // open no session (a check that mistook every connection for a busy one — with the
    // extended protocol a statement's and its transaction's timestamps differ — opened one per
    // write).
    let version: i32 =
        sqlx::query_scalar("SELECT current_setting('server_version_num')::int").fetch_one(&mut own).await.unwrap();
    // Connections the rounds left in a transaction and still idle in the pool are replaced on
    // their next use: use each of the pool's four first.
    for i in 0..8 {
        store.put_record("warm", &format!("{i}"), "x").await.unwrap();
    }
    let sessions =
        || sqlx::query_scalar::<_, i64>("SELECT sessions FROM pg_stat_database WHERE datname = current_database()");
    // `sessions` is counted from PostgreSQL 14 on.
    let before = if version >= 140_000 { sessions().fetch_one(&mut own).await.unwrap() } else { 0 };
    for i in 0..200 {
        store.put_record("calm", &format!("{i:03}"), "kept").await.unwrap();
    }
    let after = if version >= 140_000 { sessions().fetch_one(&mut own).await.unwrap() } else { 0 };
    assert!(after - before <= 2, "{} sessions opened for 200 ordinary writes", after - before);
    drop(store);
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM records WHERE kind = 'check'").fetch_one(&mut own).await.unwrap();
    assert_eq!(kept, acknowledged, "acknowledged writes lost");
}
