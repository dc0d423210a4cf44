//! `pond doctor` and the `--check` of `pond server`, `pond orchestrator` and `pond worker`: what
//! a newcomer (or an SRE) checks first, each check with its fix. The network side is here: the
//! server or orchestrator answers (TLS trusted), its version matches, the clocks agree, the token
//! or saved enrollment is accepted, keys and credential files are private, the control-plane key
//! and the transparency log's tree head check out. The host side (data directory, database,
//! sandbox, agent CLIs) is in the `pond` binary, which holds the sandbox backend and the stores.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::client::Client;

/// One check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// How to fix it, when it does not hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    /// A check that holds.
    pub fn ok(name: &str, detail: impl Into<String>) -> Check {
        Check { name: name.into(), ok: true, detail: detail.into(), fix: None }
    }

    /// A check that does not, and its fix.
    pub fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name: name.into(), ok: false, detail: detail.into(), fix: Some(fix.into()) }
    }

    /// The check as a line: `ok   name: detail`, or `FAIL name: detail (fix: …)`.
    pub fn line(&self) -> String {
        match &self.fix {
            None => format!("ok    {}: {}", self.name, self.detail),
            Some(fix) => format!("FAIL  {}: {} (fix: {fix})", self.name, self.detail),
        }
    }
}

/// Checks that `url`'s `/healthz` answers (over TLS, with a trusted certificate), that it runs
/// this binary's version, and that its clock agrees with this host's; `peer` names it (`server`,
/// `orchestrator`). `false` when it does not answer, the check naming `unreachable_fix`.
pub fn reachable(peer: &str, url: &str, unreachable_fix: &str, checks: &mut Vec<Check>) -> bool {
    let health = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .tls_config(crate::tls::client_config())
        .build()
        .get(&format!("{url}/healthz"))
        .call();
    let response = match health {
        Ok(r) => r,
        Err(e) => {
            let text = e.to_string();
            let fix = crate::tls::hint(url, &text).unwrap_or(unreachable_fix);
            checks.push(Check::fail(peer, format!("{url} does not answer: {text}"), fix));
            return false;
        }
    };
    let date = response.header("date").map(str::to_string);
    let body: serde_json::Value = response.into_json().unwrap_or_default();
    let over = if url.starts_with("https://") { " over TLS (certificate trusted)" } else { "" };
    checks.push(Check::ok(peer, format!("{url} answers /healthz{over}")));
    let ours = env!("CARGO_PKG_VERSION");
    match body.get("version").and_then(|v| v.as_str()) {
        Some(theirs) if theirs == ours => {
            checks.push(Check::ok("version", format!("the {peer} and this binary are both {ours}")))
        }
        Some(theirs) => checks.push(Check::fail(
            "version",
            format!("the {peer} is {theirs}, this binary {ours}"),
            format!("run the {peer}'s version here (the wire formats may differ)"),
        )),
        None => checks.push(Check::fail(
            "version",
            format!("the {peer} does not say its version"),
            format!("upgrade the {peer}"),
        )),
    }
    if let Some(skew) = date.as_deref().and_then(clock_skew) {
        let text = format!("{:.1} s between this host and the {peer}", skew.as_secs_f64());
        if skew <= Duration::from_secs(5) {
            checks.push(Check::ok("clock", text));
        } else {
            checks.push(Check::fail(
                "clock",
                text,
                "synchronise the clocks (NTP): leases, tickets and tree heads carry times",
            ));
        }
    }
    true
}

/// The client-side checks against `server` with `client` (its token), and the consumer key at
/// `key_path`. Stops early when the server does not answer (nothing else can be checked).
pub fn client_checks(client: &Client, server: &str, has_token: bool, key_path: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    let fix = "start it (`pond server`), or point this CLI at it (`--server`, POND_SERVER, `pond context add`)";
    if !reachable("server", server, fix, &mut checks) {
        return checks;
    }
    if !has_token {
        checks.push(Check::fail(
            "token",
            "no token is set",
            "set one (`pond context add NAME --server URL --token …`, or POND_TOKEN)",
        ));
    } else {
        match client.list_runs(None, None, Some(1), None) {
            Ok(_) => checks.push(Check::ok("token", "accepted")),
            Err(e) if e.status() == Some(401) => checks.push(Check::fail(
                "token",
                "refused (unknown, revoked or mistyped)",
                "ask the operator for a key (`pond admin keys create`) and set it on the context",
            )),
            Err(e) => checks.push(Check::fail("token", format!("could not be checked: {e}"), "see the server's log")),
        }
    }
    checks.push(key_check(key_path));
    match client.keys() {
        Ok(keys) => match pond_core::transparency::decode32(&keys.control_plane_key) {
            Some(control) => {
                checks.push(Check::ok("control plane key", pond_core::attest::fingerprint(&control)));
                match client.tree_head() {
                    Ok(head) if head.verify(&[control]).is_ok() => checks.push(Check::ok(
                        "transparency log",
                        format!("tree head of {} leaves, signed by the control plane", head.tree_size),
                    )),
                    Ok(_) => checks.push(Check::fail(
                        "transparency log",
                        "the tree head does not verify under the control plane's key",
                        "the nodes do not share one server key (POND_SERVER_KEY): give them the same",
                    )),
                    Err(e) => checks.push(Check::fail("transparency log", e.to_string(), "see the server's log")),
                }
            }
            None => checks.push(Check::fail("control plane key", "malformed", "upgrade the server")),
        },
        Err(e) if e.status() == Some(401) => {}
        Err(e) => checks.push(Check::fail("control plane key", e.to_string(), "upgrade the server")),
    }
    checks
}

