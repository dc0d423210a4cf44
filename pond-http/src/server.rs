//! Assembly of a pond server: store, engine, executors, driver and HTTP, started in-process.
//! `pond server` calls [`start`]; tests and embedders can too.

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pond_core::engine::{Engine, EngineConfig};
use pond_core::sandbox::SandboxBackend;
use pond_core::source::SourcePolicy;
use pond_core::store::{Role, Store};
use pond_core::time::{Clock, Millis, SystemClock, Timestamp};
use pond_exec::{
    BuiltinExecutor, Driver, DriverConfig, FetchConfig, LocalWorkspaces, NoopExecutor, ShellConfig, ShellExecutor,
    SwarmExecutor,
};
use pond_store::{PgStore, SqliteStore, WatchedStore};
use rand::RngCore;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::app;
use crate::auth::mint_token;
use crate::state::{AppState, Limits};

/// Everything `pond server` can be told.
#[derive(Clone)]
pub struct ServerConfig {
    /// Address to listen on (port 0: any free port).
    pub listen: SocketAddr,
    /// Where the database (SQLite), admin token and checkouts live.
    pub data_dir: PathBuf,
    /// PostgreSQL URL; when set, the store is PostgreSQL (shared by any number of nodes)
    /// instead of SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// Connections in the PostgreSQL pool.
    pub database_pool: u32,
    /// Name of this node in leases; random when `None`.
    pub node_id: Option<String>,
    /// How long a stage's lease lasts without renewal.
    pub lease: Duration,
    /// Stages run at once.
    pub slots: usize,
    /// Fallback poll of the driver.
    pub poll: Duration,
    /// Directories `local` sources may point into.
    pub allow_local_sources: Vec<PathBuf>,
    /// Allow `http://` git remotes.
    pub allow_plain_http_git: bool,
    /// What a pooled result that fails verification does, for stages that do not say
    /// (`--attestation required|record`).
    pub attestation_default: pond_core::definition::AttestationPolicy,
    /// Most bytes all of a run's artifacts may take (`--max-run-artifact-bytes`).
    pub max_run_artifact_bytes: u64,
    /// Most bytes of unused uploaded bundles a project may hold (`--max-pending-bundle-bytes`).
    pub max_pending_bundle_bytes: u64,
    /// How long an uploaded bundle no run uses is kept (`--bundle-ttl`).
    pub bundle_ttl: Duration,
    /// Origins a model's `base_url` may point at besides the providers' own (`--model-origin`).
    pub model_origins: Vec<String>,
    /// Most bytes of output kept per stage attempt (`--max-log-bytes`).
    pub max_log_bytes: u64,
    /// Allow git remotes on internal addresses (`--allow-internal-git`).
    pub allow_internal_git: bool,
    /// Tag prefixes the operator reserves beyond `pool:` and `tenant:` (`--reserved-tag-prefix`).
    pub reserved_tag_prefixes: Vec<String>,
    /// Request limits.
    pub limits: Limits,
    /// Host variables passed to `shell` stages besides the defaults.
    pub shell_env_allow: Vec<String>,
    /// Wait between SIGTERM and SIGKILL when a stage is stopped.
    pub kill_grace: Duration,
    /// How long shutdown waits for running stages.
    pub drain: Duration,
    /// How long a verified token is trusted without asking the database again (a revocation
    /// reaches the other nodes within this time).
    pub token_cache: Duration,
    /// Contains `shell` stages.
    pub sandbox: Arc<dyn SandboxBackend>,
    /// The server key (what pond keeps at rest is sealed under it; every node sharing a
    /// database needs the same). `None`: `server.key` in the data directory, made on first use.
    pub server_key: Option<[u8; 32]>,
    /// Server keys still accepted for opening while a rotation re-seals what they sealed
    /// (`--previous-server-key`); with `server_key` unset, `server.key.previous` in the data
    /// directory (one per line, as `pond admin server-key rotate` writes them) is added.
    pub previous_server_keys: Vec<[u8; 32]>,
    /// Server keys accepted for opening only (`--next-server-key`): the first step of rolling a
    /// rotation over several nodes, so a node not yet moved reads what moved nodes seal.
    pub next_server_keys: Vec<[u8; 32]>,
    /// The first admin token, when the operator chooses it (`POND_ADMIN_TOKEN`: every node of a
    /// deployment gets the same from one Secret). Stored (hashed) only while no admin token
    /// exists; `None`: the first node to start mints one into `admin.token`.
    pub bootstrap_admin_token: Option<String>,
    /// Internal addresses webhooks may be sent to (`--webhook-allow-ip`); others are refused.
    pub webhook_allow_ips: Vec<std::net::IpAddr>,
    /// How long events are kept (`--event-retention`); at least the webhook retry window.
    pub event_retention: Duration,
    /// How long ended runs are kept, with their logs, artifacts and blobs (`--retain-finished`);
    /// `None`: for ever.
    pub retain_finished: Option<Duration>,
    /// Serve HTTPS with this certificate and key (`--tls-cert`, `--tls-key`); `None`: plain HTTP.
    pub tls: Option<crate::tls::TlsFiles>,
}

