//! Events and webhooks from the outside: a receiver written with the `standardwebhooks` PyPI
//! package (no Pond code) checks every delivery's signature, goes down and comes back, sees a
//! secret rotated; the event stream is scoped to the caller's projects; and on PostgreSQL three
//! nodes, one of them killed, give one gapless event order to every reader.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use pond_core::events::Event;
use pond_http::client::Client;
use pond_http::events_client::EventFilter;
use pond_http::webhooks::CreateWebhook;
use serde_json::json;

/// A receiver using the `standardwebhooks` package: each POST is verified against the secrets
/// listed in `secrets` (one per line, re-read per request) and logged as a JSON line with the
/// indexes of the secrets that verified it; unverified deliveries get 401.
const RECEIVER: &str = r#"
import http.server, json, sys
from standardwebhooks.webhooks import Webhook
port, log_path, secrets_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        headers = {k.lower(): v for k, v in self.headers.items()}
        secrets = open(secrets_path).read().split()
        verified = []
        for i, secret in enumerate(secrets):
            try:
                Webhook(secret).verify(body, headers)
                verified.append(i)
            except Exception:
                pass
        record = {"id": headers.get("webhook-id"), "verified_by": verified, "body": json.loads(body)}
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.send_response(204 if verified else 401)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
print("ready", flush=True)
server.serve_forever()
"#;

fn python() -> Option<String> {
    match std::env::var("POND_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => {
            let ok = Command::new(&p).args(["-c", "import standardwebhooks"]).status().is_ok_and(|s| s.success());
            if ok {
                return Some(p);
            }
            pond_store::missing_prerequisite(&format!("{p} cannot import standardwebhooks (.ci/run installs it)"));
            None
        }
        _ => {
            pond_store::missing_prerequisite(
                "POND_TEST_PYTHON is not set (a venv with standardwebhooks; .ci/run makes it)",
            );
            None
        }
    }
}

