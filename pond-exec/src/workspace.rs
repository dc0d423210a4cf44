//! Run checkouts on this node: `LocalWorkspaces` fetches a run's sources into
//! `<root>/<run-id>/<label>` on first use and removes the directory when the run ends.
//!
//! What the first fetch found (`commit`, `input_sha`) is recorded on the run by the engine; a
//! later fetch (another node, or after a restart) checks out that commit and refuses a tree
//! whose digest differs, so every stage of a run sees the same code.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pond_core::exec::{Workspace, Workspaces};
use pond_core::ids::RunId;
use pond_core::run::Run;
use pond_core::source::{ResolvedSource, Source, SourceSpec};
use pond_core::store::{read_blob, Store};
use sha2::{Digest, Sha256};

/// Limits and tools for fetching sources.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// The `git` program.
    pub git: PathBuf,
    /// Longest a clone may take.
    pub git_timeout: Duration,
    /// Most bytes a bundle may unpack to.
    pub max_unpacked_bytes: u64,
    /// Most entries a bundle may hold.
    pub max_bundle_entries: u64,
    /// Allow `http://` git remotes.
    pub allow_plain_http_git: bool,
    /// Allow git remotes whose addresses are internal (loopback, private, link-local, … see
    /// `pond_core::net`): test setups and private networks. Off: such a remote is refused
    /// before anything connects to it, so a source cannot make the control plane probe its own
    /// network.
    pub allow_internal_git: bool,
    /// Directories `local` sources may come from. Checked again here on the resolved path
    /// (links followed), not only as text at submit: a link under an allowed directory that
    /// points elsewhere is refused.
    pub local_roots: Vec<PathBuf>,
    /// The server keys uploaded bundles are sealed under at rest (`None`: stored in clear).
    pub at_rest_keys: Option<pond_core::server_keys::AtRestKeys>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            git: PathBuf::from("git"),
            git_timeout: Duration::from_secs(600),
            max_unpacked_bytes: 2 * 1024 * 1024 * 1024,
            max_bundle_entries: 200_000,
            allow_plain_http_git: false,
            allow_internal_git: false,
            local_roots: Vec::new(),
            at_rest_keys: None,
        }
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Workspace>>>;

/// Checkouts in a local directory.
pub struct LocalWorkspaces {
    root: PathBuf,
    store: Arc<dyn Store>,
    config: FetchConfig,
    prepared: Mutex<HashMap<RunId, Slot>>,
}

impl LocalWorkspaces {
    /// Checkouts under `root`. Anything already there is from an earlier process and is
    /// removed: checkouts are re-fetched per process, from the recorded commit.
    pub fn new(root: PathBuf, store: Arc<dyn Store>, config: FetchConfig) -> std::io::Result<Self> {
        if root.exists() {
            std::fs::remove_dir_all(&root)?;
        }
        std::fs::create_dir_all(&root)?;
        Ok(LocalWorkspaces { root, store, config, prepared: Mutex::new(HashMap::new()) })
    }

    fn slot(&self, run: RunId) -> Slot {
        let mut map = self.prepared.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(run).or_default().clone()
    }