/// Why an operator's first admin token is refused, if it is.
pub fn check_admin_token(token: &str) -> Result<(), String> {
    let body = token.strip_prefix("pond_admin_").ok_or("must start with `pond_admin_`")?;
    if body.len() < 32 || !body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err("needs at least 32 letters, digits, `-` or `_` after `pond_admin_` (e.g. `pond_admin_$(openssl rand -hex 32)`)".into());
    }
    Ok(())
}

impl ServerConfig {
    /// Defaults: 127.0.0.1:8420, data in `data_dir`, 30 s leases, 16 slots.
    pub fn new(data_dir: PathBuf, sandbox: Arc<dyn SandboxBackend>) -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8420)),
            data_dir,
            database_url: None,
            database_pool: 16,
            node_id: None,
            lease: Duration::from_secs(30),
            slots: 16,
            poll: Duration::from_millis(500),
            allow_local_sources: Vec::new(),
            allow_plain_http_git: false,
            reserved_tag_prefixes: Vec::new(),
            allow_internal_git: false,
            attestation_default: pond_core::definition::AttestationPolicy::Required,
            max_log_bytes: pond_core::engine::DEFAULT_MAX_LOG_BYTES,
            model_origins: Vec::new(),
            max_run_artifact_bytes: pond_core::engine::DEFAULT_MAX_RUN_ARTIFACT_BYTES,
            max_pending_bundle_bytes: pond_core::engine::DEFAULT_MAX_PENDING_BUNDLE_BYTES,
            bundle_ttl: Duration::from_secs(3600),
            limits: Limits::default(),
            shell_env_allow: Vec::new(),
            kill_grace: Duration::from_secs(10),
            drain: Duration::from_secs(10),
            token_cache: Duration::from_secs(5),
            sandbox,
            server_key: None,
            previous_server_keys: Vec::new(),
            next_server_keys: Vec::new(),
            bootstrap_admin_token: None,
            webhook_allow_ips: Vec::new(),
            event_retention: Duration::from_secs(30 * 24 * 3600),
            retain_finished: None,
            tls: None,
        }
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Another server holds the data directory.
    #[error("data directory {0} is in use by another pond server")]
    InUse(PathBuf),
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("opening the store: {0}")]
    Store(#[from] pond_core::StoreError),
    /// This node's log-signing key could not be published.
    #[error("publishing this node's log-signing key: {0}")]
    Publish(String),
    /// The TLS certificate or key cannot be used.
    #[error("--tls-cert/--tls-key: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The keys, the database's identity or its schema do not fit this node (the message says
    /// which, and what to do).
    #[error("{0}")]
    Refused(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let context = context.into();
    move |source| ServerError::Io { context, source }
}

/// A started server.
pub struct RunningServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// Whether it serves HTTPS.
    pub https: bool,
    /// Where the admin token is stored.
    pub admin_token_file: PathBuf,
    /// The admin token, when this start created it.
    pub new_admin_token: Option<String>,
    /// Stages from an earlier process that will be retried.
    pub interrupted_stages: u64,
    /// The engine, for in-process callers.
    pub engine: Arc<Engine>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    /// The longest shutdown waits: the drain, the kill grace, and a little for hand-backs.
    stop_within: Duration,
    _lock: std::fs::File,
}

