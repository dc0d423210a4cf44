//! The broker from the agent's side and the provider's: the real key reaches only the
//! provider, a wrong dummy key never leaves the machine, streams arrive as they are produced,
//! and usage is metered.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Router;
use pond_http::broker::{start, BrokerConfig, Provider};

/// A fake model API: records the headers it got and streams three SSE events (the last with
/// usage); after the first it waits for `go`, so a broker that buffered would never let the
/// client see the first event before the end.
type Seen = Arc<Mutex<Vec<HeaderMap>>>;

async fn fake_upstream(seen: Seen, go: Arc<tokio::sync::Notify>) -> String {
    async fn handler(State((seen, go)): State<(Seen, Arc<tokio::sync::Notify>)>, headers: HeaderMap) -> Response {
        seen.lock().unwrap().push(headers);
        let events = futures_util::stream::unfold(0u32, move |i| {
            let go = go.clone();
            async move {
                if i == 3 {
                    return None;
                }
                if i == 1 {
                    go.notified().await;
                }
                let event = if i == 2 {
                    "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r1\",\"usage\":{\"input_tokens\":120,\"output_tokens\":45}}}\n\n".to_string()
                } else {
                    format!("event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"part {i}\"}}\n\n")
                };
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(event)), i + 1))
            }
        });
        Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(events)).unwrap()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(handler).with_state((seen, go));
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_key_reaches_only_the_provider_and_streams_stay_unbuffered() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let go = Arc::new(tokio::sync::Notify::new());
    let upstream = fake_upstream(seen.clone(), go.clone()).await;
    let authority = upstream.trim_start_matches("http://").to_string();
    let broker = start(BrokerConfig {
        upstream,
        provider: Provider::Openai,
        real_key: "sk-real-0042".into(),
        dummy_key: "pond-dummy-7".into(),
        limit: None,
        account: None,
    })
    .await
    .unwrap();
    let url = format!("{}/v1/responses", broker.url());

    // A wrong key is refused here, in the provider's error format, and never forwarded.
    let wrong = tokio::task::spawn_blocking({
        let url = url.clone();
        move || match ureq::post(&url).set("authorization", "Bearer sk-real-0042").send_string("{}") {
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            other => panic!("{other:?}"),
        }
    })
    .await
    .unwrap();
    assert_eq!(wrong.0, 401);
    assert!(wrong.1.contains("invalid_api_key"), "{}", wrong.1);
    assert!(seen.lock().unwrap().is_empty(), "nothing reached the provider");

    // The dummy key: the provider sees the real key, and the first event reaches the client
    // while the provider is still holding back the rest (a buffering broker would stall here).
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let reading = tokio::task::spawn_blocking(move || {
        let response = ureq::post(&url)
            .set("authorization", "Bearer pond-dummy-7")
            .set("content-type", "application/json")
            .send_string(r#"{"model":"m","stream":true}"#)
            .unwrap();
        let mut reader = response.into_reader();
        let mut buf = [0u8; 4096];
        let mut body = Vec::new();
        let mut first_tx = Some(first_tx);
        loop {
            let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&body).contains("part 0") {
                if let Some(tx) = first_tx.take() {
                    let _ = tx.send(());
                }
            }
        }
        String::from_utf8(body).unwrap()
    });
    tokio::time::timeout(Duration::from_secs(20), first_rx)
        .await
        .expect("the first event arrived before the rest")
        .unwrap();
    go.notify_one();
    let body = reading.await.unwrap();
    assert!(body.contains("part 0") && body.contains("part 1") && body.contains("response.completed"), "{body}");
    let headers = seen.lock().unwrap()[0].clone();
    assert_eq!(headers.get("authorization").unwrap(), "Bearer sk-real-0042");
    assert!(!format!("{headers:?}").contains("pond-dummy-7"), "the dummy key is not forwarded");
    assert_eq!(headers.get("accept-encoding").unwrap(), "identity");
    // The provider is asked for by its own name, not the broker's (a CDN in front of a real
    // API answers only for its own host).
    assert_eq!(headers.get("host").unwrap(), authority.as_str());
    // Metered once the stream ended.
    let mut usage = broker.usage();
    for _ in 0..200 {
        if usage.requests == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        usage = broker.usage();
    }
    assert_eq!((usage.requests, usage.input_tokens, usage.output_tokens), (1, 120, 45));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_keys_go_in_x_api_key() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let go = Arc::new(tokio::sync::Notify::new());
    go.notify_one();
    let upstream = fake_upstream(seen.clone(), go).await;
    let broker = start(BrokerConfig {
        upstream,
        provider: Provider::Anthropic,
        real_key: "sk-ant-real".into(),
        dummy_key: "dummy".into(),
        limit: None,
        account: None,
    })
    .await
    .unwrap();
    let url = format!("{}/v1/messages?beta=true", broker.url());
    let status = tokio::task::spawn_blocking(move || {
        ureq::post(&url)
            .set("x-api-key", "dummy")
            .set("authorization", "Bearer dummy")
            .send_string("{}")
            .unwrap()
            .status()
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    let headers = seen.lock().unwrap()[0].clone();
    assert_eq!(headers.get("x-api-key").unwrap(), "sk-ant-real");
    assert!(headers.get("authorization").is_none(), "the dummy bearer is dropped");
}

/// A provider that echoes the key it was given — in a 401 body, in a header, and inside an SSE
/// error event cut across chunks: the agent sees none of it, only the redaction. A call that is
/// not a model API call never reaches the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_echoing_the_key_never_shows_it_to_the_agent() {
    const KEY: &str = "sk-live-ECHOED-9f8e7d6c5b4a";
    async fn echo(headers: HeaderMap, uri: axum::http::Uri) -> Response {
        let presented = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        if uri.path().ends_with("/chat/completions") {
            // An SSE error with the key split over two chunks.
            let text = format!("event: error\ndata: {{\"error\":\"bad key {presented}\"}}\n\n");
            let (a, b) = text.split_at(text.len() / 2 + 3);
            let chunks =
                vec![Ok::<_, std::io::Error>(axum::body::Bytes::from(a.to_string())), Ok(b.to_string().into())];
            return Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(futures_util::stream::iter(chunks)))
                .unwrap();
        }
        Response::builder()
            .status(401)
            .header("x-echo", presented.clone())
            .body(Body::from(format!("{{\"error\":{{\"message\":\"Incorrect API key provided: {presented}\"}}}}")))
            .unwrap()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(Mutex::new(0u32));
    let counted = hits.clone();
    let app = Router::new().fallback(move |h: HeaderMap, u: axum::http::Uri| {
        *counted.lock().unwrap() += 1;
        echo(h, u)
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let broker = start(BrokerConfig {
        upstream: format!("http://{addr}"),
        provider: Provider::Openai,
        real_key: KEY.into(),
        dummy_key: "pond-dummy-8".into(),
        limit: None,
        account: None,
    })
    .await
    .unwrap();
    let base = broker.url();
    let call = move |method: &'static str, path: &'static str| {
        let url = format!("{base}{path}");
        move || {
            let request = ureq::request(method, &url).set("authorization", "Bearer pond-dummy-8");
            let response = match request.send_string("{}") {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(e) => panic!("{e}"),
            };
            let status = response.status();
            let headers: Vec<String> =
                response.headers_names().iter().filter_map(|n| response.header(n).map(str::to_string)).collect();
            (status, headers.join("\n"), response.into_string().unwrap())
        }
    };
    let (status, headers, body) = tokio::task::spawn_blocking(call("POST", "/v1/responses")).await.unwrap();
    assert_eq!(status, 401);
    for text in [&headers, &body] {
        assert!(!text.contains(KEY) && !text.contains("ECHOED"), "{text}");
    }
    assert!(body.contains("[redacted by pond]"), "{body}");
    let (_, _, stream) = tokio::task::spawn_blocking(call("POST", "/v1/chat/completions")).await.unwrap();
    assert!(!stream.contains(KEY) && stream.contains("bad key Bearer [redacted by pond]"), "{stream}");
    // Not a model API call: refused here, nothing reaches the provider.
    let before = *hits.lock().unwrap();
    let (status, _, body) = tokio::task::spawn_blocking(call("POST", "/v1/organization/admin_api_keys")).await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(*hits.lock().unwrap(), before);
}

/// A stage's budget held by its broker while responses stream: the response that passes it is
/// cut off before its rest reaches the agent, every call after it is refused (429, saying so),
/// and what was spent is accounted exactly — Anthropic's cache reads and writes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_cuts_off_the_response_that_passes_it_and_refuses_the_next_call() {
    async fn stream() -> Response {
        let events = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":300,\"cache_read_input_tokens\":200,\"cache_creation_input_tokens\":100,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"SPENT-TEXT\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":50}}\n\n",
        ];
        // Each event in a chunk of its own, a little apart, as a provider streams them.
        let chunks = futures_util::stream::iter(events).then(|e| async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            Ok::<_, std::io::Error>(axum::body::Bytes::from(e))
        });
        Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(chunks)).unwrap()
    }
    use futures_util::StreamExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().fallback(stream)).await });
    for (limit, said) in [
        (
            pond_core::agents::BrokerLimit { tokens: Some(500), ..Default::default() },
            "budget exhausted: 601 of 500 tokens",
        ),
        (
            pond_core::agents::BrokerLimit {
                usd: Some(0.001),
                input_usd_per_mtok: 3.0,
                output_usd_per_mtok: 15.0,
                ..Default::default()
            },
            "budget exhausted: $0.001815 of $0.001000",
        ),
    ] {
        let broker = start(BrokerConfig {
            upstream: format!("http://{addr}"),
            provider: Provider::Anthropic,
            real_key: "sk-ant-real".into(),
            dummy_key: "dummy".into(),
            limit: Some(limit),
            account: None,
        })
        .await
        .unwrap();
        let url = format!("{}/v1/messages", broker.url());
        let first = tokio::task::spawn_blocking({
            let url = url.clone();
            move || {
                let r = ureq::post(&url).set("x-api-key", "dummy").send_string("{}").unwrap();
                let mut body = String::new();
                let _ = std::io::Read::read_to_string(&mut r.into_reader(), &mut body);
                body
            }
        })
        .await
        .unwrap();
        assert!(first.contains("message_start") || first.is_empty(), "{first}");
        assert!(!first.contains("SPENT-TEXT"), "the rest of the response never reached the agent: {first}");
        assert_eq!(broker.exhausted().as_deref(), Some(said));
        let second =
            tokio::task::spawn_blocking(move || match ureq::post(&url).set("x-api-key", "dummy").send_string("{}") {
                Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
                other => panic!("{other:?}"),
            })
            .await
            .unwrap();
        assert_eq!(second.0, 429);
        assert!(second.1.contains(said), "{}", second.1);
        broker.settle(Duration::from_secs(5)).await;
        let usage = broker.usage();
        assert_eq!((usage.requests, usage.input_tokens), (1, 600), "cache tokens counted as input");
    }
}

