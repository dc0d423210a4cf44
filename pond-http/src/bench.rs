//! The benchmark behind `pond bench`: submit throughput and end-to-end throughput of
//! one-stage `noop` runs, over real HTTP, with concurrent clients. A program, not a test.

use std::fmt;
use std::time::{Duration, Instant};

use crate::client::{Client, ClientError};

/// Figures of one benchmark.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// What the servers ran on (`SQLite`, `PostgreSQL, 3 nodes`).
    pub setup: String,
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
            "runs {} clients {}  ({}, one-stage noop runs, HTTP on 127.0.0.1)",
            self.runs, self.clients, self.setup
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

/// Submits `runs` runs from `clients` threads spread over the nodes; returns ids and latencies (ms).
fn submit_all(nodes: &[Client], runs: usize, clients: usize) -> Result<(Vec<String>, Vec<f64>, Duration), ClientError> {
    let started = Instant::now();
    let per = runs.div_ceil(clients.max(1));
    let results: Vec<Result<Vec<(String, f64)>, ClientError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients.max(1))
            .map(|c| {
                let client = nodes[c % nodes.len()].clone();
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

/// Waits until every run has ended; returns submit→finish durations (ms), sorted. Runs finish
/// roughly in submit order, so it waits on the last one first (polling every 20 ms, to keep the
/// benchmark's own reads from loading the server), then reads each run once.
fn wait_all(client: &Client, ids: &[String]) -> Result<Vec<f64>, ClientError> {
    let mut durations = Vec::with_capacity(ids.len());
    for id in ids.iter().rev().take(1).chain(ids.iter()) {
        loop {
            let run = client.get_run(id)?;
            if run.state.is_terminal() {
                if let Some(done) = run.finished_at {
                    durations.push(done.since(run.created_at).0 as f64);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if !ids.is_empty() {
        durations.remove(0);
    }
    durations.sort_by(f64::total_cmp);
    Ok(durations)
}

/// Runs both phases against the servers behind `nodes` (clients spread over them).
pub fn run(nodes: &[Client], setup: &str, runs: usize, clients: usize) -> Result<BenchReport, ClientError> {
    let (ids, submit_lat, submit_time) = submit_all(nodes, runs, clients)?;
    wait_all(&nodes[0], &ids)?;
    let started = Instant::now();
    let (ids, _, _) = submit_all(nodes, runs, clients)?;
    let run_lat = wait_all(&nodes[0], &ids)?;
    let e2e = started.elapsed();
    Ok(BenchReport {
        setup: setup.to_string(),
        runs,
        clients,
        submits_per_sec: runs as f64 / submit_time.as_secs_f64(),
        submit_ms: (percentile(&submit_lat, 0.5), percentile(&submit_lat, 0.99)),
        completed_per_sec: runs as f64 / e2e.as_secs_f64(),
        run_ms: (percentile(&run_lat, 0.5), percentile(&run_lat, 0.99)),
    })
}

/// Claim latency on PostgreSQL with `queued` ready stages waiting: one claimer taking one stage
/// at a time, as a driver with one free slot does.
#[derive(Debug, Clone)]
pub struct ClaimReport {
    /// Stages queued before the first claim.
    pub queued: u64,
    /// Claims measured.
    pub claims: usize,
    /// p50 / p99 latency, ms.
    pub latency_ms: (f64, f64),
    /// Claims per second, one claimer.
    pub per_sec: f64,
}

impl fmt::Display for ClaimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "claim with {:>7} queued: p50 {:.2} ms, p99 {:.2} ms, {:.0} claims/s ({} claims, one claimer)",
            self.queued, self.latency_ms.0, self.latency_ms.1, self.per_sec, self.claims
        )
    }
}

/// Seeds `queued` ready stages into a scratch database on `server_url` and times claims.
pub async fn claim_latency(server_url: &str, queued: u64) -> Result<ClaimReport, pond_core::StoreError> {
    use pond_core::store::{ClaimQuery, Store};
    use pond_core::time::{Clock, Millis, SystemClock};
    let db = pond_store::ScratchDatabase::create(server_url, "bench_claims").await?;
    let store = pond_store::PgStore::connect(&db.url, 4).await?;
    let now = SystemClock.now();
    store.seed_queued_runs(queued, now).await?;
    let claims = (queued as usize / 2).min(2000);
    let mut latencies = Vec::with_capacity(claims);
    let started = Instant::now();
    for _ in 0..claims {
        let now = SystemClock.now();
        let query = ClaimQuery {
            owner: "bench".into(),
            kinds: vec!["noop".into()],
            now,
            lease_until: now.plus(Millis::from_secs(60)),
            limit: 1,
            offer: None,
        };
        let t = Instant::now();
        let got = store.claim_stages(&query).await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        if got.is_empty() {
            return Err(pond_core::StoreError::Backend("the queue ran dry during the claim benchmark".into()));
        }
    }
    let elapsed = started.elapsed();
    latencies.sort_by(f64::total_cmp);
    Ok(ClaimReport {
        queued,
        claims,
        latency_ms: (percentile(&latencies, 0.5), percentile(&latencies, 0.99)),
        per_sec: claims as f64 / elapsed.as_secs_f64(),
    })
}
