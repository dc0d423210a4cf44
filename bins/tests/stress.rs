//! The store's writer under busy concurrent output: 16 stages, each printing a line every 2 ms
//! for 8 s, on SQLite (one writer connection) and PostgreSQL, with a short lease. No stage may
//! lose its lease (a renewal stuck behind the stages' writes would), no write may answer 503,
//! and every line arrives.

mod common;

use std::time::{Duration, Instant};

use common::{wait_done, Server};
use serde_json::json;

fn busy_output(pg: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let db = pg.map(|url| common::scratch_database(url, "stress"));
    let mut args = vec!["--lease", "3s", "--slots", "16"];
    if let Some(db) = &db {
        args.extend(["--database-url", db.url.as_str()]);
    }
    let server = Server::start(dir.path(), &args);
    let admin = server.admin();
    let script = "i=0; while [ $i -lt 4000 ]; do echo \"line $i $(printf %080d 0)\"; i=$((i+1)); \
                  [ $((i % 10)) -eq 0 ] && sleep 0.02; done";
    let stages: Vec<_> = (0..16)
        .map(|i| json!({"key": format!("s{i}"), "needs": [], "executor": {"kind": "shell", "argv": ["sh", "-c", script]}}))
        .collect();
    let id = admin.submit(&common::run_json(json!({"stages": stages})), None).unwrap().id.to_string();
    // Meanwhile, writes and reads keep coming: none may be refused.
    let started = Instant::now();
    let mut writes = 0;
    while started.elapsed() < Duration::from_secs(60) {
        let run = admin.get_run(&id).expect("reading the run while stages print");
        if run.state.is_terminal() {
            break;
        }
        admin
            .submit(&common::run_json(json!({"stages": [{"key": "n", "executor": {"kind": "noop"}}]})), None)
            .expect("a submit while stages print");
        writes += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let run = wait_done(&admin, &id, Duration::from_secs(120));
    eprintln!("{} s, {writes} submits meanwhile", started.elapsed().as_secs());
    assert_eq!(run.state.as_str(), "succeeded", "{run:?}");
    for stage in &run.stages {
        assert_eq!(stage.attempts.len(), 1, "stage {} was re-claimed: {:?}", stage.key, stage.attempts);
    }
    let lines = common::log_text(&admin, &id).into_iter().filter(|l| l.starts_with("line ")).count();
    assert_eq!(lines, 16 * 4000);
}

#[test]
fn busy_concurrent_output_never_stalls_the_writer_on_sqlite() {
    busy_output(None);
}

#[test]
fn busy_concurrent_output_never_stalls_the_writer_on_postgres() {
    let Some(pg) = Server::database_server() else { return };
    busy_output(Some(&pg));
}
