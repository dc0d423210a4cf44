//! Uploaded source bundles. A project may hold only so many bytes of those no run uses yet
//! (`EngineConfig::max_pending_bundle_bytes`): uploading without ever submitting cannot fill
//! the server's disk. One unused for `EngineConfig::bundle_ttl` after its upload is deleted.
//! A bundle runs use is counted: it stays while a run holds it, and goes with the last of them
//! that retention deletes.
//!
//! Each pending bundle is a record (`pending-bundle`, key `<project>/<blob id>`). A submit and
//! the expiry sweep race for it through `swap_record`: the submit marks it used before storing
//! its run, the sweep marks it expiring before deleting the blob, and only one of them wins —
//! so a run is never stored using a bundle the sweep deletes. Once a run is stored the pending
//! record gives way to a `held-bundle` record counting the runs that use it (made before the
//! pending record goes, so there is no moment with neither); later submits raise the count
//! before storing their run, retention lowers it after deleting one, and the one that takes it
//! to zero marks it ending in the same swap before deleting the blob — so a submit either
//! counted itself first or is told the bundle is gone. A crash between a count and the run it
//! counts leaves the count high: the bundle is kept, never deleted under a run.

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::error::{CoreError, FieldError};
use crate::ids::BlobId;
use crate::store::BlobMeta;
use crate::time::{Millis, Timestamp};

/// Record kind of an uploaded bundle no run has used yet.
pub const PENDING_BUNDLE: &str = "pending-bundle";

/// Record kind of a bundle runs hold: how many.
pub const HELD_BUNDLE: &str = "held-bundle";

/// Most uploaded bundles no run uses yet a project may hold, whatever their size.
pub const MAX_PENDING_BUNDLES: usize = 1000;

#[derive(Clone, Serialize, Deserialize)]
struct Pending {
    size: u64,
    uploaded_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ending: Option<Ending>,
    /// When a submit marked it used (the sweep leaves such a mark alone for [`USED_GRACE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    used_at: Option<Timestamp>,
}

/// How long a submit's mark on a pending bundle is honoured before the sweep takes it for the
/// mark of a submit that died: far longer than any submit takes.
const USED_GRACE: Millis = Millis(3600 * 1000);

/// What became of the run a submit counted its bundles for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Stored: it holds them.
    Stored,
    /// Definitely not stored (refused, or the same request's run already was).
    NotStored,
    /// Unknown (the store failed mid-write): the claims stay, so a run that was stored keeps
    /// its bundles; at worst they are kept unused.
    Unknown,
}

#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Ending {
    /// A submit is storing a run that uses it.
    Used,
    /// The sweep is deleting it.
    Expiring,
}

/// A bundle runs hold.
#[derive(Clone, Copy, Serialize, Deserialize)]
struct Held {
    runs: u64,
    /// The last run that held it went; the blob is being deleted.
    #[serde(default)]
    ending: bool,
}

fn key(project: &str, blob: BlobId) -> String {
    format!("{project}/{blob}")
}

fn encode(p: &Pending) -> String {
    serde_json::to_string(p).unwrap_or_default()
}

/// A bundle a submit counted on: taken back if the run is not stored.
pub(crate) enum Claimed {
    /// No run held it: marked used (`before` → `used`).
    Pending { key: String, before: String, used: String },
    /// Runs held it: the count was raised for this one.
    Held { key: String },
}