/// Under a budget a call must say what it costs: a JSON body laid out over many lines is read
/// whole, a streamed chat completion is asked for its usage, a background response is refused,
/// and a successful call that reports no usage stops the broker rather than spend unmetered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_budget_every_call_is_metered_or_refused() {
    let bodies = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let seen = bodies.clone();
    let handler = move |body: axum::body::Bytes| {
        let seen = seen.clone();
        async move {
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            seen.lock().unwrap().push(request.clone());
            if request["input"] == "silent" {
                return Response::builder().body(Body::from("{\n  \"id\": \"x\"\n}\n")).unwrap();
            }
            // OpenAI's non-streamed answer, pretty-printed: `usage` spread over lines.
            Response::builder()
                .body(Body::from("{\n  \"id\": \"r\",\n  \"usage\": {\n    \"input_tokens\": 70,\n    \"output_tokens\": 5\n  }\n}\n"))
                .unwrap()
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().fallback(handler)).await });
    let broker = start(BrokerConfig {
        upstream: format!("http://{addr}"),
        provider: Provider::Openai,
        real_key: "sk".into(),
        dummy_key: "d".into(),
        limit: Some(pond_core::agents::BrokerLimit { tokens: Some(1_000), ..Default::default() }),
        account: None,
    })
    .await
    .unwrap();
    let post = |path: &str, body: serde_json::Value| {
        let url = format!("{}{path}", broker.url());
        tokio::task::spawn_blocking(move || match ureq::post(&url).set("authorization", "Bearer d").send_json(body) {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
            Err(e) => panic!("{e}"),
        })
    };
    assert_eq!(post("/v1/responses", serde_json::json!({"input": "hi"})).await.unwrap().0, 200);
    broker.settle(Duration::from_secs(5)).await;
    assert_eq!((broker.usage().input_tokens, broker.usage().output_tokens), (70, 5), "read whole");
    let (status, body) = post("/v1/responses", serde_json::json!({"input": "hi", "background": true})).await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("background response cannot be metered"), "{body}");
    post("/v1/chat/completions", serde_json::json!({"stream": true, "messages": []})).await.unwrap();
    let asked = bodies.lock().unwrap().last().cloned().unwrap();
    assert_eq!(asked["stream_options"]["include_usage"], true, "{asked}");
    assert_eq!(broker.exhausted(), None);
    // A call that reports no usage: the broker stops.
    assert_eq!(post("/v1/responses", serde_json::json!({"input": "silent"})).await.unwrap().0, 200);
    assert!(broker.exhausted().unwrap().contains("reported no usage"), "{:?}", broker.exhausted());
    assert_eq!(post("/v1/responses", serde_json::json!({"input": "hi"})).await.unwrap().0, 429);
}

