//! TLS for Pond's listeners and clients (rustls with ring: nothing to link).
//!
//! - **Listeners** (`pond server`, `pond orchestrator`): [`ServerTls::load`] reads a PEM
//!   certificate chain and key and re-reads them when they change on disk (checked at most every
//!   [`RECHECK`], at a handshake), so a renewed certificate is served without a restart; a
//!   broken renewal keeps the previous pair and says why in the log. [`serve`] runs a router on
//!   plain TCP or TLS; handshakes run beside the accept loop (a client that connects and sends
//!   nothing holds one handshake slot for at most [`HANDSHAKE_TIMEOUT`]), and a plain-HTTP
//!   request sent to a TLS port is answered in plain HTTP, naming the fix.
//! - **Clients** (the CLI, workers, orchestrators, webhooks, the model broker): one trust store
//!   per process — the system's authorities, the bundled Mozilla set (so a host without
//!   `ca-certificates` still reaches public servers), and the authority `--ca-cert` names
//!   ([`trust_also`]).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use crate::boundary::{LingeringListener, LingeringStream};

/// How often a listener looks at its certificate files for a change.
pub const RECHECK: Duration = Duration::from_secs(5);
/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; past it, the listener accepts no connection until one ends.
const MAX_HANDSHAKES: usize = 1024;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A file holds nothing usable.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The client trust store was already set up for this process.
    #[error("the trusted authorities were already chosen for this process")]
    AlreadyChosen,
}

fn invalid(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid { path: path.to_path_buf(), reason: reason.to_string() }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read { path: path.to_path_buf(), error })
}

/// The certificates of a PEM file (at least one).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "holds no `BEGIN CERTIFICATE` block"));
    }
    Ok(certs)
}

// ---------------------------------------------------------------------------------------------
// Clients

static CLIENT: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// Also trust the authorities in `ca_file` (PEM) for every connection this process makes.
/// Called once, before the first connection; the file is checked now, so a wrong path fails
/// at start and not at the first call.
pub fn trust_also(ca_file: &Path) -> Result<(), TlsError> {
    let extra = read_certificates(ca_file)?;
    let mut roots = default_roots();
    for cert in extra {
        roots.add(cert).map_err(|e| invalid(ca_file, format!("not a usable authority: {e}")))?;
    }
    CLIENT.set(Arc::new(client_with(roots))).map_err(|_| TlsError::AlreadyChosen)
}

/// The TLS settings of every client in this process (see the module's documentation).
pub fn client_config() -> Arc<rustls::ClientConfig> {
    CLIENT.get_or_init(|| Arc::new(client_with(default_roots()))).clone()
}

fn default_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // The system's store (`SSL_CERT_FILE`/`SSL_CERT_DIR` are honoured); a host without one
    // still has the bundled set. Certificates the system lists but rustls cannot use are skipped.
    let system = rustls_native_certs::load_native_certs();
    let (added, skipped) = roots.add_parsable_certificates(system.certs);
    tracing::debug!(added, skipped, errors = system.errors.len(), "system certificate authorities");
    roots
}

fn client_with(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// What to tell a user whose connection failed with `message`, if the cause is a TLS mismatch.
pub fn hint(url: &str, message: &str) -> Option<&'static str> {
    if message.contains("UnknownIssuer") {
        return Some(
            "the server's certificate is not signed by an authority this client trusts: pass \
             --ca-cert FILE (or POND_CA_CERT), or save it in the context with `pond context add … --ca-cert FILE`",
        );
    }
    let certificate = message.contains("invalid peer certificate");
    if certificate && (message.contains("not valid for name") || message.contains("NotValidForName")) {
        return Some("the server's certificate does not name the host in this URL: use a name it holds, or reissue it");
    }
    if certificate
        && (message.contains("xpired") || message.contains("NotValidYet") || message.contains("not valid before"))
    {
        return Some("the server's certificate is outside its validity period (or a clock is wrong): renew it, or check the clocks");
    }
    if url.starts_with("https://") && (message.contains("InvalidContentType") || message.contains("corrupt message")) {
        return Some("the server does not speak TLS on this port: use an http:// URL");
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Listeners

/// A listener's certificate and key files (`--tls-cert`, `--tls-key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (PEM), the listener's own certificate first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A listener's TLS settings, ready to serve.
#[derive(Clone)]
pub struct ServerTls(Arc<rustls::ServerConfig>);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// Reads the pair now (a bad file fails the start) and watches it for renewals.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let resolver = ReloadingCert::new(files.clone())?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls(Arc::new(config)))
    }
}

/// Serves a key pair and swaps in a new one when the files change.
#[derive(Debug)]
struct ReloadingCert {
    files: TlsFiles,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: Stamp,
    checked: Instant,
}

/// What tells a changed file: modification time and length of both.
type Stamp = [(Option<SystemTime>, u64); 2];

