//! PostgreSQL deployments from the outside: several `pond server` processes on one database,
//! a node killed with -9 mid-run, and the database going away during a run. Skipped, with a
//! printed reason, when POND_TEST_DATABASE_URL is unset; .ci/run sets it.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use pond_core::run::{AttemptOutcome, RunState};
use serde_json::json;

#[test]
fn three_nodes_share_one_database_and_a_killed_node_loses_nothing() {
    let Some(pg) = Server::database_server() else { return };
    let db = scratch_database(&pg, "multinode");
    let dir = tempfile::tempdir().unwrap();
    let done_log = dir.path().join("done.log");
    let node = |name: &str| {
        Server::start(&dir.path().join(name), &["--database-url", &db.url, "--lease", "2s", "--node-id", name])
    };
    // Start all three at once on the empty database: migrations and the admin token race.
    let (a, mut b, c) = std::thread::scope(|s| {
        let (a, b, c) = (s.spawn(|| node("node-a")), s.spawn(|| node("node-b")), s.spawn(|| node("node-c")));
        (a.join().unwrap(), b.join().unwrap(), c.join().unwrap())
    });
    let tokens: Vec<&String> = [&a.token, &b.token, &c.token].into_iter().filter(|t| !t.is_empty()).collect();
    assert_eq!(tokens.len(), 1, "one admin token for the whole deployment: {:?}", [&a.token, &b.token, &c.token]);
    let token = tokens[0].clone();
    let clients = [a.client(&token), b.client(&token), c.client(&token)];

    let script = format!(
        "echo start $POND_ATTEMPT; sleep 1.5; echo \"$POND_RUN_ID\" >> {}; echo \"out $POND_RUN_ID\" > $POND_OUTPUT_DIR/out.txt",
        done_log.display()
    );
    let ids: Vec<String> = (0..24)
        .map(|i| {
            let body = run_json(json!({"stages":[
                {"key":"work","executor":{"kind":"shell","argv":["sh","-c",script]}},
                {"key":"after","executor":{"kind":"noop"}}
            ]}));
            clients[i % 3].submit(&body, None).unwrap().id.to_string()
        })
        .collect();

    let on_b = |client: &pond_http::client::Client| {
        ids.iter()
            .filter(|id| {
                let run = client.get_run(id).unwrap();
                run.stages[0].attempts.iter().any(|a| a.owner == "node-b" && a.outcome.is_none())
            })
            .count()
    };
    eventually("node-b to be running stages", Duration::from_secs(30), || on_b(&clients[0]) > 0);
    b.kill9();

    for (i, id) in ids.iter().enumerate() {
        let run = wait_done(&clients[i % 2 * 2], id, Duration::from_secs(90));
        assert_eq!(run.state, RunState::Succeeded, "run {id}: {:?}", run.stages[0].attempts);
    }
    let mut adopted = 0;
    for (i, id) in ids.iter().enumerate() {
        let (via_a, via_c) = (clients[0].get_run(id).unwrap(), clients[2].get_run(id).unwrap());
        assert_eq!(via_a, via_c, "every node serves the same run");
        let attempts = &via_a.stages[0].attempts;
        let last = attempts.last().unwrap();
        assert_eq!(last.outcome, Some(AttemptOutcome::Succeeded));
        if attempts.len() > 1 {
            assert_eq!(attempts[0].owner, "node-b");
            assert_eq!(attempts[0].outcome, Some(AttemptOutcome::LeaseExpired));
            adopted += 1;
        }
        let mut out = Vec::new();
        clients[(i + 1) % 2 * 2].download_artifact(id, "out.txt", &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap().trim(), format!("out {id}"));
        let text = log_text(&clients[i % 2 * 2], id);
        assert!(text.iter().any(|l| l.starts_with("start ")), "{text:?}");
    }
    assert!(adopted > 0, "some stages were adopted from the killed node");
    let done = std::fs::read_to_string(&done_log).unwrap();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for line in done.lines() {
        *counts.entry(line).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(counts.get(id.as_str()), Some(&1), "run {id}'s stage ran to completion exactly once");
    }
}

