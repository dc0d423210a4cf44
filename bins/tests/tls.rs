//! HTTPS end to end with a private certificate authority: a server and an orchestrator serve
//! TLS (`--tls-cert/--tls-key`), the CLI, the orchestrator and a worker trust the authority
//! through `--ca-cert`, a context or `POND_CA_CERT`, a renewed certificate is served without a
//! restart, and each mismatch (untrusted certificate, plain HTTP to a TLS port, a key that is not
//! the certificate's) is refused naming the fix.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{enroll_code, eventually, wait_done, Orchestrator, Server, Worker, POND};
use serde_json::json;

/// A certificate authority of the test's own.
struct Authority {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Authority { key, cert }
    }

    fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.cert.pem()).unwrap();
        path.to_path_buf()
    }

    /// A certificate for 127.0.0.1 and localhost: its chain and key, written into `dir`.
    fn issue(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
        // Written as a renewal would be: beside, then renamed over (never half a file).
        std::fs::write(dir.join("tls.crt.new"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key.new"), key.serialize_pem()).unwrap();
        std::fs::rename(dir.join("tls.crt.new"), &cert_path).unwrap();
        std::fs::rename(dir.join("tls.key.new"), &key_path).unwrap();
        (cert_path, key_path)
    }
}

fn pond(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(POND)
        .args(args)
        .env_remove("POND_CA_CERT")
        .env_remove("POND_CONTEXT")
        .envs(env.iter().copied())
        .env("POND_LOG", "warn")
        .output()
        .expect("run pond")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn https_with_a_private_authority_from_cli_to_worker() {
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir(&tls_dir).unwrap();
    let authority = Authority::new("pond test CA");
    let ca = authority.write(&dir.path().join("ca.pem"));
    let (cert, key) = authority.issue(&tls_dir);
    let ca_text = ca.display().to_string();

    let server = Server::start(
        &dir.path().join("server"),
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
    );
    assert!(server.url.starts_with("https://127.0.0.1:"), "{}", server.url);
    let env = [("POND_SERVER", server.url.as_str()), ("POND_TOKEN", server.token.as_str())];

    // A client that does not trust the authority is refused, and told what to pass.
    let out = pond(&["run", "list"], &env);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("certificate") && said.contains("--ca-cert"), "{said}");
    // With it, every path of the CLI works: the flag, the variable, a context.
    let out = pond(&["--ca-cert", &ca_text, "run", "list"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let mut with_env = env.to_vec();
    with_env.push(("POND_CA_CERT", &ca_text));
    assert!(pond(&["run", "list"], &with_env).status.success());
    let config = dir.path().join("cli.json");
    let config_env = [("POND_CONFIG", config.to_str().unwrap())];
    let out = pond(
        &[
            "context",
            "add",
            "secure",
            "--server",
            &server.url,
            "--token",
            &server.token,
            "--ca-cert",
            &ca_text,
            "--use",
        ],
        &config_env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = pond(&["doctor", "--json"], &config_env);
    assert!(text(&out).contains("over TLS (certificate trusted)"), "{}", text(&out));
    let out = pond(&["run", "list"], &config_env);
    assert!(out.status.success(), "{}", text(&out));

    // Plain HTTP to the TLS port gets a plain answer naming the fix, not a dropped connection.
    let plain = server.url.replace("https://", "http://");
    match ureq::get(&format!("{plain}/healthz")).call() {
        Err(ureq::Error::Status(400, response)) => {
            let body = response.into_string().unwrap();
            assert!(body.contains("https://"), "{body}");
        }
        other => panic!("plain HTTP to a TLS port: {other:?}"),
    }
    // A client that connects and never says hello holds no one else up.
    let _idle = TcpStream::connect(server.url.trim_start_matches("https://")).unwrap();

    // The pool over TLS: the orchestrator serves HTTPS to its worker and calls pond over HTTPS;
    // both trust the authority through --ca-cert (the orchestrator's from its environment).
    pond_http::tls::trust_also(&ca).unwrap();
    let admin = server.admin();
    let code = enroll_code(&admin, "p1", None, None);
    let orch = Orchestrator::start_with(
        &server.url,
        &dir.path().join("orch"),
        "127.0.0.1:0",
        Some(&code),
        &[
            ("POND_CA_CERT", &ca_text),
            ("POND_TLS_CERT", cert.to_str().unwrap()),
            ("POND_TLS_KEY", key.to_str().unwrap()),
        ],
    );
    assert!(orch.url.starts_with("https://"), "{}", orch.url);
    let code = enroll_code(&admin, "p1", Some(&["pool:byo", "tenant:acme"]), None);
    let _worker =
        Worker::start(&orch.url, &dir.path().join("worker"), &code, &["--allow-unconfined", "--ca-cert", &ca_text]);
    let body = json!({"project_id": "acme", "definition": {"stages": [{"key": "job", "executor": {
        "kind": "shell", "argv": ["sh", "-c", "echo over tls"], "placement": "pool", "sandbox": {"tier": "byo"}
    }}]}});
    let id = admin.submit(&body, None).unwrap().id.to_string();
    let run = wait_done(&admin, &id, Duration::from_secs(60));
    assert_eq!(run.state.as_str(), "succeeded", "{run:?}");
    assert_eq!(run.stages[0].attestation_verified, Some(true), "{run:?}");

    // A renewal signed by another authority is served without a restart: the old authority is
    // refused from then on, the new one trusted.
    let renewed = Authority::new("pond renewed CA");
    let new_ca = renewed.write(&dir.path().join("new-ca.pem"));
    renewed.issue(&tls_dir);
    eventually("the server to serve the renewed certificate", Duration::from_secs(20), || {
        pond(&["--ca-cert", new_ca.to_str().unwrap(), "run", "list"], &env).status.success()
    });
    let out = pond(&["--ca-cert", &ca_text, "run", "list"], &env);
    assert!(!out.status.success(), "the old authority still trusted after the renewal");
    // A broken renewal (a key that is not the certificate's) keeps the last good pair.
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(tls_dir.join("tls.key"), other.serialize_pem()).unwrap();
    std::thread::sleep(pond_http::tls::RECHECK + Duration::from_secs(1));
    let out = pond(&["--ca-cert", new_ca.to_str().unwrap(), "run", "list"], &env);
    assert!(out.status.success(), "a broken renewal took the server down: {}", text(&out));
}

#[test]
fn unusable_tls_files_fail_the_start_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let authority = Authority::new("pond test CA");
    let (cert, _key) = authority.issue(dir.path());
    let wrong_key = dir.path().join("wrong.key");
    std::fs::write(&wrong_key, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let data = dir.path().join("data");
    let start = |cert: &Path, key: &Path| {
        pond(
            &[
                "server",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data.to_str().unwrap(),
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
            &[],
        )
    };
    let out = start(&cert, &wrong_key);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("wrong.key") && text(&out).contains("not the key"), "{}", text(&out));
    let out = start(&dir.path().join("missing.crt"), &wrong_key);
    assert!(text(&out).contains("missing.crt"), "{}", text(&out));
    // One without the other is refused by the flags themselves.
    let out = pond(&["server", "--tls-cert", cert.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("--tls-key"), "{}", text(&out));
    // An --ca-cert that holds no certificate is refused before any call.
    let out = pond(&["--ca-cert", wrong_key.to_str().unwrap(), "run", "list"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("wrong.key") && text(&out).contains("BEGIN CERTIFICATE"), "{}", text(&out));
}
