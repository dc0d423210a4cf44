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
    /// Phase 2: submit → claimed (the run's start) p50 / p99, ms (server timestamps): how much
    /// of a run's latency is waiting for the driver.
    pub queued_ms: (f64, f64),
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
        writeln!(
            f,
            "end to end (submit→done):    {:>8.0} runs/s   latency p50 {:.1} ms, p99 {:.1} ms",
            self.completed_per_sec, self.run_ms.0, self.run_ms.1
        )?;
        write!(
            f,
            "  of which queued (submit→claimed):           p50 {:.1} ms, p99 {:.1} ms",
            self.queued_ms.0, self.queued_ms.1
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

/// The project the benchmark's runs are submitted to.
const BENCH_PROJECT: &str = "bench";

fn body() -> serde_json::Value {
    serde_json::json!({
        "project_id": BENCH_PROJECT,
        "definition": {"stages": [{"key": "noop", "executor": {"kind": "noop"}}]}
    })
}

/// Submits `runs` runs of `body` from `clients` threads spread over the nodes; returns ids and
/// latencies (ms).
fn submit_all(
    nodes: &[Client],
    body: &serde_json::Value,
    runs: usize,
    clients: usize,
) -> Result<(Vec<String>, Vec<f64>, Duration), ClientError> {
    let started = Instant::now();
    let per = runs.div_ceil(clients.max(1));
    let results: Vec<Result<Vec<(String, f64)>, ClientError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients.max(1))
            .map(|c| {
                let client = nodes[c % nodes.len()].clone();
                s.spawn(move || {
                    let mut out = Vec::with_capacity(per);
                    for _ in (c * per)..((c + 1) * per).min(runs) {
                        let t = Instant::now();
                        let run = client.submit(body, None)?;
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
/// benchmark's own reads from loading the server), then reads the rest a page of the run list
/// at a time (a statement per page, so the store's counts are the engine's, not the bench's).
fn wait_all(client: &Client, ids: &[String]) -> Result<Vec<f64>, ClientError> {
    Ok(wait_all_timed(client, ids)?.0)
}

/// [`wait_all`], also giving the runs' submit→claimed durations (ms), sorted.
fn wait_all_timed(client: &Client, ids: &[String]) -> Result<(Vec<f64>, Vec<f64>), ClientError> {
    let Some(last) = ids.last() else { return Ok((Vec::new(), Vec::new())) };
    while !client.get_run(last)?.state.is_terminal() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    loop {
        let (mut durations, mut pending, mut cursor) = (Vec::with_capacity(ids.len()), 0, None::<String>);
        loop {
            let page = client.list_runs(Some(BENCH_PROJECT), None, Some(500), cursor.as_deref())?;
            for run in page.runs.iter().filter(|r| wanted.contains(r.id.to_string().as_str())) {
                match (run.state.is_terminal(), run.finished_at) {
                    (true, Some(done)) => durations.push(done.since(run.created_at).0 as f64),
                    (true, None) => {}
                    (false, _) => pending += 1,
                }
            }
            cursor = page.next_cursor.map(|c| c.to_string());
            if cursor.is_none() || durations.len() + pending >= ids.len() {
                break;
            }
        }
        if pending == 0 {
            durations.sort_by(f64::total_cmp);
            // When each was claimed, from 50 of them read one by one (after the phase, so the
            // reads are not timed; the run list does not carry start times).
            let mut queued = Vec::new();
            for id in ids.iter().step_by(ids.len().div_ceil(50).max(1)) {
                let run = client.get_run(id)?;
                if let Some(started) = run.started_at {
                    queued.push(started.since(run.created_at).0 as f64);
                }
            }
            queued.sort_by(f64::total_cmp);
            return Ok((durations, queued));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs both phases against the servers behind `nodes` (clients spread over them).
pub fn run(nodes: &[Client], setup: &str, runs: usize, clients: usize) -> Result<BenchReport, ClientError> {
    let (ids, submit_lat, submit_time) = submit_all(nodes, &body(), runs, clients)?;
    wait_all(&nodes[0], &ids)?;
    let started = Instant::now();
    let (ids, _, _) = submit_all(nodes, &body(), runs, clients)?;
    let (run_lat, queued) = wait_all_timed(&nodes[0], &ids)?;
    let e2e = started.elapsed();
    Ok(BenchReport {
        setup: setup.to_string(),
        runs,
        clients,
        submits_per_sec: runs as f64 / submit_time.as_secs_f64(),
        submit_ms: (percentile(&submit_lat, 0.5), percentile(&submit_lat, 0.99)),
        completed_per_sec: runs as f64 / e2e.as_secs_f64(),
        run_ms: (percentile(&run_lat, 0.5), percentile(&run_lat, 0.99)),
        queued_ms: (percentile(&queued, 0.5), percentile(&queued, 0.99)),
    })
}

/// Claim latency with `queued` local and `queued` pooled stages waiting, behind `queued` more
/// of another pool (due earlier, needing a tag no claimer has): one claimer taking one stage at
/// a time, as a driver with one free slot does, then one pool worker after another taking one
/// job each.
#[derive(Debug, Clone)]
pub struct ClaimReport {
    /// What the store was (`SQLite`, `PostgreSQL`).
    pub store: String,
    /// Local stages queued before the first claim, and as many pooled ones.
    pub queued: u64,
    /// Seconds to seed both backlogs.
    pub seed_secs: f64,
    /// Local claims measured (a server's driver: its executor kinds, no offer).
    pub local_claims: usize,
    /// Their p50 / p99 latency, ms.
    pub local_ms: (f64, f64),
    /// Pooled claims measured (a worker's offer, a new worker each).
    pub pooled_claims: usize,
    /// Their p50 / p99 latency, ms.
    pub pooled_ms: (f64, f64),
}

impl fmt::Display for ClaimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, {} local + {} pooled + {} of another pool queued (seeded in {:.1} s): local claim p50 {:.2} ms, p99 {:.2} ms ({} claims); \
             pooled claim p50 {:.2} ms, p99 {:.2} ms ({} claims)",
            self.store,
            self.queued,
            self.queued,
            self.queued,
            self.seed_secs,
            self.local_ms.0,
            self.local_ms.1,
            self.local_claims,
            self.pooled_ms.0,
            self.pooled_ms.1,
            self.pooled_claims
        )
    }
}

/// Seeds `queued` local and `queued` pooled ready stages into a scratch database (PostgreSQL
/// when `server_url` is given, else a SQLite file in `dir`) and times claims of each kind.
pub async fn claim_latency(
    server_url: Option<&str>,
    dir: &std::path::Path,
    queued: u64,
) -> Result<ClaimReport, pond_core::StoreError> {
    use pond_core::time::{Clock, SystemClock};
    use pond_store::Backlog;
    let now = SystemClock.now();
    let seeding = Instant::now();
    let (store, _scratch): (std::sync::Arc<dyn pond_core::store::Store>, _) = match server_url {
        Some(url) => {
            let db = pond_store::ScratchDatabase::create(url, "bench_claims").await?;
            let store = pond_store::PgStore::connect(&db.url, 4).await?;
            store.seed_runs(queued, Backlog::Local, now).await?;
            store.seed_runs(queued, Backlog::Pooled, now).await?;
            store.seed_runs(queued, Backlog::OtherPool, now).await?;
            (std::sync::Arc::new(store), Some(db))
        }
        None => {
            let path = dir.join(format!("claims-{queued}.db"));
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
            std::fs::create_dir_all(dir)
                .map_err(|e| pond_core::StoreError::Backend(format!("creating {}: {e}", dir.display())))?;
            let store = pond_store::SqliteStore::open(&path).await?;
            store.seed_runs(queued, Backlog::Local, now).await?;
            store.seed_runs(queued, Backlog::Pooled, now).await?;
            store.seed_runs(queued, Backlog::OtherPool, now).await?;
            (std::sync::Arc::new(store), None)
        }
    };
    let seed_secs = seeding.elapsed().as_secs_f64();
    let claims = (queued as usize / 2).min(2000);
    let local = time_claims(&*store, claims, |n| {
        (format!("driver-{n}"), vec!["noop".into(), "shell".into(), "builtin".into()], None)
    })
    .await?;
    let offer = pond_core::routing::WorkerOffer::default();
    let pooled = time_claims(&*store, claims, |n| {
        (format!("worker-{n}"), vec![pond_core::definition::POOL_KIND.into()], Some(offer.clone()))
    })
    .await?;
    Ok(ClaimReport {
        store: if server_url.is_some() { "PostgreSQL".into() } else { "SQLite".into() },
        queued,
        seed_secs,
        local_claims: claims,
        local_ms: (percentile(&local, 0.5), percentile(&local, 0.99)),
        pooled_claims: claims,
        pooled_ms: (percentile(&pooled, 0.5), percentile(&pooled, 0.99)),
    })
}

/// Times `claims` claims of one stage each, the `n`th with `query(n)`'s owner, kinds and offer;
/// returns the latencies (ms), sorted.
async fn time_claims(
    store: &dyn pond_core::store::Store,
    claims: usize,
    query: impl Fn(usize) -> (String, Vec<String>, Option<pond_core::routing::WorkerOffer>),
) -> Result<Vec<f64>, pond_core::StoreError> {
    use pond_core::store::ClaimQuery;
    use pond_core::time::{Clock, Millis, SystemClock};
    let mut latencies = Vec::with_capacity(claims);
    for n in 0..claims {
        let now = SystemClock.now();
        let (owner, kinds, offer) = query(n);
        let claim = ClaimQuery { owner, kinds, now, lease_until: now.plus(Millis::from_secs(60)), limit: 1, offer };
        let t = Instant::now();
        let got = store.claim_stages(&claim).await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        if got.is_empty() {
            return Err(pond_core::StoreError::Backend("the queue ran dry during the claim benchmark".into()));
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

/// CPU milliseconds per run, by process.
#[derive(Debug, Clone, Default)]
pub struct CpuPerRun {
    /// The `pond server`.
    pub server: f64,
    /// The `pond orchestrator`.
    pub orchestrator: f64,
    /// The `pond worker` processes together.
    pub workers: f64,
    /// The benchmark's own clients.
    pub clients: f64,
    /// Every process on the machine.
    pub machine: f64,
}

/// Figures of the pool benchmark.
#[derive(Debug, Clone)]
pub struct PoolBenchReport {
    /// Samples of the latency phase.
    pub samples: usize,
    /// Submit → worker holds the job, p50 / p99, ms.
    pub start_ms: (f64, f64),
    /// Workers in the throughput phase.
    pub workers: usize,
    /// Runs in the throughput phase.
    pub runs: usize,
    /// Pooled noop runs submitted and completed per second.
    pub completed_per_sec: f64,
    /// The same with as many `pond worker` processes in place of the in-process worker loops.
    pub processes_completed_per_sec: f64,
    /// `SQLite` or `PostgreSQL`: the server's store.
    pub store: &'static str,
    /// CPU milliseconds per run in the `pond worker` phase: the server, the orchestrator, the
    /// worker processes together, this benchmark (its submitting clients), and the whole
    /// machine (the database included).
    pub cpu_ms_per_run: CpuPerRun,
    /// Idle long-polling workers in the memory phase.
    pub idle_workers: usize,
    /// Resident memory of the server and the orchestrator before the idle workers, KiB.
    pub rss_before_kib: (u64, u64),
    /// The same with the idle workers polling, KiB.
    pub rss_idle_kib: (u64, u64),
}

impl fmt::Display for PoolBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pool (pond server + pond orchestrator processes, workers over HTTP on 127.0.0.1, {})",
            self.store
        )?;
        writeln!(
            f,
            "submit → worker start, idle pool: p50 {:.2} ms, p99 {:.2} ms ({} runs, one at a time)",
            self.start_ms.0, self.start_ms.1, self.samples
        )?;
        writeln!(
            f,
            "pooled noop runs, {} workers:   {:>6.0} runs/s submitted and completed ({} runs)",
            self.workers, self.completed_per_sec, self.runs
        )?;
        writeln!(
            f,
            "pooled noop runs, {} `pond worker` processes: {:>6.0} runs/s submitted and completed ({} runs)",
            self.workers, self.processes_completed_per_sec, self.runs
        )?;
        let c = &self.cpu_ms_per_run;
        writeln!(
            f,
            "  CPU per run: server {:.2} ms, orchestrator {:.2} ms, workers {:.2} ms, submitting clients {:.2} ms; whole machine {:.2} ms",
            c.server, c.orchestrator, c.workers, c.clients, c.machine
        )?;
        write!(
            f,
            "memory, {} idle long-polling workers: server {} MiB (was {} MiB), orchestrator {} MiB (was {} MiB)",
            self.idle_workers,
            self.rss_idle_kib.0 / 1024,
            self.rss_before_kib.0 / 1024,
            self.rss_idle_kib.1 / 1024,
            self.rss_before_kib.1 / 1024
        )
    }
}

/// A child `pond` process whose first stdout line announces its URL.
pub(crate) struct Child {
    process: std::process::Child,
    pub(crate) url: String,
}

impl Child {
    pub(crate) fn spawn(exe: &std::path::Path, args: &[&str], prefix: &str) -> Result<Child, ClientError> {
        Child::spawn_with(exe, args, prefix, std::process::Stdio::inherit())
    }

    /// A `pond worker` of the orchestrator at `orchestrator`, enrolling with `code` (keys in
    /// `keys`), with `extra` flags; ready once it printed that it enrolled.
    pub(crate) fn spawn_worker(
        exe: &std::path::Path,
        orchestrator: &str,
        keys: &std::path::Path,
        code: &str,
        extra: &[&str],
    ) -> Result<Child, ClientError> {
        let keys = keys.display().to_string();
        let mut args = vec!["worker", "--orchestrator", orchestrator, "--key-dir", &keys, "--enroll", code];
        args.extend_from_slice(extra);
        Child::spawn(exe, &args, "pond worker ")
    }

    /// Like [`Child::spawn`], its standard error written to `log`.
    fn spawn_logged(
        exe: &std::path::Path,
        args: &[&str],
        prefix: &str,
        log: &std::path::Path,
    ) -> Result<Child, ClientError> {
        Child::spawn_with(exe, args, prefix, std::fs::File::create(log)?.into())
    }

    fn spawn_with(
        exe: &std::path::Path,
        args: &[&str],
        prefix: &str,
        stderr: std::process::Stdio,
    ) -> Result<Child, ClientError> {
        use std::io::BufRead;
        let mut process =
            std::process::Command::new(exe).args(args).stdout(std::process::Stdio::piped()).stderr(stderr).spawn()?;
        let stdout = process.stdout.take().ok_or_else(|| ClientError::Decode("no stdout".into()))?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next().transpose()?.unwrap_or_default();
        std::thread::spawn(move || for _ in lines {});
        let url = first
            .strip_prefix(prefix)
            .ok_or_else(|| ClientError::Decode(format!("{args:?} printed `{first}`")))?
            .to_string();
        Ok(Child { process, url })
    }

    fn rss_kib(&self) -> u64 {
        self.status_field("VmRSS:")
    }

    fn threads(&self) -> u64 {
        self.status_field("Threads:")
    }

    /// CPU time the process has used so far (user + system), in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        process_cpu_ticks(&format!("/proc/{}/stat", self.process.id()))
    }

    fn status_field(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// User + system CPU ticks of the process whose `stat` file is at `path` (0 when unreadable).
fn process_cpu_ticks(path: &str) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 on: utime and stime
    // are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(14) + field(15)
}

/// Busy CPU ticks of the whole machine so far (every core: all but idle and iowait).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0 };
    let v: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    v.iter().take(8).sum::<u64>() - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0)
}

/// Milliseconds per clock tick of `/proc` CPU times.
fn ms_per_tick() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1000.0 / if hz > 0 { hz as f64 } else { 100.0 }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Records when each job reached its worker, and passes everything else through.
struct Timed {
    inner: std::sync::Arc<dyn pond_core::pool::WorkerClient>,
    received: std::sync::mpsc::Sender<(String, Instant)>,
}

#[async_trait::async_trait]
impl pond_core::pool::WorkerClient for Timed {
    async fn claim(
        &self,
        wait: pond_core::time::Millis,
    ) -> Result<Option<pond_core::pool::Job>, pond_core::pool::WorkerCallError> {
        let job = self.inner.claim(wait).await?;
        if let Some(j) = &job {
            let _ = self.received.send((j.id.run.to_string(), Instant::now()));
        }
        Ok(job)
    }
    async fn input(
        &self,
        job: &pond_core::pool::JobId,
    ) -> Result<(Vec<u8>, Option<String>), pond_core::pool::WorkerCallError> {
        self.inner.input(job).await
    }
    async fn heartbeat(&self, job: &pond_core::pool::JobId) -> Result<bool, pond_core::pool::WorkerCallError> {
        self.inner.heartbeat(job).await
    }
    async fn logs(
        &self,
        job: &pond_core::pool::JobId,
        lines: Vec<pond_core::store::NewLogLine>,
    ) -> Result<(), pond_core::pool::WorkerCallError> {
        self.inner.logs(job, lines).await
    }
    async fn artifact(
        &self,
        job: &pond_core::pool::JobId,
        name: &str,
        data: Vec<u8>,
    ) -> Result<(), pond_core::pool::WorkerCallError> {
        self.inner.artifact(job, name, data).await
    }
    async fn result(
        &self,
        job: &pond_core::pool::JobId,
        report: &pond_core::engine::JobReport,
    ) -> Result<(bool, String), pond_core::pool::WorkerCallError> {
        self.inner.result(job, report).await
    }
    async fn release(&self, job: &pond_core::pool::JobId) -> Result<(), pond_core::pool::WorkerCallError> {
        self.inner.release(job).await
    }
}

fn pooled_noop() -> serde_json::Value {
    serde_json::json!({
        "project_id": BENCH_PROJECT,
        "definition": {"stages": [{"key": "noop", "executor": {"kind": "noop", "placement": "pool"}}]}
    })
}

fn worker_code(admin: &Client, pool: &str) -> Result<String, ClientError> {
    let request = crate::pool_wire::CreateCode {
        pool: pool.into(),
        role: Some("worker".into()),
        tags: Vec::new(),
        capabilities: Vec::new(),
        fingerprint: None,
        ttl: None,
        uses: None,
    };
    Ok(admin.create_enroll_code(&request)?.code)
}

fn identity(n: u64) -> pond_core::keys::WorkerIdentity {
    let mut secrets = [0u8; 64];
    secrets[..8].copy_from_slice(&n.to_le_bytes());
    secrets[32..40].copy_from_slice(&(n + 1_000_000).to_le_bytes());
    secrets[8] = 1;
    secrets[40] = 1;
    pond_core::keys::WorkerIdentity::from_secrets(
        secrets[..32].try_into().unwrap_or([1; 32]),
        secrets[32..].try_into().unwrap_or([2; 32]),
    )
}

/// Enrolls a worker with a fresh code; returns its token and what it was pinned to.
fn enroll_fake(
    admin: &Client,
    orchestrator: &str,
    n: u64,
) -> Result<(String, pond_core::routing::WorkerOffer), ClientError> {
    let identity = identity(n);
    let code = worker_code(admin, "bench")?;
    let request = crate::pool_client::enroll_request(&code, &format!("bench-{n}"), &identity, None, vec![]);
    let enrolled = crate::pool_client::HttpWorkerClient::enroll(orchestrator, &request)?;
    Ok((enrolled.token, enrolled.member.offer()))
}

/// A `pond server` (SQLite in `dir/server`, with `server_args`) and an enrolled `pond
/// orchestrator` of pool `bench`, as child processes of `exe`, with an admin client.
pub(crate) fn server_and_orchestrator(
    exe: &std::path::Path,
    dir: &std::path::Path,
    server_args: &[&str],
) -> Result<(Child, Client, Child), ClientError> {
    let data = dir.join("server");
    let data_arg = data.display().to_string();
    let mut args = vec!["server", "--listen", "127.0.0.1:0", "--data-dir", &data_arg];
    args.extend_from_slice(server_args);
    let server = Child::spawn(exe, &args, "pond server listening on ")?;
    let token = std::fs::read_to_string(data.join("admin.token"))?.trim().to_string();
    let admin = Client::new(&server.url, Some(token));
    let code = admin
        .create_enroll_code(&crate::pool_wire::CreateCode {
            pool: "bench".into(),
            role: None,
            tags: Vec::new(),
            capabilities: Vec::new(),
            fingerprint: None,
            ttl: None,
            uses: None,
        })?
        .code;
    let state = dir.join("orchestrator").display().to_string();
    let orch = Child::spawn(
        exe,
        &["orchestrator", "--server", &server.url, "--listen", "127.0.0.1:0", "--state-dir", &state, "--enroll", &code],
        "pond orchestrator listening on ",
    )?;
    Ok((server, admin, orch))
}

/// The pool benchmark: a `pond server` (SQLite in `dir`, or the PostgreSQL database at
/// `database_url`) and a `pond orchestrator` as child processes of `exe`, `workers` pool workers
/// (the real worker loop, in this process, over HTTP) for the latency and throughput phases, the
/// throughput phase again with as many `pond worker` processes, then `idle_workers` bare
/// long-pollers for the memory phase.
pub fn pool(
    exe: &std::path::Path,
    dir: &std::path::Path,
    database_url: Option<&str>,
    samples: usize,
    workers: usize,
    runs: usize,
    idle_workers: usize,
) -> Result<PoolBenchReport, ClientError> {
    let server_args: Vec<&str> = match database_url {
        Some(url) => vec!["--database-url", url],
        None => Vec::new(),
    };
    let (server, admin, orch) = server_and_orchestrator(exe, dir, &server_args)?;

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (received_tx, received) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for n in 0..workers {
        let (token, pinned) = enroll_fake(&admin, &orch.url, n as u64)?;
        let client: std::sync::Arc<dyn pond_core::pool::WorkerClient> = std::sync::Arc::new(Timed {
            inner: crate::pool_client::worker_client(&orch.url, &token),
            received: received_tx.clone(),
        });
        let config = pond_exec::WorkerConfig {
            scratch: dir.join(format!("worker-{n}")),
            once: false,
            claim_wait: Duration::from_secs(20),
            drain: Duration::from_secs(1),
            max_input_bytes: 1 << 30,
            pinned,
            allow_unconfined: false,
            max_log_bytes: pond_core::engine::DEFAULT_MAX_LOG_BYTES,
        };
        let worker = pond_exec::Worker::new(client, identity(n as u64), config)
            .with_executor(std::sync::Arc::new(pond_exec::NoopExecutor));
        let stopped = stopped.clone();
        tasks.push(rt.spawn(async move { worker.run(stopped).await }));
    }
    // Let every worker reach its long poll.
    std::thread::sleep(Duration::from_millis(500));
    let body = pooled_noop();
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        while received.try_recv().is_ok() {}
        let t = Instant::now();
        let run = admin.submit(&body, None)?;
        let id = run.id.to_string();
        loop {
            let (got, at) = received
                .recv_timeout(Duration::from_secs(30))
                .map_err(|_| ClientError::Decode("no worker received the job within 30 s".into()))?;
            if got == id {
                latencies.push(at.duration_since(t).as_secs_f64() * 1000.0);
                break;
            }
        }
        wait_all(&admin, &[id])?;
        // Idle again: every worker back in its long poll.
        std::thread::sleep(Duration::from_millis(5));
    }
    latencies.sort_by(f64::total_cmp);
    let started = Instant::now();
    let (ids, _, _) = submit_all(std::slice::from_ref(&admin), &body, runs, 8)?;
    wait_all(&admin, &ids)?;
    let completed_per_sec = runs as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    for t in tasks {
        let _ = rt.block_on(t);
    }

    // The same drain by `pond worker` processes, as an operator runs them (host sandbox: a
    // `noop` stage runs nothing).
    let mut processes = Vec::with_capacity(workers);
    for n in 0..workers {
        let code = worker_code(&admin, "bench")?;
        let name = format!("bench-process-{n}");
        let keys = dir.join(format!("process-worker-{n}"));
        processes.push(Child::spawn_worker(
            exe,
            &orch.url,
            &keys,
            &code,
            &["--name", &name, "--sandbox", "host", "--drain", "1s"],
        )?);
    }
    std::thread::sleep(Duration::from_millis(500));
    let cpu = |processes: &[Child]| {
        (
            server.cpu_ticks(),
            orch.cpu_ticks(),
            processes.iter().map(Child::cpu_ticks).sum::<u64>(),
            process_cpu_ticks("/proc/self/stat"),
            machine_busy_ticks(),
        )
    };
    let before = cpu(&processes);
    let started = Instant::now();
    let (ids, _, _) = submit_all(std::slice::from_ref(&admin), &body, runs, 8)?;
    wait_all(&admin, &ids)?;
    let processes_completed_per_sec = runs as f64 / started.elapsed().as_secs_f64();
    let after = cpu(&processes);
    let per_run = |a: u64, b: u64| a.saturating_sub(b) as f64 * ms_per_tick() / runs.max(1) as f64;
    let cpu_ms_per_run = CpuPerRun {
        server: per_run(after.0, before.0),
        orchestrator: per_run(after.1, before.1),
        workers: per_run(after.2, before.2),
        clients: per_run(after.3, before.3),
        machine: per_run(after.4, before.4),
    };
    drop(processes);

    // Memory: `idle_workers` enrolled workers, each holding a long poll on the orchestrator.
    std::thread::sleep(Duration::from_millis(500));
    let rss_before_kib = (server.rss_kib(), orch.rss_kib());
    let mut tokens = Vec::with_capacity(idle_workers);
    for n in 0..idle_workers {
        tokens.push(enroll_fake(&admin, &orch.url, 10_000 + n as u64)?.0);
    }
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pollers: Vec<_> = tokens
        .into_iter()
        .map(|token| {
            let (url, done) = (format!("{}/v1/worker/claim", orch.url), done.clone());
            std::thread::Builder::new().stack_size(64 * 1024).spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout_read(Duration::from_secs(40)).build();
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = agent
                        .post(&url)
                        .set("Authorization", &format!("Bearer {token}"))
                        .send_json(serde_json::json!({"wait_ms": 3000}));
                }
            })
        })
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_secs(5));
    let rss_idle_kib = (server.rss_kib(), orch.rss_kib());
    eprintln!("threads with the idle workers: server {}, orchestrator {}", server.threads(), orch.threads());
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in pollers {
        let _ = p.join();
    }
    Ok(PoolBenchReport {
        samples,
        start_ms: (percentile(&latencies, 0.5), percentile(&latencies, 0.99)),
        workers,
        runs,
        completed_per_sec,
        processes_completed_per_sec,
        cpu_ms_per_run,
        store: if database_url.is_some() { "PostgreSQL" } else { "SQLite" },
        idle_workers,
        rss_before_kib,
        rss_idle_kib,
    })
}

