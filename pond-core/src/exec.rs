//! The seams for running a stage: [`Executor`] (what runs it), [`OutputSink`] (where its logs
//! and artifacts go), [`StopSignal`] (cancel / timeout / lost lease) and [`Workspaces`] (the
//! run's checkout). Implementations live in `pond-exec`.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use async_trait::async_trait;

use crate::definition::StageDef;
use crate::ids::RunId;
use crate::run::{Run, StageOutcome};
use crate::source::ResolvedSource;
use crate::store::LogStream;

/// A boxed future, for object-safe async methods without an async runtime dependency.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a running stage must stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A caller cancelled the run (or the run failed elsewhere).
    Cancelled,
    /// The stage's timeout elapsed.
    TimedOut,
    /// The lease was lost; another attempt owns the stage.
    LeaseLost,
    /// The node is shutting down; the stage will be handed back.
    Shutdown,
}

/// Tells a running executor to stop.
pub trait StopSignal: Send + Sync {
    /// The reason, once stopping was asked for.
    fn reason(&self) -> Option<StopReason>;
    /// Resolves when stopping is asked for.
    fn stopped(&self) -> BoxFuture<'_, StopReason>;
}

/// The most bytes one log record holds: a longer line is cut into records of this size, all
/// but the last marked `continued`, as it is read (no line is ever buffered whole).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// A line of a stage's output (or a piece of one, see [`MAX_LINE_BYTES`]): its bytes exactly as
/// the process wrote them, without the newline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputLine {
    /// stdout, stderr, or pond's own note about the output (a truncation, an egress refusal).
    pub stream: LogStream,
    /// The bytes.
    pub bytes: Vec<u8>,
    /// More of the same line follows in the next piece.
    pub continued: bool,
}

impl OutputLine {
    /// A whole line of text.
    pub fn text(stream: LogStream, text: impl Into<String>) -> Self {
        OutputLine { stream, bytes: text.into().into_bytes(), continued: false }
    }

    /// The bytes as text (invalid UTF-8 replaced), for code that reads output as text.
    pub fn lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.bytes)
    }
}

