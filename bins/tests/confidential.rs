//! Confidential runs end to end with real processes: the control plane and the orchestrator
//! only ever hold ciphertext; the consumer decrypts with its own key — through the `pond` CLI,
//! and through a PyNaCl (libsodium) program that uses no Pond code.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{enroll_code, log_text, wait_done, Orchestrator, Server, Worker, POND};
use serde_json::json;

/// Plaintext the stages produce at run time; the definition holds only pieces of it, so
/// finding one of these anywhere pond stores data is a leak.
const MARKERS: [&str; 6] =
    ["MKL0CAL-77a", "MKP00L-31q", "ARTIFACT-9z-local", "ARTIFACT-9z-pool", "SOURCE-FILE-4242", CREDENTIAL];

/// A registered credential's value: only the claiming worker may ever hold it in clear.
const CREDENTIAL: &str = "sk-live-SECRET-8812";

fn all_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            all_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// `pond` as a consumer whose context key is in `config_dir/keys/default.x25519`.
fn consumer(server: &Server, config_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(POND)
        .args(args)
        .env("POND_SERVER", &server.url)
        .env("POND_TOKEN", &server.token)
        .env("POND_CONFIG", config_dir.join("config.json"))
        .output()
        .unwrap()
}

/// A server (with `args`), an orchestrator of pool `byo`, and a bring-your-own worker pinned to
/// tenant `acme` that runs unsandboxed stages.
fn acme_pool(dir: &Path, args: &[&str]) -> (Server, Orchestrator, Worker) {
    let server = Server::start(&dir.join("server"), args);
    let admin = server.admin();
    let code = enroll_code(&admin, "byo", None, None);
    let orch = Orchestrator::start(&server.url, &dir.join("orch"), "127.0.0.1:0", Some(&code));
    let code = enroll_code(&admin, "byo", Some(&["pool:byo", "tenant:acme"]), None);
    let worker = Worker::start(&orch.url, &dir.join("worker"), &code, &["--allow-unconfined"]);
    (server, orch, worker)
}

