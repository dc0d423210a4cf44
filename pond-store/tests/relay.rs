//! Waiting is event-driven across nodes: a write through one node's store wakes the waiters of
//! another node's store through LISTEN/NOTIFY (not through their fallback poll, which these
//! watchers do not have).

use std::sync::Arc;
use std::time::Duration;

use pond_core::ids::RunId;
use pond_core::run::RunSnapshot;
use pond_core::store::{LogStream, NewLogLine, Store};
use pond_core::time::Timestamp;
use pond_store::{PgStore, ScratchDatabase, WatchedStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_node_wakes_waiters_on_another() {
    let Ok(server) = std::env::var("POND_TEST_DATABASE_URL") else {
        pond_store::missing_prerequisite(
            "POND_TEST_DATABASE_URL is not set (a PostgreSQL server URL; .ci/run sets it)",
        );
        return;
    };
    let db = ScratchDatabase::create(&server, "relay").await.unwrap();
    let node = |name: &'static str| {
        let url = db.url.clone();
        async move {
            let pg = PgStore::connect(&url, 4).await.unwrap();
            let watched = Arc::new(WatchedStore::new(Arc::new(pg.clone())));
            let tasks = pg.relay_changes(watched.clone(), name.to_string());
            (watched, tasks)
        }
    };
    let (one, _one_tasks) = node("one").await;
    let (two, _two_tasks) = node("two").await;
    let mut runs_on_two = two.runs_changed();
    let mut output_on_two = two.output_changed();
    // Let both listeners connect (each announces once when it starts listening).
    tokio::time::sleep(Duration::from_millis(500)).await;
    runs_on_two.borrow_and_update();
    output_on_two.borrow_and_update();

    let now = Timestamp::from_millis(1_800_000_000_000);
    let definition =
        serde_json::from_value(serde_json::json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]})).unwrap();
    let run = RunSnapshot::new(RunId::generate(now), "p".into(), definition, vec![], None, now);
    one.insert_run(&run).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), runs_on_two.changed())
        .await
        .expect("node two woke for a run submitted on node one")
        .unwrap();

    output_on_two.borrow_and_update();
    let line = NewLogLine::text(None, 0, LogStream::Stdout, now, "hello".into());
    one.append_logs(run.run.id, &[line]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), output_on_two.changed())
        .await
        .expect("node two woke for a log line written on node one")
        .unwrap();
    assert_eq!(two.read_logs(run.run.id, 0, 10).await.unwrap()[0].line.text, "hello");
}
