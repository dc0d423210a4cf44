//! [`WatchedStore`]: wraps any store and announces its changes, so waiters (the driver, log
//! followers, `--wait`) wake on a change instead of polling in a hot loop.
//!
//! Counters: `runs` moves on run/stage changes (what the driver waits for), `output` on new log
//! lines and artifacts too, and one counter per followed run (what a log follower waits for, so
//! a thousand followers are not all woken by every line of every run). A `watch` channel keeps
//! only the latest value, so a burst of writes wakes each waiter once. Changes seen from other
//! nodes (which carry no run id) wake every follower.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pond_core::ids::{BlobId, RunId, TokenId};
use pond_core::run::{Run, RunSnapshot};
use pond_core::store::{
    Artifact, BlobMeta, Claim, ClaimQuery, InsertOutcome, LeaseStatus, LogLine, NewLogLine, RunMutation, RunQuery,
    Store, TokenRecord,
};
use pond_core::time::Timestamp;
use pond_core::StoreError;
use tokio::sync::watch;

/// A store that reports its writes.
pub struct WatchedStore {
    inner: Arc<dyn Store>,
    runs: watch::Sender<u64>,
    output: watch::Sender<u64>,
    // Writes made through this process only (what a relay tells other nodes about).
    local_runs: watch::Sender<u64>,
    local_output: watch::Sender<u64>,
    // Pool members (credentials, revocations, drains): caches of them listen (see
    // `pond_core::pool::Pools::forget_credentials`); the local one is relayed to other nodes.
    members: watch::Sender<u64>,
    local_members: watch::Sender<u64>,
    // One channel per run someone follows; dropped when its last follower leaves.
    per_run: Mutex<HashMap<RunId, watch::Sender<u64>>>,
}

impl WatchedStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        WatchedStore {
            inner,
            runs: watch::channel(0).0,
            output: watch::channel(0).0,
            local_runs: watch::channel(0).0,
            local_output: watch::channel(0).0,
            members: watch::channel(0).0,
            local_members: watch::channel(0).0,
            per_run: Mutex::new(HashMap::new()),
        }
    }

    /// Changes when `run` changes or gets output (or when another node changed anything).
    pub fn run_changed(&self, run: RunId) -> watch::Receiver<u64> {
        let mut map = self.per_run.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 1024 {
            map.retain(|_, tx| tx.receiver_count() > 0);
        }
        map.entry(run).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    fn bump_runs<'a>(&self, runs: impl IntoIterator<Item = &'a RunId>) {
        let mut map = self.per_run.lock().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return;
        }
        for run in runs {
            if let Some(tx) = map.get(run) {
                if tx.receiver_count() == 0 {
                    map.remove(run);
                } else {
                    bump(tx);
                }
            }
        }
    }

    fn bump_all_runs(&self) {
        let map = self.per_run.lock().unwrap_or_else(|p| p.into_inner());
        map.values().for_each(bump);
    }

    /// Changes when a run or stage changes.
    pub fn runs_changed(&self) -> watch::Receiver<u64> {
        self.runs.subscribe()
    }

    /// Changes when a run or stage changes, or log lines or artifacts arrive.
    pub fn output_changed(&self) -> watch::Receiver<u64> {
        self.output.subscribe()
    }

    /// Changes when this process changed a run (for relaying to other nodes).
    pub fn local_runs_changed(&self) -> watch::Receiver<u64> {
        self.local_runs.subscribe()
    }

    /// Changes when this process appended output (for relaying to other nodes).
    pub fn local_output_changed(&self) -> watch::Receiver<u64> {
        self.local_output.subscribe()
    }

    /// Changes when a pool member's record changes (here or, relayed, on another node).
    pub fn members_changed(&self) -> watch::Receiver<u64> {
        self.members.subscribe()
    }

    /// Changes when this process changed a pool member's record (for relaying to other nodes).
    pub fn local_members_changed(&self) -> watch::Receiver<u64> {
        self.local_members.subscribe()
    }

    /// Announces that another node changed a pool member (or that such a change may have been
    /// missed: the relay reconnected).
    pub fn announce_remote_members(&self) {
        bump(&self.members);
    }

    fn announce_record(&self, kind: &str) {
        if kind == pond_core::pool::MEMBER_RECORD {
            bump(&self.members);
            bump(&self.local_members);
        }
    }

    /// Announces a change another node made (seen through the database): wakes local waiters
    /// without counting as a local write.
    pub fn announce_remote(&self, runs: bool) {
        if runs {
            bump(&self.runs);
        }
        bump(&self.output);
        self.bump_all_runs();
    }

    fn announce_run_change<'a>(&self, runs: impl IntoIterator<Item = &'a RunId>) {
        bump(&self.runs);
        bump(&self.output);
        bump(&self.local_runs);
        self.bump_runs(runs);
    }

    fn announce_output<'a>(&self, runs: impl IntoIterator<Item = &'a RunId>) {
        bump(&self.output);
        bump(&self.local_output);
        self.bump_runs(runs);
    }
}