/// A provider that answers 429 with `Retry-After` the first `busy` times it is called.
async fn busy_upstream(busy: usize, retry_after: &'static str) -> (String, Arc<Mutex<Vec<std::time::Instant>>>) {
    type Calls = Arc<Mutex<Vec<std::time::Instant>>>;
    async fn handler(State((calls, busy, wait)): State<(Calls, usize, &'static str)>) -> Response {
        let n = {
            let mut calls = calls.lock().unwrap();
            calls.push(std::time::Instant::now());
            calls.len()
        };
        if n <= busy {
            return Response::builder()
                .status(429)
                .header("retry-after", wait)
                .body(Body::from(r#"{"error":{"message":"slow down","type":"rate_limit"}}"#))
                .unwrap();
        }
        Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(r#"{"id":"r","usage":{"input_tokens":1,"output_tokens":1}}"#))
            .unwrap()
    }
    let calls: Calls = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(handler).with_state((calls.clone(), busy, retry_after));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), calls)
}

async fn call(url: String) -> (u16, Option<String>) {
    tokio::task::spawn_blocking(move || {
        match ureq::post(&url).set("authorization", "Bearer pond-dummy-7").send_string("{}") {
            Ok(r) => (r.status(), None),
            Err(ureq::Error::Status(code, r)) => (code, r.header("retry-after").map(str::to_string)),
            Err(e) => panic!("{e}"),
        }
    })
    .await
    .unwrap()
}

fn config(upstream: String) -> BrokerConfig {
    BrokerConfig {
        upstream,
        provider: Provider::Openai,
        real_key: "sk-real-0042".into(),
        dummy_key: "pond-dummy-7".into(),
        limit: None,
        account: None,
    }
}

/// `Retry-After` is honoured: the broker waits as long as the provider asks, then calls again,
/// and the agent gets the answer; a wait longer than the broker's reaches the agent as the
/// provider sent it; a broker stopped while it waits stops waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_waited_out_then_the_call_is_made_again() {
    let (upstream, calls) = busy_upstream(2, "1").await;
    let broker = start(config(upstream)).await.unwrap();
    assert_eq!(call(format!("{}/v1/responses", broker.url())).await, (200, None));
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "two 429s, then the answer");
    for pair in calls.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_millis(950), "called again before Retry-After passed");
    }
    broker.settle(Duration::from_secs(5)).await;
    assert_eq!(broker.usage().requests, 1);

    let (upstream, calls) = busy_upstream(usize::MAX, "3600").await;
    let broker = start(config(upstream)).await.unwrap();
    assert_eq!(call(format!("{}/v1/responses", broker.url())).await, (429, Some("3600".into())));
    assert_eq!(calls.lock().unwrap().len(), 1, "an hour is the agent's to wait, not the broker's");

    let (upstream, calls) = busy_upstream(usize::MAX, "20").await;
    let broker = start(config(upstream)).await.unwrap();
    let waiting = tokio::spawn(call(format!("{}/v1/responses", broker.url())));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = std::time::Instant::now();
    broker.stop();
    let (status, _) = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("still waiting").unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(5), "the wait outlived the stage");
    assert_eq!(status, 502);
    assert_eq!(calls.lock().unwrap().len(), 1);
}