/// Figures of the encryption benchmark (one thread, so per core).
#[derive(Debug, Clone)]
pub struct CryptoReport {
    /// Log lines sealed per second (format (a), 80-byte lines).
    pub lines_per_sec: f64,
    /// Artifact encryption (format (b)), GB/s.
    pub artifact_gb_per_sec: f64,
    /// Artifact decryption, GB/s.
    pub artifact_open_gb_per_sec: f64,
    /// memcpy of the same buffer, GB/s.
    pub memcpy_gb_per_sec: f64,
}

impl fmt::Display for CryptoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "log lines sealed (ENC2, 80 B):   {:>10.0} lines/s on one core", self.lines_per_sec)?;
        writeln!(f, "artifact encryption (secretstream): {:>6.2} GB/s on one core", self.artifact_gb_per_sec)?;
        writeln!(f, "artifact decryption (+ signature): {:>6.2} GB/s on one core", self.artifact_open_gb_per_sec)?;
        write!(f, "memcpy, same buffer:                {:>6.2} GB/s on one core", self.memcpy_gb_per_sec)
    }
}

/// Times sealing `lines` log lines and encrypting, decrypting and copying `bytes` bytes.
pub fn crypto(lines: usize, bytes: usize) -> CryptoReport {
    let recipient = pond_core::keys::x25519_public(&[7u8; 32]);
    let place = pond_core::seal::Place::new("bench", "stage", 1);
    let (mut sealer, _) = pond_core::seal::LogSealer::new(&[recipient], &[9u8; 32], &place);
    let line = "x".repeat(80);
    let started = Instant::now();
    let mut total = 0usize;
    for _ in 0..lines {
        total += sealer.seal_line(line.as_bytes(), pond_core::store::LogStream::Stdout, false).len();
    }
    let lines_per_sec = lines as f64 / started.elapsed().as_secs_f64();
    let data: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
    // Encryption as a stream through one reused chunk buffer (how a large artifact is written
    // out): the cipher's cost, not the allocator's.
    let (mut stream, _, _) = pond_core::seal::ArtifactStream::new(&[recipient]);
    let mut buffer = Vec::with_capacity(pond_core::seal::CHUNK + 64);
    let started = Instant::now();
    let chunks: Vec<&[u8]> = data.chunks(pond_core::seal::CHUNK).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        buffer.clear();
        stream.push(chunk, i + 1 == chunks.len(), &mut buffer);
        std::hint::black_box(&buffer);
    }
    let artifact_gb_per_sec = bytes as f64 / started.elapsed().as_secs_f64() / 1e9;
    let (sealed, sidecar) = pond_core::seal::seal_output_artifact(&data, &[recipient], &place, "bench.bin", &[9u8; 32]);
    let signer = pond_core::keys::ed25519_public(&[9u8; 32]);
    let started = Instant::now();
    let opened = pond_core::seal::open_output_artifact(
        &sealed,
        &sidecar,
        &recipient,
        &[7u8; 32],
        &place,
        "bench.bin",
        &[signer],
        2,
    );
    let artifact_open_gb_per_sec = bytes as f64 / started.elapsed().as_secs_f64() / 1e9;
    // The destination is touched first, so the figure is the copy, not the page faults.
    let mut copy = vec![1u8; bytes];
    let started = Instant::now();
    copy.copy_from_slice(std::hint::black_box(&data));
    let memcpy_gb_per_sec = bytes as f64 / started.elapsed().as_secs_f64() / 1e9;
    std::hint::black_box((total, copy, opened.map(|o| o.len()).unwrap_or(0)));
    CryptoReport { lines_per_sec, artifact_gb_per_sec, artifact_open_gb_per_sec, memcpy_gb_per_sec }
}