    async fn fetch(&self, run: &Run) -> Result<Workspace, String> {
        let dir = self.root.join(run.id.to_string());
        if dir.exists() {
            tokio::fs::remove_dir_all(&dir).await.map_err(|e| format!("clearing {}: {e}", dir.display()))?;
        }
        tokio::fs::create_dir_all(&dir).await.map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut sources = Vec::new();
        let mut resolved = Vec::new();
        for source in &run.sources {
            let target = dir.join(&source.label);
            let commit =
                self.fetch_one(run, source, &target).await.map_err(|e| format!("source `{}`: {e}", source.label))?;
            let digest_root = target.clone();
            let input_sha = tokio::task::spawn_blocking(move || tree_digest(&digest_root))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("source `{}`: hashing the checkout: {e}", source.label))?;
            if let Some(earlier) = &source.resolved {
                if earlier.input_sha != input_sha {
                    return Err(format!(
                        "source `{}` changed since the run's first fetch (input_sha {} now {input_sha})",
                        source.label, earlier.input_sha
                    ));
                }
            }
            sources.push((source.label.clone(), target));
            resolved.push(ResolvedSource { commit, input_sha });
        }
        let cwd = match sources.first() {
            Some((_, path)) => path.clone(),
            None => {
                let empty = dir.join("_empty");
                tokio::fs::create_dir_all(&empty).await.map_err(|e| e.to_string())?;
                empty
            }
        };
        Ok(Workspace { cwd, sources, resolved })
    }

    async fn fetch_one(&self, run: &Run, source: &Source, target: &Path) -> Result<Option<String>, String> {
        match &source.spec {
            SourceSpec::GitHttps { url, git_ref } => {
                let pinned = source.resolved.as_ref().and_then(|r| r.commit.clone());
                let want = pinned.as_deref().or(git_ref.as_deref());
                self.git_clone(url, want, target).await.map(Some)
            }
            SourceSpec::Local { path } => {
                let (from, to, roots) = (path.clone(), target.to_path_buf(), self.config.local_roots.clone());
                tokio::task::spawn_blocking(move || copy_tree(&resolve_local(&from, &roots)?, &to))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("copying {}: {e}", path.display()))?;
                Ok(None)
            }
            SourceSpec::Bundle { bundle_id } => {
                let not_found = || format!("bundle {bundle_id} not found");
                let (meta, data) = match &self.config.at_rest_keys {
                    Some(keys) => {
                        use pond_core::server_keys::{open_sealed_blob, SealedBlobError};
                        match open_sealed_blob(&*self.store, *bundle_id, keys).await {
                            Ok(opened) => opened,
                            Err(SealedBlobError::Missing) => return Err(not_found()),
                            Err(e) => return Err(format!("bundle {bundle_id}: {e}")),
                        }
                    }
                    None => {
                        let meta = self.store.blob_meta(*bundle_id).await.map_err(|e| e.to_string())?;
                        let meta = meta.ok_or_else(not_found)?;
                        let data = read_blob(&*self.store, &meta).await.map_err(|e| e.to_string())?;
                        (meta, data)
                    }
                };
                if meta.project_id != run.project_id {
                    return Err(not_found());
                }
                let (to, limits) =
                    (target.to_path_buf(), (self.config.max_unpacked_bytes, self.config.max_bundle_entries));
                tokio::task::spawn_blocking(move || unpack_bundle(&data, &to, limits.0, limits.1))
                    .await
                    .map_err(|e| e.to_string())??;
                Ok(None)
            }
        }
    }

    async fn git(&self, args: &[&str], cwd: Option<&Path>) -> Result<String, String> {
        self.git_pinned(args, cwd, None).await
    }

    /// Runs git; `pinned` (`host:port:ip`) makes it connect to the address pond checked rather
    /// than resolve the name again (a second answer could be an internal address).
    async fn git_pinned(&self, args: &[&str], cwd: Option<&Path>, pinned: Option<&str>) -> Result<String, String> {
        let mut cmd = tokio::process::Command::new(&self.config.git);
        let protocols = if self.config.allow_plain_http_git { "https:http" } else { "https" };
        if let Some(resolve) = pinned {
            cmd.args(["-c", &format!("http.curloptResolve={resolve}"), "-c", "http.followRedirects=false"]);
        }
        cmd.args(["-c", "protocol.allow=never"]);
        for p in protocols.split(':') {
            cmd.args(["-c", &format!("protocol.{p}.allow=always")]);
        }
        cmd.args(["-c", "credential.helper=", "-c", "core.hooksPath=/dev/null"])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("HOME", "/nonexistent")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let out = tokio::time::timeout(self.config.git_timeout, cmd.output())
            .await
            .map_err(|_| format!("git {} timed out after {:?}", args.first().unwrap_or(&""), self.config.git_timeout))?
            .map_err(|e| format!("running {}: {e}", self.config.git.display()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
            return Err(format!("git {} failed: {}", args.first().unwrap_or(&""), git_failure(&last)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Clones `url` into `target` at `want` (branch, tag or commit; the default branch when
    /// `None`) and returns the commit checked out.
    async fn git_clone(&self, url: &str, want: Option<&str>, target: &Path) -> Result<String, String> {
        let pinned = self.check_git_remote(url).await?;
        let pinned = pinned.as_deref();
        let dest = target.to_string_lossy().into_owned();
        let is_sha = want.is_some_and(|w| w.len() >= 7 && w.len() <= 64 && w.bytes().all(|b| b.is_ascii_hexdigit()));
        let shallow = match want {
            Some(r) if !is_sha => {
                self.git_pinned(
                    &["clone", "--quiet", "--depth", "1", "--no-recurse-submodules", "--branch", r, "--", url, &dest],
                    None,
                    pinned,
                )
                .await
            }
            None => {
                let args = ["clone", "--quiet", "--depth", "1", "--no-recurse-submodules", "--", url, &dest];
                self.git_pinned(&args, None, pinned).await
            }
            Some(_) => Err("a commit needs a full clone".into()),
        };
        if shallow.is_err() {
            // Dumb-HTTP remotes cannot serve shallow clones, and commits need full history.
            if target.exists() {
                let _ = tokio::fs::remove_dir_all(target).await;
            }
            let args = ["clone", "--quiet", "--no-checkout", "--no-recurse-submodules", "--", url, &dest];
            self.git_pinned(&args, None, pinned).await?;
            let rev = want.unwrap_or("HEAD");
            self.git(&["checkout", "--quiet", "--detach", rev, "--"], Some(target))
                .await
                .map_err(|e| format!("{e} (ref `{rev}`)"))?;
        }
        self.git(&["rev-parse", "HEAD"], Some(target)).await
    }
}

impl LocalWorkspaces {
    /// Resolves a git remote's host and refuses it if an address is internal (unless the
    /// operator allowed that); returns the `host:port:ip` git must connect to.
    async fn check_git_remote(&self, url: &str) -> Result<Option<String>, String> {
        // The same plain form submit accepted (a run stored before that check is held to it too).
        let (host, port) = pond_core::source::git_remote(url)?;
        if self.config.allow_internal_git {
            return Ok(None);
        }
        let refused = |why: &str| format!("git remote {host} refused: {why} (pond fetches only from public addresses)");
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
            return match pond_core::net::special_purpose(ip) {
                Some(range) => Err(refused(&format!("{ip} is {range}"))),
                None => Ok(None),
            };
        }
        let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|_| format!("git remote {host} could not be resolved"))?
            .collect();
        if let Some(bad) = addrs.iter().find_map(|a| pond_core::net::special_purpose(a.ip()).map(|r| (a.ip(), r))) {
            return Err(refused(&format!("it resolves to {} ({})", bad.0, bad.1)));
        }
        let first = addrs.first().ok_or_else(|| format!("git remote {host} could not be resolved"))?;
        let ip = match first.ip() {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        Ok(Some(format!("{host}:{port}:{ip}")))
    }
}

/// What a failed git command reports: the ref or repository problems git names (useful to
/// the consumer), but one message for anything about the connection itself, so a source's
/// error text cannot tell closed, plain-HTTP and TLS ports apart.
fn git_failure(last_line: &str) -> String {
    let lower = last_line.to_ascii_lowercase();
    let about_the_repository = [
        "remote branch",
        "not found in upstream",
        "couldn't find remote ref",
        "did not match any",
        "reference is not a tree",
        "unknown revision",
    ];
    if about_the_repository.iter().any(|m| lower.contains(m)) {
        last_line.to_string()
    } else {
        "the remote could not be read as a git repository over http(s)".to_string()
    }
}

#[async_trait]
impl Workspaces for LocalWorkspaces {
    async fn prepare(&self, run: &Run) -> Result<Workspace, String> {
        let slot = self.slot(run.id);
        let mut guard = slot.lock().await;
        if let Some(ws) = guard.as_ref() {
            return Ok(ws.clone());
        }
        let ws = self.fetch(run).await?;
        *guard = Some(ws.clone());
        Ok(ws)
    }

    async fn release(&self, run: RunId) {
        let slot = self.prepared.lock().unwrap_or_else(|p| p.into_inner()).remove(&run);
        // Wait for a fetch in progress so it does not recreate the directory after removal.
        let dir = self.root.join(run.to_string());
        match slot {
            Some(slot) => {
                let _held = slot.lock().await;
            }
            // Never prepared by this process (a run of timer stages only), and `new` cleared what
            // earlier ones left: nothing to remove, and no system call to find that out.
            None => return,
        }
        let _ = tokio::fs::remove_dir_all(dir).await;
    }

    async fn pack(&self, run: &Run) -> Result<Vec<u8>, String> {
        self.prepare(run).await?;
        let dir = self.root.join(run.id.to_string());
        tokio::task::spawn_blocking(move || pack_dir(&dir))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("packing the checkout: {e}"))
    }
}

/// Every entry under `root` in path order, not following links, without the top-level `.git`.
fn walk_without_git(root: &Path) -> impl Iterator<Item = walkdir::Result<walkdir::DirEntry>> {
    walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| !(e.depth() == 1 && e.file_name() == ".git"))
}

/// SHA-256 over a tree: one line per entry, sorted by path, `.git` at the top skipped:
/// `F <mode> <sha256> <path>` for files (mode `755` if executable, else `644`) and
/// `L <target> <path>` for symlinks. The same files give the same digest on every host.
pub fn tree_digest(root: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut hasher = Sha256::new();
    for entry in walk_without_git(root) {
        let entry = entry.map_err(std::io::Error::other)?;
        let rel = entry.path().strip_prefix(root).unwrap_or(entry.path()).to_string_lossy().into_owned();
        let ft = entry.file_type();
        if ft.is_file() {
            let mode = if entry.metadata().map_err(std::io::Error::other)?.permissions().mode() & 0o111 != 0 {
                "755"
            } else {
                "644"
            };
            let mut file_hash = Sha256::new();
            let mut file = std::fs::File::open(entry.path())?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                file_hash.update(&buf[..n]);
            }
            hasher.update(format!("F {mode} {} {rel}\n", hex::encode(file_hash.finalize())));
        } else if ft.is_symlink() {
            let target = std::fs::read_link(entry.path())?;
            hasher.update(format!("L {} {rel}\n", target.to_string_lossy()));
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A `local` source's real directory: `path` with every link resolved, which must lie under
/// one of `roots` (also resolved). Text that only looks inside (`ALLOWED/lnk/.` where `lnk`
/// points out) is refused.
fn resolve_local(path: &Path, roots: &[PathBuf]) -> std::io::Result<PathBuf> {
    let real = std::fs::canonicalize(path)?;
    let inside = roots.iter().filter_map(|r| std::fs::canonicalize(r).ok()).any(|root| real.starts_with(&root));
    if !inside {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("it resolves to {}, outside the directories the operator allowed", real.display()),
        ));
    }
    Ok(real)
}

/// Copies a directory tree, never following a link: links are copied as links, and the root
/// itself must be a real directory.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    if !std::fs::symlink_metadata(from)?.is_dir() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"));
    }
    for entry in walkdir::WalkDir::new(from).follow_links(false).follow_root_links(false) {
        let entry = entry.map_err(std::io::Error::other)?;
        let rel = entry.path().strip_prefix(from).unwrap_or(entry.path());
        let dest = to.join(rel);
        let ft = entry.file_type();
        if ft.is_dir() {
            std::fs::create_dir_all(&dest)?;
        } else if ft.is_file() {
            std::fs::copy(entry.path(), &dest)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &dest)?;
        }
    }
    Ok(())
}