fn public_key(server: &Server, config_dir: &Path) -> String {
    let out = consumer(server, config_dir, &["keys", "show", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    key["public_key"].as_str().unwrap().to_string()
}

#[test]
fn only_ciphertext_is_stored_and_only_recipients_read_it() {
    confidential_run(None);
}

#[test]
fn only_ciphertext_is_stored_on_postgres() {
    let Some(pg) = Server::database_server() else { return };
    confidential_run(Some(&pg));
}

fn confidential_run(pg: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let db = pg.map(|url| common::scratch_database(url, "confidential"));
    let mut args = Vec::new();
    if let Some(db) = &db {
        args.extend(["--database-url", db.url.as_str()]);
    }
    let server = Server::start(&dir.path().join("server"), &args);
    // A data directory pond made is private.
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&server.data_dir).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
    let admin = server.admin();
    let code = enroll_code(&admin, "byo", None, None);
    let orch = Orchestrator::start(&server.url, &dir.path().join("orch"), "127.0.0.1:0", Some(&code));
    let code = enroll_code(&admin, "byo", Some(&["pool:byo", "tenant:acme"]), None);
    let worker = Worker::start(&orch.url, &dir.path().join("worker"), &code, &["--allow-unconfined"]);
    let (alice, mallory) = (dir.path().join("alice"), dir.path().join("mallory"));
    let alice_key = public_key(&server, &alice);
    let _ = public_key(&server, &mallory);

    // Refused up front: encrypt without recipients, a low-order key.
    let bad = admin
        .submit(&json!({"project_id": "acme", "encrypt": true, "definition": {"stages": [{"key": "a", "executor": {"kind": "noop"}}]}}), None)
        .unwrap_err();
    assert_eq!(bad.status(), Some(422), "{bad}");
    assert!(bad.to_string().contains("recipient_pubkeys"), "{bad}");
    let zero = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0u8; 32]);
    let low = admin
        .submit(
            &json!({"project_id": "acme", "encrypt": true, "recipientPubkeys": [zero],
            "definition": {"stages": [{"key": "a", "executor": {"kind": "noop"}}]}}),
            None,
        )
        .unwrap_err();
    assert_eq!(low.status(), Some(422));
    assert!(low.to_string().contains("recipient_pubkeys[0]") && low.to_string().contains("low-order"), "{low}");

    // A credential, registered through the CLI (the value from an environment variable).
    let out = Command::new(POND)
        .args([
            "admin",
            "credentials",
            "add",
            "openai",
            "--provider",
            "openai",
            "--env",
            "OPENAI_API_KEY",
            "--project",
            "acme",
        ])
        .args(["--value-env", "THE_KEY"])
        .env("THE_KEY", CREDENTIAL)
        .env("POND_SERVER", &server.url)
        .env("POND_TOKEN", &server.token)
        .env("POND_CONFIG", dir.path().join("admin-config.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = serde_json::to_string(&admin.credentials().unwrap()).unwrap();
    assert!(listed.contains("OPENAI_API_KEY") && !listed.contains(CREDENTIAL), "{listed}");
    // Refused at submit: a local stage asking for credentials; an unknown credential; another
    // project's run asking for acme's credential.
    let other = admin
        .submit(
            &json!({"project_id": "globex", "definition": {"stages": [{"key": "a", "executor": {"kind": "shell",
            "argv": ["true"], "placement": "pool", "credentials": ["openai"]}}]}}),
            None,
        )
        .unwrap_err();
    assert!(other.to_string().contains("may not be used by project `globex`"), "{other}");
    for (placement, name, field) in [
        ("local", "openai", "definition.stages[0].executor.credentials"),
        ("pool", "nope", "definition.stages[0].executor.credentials[0]"),
    ] {
        let e = admin
            .submit(
                &json!({"project_id": "acme", "definition": {"stages": [{"key": "a", "executor": {"kind": "shell",
                "argv": ["true"], "placement": placement, "credentials": [name]}}]}}),
                None,
            )
            .unwrap_err();
        assert_eq!(e.status(), Some(422), "{e}");
        assert!(e.to_string().contains(field), "{e}");
    }

    // A source with a secret file, uploaded as a bundle (kept sealed under the server key).
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("notes.txt"), "SOURCE-FILE-4242\n").unwrap();
    let bundle = admin.upload_bundle("acme", &pond_exec::pack_dir(src.path()).unwrap()).unwrap();
    // A run with a local and a pooled stage, encrypted to alice (camelCase field name).
    let body = json!({"project_id": "acme", "encrypt": true, "recipientPubkeys": [alice_key],
    "sources": [{"label": "repo", "kind": "bundle", "config": {"bundle_id": bundle.bundle_id}}],
    "definition": {"stages": [
        {"key": "local", "executor": {"kind": "shell", "argv": ["sh", "-c",
            "cat notes.txt; printf 'MK%s%s\\n' L0CAL -77a; printf 'ARTIFACT-%s-local' 9z > \"$POND_OUTPUT_DIR/report.txt\""]}},
        {"key": "pooled", "executor": {"kind": "shell", "placement": "pool", "sandbox": {"tier": "byo"},
            "credentials": ["openai"], "argv": ["sh", "-c",
            "cat notes.txt; printf 'MK%s%s\\n' P00L -31q; printf 'ARTIFACT-%s-pool' 9z > \"$POND_OUTPUT_DIR/pool.txt\"; printf 'key-sha %s\\n' \"$(printf %s \"$OPENAI_API_KEY\" | sha256sum | cut -c1-16)\""]}}
    ]}});
    // Unsigned, the server refuses it: nothing would stop a recipient being added later.
    let unsigned = admin.submit(&body, None).unwrap_err();
    assert_eq!(unsigned.status(), Some(422), "{unsigned}");
    assert!(unsigned.to_string().contains("consumer_signature"), "{unsigned}");
    let mut body = body;
    let alice_secret = pond_exec::load_or_create_key(&alice.join("keys/default.x25519")).unwrap();
    common::sign_request(&mut body, &alice_secret);
    // A signature over another request (one more recipient than sent) is refused too.
    let mut other = body.clone();
    other["recipientPubkeys"] = json!([alice_key, public_key(&server, &mallory)]);
    common::sign_request(&mut other, &alice_secret);
    let mut mixed = body.clone();
    mixed["consumer_signature"] = other["consumer_signature"].clone();
    let e = admin.submit(&mixed, None).unwrap_err();
    assert!(e.status() == Some(422) && e.to_string().contains("consumer_signature"), "{e}");
    assert!(e.to_string().contains("does not verify"), "{e}");
    let id = admin.submit(&body, None).unwrap().id.to_string();
    let run = wait_done(&admin, &id, Duration::from_secs(60));
    assert_eq!(run.state.as_str(), "succeeded", "{run:?}");
    // The same signed request again (a replay by anyone who saw it) makes no second run; a
    // retry of one submit under its idempotency key still answers with its run.
    let replay = admin.submit(&body, None).unwrap_err();
    assert!(replay.status() == Some(422) && replay.to_string().contains("already used for run"), "{replay}");
    let mut keyed = body.clone();
    common::sign_request(&mut keyed, &alice_secret);
    let once = admin.submit(&keyed, Some("retry-1")).unwrap();
    let again = admin.submit(&keyed, Some("retry-1")).unwrap();
    assert_eq!(once.id, again.id);
    wait_done(&admin, &once.id.to_string(), Duration::from_secs(60));
    // The signed request is kept with the run: anyone can check what the consumer asked for.
    let kept = run.encryption.as_ref().and_then(|e| e.request.clone()).expect("the signed request is in the run view");
    let signed = kept.verify().unwrap();
    assert_eq!(
        kept.signing_key,
        pond_core::signed_request::signing_public(&pond_core::signed_request::consumer_signing_seed(&alice_secret))
    );
    assert_eq!(signed.project_id, "acme");
    assert_eq!(run.stages[1].attestation_verified, Some(true), "the attestation still checks out");

    // What the API serves: key headers and ENC2 lines, artifacts with sidecars, no plaintext.
    let lines = log_text(&admin, &id);
    assert_eq!(lines.iter().filter(|l| l.starts_with("ENC2K:")).count(), 2, "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("ENC2:")));
    let names: Vec<String> = admin.artifacts(&id).unwrap().artifacts.into_iter().map(|a| a.name).collect();
    for name in ["report.txt", "report.txt.pondkey", "pool.txt", "pool.txt.pondkey"] {
        assert!(names.contains(&name.to_string()), "{names:?}");
    }
    for marker in MARKERS {
        assert!(!lines.iter().any(|l| l.contains(marker)), "{marker} served in clear");
    }
    // What the control plane and the orchestrator keep on disk: no marker anywhere.
    let mut files = Vec::new();
    all_files(&server.data_dir, &mut files);
    all_files(&orch.state_dir, &mut files);
    if let Some(db) = &db {
        // The whole PostgreSQL database, as `pg_dump` writes it.
        let dump = dir.path().join("dump.sql");
        let out = Command::new("pg_dump").args(["--data-only", "-f"]).arg(&dump).arg(&db.url).output().unwrap();
        assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(&dump).unwrap();
        assert!(text.contains("ENC2K:"), "the dump holds the run's (encrypted) log");
        files.push(dump);
    } else {
        assert!(files.iter().any(|f| f.ends_with("pond.db")));
    }
    for file in &files {
        let bytes = std::fs::read(file).unwrap_or_default();
        for marker in MARKERS {
            assert!(!contains(&bytes, marker), "{marker} found in {}", file.display());
        }
    }

    // Alice reads it with the CLI; mallory (not a recipient) gets a clear error, not garbage.
    let out = consumer(&server, &alice, &["run", "logs", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("MKL0CAL-77a") && text.contains("MKP00L-31q"), "{text}");
    assert_eq!(text.matches("SOURCE-FILE-4242").count(), 2, "both stages read the checkout: {text}");
    let key_sha = &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(CREDENTIAL))[..16];
    assert!(text.contains(&format!("key-sha {key_sha}")), "the worker's process got the credential: {text}");
    let out = consumer(&server, &alice, &["run", "artifacts", &id, "pool.txt"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ARTIFACT-9z-pool");
    let out = consumer(&server, &mallory, &["run", "logs", &id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("not among its recipients"), "{err}");
    let out = consumer(&server, &mallory, &["run", "artifacts", &id, "report.txt"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not among its recipients"));

    // A libsodium consumer with no Pond code reads the same run and checks the attestation.
    let Some(python) = std::env::var("POND_TEST_PYTHON").ok().filter(|p| !p.is_empty()) else {
        pond_store::missing_prerequisite("POND_TEST_PYTHON is not set (a python with PyNaCl; .ci/run sets it)");
        return;
    };
    let secret = std::fs::read_to_string(alice.join("keys/default.x25519")).unwrap();
    let secret = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, secret.trim()).unwrap();
    let pools = admin.pools().unwrap();
    let signing = pools.workers.iter().find(|w| w.member.id == worker.id).unwrap().member.signing_key.clone().unwrap();
    let script = common::root().join("testdata/interop/pynacl_consumer.py");
    let out = Command::new(python)
        .arg(script)
        .args([&server.url, &server.token, &id, &hex::encode(secret), &signing])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let texts: Vec<&str> = got["lines"].as_array().unwrap().iter().map(|l| l[1].as_str().unwrap()).collect();
    assert!(texts.contains(&"MKL0CAL-77a") && texts.contains(&"MKP00L-31q"), "{texts:?}");
    assert_eq!(got["artifacts"]["report.txt"], hex::encode("ARTIFACT-9z-local"));
    assert_eq!(got["artifacts"]["pool.txt"], hex::encode("ARTIFACT-9z-pool"));
    assert_eq!(got["attestations"], json!([true]));
    assert_eq!(got["request"], json!({"signed_by_me": true, "canonical": true, "covers_recipients": true}));

    // Whoever reads the database guesses the pooled stage's output and hashes the guess the way
    // a manifest over plaintext would: nothing pond stores or serves confirms it (the attestation
    // is over ciphertext, and no plaintext digest is kept anywhere).
    let finished = admin.get_run(&id).unwrap();
    let attested = finished.stages[1].attempts.last().and_then(|a| a.attestation.clone()).unwrap();
    let served = format!(
        "{}{}",
        serde_json::to_string(&finished).unwrap(),
        serde_json::to_string(&admin.artifacts(&id).unwrap()).unwrap()
    );
    for guess in ["ARTIFACT-9z-pool", "PASS", "FAIL"] {
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(guess));
        let manifest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(format!("pool.txt\0{digest}\n").as_bytes()));
        assert_ne!(attested.output_sha256.as_deref(), Some(manifest.as_str()), "guess {guess} confirmed");
        assert!(!served.contains(&digest) && !served.contains(&manifest), "guess {guess} confirmed by what is served");
    }
}

/// Someone who can write the database changes a running run's encryption: adds their key to
/// its recipients, removes its encryption, or replaces its signed request with one they signed
/// themselves. The stages that start afterwards, on the control plane and on a pool worker, are
/// refused before they run (the recipients must be covered by the signed request, and the
/// request must be the one the transparency log holds from submit): nothing is sealed to the
/// attacker's key and nothing is written in clear.
#[test]
fn a_run_s_encryption_changed_in_the_database_gets_nothing_sealed_or_written_in_clear() {
    let Some(pg) = Server::database_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = common::scratch_database(&pg, "injected");
    let (server, _orch, _worker) = acme_pool(dir.path(), &["--database-url", db.url.as_str()]);
    let admin = server.admin();
    let (alice, mallory) = (dir.path().join("alice"), dir.path().join("mallory"));
    let alice_key = public_key(&server, &alice);
    let mallory_key = public_key(&server, &mallory);
    let mallory_secret = pond_exec::load_or_create_key(&mallory.join("keys/default.x25519")).unwrap();
    let attacks: [(&str, &str); 3] = [
        ("inject", "not among the recipients the consumer signed"),
        ("strip", "it was stripped where the run is kept"),
        ("re-sign", "not the one logged when it was submitted"),
    ];
    for (attack, refusal) in attacks {
        let gate = dir.path().join(format!("gate-{attack}"));
        let wait = format!("while [ ! -e {} ]; do sleep 0.05; done; echo FIRST-SEALED", gate.display());
        let mut body = json!({"project_id": "acme", "encrypt": true, "recipient_pubkeys": [alice_key],
        "definition": {"stages": [
            {"key": "first", "executor": {"kind": "shell", "argv": ["sh", "-c", wait]}},
            {"key": "local", "continue_on_error": true, "executor": {"kind": "shell", "argv": ["sh", "-c",
                "echo INJ-LOCAL-5k; printf x > \"$POND_OUTPUT_DIR/local.txt\""]}},
            {"key": "pooled", "executor": {"kind": "shell", "placement": "pool",
                "sandbox": {"tier": "byo"}, "argv": ["sh", "-c", "echo INJ-POOL-6k"]}}
        ]}});
        common::sign_request(&mut body, &pond_exec::load_or_create_key(&alice.join("keys/default.x25519")).unwrap());
        let id = admin.submit(&body, None).unwrap().id.to_string();
        common::eventually("the first stage runs", Duration::from_secs(30), || {
            admin.get_run(&id).unwrap().stages[0].state.as_str() == "running"
        });
        let mut encryption = admin.get_run(&id).unwrap().encryption.unwrap();
        encryption.recipients.push(mallory_key.clone());
        let column = match attack {
            // One more recipient, the consumer's signed request kept as it is.
            "inject" => format!("'{}'", serde_json::to_string(&encryption).unwrap()),
            "strip" => "NULL".to_string(),
            // A request the attacker signed, covering their key.
            _ => {
                let mut signed = body.clone();
                signed["recipient_pubkeys"] = json!([alice_key, mallory_key]);
                common::sign_request(&mut signed, &mallory_secret);
                let fields = pond_core::signed_request::signed_fields(&signed, "acme");
                encryption.request = Some(pond_core::signed_request::SignedRequest::sign(
                    &pond_core::signed_request::consumer_signing_seed(&mallory_secret),
                    &fields,
                ));
                format!("'{}'", serde_json::to_string(&encryption).unwrap())
            }
        };
        let sql = format!("UPDATE runs SET encryption = {column} WHERE id = '{id}'");
        common::psql(&db.url, &sql);
        std::fs::write(&gate, "").unwrap();

        let run = wait_done(&admin, &id, Duration::from_secs(60));
        assert_eq!(run.state.as_str(), "failed", "{attack}: {run:?}");
        assert_eq!(run.stages[0].state.as_str(), "succeeded", "{attack}: sealed before the change, to alice only");
        for stage in &run.stages[1..] {
            let error = stage.error.clone().unwrap_or_default();
            assert_eq!(stage.state.as_str(), "failed", "{attack} {}: {error}", stage.key);
            assert!(error.contains(refusal), "{attack} {}: {error}", stage.key);
            assert_eq!(stage.attempts.len(), 1, "{attack} {}: refused, not retried: {:?}", stage.key, stage.attempts);
        }
        // Nothing was written after the change: one key header (the first stage's), no
        // artifact, no clear-text output.
        let lines = log_text(&admin, &id);
        assert_eq!(lines.iter().filter(|l| l.starts_with("ENC2K:")).count(), 1, "{attack}: {lines:?}");
        assert!(!lines.iter().any(|l| l.contains("INJ-")), "{attack}: {lines:?}");
        assert!(admin.artifacts(&id).unwrap().artifacts.is_empty(), "{attack}");
        if attack != "strip" {
            let out = consumer(&server, &mallory, &["run", "logs", &id]);
            assert!(String::from_utf8_lossy(&out.stderr).contains("not among its recipients"), "{attack}");
        }
    }
}

/// Whoever can write the database (or knows the recipients' public keys) can seal a stream of
/// their own to the consumer. The CLI checks every stream's key header against the keys of the
/// nodes and workers that ran the run (`GET /v1/runs/{id}/keys`) and refuses a forged one.
#[test]
fn a_forged_log_stream_is_refused_by_the_cli() {
    let Some(pg) = Server::database_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = common::scratch_database(&pg, "forged");
    let server = Server::start(&dir.path().join("server"), &["--database-url", db.url.as_str()]);
    let admin = server.admin();
    let alice = dir.path().join("alice");
    let workflow = dir.path().join("wf.json");
    std::fs::write(
        &workflow,
        json!({"stages": [{"key": "a", "executor": {"kind": "shell", "argv": ["echo", "GENUINE-1"]}}]}).to_string(),
    )
    .unwrap();
    let out =
        consumer(&server, &alice, &["run", "submit", "-f", workflow.to_str().unwrap(), "--project", "acme", "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("GENUINE-1"), "verified and shown");
    let id = admin.list_runs(None, None, Some(1), None).unwrap().runs[0].id.to_string();
    // Another reader added in the `age1…` form `pond keys show` prints reads the run too.
    let bob = dir.path().join("bob");
    let shown = consumer(&server, &bob, &["keys", "show", "--json"]);
    let age = serde_json::from_slice::<serde_json::Value>(&shown.stdout).unwrap()["age_recipient"]
        .as_str()
        .unwrap()
        .to_string();
    let out = consumer(
        &server,
        &alice,
        &["run", "submit", "-f", workflow.to_str().unwrap(), "--project", "acme", "--recipient", &age, "--wait"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second = admin.list_runs(None, None, Some(1), None).unwrap().runs[0].id.to_string();
    let out = consumer(&server, &bob, &["run", "logs", &second]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("GENUINE-1"), "{}", String::from_utf8_lossy(&out.stderr));
    // A bad --recipient is named as given, not by its index in the request.
    let out = consumer(
        &server,
        &alice,
        &["run", "submit", "-f", workflow.to_str().unwrap(), "--project", "acme", "--recipient", "AAAA"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--recipient `AAAA` is 3 bytes long"), "{stderr}");
    // The node's key is published, and the run's keys name it.
    let keys = admin.run_keys(&id).unwrap();
    assert_eq!(keys.control_plane.len(), 1);
    assert!(admin.keys().unwrap().control_plane.contains(&keys.control_plane[0]));

    // The attacker rewrites the stage's stream: a header of their own (sealed to alice, signed by
    // a key pond never had) and a line.
    let records = common::log_records(&admin, &id);
    let header = records.iter().find(|r| r.line.text.starts_with("ENC2K:")).unwrap().seq;
    let line = records.iter().find(|r| r.line.text.starts_with("ENC2:")).unwrap().seq;
    let alice_public =
        pond_core::keys::x25519_public(&pond_exec::load_or_create_key(&alice.join("keys/default.x25519")).unwrap());
    let place = pond_core::seal::Place::new(&id, "a", 1);
    let (mut sealer, forged_header) = pond_core::seal::LogSealer::new(&[alice_public], &[0x66; 32], &place);
    let forged_line = sealer.seal_line(b"FORGED-2", pond_core::store::LogStream::Stdout, false);
    for (seq, text) in [(header, forged_header), (line, forged_line)] {
        let sql = format!("UPDATE logs SET text = '{text}' WHERE run_id = '{id}' AND seq = {seq}");
        common::psql(&db.url, &sql);
    }
    let refused = || {
        let out = consumer(&server, &alice, &["run", "logs", &id]);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success() && !stdout.contains("FORGED-2"), "{stdout}");
        assert!(stderr.contains("signed by none of this run's nodes or workers"), "{stderr}");
    };
    refused();
    // The attacker also registers the forging key as a node's and makes that node the attempt's
    // owner: the key is listed for the run, but without the control plane's endorsement (made
    // with the server key, which the database does not hold) no reader accepts it.
    let key = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        pond_core::keys::ed25519_public(&[0x66; 32]),
    );
    let forged = json!({"node_id": "node-evil", "signing_key": key, "fingerprint": "SHA256:x", "endorsement": key});
    for sql in [
        format!("INSERT INTO records (kind, key, body) VALUES ('log_signer', 'node-evil', '{forged}')"),
        format!("UPDATE attempts SET owner = 'node-evil' WHERE run_id = '{id}'"),
    ] {
        common::psql(&db.url, &sql);
    }
    assert!(admin.run_keys(&id).unwrap().control_plane.iter().any(|n| n.node_id == "node-evil"), "listed");
    refused();
}

/// Whoever holds the database moves confidential output around instead of forging it: cuts a
/// stream's tail, passes one stage's stream off as another's, swaps two artifacts, relabels
/// stdout as stderr. Each is caught by the CLI and by the PyNaCl consumer (no Pond code), and
/// both read the run again once it is put back.
#[test]
fn moved_truncated_or_relabelled_output_is_detected_by_the_cli_and_by_pynacl() {
    let Some(pg) = Server::database_server() else { return };
    let Some(python) = std::env::var("POND_TEST_PYTHON").ok().filter(|p| !p.is_empty()) else {
        pond_store::missing_prerequisite("POND_TEST_PYTHON is not set (a python with PyNaCl; .ci/run sets it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = common::scratch_database(&pg, "moved");
    let server = Server::start(&dir.path().join("server"), &["--database-url", db.url.as_str()]);
    let alice = dir.path().join("alice");
    let workflow = dir.path().join("wf.json");
    let script = |stage: &str| {
        format!("echo {stage}-out-1; echo {stage}-err-1 >&2; echo {stage}-out-2; printf {stage} > \"$POND_OUTPUT_DIR/{stage}.txt\"")
    };
    std::fs::write(
        &workflow,
        json!({"stages": [
            {"key": "a", "executor": {"kind": "shell", "argv": ["sh", "-c", script("a")]}},
            {"key": "b", "executor": {"kind": "shell", "argv": ["sh", "-c", script("b")]}}
        ]})
        .to_string(),
    )
    .unwrap();
    let out =
        consumer(&server, &alice, &["run", "submit", "-f", workflow.to_str().unwrap(), "--project", "acme", "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let admin = server.admin();
    let id = admin.list_runs(None, None, Some(1), None).unwrap().runs[0].id.to_string();
    let secret = hex::encode(pond_exec::load_or_create_key(&alice.join("keys/default.x25519")).unwrap());
    let sql = |statement: &str| common::psql(&db.url, statement);
    // (what the CLI reads, the error it must give)
    let readers = |expect: Option<&str>, cli: &[&str]| {
        let out = consumer(&server, &alice, cli);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let py = Command::new(&python)
            .arg(common::root().join("testdata/interop/pynacl_consumer.py"))
            .args([&server.url, &server.token, &id, &secret])
            .output()
            .unwrap();
        let py_err = String::from_utf8_lossy(&py.stderr).to_string();
        match expect {
            None => {
                assert!(out.status.success(), "CLI {cli:?}: {stderr}");
                assert!(py.status.success(), "PyNaCl: {py_err}");
            }
            Some(why) => {
                assert!(!out.status.success() && stderr.contains(why), "CLI {cli:?} must say {why:?}: {stderr}");
                assert!(!py.status.success(), "PyNaCl must refuse it");
            }
        }
    };
    let logs = ["run", "logs", id.as_str()];
    readers(None, &logs);
    readers(None, &["run", "artifacts", &id, "a.txt"]);

    // The tail of stage a's stream (its last line and its final record) moved out of the run.
    let records = common::log_records(&admin, &id);
    let of_a: Vec<i64> = records
        .iter()
        .filter(|r| r.line.stage.as_deref() == Some("a") && (r.line.text.starts_with("ENC2")))
        .map(|r| r.seq)
        .collect();
    let tail = format!("{}, {}", of_a[of_a.len() - 2], of_a[of_a.len() - 1]);
    sql(&format!("UPDATE logs SET run_id = 'hidden' WHERE run_id = '{id}' AND seq IN ({tail})"));
    readers(Some("has no final record"), &logs);
    sql(&format!("UPDATE logs SET run_id = '{id}' WHERE run_id = 'hidden' AND seq IN ({tail})"));
    readers(None, &logs);

    // Stage b's stream shown as stage a's and a's as b's.
    // (Three steps: the log's producer index is unique per stage.)
    let swap_stages = || {
        for (from, to) in [("a", "swap"), ("b", "a"), ("swap", "b")] {
            sql(&format!("UPDATE logs SET stage = '{to}' WHERE run_id = '{id}' AND stage = '{from}'"));
        }
    };
    swap_stages();
    readers(Some("signed by none of this run's nodes or workers"), &logs);
    swap_stages();

    // stdout and stderr of stage a relabelled.
    let relabel = format!(
        "UPDATE logs SET stream = CASE stream WHEN 'stdout' THEN 'stderr' ELSE 'stdout' END \
         WHERE run_id = '{id}' AND stage = 'a' AND stream IN ('stdout', 'stderr')"
    );
    sql(&relabel);
    readers(Some("was altered"), &logs);
    sql(&relabel);

    // A clear-text line added to stage a's output: "all tests passed", in no stream at all.
    let max_seq = records.iter().map(|r| r.seq).max().unwrap();
    sql(&format!(
        "INSERT INTO logs (run_id, seq, stage, attempt, stream, at, text) VALUES ('{id}', {}, 'a', 1, 'stdout', 0, 'all tests passed')",
        max_seq + 1
    ));
    readers(Some("clear-text stdout line in a confidential run"), &logs);
    sql(&format!("DELETE FROM logs WHERE run_id = '{id}' AND seq = {}", max_seq + 1));

    // a.txt's sidecar removed and its bytes replaced by clear text.
    sql(&format!("UPDATE artifacts SET name = 'hidden.pondkey' WHERE run_id = '{id}' AND name = 'a.txt.pondkey'"));
    readers(Some("has no key sidecar"), &["run", "artifacts", &id, "a.txt"]);
    sql(&format!("UPDATE artifacts SET name = 'a.txt.pondkey' WHERE run_id = '{id}' AND name = 'hidden.pondkey'"));

    // a.txt and b.txt (with their sidecars) swapped.
    let swap_artifacts = format!(
        "UPDATE artifacts t SET blob_id = s.blob_id, size = s.size, sha256 = s.sha256 FROM artifacts s \
         WHERE t.run_id = '{id}' AND s.run_id = '{id}' AND ( \
         (t.name = 'a.txt' AND s.name = 'b.txt') OR (t.name = 'b.txt' AND s.name = 'a.txt') OR \
         (t.name = 'a.txt.pondkey' AND s.name = 'b.txt.pondkey') OR (t.name = 'b.txt.pondkey' AND s.name = 'a.txt.pondkey'))"
    );
    sql(&swap_artifacts);
    readers(Some("does not open as written there"), &["run", "artifacts", &id, "a.txt"]);
    sql(&swap_artifacts);

    // Put back, everything reads again.
    readers(None, &logs);
    readers(None, &["run", "artifacts", &id, "a.txt"]);
}

/// `pond verify` and a PyNaCl + hashlib verifier check runs against the transparency log: the
/// signed tree head, its consistency with the head each saw before, the run's signed request and
/// attestation in the log. Whoever holds the database then rewrites a logged leaf, removes the
/// newest one, or re-signs a run's request with a key of their own: each is caught by both.
#[test]
fn the_transparency_log_catches_a_rewritten_history() {
    let Some(pg) = Server::database_server() else { return };
    let Some(python) = std::env::var("POND_TEST_PYTHON").ok().filter(|p| !p.is_empty()) else {
        pond_store::missing_prerequisite("POND_TEST_PYTHON is not set (a python with PyNaCl; .ci/run sets it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = common::scratch_database(&pg, "translog");
    let (server, _orch, _worker) = acme_pool(dir.path(), &["--database-url", db.url.as_str()]);
    let admin = server.admin();
    let alice = dir.path().join("alice");
    let _ = public_key(&server, &alice);
    let secret = hex::encode(pond_exec::load_or_create_key(&alice.join("keys/default.x25519")).unwrap());
    let workflow = dir.path().join("wf.json");
    std::fs::write(
        &workflow,
        json!({"stages": [
            {"key": "local", "executor": {"kind": "shell", "argv": ["sh", "-c", "echo hi; printf x > \"$POND_OUTPUT_DIR/l.txt\""]}},
            {"key": "pooled", "executor": {"kind": "shell", "placement": "pool", "sandbox": {"tier": "byo"},
                "argv": ["sh", "-c", "echo there; printf y > \"$POND_OUTPUT_DIR/p.txt\""]}}
        ]})
        .to_string(),
    )
    .unwrap();
    let submit = || {
        let out = consumer(
            &server,
            &alice,
            &["run", "submit", "-f", workflow.to_str().unwrap(), "--project", "acme", "--wait"],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        admin.list_runs(None, None, Some(1), None).unwrap().runs[0].id.to_string()
    };
    let state = dir.path().join("pynacl-tree-head.json");
    let verifiers = |id: &str, expect: Option<&str>| {
        let out = consumer(&server, &alice, &["verify", id]);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let py = Command::new(&python)
            .arg(common::root().join("testdata/interop/pynacl_verify.py"))
            .args([server.url.as_str(), &server.token, id, &secret])
            .arg(&state)
            .output()
            .unwrap();
        let py_said = format!("{}{}", String::from_utf8_lossy(&py.stdout), String::from_utf8_lossy(&py.stderr));
        match expect {
            None => {
                assert!(out.status.success(), "pond verify {id}: {stderr}");
                assert!(py.status.success(), "PyNaCl verify: {py_said}");
                stdout.to_string()
            }
            Some(why) => {
                assert!(
                    !out.status.success() && stderr.contains(why),
                    "pond verify must say {why:?}: {stdout}{stderr}"
                );
                assert!(!py.status.success(), "PyNaCl must refuse: {py_said}");
                String::new()
            }
        }
    };
    let first = submit();
    let said = verifiers(&first, None);
    for check in
        ["request signed by this context's key", "attestation signed by worker", "artifacts signed and in place"]
    {
        assert!(said.contains(check), "{said}");
    }
    let second = submit();
    let said = verifiers(&second, None);
    assert!(said.contains("the log extends the tree head seen before"), "{said}");
    let sql = |statement: &str| common::psql(&db.url, statement);

    // A leaf both verifiers saw in a tree head is rewritten (the first run's request). The
    // node keeps the tree it read (it signs heads only over what it saw), so the rewritten leaf
    // is in no tree it signs; a node that starts afresh would sign a head that does not extend
    // the one the readers kept (the merkle tests cover that proof).
    sql("CREATE TABLE saved AS SELECT * FROM transparency_log");
    sql(&format!(
        "UPDATE transparency_log SET leaf = replace(leaf, '\"kind\":\"request\"', '\"kind\":\"request\",\"x\":1'), \
         leaf_hash = sha256(convert_to(E'\\\\000' || replace(leaf, '\"kind\":\"request\"', '\"kind\":\"request\",\"x\":1'), 'UTF8')) \
         WHERE run_id = '{first}' AND leaf LIKE '%\"kind\":\"request\"%'"
    ));
    verifiers(&first, Some("is not in the tree its head signs"));
    let restore = || {
        sql("DELETE FROM transparency_log");
        sql("INSERT INTO transparency_log SELECT * FROM saved");
    };
    restore();
    verifiers(&second, None);

    // The newest leaf (the second run's attestation) removed.
    sql("DELETE FROM transparency_log WHERE idx = (SELECT MAX(idx) FROM transparency_log)");
    verifiers(&second, Some("its attestation is not in the transparency log"));
    restore();

    // The run's signed request replaced by one the attacker signed (with mallory as a recipient).
    let view = admin.get_run(&first).unwrap();
    let mut encryption = view.encryption.clone().unwrap();
    let mallory = pond_core::keys::x25519_public(&[0x6d; 32]);
    let mallory_b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, mallory);
    encryption.recipients.push(mallory_b64.clone());
    let mut body: serde_json::Value = serde_json::from_str(&encryption.request.as_ref().unwrap().body).unwrap();
    body["recipient_pubkeys"].as_array_mut().unwrap().push(json!(mallory_b64));
    encryption.request = Some(pond_core::signed_request::SignedRequest::sign(&[0x6d; 32], &body));
    sql(&format!(
        "UPDATE runs SET encryption = '{}' WHERE id = '{first}'",
        serde_json::to_string(&encryption).unwrap().replace('\'', "''")
    ));
    verifiers(&first, Some("not by this context's key"));
    sql(&format!(
        "UPDATE runs SET encryption = '{}' WHERE id = '{first}'",
        serde_json::to_string(&view.encryption.unwrap()).unwrap().replace('\'', "''")
    ));
    verifiers(&first, None);

    // The local attempt relabelled as lost with its holder, and its stream's final record
    // removed: the run's view now excuses the cut stream, but the log recorded that the attempt
    // ended with its stream finished, and `pond verify` holds the stream to that.
    sql(&format!("UPDATE attempts SET outcome = 'lease_expired' WHERE run_id = '{first}' AND stage_key = 'local'"));
    sql(&format!(
        "UPDATE logs SET run_id = 'hidden' WHERE run_id = '{first}' AND stage = 'local' AND text LIKE 'ENC2F:%'"
    ));
    let out = consumer(&server, &alice, &["verify", &first]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("the log records the end of stage `local` attempt 1"), "{stderr}");
    let py = Command::new(&python)
        .arg(common::root().join("testdata/interop/pynacl_consumer.py"))
        .args([server.url.as_str(), &server.token, &first, &secret])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&py.stderr);
    assert!(!py.status.success() && said.contains("its stream is not whole"), "PyNaCl consumer: {said}");
    sql(&format!("UPDATE logs SET run_id = '{first}' WHERE run_id = 'hidden'"));
    sql(&format!("UPDATE attempts SET outcome = 'succeeded' WHERE run_id = '{first}' AND stage_key = 'local'"));
    verifiers(&first, None);

    // The pooled attempt's recorded exit code changed: its signature no longer holds, which the
    // CLI checks by default when it reads the run's log.
    let attempts = format!("run_id = '{first}' AND stage_key = 'pooled'");
    sql(&format!("UPDATE attempts SET attestation = replace(attestation, '\"rc\":0', '\"rc\":1') WHERE {attempts}"));
    let out = consumer(&server, &alice, &["run", "logs", &first]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("does not verify under worker"), "{stderr}");
    verifiers(&first, Some("attempt 1"));
    sql(&format!("UPDATE attempts SET attestation = replace(attestation, '\"rc\":1', '\"rc\":0') WHERE {attempts}"));
    verifiers(&first, None);
}

/// A consumer with PyNaCl and no Pond code does the whole round: signs and submits a
/// confidential run (its definition with non-ASCII text, quotes and escapes, so the canonical
/// form is tested across languages), reads and checks its streams and artifacts, and verifies
/// it against the transparency log. The CLI, holding the same key, verifies it too.
#[test]
fn a_pynacl_consumer_signs_submits_reads_and_verifies_a_run() {
    let Some(python) = std::env::var("POND_TEST_PYTHON").ok().filter(|p| !p.is_empty()) else {
        pond_store::missing_prerequisite("POND_TEST_PYTHON is not set (a python with PyNaCl; .ci/run sets it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (server, _orch, _worker) = acme_pool(dir.path(), &[]);
    let admin = server.admin();
    let alice = dir.path().join("alice");
    let _ = public_key(&server, &alice);
    let secret = hex::encode(pond_exec::load_or_create_key(&alice.join("keys/default.x25519")).unwrap());
    let request = dir.path().join("request.json");
    std::fs::write(
        &request,
        json!({"definition": {"stages": [
            {"key": "local", "name": "Grüße \"quoted\"\ttab", "executor": {"kind": "shell", "argv": ["sh", "-c",
                "echo 'naïve ✓ \\\\ line'; printf 'é' > \"$POND_OUTPUT_DIR/e.txt\""]}},
            {"key": "pooled", "executor": {"kind": "shell", "placement": "pool", "sandbox": {"tier": "byo"},
                "argv": ["sh", "-c", "echo pooled-✓; printf p > \"$POND_OUTPUT_DIR/p.txt\""]}}
        ]}})
        .to_string(),
    )
    .unwrap();
    let script = |name: &str| common::root().join("testdata/interop").join(name);
    let out = Command::new(&python)
        .arg(script("pynacl_submit.py"))
        .args([server.url.as_str(), &server.token, "acme", &secret])
        .arg(&request)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let run = wait_done(&admin, &id, Duration::from_secs(60));
    assert_eq!(run.state.as_str(), "succeeded", "{run:?}");

    let out = Command::new(&python)
        .arg(script("pynacl_consumer.py"))
        .args([server.url.as_str(), &server.token, &id, &secret])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let texts: Vec<&str> = got["lines"].as_array().unwrap().iter().map(|l| l[1].as_str().unwrap()).collect();
    assert!(texts.contains(&"naïve ✓ \\ line") && texts.contains(&"pooled-✓"), "{texts:?}");
    assert_eq!(got["artifacts"]["e.txt"], hex::encode("é"));
    assert_eq!(got["request"], json!({"signed_by_me": true, "canonical": true, "covers_recipients": true}));

    let out = Command::new(&python)
        .arg(script("pynacl_verify.py"))
        .args([server.url.as_str(), &server.token, &id, &secret])
        .arg(dir.path().join("head.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let checks = String::from_utf8_lossy(&out.stdout);
    assert!(checks.contains("attestation of pooled signed by its worker, in the log"), "{checks}");
    let out = consumer(&server, &alice, &["verify", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
