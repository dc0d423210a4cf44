//! The `swarm` executor: runs an agent CLI (a registered harness) over the run's checkout.
//!
//! For each task it resolves the harness, model and real key, starts a broker holding the key
//! (the agent gets only a per-task dummy key and the broker's URL), renders the harness's argv
//! (`{prompt}` one element, never shell-parsed) into a private home, and runs it through the
//! shell executor: stdin `/dev/null`, a built environment, its own process group, the stage's
//! wall-clock timeout, output streamed into the logs. Afterwards the fenced result blocks of
//! the transcript become `results.jsonl`, the transcript `agent-<stage>.log`, and the metered
//! usage (with its cost, from the model's prices) a log line and `usage-<stage>.json`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pond_core::agents::{default_base_url, extract_results, AgentResolver, KeyBroker};
use pond_core::definition::{ExecutorSpec, Placement, ShellSpec, StageDef};
use pond_core::exec::{ExecContext, Executor, OutputLine, OutputSink};
use pond_core::run::StageOutcome;
use pond_core::store::LogStream;

use crate::shell::{Grants, ShellExecutor};
use pond_core::sandbox::{PathAccess, PathGrant};

/// Runs `swarm` stages.
pub struct SwarmExecutor {
    resolver: Arc<dyn AgentResolver>,
    broker: Arc<dyn KeyBroker>,
    shell: Arc<ShellExecutor>,
    homes: std::path::PathBuf,
}

impl SwarmExecutor {
    /// An executor resolving agents with `resolver`, starting brokers with `broker`, running
    /// processes with `shell`, making each task's private home under `homes`.
    pub fn new(
        resolver: Arc<dyn AgentResolver>,
        broker: Arc<dyn KeyBroker>,
        shell: Arc<ShellExecutor>,
        homes: std::path::PathBuf,
    ) -> Self {
        SwarmExecutor { resolver, broker, shell, homes }
    }
}

/// Forwards output and keeps the transcript, within the per-stage log cap (a transcript is
/// never more than what the log may hold).
struct Capture<'a> {
    inner: &'a dyn OutputSink,
    transcript: Mutex<Vec<OutputLine>>,
    budget: pond_core::exec::LogBudget,
    /// Never written to the log or transcript (the model's real key), whatever the agent
    /// prints: a second line behind the broker's own redaction.
    secrets: Vec<String>,
}

#[async_trait]
impl OutputSink for Capture<'_> {
    async fn lines(&self, mut lines: Vec<OutputLine>) {
        if !self.secrets.is_empty() {
            let secrets: Vec<&[u8]> = self.secrets.iter().map(|s| s.as_bytes()).collect();
            for line in &mut lines {
                line.bytes = pond_core::exec::redact(&line.bytes, &secrets);
            }
        }
        let kept = self.budget.admit(lines.clone());
        self.transcript.lock().unwrap_or_else(|p| p.into_inner()).extend(kept);
        self.inner.lines(lines).await;
    }

    async fn artifact(&self, name: &str, data: Vec<u8>) -> Result<(), String> {
        self.inner.artifact(name, data).await
    }

    async fn finish(&self) -> Result<(), String> {
        self.inner.finish().await
    }
}

fn fail(error: String) -> StageOutcome {
    StageOutcome::Failed { error, exit_code: None }
}

/// What one task (the whole stage, or one `foreach` item) left behind.
struct TaskRun {
    index: Option<usize>,
    outcome: StageOutcome,
    transcript: Vec<OutputLine>,
}

/// The agent and broker shared by a stage's tasks.
struct Prepared<'a> {
    agent: &'a pond_core::agents::ResolvedAgent,
    model_id: String,
    broker_url: String,
    dummy_key: String,
}