fn stamp(files: &TlsFiles) -> Stamp {
    let of = |p: &Path| std::fs::metadata(p).map(|m| (m.modified().ok(), m.len())).unwrap_or((None, 0));
    [of(&files.cert), of(&files.key)]
}

fn load_pair(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let certs = read_certificates(&files.cert)?;
    let pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| invalid(&files.key, format!("holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(&files.key, format!("not a usable key: {e}")))?;
    let pair = CertifiedKey::new(certs, signing);
    pair.keys_match().map_err(|e| {
        invalid(&files.key, format!("is not the key of the first certificate in {}: {e}", files.cert.display()))
    })?;
    Ok(pair)
}

impl ReloadingCert {
    fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let stamp = stamp(&files);
        let key = Arc::new(load_pair(&files)?);
        Ok(ReloadingCert { files, current: RwLock::new(Loaded { key, stamp, checked: Instant::now() }) })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        {
            let loaded = self.current.read().unwrap_or_else(|p| p.into_inner());
            if loaded.checked.elapsed() < RECHECK {
                return loaded.key.clone();
            }
        }
        let mut loaded = self.current.write().unwrap_or_else(|p| p.into_inner());
        if loaded.checked.elapsed() >= RECHECK {
            loaded.checked = Instant::now();
            // Two stats every few seconds at most; reading the files only when they changed.
            let now = stamp(&self.files);
            if now != loaded.stamp {
                match load_pair(&self.files) {
                    Ok(pair) => {
                        loaded.key = Arc::new(pair);
                        loaded.stamp = now;
                        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                    }
                    // Half-written renewals land here too: tried again at the next check.
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate changed but cannot be used; serving the previous one")
                    }
                }
            }
        }
        loaded.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Serves `router` on `listener` until `stop` resolves: plain HTTP, or HTTPS with `tls`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<ServerTls>,
    router: axum::Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Early answers (401, 409, 413) reach a client still sending its body; see `boundary`.
    let listener = LingeringListener(listener);
    match tls {
        None => axum::serve(listener, router).with_graceful_shutdown(stop).await,
        Some(tls) => {
            let listener = TlsListener {
                tcp: listener,
                acceptor: tokio_rustls::TlsAcceptor::from(tls.0),
                handshakes: JoinSet::new(),
            };
            axum::serve(listener, router).with_graceful_shutdown(stop).await
        }
    }
}

type Handshaken = Option<(tokio_rustls::server::TlsStream<LingeringStream>, SocketAddr)>;

/// Accepts TCP connections and hands axum those whose TLS handshake succeeded.
struct TlsListener {
    tcp: LingeringListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handshakes: JoinSet<Handshaken>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<LingeringStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Both arms are cancel-safe: axum drops this future when it stops serving.
        loop {
            tokio::select! {
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(ready)) = done {
                        return ready;
                    }
                }
                (stream, addr) = axum::serve::Listener::accept(&mut self.tcp), if self.handshakes.len() < MAX_HANDSHAKES => {
                    let acceptor = self.acceptor.clone();
                    self.handshakes.spawn(handshake(acceptor, stream, addr));
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        axum::serve::Listener::local_addr(&self.tcp)
    }
}

async fn handshake(acceptor: tokio_rustls::TlsAcceptor, mut stream: LingeringStream, addr: SocketAddr) -> Handshaken {
    let work = async {
        // A TLS connection opens with a handshake record (0x16); a letter is a plain HTTP
        // request line, answered in kind so the caller learns what to change.
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await.ok()? == 1 && first[0].is_ascii_alphabetic() {
            let body =
                r#"{"error":{"code":"invalid","message":"this port speaks HTTPS: call it with an https:// URL"}}"#;
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            return None;
        }
        match acceptor.accept(stream).await {
            Ok(tls) => Some((tls, addr)),
            Err(e) => {
                tracing::debug!(%addr, error = %e, "TLS handshake failed");
                None
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, work).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_fix_for_each_mismatch() {
        let untrusted = "Connection Failed: tls connection init failed: invalid peer certificate: UnknownIssuer";
        assert!(hint("https://h:1", untrusted).unwrap().contains("--ca-cert"));
        let plain =
            "Connection Failed: tls connection init failed: received corrupt message of type InvalidContentType";
        assert!(hint("https://h:1", plain).unwrap().contains("http://"));
        assert_eq!(hint("http://h:1", "Connection refused"), None);
        let name = "invalid peer certificate: certificate not valid for name \"pond.example\"; certificate is only valid for IpAddress";
        assert!(hint("https://pond.example", name).unwrap().contains("does not name the host"));
    }

    #[test]
    fn a_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let error = trust_also(&path).unwrap_err().to_string();
        assert!(error.contains("ca.pem") && error.contains("BEGIN CERTIFICATE"), "{error}");
        let missing = trust_also(&dir.path().join("missing.pem")).unwrap_err().to_string();
        assert!(missing.starts_with("reading ") && missing.contains("missing.pem"), "{missing}");
    }
}