/// Unpacks a `tar.zst` bundle into `to`. Only regular files and directories are taken; links,
/// devices, absolute paths and `..` are refused, and the unpacked size and entry count are
/// capped so a small upload cannot fill the disk.
pub fn unpack_bundle(data: &[u8], to: &Path, max_bytes: u64, max_entries: u64) -> Result<(), String> {
    let decoder = zstd::stream::read::Decoder::new(data).map_err(|e| format!("not a zstd stream: {e}"))?;
    let mut archive = tar::Archive::new(decoder);
    std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
    let (mut total, mut count) = (0u64, 0u64);
    for entry in archive.entries().map_err(|e| format!("not a tar archive: {e}"))? {
        let mut entry = entry.map_err(|e| format!("bad tar entry: {e}"))?;
        count += 1;
        if count > max_entries {
            return Err(format!("bundle has more than {max_entries} entries"));
        }
        let path = entry.path().map_err(|e| format!("bad entry path: {e}"))?.into_owned();
        if path.is_absolute() || path.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(format!("bundle entry `{}` escapes the checkout", path.display()));
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            std::fs::create_dir_all(to.join(&path)).map_err(|e| e.to_string())?;
        } else if kind.is_file() {
            // Counted by the bytes actually written, not by a header field: a PAX `size` can
            // say more than the ustar one, and the archive reader believes the PAX one.
            let dest = to.join(&path);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            let mut file = std::fs::File::create(&dest).map_err(|e| format!("unpacking `{}`: {e}", path.display()))?;
            let room = max_bytes.saturating_sub(total);
            let written = std::io::copy(&mut (&mut entry).take(room + 1), &mut file)
                .map_err(|e| format!("unpacking `{}`: {e}", path.display()))?;
            total += written;
            if total > max_bytes {
                drop(file);
                let _ = std::fs::remove_file(&dest);
                return Err(format!("bundle unpacks to more than {max_bytes} bytes"));
            }
            if let Ok(mode) = entry.header().mode() {
                use std::os::unix::fs::PermissionsExt;
                // Only the owner's execute bit matters to a checkout; never setuid, setgid or sticky.
                let _ = file.set_permissions(std::fs::Permissions::from_mode(if mode & 0o100 != 0 {
                    0o755
                } else {
                    0o644
                }));
            }
        } else if !matches!(kind, tar::EntryType::XGlobalHeader | tar::EntryType::XHeader) {
            // Links and special files are skipped: a symlink could point the next entry outside.
            continue;
        }
    }
    Ok(())
}