struct Receiver {
    python: String,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Receiver {
    fn start(python: &str, dir: &Path) -> Receiver {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        std::fs::write(dir.join("receiver.py"), RECEIVER).unwrap();
        std::fs::write(dir.join("secrets"), "").unwrap();
        let mut r = Receiver { python: python.to_string(), dir: dir.to_path_buf(), port, child: None };
        r.up();
        r
    }

    fn up(&mut self) {
        let mut child = Command::new(&self.python)
            .arg(self.dir.join("receiver.py"))
            .arg(self.port.to_string())
            .arg(self.dir.join("received.jsonl"))
            .arg(self.dir.join("secrets"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the receiver");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        assert_eq!(first.trim(), "ready");
        self.child = Some(child);
    }

    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn add_secret(&self, secret: &str) {
        let path = self.dir.join("secrets");
        let mut all = std::fs::read_to_string(&path).unwrap();
        all.push_str(secret);
        all.push('\n');
        std::fs::write(path, all).unwrap();
    }

    /// Every delivery received: (webhook-id, indexes of the secrets that verified it, body).
    fn received(&self) -> Vec<(String, Vec<u64>, serde_json::Value)> {
        let text = std::fs::read_to_string(self.dir.join("received.jsonl")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                let ids = v["verified_by"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap()).collect();
                (v["id"].as_str().unwrap_or("").to_string(), ids, v["body"].clone())
            })
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.down();
    }
}

fn sh(script: &str) -> serde_json::Value {
    json!({"kind":"shell","argv":["sh","-c",script]})
}

/// The events of `project` stored so far, read page by page.
fn all_events(client: &Client, project: Option<&str>) -> Vec<Event> {
    let filter = EventFilter { project: project.map(str::to_string), types: vec![] };
    let (mut out, mut after) = (Vec::new(), 0);
    loop {
        let page = client.events(&filter, after, 200).unwrap();
        out.extend(page.events);
        if page.next_cursor == after {
            return out;
        }
        after = page.next_cursor;
    }
}

#[test]
fn webhooks_reach_a_standard_receiver_that_was_down_and_survive_a_secret_rotation() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::start(&python, dir.path());

    // Receivers on internal addresses are refused unless the operator allows them.
    let closed = Server::start(&dir.path().join("closed"), &[]);
    let refused = closed
        .admin()
        .create_webhook(&CreateWebhook {
            project_id: "acme".into(),
            url: receiver.url(),
            types: vec![],
            description: None,
        })
        .unwrap_err();
    assert_eq!(refused.status(), Some(422), "{refused}");
    assert!(refused.to_string().contains("internal address"), "{refused}");
    // A name is accepted, but what it resolves to is checked at each send (it may be re-pointed):
    // `localhost` is refused then, and the log says why.
    let named = closed
        .admin()
        .create_webhook(&CreateWebhook {
            project_id: "acme".into(),
            url: format!("http://localhost:{}/hook", receiver.port),
            types: vec![],
            description: None,
        })
        .unwrap();
    let run =
        closed.admin().submit(&run_json(json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]})), None).unwrap();
    wait_done(&closed.admin(), &run.id.to_string(), Duration::from_secs(30));
    eventually("the refusal in the log", Duration::from_secs(20), || {
        closed
            .admin()
            .webhook_deliveries(&named.id)
            .unwrap()
            .deliveries
            .iter()
            .any(|d| d.error.as_deref().is_some_and(|e| e.contains("internal address")) && d.status.is_none())
    });
    assert!(receiver.received().is_empty(), "nothing reached the receiver");
    drop(closed);

    let server = Server::start(&dir.path().join("data"), &["--webhook-allow-ip", "127.0.0.1"]);
    let admin = server.admin();
    // A consumer of another project: sees neither the webhook nor the events.
    let other = admin.create_key(&["other".into()], None).unwrap().token.unwrap();
    let other = server.client(&other);

    let out = server.cli(&["webhooks", "add", &receiver.url(), "--project", "acme", "--type", "run.*,stage.succeeded"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let secret = text.split_whitespace().find(|w| w.starts_with("whsec_")).expect("the secret is printed").to_string();
    let id = text.split_whitespace().find(|w| w.starts_with("wh_")).unwrap().to_string();
    receiver.add_secret(&secret);
    assert!(admin.webhook(&id).unwrap().secret.is_none(), "the secret is shown once");
    assert_eq!(other.webhook(&id).unwrap_err().status(), Some(404), "another tenant's webhook does not exist for it");
    assert!(other.webhooks().unwrap().webhooks.is_empty());
    assert_eq!(
        other
            .create_webhook(&CreateWebhook {
                project_id: "acme".into(),
                url: receiver.url(),
                types: vec![],
                description: None
            })
            .unwrap_err()
            .status(),
        Some(404)
    );
    let bad = admin
        .create_webhook(&CreateWebhook {
            project_id: "acme".into(),
            url: receiver.url(),
            types: vec!["run.done".into()],
            description: None,
        })
        .unwrap_err();
    assert!(bad.to_string().contains("types[0]"), "{bad}");

    let first = admin.submit(&run_json(json!({"stages":[{"key":"a","executor":sh("echo hi")}]})), None).unwrap();
    wait_done(&admin, &first.id.to_string(), Duration::from_secs(30));
    eventually("the first run's events at the receiver", Duration::from_secs(20), || {
        receiver.received().iter().any(|(_, _, b)| b["type"] == "run.succeeded")
    });

    // The receiver goes down; runs go on; it comes back a few seconds later (within the first
    // retry) and still gets every event, in order.
    receiver.down();
    let mut later = Vec::new();
    for _ in 0..3 {
        let run = admin.submit(&run_json(json!({"stages":[{"key":"a","executor":sh("true")}]})), None).unwrap();
        later.push(run.id.to_string());
    }
    for id in &later {
        wait_done(&admin, id, Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(2));
    let failing = admin.webhook_deliveries(&id).unwrap();
    assert!(failing.deliveries.iter().any(|d| d.outcome == "retrying" && d.status.is_none()), "{failing:?}");
    receiver.up();

    let wanted: Vec<Event> = all_events(&admin, Some("acme"))
        .into_iter()
        .filter(|e| e.event.kind.starts_with("run.") || e.event.kind == "stage.succeeded")
        .collect();
    eventually("every event delivered after the outage", Duration::from_secs(40), || {
        let got: HashSet<String> = receiver.received().iter().map(|(id, _, _)| id.clone()).collect();
        wanted.iter().all(|e| got.contains(&format!("evt_{}", e.seq)))
    });
    let received = receiver.received();
    assert!(received.iter().all(|(_, verified, _)| verified == &vec![0]), "every delivery verified: {received:?}");
    let order: Vec<i64> = received.iter().map(|(_, _, b)| b["data"]["seq"].as_i64().unwrap()).collect();
    let mut sorted = order.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(order, sorted, "delivered in event order, each once");
    assert!(received.iter().all(|(_, _, b)| b["data"]["project_id"] == "acme"));
    assert!(
        received.iter().all(|(_, _, b)| b["type"] != "stage.running" && b["type"] != "stage.queued"),
        "the type filter holds"
    );

    // Rotation: the new secret signs at once, the old one beside it during the overlap.
    let rotated = admin.rotate_webhook_secret(&id, Some(3600)).unwrap();
    let new_secret = rotated.secret.clone().unwrap();
    assert_ne!(new_secret, secret);
    assert_eq!(rotated.secrets.len(), 2);
    receiver.add_secret(&new_secret);
    let run = admin.submit(&run_json(json!({"stages":[{"key":"a","executor":sh("true")}]})), None).unwrap();
    wait_done(&admin, &run.id.to_string(), Duration::from_secs(30));
    eventually("a delivery after the rotation", Duration::from_secs(20), || {
        receiver
            .received()
            .iter()
            .any(|(_, _, b)| b["data"]["run_id"] == run.id.to_string() && b["type"] == "run.succeeded")
    });
    let after_rotation: Vec<_> =
        receiver.received().into_iter().filter(|(_, _, b)| b["data"]["run_id"] == run.id.to_string()).collect();
    assert!(after_rotation.iter().all(|(_, v, _)| v == &vec![0, 1]), "both secrets verify: {after_rotation:?}");

    // The log, and a redelivery with the same webhook-id.
    let log = admin.webhook_deliveries(&id).unwrap();
    assert!(log.deliveries.iter().any(|d| d.outcome == "delivered" && d.status == Some(204)));
    let again = wanted[0].seq;
    let out = server.cli(&["webhooks", "redeliver", &id, "--event", &again.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually("the redelivery", Duration::from_secs(20), || {
        receiver.received().iter().filter(|(i, _, _)| *i == format!("evt_{again}")).count() == 2
    });

    // A confidential run's events say no more than its public state: none of its output.
    let secret: [u8; 32] = pond_core::seal::random_bytes::<32>();
    let public =
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pond_core::keys::x25519_public(&secret));
    let mut body = json!({"project_id": "acme", "encrypt": true, "recipient_pubkeys": [public],
        "definition": {"stages": [{"key": "quiet", "executor": sh("echo CONFIDENTIAL-7q; echo CONFIDENTIAL-8r >&2; exit 3")}]}});
    sign_request(&mut body, &secret);
    let sealed = admin.submit(&body, None).unwrap().id.to_string();
    wait_done(&admin, &sealed, Duration::from_secs(30));
    eventually("the confidential run's end at the receiver", Duration::from_secs(20), || {
        receiver.received().iter().any(|(_, _, b)| b["data"]["run_id"] == sealed.as_str() && b["type"] == "run.failed")
    });
    let everything = format!("{:?}{:?}", receiver.received(), all_events(&admin, Some("acme")));
    assert!(!everything.contains("CONFIDENTIAL"), "an event carried output");

    // The event stream is scoped: the other tenant sees none of acme's events.
    other
        .submit(&json!({"project_id":"other","definition":{"stages":[{"key":"a","executor":{"kind":"noop"}}]}}), None)
        .unwrap();
    eventually("the other project's run", Duration::from_secs(20), || {
        all_events(&other, None).iter().any(|e| e.event.kind == "run.succeeded")
    });
    assert!(all_events(&other, None).iter().all(|e| e.event.project_id == "other"));
    assert_eq!(
        other.events(&EventFilter { project: Some("acme".into()), types: vec![] }, 0, 10).unwrap_err().status(),
        Some(404)
    );
    let cli = server.cli(&["events", "--no-follow", "--project", "acme", "--type", "run.succeeded"]);
    assert!(cli.status.success());
    assert_eq!(String::from_utf8_lossy(&cli.stdout).lines().count(), 5, "{}", String::from_utf8_lossy(&cli.stdout));
    let failed = server.cli(&["events", "--no-follow", "--type", "run.failed", "--json"]);
    assert!(String::from_utf8_lossy(&failed.stdout).contains(&sealed), "the CLI pages events as JSON lines");

    // Pending deliveries survive the server's death: the receiver is down, the server is
    // killed, both come back, and the events arrive.
    receiver.down();
    let run = admin.submit(&run_json(json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]})), None).unwrap();
    wait_done(&admin, &run.id.to_string(), Duration::from_secs(30));
    let mut server = server;
    server.kill9();
    let server = Server::start(&dir.path().join("data"), &["--webhook-allow-ip", "127.0.0.1"]);
    receiver.up();
    eventually("the events of the run finished before the restart", Duration::from_secs(40), || {
        receiver
            .received()
            .iter()
            .any(|(_, _, b)| b["data"]["run_id"] == run.id.to_string() && b["type"] == "run.succeeded")
    });
    drop(server);
}