/// A TCP proxy in front of PostgreSQL that the test can take down and bring back, so the
/// database "restarts" for pond without touching the server other tests use.
struct Proxy {
    port: u16,
    upstream: String,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn new(upstream: String) -> Proxy {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let proxy = Proxy { port, upstream, up: Arc::new(AtomicBool::new(false)), conns: Default::default() };
        proxy.start();
        proxy
    }

    fn start(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        self.up.store(true, Ordering::SeqCst);
        let (up, conns, upstream) = (self.up.clone(), self.conns.clone(), self.upstream.clone());
        std::thread::spawn(move || {
            while up.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                conns.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
    }

    /// Refuses new connections and cuts the open ones, as a database restart does.
    fn stop(&self) {
        self.up.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5432")
    }
}

#[test]
fn while_the_database_is_gone_the_api_answers_503_and_the_run_completes_afterwards() {
    let Some(pg) = Server::database_server() else { return };
    let db = scratch_database(&pg, "outage");
    let upstream = host_port(&db.url);
    let proxy = Proxy::new(upstream.clone());
    let via_proxy = db.url.replacen(&upstream, &format!("127.0.0.1:{}", proxy.port), 1);
    survives_an_outage(&via_proxy, || proxy.stop(), || proxy.start());
}

/// Runs a stage across a database outage: the API must answer 503 with a clear error while the
/// database is gone, and the run must complete after it is back, without a retry, with every
/// line the stage printed during the outage in its log, in order, once.
fn survives_an_outage(database_url: &str, take_down: impl FnOnce(), bring_back: impl FnOnce()) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--database-url", database_url, "--lease", "30s"]);
    let admin = server.admin();
    let body = run_json(json!({"stages":[
        {"key":"work","executor":{"kind":"shell","argv":["sh","-c","echo begin; for i in $(seq 1 80); do echo line-$i; sleep 0.1; done; echo end"]}},
        {"key":"after","executor":{"kind":"noop"}}
    ]}));
    let id = admin.submit(&body, None).unwrap().id.to_string();
    eventually("the stage to begin", Duration::from_secs(30), || log_text(&admin, &id).iter().any(|l| l == "begin"));

    take_down();
    let mut answer = None;
    eventually("the API to notice the database is gone", Duration::from_secs(20), || match admin.get_run(&id) {
        Err(e) if e.status() == Some(503) => {
            answer = Some(e.to_string());
            true
        }
        _ => false,
    });
    let answer = answer.unwrap();
    assert!(answer.starts_with("unavailable (503): the database is unavailable"), "{answer}");
    std::thread::sleep(Duration::from_secs(2));
    bring_back();

    let done = wait_done(&admin, &id, Duration::from_secs(90));
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.stages);
    let output: Vec<String> = log_text(&admin, &id).into_iter().filter(|l| l.starts_with("line-")).collect();
    let expected: Vec<String> = (1..=80).map(|i| format!("line-{i}")).collect();
    assert_eq!(output, expected, "lines were lost, doubled or reordered across the outage");
    assert!(log_text(&admin, &id).iter().any(|l| l == "end"));
    assert_eq!(done.stages[0].attempts.len(), 1, "the outage did not cost a retry: {:?}", done.stages[0].attempts);
}