impl RunningServer {
    /// `http://addr`.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops accepting requests and claims, waits for running stages (up to the drain time).
    /// Bounded even when the store is away (hand-backs and results that cannot be written are
    /// left to their leases, which another node adopts).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let tasks = futures_util::future::join_all(self.tasks);
        if tokio::time::timeout(self.stop_within, tasks).await.is_err() {
            tracing::warn!(
                waited = ?self.stop_within,
                "stopping without recording what is left (the store may be away); its leases will expire and another node will retry it"
            );
        }
        for t in self.background {
            t.abort();
        }
    }

    /// Runs until `signal` resolves, then shuts down.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }
}

fn write_secret_file(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A fresh file, never one found in place: whatever is at the path (a leftover, or a link
    // someone planted to make this process write elsewhere) is removed — not followed — and
    // the new file is made exclusively, without following links.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

async fn ensure_admin_token(
    store: &dyn Store,
    data_dir: &Path,
    bootstrap: Option<&str>,
    now: pond_core::time::Timestamp,
) -> Result<(PathBuf, Option<String>), ServerError> {
    let path = data_dir.join("admin.token");
    let has_admin = store.list_tokens().await?.iter().any(|t| t.role == Role::Admin && t.revoked_at.is_none());
    if has_admin {
        return Ok((path, None));
    }
    // An operator's token that was stored once already (rotated or revoked since) is not
    // brought back: a new one is minted into admin.token instead.
    let bootstrap = match bootstrap {
        Some(token) if store.find_token(&crate::auth::hash_secret(token)).await?.is_some() => {
            tracing::warn!("POND_ADMIN_TOKEN was used before and has been revoked or rotated; minting a new admin token into admin.token");
            None
        }
        other => other,
    };
    let (secret, record) = match bootstrap {
        // The operator's own: stored hashed, the same whichever node stores it first.
        Some(token) => {
            let (_, mut record) = mint_token(Role::Admin, "admin (POND_ADMIN_TOKEN)", Vec::new(), now);
            record.secret_sha256 = crate::auth::hash_secret(token);
            (token.to_string(), record)
        }
        None => mint_token(Role::Admin, "admin (created at first start)", Vec::new(), now),
    };
    // The file first: a token stored but never written down would lock the operator out. Of
    // several nodes starting at once, one stores its token; the others discard theirs.
    let pending = data_dir.join("admin.token.new");
    write_secret_file(&pending, &secret).map_err(io(format!("writing {}", pending.display())))?;
    if store.insert_first_admin(&record).await? {
        std::fs::rename(&pending, &path).map_err(io(format!("writing {}", path.display())))?;
        Ok((path, Some(secret)))
    } else {
        let _ = std::fs::remove_file(&pending);
        Ok((path, None))
    }
}

/// What `pond admin token recover` did.
#[derive(Debug)]
pub struct RecoveredToken {
    /// Where the new admin token was written (0600).
    pub file: PathBuf,
    /// Its id.
    pub id: pond_core::ids::TokenId,
    /// Other admin tokens revoked.
    pub revoked: usize,
}

/// Mints a new admin token straight into the store — SQLite in `data_dir`, or PostgreSQL at
/// `database_url` — for an operator who lost every admin token, and writes it to
/// `data_dir/admin.token` (0600; the file first, so a stored token is never unwritten). With
/// `revoke_others` every other admin token stops working (at once on this store; within the
/// servers' token cache, 5 s). Only someone who can open the database can do it, and that
/// someone is the operator already. Beside a running server it is safe: one more token row.
pub async fn recover_admin_token(
    data_dir: &Path,
    database_url: Option<&str>,
    revoke_others: bool,
) -> Result<RecoveredToken, ServerError> {
    // Never migrates: a CLI of another version refuses rather than change the schema under the
    // servers.
    let schema = match database_url {
        Some(url) => Some(pond_store::pg_schema(url).await?),
        None => pond_store::sqlite_schema(&data_dir.join("pond.db")).await?,
    };
    if let Some(schema) = schema {
        if !schema.pending().is_empty() || !schema.unknown().is_empty() {
            return Err(ServerError::Refused(format!(
                "the database's schema is not this pond's ({}): run `pond admin token recover` of the version the server runs",
                env!("CARGO_PKG_VERSION")
            )));
        }
    }
    let store: Arc<dyn Store> = match database_url {
        Some(url) => Arc::new(PgStore::connect(url, 2).await?),
        None => {
            let db = data_dir.join("pond.db");
            if !db.is_file() {
                return Err(io(format!("opening {}", db.display()))(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no pond.db here: pass the server's --data-dir, or --database-url for PostgreSQL",
                )));
            }
            Arc::new(SqliteStore::open(&db).await?)
        }
    };
    let now = SystemClock.now();
    let (secret, record) = mint_token(Role::Admin, "admin (recovered)", Vec::new(), now);
    // Staged under a name of its own: a server minting its first token stages `admin.token.new`.
    let (pending, file) =
        (data_dir.join(format!("admin.token.recover-{}", std::process::id())), data_dir.join("admin.token"));
    write_secret_file(&pending, &secret).map_err(io(format!("writing {}", pending.display())))?;
    store.insert_token(&record).await?;
    std::fs::rename(&pending, &file).map_err(io(format!("writing {}", file.display())))?;
    let mut revoked = 0;
    if revoke_others {
        for token in store.list_tokens().await? {
            if token.role == Role::Admin && token.id != record.id && token.revoked_at.is_none() {
                revoked += usize::from(store.revoke_token(token.id, now).await?);
            }
        }
    }
    Ok(RecoveredToken { file, id: record.id, revoked })
}

/// Starts a server: on PostgreSQL when `config.database_url` is set, else on SQLite in
/// `config.data_dir`.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    // Checked first: a certificate that cannot be served fails the start before anything else.
    let tls_settings = config.tls.as_ref().map(crate::tls::ServerTls::load).transpose()?;
    let data_dir = &config.data_dir;
    if !data_dir.exists() {
        std::fs::create_dir_all(data_dir).map_err(io(format!("creating {}", data_dir.display())))?;
        // A data directory pond made is private: it holds the database, tokens and keys.
        std::fs::set_permissions(data_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io(format!("securing {}", data_dir.display())))?;
    }
    let lock = lock_data_dir(data_dir)?;

    let node_id = config.node_id.clone().unwrap_or_else(|| {
        let mut raw = [0u8; 4];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        format!("node-{}", hex::encode(raw))
    });
    // The process's metrics recorder, before anything records.
    let _ = crate::metrics::handle();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mut background = Vec::new();
    let (store, interrupted_stages) = match &config.database_url {
        Some(url) => {
            let pg = PgStore::connect(url, config.database_pool).await?;
            let store = Arc::new(WatchedStore::new(Arc::new(pg.clone())));
            background.extend(pg.relay_changes(store.clone(), node_id.clone()));
            // Other nodes may hold leases: stale ones expire on their own and are adopted then.
            (store, 0)
        }
        None => {
            // The database (and the WAL and shared-memory files SQLite makes with its mode) is
            // readable by the server's user only.
            let db = data_dir.join("pond.db");
            if !db.exists() {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&db)
                    .map_err(io(format!("creating {}", db.display())))?;
            }
            std::fs::set_permissions(&db, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(io(format!("securing {}", db.display())))?;
            let sqlite = SqliteStore::open(&db).await?;
            let store = Arc::new(WatchedStore::new(Arc::new(sqlite)));
            // This process holds the data directory exclusively, so any lease in the database
            // belongs to a process that is gone: let them expire now, not after the lease time.
            let interrupted = store.expire_all_leases(clock.now()).await?;
            (store, interrupted)
        }
    };
    let (admin_token_file, new_admin_token) =
        ensure_admin_token(&*store, data_dir, config.bootstrap_admin_token.as_deref(), clock.now()).await?;

    let at_rest_key = match config.server_key {
        Some(key) => key,
        None => {
            let path = data_dir.join("server.key");
            if config.database_url.is_some() {
                tracing::warn!(
                    "no POND_SERVER_KEY: using {} — every node sharing the database needs the same key",
                    path.display()
                );
            }
            pond_exec::load_or_create_key(&path).map_err(io(format!("reading {}", path.display())))?
        }
    };
    let previous_file = data_dir.join(PREVIOUS_KEYS_FILE);
    let mut previous_keys = config.previous_server_keys.clone();
    let mut from_file = Vec::new();
    if config.server_key.is_none() {
        from_file = read_previous_keys(&previous_file)?;
        previous_keys.extend(from_file.iter().copied());
    }
    if let Some(both) = config.next_server_keys.iter().find(|k| previous_keys.contains(k)) {
        return Err(ServerError::Refused(format!(
            "server key {} is given both as previous (its values are moved to the current key) and as next \
             (opened only): give it as one of them",
            pond_core::credentials::server_key_fingerprint(both)
        )));
    }
    let at_rest_keys =
        pond_core::server_keys::AtRestKeys::new(at_rest_key, &previous_keys).with_next(&config.next_server_keys);
    // The control plane's identity outlives rotations; a node given a foreign key stops here.
    // A new root is checked against this data directory's pin before it is stored, so a node
    // that refuses it leaves nothing behind for other nodes to serve.
    let identity_key = pond_core::server_keys::identity_root(store.as_ref(), &at_rest_keys, |root| {
        pinned_identity_differs(data_dir, root)
            .map_err(|e| pond_core::CoreError::Store(pond_core::StoreError::Backend(e)))
    })
    .await
    .map_err(|e| ServerError::Refused(e.to_string()))?;
    check_pinned_identity(data_dir, &identity_key)?;
    let fetch = FetchConfig {
        allow_plain_http_git: config.allow_plain_http_git,
        allow_internal_git: config.allow_internal_git,
        local_roots: config.allow_local_sources.clone(),
        at_rest_keys: Some(at_rest_keys.clone()),
        ..Default::default()
    };
    let workspaces = LocalWorkspaces::new(data_dir.join("checkouts"), store.clone(), fetch)
        .map_err(io("preparing the checkouts directory"))?;
    let scratch = data_dir.join("scratch");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).map_err(io(format!("clearing {}", scratch.display())))?;
    }
    std::fs::create_dir_all(&scratch).map_err(io(format!("creating {}", scratch.display())))?;
    let group_dir = data_dir.join("process-groups");
    let orphans = pond_exec::reap_orphans(&group_dir).map_err(io(format!("cleaning {}", group_dir.display())))?;
    if orphans > 0 {
        tracing::warn!(orphans, "killed stage processes left running by the previous stop");
    }
    let mut shell = ShellConfig::new(scratch.clone());
    shell.group_dir = Some(group_dir);
    shell.env_allowlist.extend(config.shell_env_allow.iter().cloned());
    shell.kill_grace = config.kill_grace;
    shell.max_artifact_bytes = config.limits.max_bundle_bytes as u64;
    // Signs the log key headers of confidential runs run on this node.
    let key_path = data_dir.join("signing.ed25519");
    let signing_seed =
        pond_exec::load_or_create_key(&key_path).map_err(io(format!("reading {}", key_path.display())))?;
    let node_id_for_webhooks = node_id.clone();
    let engine_config = EngineConfig {
        signing_seed,
        at_rest_key: *at_rest_keys.current(),
        previous_keys: at_rest_keys.previous().to_vec(),
        next_keys: at_rest_keys.next().to_vec(),
        identity_key,
        node_id,
        lease: Millis(config.lease.as_millis() as u64),
        source_policy: SourcePolicy {
            local_roots: config.allow_local_sources.clone(),
            allow_plain_http_git: config.allow_plain_http_git,
        },
        reserved_tag_prefixes: config.reserved_tag_prefixes.clone(),
        attestation_default: config.attestation_default,
        max_log_bytes: config.max_log_bytes,
        model_origins: config.model_origins.clone(),
        max_run_artifact_bytes: config.max_run_artifact_bytes,
        max_pending_bundle_bytes: config.max_pending_bundle_bytes,
        bundle_ttl: Millis(config.bundle_ttl.as_millis() as u64),
        ..EngineConfig::default()
    };
    let shell_executor = Arc::new(ShellExecutor::new(shell, config.sandbox.clone()));
    let engine = Arc::new(
        Engine::new(store.clone(), clock.clone(), Arc::new(workspaces), engine_config)
            .with_pause(Arc::new(pond_exec::TokioPause))
            .with_executor(Arc::new(NoopExecutor))
            .with_executor(Arc::new(BuiltinExecutor))
            .with_executor(Arc::new(SwarmExecutor::new(
                Arc::new(crate::broker::ServerAgents {
                    registry: pond_core::agents::Registry::new(store.clone())
                        .with_model_origins(config.model_origins.clone()),
                    credentials: pond_core::credentials::Credentials::new(
                        store.clone(),
                        clock.clone(),
                        at_rest_keys.clone(),
                    ),
                    ledger: Some((pond_core::usage::Ledger::new(store.clone()), clock.clone())),
                }),
                Arc::new(crate::broker::HttpKeyBroker),
                shell_executor.clone(),
                scratch.clone(),
            )))
            .with_executor(shell_executor)
            .with_sandbox_profiles(config.sandbox.profiles()),
    );
    engine.publish_log_signer().await.map_err(|e| ServerError::Publish(e.to_string()))?;

    let driver_config = DriverConfig { slots: config.slots.max(1), poll: config.poll, ..Default::default() };
    let driver = Driver::new(engine.clone(), driver_config, store.runs_changed());
    let state = AppState {
        engine: engine.clone(),
        store: store.clone(),
        driver: Some(driver.clone()),
        limits: config.limits.clone(),
        tokens: Arc::new(crate::auth::TokenCache::new(config.token_cache)),
        pools: Arc::new(pond_core::pool::Pools::new(store.clone(), engine.clock().clone())),
        seen: Arc::default(),
        polls: Arc::default(),
        members: Arc::default(),
        webhooks: Arc::new(crate::webhooks::WebhookConfig {
            keys: at_rest_keys.clone(),
            allow_ips: config.webhook_allow_ips.clone(),
        }),
    };

    let listener =
        tokio::net::TcpListener::bind(config.listen).await.map_err(io(format!("listening on {}", config.listen)))?;
    let addr = listener.local_addr().map_err(io("reading the bound address"))?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let tls = tls_settings;
    let pruning = tokio::spawn(prune_events(store.clone(), clock.clone(), config.event_retention, shutdown_rx.clone()));
    let retiring = tokio::spawn(retire_finished(engine.clone(), config.retain_finished, shutdown_rx.clone()));
    let expiring = tokio::spawn(expire_bundles(engine.clone(), config.bundle_ttl, shutdown_rx.clone()));
    // Only the nodes on the newest key move data to it (see `pond_core::server_keys`).
    let file = config.server_key.is_none().then_some((previous_file, from_file));
    let resealing = tokio::spawn(reseal_at_rest(engine.clone(), file, shutdown_rx.clone()));
    let webhooks = tokio::spawn(crate::webhooks::dispatch(
        state.clone(),
        shutdown_rx.clone(),
        node_id_for_webhooks,
        config.database_url.is_none(),
    ));
    let credentials = tokio::spawn(forget_changed_credentials(
        state.store.members_changed(),
        state.pools.clone(),
        shutdown_rx.clone(),
    ));
    let seen = tokio::spawn(crate::orch::flush_seen(state.seen.clone(), state.pools.clone(), shutdown_rx.clone()));
    let mut http_stop = shutdown_rx.clone();
    let http = tokio::spawn(async move {
        let stop = async move {
            let _ = http_stop.wait_for(|s| *s).await;
        };
        if let Err(e) = crate::tls::serve(listener, tls, app(state), stop).await {
            tracing::error!(error = %e, "http server stopped");
        }
    });
    let drain = config.drain;
    let driving = tokio::spawn(driver.run(shutdown_rx, drain));
    Ok(RunningServer {
        addr,
        https: config.tls.is_some(),
        admin_token_file,
        new_admin_token,
        interrupted_stages,
        engine,
        shutdown,
        tasks: vec![driving, http, webhooks, pruning, retiring, expiring, resealing, credentials, seen],
        background,
        stop_within: config.drain + config.kill_grace + Duration::from_secs(5),
        _lock: lock,
    })
}

