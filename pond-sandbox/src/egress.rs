//! The egress allowlist proxy: the only way out of a confined sandbox. It speaks HTTP CONNECT
//! (for TLS) and plain HTTP with absolute URIs, allows only the hosts of the profile's allowlist
//! (the broker, the package registries the operator lists, the repository's git remote),
//! resolves names itself (the sandbox has no DNS), and reports every refused connection so it
//! lands in the run's log.
//!
//! A name on the allowlist that resolves to a loopback, private or link-local address is
//! refused: an allowed registry name must not become a path to the host's own services (DNS
//! rebinding). Such services (the broker on 127.0.0.1) are allowed only as IP literals.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One allowed destination: a host name (`registry.npmjs.org`), a suffix (`*.pypi.org`) or an
/// IP literal, with a port (`None`: 80 and 443).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    host: String,
    port: Option<u16>,
}

impl Rule {
    /// Parses `host`, `host:port`, `*.suffix[:port]` or `ip[:port]` (`[v6]:port`).
    pub fn parse(text: &str) -> Result<Rule, String> {
        let text = text.trim().to_ascii_lowercase();
        let (host, port) = split_host_port(&text).ok_or_else(|| format!("`{text}` is not host[:port]"))?;
        let bare = host.strip_prefix("*.").unwrap_or(host);
        let valid = !bare.is_empty()
            && (bare.parse::<IpAddr>().is_ok()
                || bare.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')));
        if !valid {
            return Err(format!("`{text}` is not a host name, `*.suffix` or an IP address"));
        }
        Ok(Rule { host: host.to_string(), port })
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        let port_ok = match self.port {
            Some(p) => p == port,
            None => port == 80 || port == 443,
        };
        let host_ok = match self.host.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
            None => self.host == host,
        };
        port_ok && host_ok
    }

    fn is_ip_literal(&self) -> bool {
        self.host.parse::<IpAddr>().is_ok()
    }
}

fn split_host_port(text: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host, port));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host, Some(port.parse().ok()?))),
        Some(_) => Some((text, None)), // a bare IPv6 address
        None => Some((text, None)),
    }
}

/// Whether `ip` is the host's own or a private network's: reachable through a name only if the
/// allowlist names that IP literally.
fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| is_internal(IpAddr::V4(v4)))
        }
    }
}

/// Receives a line for each refused connection (for the run's log).
pub type RefusalLog = Arc<dyn Fn(String) + Send + Sync>;

/// A running proxy.
pub struct EgressProxy {
    /// Where the sandbox reaches it.
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl EgressProxy {
    /// Starts a proxy on 127.0.0.1 allowing `rules`; each refusal is reported to `log`.
    pub async fn start(rules: Vec<Rule>, log: RefusalLog) -> std::io::Result<EgressProxy> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                () = serve_on(listener, rules, log) => {}
                _ = stopped.changed() => {}
            }
        });
        Ok(EgressProxy { addr, stop })
    }
}

/// Serves the proxy on `listener` until the task is dropped. The sandbox helper uses this
/// with a listener it bound inside the sandbox's network namespace, while the connections it
/// opens leave from the host's.
pub async fn serve_on(listener: TcpListener, rules: Vec<Rule>, log: RefusalLog) {
    let rules = Arc::new(rules);
    loop {
        let Ok((conn, _)) = listener.accept().await else { continue };
        tokio::spawn(serve(conn, rules.clone(), log.clone()));
    }
}

/// Relays every connection to `listener` to `target` until the task is dropped (the model
/// broker's port on the host's loopback, seen inside the sandbox at the same address).
pub async fn forward_on(listener: TcpListener, target: SocketAddr) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            if let Ok(mut upstream) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
            }
        });
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Where a request wants to go, if the allowlist lets it: the address to connect to.
async fn decide(rules: &[Rule], host: &str, port: u16) -> Result<SocketAddr, String> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let Some(rule) = rules.iter().find(|r| r.matches(&host, port)) else {
        return Err(format!("egress refused: {host}:{port} is not on the allowlist"));
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("egress refused: {host}:{port} does not resolve ({e})"))?
        .collect();
    match resolved.into_iter().find(|a| rule.is_ip_literal() || !is_internal(a.ip())) {
        Some(addr) => Ok(addr),
        None => Err(format!(
            "egress refused: {host}:{port} resolves to an internal address (allow it by IP if it is meant)"
        )),
    }
}

