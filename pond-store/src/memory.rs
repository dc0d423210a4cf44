//! `MemoryStore`: the reference implementation of [`Store`], for tests and embedding. It keeps
//! whole snapshots under one mutex, so every method is trivially atomic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use pond_core::events::{self, Event, NewEvent};
use pond_core::ids::{BlobId, RunId, TokenId};
use pond_core::run::{Run, RunSnapshot, RunState, StageState, MAX_LOST_LEASES};
use pond_core::store::{
    Artifact, BlobMeta, Claim, ClaimQuery, InsertOutcome, LeaseStatus, LogLine, NewLogLine, Role, RunMutation,
    RunQuery, Store, TokenRecord, BLOB_CHUNK_BYTES,
};
use pond_core::time::Timestamp;
use pond_core::StoreError;

use crate::sha256_hex;

#[derive(Default)]
struct Inner {
    runs: BTreeMap<RunId, RunSnapshot>,
    // Runs not yet ended: claims scan only these.
    active: BTreeSet<RunId>,
    idempotency: HashMap<(String, String), RunId>,
    logs: HashMap<RunId, Vec<LogLine>>,
    next_seq: i64,
    blobs: HashMap<BlobId, (BlobMeta, Vec<u8>)>,
    artifacts: HashMap<RunId, BTreeMap<String, Artifact>>,
    // Attempts whose output is closed (attempt numbers only grow, so this never reopens).
    closed_outputs: BTreeSet<(RunId, String, u32)>,
    tokens: BTreeMap<TokenId, TokenRecord>,
    records: BTreeMap<(String, String), String>,
    // The transparency log: (run, leaf, leaf hash) by index.
    log: Vec<(RunId, String, [u8; 32])>,
    // Run and stage state changes, in order (an event's seq is its index + 1 + events_pruned).
    events: Vec<Event>,
    events_pruned: usize,
}

/// A store that keeps everything in memory.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        // A panic while holding the lock would leave a half-applied change; refuse to go on.
        self.inner.lock().map_err(|_| StoreError::Backend("memory store lock poisoned".into()))
    }
}

fn track_active(inner: &mut Inner, snapshot: &RunSnapshot) {
    if snapshot.run.state.is_terminal() {
        inner.active.remove(&snapshot.run.id);
    } else {
        inner.active.insert(snapshot.run.id);
    }
}

fn push_events(inner: &mut Inner, events: Vec<NewEvent>) {
    for event in events {
        let seq = (inner.events_pruned + inner.events.len()) as i64 + 1;
        inner.events.push(Event { seq, event });
    }
}

