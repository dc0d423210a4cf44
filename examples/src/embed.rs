//! Embedding pond in-process: the engine with the SQLite store and the local executors, no
//! HTTP. It runs the repository-analysis workflow over a directory and prints the logs and the
//! repository map.
//!
//! ```text
//! cargo run -p pond-examples --bin embed -- [DIRECTORY]
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pond_core::definition::parse_definition;
use pond_core::engine::{Engine, EngineConfig, SubmitRequest};
use pond_core::source::{SourceInput, SourcePolicy};
use pond_core::store::{read_blob, Store};
use pond_core::time::SystemClock;
use pond_exec::{BuiltinExecutor, Driver, DriverConfig, FetchConfig, LocalWorkspaces, NoopExecutor};
use pond_store::{SqliteStore, WatchedStore};

#[tokio::main]
async fn main() -> Result<()> {
    let repo = match std::env::args().nth(1) {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("repo"),
    };
    let repo = repo.canonicalize().with_context(|| format!("{} is not a directory", repo.display()))?;
    let data = std::env::temp_dir().join(format!("pond-embed-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;

    // The store: one SQLite file, wrapped so the driver wakes on changes.
    let sqlite = SqliteStore::open(&data.join("pond.db")).await?;
    let store = Arc::new(WatchedStore::new(Arc::new(sqlite)));
    // Checkouts: `local` sources are allowed under the repository's parent directory only (the
    // engine checks the path as written at submit, the workspaces the resolved one at fetch).
    let roots = vec![repo.parent().unwrap_or(&repo).to_path_buf()];
    let fetch = FetchConfig { local_roots: roots.clone(), ..FetchConfig::default() };
    let workspaces = LocalWorkspaces::new(data.join("checkouts"), store.clone(), fetch)?;
    let config = EngineConfig {
        node_id: "embedded".into(),
        source_policy: SourcePolicy { local_roots: roots, ..Default::default() },
        ..Default::default()
    };
    let engine = Arc::new(
        Engine::new(store.clone(), Arc::new(SystemClock), Arc::new(workspaces), config)
            .with_executor(Arc::new(NoopExecutor))
            .with_executor(Arc::new(BuiltinExecutor)),
    );
    let driver = Driver::new(engine.clone(), DriverConfig::default(), store.runs_changed());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let driving = tokio::spawn(driver.run(stopped, Duration::from_secs(5)));

    let definition = parse_definition(
        serde_json::json!({"stages": [
            {"key": "map", "executor": {"kind": "builtin", "name": "repo_map"}},
            {"key": "todos", "executor": {"kind": "builtin", "name": "todo_scan"}, "needs": []},
            {"key": "done", "executor": {"kind": "noop"}, "needs": ["map", "todos"]}
        ]}),
        "definition",
    )?;
    let source: SourceInput = serde_json::from_value(serde_json::json!({"kind": "local", "config": {"path": repo}}))?;
    let submitted = engine
        .submit(SubmitRequest {
            project_id: "embedded".into(),
            definition,
            sources: vec![source],
            idempotency_key: None,
            recipients: vec![],
            signed: None,
        })
        .await?;
    let id = submitted.snapshot.run.id;
    println!("run {id} on {}", repo.display());

    let mut changes = store.runs_changed();
    let run = loop {
        let snapshot = engine.get(id).await?;
        if snapshot.run.state.is_terminal() {
            break snapshot;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    };
    for line in store.read_logs(id, 0, 1000).await? {
        println!("  {}", line.line.text);
    }
    println!("state: {}", run.run.state);
    let map = store.get_artifact(id, "areas.jsonl").await?.context("no areas.jsonl")?;
    let blob = store.blob_meta(map.blob_id).await?.context("no blob")?;
    print!("{}", String::from_utf8_lossy(&read_blob(&*store, &blob).await?));

    let _ = stop.send(true);
    driving.await?;
    std::fs::remove_dir_all(&data).ok();
    if !matches!(run.run.state, pond_core::run::RunState::Succeeded) {
        bail!("run ended {}", run.run.state);
    }
    Ok(())
}