/// The consumer key: absent is fine (made on first use); present, it must be readable by its
/// owner only.
fn key_check(path: &Path) -> Check {
    private_file("consumer key", path, "made on the first encrypted submit")
}

/// A secret file: absent is fine (`absent` says when it is made); present, it must be readable
/// by its owner only.
pub fn private_file(name: &str, path: &Path, absent: &str) -> Check {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Err(_) => Check::ok(name, format!("none yet at {} ({absent})", path.display())),
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => Check::fail(
            name,
            format!("{} is readable by others (mode {:o})", path.display(), meta.permissions().mode() & 0o777),
            format!("chmod 600 {}", path.display()),
        ),
        Ok(_) => Check::ok(name, format!("{} (0600)", path.display())),
    }
}

/// A directory holding keys or credentials: absent is fine (made 0700 at first start); present,
/// it must be its owner's alone.
pub fn private_dir(name: &str, dir: &Path) -> Check {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Check::ok(name, format!("{} does not exist yet (made 0700 at first start)", dir.display()))
        }
        Err(e) => Check::fail(name, format!("{}: {e}", dir.display()), "fix the path or its permissions"),
        Ok(meta) if !meta.is_dir() => {
            Check::fail(name, format!("{} is not a directory", dir.display()), "point the flag at a directory")
        }
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => Check::fail(
            name,
            format!(
                "{} is open to others (mode {:o}); it holds keys and credentials",
                dir.display(),
                meta.permissions().mode() & 0o777
            ),
            format!("chmod 700 {}", dir.display()),
        ),
        Ok(_) => Check::ok(name, format!("{} (0700)", dir.display())),
    }
}

/// Reads a saved credential file: `Ok(None)` when there is none.
fn saved<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The credential a pool member starts with: what `saved` holds, or an enrollment code. `None`
/// when it has neither (a failed check says so) or already has a code to enroll with.
fn credential_or_code<T: serde::de::DeserializeOwned>(
    path: &Path,
    has_enroll_code: bool,
    mint: &str,
    checks: &mut Vec<Check>,
) -> Option<T> {
    match saved::<T>(path) {
        Ok(Some(credential)) => {
            checks.push(private_file("credential", path, ""));
            Some(credential)
        }
        Ok(None) if has_enroll_code => {
            checks.push(Check::ok(
                "credential",
                format!("none yet at {}: enrolls with the code at start (a code is used up then)", path.display()),
            ));
            None
        }
        Ok(None) => {
            checks.push(Check::fail(
                "credential",
                format!("not enrolled: no {} and no enrollment code", path.display()),
                format!("mint a code (`{mint}`) and pass it with --enroll or POND_ENROLL_CODE"),
            ));
            None
        }
        Err(e) => {
            checks.push(Check::fail(
                "credential",
                format!("unreadable: {e}"),
                format!("move it away and enroll again (`{mint}`, then --enroll)"),
            ));
            None
        }
    }
}

/// Whether a saved credential is still accepted, by `call` (a `GET` of who it is).
fn credential_accepted(
    call: Result<pond_core::pool::PoolMember, crate::client::ClientError>,
    file: &Path,
    mint: &str,
    checks: &mut Vec<Check>,
) {
    match call {
        Ok(member) => checks.push(Check::ok(
            "enrollment",
            format!(
                "accepted: {} `{}` in pool {}{}{}",
                if member.kind == pond_core::pool::MemberKind::Worker { "worker" } else { "orchestrator" },
                member.id,
                member.pool,
                if member.tags.is_empty() { String::new() } else { format!(", tags {}", member.tags.join(",")) },
                if member.draining { " (draining: it takes no new jobs; `pond pool drain ID --undo`)" } else { "" },
            ),
        )),
        Err(e) if e.status() == Some(401) => checks.push(Check::fail(
            "enrollment",
            format!("the saved credential is refused ({e}): revoked, or enrolled with another deployment"),
            format!("remove {} and enroll again (`{mint}`, then --enroll)", file.display()),
        )),
        Err(e) => checks.push(Check::fail("enrollment", format!("could not be checked: {e}"), "see the peer's log")),
    }
}

