//! `pond doctor` (a CLI's set-up) and `--check` on `pond server`, `pond orchestrator` and
//! `pond worker`: each reads the same flags, environment and config file as the command it
//! checks, looks without changing anything, prints one line per check (or `--json`) with the fix
//! of what fails, and exits 1 when something does. The network checks are in
//! `pond_http::doctor`; what needs this host (the database, the sandbox, the tools) is here.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use anyhow::Result;
use pond_http::doctor::{private_dir, private_file, Check};
use pond_sandbox::oci::Limits;

use crate::{OrchestratorArgs, SandboxArgs, ServerArgs, TlsArgs, WorkerArgs};

/// Prints `checks` (lines and a count, or JSON) and gives the exit code: 1 when one failed.
pub(crate) fn report(checks: &[Check], json: bool) -> Result<i32> {
    let failed = checks.iter().filter(|c| !c.ok).count();
    if json {
        crate::print_json(&checks)?;
    } else {
        for check in checks {
            say!("{}", check.line());
        }
        say!("{} checks, {failed} failed", checks.len());
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

/// The host side of `pond doctor`: the tools, and with `data_dir` a data directory's
/// permissions and space, with `sandbox` the OCI self-check.
pub(crate) fn host_checks(data_dir: Option<&Path>, sandbox: bool) -> Vec<Check> {
    let mut checks = tool_checks(&[]);
    if let Some(dir) = data_dir {
        if !dir.exists() {
            checks.push(Check::fail(
                "data dir",
                format!("{} does not exist", dir.display()),
                "create it, or pass the right --data-dir",
            ));
        } else {
            checks.push(private_dir("data dir", dir));
            checks.extend(disk_check(dir));
        }
    }
    if sandbox {
        checks.push(sandbox_check(None, None));
    }
    checks
}

/// `pond server --check`: the data directory, the address and TLS files, the database (reachable,
/// its schema against this build's migrations), the server key against the database's sealed
/// identity, the sandbox and its egress allowlist, and the tools.
pub(crate) fn server(args: &ServerArgs) -> Result<Vec<Check>> {
    let mut checks = vec![private_dir("data dir", &args.data_dir)];
    if args.data_dir.exists() {
        checks.extend(disk_check(&args.data_dir));
    }
    checks.extend(tls_check(args.tls.clone()));
    checks.push(listen_check(args.listen, args.tls.tls_cert.is_some()));
    let runtime = crate::runtime()?;
    checks.extend(runtime.block_on(store_checks(args)));
    if args.sandbox.backend != "host" {
        checks.push(sandbox_check(args.sandbox.defaults, args.sandbox.ceilings));
        checks.extend(egress_checks(&args.sandbox.egress_allow));
    }
    checks.extend(tool_checks(&[]));
    Ok(checks)
}

/// `pond orchestrator --check`: its state directory and saved enrollment, the server (reachable,
/// TLS, version, clock) and whether it still accepts the enrollment, its address and TLS files.
pub(crate) fn orchestrator(server: &str, args: &OrchestratorArgs) -> Vec<Check> {
    let mut checks = pond_http::doctor::orchestrator_checks(server, &args.state_dir, args.enroll.is_some());
    checks.extend(tls_check(args.tls.clone()));
    checks.push(listen_check(args.listen, args.tls.tls_cert.is_some()));
    checks
}

/// `pond worker --check`: its keys and saved enrollment, the orchestrator (reachable, TLS,
/// version, clock) and whether pond still accepts the enrollment, the sandbox and its egress
/// allowlist, and the agent CLIs its capabilities promise.
pub(crate) fn worker(args: &WorkerArgs) -> Vec<Check> {
    let key_dir = args.key_dir.clone().unwrap_or_else(pond_exec::default_key_dir);
    let orchestrator = args.orchestrator.trim_end_matches('/');
    let mut checks = pond_http::doctor::worker_checks(orchestrator, &key_dir, args.enroll.is_some());
    if key_dir.exists() {
        checks.extend(disk_check(&key_dir));
    }
    if args.sandbox.backend != "host" {
        let sandbox = sandbox_check(args.sandbox.defaults, args.sandbox.ceilings);
        let sandboxed = args.capabilities.iter().any(|c| c == pond_core::routing::SANDBOX_CAPABILITY);
        if !sandbox.ok && !sandboxed && args.sandbox.backend == "auto" {
            // `auto` falls back to the `none` profile; say so without failing.
            checks.push(Check::ok(
                "sandbox",
                format!("off ({}); this worker takes only stages without a sandbox profile", sandbox.detail),
            ));
        } else {
            checks.push(sandbox);
        }
        checks.extend(egress_checks(&args.sandbox.egress_allow));
    }
    checks.extend(tool_checks(&args.capabilities));
    if args.allow_unconfined {
        checks.push(Check::ok(
            "unconfined",
            "--allow-unconfined: stages without a sandbox profile run here as host processes of this worker's user",
        ));
    }
    checks
}

/// git (for git sources) and the agent CLIs; a CLI is missing in error only when `capabilities`
/// promise its harness (`harness.codex`), else it just cannot run here.
fn tool_checks(capabilities: &[String]) -> Vec<Check> {
    let mut checks = Vec::new();
    let version = |cmd: &str| {
        std::process::Command::new(cmd)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_string())
    };
    match version("git") {
        Some(v) => checks.push(Check::ok("git", v)),
        None => checks.push(Check::fail("git", "not on PATH (git_https sources need it)", "install git")),
    }
    for cli in ["codex", "claude"] {
        let promised = capabilities.iter().any(|c| c == &format!("harness.{cli}"));
        match version(cli) {
            Some(v) => checks.push(Check::ok(cli, v)),
            None if promised => checks.push(Check::fail(
                cli,
                format!("not on PATH, but this worker declares harness.{cli}: its stages would fail here"),
                format!("install it on this host's PATH, or drop harness.{cli} from --capabilities"),
            )),
            None => checks.push(Check::ok(cli, "not on PATH: this host cannot run that harness's agent stages")),
        }
    }
    checks
}

/// Free space where checkouts, spools and the database grow.
fn disk_check(dir: &Path) -> Option<Check> {
    let free = free_bytes(dir)?;
    let text = format!("{:.1} GiB free in {}", free as f64 / (1u64 << 30) as f64, dir.display());
    Some(if free >= 1 << 30 {
        Check::ok("disk", text)
    } else {
        Check::fail("disk", text, "free space: checkouts, spools and SQLite grow here")
    })
}

/// Free bytes for an unprivileged user on the filesystem of `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into the struct we own, for a NUL-terminated path.
    (unsafe { libc::statvfs(c.as_ptr(), &mut stat) } == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// The certificate and key load as the listener would load them.
fn tls_check(tls: TlsArgs) -> Option<Check> {
    let files = tls.files()?;
    Some(match pond_http::tls::ServerTls::load(&files) {
        Ok(_) => Check::ok("tls", format!("{} and its key load", files.cert.display())),
        Err(e) => Check::fail(
            "tls",
            e.to_string(),
            "give --tls-cert a PEM chain (the listener's certificate first) and --tls-key its private key",
        ),
    })
}

/// The address can be listened on — or a pond already serves it (the check of a running node).
fn listen_check(addr: SocketAddr, https: bool) -> Check {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => {
            let exposed = !addr.ip().is_loopback() && !https;
            let note = if exposed {
                " (plain HTTP beyond this host: tokens cross the network in clear unless TLS is in front; --tls-cert)"
            } else {
                ""
            };
            Check::ok("listen", format!("{addr} is free{note}"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            let url = format!("{}://{host}:{}", if https { "https" } else { "http" }, addr.port());
            let mut probe = Vec::new();
            if pond_http::doctor::reachable("pond", &url, "", &mut probe) {
                Check::ok("listen", format!("{addr} is served by a running pond (this checks its settings beside it)"))
            } else {
                Check::fail(
                    "listen",
                    format!("{addr} is taken by another program"),
                    "stop it, or choose another address (--listen)",
                )
            }
        }
        Err(e) => Check::fail("listen", format!("{addr}: {e}"), "choose an address of this host (--listen)"),
    }
}

/// The database answers and its schema is one this build can start on; then the server key
/// opens the identity it holds.
async fn store_checks(args: &ServerArgs) -> Vec<Check> {
    let mut checks = Vec::new();
    let (what, schema) = match &args.database_url {
        Some(url) => ("PostgreSQL", pond_store::pg_schema(url).await.map(Some)),
        None => ("SQLite", pond_store::sqlite_schema(&args.data_dir.join("pond.db")).await),
    };
    let schema = match schema {
        Err(e) => {
            checks.push(Check::fail(
                "database",
                format!("{what}: {e}"),
                match args.database_url {
                    Some(_) => "check --database-url (POND_DATABASE_URL) and that PostgreSQL answers there",
                    None => "check the data directory's pond.db (a backup restores it: `pond backup`)",
                },
            ));
            return checks;
        }
        Ok(None) => {
            checks.push(Check::ok("database", "no SQLite database yet: made at first start"));
            None
        }
        Ok(Some(schema)) => {
            let (pending, unknown) = (schema.pending(), schema.unknown());
            if !unknown.is_empty() {
                checks.push(Check::fail(
                    "database",
                    format!(
                        "{what}: migrated by a newer pond (versions {unknown:?} are unknown to this {}): this build cannot start on it",
                        env!("CARGO_PKG_VERSION")
                    ),
                    "run the newer pond (migrations only go forward)",
                ));
                return checks;
            }
            if pending.is_empty() {
                checks.push(Check::ok(
                    "database",
                    format!("{what} answers; its schema is this build's ({} migrations)", schema.known.len()),
                ));
                Some(schema)
            } else {
                checks.push(Check::ok(
                    "database",
                    format!(
                        "{what} answers; {} migrations are applied at start (forward only: back it up first)",
                        pending.len()
                    ),
                ));
                None
            }
        }
    };
    checks.extend(key_checks(args, schema.is_some()).await);
    checks
}

/// The server key (flag or file) and a rotation's previous keys; with `current_schema`, whether
/// they open the database's sealed identity.
async fn key_checks(args: &ServerArgs, current_schema: bool) -> Vec<Check> {
    let mut checks = Vec::new();
    let file = args.data_dir.join("server.key");
    let mut previous: Vec<[u8; 32]> = args.previous_server_keys.iter().map(|k| k.0).collect();
    let current = match &args.server_key {
        Some(key) => key.0,
        None => {
            let check = private_file("server key file", &file, "made at first start");
            let ok = check.ok;
            checks.push(check);
            match std::fs::read_to_string(&file) {
                Ok(text) if ok => match pond_core::pool::decode_key(text.trim()) {
                    Ok(key) => key,
                    Err(e) => {
                        checks.push(Check::fail(
                            "server key",
                            format!("{}: the key {e}", file.display()),
                            "restore it from a backup (what it sealed cannot be opened without it)",
                        ));
                        return checks;
                    }
                },
                _ => return checks,
            }
        }
    };
    if args.server_key.is_none() {
        let path = args.data_dir.join(pond_http::server::PREVIOUS_KEYS_FILE);
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                match pond_core::pool::decode_key(line.trim()) {
                    Ok(key) => previous.push(key),
                    Err(e) => checks.push(Check::fail(
                        "server key",
                        format!("{}: a previous key {e}", path.display()),
                        "restore the file `pond admin server-key rotate` wrote",
                    )),
                }
            }
        }
    }
    let next: Vec<[u8; 32]> = args.next_server_keys.iter().map(|k| k.0).collect();
    let keys = pond_core::server_keys::AtRestKeys::new(current, &previous).with_next(&next);
    let fingerprint = pond_core::credentials::server_key_fingerprint(keys.current());
    let rotating = match (keys.previous().len(), keys.next().len()) {
        (0, 0) => String::new(),
        (p, n) => format!(
            "; a rotation is under way ({p} previous key(s) this node moves data from, {n} next key(s) it only opens)"
        ),
    };
    if !current_schema {
        checks.push(Check::ok("server key", format!("{fingerprint}{rotating}")));
        return checks;
    }
    // Read over a read-only connection: the check changes nothing in the database (SQLite may
    // still make its shared-memory file beside it, as any reader does).
    let (kind, key) = (pond_core::server_keys::IDENTITY, pond_core::server_keys::IDENTITY_KEY);
    let record = match &args.database_url {
        Some(url) => pond_store::pg_record(url, kind, key).await,
        None => pond_store::sqlite_record(&args.data_dir.join("pond.db"), kind, key).await,
    };
    let identity = match record {
        Ok(Some(text)) => pond_core::server_keys::open_identity(&keys, &text).map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(e.into()),
    };
    match identity {
        Ok(Some(_)) => checks.push(Check::ok(
            "server key",
            format!("{fingerprint} opens this database's sealed identity{rotating}"),
        )),
        Ok(None) => checks.push(Check::ok(
            "server key",
            format!("{fingerprint}; the database has no sealed identity yet (made at first start){rotating}"),
        )),
        Err(e) => checks.push(Check::fail(
            "server key",
            e.to_string(),
            "give this node the key the others use (POND_SERVER_KEY); while rotating, the old one as --previous-server-key",
        )),
    }
    checks
}

/// The OCI backend's self-check in a scratch state directory (a running node's is left alone),
/// and the profiles it enforces.
fn sandbox_check(defaults: Option<Limits>, ceilings: Option<Limits>) -> Check {
    let dir: PathBuf = std::env::temp_dir().join(format!("pond-doctor-sandbox-{}", std::process::id()));
    let oci = SandboxArgs { backend: "oci".into(), dir: None, egress_allow: Vec::new(), defaults, ceilings };
    let check = match crate::sandbox_backend(&oci, dir.clone()) {
        Ok((backend, _)) => {
            let profiles: Vec<&str> = backend.profiles().iter().map(|p| p.as_str()).collect();
            Check::ok("sandbox", format!("self-check passed; profiles: {}", profiles.join(", ")))
        }
        Err(e) => Check::fail(
            "sandbox",
            format!("{e:#}"),
            "run as root on Linux with cgroups and namespaces (README \"Sandboxes\"); without it only the `none` profile runs",
        ),
    };
    let _ = pond_sandbox::oci::collect_garbage(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    check
}

/// Each `--egress-allow` entry parses and, for a name, resolves here to an address the proxy
/// would dial (it refuses internal addresses unless allowed by literal).
fn egress_checks(rules: &[String]) -> Vec<Check> {
    let mut checks = Vec::new();
    for (i, text) in rules.iter().enumerate() {
        let name = format!("egress-allow[{i}]");
        let rule = match pond_sandbox::egress::Rule::parse(text) {
            Ok(rule) => rule,
            Err(e) => {
                checks.push(Check::fail(&name, e, "write host, host:port, *.suffix or an IP address"));
                continue;
            }
        };
        let (host, text) = (rule.host(), text.trim());
        if let Some(suffix) = host.strip_prefix("*.") {
            checks.push(Check::ok(&name, format!("{text}: any name under {suffix} (resolved per request)")));
            continue;
        }
        if host.parse::<std::net::IpAddr>().is_ok() {
            checks.push(Check::ok(&name, format!("{text}: an address, dialled as given")));
            continue;
        }
        match (host, rule.port().unwrap_or(443)).to_socket_addrs() {
            Err(e) => checks.push(Check::fail(
                &name,
                format!("{host} does not resolve here: {e}"),
                "check the name, or this host's DNS (the proxy resolves it per request)",
            )),
            Ok(addrs) => {
                let ips: Vec<std::net::IpAddr> = addrs.map(|a| a.ip()).collect();
                let global: Vec<String> =
                    ips.iter().filter(|ip| !pond_core::net::is_internal(**ip)).map(|ip| ip.to_string()).collect();
                if global.is_empty() {
                    let internal: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
                    checks.push(Check::fail(
                        &name,
                        format!(
                            "{host} resolves only to internal addresses ({}), which the proxy refuses",
                            internal.join(", ")
                        ),
                        "allow the address itself (--egress-allow IP:PORT) if it is meant to be reached",
                    ));
                } else {
                    checks.push(Check::ok(&name, format!("{host} resolves to {}", global.join(", "))));
                }
            }
        }
    }
    checks
}