fn bump(counter: &watch::Sender<u64>) {
    counter.send_modify(|v| *v = v.wrapping_add(1));
}

#[async_trait]
impl Store for WatchedStore {
    async fn insert_run(&self, snapshot: &RunSnapshot) -> Result<InsertOutcome, StoreError> {
        let out = self.inner.insert_run(snapshot).await?;
        if matches!(out, InsertOutcome::Created) {
            self.announce_run_change([&snapshot.run.id]);
        }
        Ok(out)
    }
    async fn get_run(&self, id: RunId) -> Result<Option<RunSnapshot>, StoreError> {
        self.inner.get_run(id).await
    }
    async fn list_runs(&self, query: &RunQuery) -> Result<Vec<Run>, StoreError> {
        self.inner.list_runs(query).await
    }
    async fn update_run(&self, id: RunId, mutate: RunMutation<'_>) -> Result<RunSnapshot, StoreError> {
        let out = self.inner.update_run(id, mutate).await?;
        self.announce_run_change([&id]);
        Ok(out)
    }
    async fn update_runs(&self, changes: &mut [(RunId, RunMutation<'_>)]) -> Vec<Result<RunSnapshot, StoreError>> {
        let results = self.inner.update_runs(changes).await;
        let changed: Vec<&RunId> =
            changes.iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|((id, _), _)| id).collect();
        if !changed.is_empty() {
            self.announce_run_change(changed);
        }
        results
    }
    async fn claim_stages(&self, query: &ClaimQuery) -> Result<Vec<Claim>, StoreError> {
        let out = self.inner.claim_stages(query).await?;
        if !out.is_empty() {
            self.announce_output(out.iter().map(|c| &c.run.id));
        }
        Ok(out)
    }
    async fn claim_stages_logged(
        &self,
        query: &ClaimQuery,
        line: pond_core::store::ClaimLine<'_>,
    ) -> Result<Vec<Claim>, StoreError> {
        let out = self.inner.claim_stages_logged(query, line).await?;
        if !out.is_empty() {
            self.announce_output(out.iter().map(|c| &c.run.id));
        }
        Ok(out)
    }
    async fn renew_lease(
        &self,
        run: RunId,
        stage: &str,
        attempt: u32,
        owner: &str,
        until: Timestamp,
    ) -> Result<LeaseStatus, StoreError> {
        self.inner.renew_lease(run, stage, attempt, owner, until).await
    }
    async fn runs_to_reap(&self, now: Timestamp, limit: u32) -> Result<Vec<RunId>, StoreError> {
        self.inner.runs_to_reap(now, limit).await
    }
    async fn stage_counts(&self, now: Timestamp) -> Result<Vec<pond_core::store::StageCount>, StoreError> {
        self.inner.stage_counts(now).await
    }
    async fn expire_all_leases(&self, now: Timestamp) -> Result<u64, StoreError> {
        let n = self.inner.expire_all_leases(now).await?;
        self.announce_run_change([]);
        Ok(n)
    }
    async fn append_logs(&self, run: RunId, lines: &[NewLogLine]) -> Result<(), StoreError> {
        self.inner.append_logs(run, lines).await?;
        self.announce_output([&run]);
        Ok(())
    }
    async fn append_log_batch(&self, lines: &[(RunId, NewLogLine)]) -> Result<(), StoreError> {
        self.inner.append_log_batch(lines).await?;
        self.announce_output(lines.iter().map(|(run, _)| run));
        Ok(())
    }
    async fn read_logs(&self, run: RunId, after: i64, limit: u32) -> Result<Vec<LogLine>, StoreError> {
        self.inner.read_logs(run, after, limit).await
    }
    async fn read_events(
        &self,
        after: i64,
        projects: Option<&[String]>,
        limit: u32,
    ) -> Result<Vec<pond_core::events::Event>, StoreError> {
        self.inner.read_events(after, projects, limit).await
    }
    async fn last_event_seq(&self) -> Result<i64, StoreError> {
        self.inner.last_event_seq().await
    }
    async fn delete_blob(&self, id: BlobId) -> Result<(), StoreError> {
        self.inner.delete_blob(id).await
    }
    async fn list_blobs(&self, after: Option<BlobId>, limit: u32) -> Result<Vec<BlobMeta>, StoreError> {
        self.inner.list_blobs(after, limit).await
    }
    async fn replace_blob(&self, id: BlobId, expected_sha256: &str, data: &[u8]) -> Result<bool, StoreError> {
        self.inner.replace_blob(id, expected_sha256, data).await
    }
    async fn finished_runs(&self, finished_before: Timestamp, limit: u32) -> Result<Vec<RunId>, StoreError> {
        self.inner.finished_runs(finished_before, limit).await
    }
    async fn delete_finished_run(
        &self,
        run: RunId,
        finished_before: Timestamp,
    ) -> Result<Option<RunSnapshot>, StoreError> {
        self.inner.delete_finished_run(run, finished_before).await
    }
    async fn prune_events(&self, before: Timestamp, below: i64) -> Result<u64, StoreError> {
        self.inner.prune_events(before, below).await
    }
    async fn delete_record(&self, kind: &str, key: &str) -> Result<(), StoreError> {
        self.inner.delete_record(kind, key).await?;
        self.announce_record(kind);
        Ok(())
    }
    async fn put_blob(&self, project_id: &str, data: &[u8], now: Timestamp) -> Result<BlobMeta, StoreError> {
        self.inner.put_blob(project_id, data, now).await
    }
    async fn blob_meta(&self, id: BlobId) -> Result<Option<BlobMeta>, StoreError> {
        self.inner.blob_meta(id).await
    }
    async fn read_blob_chunk(&self, id: BlobId, index: u64) -> Result<Vec<u8>, StoreError> {
        self.inner.read_blob_chunk(id, index).await
    }
    async fn read_blob_prefix(&self, id: BlobId, len: usize) -> Result<Vec<u8>, StoreError> {
        self.inner.read_blob_prefix(id, len).await
    }
    async fn append_leaf(
        &self,
        run: RunId,
        leaf: &str,
        leaf_hash: &[u8; 32],
        at: Timestamp,
    ) -> Result<u64, StoreError> {
        self.inner.append_leaf(run, leaf, leaf_hash, at).await
    }

    async fn leaf_hashes(&self, from: u64, to: Option<u64>) -> Result<Vec<[u8; 32]>, StoreError> {
        self.inner.leaf_hashes(from, to).await
    }

    async fn run_leaves(&self, run: RunId) -> Result<Vec<(u64, String)>, StoreError> {
        self.inner.run_leaves(run).await
    }
    async fn leaves_of_runs(&self, runs: &[RunId]) -> Result<Vec<(RunId, u64, String)>, StoreError> {
        self.inner.leaves_of_runs(runs).await
    }

    async fn put_artifact(&self, artifact: &Artifact, holder: &str, run_cap: u64) -> Result<(), StoreError> {
        self.inner.put_artifact(artifact, holder, run_cap).await?;
        self.announce_output([&artifact.run_id]);
        Ok(())
    }
    async fn close_output(&self, run: RunId, stage: &str, attempt: u32, holder: &str) -> Result<bool, StoreError> {
        self.inner.close_output(run, stage, attempt, holder).await
    }
    async fn list_artifacts(&self, run: RunId) -> Result<Vec<Artifact>, StoreError> {
        self.inner.list_artifacts(run).await
    }
    async fn get_artifact(&self, run: RunId, name: &str) -> Result<Option<Artifact>, StoreError> {
        self.inner.get_artifact(run, name).await
    }
    async fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.inner.insert_token(token).await
    }
    async fn insert_first_admin(&self, token: &TokenRecord) -> Result<bool, StoreError> {
        self.inner.insert_first_admin(token).await
    }
    async fn find_token(&self, secret_sha256: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.find_token(secret_sha256).await
    }
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.inner.list_tokens().await
    }
    async fn revoke_token(&self, id: TokenId, now: Timestamp) -> Result<bool, StoreError> {
        self.inner.revoke_token(id, now).await
    }
    async fn get_record(&self, kind: &str, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.get_record(kind, key).await
    }
    async fn list_records(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
        self.inner.list_records(kind).await
    }
    async fn put_record(&self, kind: &str, key: &str, body: &str) -> Result<(), StoreError> {
        self.inner.put_record(kind, key, body).await?;
        self.announce_record(kind);
        Ok(())
    }
    async fn swap_record(&self, kind: &str, key: &str, expected: Option<&str>, body: &str) -> Result<bool, StoreError> {
        let swapped = self.inner.swap_record(kind, key, expected, body).await?;
        if swapped {
            self.announce_record(kind);
        }
        Ok(swapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pond_core::store::LogStream;

    fn line(text: &str) -> NewLogLine {
        NewLogLine::text(None, 0, LogStream::Stdout, Timestamp::from_millis(0), text.into())
    }

    #[tokio::test]
    async fn a_follower_wakes_for_its_own_run_only_unless_another_node_wrote() {
        let store = WatchedStore::new(Arc::new(crate::MemoryStore::new()));
        let (a, b) = (RunId::generate(Timestamp::from_millis(1)), RunId::generate(Timestamp::from_millis(2)));
        let mut follows_a = store.run_changed(a);
        store.append_logs(b, &[line("for b")]).await.unwrap();
        assert!(!follows_a.has_changed().unwrap(), "b's output does not wake a's follower");
        store.append_logs(a, &[line("for a")]).await.unwrap();
        assert!(follows_a.has_changed().unwrap());
        follows_a.borrow_and_update();
        store.append_log_batch(&[(b, line("b")), (a, line("a"))]).await.unwrap();
        assert!(follows_a.has_changed().unwrap(), "a batch wakes every run it touches");
        follows_a.borrow_and_update();
        store.announce_remote(false);
        assert!(follows_a.has_changed().unwrap(), "a change on another node wakes every follower");
        drop(follows_a);
        store.append_logs(a, &[line("nobody listens")]).await.unwrap();
        assert!(store.per_run.lock().unwrap().is_empty(), "channels go with their last follower");
    }
}