/// A PostgreSQL cluster of the test's own (initdb in a temp dir, run as the `postgres` user), so
/// the test can restart it without disturbing the server other tests use.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    fn start() -> Option<PrivatePostgres> {
        let initdb = std::path::Path::new("/usr/lib/postgresql/15/bin/initdb");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc_geteuid() } == 0;
        if !root || !initdb.exists() {
            pond_store::missing_prerequisite(
                "a private PostgreSQL needs root and /usr/lib/postgresql/15/bin (CI has both)",
            );
            return None;
        }
        let dir = tempfile::Builder::new().prefix("pond-pg-").tempdir_in("/tmp").unwrap();
        std::process::Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
        let data = dir.path().join("data");
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", "/usr/lib/postgresql/15/bin/initdb", "-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pg = PrivatePostgres { dir, port };
        pg.ctl("start");
        Some(pg)
    }

    fn ctl(&self, action: &str) {
        let data = self.dir.path().join("data");
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display());
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "-w", "-m", "fast", "-D"])
            .arg(&data)
            .args(["-o", &options, "-l"])
            .arg(self.dir.path().join("log"))
            .arg(action)
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl {action}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "-m", "immediate", "-D"])
            .arg(&data)
            .arg("stop")
            .output();
    }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

#[test]
fn a_postgresql_restart_mid_run_answers_503_then_the_run_completes() {
    let Some(_) = Server::database_server() else { return };
    let Some(pg) = PrivatePostgres::start() else { return };
    survives_an_outage(&pg.url(), || pg.ctl("stop"), || pg.ctl("start"));
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A node whose database is gone still stops on SIGTERM within its drain, kill grace and a few
/// seconds: what it cannot record is left to its leases.
#[test]
fn a_node_whose_database_is_away_still_stops_on_sigterm() {
    let Some(_) = Server::database_server() else { return };
    let Some(pg) = PrivatePostgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--database-url", &pg.url(), "--drain", "2s", "--kill-grace", "1s"]);
    let admin = server.admin();
    let body = run_json(
        json!({"stages":[{"key":"work","executor":{"kind":"shell","argv":["sh","-c","echo begin; sleep 60"]}}]}),
    );
    let id = admin.submit(&body, None).unwrap().id.to_string();
    eventually("the stage to begin", Duration::from_secs(30), || log_text(&admin, &id).iter().any(|l| l == "begin"));
    pg.ctl("stop");
    let sent = std::time::Instant::now();
    // SAFETY: signals the server child this test started.
    unsafe { libc_kill(server.child.id() as i32, 15) };
    let status = server.child.wait().unwrap();
    eprintln!("stopped {:?} after SIGTERM with the database away ({status:?})", sent.elapsed());
    assert!(sent.elapsed() < Duration::from_secs(20), "took {:?}", sent.elapsed());
}

/// A server-key rotation rolled across two nodes on one database, as README says: every node
/// first learns the new key as a next key (opened only), then each moves to it in turn with the
/// old one as previous. A node not yet moved opens what the new one sealed and, restarted, never
/// moves data back; the last node to move re-seals what the others sealed under the old key
/// meanwhile; in the end everything opens under the new key only, and runs use bundles sealed
/// under either.
#[test]
fn a_server_key_rotation_rolls_across_nodes_and_never_moves_back() {
    use base64::Engine as _;
    let Some(pg) = Server::database_server() else { return };
    let db = scratch_database(&pg, "rotation");
    let dir = tempfile::tempdir().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let (old, new) = ([1u8; 32], [2u8; 32]);
    // `other`: the key given as POND_PREVIOUS_SERVER_KEYS (`Move`) or POND_NEXT_SERVER_KEYS (`Open`).
    #[derive(Clone, Copy)]
    enum Other<'k> {
        None,
        Move(&'k [u8; 32]),
        Open(&'k [u8; 32]),
    }
    let node = |name: &str, key: &[u8; 32], other: Other| {
        let key = b64.encode(key);
        let (variable, other) = match other {
            Other::None => ("", None),
            Other::Move(k) => ("POND_PREVIOUS_SERVER_KEYS", Some(b64.encode(k))),
            Other::Open(k) => ("POND_NEXT_SERVER_KEYS", Some(b64.encode(k))),
        };
        let mut env = vec![("POND_SERVER_KEY", key.as_str())];
        if let Some(p) = &other {
            env.push((variable, p.as_str()));
        }
        Server::start_with_env(&dir.path().join(name), &["--database-url", &db.url, "--node-id", name], &env)
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = rt.block_on(pond_store::PgStore::connect(&db.url, 2)).unwrap();
    // Whether the given bundles, and with `credential` the credential, open under `key` only.
    let sealed_only_under_if = |key: &[u8; 32], credential: bool, bundles: &[&str]| -> bool {
        rt.block_on(async {
            use pond_core::store::Store;
            let other = if *key == old { new } else { old };
            let opens = |data: &[u8]| {
                pond_core::seal::open_at_rest(key, data).is_ok() && pond_core::seal::open_at_rest(&other, data).is_err()
            };
            let credentials = if credential { store.list_records("credential").await.unwrap() } else { Vec::new() };
            for (_, body) in credentials {
                let value: serde_json::Value = serde_json::from_str(&body).unwrap();
                if !opens(&b64.decode(value["sealed"].as_str().unwrap()).unwrap()) {
                    return false;
                }
            }
            let blobs = store.list_blobs(None, 1000).await.unwrap();
            for id in bundles {
                let meta = blobs.iter().find(|b| b.id.to_string() == *id).expect("bundle kept");
                if !opens(&pond_core::store::read_blob(&store, meta).await.unwrap()) {
                    return false;
                }
            }
            true
        })
    };
    let sealed_only_under = |key: &[u8; 32], bundles: &[&str]| sealed_only_under_if(key, true, bundles);
    let bundles_only_under = |key: &[u8; 32], bundles: &[&str]| sealed_only_under_if(key, false, bundles);
    let run_with = |server: &Server, bundle_id: &str| {
        let body = json!({
            "project_id": "acme",
            "definition": {"stages": [{"key": "a", "executor": {"kind": "shell", "argv": ["sh", "-c", "ls src >/dev/null"]}}]},
            "sources": [{"label": "src", "kind": "bundle", "config": {"bundle_id": bundle_id}}],
        });
        let admin = server.admin();
        let id = admin.submit(&body, None).unwrap().id.to_string();
        wait_done(&admin, &id, Duration::from_secs(30)).state
    };
    let bundle = pond_exec::pack_dir(&root().join("examples/repo")).unwrap();

    // Two nodes on the old key; a credential and a bundle sealed under it.
    let mut a = node("node-a", &old, Other::None);
    let mut b = node("node-b", &old, Other::None);
    add_openai_credential(&a, "sk-rotate-me");
    let token = a.token.clone();
    let first = a.admin().upload_bundle("acme", &bundle).unwrap().bundle_id.to_string();
    assert!(sealed_only_under(&old, &[&first]));

    // (1) Every node learns the new key as a next key: nothing moves.
    for (server, name) in [(&mut b, "node-b"), (&mut a, "node-a")] {
        server.kill9();
        *server = node(name, &old, Other::Open(&new));
        server.token = token.clone();
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(sealed_only_under(&old, &[&first]), "a node given the new key to open only moved data");

    // (2) Node a moves to the new key, the old as previous: it re-seals everything.
    a.kill9();
    a = node("node-a", &new, Other::Move(&old));
    a.token = token.clone();
    eventually("node a re-seals under the new key", Duration::from_secs(30), || sealed_only_under(&new, &[&first]));
    // Node b, not moved yet, seals new uploads under the old key, opens the new key's data, and
    // restarted as it is, moves nothing back (whatever the database says).
    std::thread::sleep(Duration::from_secs(1));
    let second = b.admin().upload_bundle("acme", &bundle).unwrap().bundle_id.to_string();
    assert!(bundles_only_under(&old, &[&second]));
    a.kill9();
    assert_eq!(run_with(&b, &first), RunState::Succeeded, "node b opens what the new key sealed");
    b.kill9();
    b = node("node-b", &old, Other::Open(&new));
    b.token = token.clone();
    std::thread::sleep(Duration::from_secs(2));
    assert!(sealed_only_under(&new, &[&first]), "a node not yet moved moved data back");
    assert!(bundles_only_under(&old, &[&second]));

    // Node b moves last: it re-seals what it sealed under the old key meanwhile.
    b.kill9();
    b = node("node-b", &new, Other::Move(&old));
    b.token = token.clone();
    eventually("node b re-seals its own uploads", Duration::from_secs(30), || {
        sealed_only_under(&new, &[&first, &second])
    });

    // (3) The old key is dropped: both bundles still run.
    b.kill9();
    b = node("node-b", &new, Other::None);
    b.token = token;
    for bundle in [&first, &second] {
        assert_eq!(run_with(&b, bundle), RunState::Succeeded);
    }
}

/// PostgreSQL backup as README says: `pg_dump` taken while the server runs, restored with
/// `pg_restore` into an empty database and started with the same server key, is the same
/// deployment — runs, logs, artifacts, the credential, the control plane's key, a run that
/// verifies —; started with another key it refuses, naming why.
#[test]
fn a_postgresql_dump_and_the_server_key_restore_the_deployment() {
    let Some(pg) = Server::database_server() else { return };
    let db = scratch_database(&pg, "backup");
    let restored_db = scratch_database(&pg, "restored");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("a"), &["--database-url", &db.url]);
    let admin = server.admin();
    let body = run_json(json!({"stages": [{"key": "s", "executor": {"kind": "shell",
        "argv": ["sh", "-c", "echo backed-up-line; echo payload > $POND_OUTPUT_DIR/out.txt"]}}]}));
    let id = admin.submit(&body, None).unwrap().id.to_string();
    assert_eq!(wait_done(&admin, &id, Duration::from_secs(30)).state, RunState::Succeeded);
    add_openai_credential(&server, "sk-backed-up");
    let control_plane = admin.keys().unwrap().control_plane_key;
    let dump = dir.path().join("pond.dump");
    let out = std::process::Command::new("pg_dump").args(["-Fc", "-f"]).arg(&dump).arg(&db.url).output().unwrap();
    assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
    let token = server.token.clone();
    drop(server);

    let out = std::process::Command::new("pg_restore")
        .args(["--no-owner", "-d", &restored_db.url])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_restore: {}", String::from_utf8_lossy(&out.stderr));
    let mut restored = Server::start(&dir.path().join("b"), &["--database-url", &restored_db.url]);
    restored.token = token;
    let admin = restored.admin();
    assert_eq!(admin.get_run(&id).unwrap().state, RunState::Succeeded);
    assert!(log_text(&admin, &id).iter().any(|l| l == "backed-up-line"));
    let mut artifact = Vec::new();
    admin.download_artifact(&id, "out.txt", &mut artifact).unwrap();
    assert_eq!(artifact, b"payload\n");
    assert_eq!(admin.keys().unwrap().control_plane_key, control_plane, "the same control plane");
    let listed = restored.cli(&["admin", "credentials", "list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("openai"), "{listed:?}");
    let verified = restored.cli(&["verify", &id]);
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
    drop(restored);

    let stderr = refused_start(
        &dir.path().join("c"),
        &["--database-url", &restored_db.url],
        &[("POND_SERVER_KEY", "b3RoZXItZGVwbG95bWVudC1zZXJ2ZXIta2V5LTMyISE=")],
    );
    assert!(stderr.contains("does not open this database's sealed identity"), "{stderr}");
}

/// `pond bench` on several nodes sharing one database runs to its figures (the nodes share a
/// server key, as an operator's must; each making its own once broke it).
#[test]
fn the_benchmark_runs_on_several_nodes_of_one_database() {
    let Some(pg) = Server::database_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(POND)
        .args(["bench", "--runs", "20", "--clients", "2", "--nodes", "2", "--database-url", &pg, "--data-dir"])
        .arg(dir.path().join("bench"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("PostgreSQL, 2 node(s)") && stdout.contains("end to end"), "{stdout}");
}