#[test]
fn three_nodes_give_every_reader_one_gapless_order_and_a_kill_loses_no_event() {
    let Some(pg) = Server::database_server() else { return };
    let Some(python) = python() else { return };
    let db = scratch_database(&pg, "events");
    let dir = tempfile::tempdir().unwrap();
    let node = |name: &str| {
        Server::start(
            &dir.path().join(name),
            &["--database-url", &db.url, "--lease", "2s", "--node-id", name, "--webhook-allow-ip", "127.0.0.1"],
        )
    };
    let a = node("node-a");
    let (mut b, c) = (node("node-b"), node("node-c"));
    let token = a.token.clone();
    let clients = [a.client(&token), b.client(&token), c.client(&token)];
    let receiver = Receiver::start(&python, dir.path());
    let hook = clients[1]
        .create_webhook(&CreateWebhook {
            project_id: "acme".into(),
            url: receiver.url(),
            types: vec![],
            description: None,
        })
        .unwrap();
    receiver.add_secret(hook.secret.as_deref().unwrap());

    // A follower on node A, from the start.
    let seen: Arc<Mutex<Vec<Event>>> = Arc::default();
    let follower = {
        let (client, seen) = (a.client(&token), seen.clone());
        std::thread::spawn(move || {
            let _ = client.follow_events(&EventFilter::default(), Some(0), &mut |e| {
                seen.lock().unwrap().push(e.clone());
                true
            });
        })
    };
    let _ = follower;

    let ids: Vec<String> = (0..18)
        .map(|i| {
            let body = run_json(json!({"stages":[
                {"key":"work","executor":sh("sleep 1")},
                {"key":"after","executor":{"kind":"noop"},"needs":["work"]}
            ]}));
            clients[i % 3].submit(&body, None).unwrap().id.to_string()
        })
        .collect();
    eventually("node-b to be running stages", Duration::from_secs(30), || {
        ids.iter().any(|id| {
            let run = clients[0].get_run(id).unwrap();
            run.stages[0].attempts.iter().any(|a| a.owner == "node-b" && a.outcome.is_none())
        })
    });
    b.kill9();
    for id in &ids {
        wait_done(&clients[0], id, Duration::from_secs(90));
    }

    let stored = all_events(&clients[2], None);
    let seqs: Vec<i64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=stored.len() as i64).collect::<Vec<_>>(), "one gapless order");
    eventually("the follower to catch up", Duration::from_secs(20), || seen.lock().unwrap().len() >= stored.len());
    assert_eq!(&seen.lock().unwrap()[..stored.len()], &stored[..], "the stream on node A is the stored order");
    // Every run's story is whole and in order; the killed node's stages ran again.
    let mut by_run: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for e in &stored {
        by_run.entry(e.event.run_id.to_string()).or_default().push(&e.event.kind);
    }
    for id in &ids {
        let story = &by_run[id];
        assert_eq!(story.first(), Some(&"run.queued"), "{id}: {story:?}");
        assert_eq!(story.last(), Some(&"run.succeeded"), "{id}: {story:?}");
        assert_eq!(story.iter().filter(|k| **k == "stage.succeeded").count(), 2, "{id}: {story:?}");
    }
    let taken_over = stored
        .iter()
        .filter(|e| e.event.previous_state.as_deref() == Some("running") && e.event.kind == "stage.running")
        .count();
    assert!(taken_over > 0, "a stage of the killed node was taken over");

    // The webhook got every event (a node killed while sending may leave some to be resent,
    // with the same webhook-id).
    eventually("every event at the receiver", Duration::from_secs(60), || {
        let got: HashSet<String> = receiver.received().into_iter().map(|(id, _, _)| id).collect();
        stored.iter().all(|e| got.contains(&format!("evt_{}", e.seq)))
    });
    let received = receiver.received();
    let distinct: HashSet<&String> = received.iter().map(|(id, _, _)| id).collect();
    // Progress is written every 50 deliveries or 0.5 s: a node killed while holding the webhook
    // leaves at most that many to be sent again.
    assert!(received.len() - distinct.len() <= 50, "{} deliveries of {} events", received.len(), distinct.len());
    assert!(received.iter().all(|(_, v, _)| v == &vec![0]));
}

