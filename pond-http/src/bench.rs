//! The benchmark behind `pond bench`: submit throughput and end-to-end throughput of
//! one-stage `noop` runs, over real HTTP, with concurrent clients. A program, not a test.

use std::fmt;
use std::time::{Duration, Instant};

use crate::client::{Client, ClientError};

/// Figures of one benchmark.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Runs per phase.
    pub runs: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Phase 1: submits per second.
    pub submits_per_sec: f64,
    /// Phase 1: submit latency p50 / p99, ms.
    pub submit_ms: (f64, f64),
    /// Phase 2: runs submitted and completed per second.
    pub completed_per_sec: f64,
    /// Phase 2: submit → finished p50 / p99, ms (server timestamps).
    pub run_ms: (f64, f64),
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pond bench --runs {} --clients {}  (SQLite store, one-stage noop runs, HTTP on 127.0.0.1)",
            self.runs, self.clients
        )?;
        writeln!(
            f,
            "submit (POST /v1/runs):      {:>8.0} runs/s   latency p50 {:.1} ms, p99 {:.1} ms",
            self.submits_per_sec, self.submit_ms.0, self.submit_ms.1
        )?;
        write!(
            f,
            "end to end (submit→done):    {:>8.0} runs/s   latency p50 {:.1} ms, p99 {:.1} ms",
            self.completed_per_sec, self.run_ms.0, self.run_ms.1
        )
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn body() -> serde_json::Value {
    serde_json::json!({
        "project_id": "bench",
        "definition": {"stages": [{"key": "noop", "executor": {"kind": "noop"}}]}
    })
}

/// Submits `runs` runs from `clients` threads; returns ids and latencies (ms).
fn submit_all(client: &Client, runs: usize, clients: usize) -> Result<(Vec<String>, Vec<f64>, Duration), ClientError> {
    let started = Instant::now();
    let per = runs.div_ceil(clients.max(1));
    let results: Vec<Result<Vec<(String, f64)>, ClientError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients.max(1))
            .map(|c| {
                let client = client.clone();
                s.spawn(move || {
                    let mut out = Vec::with_capacity(per);
                    let b = body();
                    for _ in (c * per)..((c + 1) * per).min(runs) {
                        let t = Instant::now();
                        let run = client.submit(&b, None)?;
                        out.push((run.id.to_string(), t.elapsed().as_secs_f64() * 1000.0));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Ok(Vec::new()))).collect()
    });
    let elapsed = started.elapsed();
    let mut ids = Vec::with_capacity(runs);
    let mut latencies = Vec::with_capacity(runs);
    for r in results {
        for (id, ms) in r? {
            ids.push(id);
            latencies.push(ms);
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok((ids, latencies, elapsed))
}

/// Waits until every run has ended; returns submit→finish durations (ms), sorted.
fn wait_all(client: &Client, ids: &[String]) -> Result<Vec<f64>, ClientError> {
    let mut durations = Vec::with_capacity(ids.len());
    for id in ids {
        loop {
            let run = client.get_run(id)?;
            if run.state.is_terminal() {
                if let Some(done) = run.finished_at {
                    durations.push(done.since(run.created_at).0 as f64);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    durations.sort_by(f64::total_cmp);
    Ok(durations)
}

/// Runs both phases against the server behind `client`.
pub fn run(client: &Client, runs: usize, clients: usize) -> Result<BenchReport, ClientError> {
    let (ids, submit_lat, submit_time) = submit_all(client, runs, clients)?;
    wait_all(client, &ids)?;
    let started = Instant::now();
    let (ids, _, _) = submit_all(client, runs, clients)?;
    let run_lat = wait_all(client, &ids)?;
    let e2e = started.elapsed();
    Ok(BenchReport {
        runs,
        clients,
        submits_per_sec: runs as f64 / submit_time.as_secs_f64(),
        submit_ms: (percentile(&submit_lat, 0.5), percentile(&submit_lat, 0.99)),
        completed_per_sec: runs as f64 / e2e.as_secs_f64(),
        run_ms: (percentile(&run_lat, 0.5), percentile(&run_lat, 0.99)),
    })
}
