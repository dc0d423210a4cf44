//! The [`Driver`]: the loop that makes an [`Engine`] do work on this node.
//!
//! It claims as many ready stages as it has free slots, runs each in its own task while
//! renewing the lease, enforces the stage timeout, stops the attempt when a cancel arrives or
//! the lease is lost, and records the outcome (retrying while the store is unavailable).
//! It wakes when the store reports a change and, as a fallback, every `poll` interval (which
//! also picks up retries whose backoff has passed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pond_core::engine::Engine;
use pond_core::exec::{StopReason, StopSignal};
use pond_core::ids::RunId;
use pond_core::run::StageOutcome;
use pond_core::store::{Claim, LeaseStatus};
use pond_core::CoreError;
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::stop::StopHandle;

/// Settings of a driver.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Stages run at once on this node.
    pub slots: usize,
    /// Longest wait between two claims when nothing wakes the driver.
    pub poll: Duration,
    /// How often stages of vanished holders are reaped.
    pub sweep_every: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig { slots: 16, poll: Duration::from_millis(500), sweep_every: Duration::from_secs(1) }
    }
}

/// An attempt in progress here: how to make it check its lease now, and how to stop it.
type Running = (Arc<Notify>, StopHandle);

/// An attempt's outcome waiting to be recorded, with where the answer goes.
type Completion = (Claim, StageOutcome, oneshot::Sender<Result<(), CoreError>>);

/// Most outcomes recorded in one store write.
const COMPLETION_BATCH: usize = 256;

/// Most attempts that have ended here and wait for their outcome to be recorded. An attempt
/// frees its slot when it ends (the slot bounds what runs, and nothing runs any more), and
/// takes one of these instead until its outcome is stored, so a slow store holds back new
/// claims without holding back stages ready to run.
const RECORDING: usize = 4 * COMPLETION_BATCH;

/// Runs claimed stages of an engine.
pub struct Driver {
    engine: Arc<Engine>,
    config: DriverConfig,
    wake: watch::Receiver<u64>,
    running: Mutex<HashMap<RunId, Vec<Running>>>,
    slots: Arc<Semaphore>,
    recording: Arc<Semaphore>,
    completions: mpsc::Sender<Completion>,
    /// Taken by the first [`Driver::run`], which starts the task that records outcomes.
    completion_queue: Mutex<Option<mpsc::Receiver<Completion>>>,
}

/// Records outcomes as they come, whatever are waiting together in one store write (group
/// commit): with many short stages ending at once, one transaction instead of one each.
async fn record_outcomes(engine: Arc<Engine>, mut queue: mpsc::Receiver<Completion>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < COMPLETION_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let items: Vec<(&Claim, &StageOutcome)> = batch.iter().map(|(c, o, _)| (c, o)).collect();
        let results = engine.complete_many(&items).await;
        drop(items);
        for ((_, _, reply), result) in batch.into_iter().zip(results) {
            let _ = reply.send(result.map(|_| ()));
        }
    }
}

impl Driver {
    /// A driver for `engine` that wakes whenever `wake` changes.
    pub fn new(engine: Arc<Engine>, config: DriverConfig, wake: watch::Receiver<u64>) -> Arc<Self> {
        let slots = Arc::new(Semaphore::new(config.slots));
        let (completions, queue) = mpsc::channel(COMPLETION_BATCH);
        Arc::new(Driver {
            engine,
            config,
            wake,
            running: Mutex::new(HashMap::new()),
            slots,
            recording: Arc::new(Semaphore::new(RECORDING)),
            completions,
            completion_queue: Mutex::new(Some(queue)),
        })
    }

    /// Tells the attempts of `run` running here to check their lease now (a cancel arrived).
    pub fn poke(&self, run: RunId) {
        let map = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for (n, _) in map.get(&run).into_iter().flatten() {
            n.notify_one();
        }
    }