/// Where a stage's output goes. Delivery is the sink's job: it retries while its destination
/// is away, and [`OutputSink::finish`] says whether everything arrived.
#[async_trait]
pub trait OutputSink: Send + Sync {
    /// Appends lines to the stage's log.
    async fn lines(&self, lines: Vec<OutputLine>);
    /// Stores an artifact of the run.
    async fn artifact(&self, name: &str, data: Vec<u8>) -> Result<(), String>;
    /// Waits until every line handed over so far is delivered; the error says what could not be
    /// (after the sink's retries), and the stage then fails with it.
    async fn finish(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Whole lines again from output pieces: each stream's `continued` pieces joined with the piece
/// that ends them. Lines come out in the order they ended.
pub fn whole_lines(pieces: &[OutputLine]) -> Vec<(LogStream, Vec<u8>)> {
    let mut open: Vec<(LogStream, Vec<u8>)> = Vec::new();
    let mut out = Vec::new();
    for piece in pieces {
        let at = match open.iter().position(|(s, _)| *s == piece.stream) {
            Some(i) => i,
            None => {
                open.push((piece.stream, Vec::new()));
                open.len() - 1
            }
        };
        open[at].1.extend_from_slice(&piece.bytes);
        if !piece.continued {
            out.push(open.remove(at));
        }
    }
    out.extend(open);
    out
}

/// What a redacted secret reads as.
pub const REDACTED: &str = "[redacted by pond]";

/// `bytes` with every occurrence of each secret (of at least 8 bytes) replaced by [`REDACTED`].
pub fn redact(bytes: &[u8], secrets: &[&[u8]]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for secret in secrets.iter().filter(|s| s.len() >= 8) {
        if out.len() < secret.len() || !out.windows(secret.len()).any(|w| w == *secret) {
            continue;
        }
        let mut next = Vec::with_capacity(out.len());
        let mut i = 0;
        while i < out.len() {
            if out[i..].starts_with(secret) {
                next.extend_from_slice(REDACTED.as_bytes());
                i += secret.len();
            } else {
                next.push(out[i]);
                i += 1;
            }
        }
        out = next;
    }
    out
}

/// A stage's log budget: lines pass until `limit` bytes have, then one note says the log was
/// truncated and the rest is dropped (still read from the process, never stored).
#[derive(Debug)]
pub struct LogBudget {
    limit: u64,
    state: std::sync::Mutex<(u64, bool)>,
}

impl LogBudget {
    /// The lines as a sink stores or sends them: cut to the budget, then sealed for a
    /// confidential run (the truncation note stays in clear, like pond's other notes).
    pub fn admit_sealed(&self, lines: Vec<OutputLine>, sealer: Option<&crate::seal::OutputSealer>) -> Vec<OutputLine> {
        let lines = self.admit(lines);
        match sealer {
            Some(sealer) if !lines.is_empty() => sealer.lines(lines),
            _ => lines,
        }
    }

    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        LogBudget { limit, state: std::sync::Mutex::new((0, false)) }
    }

    /// The lines that fit, and the truncation note the first time the budget runs out.
    pub fn admit(&self, lines: Vec<OutputLine>) -> Vec<OutputLine> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (used, truncated) = &mut *state;
        if *truncated {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(lines.len());
        for line in lines {
            let size = line.bytes.len() as u64 + 1;
            if *used + size > self.limit {
                *truncated = true;
                out.push(OutputLine::text(
                    LogStream::System,
                    format!(
                        "log truncated at {} bytes (this server's per-stage log cap): later output was read but not kept",
                        *used
                    ),
                ));
                break;
            }
            *used += size;
            out.push(line);
        }
        out
    }
}

/// A run's checkout on this node.
#[derive(Clone, Debug)]
pub struct Workspace {
    /// The working directory for stages: the first source's checkout, or an empty directory.
    pub cwd: PathBuf,
    /// Every source by label.
    pub sources: Vec<(String, PathBuf)>,
    /// What fetching each source found, in the run's source order.
    pub resolved: Vec<ResolvedSource>,
}

/// Fetches and removes run checkouts.
#[async_trait]
pub trait Workspaces: Send + Sync {
    /// The run's checkout, fetched on first use on this node (reproducing `resolved` sources).
    async fn prepare(&self, run: &Run) -> Result<Workspace, String>;
    /// Removes the run's checkout (the run ended).
    async fn release(&self, run: RunId);
    /// The run's checkout (prepared first) as a tar.zst bundle of its sources by label, for a
    /// pool worker.
    async fn pack(&self, run: &Run) -> Result<Vec<u8>, String>;
}

/// Everything an executor gets for one attempt.
pub struct ExecContext<'a> {
    /// The run.
    pub run: &'a Run,
    /// The stage's definition.
    pub stage: &'a StageDef,
    /// The attempt number.
    pub attempt: u32,
    /// The checkout.
    pub workspace: &'a Workspace,
    /// Logs and artifacts.
    pub output: &'a dyn OutputSink,
    /// Cancel, timeout, lost lease.
    pub stop: &'a dyn StopSignal,
    /// For a stage with `foreach`: the items it fans out over (the lines of the named artifact).
    pub items: Option<&'a [String]>,
}

/// Runs stages of one executor kind.
#[async_trait]
pub trait Executor: Send + Sync {
    /// The `kind` it handles.
    fn kind(&self) -> &'static str;
    /// Whether its stages use the run's checkout. One that does not (a timer) skips the
    /// checkout directory when the run has no sources either: no directory made and removed.
    fn needs_workspace(&self) -> bool {
        true
    }
    /// Runs one attempt. When `stop` fires it stops promptly and returns
    /// [`StageOutcome::Cancelled`]; the engine turns a timeout into a failure.
    async fn execute(&self, ctx: ExecContext<'_>) -> StageOutcome;
}
