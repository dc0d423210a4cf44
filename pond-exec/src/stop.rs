//! [`StopHandle`]: the tokio implementation of pond-core's `StopSignal`.

use pond_core::exec::{BoxFuture, StopReason, StopSignal};
use tokio::sync::watch;

/// Fires once with a reason; every waiter sees the first reason.
#[derive(Clone)]
pub struct StopHandle {
    tx: std::sync::Arc<watch::Sender<Option<StopReason>>>,
}

impl Default for StopHandle {
    fn default() -> Self {
        StopHandle { tx: std::sync::Arc::new(watch::channel(None).0) }
    }
}

impl StopHandle {
    /// A handle that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the holder to stop; later calls keep the first reason.
    pub fn fire(&self, reason: StopReason) {
        self.tx.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
    }
}

impl StopSignal for StopHandle {
    fn reason(&self) -> Option<StopReason> {
        *self.tx.borrow()
    }

    fn stopped(&self) -> BoxFuture<'_, StopReason> {
        let mut rx = self.tx.subscribe();
        Box::pin(async move {
            match rx.wait_for(Option::is_some).await {
                Ok(reason) => reason.unwrap_or(StopReason::Cancelled),
                // The sender lives as long as `self`, so this cannot happen while borrowed.
                Err(_) => StopReason::Cancelled,
            }
        })
    }
}

/// The engine's [`pond_core::time::Pause`] on tokio's timer.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokioPause;

impl pond_core::time::Pause for TokioPause {
    fn pause(&self, delay: pond_core::time::Millis) -> pond_core::exec::BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(delay.to_std()))
    }
}