async fn refuse(conn: &mut BufReader<TcpStream>, log: &RefusalLog, why: String) {
    log(why.clone());
    let body = format!("{why}\n");
    let reply = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.get_mut().write_all(reply.as_bytes()).await;
}

async fn serve(conn: TcpStream, rules: Arc<Vec<Rule>>, log: RefusalLog) {
    let mut conn = BufReader::new(conn);
    let mut request_line = String::new();
    if conn.read_line(&mut request_line).await.unwrap_or(0) == 0 {
        return;
    }
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        match conn.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => head.push(line),
        }
        if head.len() > 200 {
            return;
        }
    }
    let parts: Vec<&str> = request_line.split_whitespace().collect();
    let [method, target, version] = parts[..] else {
        return refuse(&mut conn, &log, "egress refused: malformed request".into()).await;
    };
    if method.eq_ignore_ascii_case("CONNECT") {
        let Some((host, Some(port))) = split_host_port(target) else {
            return refuse(&mut conn, &log, format!("egress refused: bad CONNECT target `{target}`")).await;
        };
        let addr = match decide(&rules, host, port).await {
            Ok(a) => a,
            Err(why) => return refuse(&mut conn, &log, why).await,
        };
        let Ok(mut upstream) = TcpStream::connect(addr).await else {
            return refuse(&mut conn, &log, format!("egress: {host}:{port} did not accept the connection")).await;
        };
        if conn.get_mut().write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await.is_err() {
            return;
        }
        // Bytes the client sent after the request head belong to the tunnel.
        let buffered = conn.buffer().to_vec();
        if !buffered.is_empty() && upstream.write_all(&buffered).await.is_err() {
            return;
        }
        let mut client = conn.into_inner();
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        return;
    }
    // Plain HTTP: an absolute URI (`GET http://host[:port]/path`), forwarded in origin form.
    let Some(rest) = target.strip_prefix("http://") else {
        return refuse(&mut conn, &log, format!("egress refused: `{target}` is not an absolute http:// URI")).await;
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let Some((host, port)) = split_host_port(authority) else {
        return refuse(&mut conn, &log, format!("egress refused: bad host `{authority}`")).await;
    };
    let port = port.unwrap_or(80);
    let addr = match decide(&rules, host, port).await {
        Ok(a) => a,
        Err(why) => return refuse(&mut conn, &log, why).await,
    };
    let Ok(mut upstream) = TcpStream::connect(addr).await else {
        return refuse(&mut conn, &log, format!("egress: {host}:{port} did not accept the connection")).await;
    };
    let mut out = format!("{method} {path} {version}\r\n");
    for line in &head {
        let name = line.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
        if name.starts_with("proxy-") {
            continue;
        }
        out.push_str(line);
    }
    out.push_str("\r\n");
    if upstream.write_all(out.as_bytes()).await.is_err() {
        return;
    }
    let buffered = conn.buffer().to_vec();
    if !buffered.is_empty() && upstream.write_all(&buffered).await.is_err() {
        return;
    }
    let mut client = conn.into_inner();
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match() {
        let r = Rule::parse("registry.npmjs.org").unwrap();
        assert!(r.matches("registry.npmjs.org", 443) && r.matches("registry.npmjs.org", 80));
        assert!(!r.matches("registry.npmjs.org", 8080) && !r.matches("evil.org", 443));
        let s = Rule::parse("*.pypi.org").unwrap();
        assert!(s.matches("files.pypi.org", 443) && !s.matches("pypi.org", 443) && !s.matches("evilpypi.org", 443));
        let ip = Rule::parse("127.0.0.1:4242").unwrap();
        assert!(ip.matches("127.0.0.1", 4242) && !ip.matches("127.0.0.1", 4243));
        assert!(Rule::parse("[::1]:80").unwrap().matches("::1", 80));
        for bad in ["", "a b", "host:port", "*.", "x:99999"] {
            assert!(Rule::parse(bad).is_err(), "{bad}");
        }
        assert!(is_internal("10.1.2.3".parse().unwrap()) && is_internal("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_internal("151.101.0.1".parse().unwrap()));
    }
}
