//! How fast state changes reach consumers: an in-process `pond server` (SQLite, or PostgreSQL)
//! runs `runs` noop runs submitted by 8 clients while a webhook receiver (in-process HTTP) and
//! an `/v1/events` follower record when each event arrives. Latency is the event's commit time
//! (stamped by the store) to its arrival; throughput is events delivered per second from the
//! first commit to the last arrival.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::client::Client;
use crate::events_client::EventFilter;
use crate::webhooks::CreateWebhook;

/// The figures.
#[derive(Debug, Clone)]
pub struct EventsBenchReport {
    /// Runs submitted.
    pub runs: usize,
    /// Events the runs made.
    pub events: usize,
    /// Webhook: commit → receiver, p50 / p99, ms.
    pub webhook_ms: (f64, f64),
    /// Webhook: events delivered per second.
    pub webhook_per_s: f64,
    /// Event stream: commit → follower, p50 / p99, ms.
    pub stream_ms: (f64, f64),
    /// Event stream: events per second.
    pub stream_per_s: f64,
}

impl fmt::Display for EventsBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} runs, {} events (p50 / p99 from commit to arrival)", self.runs, self.events)?;
        writeln!(
            f,
            "webhook:       {:>7.1} / {:>7.1} ms   {:>7.0} events/s",
            self.webhook_ms.0, self.webhook_ms.1, self.webhook_per_s
        )?;
        write!(
            f,
            "/v1/events:    {:>7.1} / {:>7.1} ms   {:>7.0} events/s",
            self.stream_ms.0, self.stream_ms.1, self.stream_per_s
        )
    }
}

fn wall_ms() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64() * 1000.0
}

fn p50_p99(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| samples.get(((samples.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
    (at(0.5), at(0.99))
}

/// (arrival wall ms, commit wall ms) of each event seen.
type Arrivals = Arc<Mutex<Vec<(f64, f64)>>>;

fn commit_ms(data: &serde_json::Value) -> Option<f64> {
    let at = data.get("at")?.as_str()?;
    pond_core::time::Timestamp::parse_rfc3339(at).map(|t| t.as_millis() as f64)
}

async fn receiver(arrivals: Arrivals) -> std::io::Result<String> {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let arrivals = arrivals.clone();
            async move {
                let now = wall_ms();
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                    if let Some(at) = commit_ms(&v["data"]) {
                        arrivals.lock().unwrap_or_else(|p| p.into_inner()).push((now, at));
                    }
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}/hook"))
}

/// Runs the benchmark; `data_dir` is removed first.
pub async fn run(
    data_dir: &std::path::Path,
    sandbox: Arc<dyn pond_core::sandbox::SandboxBackend>,
    database_url: Option<String>,
    runs: usize,
) -> Result<EventsBenchReport, String> {
    let _ = std::fs::remove_dir_all(data_dir);
    let mut config = crate::server::ServerConfig::new(data_dir.to_path_buf(), sandbox);
    config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.database_url = database_url;
    config.webhook_allow_ips = vec!["127.0.0.1".parse().map_err(|e| format!("{e}"))?];
    config.slots = 64;
    let server = crate::server::start(config).await.map_err(|e| e.to_string())?;
    let token = std::fs::read_to_string(&server.admin_token_file).map_err(|e| e.to_string())?.trim().to_string();
    let url = server.url();
    let hooked: Arrivals = Arc::default();
    let streamed: Arrivals = Arc::default();
    let hook_url = receiver(hooked.clone()).await.map_err(|e| e.to_string())?;

    let result = tokio::task::spawn_blocking({
        let (hooked, streamed) = (hooked.clone(), streamed.clone());
        move || -> Result<EventsBenchReport, String> {
            let admin = Client::new(&url, Some(token.clone()));
            admin
                .create_webhook(&CreateWebhook {
                    project_id: "bench".into(),
                    url: hook_url,
                    types: vec![],
                    description: None,
                })
                .map_err(|e| e.to_string())?;
            let follower = {
                let (client, streamed) = (Client::new(&url, Some(token.clone())), streamed.clone());
                std::thread::spawn(move || {
                    let _ = client.follow_events(&EventFilter::default(), None, &mut |e| {
                        if let Ok(v) = serde_json::to_value(e) {
                            if let Some(at) = commit_ms(&v) {
                                streamed.lock().unwrap_or_else(|p| p.into_inner()).push((wall_ms(), at));
                            }
                        }
                        true
                    });
                })
            };
            let _ = follower;
            std::thread::sleep(Duration::from_millis(300));
            let body = serde_json::json!({"project_id": "bench", "definition": {"stages": [
                {"key": "a", "executor": {"kind": "noop"}}
            ]}});
            let per_client = runs.div_ceil(8);
            std::thread::scope(|s| {
                for _ in 0..8 {
                    let (client, body) = (Client::new(&url, Some(token.clone())), body.clone());
                    s.spawn(move || {
                        for _ in 0..per_client {
                            let _ = client.submit(&body, None);
                        }
                    });
                }
            });
            let submitted = per_client * 8;
            // Every run ends with run.succeeded: wait for the last one at both consumers.
            let deadline = Instant::now() + Duration::from_secs(600);
            let events = loop {
                let stored = count_events(&admin)?;
                let done = stored.1 >= submitted;
                let arrived = |a: &Arrivals| a.lock().unwrap_or_else(|p| p.into_inner()).len();
                if done && arrived(&hooked) >= stored.0 && arrived(&streamed) >= stored.0 {
                    break stored.0;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "timed out: {} events stored, {} at the webhook, {} on the stream",
                        stored.0,
                        arrived(&hooked),
                        arrived(&streamed)
                    ));
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            let figures = |a: &Arrivals| {
                let a = a.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let first_commit = a.iter().map(|(_, at)| *at).fold(f64::MAX, f64::min);
                let last_arrival = a.iter().map(|(t, _)| *t).fold(0.0, f64::max);
                let rate = a.len() as f64 / ((last_arrival - first_commit).max(1.0) / 1000.0);
                (p50_p99(a.iter().map(|(t, at)| t - at).collect()), rate)
            };
            let (webhook_ms, webhook_per_s) = figures(&hooked);
            let (stream_ms, stream_per_s) = figures(&streamed);
            Ok(EventsBenchReport { runs: submitted, events, webhook_ms, webhook_per_s, stream_ms, stream_per_s })
        }
    })
    .await
    .map_err(|e| e.to_string())?;
    server.shutdown().await;
    result
}

/// (events stored, runs succeeded) so far.
fn count_events(client: &Client) -> Result<(usize, usize), String> {
    let (mut events, mut succeeded, mut after) = (0, 0, 0);
    loop {
        let page = client.events(&EventFilter::default(), after, 1000).map_err(|e| e.to_string())?;
        events += page.events.len();
        succeeded += page.events.iter().filter(|e| e.event.kind == "run.succeeded").count();
        if page.next_cursor == after {
            return Ok((events, succeeded));
        }
        after = page.next_cursor;
    }
}