/// Packs a directory as `tar.zst` (what `pond run submit --source <dir>` uploads). `.git` at
/// the top and anything that is not a file or directory are left out.
pub fn pack_dir(dir: &Path) -> std::io::Result<Vec<u8>> {
    let encoder = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    for entry in walk_without_git(dir) {
        let entry = entry.map_err(std::io::Error::other)?;
        if entry.depth() == 0 {
            continue;
        }
        let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path());
        let ft = entry.file_type();
        if ft.is_dir() {
            builder.append_dir(rel, entry.path())?;
        } else if ft.is_file() {
            builder.append_path_with_name(entry.path(), rel)?;
        }
    }
    builder.into_inner()?.finish()
}

/// What [`pack_source`] packed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Packed {
    /// Files packed.
    pub files: u64,
    /// Their bytes, before compression.
    pub bytes: u64,
}

/// Packs a consumer's source directory for upload: like [`pack_dir`], but what the directory's
/// `.gitignore` files (and `.git/info/exclude`) ignore, and what `.pondignore` files list in the
/// same syntax, stays out — build outputs, dependencies, local secrets. Symlinks are packed as
/// links, never followed. Gives up (with [`PackError::TooLarge`]) as soon as the files pass
/// `max_bytes`, before anything is uploaded.
pub fn pack_source(dir: &Path, max_bytes: u64) -> Result<(Vec<u8>, Packed), PackError> {
    let encoder = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    let mut packed = Packed::default();
    let walk = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .follow_links(false)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(false)
        .require_git(false)
        .add_custom_ignore_filename(".pondignore")
        // No repository metadata, at any depth (a vendored clone's `.git/config` may hold a
        // token in a remote URL).
        .filter_entry(|e| e.file_name() != ".git")
        .sort_by_file_name(|a, b| a.cmp(b))
        .build();
    for entry in walk {
        let entry = entry.map_err(|e| PackError::Io(std::io::Error::other(e)))?;
        if entry.depth() == 0 {
            continue;
        }
        let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path());
        let Some(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            builder.append_dir(rel, entry.path())?;
        } else if ft.is_file() || ft.is_symlink() {
            let size = if ft.is_file() { entry.metadata().map(|m| m.len()).unwrap_or(0) } else { 0 };
            packed.files += 1;
            packed.bytes += size;
            if packed.bytes > max_bytes {
                return Err(PackError::TooLarge { bytes: packed.bytes, max: max_bytes, at: rel.to_path_buf() });
            }
            builder.append_path_with_name(entry.path(), rel)?;
        }
    }
    Ok((builder.into_inner()?.finish()?, packed))
}

