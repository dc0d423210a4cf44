//! `pond verify RUN`: a consumer checks a run end to end without trusting the server. It checks
//! the transparency log's signed tree head and that it extends the last head this CLI saw
//! (consistency proof), that the run's consumer-signed request and every attestation are in the
//! log (audit paths), that the request is signed by this context's key and covers the run's
//! recipients, that every attestation's signature holds under its worker's key, and that every
//! log stream and artifact opens where it is and is signed by a node or worker of the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pond_core::transparency::TreeHead;

use crate::cli::{CliError, LogDecryptor};
use crate::client::Client;

/// What a verification checked, one line per check, in order.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Verified {
    /// The checks that held.
    pub checks: Vec<String>,
    /// The tree head the run was checked against (kept as the next run's starting point).
    pub tree_head: Option<TreeHead>,
}

fn fail(what: impl Into<String>) -> CliError {
    CliError::Input(format!("verification failed: {}", what.into()))
}

/// The tree heads this CLI saw last, per server, in `path` (JSON).
fn load_heads(path: &Path) -> Result<BTreeMap<String, TreeHead>, CliError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| CliError::Input(format!("{} is not a tree head file: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(error) => Err(CliError::Io { context: format!("reading {}", path.display()), error }),
    }
}

fn save_heads(path: &Path, heads: &BTreeMap<String, TreeHead>) -> Result<(), CliError> {
    let io = |error| CliError::Io { context: format!("writing {}", path.display()), error };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(heads).unwrap_or_default()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Where a CLI context keeps the tree heads it saw: beside its config.
pub fn heads_path(config_dir: &Path) -> PathBuf {
    config_dir.join("tree-heads.json")
}

/// Verifies run `run` as the consumer whose key is at `key_path`; `heads` keeps the last tree
/// head seen per server, checked against and then replaced by the new one.
pub fn verify_run(
    client: &Client,
    server: &str,
    run: &str,
    key_path: &Path,
    heads: &Path,
) -> Result<Verified, CliError> {
    let mut out = Verified::default();
    // The tree head, signed by the control plane's key (from the server key, not the database).
    let control = crate::cli::control_plane_key(client)?;
    let head = client.tree_head()?;
    head.verify(&[control]).map_err(|e| fail(format!("tree head: {e}")))?;
    let root = head.root().map_err(|e| fail(format!("tree head: {e}")))?;
    out.checks.push(format!("tree head: {} leaves, signed by node {}", head.tree_size, head.node_id));
    // It extends the head this CLI saw before.
    let mut seen = load_heads(heads)?;
    if let Some(old) = seen.get(server) {
        let old_root = old.root().map_err(|e| fail(format!("the saved tree head: {e}")))?;
        if head.tree_size < old.tree_size {
            return Err(fail(format!(
                "the log shrank from {} to {} leaves since this CLI last saw it: its history was rewritten",
                old.tree_size, head.tree_size
            )));
        }
        let proof = if head.tree_size == old.tree_size {
            Vec::new()
        } else {
            let got = client.log_consistency(old.tree_size, head.tree_size)?;
            pond_core::transparency::decode_hashes(&got.proof).map_err(|e| fail(format!("consistency proof: {e}")))?
        };
        if !pond_core::merkle::verify_consistency(old.tree_size, head.tree_size, &old_root, &root, &proof) {
            return Err(fail(format!(
                "the log of {} leaves does not extend the one of {} leaves this CLI saw before: its history was rewritten",
                head.tree_size, old.tree_size
            )));
        }
        out.checks.push(format!("the log extends the tree head seen before ({} leaves)", old.tree_size));
    }
    // The run's leaves are in the tree.
    let view = client.get_run(run)?;
    let logged = client.run_log(run, head.tree_size)?;
    for entry in &logged.entries {
        if !entry.included_in(head.tree_size, &root) {
            return Err(fail(format!("log leaf {} of this run is not in the tree its head signs", entry.index)));
        }
    }
    let leaves: Vec<&str> = logged.entries.iter().map(|e| e.leaf.as_str()).collect();
    out.checks.push(format!("{} log leaves of this run, each in the tree", leaves.len()));
    // A run whose signed request is in the log is confidential, whatever its view says now.
    let logged_request =
        leaves.iter().any(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["kind"] == "request"));
    if view.encryption.is_none() && logged_request {
        return Err(fail(
            "the log holds a signed request for this run, but the run shows no encryption: it was stripped",
        ));
    }
    // The consumer's signed request: this context's key, the run's project and recipients.
    if let Some(encryption) = &view.encryption {
        let request = encryption.request.as_ref().ok_or_else(|| fail("the run keeps no signed request"))?;
        let body = request.verify().map_err(|e| fail(format!("the signed request: {e}")))?;
        if !key_path.exists() {
            return Err(fail(format!(
                "this run is encrypted and there is no consumer key at {} (this CLI context's; `pond keys path`): nothing of its output can be checked",
                key_path.display()
            )));
        }
        {
            let secret = pond_exec::load_or_create_key(key_path)
                .map_err(|error| CliError::Io { context: format!("key {}", key_path.display()), error })?;
            let mine =
                pond_core::signed_request::signing_public(&pond_core::signed_request::consumer_signing_seed(&secret));
            if request.signing_key != mine {
                return Err(fail(format!(
                    "the run's request is signed by {}, not by this context's key ({mine}): it is not the request you made",
                    request.signing_key
                )));
            }
        }
        if body.project_id != view.project_id {
            return Err(fail(format!("the request was signed for project `{}`", body.project_id)));
        }
        let mut shown = Vec::new();
        for r in &encryption.recipients {
            let key = pond_core::pool::decode_key(r).map_err(|e| fail(format!("recipient {r}: {e}")))?;
            if !body.recipients.contains(&key) {
                return Err(fail(format!("recipient {} was not signed for", pond_core::attest::fingerprint(&key))));
            }
            shown.push(key);
        }
        if let Some(dropped) = body.recipients.iter().find(|k| !shown.contains(k)) {
            return Err(fail(format!(
                "recipient {} was signed for but the run no longer shows it",
                pond_core::attest::fingerprint(dropped)
            )));
        }
        let leaf = pond_core::transparency::request_leaf_of(&view.id.to_string(), &view.project_id, request);
        if !leaves.contains(&leaf.as_str()) {
            return Err(fail("the run's signed request is not in the transparency log"));
        }
        out.checks.push(format!(
            "request signed by this context's key, covering its {} recipients, in the log",
            encryption.recipients.len()
        ));
    }
    // Every attestation: pond verified it, its signature holds under the key pinned for its
    // worker (not merely the key the record names), and it is in the log.
    let run_keys = client.run_keys(run)?;
    for stage in &view.stages {
        for attempt in &stage.attempts {
            let Some(record) = &attempt.attestation else { continue };
            let at = format!("stage `{}` attempt {}", stage.key, attempt.number);
            if !record.verified {
                return Err(fail(format!("{at}: pond did not verify this attestation ({})", record.detail)));
            }
            let key = run_keys
                .workers
                .iter()
                .find(|w| w.id == record.worker)
                .and_then(|w| crate::cli::endorsed_worker(&control, w))
                .ok_or_else(|| {
                    fail(format!("{at}: worker `{}` has no key the control plane endorsed", record.worker))
                })?;
            if record.signing_key.as_deref().and_then(pond_core::transparency::decode32) != Some(key) {
                return Err(fail(format!(
                    "{at}: the attestation names another key than worker `{}`'s pinned one",
                    record.worker
                )));
            }
            let sha = |h: &str| -> Result<[u8; 32], CliError> {
                hex::decode(h)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| fail(format!("{at}: malformed digest")))
            };
            let attestation = pond_core::attest::Attestation {
                job_id: record.job_id.clone(),
                input_sha256: sha(&record.input_sha256)?,
                output_sha256: sha(record.output_sha256.as_deref().unwrap_or_default())?,
                rc: record.rc,
            };
            let signature: [u8; 64] =
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &record.signature)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| fail(format!("{at}: malformed signature")))?;
            attestation.verify(&key, &signature).map_err(|e| fail(format!("{at}: {e}")))?;
            let leaf =
                pond_core::transparency::attestation_leaf(&view.id.to_string(), &stage.key, attempt.number, record);
            if !leaves.contains(&leaf.as_str()) {
                return Err(fail(format!("{at}: its attestation is not in the transparency log")));
            }
            out.checks.push(format!("{at}: attestation signed by worker {}, in the log", record.worker));
        }
    }
    // The output: every stream and artifact where it belongs and signed.
    if view.encryption.is_some() {
        let mut decrypt = LogDecryptor::new(key_path, run)?.verifying(client, false)?;
        let mut after = 0;
        loop {
            let page = client.logs(run, after, 1000)?;
            if page.lines.is_empty() {
                break;
            }
            for line in &page.lines {
                decrypt.line(line)?;
            }
            after = page.next_cursor;
        }
        if view.state.is_terminal() {
            decrypt.check_whole(&view)?;
        }
        // Every attempt the log says ended (a local attempt's end, a pooled one's attestation)
        // has its stream whole, whatever the run's view says of that attempt now.
        for leaf in &leaves {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(leaf) else { continue };
            if value["kind"] != "attempt" && value["kind"] != "attestation" {
                continue;
            }
            let (stage, attempt) =
                (value["stage"].as_str().unwrap_or_default(), value["attempt"].as_u64().unwrap_or(0));
            match decrypt.stream_whole(stage, attempt as u32) {
                Some(true) => {}
                found => {
                    return Err(fail(format!(
                        "the log records the end of stage `{stage}` attempt {attempt}, but its stream is {}",
                        if found.is_none() { "missing" } else { "not whole (no final record)" }
                    )))
                }
            }
        }
        let mut opened = 0;
        let mut fetcher = crate::cli::ArtifactFetcher::new(client, run, key_path)?;
        for artifact in client.artifacts(run)?.artifacts {
            if !artifact.name.ends_with(pond_core::seal::SIDECAR_SUFFIX) {
                fetcher.fetch(&artifact.name)?;
                opened += 1;
            }
        }
        out.checks.push(format!("log streams signed, in place and whole; {opened} artifacts signed and in place"));
    }
    seen.insert(server.to_string(), head.clone());
    save_heads(heads, &seen)?;
    out.tree_head = Some(head);
    Ok(out)
}
