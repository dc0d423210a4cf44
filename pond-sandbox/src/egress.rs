//! The egress allowlist proxy: the only way out of a confined sandbox. It speaks HTTP CONNECT
//! (for TLS) and plain HTTP with absolute URIs, allows only the hosts of the profile's allowlist
//! (the broker, the package registries the operator lists, the repository's git remote),
//! resolves names itself (the sandbox has no DNS), and reports every refused connection so it
//! lands in the run's log.
//!
//! A name on the allowlist that resolves to an internal address (any IANA special-purpose
//! range, `pond_core::net`) is refused: an allowed registry name must not become a path to the
//! host's own services (DNS rebinding). Such services (the broker on 127.0.0.1) are allowed
//! only as IP literals.
//!
//! What a sandbox can make the proxy spend is bounded ([`Bounds`]): request heads of 8 KiB read
//! within 10 s (parsed by httparse), 256 connections at once, tunnels closed after 5 minutes
//! without a byte, and a pause that grows after each failed accept.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
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

    /// The host as written (lower case, without brackets): a name, `*.suffix` or an IP literal.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port it allows (`None`: 80 and 443).
    pub fn port(&self) -> Option<u16> {
        self.port
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

/// Whether `ip` is internal (an IANA special-purpose range, see `pond_core::net`): reachable
/// through a name only if the allowlist names that IP literally.
fn is_internal(ip: IpAddr) -> bool {
    pond_core::net::is_internal(ip)
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
        Self::start_bounded(rules, log, Bounds::default()).await
    }

    /// [`EgressProxy::start`] with explicit bounds.
    pub async fn start_bounded(rules: Vec<Rule>, log: RefusalLog, bounds: Bounds) -> std::io::Result<EgressProxy> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                () = serve_bounded(listener, rules, log, bounds) => {}
                _ = stopped.changed() => {}
            }
        });
        Ok(EgressProxy { addr, stop })
    }
}

/// The proxy's bounds: what one sandbox can make it spend.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Largest request head (request line and headers).
    pub max_head: usize,
    /// Longest wait for a whole request head.
    pub head_timeout: Duration,
    /// A tunnel or forward with no byte in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_head: 8 * 1024,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_connections: 256,
        }
    }
}

/// Accepts on `listener` with the connection cap, handing each connection to `handle`. An
/// accept error (out of descriptors, say) is followed by a growing pause, not a spin.
async fn accept_loop<F, Fut>(listener: TcpListener, bounds: Bounds, log: Option<RefusalLog>, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let open = Arc::new(tokio::sync::Semaphore::new(bounds.max_connections));
    let mut pause = Duration::from_millis(10);
    let mut refused: u64 = 0;
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => {
                pause = Duration::from_millis(10);
                conn
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            // Closed at once; the first refusal and then one in a thousand are logged.
            if refused % 1000 == 0 {
                if let Some(log) = &log {
                    log(format!(
                        "egress refused: more than {} connections open at once ({} refused so far)",
                        bounds.max_connections,
                        refused + 1
                    ));
                }
            }
            refused += 1;
            drop(conn);
            continue;
        };
        let work = handle(conn);
        tokio::spawn(async move {
            work.await;
            drop(permit);
        });
    }
}

/// Serves the proxy on `listener` until the task is dropped. The sandbox helper uses this
/// with a listener it bound inside the sandbox's network namespace, while the connections it
/// opens leave from the host's.
pub async fn serve_on(listener: TcpListener, rules: Vec<Rule>, log: RefusalLog) {
    serve_bounded(listener, rules, log, Bounds::default()).await
}

/// [`serve_on`] with explicit bounds.
pub async fn serve_bounded(listener: TcpListener, rules: Vec<Rule>, log: RefusalLog, bounds: Bounds) {
    let rules = Arc::new(rules);
    let refusals = log.clone();
    accept_loop(listener, bounds, Some(refusals), move |conn| serve(conn, rules.clone(), log.clone(), bounds)).await
}

/// Relays every connection to `listener` to `target` until the task is dropped (the model
/// broker's port on the host's loopback, seen inside the sandbox at the same address).
pub async fn forward_on(listener: TcpListener, target: SocketAddr) {
    let bounds = Bounds::default();
    accept_loop(listener, bounds, None, move |conn| async move {
        if let Ok(upstream) = TcpStream::connect(target).await {
            relay(conn, upstream, Vec::new(), bounds.idle_timeout).await;
        }
    })
    .await
}

