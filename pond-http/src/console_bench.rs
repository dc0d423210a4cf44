//! What the console asks of the server: an in-process `pond server` (SQLite, or PostgreSQL) is
//! given `runs` finished runs (written straight to its store: 10 projects, 90 % succeeded, 8 %
//! failed, 2 % cancelled, one with a rare stage key), then each run-list request the console
//! makes is timed over loopback HTTP — the first page, a page deep in the cursor, state,
//! project (as a consumer key) and text filters. Times are at the client, so they include HTTP
//! on loopback: an upper bound on server time. The console's own file sizes are reported beside.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use pond_core::definition::Definition;
use pond_core::ids::RunId;
use pond_core::run::{RunSnapshot, RunState, StageState};
use pond_core::time::{Millis, Timestamp};

use crate::client::Client;

/// One timed request.
#[derive(Debug, Clone)]
pub struct ListTiming {
    /// What was asked (`GET /v1/runs?…`).
    pub what: String,
    /// Runs in the answer.
    pub rows: usize,
    /// p50 / p99 / max, ms.
    pub ms: (f64, f64, f64),
}

/// The figures.
#[derive(Debug, Clone)]
pub struct ConsoleBenchReport {
    /// Runs stored.
    pub runs: usize,
    /// Which store.
    pub store: &'static str,
    /// Seconds spent writing them.
    pub fill_secs: f64,
    /// Each request.
    pub timings: Vec<ListTiming>,
    /// The console's files: (name, bytes).
    pub assets: Vec<(&'static str, usize)>,
}

impl fmt::Display for ConsoleBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} finished runs on {} (written in {:.0} s); GET /v1/runs, 50 a page, timed at the client over loopback:",
            self.runs, self.store, self.fill_secs
        )?;
        for t in &self.timings {
            writeln!(
                f,
                "  {:<44} {:>3} rows   p50 {:>6.1} ms   p99 {:>6.1} ms   max {:>6.1} ms",
                t.what, t.rows, t.ms.0, t.ms.1, t.ms.2
            )?;
        }
        let own: usize = self.assets.iter().filter(|(n, _)| !n.starts_with("libsodium")).map(|(_, b)| b).sum();
        let sodium: usize = self.assets.iter().filter(|(n, _)| n.starts_with("libsodium")).map(|(_, b)| b).sum();
        let script_and_style: usize =
            self.assets.iter().filter(|(n, _)| n.ends_with(".js") || n.ends_with(".css")).map(|(_, b)| b).sum();
        write!(
            f,
            "console files: {own} bytes of its own ({script_and_style} of JavaScript and CSS: {}), \
             {sodium} bytes of vendored libsodium (loaded only for confidential runs)",
            self.assets
                .iter()
                .filter(|(n, _)| !n.starts_with("libsodium"))
                .map(|(n, b)| format!("{n} {b}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

fn percentiles(mut samples: Vec<f64>) -> (f64, f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| samples.get(((samples.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
    (at(0.5), at(0.99), samples.last().copied().unwrap_or(0.0))
}

/// A finished run of project `p<i % 10>`, created `i` ms after `t0`.
fn finished_run(i: usize, t0: Timestamp, rare: bool) -> Result<RunSnapshot, String> {
    let key = if rare { "needle-zz9" } else { "build" };
    let definition: Definition = serde_json::from_value(serde_json::json!({"stages": [
        {"key": key, "executor": {"kind": "shell", "argv": ["make", "check"]}},
        {"key": "test", "executor": {"kind": "noop"}}
    ]}))
    .map_err(|e| e.to_string())?;
    let created = t0.plus(Millis(i as u64));
    let mut snapshot =
        RunSnapshot::new(RunId::generate(created), format!("p{}", i % 10), definition, vec![], None, created);
    let (run_state, stage_state) = match i % 50 {
        0 => (RunState::Cancelled, StageState::Cancelled),
        1..=4 => (RunState::Failed, StageState::Failed),
        _ => (RunState::Succeeded, StageState::Succeeded),
    };
    let ended = created.plus(Millis(40));
    snapshot.run.state = run_state;
    snapshot.run.started_at = Some(created);
    snapshot.run.finished_at = Some(ended);
    if run_state == RunState::Failed {
        snapshot.run.error = Some(format!("stage `{key}` failed: exited with code 2"));
    }
    for stage in &mut snapshot.stages {
        stage.state = stage_state;
        stage.finished_at = Some(ended);
    }
    Ok(snapshot)
}

/// Runs the benchmark; `data_dir` is removed first.
pub async fn run(
    data_dir: &std::path::Path,
    sandbox: Arc<dyn pond_core::sandbox::SandboxBackend>,
    database_url: Option<String>,
    runs: usize,
    samples: usize,
) -> Result<ConsoleBenchReport, String> {
    let _ = std::fs::remove_dir_all(data_dir);
    let store_name = if database_url.is_some() { "PostgreSQL" } else { "SQLite" };
    let mut config = crate::server::ServerConfig::new(data_dir.to_path_buf(), sandbox);
    config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.database_url = database_url;
    let server = crate::server::start(config).await.map_err(|e| e.to_string())?;
    let token = std::fs::read_to_string(&server.admin_token_file).map_err(|e| e.to_string())?.trim().to_string();
    let url = server.url();

    // Fill: 8 writers, a run per transaction, as submits write them.
    let started = Instant::now();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    let t0 = Timestamp::from_millis((now as i64).saturating_sub(runs as i64 + 86_400_000));
    let store = server.engine.store().clone();
    let mut writers = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut i = w;
            while i < runs {
                let run = finished_run(i, t0, i == runs / 3)?;
                store.insert_run(&run).await.map_err(|e| e.to_string())?;
                i += 8;
            }
            Ok::<(), String>(())
        }));
    }
    for w in writers {
        w.await.map_err(|e| e.to_string())??;
    }
    let fill_secs = started.elapsed().as_secs_f64();

    let result = tokio::task::spawn_blocking(move || -> Result<Vec<ListTiming>, String> {
        let admin = Client::new(&url, Some(token));
        let consumer_key = admin.create_key(&["p3".to_string()], Some("bench-consumer")).map_err(|e| e.to_string())?;
        let consumer = Client::new(&url, consumer_key.token);
        // A cursor half way down: walk there with large pages (not timed).
        let mut cursor = None;
        let mut seen = 0;
        while seen < runs / 2 {
            let page = admin.list_runs(None, None, Some(1000), cursor.as_deref()).map_err(|e| e.to_string())?;
            seen += page.runs.len();
            match page.next_cursor {
                Some(next) => cursor = Some(next.to_string()),
                None => break,
            }
        }
        let deep = cursor.unwrap_or_default();
        let cases: Vec<(String, &Client, String)> = vec![
            ("first page".into(), &admin, "/v1/runs".into()),
            (format!("page after {seen} runs (cursor)"), &admin, format!("/v1/runs?cursor={deep}")),
            ("state=failed (8 %)".into(), &admin, "/v1/runs?state=failed".into()),
            ("state=cancelled (2 %)".into(), &admin, "/v1/runs?state=cancelled".into()),
            ("consumer key of one project (10 %)".into(), &consumer, "/v1/runs".into()),
            ("text=build (every run)".into(), &admin, "/v1/runs?text=build".into()),
            ("text=needle-zz9 (one run: a full scan)".into(), &admin, "/v1/runs?text=needle-zz9".into()),
        ];
        let mut timings = Vec::new();
        for (what, client, path) in cases {
            let mut times = Vec::with_capacity(samples);
            let mut rows = 0;
            for _ in 0..samples {
                let start = Instant::now();
                let page: crate::wire::RunPage =
                    client.json(client.request("GET", &path), None).map_err(|e| format!("{what}: {e}"))?;
                times.push(start.elapsed().as_secs_f64() * 1000.0);
                rows = page.runs.len();
            }
            timings.push(ListTiming { what, rows, ms: percentiles(times) });
        }
        Ok(timings)
    })
    .await
    .map_err(|e| e.to_string())?;
    server.shutdown().await;
    Ok(ConsoleBenchReport {
        runs,
        store: store_name,
        fill_secs,
        timings: result?,
        assets: crate::console::asset_sizes(),
    })
}
