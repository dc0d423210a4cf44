//! Uploaded source bundles that no run uses yet. A project may hold only so many bytes of them
//! (`EngineConfig::max_pending_bundle_bytes`): uploading without ever submitting cannot fill
//! the server's disk. One unused for `EngineConfig::bundle_ttl` after its upload is deleted.
//! A bundle a run uses stays while runs hold it (retention deletes runs, not the bundles they
//! share).
//!
//! Each pending bundle is a record (`pending-bundle`, key `<project>/<blob id>`). A submit and
//! the expiry sweep race for it through `swap_record`: the submit marks it used before storing
//! its run, the sweep marks it expiring before deleting the blob, and only one of them wins —
//! so a run is never stored using a bundle the sweep deletes.

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::error::{CoreError, FieldError};
use crate::ids::BlobId;
use crate::store::BlobMeta;
use crate::time::{Millis, Timestamp};

/// Record kind of an uploaded bundle no run has used yet.
pub const PENDING_BUNDLE: &str = "pending-bundle";

/// Most uploaded bundles no run uses yet a project may hold, whatever their size.
pub const MAX_PENDING_BUNDLES: usize = 1000;

#[derive(Clone, Serialize, Deserialize)]
struct Pending {
    size: u64,
    uploaded_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ending: Option<Ending>,
}

#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Ending {
    /// A submit is storing a run that uses it.
    Used,
    /// The sweep is deleting it.
    Expiring,
}

fn key(project: &str, blob: BlobId) -> String {
    format!("{project}/{blob}")
}

fn encode(p: &Pending) -> String {
    serde_json::to_string(p).unwrap_or_default()
}

/// A bundle a submit marked used: the mark is taken back if the run is not stored.
pub(crate) struct Claimed {
    key: String,
    before: String,
    used: String,
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
        let pending = Pending { size, uploaded_at: now, ending: None };
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

    /// Marks a pending bundle used by the run being submitted; refuses one the sweep is
    /// deleting. A bundle with no record is one some run used already (or one uploaded before
    /// pending bundles were kept) if its blob is still there, and is used as it is.
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
                format!("no bundle `{blob}` in project `{project}` (it expired unused, or never was)"),
            )
        };
        // A record another submit holds (`Used`) is waited out: that submit either stores its
        // run (the record goes: the bundle is a run's) or gives it back to pending (then this
        // submit takes it) — never trusted while it may still be given back.
        for _ in 0..200 {
            let Some(before) = self.store().get_record(PENDING_BUNDLE, &key).await? else {
                // No record: some run holds the bundle, or the sweep deleted it (blob first,
                // then the record), or it predates pending records. Only the blob tells.
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
                    let used = encode(&Pending { ending: Some(Ending::Used), ..pending });
                    if self.store().swap_record(PENDING_BUNDLE, &key, Some(&before), &used).await? {
                        return Ok(Some(Claimed { key, before, used }));
                    }
                }
            }
        }
        Err(CoreError::Store(crate::error::StoreError::Unavailable(format!(
            "bundle `{blob}` is held by another submit that has not finished; retry"
        ))))
    }

    /// After the submit: a stored run holds its bundles (their records go); a run not stored
    /// gives them back to pending.
    /// A write that fails here leaves the record marked used: the sweep drops such a record
    /// after the TTL and keeps the bundle (untracked, never lost under a run; see the README).
    pub(crate) async fn settle_bundles(&self, claimed: Vec<Claimed>, stored: bool) {
        for c in claimed {
            let _ = if stored {
                self.store().delete_record(PENDING_BUNDLE, &c.key).await
            } else {
                self.store().swap_record(PENDING_BUNDLE, &c.key, Some(&c.used), &c.before).await.map(|_| ())
            };
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
            // A submit that stopped between marking it and settling: whether its run was stored
            // is not known here, so the bundle is kept (untracked; see the README's gaps).
            Some(Ending::Used) if old => {
                self.store().delete_record(PENDING_BUNDLE, key).await?;
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    async fn delete_pending(&self, key: &str) -> Result<(), CoreError> {
        if let Some(blob) = key.rsplit_once('/').and_then(|(_, id)| id.parse::<BlobId>().ok()) {
            self.store().delete_blob(blob).await?;
        }
        self.store().delete_record(PENDING_BUNDLE, key).await?;
        Ok(())
    }
}
