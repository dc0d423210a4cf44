//! What the SQL stores share to write many runs at once: applying a batch of mutations to the
//! snapshots loaded for it, the rows that then differ, and group commit for queued writes.

use std::collections::HashMap;

use pond_core::events::NewEvent;
use pond_core::ids::RunId;
use pond_core::run::{Attempt, Run, RunSnapshot, Stage};
use pond_core::store::{NewLogLine, RunMutation};
use pond_core::StoreError;

/// A batch of mutations applied in memory, ready to be written in one transaction.
pub(crate) struct Applied {
    /// One per mutation, in order: the run as that mutation left it, or why it did not apply.
    pub results: Vec<Result<RunSnapshot, StoreError>>,
    /// Each run of the batch: as loaded, and as its last applied mutation left it (the rows
    /// to write are what differs; [`Rows::of`] skips the rest).
    pub runs: Vec<(RunSnapshot, RunSnapshot)>,
    /// The log lines the mutations returned, in order.
    pub lines: Vec<(RunId, NewLogLine)>,
    /// The events of each step, in order.
    pub events: Vec<NewEvent>,
}

/// Runs each mutation over its run as loaded and as the earlier mutations of the batch left it.
/// A run missing from `loaded` gives that item `NotFound`; a mutation's error, `Rejected`.
pub(crate) fn apply(loaded: Vec<RunSnapshot>, changes: &mut [(RunId, RunMutation<'_>)]) -> Applied {
    let at = crate::wall_clock();
    let mut current: HashMap<RunId, RunSnapshot> = loaded.iter().map(|s| (s.run.id, s.clone())).collect();
    let mut applied = Applied {
        results: Vec::with_capacity(changes.len()),
        runs: Vec::with_capacity(loaded.len()),
        lines: Vec::new(),
        events: Vec::new(),
    };
    for (id, mutate) in changes.iter_mut() {
        let Some(before) = current.get(id) else {
            applied.results.push(Err(StoreError::NotFound(format!("run {id}"))));
            continue;
        };
        let mut after = before.clone();
        match mutate(&mut after) {
            Ok(lines) => {
                applied.events.extend(pond_core::events::changes(Some(before), &after, at));
                applied.lines.extend(lines.into_iter().map(|l| (*id, l)));
                applied.results.push(Ok(after.clone()));
                current.insert(*id, after);
            }
            Err(e) => applied.results.push(Err(StoreError::Rejected(Box::new(e)))),
        }
    }
    for before in loaded {
        if let Some(after) = current.remove(&before.run.id) {
            applied.runs.push((before, after));
        }
    }
    applied
}

/// The rows that differ between the `before` and `after` of some runs (every row of a run
/// with no `before`).
#[derive(Default)]
pub(crate) struct Rows<'a> {
    pub inserted_runs: Vec<&'a Run>,
    pub updated_runs: Vec<&'a Run>,
    pub stages: Vec<(RunId, &'a Stage)>,
    pub attempts: Vec<(RunId, &'a Attempt)>,
}

impl<'a> Rows<'a> {
    pub fn of(pairs: impl IntoIterator<Item = (Option<&'a RunSnapshot>, &'a RunSnapshot)>) -> Self {
        let mut rows = Rows::default();
        for (before, after) in pairs {
            let id = after.run.id;
            match before {
                None => rows.inserted_runs.push(&after.run),
                Some(b) if b.run != after.run => rows.updated_runs.push(&after.run),
                Some(_) => {}
            }
            for stage in &after.stages {
                if !before.and_then(|b| b.stage(&stage.key)).is_some_and(|old| old == stage) {
                    rows.stages.push((id, stage));
                }
            }
            for attempt in &after.attempts {
                if !before.is_some_and(|b| b.attempts.iter().any(|old| old == attempt)) {
                    rows.attempts.push((id, attempt));
                }
            }
        }
        rows
    }
}

/// Groups loaded rows into snapshots, in the order of `runs`.
pub(crate) fn assemble(
    runs: Vec<Run>,
    stages: Vec<(RunId, Stage)>,
    attempts: Vec<(RunId, Attempt)>,
) -> Vec<RunSnapshot> {
    let order: Vec<RunId> = runs.iter().map(|r| r.id).collect();
    let mut by_run: HashMap<RunId, RunSnapshot> =
        runs.into_iter().map(|run| (run.id, RunSnapshot { run, stages: Vec::new(), attempts: Vec::new() })).collect();
    for (id, stage) in stages {
        if let Some(s) = by_run.get_mut(&id) {
            s.stages.push(stage);
        }
    }
    for (id, attempt) in attempts {
        if let Some(s) = by_run.get_mut(&id) {
            s.attempts.push(attempt);
        }
    }
    order.into_iter().filter_map(|id| by_run.remove(&id)).collect()
}

/// A write waiting for the next group commit, with where its answer goes.
pub(crate) type Queued<T, R> = (T, tokio::sync::oneshot::Sender<Result<R, StoreError>>);

/// Group commit: whatever writes are waiting when a batch can start go into one call of
/// `commit` (up to `max`), with at most `concurrency` batches in flight (PostgreSQL commits
/// several at once on its pool; SQLite has one writer). One transaction per write costs a
/// `BEGIN`, a `COMMIT` (a WAL sync on PostgreSQL) and a connection handoff each; under
/// concurrent writers that, not the database, is the limit. When a batch fails, its writes are
/// tried one by one, so one bad write cannot fail the others.
pub(crate) async fn group_commit<T, R, C>(
    mut queue: tokio::sync::mpsc::Receiver<Queued<T, R>>,
    max: usize,
    concurrency: usize,
    commit: C,
) where
    T: Send,
    R: Send,
    C: for<'a> Fn(&'a [&'a T]) -> futures_util::future::BoxFuture<'a, Result<Vec<R>, StoreError>>,
{
    use futures_util::StreamExt;
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            item = queue.recv(), if in_flight.len() < concurrency.max(1) => {
                let Some(first) = item else { break };
                let mut batch = vec![first];
                while batch.len() < max {
                    match queue.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                in_flight.push(commit_batch(batch, &commit));
            }
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
    }
    while in_flight.next().await.is_some() {}
}

async fn commit_batch<T, R, C>(mut batch: Vec<Queued<T, R>>, commit: &C)
where
    C: for<'a> Fn(&'a [&'a T]) -> futures_util::future::BoxFuture<'a, Result<Vec<R>, StoreError>>,
{
    let items: Vec<&T> = batch.iter().map(|(t, _)| t).collect();
    let outcome = commit(&items).await;
    drop(items);
    match outcome {
        Ok(results) if results.len() == batch.len() => {
            for ((_, reply), result) in batch.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Ok(_) => {
            for (_, reply) in batch {
                let _ = reply.send(Err(StoreError::Backend("a batch write answered the wrong count".into())));
            }
        }
        Err(_) if batch.len() > 1 => {
            for (item, reply) in batch {
                let one = commit(&[&item])
                    .await
                    .and_then(|mut v| v.pop().ok_or_else(|| StoreError::Backend("a write answered nothing".into())));
                let _ = reply.send(one);
            }
        }
        Err(e) => {
            if let Some((_, reply)) = batch.pop() {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// Sends `item` to a group-commit queue and waits for its answer.
pub(crate) async fn queue_write<T, R>(
    queue: &tokio::sync::mpsc::Sender<Queued<T, R>>,
    item: T,
    what: &str,
) -> Result<R, StoreError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let stopped = || StoreError::Unavailable(format!("the {what} queue has stopped"));
    queue.send((item, reply)).await.map_err(|_| stopped())?;
    answer.await.map_err(|_| stopped())?
}
