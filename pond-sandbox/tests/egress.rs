//! The egress proxy from the sandboxed process's side: allowed hosts are reachable through
//! CONNECT and plain HTTP; everything else is refused with a 403 and a log line, including an
//! allowed-looking name that resolves to the host's own loopback.

use std::sync::{Arc, Mutex};

use pond_sandbox::egress::{Bounds, EgressProxy, Rule};
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
    let reply = ask(
        proxy.addr,
        &format!("GET http://127.0.0.1:{allowed}/index HTTP/1.1\r\nHost: 127.0.0.1:{allowed}\r\n\r\n"),
        None,
    )
    .await;
    assert!(reply.contains("allowed saw GET /index HTTP/1.1"), "{reply}");
    // Domain fronting: an allowed target carrying a request for another site.
    let reply =
        ask(proxy.addr, &format!("GET http://127.0.0.1:{allowed}/ HTTP/1.1\r\nHost: evil.example\r\n\r\n"), None).await;
    assert!(reply.starts_with("HTTP/1.1 403") && reply.contains("does not match the target"), "{reply}");
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
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert!(refused[1].contains(&format!("127.0.0.1:{other} is not on the allowlist")), "{refused:?}");
}

/// What a sandbox can make the proxy spend is bounded: an endless request line is cut at the
/// head limit, connections past the cap are closed at once, a silent client is dropped.
#[tokio::test]
async fn the_proxy_bounds_heads_connections_and_idle_clients() {
    let refused: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = refused.clone();
    let bounds = Bounds {
        max_head: 8 * 1024,
        head_timeout: std::time::Duration::from_millis(500),
        idle_timeout: std::time::Duration::from_millis(500),
        max_connections: 8,
    };
    let proxy =
        EgressProxy::start_bounded(vec![], Arc::new(move |line| log.lock().unwrap().push(line)), bounds).await.unwrap();

    // 64 MiB of request line with no end: refused once 8 KiB are in, the connection closed;
    // the rest is never read (the writer runs into a closed socket well before 64 MiB).
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    let line = vec![b'A'; 1 << 20];
    let mut written = 0usize;
    conn.write_all(b"CONNECT ").await.unwrap();
    for _ in 0..64 {
        match tokio::time::timeout(std::time::Duration::from_secs(5), conn.write_all(&line)).await {
            Ok(Ok(())) => written += line.len(),
            _ => break,
        }
    }
    assert!(written < 32 << 20, "the proxy kept reading: {written} bytes");
    common_eventually(|| refused.lock().unwrap().iter().any(|l| l.contains("larger than 8192 bytes"))).await;

    // Past the cap, connections are closed at once; the ones within it wait for their head.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), extra.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "a connection past the cap was served");
    // The silent ones are dropped after the head timeout, with a 403 naming it.
    let mut silent = held.remove(0);
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), silent.read_to_end(&mut out)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&out).contains("no whole request"), "{}", String::from_utf8_lossy(&out));
    let refused = refused.lock().unwrap().clone();
    assert!(refused.iter().any(|l| l.contains("more than 8 connections open at once")), "{refused:?}");
}

async fn common_eventually(mut pred: impl FnMut() -> bool) {
    for _ in 0..100 {
        if pred() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("condition not met within 5 s");
}
