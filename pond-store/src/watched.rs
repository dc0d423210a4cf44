//! [`WatchedStore`]: wraps any store and announces its changes, so waiters (the driver, log
//! followers, `--wait`) wake on a change instead of polling in a hot loop.
//!
//! Two counters: `runs` moves on run/stage changes (what the driver waits for), `output` on
//! new log lines and artifacts (what followers wait for). A `watch` channel keeps only the
//! latest value, so a burst of writes wakes each waiter once.

use std::sync::Arc;

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
        }
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

    /// Announces a change another node made (seen through the database): wakes local waiters
    /// without counting as a local write.
    pub fn announce_remote(&self, runs: bool) {
        if runs {
            bump(&self.runs);
        }
        bump(&self.output);
    }

    fn announce_run_change(&self) {
        bump(&self.runs);
        bump(&self.output);
        bump(&self.local_runs);
    }

    fn announce_output(&self) {
        bump(&self.output);
        bump(&self.local_output);
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
            self.announce_run_change();
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
        self.announce_run_change();
        Ok(out)
    }
    async fn claim_stages(&self, query: &ClaimQuery) -> Result<Vec<Claim>, StoreError> {
        let out = self.inner.claim_stages(query).await?;
        if !out.is_empty() {
            self.announce_output();
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
    async fn expire_all_leases(&self, now: Timestamp) -> Result<u64, StoreError> {
        let n = self.inner.expire_all_leases(now).await?;
        self.announce_run_change();
        Ok(n)
    }
    async fn append_logs(&self, run: RunId, lines: &[NewLogLine]) -> Result<(), StoreError> {
        self.inner.append_logs(run, lines).await?;
        self.announce_output();
        Ok(())
    }
    async fn append_log_batch(&self, lines: &[(RunId, NewLogLine)]) -> Result<(), StoreError> {
        self.inner.append_log_batch(lines).await?;
        self.announce_output();
        Ok(())
    }
    async fn read_logs(&self, run: RunId, after: i64, limit: u32) -> Result<Vec<LogLine>, StoreError> {
        self.inner.read_logs(run, after, limit).await
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
    async fn put_artifact(&self, artifact: &Artifact) -> Result<(), StoreError> {
        self.inner.put_artifact(artifact).await?;
        self.announce_output();
        Ok(())
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
}
