//! The egress proxy from the sandboxed process's side: allowed hosts are reachable through
//! CONNECT and plain HTTP; everything else is refused with a 403 and a log line, including an
//! allowed-looking name that resolves to the host's own loopback.

use std::sync::{Arc, Mutex};

use pond_sandbox::egress::{EgressProxy, Rule};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A tiny service: answers any request with `HTTP/1.1 200` and a body naming itself, and
/// echoes raw bytes on a tunnel.
async fn service(name: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let Ok(n) = conn.read(&mut buf).await else { return };
                let got = String::from_utf8_lossy(&buf[..n]).to_string();
                let reply = if got.starts_with("GET ") {
                    let line = got.lines().next().unwrap_or("").to_string();
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name} saw {line}",
                        name.len() + 5 + line.len()
                    )
                } else {
                    format!("{name}:{got}")
                };
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    port
}

async fn ask(proxy: std::net::SocketAddr, request: &str, then: Option<&str>) -> String {
    let mut conn = TcpStream::connect(proxy).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    out.extend_from_slice(&buf[..n]);
    if let Some(payload) = then {
        if String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200") {
            conn.write_all(payload.as_bytes()).await.unwrap();
            let n = conn.read(&mut buf).await.unwrap();
            out.extend_from_slice(&buf[..n]);
        }
    }
    let _ = conn.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test]
async fn only_the_allowlist_gets_out_and_refusals_are_logged() {
    let allowed = service("allowed").await;
    let other = service("other").await;
    let refused: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = refused.clone();
    let rules = vec![
        Rule::parse(&format!("127.0.0.1:{allowed}")).unwrap(),
        Rule::parse(&format!("localhost:{other}")).unwrap(),
    ];
    let proxy = EgressProxy::start(rules, Arc::new(move |line| log.lock().unwrap().push(line))).await.unwrap();

    // CONNECT to an allowed address: a tunnel.
    let reply =
        ask(proxy.addr, &format!("CONNECT 127.0.0.1:{allowed} HTTP/1.1\r\nHost: x\r\n\r\n"), Some("ping")).await;
    assert!(reply.starts_with("HTTP/1.1 200") && reply.ends_with("allowed:ping"), "{reply}");
    // Plain HTTP to an allowed address: forwarded in origin form.
    let reply =
        ask(proxy.addr, &format!("GET http://127.0.0.1:{allowed}/index HTTP/1.1\r\nHost: x\r\n\r\n"), None).await;
    assert!(reply.contains("allowed saw GET /index HTTP/1.1"), "{reply}");
    // Another port of the host, even of an allowed address: refused and logged.
    let reply = ask(proxy.addr, &format!("CONNECT 127.0.0.1:{other} HTTP/1.1\r\n\r\n"), Some("ping")).await;
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    // A name on the allowlist that resolves to loopback: refused (no rebinding into the host).
    let reply = ask(proxy.addr, &format!("CONNECT localhost:{other} HTTP/1.1\r\n\r\n"), Some("ping")).await;
    assert!(reply.starts_with("HTTP/1.1 403") && reply.contains("internal address"), "{reply}");
    // Not a proxy request at all.
    let reply = ask(proxy.addr, "GET /relative HTTP/1.1\r\n\r\n", None).await;
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    let refused = refused.lock().unwrap().clone();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(refused[0].contains(&format!("127.0.0.1:{other} is not on the allowlist")), "{refused:?}");
}