impl SwarmExecutor {
    /// Runs one task: a private home with the prompt file, the rendered argv through the shell
    /// executor, its transcript captured.
    async fn run_task(
        &self,
        ctx: &ExecContext<'_>,
        prepared: &Prepared<'_>,
        index: Option<usize>,
        prompt: String,
    ) -> TaskRun {
        let done = |outcome| TaskRun { index, outcome, transcript: Vec::new() };
        let ExecutorSpec::Swarm(spec) = &ctx.stage.executor else { return done(fail("not a swarm stage".into())) };
        // A harness that passes the prompt (with its `foreach` item) as one argument of the
        // agent CLI is bound by Linux's 128 KiB for one argument (the exec would fail with
        // E2BIG): say why instead. On stdin (the presets) it has no such bound.
        if prepared.agent.harness.prompt_in_argv() && prompt.len() > 120 * 1024 {
            return done(fail(format!(
                "the prompt{} is {} bytes, more than one argument of the agent CLI may hold (120 KiB): harness `{}` passes it as an argument; give it `\"stdin\": \"{{prompt}}\"` (as the presets do) or shorten the prompt",
                index.map(|i| format!(" with item {i}")).unwrap_or_default(),
                prompt.len(),
                prepared.agent.harness.key,
            )));
        }
        let home = match tempfile::Builder::new().prefix("agent-home-").tempdir_in(&self.homes) {
            Ok(d) => d,
            Err(e) => return done(fail(format!("creating the agent's home: {e}"))),
        };
        let prompt_file = home.path().join("prompt.txt");
        if let Err(e) = std::fs::write(&prompt_file, &prompt) {
            return done(fail(format!("writing the prompt file: {e}")));
        }
        let values = BTreeMap::from([
            ("model", prepared.model_id.clone()),
            ("prompt", prompt),
            ("prompt_file", prompt_file.to_string_lossy().into_owned()),
            ("broker_url", prepared.broker_url.clone()),
            ("dummy_key", prepared.dummy_key.clone()),
            ("home", home.path().to_string_lossy().into_owned()),
        ]);
        let (argv, env) = prepared.agent.harness.render(&values);
        // What the agent reads on stdin (the prompt, for the presets), from a file in its home.
        let stdin_file = match prepared.agent.harness.render_stdin(&values) {
            Some(text) => {
                let path = home.path().join("stdin.txt");
                if let Err(e) = std::fs::write(&path, text) {
                    return done(fail(format!("writing the agent's stdin: {e}")));
                }
                Some(path)
            }
            None => None,
        };
        let Some(program) = argv.first() else {
            return done(fail(format!("harness `{}` has an empty command", prepared.agent.harness.key)));
        };
        if !installed(program) {
            return done(fail(format!(
                "the agent CLI `{program}` of harness `{}` is not installed here (not an executable file, nor in PATH)",
                prepared.agent.harness.key
            )));
        }
        let mut grants = Grants { paths: cli_grants(program), loopback_ports: Vec::new() };
        grants.paths.push(PathGrant { path: home.path().to_path_buf(), access: PathAccess::Writable });
        grants.loopback_ports.extend(loopback_port(&prepared.broker_url));
        let stage = StageDef {
            executor: ExecutorSpec::Shell(ShellSpec {
                argv,
                env,
                sandbox: spec.sandbox.clone(),
                placement: Placement::Local,
                tags: Vec::new(),
                capabilities: Vec::new(),
                credentials: Vec::new(),
                stdin_file,
            }),
            ..ctx.stage.clone()
        };
        let capture = Capture {
            inner: ctx.output,
            transcript: Mutex::default(),
            budget: pond_core::exec::LogBudget::new(pond_core::engine::DEFAULT_MAX_LOG_BYTES),
            secrets: prepared.agent.real_key.iter().cloned().collect(),
        };
        let inner = ExecContext {
            run: ctx.run,
            stage: &stage,
            attempt: ctx.attempt,
            workspace: ctx.workspace,
            output: &capture,
            stop: ctx.stop,
            items: None,
        };
        let outcome = self.shell.run(inner, grants).await;
        let transcript = std::mem::take(&mut *capture.transcript.lock().unwrap_or_else(|p| p.into_inner()));
        TaskRun { index, outcome, transcript }
    }
}

