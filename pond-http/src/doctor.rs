//! `pond doctor`: what a newcomer (or an SRE) checks first, each check with its fix. The client
//! side is here: the server answers, its version matches, the clocks agree, the token is
//! accepted, the consumer key is private, the control-plane key and the transparency log's tree
//! head check out. The host side (data directory, sandbox, agent CLIs) is in the `pond` binary,
//! which holds the sandbox backend.

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

/// The client-side checks against `server` with `client` (its token), and the consumer key at
/// `key_path`. Stops early when the server does not answer (nothing else can be checked).
pub fn client_checks(client: &Client, server: &str, has_token: bool, key_path: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    let health = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .tls_config(crate::tls::client_config())
        .build()
        .get(&format!("{server}/healthz"))
        .call();
    let response = match health {
        Ok(r) => r,
        Err(e) => {
            let text = e.to_string();
            let fix = crate::tls::hint(server, &text).unwrap_or(
                "start it (`pond server`), or point this CLI at it (`--server`, POND_SERVER, `pond context add`)",
            );
            checks.push(Check::fail("server", format!("{server} does not answer: {text}"), fix));
            return checks;
        }
    };
    let date = response.header("date").map(str::to_string);
    let body: serde_json::Value = response.into_json().unwrap_or_default();
    let over = if server.starts_with("https://") { " over TLS (certificate trusted)" } else { "" };
    checks.push(Check::ok("server", format!("{server} answers /healthz{over}")));
    let ours = env!("CARGO_PKG_VERSION");
    match body.get("version").and_then(|v| v.as_str()) {
        Some(theirs) if theirs == ours => checks.push(Check::ok("version", format!("server and CLI are both {ours}"))),
        Some(theirs) => checks.push(Check::fail(
            "version",
            format!("the server is {theirs}, this CLI {ours}"),
            "use a CLI of the server's version (the wire formats may differ)",
        )),
        None => checks.push(Check::fail("version", "the server does not say its version", "upgrade the server")),
    }
    if let Some(skew) = date.as_deref().and_then(clock_skew) {
        let text = format!("{:.1} s between this host and the server", skew.as_secs_f64());
        if skew <= Duration::from_secs(5) {
            checks.push(Check::ok("clock", text));
        } else {
            checks.push(Check::fail("clock", text, "synchronise the clocks (NTP): leases and tree heads carry times"));
        }
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
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Err(_) => {
            Check::ok("consumer key", format!("none yet at {} (made on the first encrypted submit)", path.display()))
        }
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => Check::fail(
            "consumer key",
            format!("{} is readable by others (mode {:o})", path.display(), meta.permissions().mode() & 0o777),
            format!("chmod 600 {}", path.display()),
        ),
        Ok(_) => Check::ok("consumer key", format!("{} (0600)", path.display())),
    }
}

/// How far the server's `Date` header is from this host's clock.
fn clock_skew(date: &str) -> Option<Duration> {
    let theirs = httpdate::parse_http_date(date).ok()?;
    let now = SystemTime::now();
    Some(now.duration_since(theirs).unwrap_or_else(|e| e.duration()))
}