/// What the soak run found.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// Requests sent.
    pub requests: usize,
    /// Answers by status code.
    pub statuses: std::collections::BTreeMap<u16, usize>,
    /// Requests that got no HTTP answer (connection refused or reset, timed out).
    pub transport_errors: usize,
    /// The server's RSS (KiB) after each tenth of the requests, the first sample after the
    /// first tenth.
    pub rss_kib: Vec<u64>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let server_errors: usize = self.statuses.iter().filter(|(s, _)| **s >= 500).map(|(_, n)| n).sum();
        writeln!(
            f,
            "{} mixed requests in {:.1} s ({:.0}/s): {} answered 5xx, {} without an answer",
            self.requests,
            self.seconds,
            self.requests as f64 / self.seconds,
            server_errors,
            self.transport_errors
        )?;
        let statuses: Vec<String> = self.statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        writeln!(f, "statuses: {}", statuses.join(", "))?;
        let rss: Vec<String> = self.rss_kib.iter().map(|k| format!("{:.1}", *k as f64 / 1024.0)).collect();
        write!(f, "server RSS (MiB) after each tenth: {}", rss.join(" "))
    }
}

/// The soak check: a `pond server` process (SQLite, or PostgreSQL at `database_url`) takes
/// `requests` mixed good and bad requests from `clients` threads — valid submits, run and log
/// reads, tree heads, malformed and oversized bodies, NUL in fields, bad numbers in queries,
/// unknown runs and routes, no or a wrong token — while its RSS is sampled every tenth.
pub fn soak(
    exe: &std::path::Path,
    dir: &std::path::Path,
    database_url: Option<&str>,
    requests: usize,
    clients: usize,
) -> Result<SoakReport, ClientError> {
    let data = dir.join("server");
    let data_arg = data.display().to_string();
    let mut args = vec!["server", "--listen", "127.0.0.1:0", "--data-dir", &data_arg];
    if let Some(url) = database_url {
        args.extend(["--database-url", url]);
    }
    let server = Child::spawn(exe, &args, "pond server listening on ")?;
    let token = std::fs::read_to_string(data.join("admin.token"))?.trim().to_string();
    let admin = Client::new(&server.url, Some(token.clone()));
    let noop = serde_json::json!({"project_id": "soak", "definition": {"stages": [{"key": "a", "executor": {"kind": "noop"}}]}});
    let first = admin.submit(&noop, None)?.id.to_string();
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
    // The server closes a connection whose body it refused unread (413): those requests get a
    // connection of their own, so a closed one is never reused for the next request.
    let once = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).max_idle_connections(0).build();
    // Just over the JSON body limit (4 MiB by default): refused with 413 before it is read.
    let big = vec![b'x'; (4 << 20) + 1];
    let next = std::sync::atomic::AtomicUsize::new(0);
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    let transport = std::sync::atomic::AtomicUsize::new(0);
    let mut rss = Vec::new();
    let started = Instant::now();
    let tenth = (requests / 10).max(1);
    std::thread::scope(|scope| {
        let (sampled_tx, sampled) = std::sync::mpsc::channel::<()>();
        for _ in 0..clients.max(1) {
            let sampled_tx = sampled_tx.clone();
            let (agent, once, url, token, big, first, noop) = (&agent, &once, &server.url, &token, &big, &first, &noop);
            let (next, statuses, transport) = (&next, &statuses, &transport);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return;
                }
                let auth = format!("Bearer {token}");
                let runs = format!("{url}/v1/runs");
                let answer = match i % 12 {
                    0 => agent.post(&runs).set("authorization", &auth).send_json(noop.clone()),
                    1 => agent
                        .post(&runs)
                        .set("authorization", &auth)
                        .set("content-type", "application/json")
                        .send_string("{\"project_id\": \"soak\", \"definition\": "),
                    2 => once
                        .post(&runs)
                        .set("authorization", &auth)
                        .set("content-type", "application/json")
                        .send_bytes(big),
                    3 => agent.get(&format!("{url}/v1/runs/{}", uuid_like(i))).set("authorization", &auth).call(),
                    4 => agent.get(&format!("{url}/v1/runs?limit=lots")).set("authorization", &auth).call(),
                    5 => agent.get(&runs).call(),
                    6 => agent.get(&runs).set("authorization", "Bearer pond_wrong").call(),
                    7 => agent.get(&format!("{url}/v1/nothing/here")).set("authorization", &auth).call(),
                    8 => agent
                        .post(&runs)
                        .set("authorization", &auth)
                        .send_json(serde_json::json!({"project_id": "so\u{0}ak", "definition": {"stages": []}})),
                    9 => agent.get(&format!("{url}/v1/runs/{first}/logs?limit=100")).set("authorization", &auth).call(),
                    10 => agent.get(&format!("{url}/v1/log/tree-head")).set("authorization", &auth).call(),
                    _ => agent.get(&format!("{url}/v1/runs/{first}")).set("authorization", &auth).call(),
                };
                let status = match answer {
                    Ok(r) => Some(r.status()),
                    Err(ureq::Error::Status(code, _)) => Some(code),
                    Err(_) => None,
                };
                match status {
                    Some(code) => *statuses.lock().unwrap_or_else(|p| p.into_inner()).entry(code).or_default() += 1,
                    None => {
                        transport.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                if (i + 1) % tenth == 0 {
                    let _ = sampled_tx.send(());
                }
            });
        }
        drop(sampled_tx);
        for () in sampled {
            rss.push(server.rss_kib());
        }
    });
    let statuses = statuses.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok(SoakReport {
        requests,
        statuses,
        transport_errors: transport.into_inner(),
        rss_kib: rss,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A well-formed run id no run has.
fn uuid_like(i: usize) -> String {
    format!("01a00000-0000-7000-8000-{i:012x}")
}

/// One round of the stress check.
#[derive(Debug, Clone, Default)]
pub struct StressRound {
    /// Output lines the stages printed and the store kept.
    pub lines: u64,
    /// Lines expected.
    pub expected: u64,
    /// Stages claimed more than once (a live stage re-claimed: its lease lapsed).
    pub reclaimed: usize,
    /// 503 answers to the reads and submits made meanwhile.
    pub unavailable: usize,
    /// Reads and submits made meanwhile.
    pub requests: usize,
    /// Seconds the round took.
    pub seconds: f64,
}

/// What the stress check found, round by round.
#[derive(Debug, Clone)]
pub struct StressReport {
    /// The rounds.
    pub rounds: Vec<StressRound>,
    /// Lines of the server's log that say a lease renewal failed.
    pub renewal_failures: usize,
}

impl std::fmt::Display for StressReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, r) in self.rounds.iter().enumerate() {
            writeln!(
                f,
                "round {}: {:.1} s, lines {} of {}, re-claimed stages {}, 503s {} of {} requests",
                i + 1,
                r.seconds,
                r.lines,
                r.expected,
                r.reclaimed,
                r.unavailable,
                r.requests
            )?;
        }
        write!(f, "lease renewal failures logged: {}", self.renewal_failures)
    }
}