fn push_logs(inner: &mut Inner, run: RunId, lines: &[NewLogLine]) {
    let mut seq = inner.next_seq;
    let log = inner.logs.entry(run).or_default();
    for line in lines {
        // A line whose producer number is already stored (a retried batch) is skipped.
        let again = line.line_seq.is_some()
            && log.iter().any(|l| {
                l.line.line_seq == line.line_seq && l.line.stage == line.stage && l.line.attempt == line.attempt
            });
        if again {
            continue;
        }
        seq += 1;
        log.push(LogLine { seq, line: line.clone() });
    }
    inner.next_seq = seq;
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert_run(&self, snapshot: &RunSnapshot) -> Result<InsertOutcome, StoreError> {
        let mut inner = self.lock()?;
        let run = &snapshot.run;
        if let Some(key) = &run.idempotency_key {
            let slot = (run.project_id.clone(), key.clone());
            if let Some(existing) = inner.idempotency.get(&slot) {
                let existing = inner.runs[existing].clone();
                return Ok(InsertOutcome::Existing(Box::new(existing)));
            }
            inner.idempotency.insert(slot, run.id);
        }
        if inner.runs.contains_key(&run.id) {
            return Err(StoreError::Conflict(format!("run {} exists", run.id)));
        }
        inner.runs.insert(run.id, snapshot.clone());
        track_active(&mut inner, snapshot);
        push_events(&mut inner, events::changes(None, snapshot, crate::wall_clock()));
        Ok(InsertOutcome::Created)
    }

    async fn get_run(&self, id: RunId) -> Result<Option<RunSnapshot>, StoreError> {
        Ok(self.lock()?.runs.get(&id).cloned())
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<Vec<Run>, StoreError> {
        let inner = self.lock()?;
        let upper = query.before.map(std::ops::Bound::Excluded).unwrap_or(std::ops::Bound::Unbounded);
        Ok(inner
            .runs
            .range((std::ops::Bound::Unbounded, upper))
            .rev()
            .map(|(_, s)| &s.run)
            .filter(|r| query.projects.as_ref().is_none_or(|p| p.contains(&r.project_id)))
            .filter(|r| query.state.is_none_or(|s| r.state == s))
            .filter(|r| query.matches_text(r))
            .take(query.limit as usize)
            .cloned()
            .collect())
    }

    async fn update_run(&self, id: RunId, mutate: RunMutation<'_>) -> Result<RunSnapshot, StoreError> {
        let mut inner = self.lock()?;
        let before = inner.runs.get(&id).cloned().ok_or_else(|| StoreError::NotFound(format!("run {id}")))?;
        let mut snapshot = before.clone();
        let lines = mutate(&mut snapshot).map_err(|e| StoreError::Rejected(Box::new(e)))?;
        track_active(&mut inner, &snapshot);
        inner.runs.insert(id, snapshot.clone());
        push_events(&mut inner, events::changes(Some(&before), &snapshot, crate::wall_clock()));
        push_logs(&mut inner, id, &lines);
        Ok(snapshot)
    }

    async fn claim_stages(&self, query: &ClaimQuery) -> Result<Vec<Claim>, StoreError> {
        let mut inner = self.lock()?;
        if query.offer.is_some() {
            let busy = inner.active.iter().any(|id| {
                inner.runs[id].stages.iter().any(|s| {
                    s.state == pond_core::run::StageState::Running
                        && s.lease_owner.as_deref() == Some(query.owner.as_str())
                        && s.lease_expires_at.is_some_and(|t| t > query.now)
                })
            });
            if busy {
                return Ok(Vec::new());
            }
        }
        let mut picked: Vec<(Timestamp, RunId, String)> = Vec::new();
        for id in &inner.active {
            let snapshot = &inner.runs[id];
            for stage in &snapshot.stages {
                let admitted = match (&query.offer, &stage.requirements) {
                    (Some(offer), Some(required)) => {
                        pond_core::routing::admits(required, &snapshot.run.project_id, offer)
                    }
                    (Some(_), None) => false,
                    (None, _) => true,
                };
                if admitted && stage.claimable(query.now) && query.kinds.contains(&stage.executor_kind) {
                    let order = stage.ready_at.or(stage.lease_expires_at).unwrap_or_default();
                    picked.push((order, *id, stage.key.clone()));
                }
            }
        }
        picked.sort();
        picked.truncate(query.limit as usize);
        let mut claims = Vec::with_capacity(picked.len());
        for (_, id, key) in picked {
            let Some(snapshot) = inner.runs.get_mut(&id) else { continue };
            let run_was_queued = snapshot.run.state == RunState::Queued;
            let stage_was = snapshot.stage(&key).map(|s| s.state.as_str()).unwrap_or("queued");
            snapshot
                .claim_stage(&key, &query.owner, query.now, query.lease_until)
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            let stage =
                snapshot.stage(&key).cloned().ok_or_else(|| StoreError::Corrupt(format!("stage {key} vanished")))?;
            let run = snapshot.run.clone();
            push_events(&mut inner, events::claimed(&run, &stage, run_was_queued, stage_was, crate::wall_clock()));
            claims.push(Claim { run, stage });
        }
        Ok(claims)
    }

    async fn renew_lease(
        &self,
        run: RunId,
        stage: &str,
        attempt: u32,
        owner: &str,
        until: Timestamp,
    ) -> Result<LeaseStatus, StoreError> {
        let mut inner = self.lock()?;
        let Some(snapshot) = inner.runs.get_mut(&run) else { return Ok(LeaseStatus::Lost) };
        let Some(s) = snapshot.stages.iter_mut().find(|s| s.key == stage) else { return Ok(LeaseStatus::Lost) };
        if s.state != StageState::Running || s.attempt != attempt || s.lease_owner.as_deref() != Some(owner) {
            return Ok(LeaseStatus::Lost);
        }
        s.lease_expires_at = Some(until);
        Ok(LeaseStatus::Held { cancel_requested: s.cancel_requested })
    }

    async fn stage_counts(&self, now: Timestamp) -> Result<Vec<pond_core::store::StageCount>, StoreError> {
        let inner = self.lock()?;
        let mut counts: std::collections::BTreeMap<(bool, bool, bool), u64> = Default::default();
        for id in &inner.active {
            for s in &inner.runs[id].stages {
                let running = match s.state {
                    StageState::Queued => false,
                    StageState::Running => true,
                    _ => continue,
                };
                let ready = !running && s.ready_at.is_some_and(|t| t <= now);
                *counts.entry((running, s.requirements.is_some(), ready)).or_default() += 1;
            }
        }
        Ok(counts
            .into_iter()
            .map(|((running, pooled, ready), count)| pond_core::store::StageCount {
                state: if running { StageState::Running } else { StageState::Queued },
                pooled,
                ready,
                count,
            })
            .collect())
    }

    async fn runs_to_reap(&self, now: Timestamp, limit: u32) -> Result<Vec<RunId>, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .active
            .iter()
            .filter(|id| {
                inner.runs[id].stages.iter().any(|s| {
                    s.state == StageState::Running
                        && s.lease_expires_at.is_some_and(|t| t <= now)
                        && (s.cancel_requested || s.lost_leases > MAX_LOST_LEASES)
                })
            })
            .take(limit as usize)
            .copied()
            .collect())
    }

    async fn expire_all_leases(&self, now: Timestamp) -> Result<u64, StoreError> {
        let mut inner = self.lock()?;
        let mut n = 0;
        for snapshot in inner.runs.values_mut() {
            for s in snapshot.stages.iter_mut().filter(|s| s.state == StageState::Running) {
                s.lease_expires_at = Some(now);
                n += 1;
            }
        }
        Ok(n)
    }

    async fn list_blobs(&self, after: Option<BlobId>, limit: u32) -> Result<Vec<BlobMeta>, StoreError> {
        let inner = self.lock()?;
        let mut metas: Vec<BlobMeta> = inner
            .blobs
            .values()
            .map(|(m, _)| m.clone())
            .filter(|m| after.is_none_or(|a| m.id.to_string() > a.to_string()))
            .collect();
        metas.sort_by_key(|m| m.id.to_string());
        metas.truncate(limit as usize);
        Ok(metas)
    }

    async fn replace_blob(&self, id: BlobId, expected_sha256: &str, data: &[u8]) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        let Some((meta, bytes)) = inner.blobs.get_mut(&id) else { return Ok(false) };
        if meta.sha256 != expected_sha256 {
            return Ok(false);
        }
        meta.size = data.len() as u64;
        meta.sha256 = sha256_hex(data);
        *bytes = data.to_vec();
        Ok(true)
    }

    async fn delete_blob(&self, id: BlobId) -> Result<(), StoreError> {
        self.lock()?.blobs.remove(&id);
        Ok(())
    }

    async fn finished_runs(&self, finished_before: Timestamp, limit: u32) -> Result<Vec<RunId>, StoreError> {
        let inner = self.lock()?;
        let mut old: Vec<(Timestamp, RunId)> = inner
            .runs
            .values()
            .filter(|s| s.run.state.is_terminal() && s.run.finished_at.is_some_and(|t| t < finished_before))
            .map(|s| (s.run.finished_at.unwrap_or_default(), s.run.id))
            .collect();
        old.sort();
        Ok(old.into_iter().take(limit as usize).map(|(_, id)| id).collect())
    }

    async fn delete_finished_run(
        &self,
        id: RunId,
        finished_before: Timestamp,
    ) -> Result<Option<RunSnapshot>, StoreError> {
        let mut inner = self.lock()?;
        let ended = inner
            .runs
            .get(&id)
            .is_some_and(|s| s.run.state.is_terminal() && s.run.finished_at.is_some_and(|t| t < finished_before));
        if !ended {
            return Ok(None);
        }
        let Some(snapshot) = inner.runs.remove(&id) else { return Ok(None) };
        if let Some(key) = &snapshot.run.idempotency_key {
            inner.idempotency.remove(&(snapshot.run.project_id.clone(), key.clone()));
        }
        inner.logs.remove(&id);
        inner.active.remove(&id);
        inner.closed_outputs.retain(|(run, _, _)| *run != id);
        let artifacts = inner.artifacts.remove(&id).unwrap_or_default();
        for artifact in artifacts.values() {
            let held = inner.artifacts.values().any(|a| a.values().any(|o| o.blob_id == artifact.blob_id));
            if !held {
                inner.blobs.remove(&artifact.blob_id);
            }
        }
        Ok(Some(snapshot))
    }

    async fn read_events(&self, after: i64, projects: Option<&[String]>, limit: u32) -> Result<Vec<Event>, StoreError> {
        let inner = self.lock()?;
        let start = (after - inner.events_pruned as i64).clamp(0, inner.events.len() as i64) as usize;
        Ok(inner.events[start..]
            .iter()
            .filter(|e| projects.is_none_or(|p| p.contains(&e.event.project_id)))
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn last_event_seq(&self) -> Result<i64, StoreError> {
        let inner = self.lock()?;
        Ok((inner.events_pruned + inner.events.len()) as i64)
    }

    async fn prune_events(&self, before: Timestamp, below: i64) -> Result<u64, StoreError> {
        let mut inner = self.lock()?;
        let old = inner.events.iter().take_while(|e| e.event.at < before && e.seq < below).count();
        inner.events.drain(..old);
        inner.events_pruned += old;
        Ok(old as u64)
    }

    async fn append_logs(&self, run: RunId, lines: &[NewLogLine]) -> Result<(), StoreError> {
        push_logs(&mut *self.lock()?, run, lines);
        Ok(())
    }

    async fn read_logs(&self, run: RunId, after: i64, limit: u32) -> Result<Vec<LogLine>, StoreError> {
        let inner = self.lock()?;
        let Some(log) = inner.logs.get(&run) else { return Ok(Vec::new()) };
        let start = log.partition_point(|l| l.seq <= after);
        Ok(log[start..].iter().take(limit as usize).cloned().collect())
    }

    async fn put_blob(&self, project_id: &str, data: &[u8], now: Timestamp) -> Result<BlobMeta, StoreError> {
        let meta = BlobMeta {
            id: BlobId::generate(now),
            project_id: project_id.to_string(),
            size: data.len() as u64,
            sha256: sha256_hex(data),
            created_at: now,
        };
        self.lock()?.blobs.insert(meta.id, (meta.clone(), data.to_vec()));
        Ok(meta)
    }

    async fn blob_meta(&self, id: BlobId) -> Result<Option<BlobMeta>, StoreError> {
        Ok(self.lock()?.blobs.get(&id).map(|(m, _)| m.clone()))
    }

    async fn read_blob_chunk(&self, id: BlobId, index: u64) -> Result<Vec<u8>, StoreError> {
        let inner = self.lock()?;
        let (_, data) = inner.blobs.get(&id).ok_or_else(|| StoreError::NotFound(format!("blob {id}")))?;
        let start = (index as usize).saturating_mul(BLOB_CHUNK_BYTES);
        if start >= data.len() && !(start == 0 && data.is_empty()) {
            return Err(StoreError::NotFound(format!("blob {id} chunk {index}")));
        }
        let end = (start + BLOB_CHUNK_BYTES).min(data.len());
        Ok(data[start..end].to_vec())
    }

    async fn append_leaf(
        &self,
        run: RunId,
        leaf: &str,
        leaf_hash: &[u8; 32],
        _at: Timestamp,
    ) -> Result<u64, StoreError> {
        let mut inner = self.lock()?;
        inner.log.push((run, leaf.to_string(), *leaf_hash));
        Ok(inner.log.len() as u64 - 1)
    }

    async fn leaf_hashes(&self, from: u64, to: Option<u64>) -> Result<Vec<[u8; 32]>, StoreError> {
        let inner = self.lock()?;
        let end = to.map_or(inner.log.len(), |s| (s as usize).min(inner.log.len()));
        let start = (from as usize).min(end);
        Ok(inner.log[start..end].iter().map(|(_, _, h)| *h).collect())
    }

    async fn run_leaves(&self, run: RunId) -> Result<Vec<(u64, String)>, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .log
            .iter()
            .enumerate()
            .filter(|(_, (r, _, _))| *r == run)
            .map(|(i, (_, l, _))| (i as u64, l.clone()))
            .collect())
    }

    async fn put_artifact(&self, artifact: &Artifact, holder: &str, run_cap: u64) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        let open = inner
            .runs
            .get(&artifact.run_id)
            .and_then(|r| r.stages.iter().find(|s| s.key == artifact.stage))
            .is_some_and(|s| {
                s.state == StageState::Running
                    && s.attempt == artifact.attempt
                    && s.lease_owner.as_deref() == Some(holder)
            })
            && !inner.closed_outputs.contains(&(artifact.run_id, artifact.stage.clone(), artifact.attempt));
        if !open {
            return Err(crate::attempt_not_writing(artifact));
        }
        let named = inner.artifacts.entry(artifact.run_id).or_default();
        if let Some(other) = named.get(&artifact.name).filter(|a| a.stage != artifact.stage) {
            return Err(crate::name_taken(artifact, &other.stage));
        }
        let others: u64 = named.values().filter(|a| a.name != artifact.name).map(|a| a.size).sum();
        if others.saturating_add(artifact.size) > run_cap {
            return Err(crate::over_cap(artifact, others, run_cap));
        }
        let replaced = named.insert(artifact.name.clone(), artifact.clone());
        // The replaced artifact's blob goes when nothing else holds it.
        if let Some(old) = replaced.filter(|old| old.blob_id != artifact.blob_id) {
            let held = inner.artifacts.values().any(|a| a.values().any(|o| o.blob_id == old.blob_id));
            if !held {
                inner.blobs.remove(&old.blob_id);
            }
        }
        Ok(())
    }

    async fn close_output(&self, run: RunId, stage: &str, attempt: u32, holder: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        let held = inner.runs.get(&run).and_then(|r| r.stages.iter().find(|s| s.key == stage)).is_some_and(|s| {
            s.state == StageState::Running && s.attempt == attempt && s.lease_owner.as_deref() == Some(holder)
        });
        if held {
            inner.closed_outputs.insert((run, stage.to_string(), attempt));
        }
        Ok(held)
    }

    async fn list_artifacts(&self, run: RunId) -> Result<Vec<Artifact>, StoreError> {
        Ok(self.lock()?.artifacts.get(&run).map(|a| a.values().cloned().collect()).unwrap_or_default())
    }

    async fn get_artifact(&self, run: RunId, name: &str) -> Result<Option<Artifact>, StoreError> {
        Ok(self.lock()?.artifacts.get(&run).and_then(|a| a.get(name)).cloned())
    }

    async fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if inner.tokens.values().any(|t| t.secret_sha256 == token.secret_sha256) {
            return Err(StoreError::Conflict("token exists".into()));
        }
        inner.tokens.insert(token.id, token.clone());
        Ok(())
    }

    async fn insert_first_admin(&self, token: &TokenRecord) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        if inner.tokens.values().any(|t| t.role == Role::Admin && t.revoked_at.is_none()) {
            return Ok(false);
        }
        inner.tokens.insert(token.id, token.clone());
        Ok(true)
    }

    async fn find_token(&self, secret_sha256: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self.lock()?.tokens.values().find(|t| t.secret_sha256 == secret_sha256).cloned())
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(self.lock()?.tokens.values().cloned().collect())
    }

    async fn revoke_token(&self, id: TokenId, now: Timestamp) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        match inner.tokens.get_mut(&id) {
            Some(t) => {
                t.revoked_at.get_or_insert(now);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn get_record(&self, kind: &str, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock()?.records.get(&(kind.to_string(), key.to_string())).cloned())
    }

    async fn list_records(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .records
            .iter()
            .filter(|((k, _), _)| k == kind)
            .map(|((_, key), body)| (key.clone(), body.clone()))
            .collect())
    }

    async fn put_record(&self, kind: &str, key: &str, body: &str) -> Result<(), StoreError> {
        self.lock()?.records.insert((kind.to_string(), key.to_string()), body.to_string());
        Ok(())
    }

    async fn delete_record(&self, kind: &str, key: &str) -> Result<(), StoreError> {
        self.lock()?.records.remove(&(kind.to_string(), key.to_string()));
        Ok(())
    }

    async fn swap_record(&self, kind: &str, key: &str, expected: Option<&str>, body: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        let slot = (kind.to_string(), key.to_string());
        if inner.records.get(&slot).map(String::as_str) != expected {
            return Ok(false);
        }
        inner.records.insert(slot, body.to_string());
        Ok(true)
    }
}