/// A provider that stalls: it reads a call, then (with `head`) answers a status line and one
/// chunk of a stream, and sends nothing more. Returns its URL and when it saw each
/// connection closed by the broker.
async fn stalling_upstream(head: bool) -> (String, Arc<Mutex<Vec<std::time::Instant>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let closed = Arc::new(Mutex::new(Vec::new()));
    let seen = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                if head {
                    let first =
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
                                 10\r\ndata: {\"n\": 1}\n\n\r\n";
                    let _ = conn.write_all(first.as_bytes()).await;
                }
                // Nothing more, ever: wait for the other side to close.
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                seen.lock().unwrap().push(std::time::Instant::now());
            });
        }
    });
    (url, closed)
}

/// A stage that ends while its provider stalls — before answering, or mid-stream — closes the
/// provider's connection at once (no thread or socket held until a read timeout), and the
/// agent's call ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_provider_is_let_go_when_the_stage_ends() {
    for head in [false, true] {
        let (upstream, closed) = stalling_upstream(head).await;
        let broker = start(config(upstream)).await.unwrap();
        let url = format!("{}/v1/responses", broker.url());
        let agent = tokio::task::spawn_blocking(move || {
            let response = ureq::post(&url).set("authorization", "Bearer pond-dummy-7").send_string("{}");
            match response {
                Ok(r) => {
                    let mut text = String::new();
                    let read = std::io::Read::read_to_string(&mut r.into_reader(), &mut text);
                    (200, text, read.is_ok())
                }
                Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default(), true),
                Err(e) => panic!("{e}"),
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(closed.lock().unwrap().is_empty(), "the provider's connection is open while the stage runs");
        assert_eq!(broker.in_flight(), 1);
        let stopped = std::time::Instant::now();
        broker.stop();
        let (status, text, _) =
            tokio::time::timeout(Duration::from_secs(10), agent).await.expect("the agent's call ended").unwrap();
        let deadline = stopped + Duration::from_secs(2);
        while closed.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let at = *closed.lock().unwrap().first().expect("the broker closed the provider's connection");
        assert!(at - stopped < Duration::from_secs(2), "closed {:?} after the stage ended", at - stopped);
        broker.settle(Duration::from_secs(2)).await;
        assert_eq!(broker.in_flight(), 0, "nothing of the call is left running");
        if head {
            assert_eq!(status, 200);
            assert!(text.starts_with("data: {\"n\": 1}"), "the agent got what was streamed: {text:?}");
        } else {
            assert_eq!(status, 502, "{text}");
            assert!(text.contains("the stage ended"), "{text}");
        }
    }
}

/// The run's (or project's) budget as a stage's account reports it: nothing spent yet.
struct Caps(u64);

#[async_trait::async_trait]
impl pond_core::agents::SpendAccount for Caps {
    async fn caps(&self) -> Result<Vec<pond_core::agents::BudgetCap>, String> {
        Ok(vec![pond_core::agents::BudgetCap {
            scope: "run".into(),
            budget: pond_core::definition::Budget { tokens: Some(self.0), ..Default::default() },
            spent: pond_core::usage::Spend::default(),
        }])
    }
    async fn book(&self, _usage: pond_core::usage::TokenUsage) -> Result<(), String> {
        Ok(())
    }
    fn prices(&self) -> (f64, f64) {
        (0.0, 0.0)
    }
}

/// Responses streaming at the same time are held to a budget together: two calls that would
/// spend 400 tokens each under a budget of 500 are both cut off soon after their sum passes it —
/// the stage's own budget and a run's alike — instead of each finishing because it alone stays
/// under.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_in_flight_together_are_held_to_the_budget_together() {
    async fn stream() -> Response {
        let mut events = vec![
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":100,\"output_tokens\":1}}}\n\n".to_string(),
        ];
        for output in (50..=300).step_by(50) {
            events.push(format!(
                "event: message_delta\ndata: {{\"type\":\"message_delta\",\"usage\":{{\"output_tokens\":{output}}}}}\n\n"
            ));
        }
        events.push("event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"THE-END\"}}\n\n".into());
        let chunks = futures_util::stream::iter(events).then(|e| async move {
            tokio::time::sleep(Duration::from_millis(40)).await;
            Ok::<_, std::io::Error>(axum::body::Bytes::from(e))
        });
        Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(chunks)).unwrap()
    }
    use futures_util::StreamExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().fallback(stream)).await });
    let stage_limit = || Some(pond_core::agents::BrokerLimit { tokens: Some(500), ..Default::default() });
    let run_budget = || Some(Arc::new(Caps(500)) as Arc<dyn pond_core::agents::SpendAccount>);
    for (limit, account, said) in
        [(stage_limit(), None, "budget exhausted: "), (None, run_budget(), "budget exhausted (run): ")]
    {
        let broker = start(BrokerConfig {
            upstream: format!("http://{addr}"),
            provider: Provider::Anthropic,
            real_key: "sk-ant-real".into(),
            dummy_key: "dummy".into(),
            limit,
            account,
        })
        .await
        .unwrap();
        let url = format!("{}/v1/messages", broker.url());
        let call = |url: String| {
            tokio::task::spawn_blocking(move || {
                let r = ureq::post(&url).set("x-api-key", "dummy").send_string("{}").unwrap();
                let mut body = String::new();
                let _ = std::io::Read::read_to_string(&mut r.into_reader(), &mut body);
                body
            })
        };
        let (one, two) = (call(url.clone()), call(url.clone()));
        let (one, two) = (one.await.unwrap(), two.await.unwrap());
        for body in [&one, &two] {
            assert!(!body.contains("THE-END"), "a response ran to its end past the budget: {body}");
        }
        let why = broker.exhausted().unwrap_or_default();
        assert!(why.starts_with(said), "{why}");
        broker.settle(Duration::from_secs(5)).await;
        let usage = broker.usage();
        let spent = usage.input_tokens + usage.output_tokens;
        // Past 500 by at most the last event of each (50 output tokens apiece).
        assert!(spent > 500 && spent <= 600, "spent {spent} tokens ({why})");
        assert_eq!(usage.requests, 2);
    }
}