/// Copies bytes both ways until either side closes or neither sends anything for `idle`.
/// `first` is sent upstream before anything else (bytes already read from the client).
async fn relay(client: TcpStream, upstream: TcpStream, first: Vec<u8>, idle: Duration) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::AsyncReadExt;
    let began = tokio::time::Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    if !first.is_empty() && upstream_write.write_all(&first).await.is_err() {
        return;
    }
    async fn pump(
        from: &mut tokio::net::tcp::OwnedReadHalf,
        to: &mut tokio::net::tcp::OwnedWriteHalf,
        last: &AtomicU64,
        began: tokio::time::Instant,
        idle: Duration,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match tokio::time::timeout(idle, from.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => {
                    last.store(began.elapsed().as_millis() as u64, Ordering::Relaxed);
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                // Quiet this way for `idle`: the tunnel is idle unless the other way was busy.
                Err(_) => {
                    let quiet = began.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                    if quiet >= idle {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown().await;
    }
    let up = pump(&mut client_read, &mut upstream_write, &last, began, idle);
    let down = pump(&mut upstream_read, &mut client_write, &last, began, idle);
    // Either way ending (closed or idle) ends the tunnel.
    tokio::select! {
        () = up => {}
        () = down => {}
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

async fn refuse(conn: &mut TcpStream, log: &RefusalLog, why: String) {
    log(why.clone());
    let body = format!("{why}\n");
    let reply = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(reply.as_bytes()).await;
}

/// A parsed request head and the bytes read past it (the start of a body or a tunnel).
struct Head {
    method: String,
    target: String,
    version: u8,
    headers: Vec<(String, Vec<u8>)>,
    rest: Vec<u8>,
}

/// Reads one request head of at most `max` bytes within `timeout`, parsed by httparse.
async fn read_head(conn: &mut TcpStream, bounds: Bounds) -> Result<Head, Option<String>> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + bounds.head_timeout;
    loop {
        let mut chunk = [0u8; 2048];
        let room = (bounds.max_head + 1).saturating_sub(buf.len()).min(chunk.len());
        let n = match tokio::time::timeout_at(deadline, conn.read(&mut chunk[..room])).await {
            Err(_) => return Err(Some(format!("egress refused: no whole request within {:?}", bounds.head_timeout))),
            Ok(Err(_)) | Ok(Ok(0)) => return Err(None),
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                return Ok(Head {
                    method: request.method.unwrap_or("").to_string(),
                    target: request.path.unwrap_or("").to_string(),
                    version: request.version.unwrap_or(1),
                    headers: request.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect(),
                    rest: buf[len..].to_vec(),
                })
            }
            Ok(httparse::Status::Partial) if buf.len() > bounds.max_head => {
                return Err(Some(format!("egress refused: request head larger than {} bytes", bounds.max_head)))
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(Some(format!("egress refused: malformed request ({e})"))),
        }
    }
}

/// `host[:port]` as a (lowercase host, port) pair, the port defaulting to `default`.
fn authority(text: &str, default: u16) -> Option<(String, u16)> {
    let (host, port) = split_host_port(text)?;
    Some((host.trim_end_matches('.').to_ascii_lowercase(), port.unwrap_or(default)))
}

async fn serve(mut conn: TcpStream, rules: Arc<Vec<Rule>>, log: RefusalLog, bounds: Bounds) {
    let head = match read_head(&mut conn, bounds).await {
        Ok(head) => head,
        Err(Some(why)) => return refuse(&mut conn, &log, why).await,
        Err(None) => return,
    };
    if head.method.eq_ignore_ascii_case("CONNECT") {
        let Some((host, port)) = split_host_port(&head.target).and_then(|(h, p)| Some((h.to_string(), p?))) else {
            return refuse(&mut conn, &log, format!("egress refused: bad CONNECT target `{}`", head.target)).await;
        };
        let addr = match decide(&rules, &host, port).await {
            Ok(a) => a,
            Err(why) => return refuse(&mut conn, &log, why).await,
        };
        let Ok(upstream) = TcpStream::connect(addr).await else {
            return refuse(&mut conn, &log, format!("egress: {host}:{port} did not accept the connection")).await;
        };
        if conn.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await.is_err() {
            return;
        }
        return relay(conn, upstream, head.rest, bounds.idle_timeout).await;
    }
    // Plain HTTP: an absolute URI (`GET http://host[:port]/path`), forwarded in origin form.
    let Some(rest) = head.target.strip_prefix("http://") else {
        let why = format!("egress refused: `{}` is not an absolute http:// URI", head.target);
        return refuse(&mut conn, &log, why).await;
    };
    let (target_authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let Some((host, port)) = authority(target_authority, 80) else {
        return refuse(&mut conn, &log, format!("egress refused: bad host `{target_authority}`")).await;
    };
    // The Host header must name the target: otherwise an allowed address would carry a
    // request for another site (domain fronting).
    for (name, value) in &head.headers {
        if name == "host" {
            let named = std::str::from_utf8(value).ok().and_then(|v| authority(v.trim(), 80));
            if named.as_ref() != Some(&(host.clone(), port)) {
                let shown = String::from_utf8_lossy(&value[..value.len().min(100)]).into_owned();
                let why = format!("egress refused: Host `{shown}` does not match the target {host}:{port}");
                return refuse(&mut conn, &log, why).await;
            }
        }
    }
    let addr = match decide(&rules, &host, port).await {
        Ok(a) => a,
        Err(why) => return refuse(&mut conn, &log, why).await,
    };
    let Ok(mut upstream) = TcpStream::connect(addr).await else {
        return refuse(&mut conn, &log, format!("egress: {host}:{port} did not accept the connection")).await;
    };
    let mut out = format!("{} {path} HTTP/1.{}\r\n", head.method, head.version).into_bytes();
    if !head.headers.iter().any(|(n, _)| n == "host") {
        out.extend_from_slice(format!("host: {target_authority}\r\n").as_bytes());
    }
    for (name, value) in &head.headers {
        if name.starts_with("proxy-") {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if upstream.write_all(&out).await.is_err() {
        return;
    }
    relay(conn, upstream, head.rest, bounds.idle_timeout).await
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