impl Engine {
    /// Stores an uploaded bundle (already sealed) for `project`, unless the project's unused
    /// bundles and this one would pass `max_pending_bundle_bytes`.
    pub async fn store_bundle(&self, project: &str, sealed: &[u8]) -> Result<BlobMeta, CoreError> {
        crate::engine::check_project_id("query.project", project)?;
        let limit = self.config().max_pending_bundle_bytes;
        let prefix = format!("{project}/");
        let pending: Vec<Pending> = self
            .store()
            .list_records(PENDING_BUNDLE)
            .await?
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(_, body)| serde_json::from_str::<Pending>(body).ok())
            .filter(|p| p.ending != Some(Ending::Expiring))
            .collect();
        // A count too, not only bytes: many tiny bundles would make every upload and sweep slow.
        if pending.len() >= MAX_PENDING_BUNDLES {
            return Err(CoreError::Quota(format!(
                "project `{project}` holds {} uploaded bundles no run uses yet, the most a project may: {}",
                pending.len(),
                self.what_frees_room()
            )));
        }
        let held: u64 = pending.iter().map(|p| p.size).sum();
        let size = sealed.len() as u64;
        if held.saturating_add(size) > limit {
            return Err(CoreError::Quota(format!(
                "project `{project}` holds {held} bytes of uploaded bundles no run uses yet; this one ({size} bytes) \
                 would pass the server's limit of {limit} (--max-pending-bundle-bytes): {}",
                self.what_frees_room()
            )));
        }
        let now = self.clock().now();
        let meta = self.store().put_blob(project, sealed, now).await?;
        let pending = Pending { size, uploaded_at: now, ending: None, used_at: None };
        if let Err(e) = self.store().put_record(PENDING_BUNDLE, &key(project, meta.id), &encode(&pending)).await {
            // Untracked, it would never expire: gone rather than kept.
            let _ = self.store().delete_blob(meta.id).await;
            return Err(e.into());
        }
        Ok(meta)
    }

    fn what_frees_room(&self) -> String {
        format!(
            "submit the runs that use them, or wait until unused ones expire ({} after their upload)",
            self.config().bundle_ttl
        )
    }

    /// Counts the run being submitted on a bundle: marks a pending one used, or raises the
    /// count of one runs hold; refuses one being deleted. A bundle with neither record is one
    /// uploaded before bundles were counted, if its blob is still there, and is used as it is
    /// (never deleted by retention).
    pub(crate) async fn claim_bundle(
        &self,
        field: &str,
        project: &str,
        blob: BlobId,
    ) -> Result<Option<Claimed>, CoreError> {
        let key = key(project, blob);
        let gone = || {
            FieldError::new(
                field,
                format!("no bundle `{blob}` in project `{project}` (it expired unused, went with the last run that used it, or never was)"),
            )
        };
        // A record another submit holds (`Used`) is waited out: that submit either stores its
        // run (the record goes: the bundle is a run's) or gives it back to pending (then this
        // submit takes it) — never trusted while it may still be given back.
        for _ in 0..200 {
            let Some(before) = self.store().get_record(PENDING_BUNDLE, &key).await? else {
                // Held by runs (counted here), deleted (blob first, then its record), or older
                // than the records: the held record, then the blob, tell.
                match self.adjust_held(&key, Adjust::Raise).await? {
                    HeldNow::Counted(_) => return Ok(Some(Claimed::Held { key })),
                    HeldNow::Ending => {
                        return Err(FieldError::new(
                            field,
                            format!("bundle `{blob}` was deleted with the last run that used it; upload it again"),
                        )
                        .into())
                    }
                    HeldNow::Untracked => {}
                }
                return match self.store().blob_meta(blob).await? {
                    Some(meta) if meta.project_id == project => Ok(None),
                    _ => Err(gone().into()),
                };
            };
            let Ok(pending) = serde_json::from_str::<Pending>(&before) else { return Ok(None) };
            match pending.ending {
                Some(Ending::Expiring) => {
                    return Err(FieldError::new(
                        field,
                        format!(
                            "bundle `{blob}` expired unused ({} after its upload); upload it again",
                            self.config().bundle_ttl
                        ),
                    )
                    .into())
                }
                Some(Ending::Used) => {
                    self.pause().pause(Millis(25)).await;
                    continue;
                }
                None => {
                    let used_at = Some(self.clock().now());
                    let used = encode(&Pending { ending: Some(Ending::Used), used_at, ..pending });
                    if self.store().swap_record(PENDING_BUNDLE, &key, Some(&before), &used).await? {
                        return Ok(Some(Claimed::Pending { key, before, used }));
                    }
                }
            }
        }
        Err(CoreError::Store(crate::error::StoreError::Unavailable(format!(
            "bundle `{blob}` is held by another submit that has not finished; retry"
        ))))
    }

    /// After the submit: a stored run holds its bundles (a pending one becomes held, counted
    /// once); a run not stored gives them back (pending again, or the count lowered).
    /// A write that fails here leaves a pending record marked used: the sweep drops such a record
    /// after the TTL and keeps the bundle (untracked, never lost under a run; see the README).
    pub(crate) async fn settle_bundles(&self, claimed: Vec<Claimed>, outcome: Outcome) {
        for c in claimed {
            match (c, outcome) {
                (_, Outcome::Unknown) => {}
                (Claimed::Pending { key, used, .. }, Outcome::Stored) => {
                    // Only while the mark is still this submit's (a sweep that took it for a dead
                    // submit's leaves the bundle untracked: kept, never deleted under a run).
                    if self.store().get_record(PENDING_BUNDLE, &key).await.ok().flatten().as_deref() != Some(&used) {
                        continue;
                    }
                    // Held before no longer pending: a submit waiting on the pending record
                    // then finds the held one and counts itself.
                    if matches!(self.adjust_held(&key, Adjust::Create).await, Ok(HeldNow::Counted(_))) {
                        let _ = self.store().delete_record(PENDING_BUNDLE, &key).await;
                    }
                }
                (Claimed::Pending { key, before, used }, Outcome::NotStored) => {
                    let _ = self.store().swap_record(PENDING_BUNDLE, &key, Some(&used), &before).await;
                }
                (Claimed::Held { .. }, Outcome::Stored) => {}
                (Claimed::Held { key }, Outcome::NotStored) => {
                    let _ = self.release_held(&key).await;
                }
            }
        }
    }

    /// Retention deleted a run of `project` that used `bundles`: each one's count is lowered,
    /// and the bundle deleted when no run holds it any more.
    pub(crate) async fn release_bundles(&self, project: &str, bundles: &[BlobId]) -> Result<(), CoreError> {
        for blob in bundles {
            self.release_held(&key(project, *blob)).await?;
        }
        Ok(())
    }

    /// Lowers a held bundle's count; at zero, marks it ending (in the same swap) and deletes
    /// the blob, then the record.
    async fn release_held(&self, key: &str) -> Result<(), CoreError> {
        if let HeldNow::Counted(0) = self.adjust_held(key, Adjust::Lower).await? {
            self.delete_pending_blob(key).await?;
            self.store().delete_record(HELD_BUNDLE, key).await?;
        }
        Ok(())
    }

    /// Changes a held bundle's count through compare-and-swap, retrying when another change won.
    async fn adjust_held(&self, key: &str, adjust: Adjust) -> Result<HeldNow, CoreError> {
        loop {
            let before = self.store().get_record(HELD_BUNDLE, key).await?;
            let held = before.as_deref().and_then(|b| serde_json::from_str::<Held>(b).ok());
            let after = match (held, adjust) {
                (Some(Held { ending: true, .. }), _) => return Ok(HeldNow::Ending),
                (None, Adjust::Raise | Adjust::Lower) => return Ok(HeldNow::Untracked),
                (None, Adjust::Create) => Held { runs: 1, ending: false },
                (Some(h), Adjust::Raise | Adjust::Create) => Held { runs: h.runs + 1, ending: false },
                (Some(h), Adjust::Lower) => {
                    let runs = h.runs.saturating_sub(1);
                    Held { runs, ending: runs == 0 }
                }
            };
            let body = serde_json::to_string(&after).unwrap_or_default();
            if self.store().swap_record(HELD_BUNDLE, key, before.as_deref(), &body).await? {
                return Ok(HeldNow::Counted(after.runs));
            }
        }
    }

    /// Deletes bundles unused for `bundle_ttl` after their upload. Returns how many went; a
    /// record that cannot be handled now does not hold back the others (the first such error
    /// comes back after all were tried).
    pub async fn expire_bundles(&self) -> Result<usize, CoreError> {
        let now = self.clock().now();
        let ttl = self.config().bundle_ttl;
        let (mut gone, mut first_error) = (0, None);
        for (key, body) in self.store().list_records(PENDING_BUNDLE).await? {
            match self.expire_one(&key, &body, now, ttl).await {
                Ok(true) => gone += 1,
                Ok(false) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        // A held bundle whose last run went but whose deletion failed half way is finished here.
        for (key, body) in self.store().list_records(HELD_BUNDLE).await? {
            if serde_json::from_str::<Held>(&body).is_ok_and(|h| h.ending) {
                let finished = async {
                    self.delete_pending_blob(&key).await?;
                    self.store().delete_record(HELD_BUNDLE, &key).await.map_err(CoreError::from)
                };
                match finished.await {
                    Ok(()) => gone += 1,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(gone),
        }
    }

    async fn expire_one(&self, key: &str, body: &str, now: Timestamp, ttl: Millis) -> Result<bool, CoreError> {
        let Ok(pending) = serde_json::from_str::<Pending>(body) else {
            self.store().delete_record(PENDING_BUNDLE, key).await?;
            return Ok(false);
        };
        let old = now.since(pending.uploaded_at) >= ttl;
        match pending.ending {
            None if old => {
                let expiring = encode(&Pending { ending: Some(Ending::Expiring), ..pending });
                // A submit that marked it used first keeps it.
                if !self.store().swap_record(PENDING_BUNDLE, key, Some(body), &expiring).await? {
                    return Ok(false);
                }
                self.delete_pending(key).await?;
                Ok(true)
            }
            // A sweep that stopped half way.
            Some(Ending::Expiring) => {
                self.delete_pending(key).await?;
                Ok(true)
            }
            // A submit that stopped between marking it and settling (long ago: a live one settles
            // within seconds): whether its run was stored is not known here, so the bundle is
            // kept (untracked; see the README's gaps).
            Some(Ending::Used) if now.since(pending.used_at.unwrap_or(pending.uploaded_at)) >= ttl.max(USED_GRACE) => {
                self.store().delete_record(PENDING_BUNDLE, key).await?;
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    async fn delete_pending(&self, key: &str) -> Result<(), CoreError> {
        self.delete_pending_blob(key).await?;
        self.store().delete_record(PENDING_BUNDLE, key).await?;
        Ok(())
    }

    /// Deletes the blob a bundle record's key names.
    async fn delete_pending_blob(&self, key: &str) -> Result<(), CoreError> {
        if let Some(blob) = key.rsplit_once('/').and_then(|(_, id)| id.parse::<BlobId>().ok()) {
            self.store().delete_blob(blob).await?;
        }
        Ok(())
    }
}

/// A change to a held bundle's count.
#[derive(Clone, Copy)]
enum Adjust {
    /// One more run (only if runs hold it already).
    Raise,
    /// One more run, making the record if there is none (a pending bundle's first run).
    Create,
    /// One run fewer.
    Lower,
}

/// A held bundle after a change.
enum HeldNow {
    /// Held by this many runs (0: the last went; it is ending).
    Counted(u64),
    /// Being deleted: no run may count on it.
    Ending,
    /// No held record (never used, or uploaded before bundles were counted).
    Untracked,
}