#[async_trait]
impl Executor for SwarmExecutor {
    fn kind(&self) -> &'static str {
        "swarm"
    }

    async fn execute(&self, ctx: ExecContext<'_>) -> StageOutcome {
        use futures_util::StreamExt as _;
        let ExecutorSpec::Swarm(spec) = &ctx.stage.executor else {
            return fail("not a swarm stage".into());
        };
        if spec.prompt.trim().is_empty() {
            return fail("the prompt is empty".into());
        }
        let agent = match self.resolver.resolve(&spec.harness, spec.model_ref.as_deref(), &ctx.run.project_id).await {
            Ok(a) => a,
            Err(e) => return fail(e),
        };
        let dummy_key = format!("pond-task-{}", hex::encode(pond_core::seal::random_key()));
        let (provider, upstream, model_id) = match &agent.model {
            Some(m) => (
                m.provider.clone(),
                m.base_url.clone().unwrap_or_else(|| default_base_url(&m.provider).to_string()),
                m.model_id.clone(),
            ),
            None => ("openai".to_string(), default_base_url("openai").to_string(), String::new()),
        };
        // The stage's budget, priced at the model's registered prices.
        let limit = match (&spec.budget, &agent.model) {
            (None, _) => None,
            (Some(b), Some(m)) if b.usd.is_some() && (m.input_usd_per_mtok.is_none() || m.output_usd_per_mtok.is_none()) => {
                return fail(format!(
                    "a budget in USD needs the model's prices: `pond admin models add {} … --input-price USD --output-price USD`",
                    m.key
                ))
            }
            (Some(b), model) => Some(pond_core::agents::BrokerLimit {
                tokens: b.tokens,
                usd: b.usd,
                input_usd_per_mtok: model.as_ref().and_then(|m| m.input_usd_per_mtok).unwrap_or(0.0),
                output_usd_per_mtok: model.as_ref().and_then(|m| m.output_usd_per_mtok).unwrap_or(0.0),
            }),
        };
        if ctx.run.definition.budget.is_some_and(|b| b.usd.is_some())
            && agent.model.as_ref().is_some_and(|m| m.input_usd_per_mtok.is_none() || m.output_usd_per_mtok.is_none())
        {
            let key = agent.model.as_ref().map(|m| m.key.as_str()).unwrap_or_default();
            return fail(format!(
                "the run's budget is in USD, which needs the model's prices: `pond admin models add {key} … --input-price USD --output-price USD`"
            ));
        }
        // Where its calls are booked, and the run's and project's budgets they count against.
        let account = self.resolver.account(ctx.run, &ctx.stage.key, ctx.attempt, agent.model.as_ref());
        // A budget in USD (the project's too) needs prices: without them nothing would count.
        if let (Some(account), Some(m)) = (&account, &agent.model) {
            if m.input_usd_per_mtok.is_none() || m.output_usd_per_mtok.is_none() {
                let caps = account.caps().await.unwrap_or_default();
                if let Some(cap) = caps.iter().find(|c| c.budget.usd.is_some()) {
                    return fail(format!(
                        "the {} budget is in USD, which needs the model's prices: `pond admin models add {} … --input-price USD --output-price USD`",
                        cap.scope, m.key
                    ));
                }
            }
        }
        // One broker for the stage's tasks: it holds the key, meters them all, and holds them to
        // the stage's budget together.
        let broker = match &agent.real_key {
            Some(key) => match self.broker.start(&provider, &upstream, key, &dummy_key, limit, account).await {
                Ok(b) => Some(b),
                Err(e) => return fail(format!("starting the broker: {e}")),
            },
            None => None,
        };
        if (spec.budget.is_some() || ctx.run.definition.budget.is_some()) && broker.is_none() {
            return fail(
                "the stage or its run has a budget but its model's key is not held by pond, so its calls could not be metered: register the model's credential for this project".into(),
            );
        }
        let prepared = Prepared {
            agent: &agent,
            model_id,
            broker_url: broker.as_ref().map(|b| b.url()).unwrap_or_default(),
            dummy_key,
        };
        // The tasks: the stage itself, or one per `foreach` item, `concurrency` at a time.
        let (tasks, concurrency): (Vec<(Option<usize>, String)>, usize) = match ctx.items {
            None => (vec![(None, spec.prompt.clone())], 1),
            Some(items) => {
                let concurrency = spec
                    .foreach
                    .as_ref()
                    .and_then(|f| pond_core::agents::Foreach::parse(f, "foreach").ok())
                    .map(|f| f.concurrency())
                    .unwrap_or(1);
                let tasks = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| (Some(i), pond_core::agents::item_prompt(&spec.prompt, item)))
                    .collect();
                (tasks, concurrency)
            }
        };
        let mut runs: Vec<TaskRun> = futures_util::stream::iter(tasks)
            .map(|(index, prompt)| self.run_task(&ctx, &prepared, index, prompt))
            .buffer_unordered(concurrency)
            .collect()
            .await;
        runs.sort_by_key(|r| r.index);

        // Results of every task, in item order; malformed blocks are reported, not fatal.
        let (fence, artifact) = parse_spec(spec.parse.as_ref(), &ctx.stage.key);
        let mut results = Vec::new();
        let mut notes: Vec<OutputLine> = Vec::new();
        for run in &runs {
            // Lines longer than one log record are whole again here, so a long result parses.
            let lines = pond_core::exec::whole_lines(&run.transcript);
            let stdout: Vec<String> = lines
                .iter()
                .filter(|(s, _)| *s == LogStream::Stdout)
                .map(|(_, t)| String::from_utf8_lossy(t).into_owned())
                .collect();
            let (found, problems) = extract_results(&stdout, &fence);
            results.extend(found);
            let task = run.index.map(|i| format!("task {i}: ")).unwrap_or_default();
            notes.extend(problems.into_iter().map(|p| OutputLine::text(LogStream::System, format!("{task}{p}"))));
            let mut log: Vec<u8> = Vec::new();
            for (stream, bytes) in &lines {
                if *stream == LogStream::Stderr {
                    log.extend_from_slice(b"! ");
                }
                log.extend_from_slice(bytes);
                log.push(b'\n');
            }
            let name = match run.index {
                Some(i) => format!("agent-{}-{i}.log", ctx.stage.key),
                None => format!("agent-{}.log", ctx.stage.key),
            };
            let _ = ctx.output.artifact(&name, log).await;
        }
        notes.push(OutputLine::text(
            LogStream::System,
            format!("{} result(s) in {artifact} from {} task(s)", results.len(), runs.len()),
        ));
        let mut jsonl = results.join("\n");
        if !jsonl.is_empty() {
            jsonl.push('\n');
        }
        if let Err(e) = ctx.output.artifact(&artifact, jsonl.into_bytes()).await {
            notes.push(OutputLine::text(LogStream::System, format!("storing {artifact} failed: {e}")));
        }
        if let Some(b) = &broker {
            // An agent may exit as soon as it has what it needs from a response, before the
            // broker has read the rest and booked it: wait for that (a stalled one, briefly).
            let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while b.in_flight() > 0 && std::time::Instant::now() < until {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let (requests, input, output) = b.usage();
            let cost = agent.model.as_ref().map(|m| {
                input as f64 / 1e6 * m.input_usd_per_mtok.unwrap_or(0.0)
                    + output as f64 / 1e6 * m.output_usd_per_mtok.unwrap_or(0.0)
            });
            let usage = serde_json::json!({"requests": requests, "input_tokens": input, "output_tokens": output,
                "cost_usd": cost});
            notes.push(OutputLine::text(
                LogStream::System,
                format!(
                    "usage: {requests} request(s), {input} input and {output} output tokens{}",
                    cost.map(|c| format!(", ${c:.6}")).unwrap_or_default()
                ),
            ));
            let _ = ctx.output.artifact(&format!("usage-{}.json", ctx.stage.key), usage.to_string().into_bytes()).await;
        }
        ctx.output.lines(notes).await;
        // The stage fails if a task did (the first failure is reported, with how many).
        let failures: Vec<&TaskRun> = runs.iter().filter(|r| !matches!(r.outcome, StageOutcome::Succeeded)).collect();
        let outcome = match failures.first() {
            None => StageOutcome::Succeeded,
            Some(first) if runs.len() == 1 => first.outcome.clone(),
            Some(first) => match &first.outcome {
                StageOutcome::Failed { error, exit_code } => StageOutcome::Failed {
                    error: format!(
                        "{} of {} tasks failed; task {}: {error}",
                        failures.len(),
                        runs.len(),
                        first.index.unwrap_or(0)
                    ),
                    exit_code: *exit_code,
                },
                other => other.clone(),
            },
        };
        // The budget ran out: the stage fails for that, whatever the agent made of the call it
        // saw cut off (it may even have exited 0).
        if let Some(why) = broker.as_ref().and_then(|b| b.exhausted()) {
            return StageOutcome::Failed { error: why, exit_code: None };
        }
        // An agent that failed after the model API refused it: say so, not just the exit code.
        match (outcome, broker.as_ref().and_then(|b| b.last_error())) {
            (StageOutcome::Failed { error, exit_code }, Some(status)) => StageOutcome::Failed {
                error: format!("{error}; the model API answered HTTP {status} ({})", api_error_hint(status)),
                exit_code,
            },
            (outcome, _) => outcome,
        }
    }
}

