//! A caller that gives up on a SQLite write while the write lock is held elsewhere (a lease
//! renewal under a timeout) must not leave the store's one writer connection unusable.

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