/// A run's budget as the store keeps it: what every stage booked, shared by their accounts.
struct Booked {
    budget: u64,
    spent: Arc<Mutex<u64>>,
}

#[async_trait::async_trait]
impl pond_core::agents::SpendAccount for Booked {
    async fn caps(&self) -> Result<Vec<pond_core::agents::BudgetCap>, String> {
        let tokens = *self.spent.lock().unwrap();
        Ok(vec![pond_core::agents::BudgetCap {
            scope: "run".into(),
            budget: pond_core::definition::Budget { tokens: Some(self.budget), ..Default::default() },
            spent: pond_core::usage::Spend { input_tokens: tokens, ..Default::default() },
        }])
    }
    async fn book(&self, usage: pond_core::usage::TokenUsage) -> Result<(), String> {
        *self.spent.lock().unwrap() += usage.input_tokens + usage.output_tokens;
        Ok(())
    }
    fn prices(&self) -> (f64, f64) {
        (0.0, 0.0)
    }
}

/// Another stage's call that ends and is booked while this stage's response streams counts
/// against the run's budget before this response ends: the streaming response reads the caps
/// again and is cut off, instead of running to its end on what was left when it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_stage_s_booked_call_cuts_a_response_still_streaming() {
    async fn stream(headers: HeaderMap) -> Response {
        let slow = headers.contains_key("x-slow");
        let mut events = vec![
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":100,\"output_tokens\":1}}}\n\n".to_string(),
        ];
        let (step, last, pause) = if slow { (10, 200, 100) } else { (300, 300, 10) };
        for output in (step..=last).step_by(step as usize) {
            events.push(format!(
                "event: message_delta\ndata: {{\"type\":\"message_delta\",\"usage\":{{\"output_tokens\":{output}}}}}\n\n"
            ));
        }
        events.push("event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"THE-END\"}}\n\n".into());
        let chunks = futures_util::stream::iter(events).then(move |e| async move {
            tokio::time::sleep(Duration::from_millis(pause)).await;
            Ok::<_, std::io::Error>(axum::body::Bytes::from(e))
        });
        Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(chunks)).unwrap()
    }
    use futures_util::StreamExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().fallback(stream)).await });
    let spent = Arc::new(Mutex::new(0u64));
    let stage = || async {
        start(BrokerConfig {
            upstream: format!("http://{addr}"),
            provider: Provider::Anthropic,
            real_key: "sk-ant-real".into(),
            dummy_key: "dummy".into(),
            limit: None,
            account: Some(Arc::new(Booked { budget: 500, spent: spent.clone() })),
        })
        .await
        .unwrap()
    };
    let (slow_stage, quick_stage) = (stage().await, stage().await);
    let call = |url: String, slow: bool| {
        tokio::task::spawn_blocking(move || {
            let mut request = ureq::post(&url).set("x-api-key", "dummy");
            if slow {
                request = request.set("x-slow", "1");
            }
            let mut body = String::new();
            let _ = std::io::Read::read_to_string(&mut request.send_string("{}").unwrap().into_reader(), &mut body);
            body
        })
    };
    // The slow response (300 tokens over ~2 s) starts with the whole budget left; the other
    // stage's quick call (400 tokens) ends and is booked meanwhile.
    let slow = call(format!("{}/v1/messages", slow_stage.url()), true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quick = call(format!("{}/v1/messages", quick_stage.url()), false).await.unwrap();
    assert!(quick.contains("THE-END"), "the quick call stays under the budget: {quick}");
    let slow = slow.await.unwrap();
    assert!(!slow.contains("THE-END"), "the slow response ran to its end past the run's budget: {slow}");
    let why = slow_stage.exhausted().unwrap_or_default();
    assert!(why.starts_with("budget exhausted (run): "), "{why}");
    slow_stage.settle(Duration::from_secs(5)).await;
    let total = *spent.lock().unwrap();
    // Past 500 by what the slow response streamed until its next read of the caps (≤ 0.5 s).
    assert!(total > 500 && total < 700, "spent {total} tokens ({why})");
}