/// Why a source directory could not be packed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackError {
    /// Reading or packing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The files pass the limit.
    #[error(
        "the source passes {max} bytes (at least {bytes} by {}): leave out what the run does not need with .gitignore or .pondignore",
        at.display()
    )]
    TooLarge {
        /// Bytes counted so far.
        bytes: u64,
        /// The limit.
        max: u64,
        /// The file that passed it.
        at: std::path::PathBuf,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_leaves_out_what_gitignore_and_pondignore_list() {
        let src = tempfile::tempdir().unwrap();
        for (path, text) in [
            (".gitignore", "node_modules/\n*.log\n"),
            (".pondignore", "secret.txt\n"),
            ("app/main.rs", "fn main() {}"),
            ("app/run.log", "noise"),
            ("node_modules/dep/index.js", "x"),
            ("secret.txt", "sk-live"),
            (".env.example", "A=1"),
            (".git/config", "[core]"),
            ("vendor/lib/.git/config", "url = https://user:token@example.com/x"),
        ] {
            let path = src.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let (bytes, packed) = pack_source(src.path(), 1 << 20).unwrap();
        let out = tempfile::tempdir().unwrap();
        unpack_bundle(&bytes, out.path(), 1 << 20, 100).unwrap();
        for kept in [".gitignore", ".pondignore", "app/main.rs", ".env.example"] {
            assert!(out.path().join(kept).exists(), "{kept} kept");
        }
        for left in ["app/run.log", "node_modules", "secret.txt", ".git", "vendor/lib/.git"] {
            assert!(!out.path().join(left).exists(), "{left} left out");
        }
        assert_eq!(packed.files, 4);
        let err = pack_source(src.path(), 10).unwrap_err();
        assert!(matches!(err, PackError::TooLarge { max: 10, .. }), "{err}");
    }

    #[test]
    fn bundles_round_trip_and_digest_is_stable() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/c.txt"), "hello").unwrap();
        std::fs::write(src.path().join("top.rs"), "fn main(){}").unwrap();
        std::fs::create_dir_all(src.path().join(".git")).unwrap();
        std::fs::write(src.path().join(".git/HEAD"), "ref").unwrap();
        let packed = pack_dir(src.path()).unwrap();
        let out = tempfile::tempdir().unwrap();
        unpack_bundle(&packed, out.path(), 1 << 20, 100).unwrap();
        assert_eq!(std::fs::read_to_string(out.path().join("a/b/c.txt")).unwrap(), "hello");
        assert!(!out.path().join(".git").exists());
        assert_eq!(tree_digest(src.path()).unwrap(), tree_digest(out.path()).unwrap());
        std::fs::write(out.path().join("top.rs"), "changed").unwrap();
        assert_ne!(tree_digest(src.path()).unwrap(), tree_digest(out.path()).unwrap());
        let err = unpack_bundle(&packed, tempfile::tempdir().unwrap().path(), 3, 100).unwrap_err();
        assert!(err.contains("more than 3 bytes"), "{err}");
        assert!(unpack_bundle(b"not zstd", out.path(), 1 << 20, 100).is_err());
    }

    /// The outside check's bypass: a PAX `size` larger than the ustar one. The cap counts the
    /// bytes written, so a small upload cannot unpack to more than it allows.
    #[test]
    fn a_pax_size_cannot_unpack_past_the_cap() {
        let mut builder = tar::Builder::new(Vec::new());
        builder.append_pax_extensions([("size", "10485760".as_bytes())]).unwrap();
        let mut header = tar::Header::new_ustar();
        header.set_path("big").unwrap();
        header.set_size(10);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, std::io::repeat(0).take(10 << 20)).unwrap();
        let packed = zstd::encode_all(builder.into_inner().unwrap().as_slice(), 3).unwrap();
        assert!(packed.len() < 64 * 1024, "a small upload: {} bytes", packed.len());
        let out = tempfile::tempdir().unwrap();
        let err = unpack_bundle(&packed, out.path(), 1 << 20, 100).unwrap_err();
        assert!(err.contains("more than 1048576 bytes"), "{err}");
        let left = out.path().join("big").metadata().map(|m| m.len()).unwrap_or(0);
        assert!(left <= 1 << 20, "{left} bytes written");
    }

    #[test]
    fn bundle_entries_cannot_escape() {
        let mut raw = Vec::new();
        {
            let mut builder = tar::Builder::new(&mut raw);
            let mut header = tar::Header::new_gnu();
            let data = b"owned";
            header.set_size(data.len() as u64);
            header.set_entry_type(tar::EntryType::Regular);
            // `append_data` refuses `..`, so write the name bytes directly as an attacker would.
            let name = b"../escape.txt";
            header.as_old_mut().name[..name.len()].copy_from_slice(name);
            header.set_cksum();
            builder.append(&header, &data[..]).unwrap();
            builder.finish().unwrap();
        }
        let packed = zstd::encode_all(&raw[..], 3).unwrap();
        let parent = tempfile::tempdir().unwrap();
        let target = parent.path().join("checkout");
        let err = unpack_bundle(&packed, &target, 1 << 20, 100).unwrap_err();
        assert!(err.contains("escapes the checkout"), "{err}");
        assert!(!parent.path().join("escape.txt").exists());
    }
}
