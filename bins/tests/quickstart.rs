//! The README's first hour, as written: every command of its "Quickstart" and "Worker pools"
//! sections, in order, in a fresh directory with the example files, on the default ports. The
//! one liberty taken is a human's pause: after a line that starts a server, orchestrator or
//! worker in the background, the next waits until it answers. Placeholders (`<run-id>`,
//! `<token>`, `<worker-id>`) are filled from what earlier commands printed, as a reader would.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shell lines of the ```sh blocks in the README section titled `title` (comments dropped,
/// `\` continuations joined).
fn section_commands(readme: &str, title: &str) -> Vec<String> {
    let start = readme.find(&format!("## {title}")).unwrap_or_else(|| panic!("no README section {title}"));
    let rest = &readme[start + 3..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut commands = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in section.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block && line.trim() == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
        // A comment is a whole line starting with `#`, or `  # …` after a command.
        let code = match line.find(" # ") {
            Some(at) if !line[..at].contains('\'') && !line[..at].contains('"') => &line[..at],
            _ if line.trim_start().starts_with('#') => "",
            _ => line,
        };
        let code = code.trim_end();
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(code.trim());
        if !pending.trim().is_empty() {
            commands.push(pending.trim().to_string());
        }
        pending.clear();
    }
    commands
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < Duration::from_secs(60), "{what} never came up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn answers(url: &str) -> bool {
    ureq::get(url).timeout(Duration::from_secs(2)).call().is_ok()
}

struct Background(Vec<Child>);

impl Drop for Background {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn the_readme_quickstart_and_pool_sections_work_as_written() {
    let readme = std::fs::read_to_string(common::root().join("README.md")).unwrap();
    let mut commands = section_commands(&readme, "Quickstart (five minutes)");
    commands.extend(section_commands(&readme, "Worker pools in five more minutes"));
    assert!(commands.len() >= 15, "{commands:#?}");

    // A fresh directory with the example files (the commands use paths relative to a clone).
    let dir = tempfile::tempdir().unwrap();
    let copied = Command::new("cp").arg("-r").arg(common::root().join("examples")).arg(dir.path()).status().unwrap();
    assert!(copied.success());
    let bin = Path::new(common::POND).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let shell = |line: &str| {
        let mut cmd = Command::new("bash");
        cmd.args(["-c", line])
            .current_dir(dir.path())
            .env("PATH", &path)
            .env("HOME", &home)
            .env("POND_LOG", "warn")
            .env_remove("POND_SERVER")
            .env_remove("POND_TOKEN")
            .env_remove("POND_CONFIG")
            .env_remove("POND_PROJECT")
            .env_remove("POND_DATA_DIR");
        cmd
    };

    let mut background = Background(Vec::new());
    let mut last_status = String::new();
    let mut ran = 0;
    let (mut run_id, mut token, mut worker_id) = (None::<String>, None::<String>, None::<String>);
    for raw in &commands {
        // The build: the test already has its binary (the PATH above).
        if raw.starts_with("cargo build") {
            continue;
        }
        let mut line = raw.clone();
        for (placeholder, value) in [("<run-id>", &run_id), ("<token>", &token), ("<worker-id>", &worker_id)] {
            if line.contains(placeholder) {
                let value =
                    value.as_deref().unwrap_or_else(|| panic!("`{raw}` needs {placeholder}, which nothing printed"));
                line = line.replace(placeholder, value);
            }
        }
        if let Some(started) = line.strip_suffix('&') {
            let child = shell(started.trim()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            background.0.push(child);
            if started.trim_start().starts_with("pond server") {
                wait_until("the server", || answers("http://127.0.0.1:8420/readyz"));
            } else if started.contains("pond orchestrator") {
                wait_until("the orchestrator", || answers("http://127.0.0.1:8430/healthz"));
            } else if started.contains("pond worker") {
                wait_until("the worker", || {
                    let out = shell("pond pool ls").output().unwrap();
                    String::from_utf8_lossy(&out.stdout).contains("wrk-")
                });
            }
            continue;
        }
        let out = shell(&line).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "README command failed: `{raw}`\nstdout:\n{stdout}\nstderr:\n{stderr}");
        // What a reader would copy from what the terminal showed.
        let shown = format!("{stdout}\n{stderr}");
        let words = || shown.split(|c: char| c.is_whitespace() || c == ',' || c == '`').map(str::to_string);
        if line.starts_with("pond run submit") {
            run_id = words().find(|w| w.len() == 36 && w.chars().filter(|c| *c == '-').count() == 4);
            assert!(run_id.is_some(), "no run id in the output of `{raw}`:\n{stdout}");
        }
        if line.starts_with("pond admin keys create") {
            token = words().find(|w| w.starts_with("pond_key_"));
        }
        if line.starts_with("pond pool ls") {
            worker_id = words().find(|w| w.starts_with("wrk-"));
        }
        if line.starts_with("pond run status") {
            last_status = stdout.clone();
        }
        ran += 1;
    }
    assert!(ran >= 14, "only {ran} commands ran");
    // Step 7's run ran on the pool and its result was verified.
    assert!(last_status.contains("pool") && last_status.contains("verified"), "{last_status}");
}
