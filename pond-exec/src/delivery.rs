//! How a pool worker delivers a job's output: at least once, in order, nothing dropped.
//!
//! Lines are numbered (`line_seq`, 0, 1, 2, … per job) and appended to a spool file on disk as
//! they are produced; a sender task sends them from the spool in batches of at most
//! [`MAX_BATCH_BYTES`] of encoded JSON, retrying with backoff and jitter while the orchestrator
//! or pond is away. Pond stores a line number once, so a batch sent again after a lost answer
//! changes nothing. The key header of an encrypted stream is line 0, delivered like any other.
//! [`OutputSink::finish`] waits for the spool to drain; what could not be delivered fails the
//! stage with the reason. Artifacts are retried the same way.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pond_core::exec::{LogBudget, OutputLine, OutputSink};
use pond_core::pool::{JobId, WorkerCallError, WorkerClient};
use pond_core::store::NewLogLine;
use pond_core::time::{Backoff, Millis, Timestamp};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

/// Most encoded bytes in one `logs` call (well under any body limit on the way).
pub const MAX_BATCH_BYTES: u64 = 1024 * 1024;

/// Where the spool stands: bytes written and whether the job has ended (no more lines).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Written {
    bytes: u64,
    closed: bool,
}

/// The shared state of a job's spool.
struct Spool {
    path: PathBuf,
    written: watch::Sender<Written>,
    sent: watch::Sender<u64>,
    failed: Mutex<Option<String>>,
}

impl Spool {
    fn fail(&self, why: String) -> String {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        let why = failed.get_or_insert(why).clone();
        // Wake whoever waits for the spool to drain: it never will now.
        self.sent.send_modify(|_| {});
        why
    }

    fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Sends a job's output to the orchestrator through a spool, and remembers each artifact's
/// digest for the attestation. For a confidential run the output is sealed here, before it is
/// spooled or leaves the worker: the orchestrator and pond only see ciphertext; the attestation
/// covers the plaintext.
pub(crate) struct ClientSink {
    client: Arc<dyn WorkerClient>,
    job: JobId,
    /// Stored name → SHA-256 (hex) of each stored artifact, for the signed manifest.
    pub(crate) artifacts: Mutex<BTreeMap<String, String>>,
    sealer: Option<pond_core::seal::OutputSealer>,
    budget: LogBudget,
    spool: Arc<Spool>,
    file: tokio::sync::Mutex<(Option<tokio::fs::File>, u64)>,
    sender: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// How long delivery may keep failing before the stage fails for it.
    patience: Duration,
}

impl ClientSink {
    /// A sink spooling to `spool_path`, sending to `client` for `job`.
    pub(crate) fn new(
        client: Arc<dyn WorkerClient>,
        job: JobId,
        sealer: Option<pond_core::seal::OutputSealer>,
        spool_path: PathBuf,
        max_log_bytes: u64,
        patience: Duration,
    ) -> Self {
        let spool = Arc::new(Spool {
            path: spool_path,
            written: watch::channel(Written::default()).0,
            sent: watch::channel(0).0,
            failed: Mutex::new(None),
        });
        let sender = tokio::spawn(send_spool(client.clone(), job.clone(), spool.clone()));
        ClientSink {
            client,
            job,
            artifacts: Mutex::default(),
            sealer,
            budget: LogBudget::new(max_log_bytes),
            spool,
            file: tokio::sync::Mutex::new((None, 0)),
            sender: Mutex::new(Some(sender)),
            patience,
        }
    }

    async fn spool_lines(&self, lines: Vec<OutputLine>) -> Result<(), String> {
        let mut guard = self.file.lock().await;
        let (file, next_seq) = &mut *guard;
        if file.is_none() {
            *file = Some(
                tokio::fs::File::create(&self.spool.path)
                    .await
                    .map_err(|e| format!("creating the output spool {}: {e}", self.spool.path.display()))?,
            );
        }
        let Some(file) = file.as_mut() else { return Err("the output spool is closed".into()) };
        let mut text = Vec::new();
        for line in &lines {
            let record = NewLogLine::output("", 0, Timestamp::from_millis(0), line, *next_seq);
            *next_seq += 1;
            serde_json::to_writer(&mut text, &record).map_err(|e| e.to_string())?;
            text.push(b'\n');
        }
        file.write_all(&text).await.map_err(|e| format!("writing the output spool: {e}"))?;
        file.flush().await.map_err(|e| format!("writing the output spool: {e}"))?;
        self.spool.written.send_modify(|w| w.bytes += text.len() as u64);
        Ok(())
    }
}

impl Drop for ClientSink {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.lock().unwrap_or_else(|p| p.into_inner()).take() {
            sender.abort();
        }
        let _ = std::fs::remove_file(&self.spool.path);
    }
}

#[async_trait]
impl OutputSink for ClientSink {
    async fn lines(&self, lines: Vec<OutputLine>) {
        if self.spool.failure().is_some() {
            return;
        }
        let lines = self.budget.admit_sealed(lines, self.sealer.as_ref());
        if lines.is_empty() {
            return;
        }
        if let Err(e) = self.spool_lines(lines).await {
            self.spool.fail(format!("the stage's output could not be kept for delivery: {e}"));
        }
    }