/// An orchestrator's checks (`pond orchestrator --check`): its state directory and credential,
/// the server the credential is for (reachable, TLS, version, clock), and that the server still
/// accepts the credential. `server` is the one configured (`--server`, the context).
pub fn orchestrator_checks(server: &str, state_dir: &Path, has_enroll_code: bool) -> Vec<Check> {
    let mut checks = vec![private_dir("state dir", state_dir)];
    let member = Member {
        peer: "server",
        configured: server,
        file: state_dir.join(crate::orchestrator::CREDENTIAL_FILE),
        mint: "pond admin enroll create --pool POOL",
        unreachable_fix: "start it, or point the orchestrator at it (`--server`, POND_SERVER)",
    };
    member.check::<crate::orchestrator::Credential>(
        has_enroll_code,
        |c| (&c.server, &c.token),
        |url, token| {
            let client = Client::new(url, Some(token.to_string()));
            client.json(client.request("GET", "/v1/orch/me"), None)
        },
        &mut checks,
    );
    checks
}

/// A worker's checks (`pond worker --check`): its key directory, keys and credential, the
/// orchestrator (reachable, TLS, version, clock), and that pond still accepts the credential.
pub fn worker_checks(orchestrator: &str, key_dir: &Path, has_enroll_code: bool) -> Vec<Check> {
    let mut checks = vec![private_dir("key dir", key_dir)];
    for key in ["sealing.key", "signing.key"] {
        checks.push(private_file(key, &key_dir.join(key), "made at first start"));
    }
    let member = Member {
        peer: "orchestrator",
        configured: orchestrator,
        file: key_dir.join(crate::worker_process::CREDENTIAL_FILE),
        mint: "pond admin enroll create --pool POOL --worker",
        unreachable_fix: "start it (`pond orchestrator`), or point the worker at it (--orchestrator)",
    };
    member.check::<crate::worker_process::Credential>(
        has_enroll_code,
        |c| (&c.orchestrator, &c.token),
        |url, token| crate::pool_client::HttpWorkerClient::new(url, token).whoami(),
        &mut checks,
    );
    checks
}

/// A pool member's saved enrollment, checked against the peer it talks to.
struct Member<'a> {
    /// What it talks to: `server` or `orchestrator`.
    peer: &'a str,
    /// The peer's URL as configured (flag, environment, context).
    configured: &'a str,
    /// The saved credential.
    file: std::path::PathBuf,
    /// The command that mints an enrollment code for it.
    mint: &'a str,
    /// How to make an unreachable peer answer.
    unreachable_fix: &'a str,
}

impl Member<'_> {
    /// The credential (or a code to enroll with), the peer the credential is for — the one the
    /// member uses, named when it is not the configured one —, and whether it still accepts it.
    fn check<T: serde::de::DeserializeOwned>(
        &self,
        has_enroll_code: bool,
        url_and_token: impl Fn(&T) -> (&String, &String),
        whoami: impl Fn(&str, &str) -> Result<pond_core::pool::PoolMember, crate::client::ClientError>,
        checks: &mut Vec<Check>,
    ) {
        let (peer, configured) = (self.peer, self.configured.trim_end_matches('/'));
        let credential: Option<T> = credential_or_code(&self.file, has_enroll_code, self.mint, checks);
        let saved = credential.as_ref().map(|c| url_and_token(c));
        let target = saved.map(|(url, _)| url.trim_end_matches('/')).unwrap_or(configured);
        if saved.is_some() && target != configured {
            checks.push(Check::fail(
                peer,
                format!("the saved credential is for {target}, but the {peer} configured is {configured}: the saved one is used"),
                format!("to move it, remove {} and enroll again with {configured}", self.file.display()),
            ));
        }
        if !reachable(peer, target, self.unreachable_fix, checks) {
            return;
        }
        if let Some((_, token)) = saved {
            credential_accepted(whoami(target, token), &self.file, self.mint, checks);
        }
    }
}

/// How far the server's `Date` header is from this host's clock.
fn clock_skew(date: &str) -> Option<Duration> {
    let theirs = httpdate::parse_http_date(date).ok()?;
    let now = SystemTime::now();
    Some(now.duration_since(theirs).unwrap_or_else(|e| e.duration()))
}