/// A receiver that answers 204 after `delay`, counting what it got.
fn slow_receiver(delay: Duration) -> (String, Arc<Mutex<usize>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let count: Arc<Mutex<usize>> = Arc::default();
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Requests on a kept-alive connection, one after another.
                loop {
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n");
                    if let Some(end) = end {
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + length {
                            buf.drain(..end + 4 + length);
                            std::thread::sleep(delay);
                            *seen.lock().unwrap() += 1;
                            if stream.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (url, count)
}

#[test]
fn removing_a_webhook_stops_its_backlog_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--webhook-allow-ip", "127.0.0.1"]);
    let admin = server.admin();
    let (url, count) = slow_receiver(Duration::from_millis(200));
    let hook = admin
        .create_webhook(&CreateWebhook { project_id: "acme".into(), url, types: vec![], description: None })
        .unwrap();
    let ids: Vec<String> = (0..10)
        .map(|_| {
            let body = run_json(json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]}));
            admin.submit(&body, None).unwrap().id.to_string()
        })
        .collect();
    for id in &ids {
        wait_done(&admin, id, Duration::from_secs(30));
    }
    // 50 events at 200 ms each: about 10 s of backlog.
    eventually("deliveries under way", Duration::from_secs(20), || *count.lock().unwrap() >= 3);
    admin.remove_webhook(&hook.id).unwrap();
    let at_removal = *count.lock().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let after = *count.lock().unwrap();
    assert!(after <= at_removal + 4, "{} deliveries after the webhook was removed", after - at_removal);
    assert!(after < 50, "the backlog was not cut short: {after}");
    assert_eq!(admin.webhook(&hook.id).unwrap_err().status(), Some(404));
}

#[test]
fn one_key_holds_a_bounded_number_of_event_streams() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let key = server.admin().create_key(&["acme".into()], None).unwrap().token.unwrap();
    let other = server.admin().create_key(&["acme".into()], None).unwrap().token.unwrap();
    let open = |token: &str| {
        ureq::get(&format!("{}/v1/events?follow=1", server.url)).set("Authorization", &format!("Bearer {token}")).call()
    };
    let held: Vec<ureq::Response> =
        (0..pond_http::events_api::MAX_STREAMS_PER_KEY).map(|_| open(&key).unwrap()).collect();
    match open(&key) {
        Err(ureq::Error::Status(429, response)) => {
            let text = response.into_string().unwrap();
            assert!(text.contains("event streams"), "{text}");
        }
        other => panic!("the 17th stream of one key: {:?}", other.map(|r| r.status())),
    }
    assert_eq!(open(&other).unwrap().status(), 200, "another key is not held back");
    // Pages are not streams: still served.
    let page = Client::new(&server.url, Some(key.clone())).events(&EventFilter::default(), 0, 10);
    assert!(page.is_ok());
    drop(held);
}