    /// Claims and runs stages until `shutdown` turns true, then waits up to `drain` for the
    /// attempts in progress to finish. Attempts still running after that are stopped and handed
    /// back, so another node takes them at once instead of after their lease expires.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>, drain: Duration) {
        if let Some(queue) = self.completion_queue.lock().unwrap_or_else(|p| p.into_inner()).take() {
            tokio::spawn(record_outcomes(self.engine.clone(), queue));
        }
        let mut wake = self.wake.clone();
        let mut last_sweep: Option<tokio::time::Instant> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            if last_sweep.is_none_or(|t| t.elapsed() >= self.config.sweep_every) {
                if let Err(e) = self.engine.sweep().await {
                    tracing::warn!(error = %e, "sweep failed");
                }
                last_sweep = Some(tokio::time::Instant::now());
            }
            wake.borrow_and_update();
            let free = self.slots.available_permits();
            let mut claimed = 0;
            if free > 0 {
                match self.engine.claim(free as u32).await {
                    Ok(claims) => {
                        claimed = claims.len();
                        for claim in claims {
                            let Ok(permit) = self.slots.clone().try_acquire_owned() else { break };
                            tokio::spawn(self.clone().attempt(claim, permit));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "claim failed"),
                }
            }
            if claimed > 0 && claimed == free {
                continue;
            }
            tokio::select! {
                _ = wake.changed() => {}
                _ = tokio::time::sleep(self.config.poll) => {}
                _ = shutdown.changed() => {}
            }
        }
        let all = self.config.slots as u32;
        if tokio::time::timeout(drain, self.slots.acquire_many(all)).await.is_err() {
            {
                let map = self.running.lock().unwrap_or_else(|p| p.into_inner());
                for (_, stop) in map.values().flatten() {
                    stop.fire(StopReason::Shutdown);
                }
            }
            // Stopping takes the executor's kill grace at most; then each attempt hands back.
            let _ = tokio::time::timeout(Duration::from_secs(60), self.slots.acquire_many(all)).await;
        }
        // Outcomes still being recorded: a stopping node stores what its stages did rather than
        // leave them to be run again after their leases expire.
        let _ = tokio::time::timeout(Duration::from_secs(30), self.recording.acquire_many(RECORDING as u32)).await;
    }

    /// Renews the lease, waiting at most `limit` (so the deadline and cancels are not held up
    /// behind a slow store); a renewal that did not finish is retried at the next tick.
    async fn check_lease(&self, claim: &Claim, stop: &StopHandle, limit: Duration) {
        let renewed = tokio::time::timeout(limit, self.engine.renew(claim)).await.unwrap_or_else(|_| {
            Err(CoreError::Store(pond_core::StoreError::Unavailable("lease renewal timed out".into())))
        });
        match renewed {
            Ok(LeaseStatus::Held { cancel_requested: true }) => stop.fire(StopReason::Cancelled),
            Ok(LeaseStatus::Lost) => stop.fire(StopReason::LeaseLost),
            Ok(LeaseStatus::Held { .. }) => {}
            // The store is away: keep working; if it stays away the lease expires and the
            // attempt's result will be refused as stale.
            Err(e) => tracing::warn!(run = %claim.run.id, stage = %claim.stage.key, error = %e, "lease renewal failed"),
        }
    }

    /// Records an outcome through the group-commit task (directly, should it be gone).
    async fn record(&self, claim: &Claim, outcome: StageOutcome) -> Result<(), CoreError> {
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError((claim, outcome, _))) =
            self.completions.send((claim.clone(), outcome, reply)).await
        {
            return self.engine.complete(&claim, outcome).await.map(|_| ());
        }
        answer.await.unwrap_or_else(|_| {
            Err(CoreError::Store(pond_core::StoreError::Unavailable("the outcome recorder stopped".into())))
        })
    }

    async fn attempt(self: Arc<Self>, claim: Claim, permit: OwnedSemaphorePermit) {
        let run = claim.run.id;
        let stop = StopHandle::new();
        let poke = Arc::new(Notify::new());
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(run)
            .or_default()
            .push((poke.clone(), stop.clone()));
        let timeout = claim
            .run
            .definition
            .stages
            .get(claim.stage.position as usize)
            .map(|s| s.effective_timeout())
            .unwrap_or_default();
        let renew_every =
            (self.engine.config().lease.to_std() / 3).clamp(Duration::from_millis(100), Duration::from_secs(10));
        // The stage runs in a task of its own, so it is polled whatever the renewal below is
        // waiting for. (Driven inside this select!, a stage paused mid-transaction on the store's
        // one writer connection would wait for the renewal, and the renewal for that
        // connection: every write stalled until the pool's acquire timeout.)
        let exec = {
            let (engine, claim, stop) = (self.engine.clone(), claim.clone(), stop.clone());
            tokio::spawn(async move { engine.execute(&claim, &stop).await })
        };
        let outcome = {
            tokio::pin!(exec);
            let deadline = tokio::time::sleep(timeout.to_std());
            tokio::pin!(deadline);
            let mut ticker = tokio::time::interval(renew_every);
            // A renewal that took long is followed by the next one on time, not by a burst.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                tokio::select! {
                    joined = &mut exec => break joined.unwrap_or_else(|e| StageOutcome::Failed {
                        error: format!("the stage's executor stopped abnormally: {e}"),
                        exit_code: None,
                    }),
                    _ = &mut deadline, if stop.reason().is_none() => stop.fire(StopReason::TimedOut),
                    _ = ticker.tick() => self.check_lease(&claim, &stop, renew_every).await,
                    _ = poke.notified() => self.check_lease(&claim, &stop, renew_every).await,
                }
            }
        };
        {
            let mut map = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(list) = map.get_mut(&run) {
                list.retain(|(n, _)| !Arc::ptr_eq(n, &poke));
                if list.is_empty() {
                    map.remove(&run);
                }
            }
        }
        if stop.reason() == Some(StopReason::LeaseLost) {
            tracing::warn!(%run, stage = %claim.stage.key, attempt = claim.stage.attempt, "lease lost; result dropped");
            return;
        }
        if stop.reason() == Some(StopReason::Shutdown) {
            if let Err(e) = self.engine.hand_back(&claim).await {
                tracing::warn!(%run, stage = %claim.stage.key, error = %e, "could not hand the stage back; its lease will expire instead");
            }
            return;
        }
        // The stage has ended: its slot goes to the next one while the outcome is recorded.
        // (The semaphore is never closed; were it, the outcome is still recorded.)
        let _recording = self.recording.clone().acquire_owned().await.ok();
        drop(permit);
        // Keep trying while the store is away: nobody else can claim the stage meanwhile, and
        // recording this result as soon as it is back beats re-running the stage elsewhere.
        let mut delay = Duration::from_millis(100);
        let giving_up = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            match self.record(&claim, outcome.clone()).await {
                Ok(()) => return,
                Err(CoreError::StaleAttempt { .. }) => {
                    tracing::warn!(%run, stage = %claim.stage.key, "result refused: the attempt no longer holds the stage");
                    return;
                }
                Err(e) if tokio::time::Instant::now() >= giving_up => {
                    tracing::error!(%run, stage = %claim.stage.key, error = %e, "could not record the result; the stage will be retried after its lease expires");
                    return;
                }
                Err(e) => {
                    tracing::warn!(%run, stage = %claim.stage.key, error = %e, "recording the result failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}