    async fn artifact(&self, name: &str, data: Vec<u8>) -> Result<(), String> {
        pond_core::engine::check_artifact_name(name)?;
        let uploads: Vec<(String, Vec<u8>)> = match &self.sealer {
            Some(sealer) => sealer.artifact(name, &data).into_iter().collect(),
            None => vec![(name.to_string(), data)],
        };
        for (stored_name, bytes) in uploads {
            // The signed manifest lists what is stored (for a confidential run: ciphertext and
            // sidecar), so pond can check it against its store and it tells nothing about the
            // plaintext; a recipient who decrypts still knows the plaintext is the worker's,
            // since the ciphertext authenticates it.
            let sha = hex::encode(Sha256::digest(&bytes));
            let client = &self.client;
            let job = &self.job;
            retry(self.patience, || client.artifact(job, &stored_name, bytes.clone()))
                .await
                .map_err(|e| self.spool.fail(format!("artifact `{stored_name}` could not be delivered: {e}")))?;
            self.artifacts.lock().unwrap_or_else(|p| p.into_inner()).insert(stored_name, sha);
        }
        Ok(())
    }

    async fn finish(&self) -> Result<(), String> {
        // A confidential stream ends with its signed final record, spooled like its lines.
        if let Some(sealer) = &self.sealer {
            if self.spool.failure().is_none() {
                if let Err(e) = self.spool_lines(sealer.finish()).await {
                    self.spool.fail(format!("the stage's output could not be kept for delivery: {e}"));
                }
            }
        }
        self.spool.written.send_modify(|w| w.closed = true);
        let target = self.spool.written.borrow().bytes;
        let mut sent = self.spool.sent.subscribe();
        let drained = tokio::time::timeout(self.patience, async {
            loop {
                if let Some(why) = self.spool.failure() {
                    return Err(why);
                }
                if *sent.borrow_and_update() >= target {
                    return Ok(());
                }
                if sent.changed().await.is_err() {
                    return Err("the output sender stopped".to_string());
                }
            }
        })
        .await;
        match drained {
            Ok(result) => result,
            Err(_) => Err(self.spool.fail(format!(
                "the stage's output could not be delivered within {:?}: {} of {target} bytes sent",
                self.patience,
                *self.spool.sent.borrow()
            ))),
        }
    }
}

/// Calls `call` until it succeeds, waiting with backoff and jitter while the far side is away
/// (`Unavailable`), for at most `patience`. Other errors end it at once.
async fn retry<F, Fut>(patience: Duration, call: F) -> Result<(), WorkerCallError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), WorkerCallError>>,
{
    let giving_up = tokio::time::Instant::now() + patience;
    let mut backoff = Backoff::new(Millis(100), Millis::from_secs(5));
    loop {
        match call().await {
            Err(WorkerCallError::Unavailable(e)) if tokio::time::Instant::now() < giving_up => {
                tracing::debug!(error = %e, "delivery failed; retrying");
                let delay = backoff.next(rand::thread_rng().gen());
                tokio::time::sleep(delay.to_std()).await;
            }
            other => return other,
        }
    }
}

/// The sender: sends what the spool holds beyond what was sent, a batch at a time, until the
/// job ends and everything is sent, or delivery fails for good (lease lost, refused).
async fn send_spool(client: Arc<dyn WorkerClient>, job: JobId, spool: Arc<Spool>) {
    let mut written = spool.written.subscribe();
    let mut file: Option<tokio::fs::File> = None;
    loop {
        let now = *written.borrow_and_update();
        let sent = *spool.sent.borrow();
        if sent >= now.bytes {
            if now.closed || written.changed().await.is_err() {
                return;
            }
            continue;
        }
        if file.is_none() {
            match tokio::fs::File::open(&spool.path).await {
                Ok(f) => file = Some(f),
                Err(e) => {
                    spool.fail(format!("reading the output spool: {e}"));
                    return;
                }
            }
        }
        let Some(f) = file.as_mut() else { return };
        let (lines, used) = match read_batch(f, sent, now.bytes).await {
            Ok(batch) => batch,
            Err(e) => {
                spool.fail(format!("reading the output spool: {e}"));
                return;
            }
        };
        // Until the lease is lost (the heartbeat loop then stops the job), pond refuses, or the
        // sink gives up waiting (finish's patience) and drops this task.
        let delivered = retry(Duration::from_secs(365 * 24 * 3600), || client.logs(&job, lines.clone())).await;
        if let Err(e) = delivered {
            spool.fail(format!("the stage's output could not be delivered: {e}"));
            return;
        }
        spool.sent.send_modify(|s| *s = sent + used);
    }
}

/// Whole spool records from `from` up to `end`, at most [`MAX_BATCH_BYTES`] of them (at least
/// one): the lines and how many bytes they took.
async fn read_batch(file: &mut tokio::fs::File, from: u64, end: u64) -> std::io::Result<(Vec<NewLogLine>, u64)> {
    file.seek(std::io::SeekFrom::Start(from)).await?;
    let want = (end - from).min(MAX_BATCH_BYTES.max(1));
    let mut buf = vec![0u8; want as usize];
    file.read_exact(&mut buf).await?;
    // Cut after the last whole record; a record is far smaller than a batch, but a batch that
    // holds less than one record reads that one record whole.
    let cut = match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None => {
            let mut rest = Vec::new();
            let mut byte = [0u8; 1];
            loop {
                file.read_exact(&mut byte).await?;
                rest.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
            }
            buf.extend_from_slice(&rest);
            buf.len()
        }
    };
    let mut lines = Vec::new();
    for record in buf[..cut].split(|&b| b == b'\n').filter(|r| !r.is_empty()) {
        lines.push(serde_json::from_slice(record).map_err(std::io::Error::other)?);
    }
    Ok((lines, cut as u64))
}