/// Drops the pool credentials this node cached whenever a pool member changes, here or on
/// another node (told by the store's relay): a revocation or a drain holds everywhere at once.
async fn forget_changed_credentials(
    mut changed: watch::Receiver<u64>,
    pools: Arc<pond_core::pool::Pools>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = changed.changed() => {
                if r.is_err() {
                    return;
                }
                pools.forget_credentials();
            }
        }
    }
}

/// Deletes events older than `retention` that no webhook still has to deliver, hourly (the
/// first time a minute after start), until `stop`. Every node may; deleting what another
/// already deleted is harmless.
async fn prune_events(
    store: Arc<WatchedStore>,
    clock: Arc<dyn Clock>,
    retention: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut wait = Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = Duration::from_secs(3600);
        let before = Timestamp::from_millis(clock.now().as_millis() - retention.as_millis() as i64);
        // Events a webhook has yet to deliver stay, however old (its receiver may be down).
        let below = match crate::webhooks::first_undelivered(&*store).await {
            Ok(first) => first,
            Err(e) => {
                tracing::warn!(error = %e, "reading webhook cursors failed; not pruning events");
                continue;
            }
        };
        match store.prune_events(before, below).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "pruned events past the retention"),
            Err(e) => tracing::warn!(error = %e, "pruning events failed; will retry"),
        }
    }
}