/// The writer under busy output: each round, `runs` runs of `stages` parallel stages, each
/// printing a line every 2 ms for `seconds` seconds (perl, no fork per line), against a
/// `pond server` process (SQLite, or PostgreSQL at `database_url`) with a 5 s lease, while runs
/// are read and noop runs submitted every 250 ms. Counts lines kept, stages claimed twice, 503
/// answers and the renewal failures the server logged.
pub fn stress(
    exe: &std::path::Path,
    dir: &std::path::Path,
    database_url: Option<&str>,
    rounds: usize,
    seconds: u64,
    runs: usize,
    stages: usize,
) -> Result<StressReport, ClientError> {
    let data = dir.join("server");
    let data_arg = data.display().to_string();
    let slots = (runs * stages).to_string();
    let mut args =
        vec!["server", "--listen", "127.0.0.1:0", "--data-dir", &data_arg, "--lease", "5s", "--slots", &slots];
    if let Some(url) = database_url {
        args.extend(["--database-url", url]);
    }
    let log = dir.join("server.log");
    let server = Child::spawn_logged(exe, &args, "pond server listening on ", &log)?;
    let token = std::fs::read_to_string(data.join("admin.token"))?.trim().to_string();
    let admin = Client::new(&server.url, Some(token));
    let lines_each = seconds * 500;
    let script =
        format!("$|=1; for my $i (1..{lines_each}) {{ print \"line $i\\n\"; select(undef, undef, undef, 0.002) }}");
    let noop = serde_json::json!({"project_id": "stress", "definition": {"stages": [{"key": "n", "executor": {"kind": "noop"}}]}});
    let mut report = StressReport { rounds: Vec::new(), renewal_failures: 0 };
    for _ in 0..rounds {
        let started = Instant::now();
        let definition = serde_json::json!({"stages": (0..stages).map(|i| serde_json::json!({
            "key": format!("s{i}"), "needs": [], "executor": {"kind": "shell", "argv": ["perl", "-e", script]}})).collect::<Vec<_>>()});
        let ids: Vec<String> = (0..runs)
            .map(|_| {
                admin
                    .submit(&serde_json::json!({"project_id": "stress", "definition": definition}), None)
                    .map(|r| r.id.to_string())
            })
            .collect::<Result<_, _>>()?;
        let mut round = StressRound { expected: (runs * stages) as u64 * lines_each, ..Default::default() };
        loop {
            let mut ended = 0;
            for id in &ids {
                round.requests += 1;
                match admin.get_run(id) {
                    Ok(run) if run.state.is_terminal() => ended += 1,
                    Ok(_) => {}
                    Err(e) if e.status() == Some(503) => round.unavailable += 1,
                    Err(e) => return Err(e),
                }
            }
            if ended == ids.len() {
                break;
            }
            round.requests += 1;
            match admin.submit(&noop, None) {
                Ok(_) => {}
                Err(e) if e.status() == Some(503) => round.unavailable += 1,
                Err(e) => return Err(e),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        round.seconds = started.elapsed().as_secs_f64();
        for id in &ids {
            let run = admin.get_run(id)?;
            round.reclaimed += run.stages.iter().filter(|s| s.attempts.len() > 1).count();
            let mut after = 0;
            loop {
                let page = admin.logs(id, after, 1000)?;
                if page.lines.is_empty() {
                    break;
                }
                round.lines += page.lines.iter().filter(|l| l.line.text.starts_with("line ")).count() as u64;
                after = page.next_cursor;
            }
        }
        report.rounds.push(round);
    }
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    report.renewal_failures = logged.lines().filter(|l| l.contains("lease renewal failed")).count();
    Ok(report)
}
