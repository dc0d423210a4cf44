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

/// Where a stage's output goes.
#[async_trait]
pub trait OutputSink: Send + Sync {
    /// Appends lines to the run's log.
    async fn lines(&self, lines: Vec<(LogStream, String)>);
    /// Stores an artifact of the run.
    async fn artifact(&self, name: &str, data: Vec<u8>) -> Result<(), String>;
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
    /// Runs one attempt. When `stop` fires it stops promptly and returns
    /// [`StageOutcome::Cancelled`]; the engine turns a timeout into a failure.
    async fn execute(&self, ctx: ExecContext<'_>) -> StageOutcome;
}