fn api_error_hint(status: u16) -> &'static str {
    match status {
        401 | 403 => "the model's credential was refused",
        404 => "unknown model or endpoint",
        429 => "rate limited",
        500..=599 => "the provider failed",
        _ => "request refused",
    }
}

/// Whether `program` names an executable file, directly or through `PATH`.
/// Where `program` lives: resolved through PATH and symlinks.
fn locate(program: &str) -> Option<std::path::PathBuf> {
    let found = if program.contains('/') {
        Some(std::path::PathBuf::from(program))
    } else {
        std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(program)).find(|p| p.is_file()))
    }?;
    std::fs::canonicalize(found).ok()
}

/// What a confined agent needs to see of its CLI's installation: the directory holding the
/// outermost `node_modules` of an npm install (the CLI's code and its dependencies), else the
/// directory of the program itself. System directories are visible anyway.
fn cli_grants(program: &str) -> Vec<PathGrant> {
    let mut grants = Vec::new();
    let as_given = std::path::Path::new(program);
    for path in [Some(as_given.to_path_buf()).filter(|p| p.is_absolute()), locate(program)].into_iter().flatten() {
        let root = path
            .ancestors()
            .filter(|a| a.file_name().is_some_and(|n| n == "node_modules"))
            .last()
            .and_then(|nm| nm.parent())
            .or_else(|| path.parent())
            .map(|p| p.to_path_buf());
        if let Some(root) = root {
            if !grants.iter().any(|g: &PathGrant| root.starts_with(&g.path)) {
                grants.push(PathGrant { path: root, access: PathAccess::ReadOnly });
            }
        }
    }
    grants
}

/// The port of a broker URL on the host's loopback (`http://127.0.0.1:4100/v1`).
fn loopback_port(url: &str) -> Option<u16> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    matches!(host, "127.0.0.1" | "localhost" | "[::1]").then_some(())?;
    port.parse().ok()
}

fn installed(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &std::path::Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        return executable(std::path::Path::new(program));
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| executable(&dir.join(program))))
        .unwrap_or(false)
}

/// The parse spec: `{"fence": "result", "artifact": "results.jsonl"}`, both optional.
/// The result fence and the results artifact of a stage: `results-<stage>.jsonl` unless the
/// stage's `parse` names another, so two agent stages of a run never want the same name.
fn parse_spec(spec: Option<&serde_json::Value>, stage: &str) -> (String, String) {
    let get = |k: &str, default: &str| {
        spec.and_then(|s| s.get(k)).and_then(|v| v.as_str()).filter(|v| !v.is_empty()).unwrap_or(default).to_string()
    };
    (get("fence", "result"), get("artifact", &format!("results-{stage}.jsonl")))
}
