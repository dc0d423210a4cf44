//! The `noop` executor: succeeds, optionally after a delay (a placeholder or a timer stage).

use async_trait::async_trait;
use pond_core::definition::ExecutorSpec;
use pond_core::exec::{ExecContext, Executor};
use pond_core::run::StageOutcome;

/// Runs `noop` stages.
#[derive(Debug, Default)]
pub struct NoopExecutor;

#[async_trait]
impl Executor for NoopExecutor {
    fn kind(&self) -> &'static str {
        "noop"
    }

    fn needs_workspace(&self) -> bool {
        false
    }

    async fn execute(&self, ctx: ExecContext<'_>) -> StageOutcome {
        let delay = match &ctx.stage.executor {
            ExecutorSpec::Noop(spec) => spec.delay.unwrap_or_default(),
            _ => return StageOutcome::Failed { error: "not a noop stage".into(), exit_code: None },
        };
        if delay.0 == 0 {
            return StageOutcome::Succeeded;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay.to_std()) => StageOutcome::Succeeded,
            _ = ctx.stop.stopped() => StageOutcome::Cancelled,
        }
    }
}