/// Deletes uploaded bundles no run used within `ttl`, every quarter of it (between a second and
/// a minute), until `stop`. Every node may (records are swapped, so each goes once).
/// Where a data directory keeps the server keys a rotation replaced.
pub const PREVIOUS_KEYS_FILE: &str = "server.key.previous";

/// The control plane's public key this data directory's node served with before
/// (`control-plane.pub`, written at its first start): a database whose identity record was
/// swapped or deleted — which the server key alone cannot tell — is refused here instead of
/// being served under an identity consumers and workers never pinned.
fn check_pinned_identity(data_dir: &Path, identity_root: &[u8; 32]) -> Result<(), ServerError> {
    pinned_identity_differs(data_dir, identity_root).map_err(ServerError::Refused)?;
    let path = data_dir.join(PINNED_IDENTITY_FILE);
    if path.exists() {
        return Ok(());
    }
    // Whole or not at all: a crash mid-write never leaves an empty pin that refuses the next start.
    let staged = data_dir.join(format!("{PINNED_IDENTITY_FILE}.new"));
    std::fs::write(&staged, format!("{}\n", control_plane_public(identity_root)))
        .and_then(|()| std::fs::rename(&staged, &path))
        .map_err(io(format!("writing {}", path.display())))
}

fn control_plane_public(identity_root: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode(pond_core::keys::ed25519_public(&pond_core::keys::control_plane_seed(identity_root)))
}

/// Why `identity_root` is not the identity this data directory pinned, if it is not (no pin
/// yet: nothing to say).
fn pinned_identity_differs(data_dir: &Path, identity_root: &[u8; 32]) -> Result<(), String> {
    let public = control_plane_public(identity_root);
    let path = data_dir.join(PINNED_IDENTITY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(pinned) if pinned.trim() == public || pinned.trim().is_empty() => Ok(()),
        Ok(pinned) => Err(format!(
            "the database's control-plane identity ({public}) is not the one this node served before ({}, in {}): \
             its identity record was changed or replaced; restore the database, or remove {} if the change is meant",
            pinned.trim(),
            path.display(),
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

/// Where a data directory pins the control plane's public key.
pub const PINNED_IDENTITY_FILE: &str = "control-plane.pub";

/// Holds `data_dir` for this process alone (`pond.lock`) for as long as the file returned is
/// open: a second server on it, or a key rotation beside a running one, is refused.
pub fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, ServerError> {
    let lock_path = data_dir.join("pond.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(format!("opening {}", lock_path.display())))?;
    fs2::FileExt::try_lock_exclusive(&lock).map_err(|_| ServerError::InUse(data_dir.to_path_buf()))?;
    Ok(lock)
}

/// The keys of a `server.key.previous` file (absent: none).
fn read_previous_keys(path: &std::path::Path) -> Result<Vec<[u8; 32]>, ServerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    };
    let lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    lines
        .enumerate()
        .map(|(i, line)| {
            pond_core::pool::decode_key(line).map_err(|e| {
                io(format!("reading {}", path.display()))(std::io::Error::other(format!("line {}: the key {e}", i + 1)))
            })
        })
        .collect()
}

/// While previous server keys are configured, re-seals what they sealed under the current key
/// (a pass at start, then every minute until one finds nothing left); then, on a data
/// directory's keys, removes `server.key.previous`, and says the rotation is done.
async fn reseal_at_rest(
    engine: Arc<Engine>,
    previous_file: Option<(PathBuf, Vec<[u8; 32]>)>,
    mut stop: watch::Receiver<bool>,
) {
    if engine.config().previous_keys.is_empty() {
        return;
    }
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = Duration::from_secs(60);
        match engine.reseal_at_rest().await {
            Ok(report) => {
                metrics::counter!("pond_resealed_total", "what" => "record").increment(report.records);
                metrics::counter!("pond_resealed_total", "what" => "blob").increment(report.blobs);
                metrics::gauge!("pond_sealed_under_previous_keys").set(report.remaining as f64);
                tracing::info!(
                    records = report.records,
                    blobs = report.blobs,
                    blobs_checked = report.blobs_checked,
                    remaining = report.remaining,
                    "server-key rotation: re-sealed under the current key"
                );
                if report.remaining > 0 {
                    continue;
                }
                // Only the keys this node started with, and only if nobody changed the file
                // since (a rotation started meanwhile appended to it).
                if let Some((path, loaded)) = &previous_file {
                    match read_previous_keys(path) {
                        Ok(now) if now.is_empty() => {}
                        Ok(now) if now == *loaded => {
                            if let Err(e) = std::fs::remove_file(path) {
                                tracing::warn!(error = %e, path = %path.display(), "the previous keys could not be removed");
                            }
                        }
                        _ => {
                            tracing::warn!(path = %path.display(), "the previous keys file changed since this node started; kept")
                        }
                    }
                }
                tracing::info!(
                    "server-key rotation done: nothing is sealed under this node's previous keys any more \
                     (POND_PREVIOUS_SERVER_KEYS can go once every node runs this node's key; a data directory's \
                     server.key.previous is removed)"
                );
                return;
            }
            Err(e) => tracing::warn!(error = %e, "re-sealing under the current server key failed; will retry"),
        }
    }
}

async fn expire_bundles(engine: Arc<Engine>, ttl: Duration, mut stop: watch::Receiver<bool>) {
    let every = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(every) => {}
        }
        match engine.expire_bundles().await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!("pond_bundles_expired_total").increment(n as u64);
                tracing::info!(bundles = n, "deleted uploaded bundles no run used (--bundle-ttl)");
            }
            Err(e) => tracing::warn!(error = %e, "deleting unused bundles failed; will retry"),
        }
    }
}

/// Deletes runs that ended more than `retain` ago, with their output, every tenth of `retain`
/// (between a second and ten minutes; the first time at most a minute after start), a run at a
/// time (its log in slices), until `stop`.
/// Every node may; each run is deleted once (the store skips rows another node holds).
async fn retire_finished(engine: Arc<Engine>, retain: Option<Duration>, mut stop: watch::Receiver<bool>) {
    let Some(retain) = retain else { return };
    let every = (retain / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut wait = every.min(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = every;
        let before = Timestamp::from_millis(engine.clock().now().as_millis() - retain.as_millis() as i64);
        let mut total = 0;
        loop {
            match engine.retire_finished(before, 50).await {
                Ok(0) => break,
                Ok(n) => {
                    total += n;
                    metrics::counter!("pond_runs_retired_total").increment(n as u64);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "deleting runs past the retention failed; will retry");
                    break;
                }
            }
            if *stop.borrow() {
                break;
            }
        }
        if total > 0 {
            tracing::info!(runs = total, "deleted runs past the retention (--retain-finished)");
        }
    }
}
