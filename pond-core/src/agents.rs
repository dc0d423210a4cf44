//! The agent registry: **models** (a provider's model behind a registered credential) and
//! **harnesses** (how to run an agent CLI: an argv template and its environment), with presets
//! for the `codex` and `claude` CLIs that keep them offline-safe and non-interactive, the lint
//! run on every upsert, and the rendering a dry run shows (never a secret value).
//!
//! Placeholders in a template: `{model}` (the model's `model_id`), `{prompt}` (always one whole
//! argv element, never shell-parsed), `{prompt_file}` (a file holding the prompt), and in the
//! environment `{broker_url}` (the local key-swapping broker), `{dummy_key}` (the per-task key
//! the broker accepts) and `{home}` (a private home directory per task).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::definition::valid_env_name;
use crate::error::{FieldError, StoreError};
use crate::store::Store;

const MODEL: &str = "agent_model";
const HARNESS: &str = "agent_harness";

/// Placeholders a template may use.
pub const PLACEHOLDERS: [&str; 6] = ["model", "prompt", "prompt_file", "broker_url", "dummy_key", "home"];

/// A model: which provider, which model id, which credential pays for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Model {
    /// Key stages refer to (`model_ref`).
    pub key: String,
    /// `openai` or `anthropic`.
    pub provider: String,
    /// The provider's model name.
    pub model_id: String,
    /// The registered credential holding the real key.
    pub credential_name: String,
    /// The capability a worker needs to run it (e.g. `harness.codex`).
    pub capability: String,
    /// The provider's API base URL (default: the provider's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Price per million input tokens, USD (for the run's cost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_usd_per_mtok: Option<f64>,
    /// Price per million output tokens, USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_usd_per_mtok: Option<f64>,
}

/// A harness: how to run one agent CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Harness {
    /// Key stages refer to (`harness`).
    pub key: String,
    /// The capability a worker must advertise (e.g. `harness.codex`).
    pub capability: String,
    /// The argv, with placeholders.
    pub command_template: Vec<String>,
    /// Environment variables, values with placeholders.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// What the agent reads on stdin, with placeholders (`{prompt}`); absent: nothing
    /// (`/dev/null`). A prompt on stdin has no argument's size limit and can never be a flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// What an upsert found worth saying without refusing.
pub type Warnings = Vec<String>;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError::new(field, reason)
}

fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 64 && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The `{name}` placeholders in `text`, in order.
fn placeholders(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) => {
                out.push(&after[..end]);
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    out
}

impl Harness {
    /// Checks a harness: refuses what cannot work (`{{…}}` template syntax, an empty command, a
    /// bad variable name), and warns about what may not (unknown placeholders, `{prompt_file}`,
    /// which a remote pool must materialise on the worker).
    pub fn lint(&self) -> Result<Warnings, FieldError> {
        if !valid_key(&self.key) {
            return Err(invalid("key", "use 1 to 64 letters, digits, `-`, `_` or `.`"));
        }
        if self.capability.is_empty() || !crate::definition::valid_capability(&self.capability) {
            return Err(invalid("capability", "a capability such as `harness.codex`"));
        }
        if self.command_template.is_empty() || self.command_template[0].trim().is_empty() {
            return Err(invalid("command_template", "must name a program"));
        }
        let mut warnings = Vec::new();
        for (i, arg) in self.command_template.iter().enumerate() {
            if arg.contains("{{") || arg.contains("}}") {
                return Err(invalid(
                    format!("command_template[{i}]"),
                    "`{{…}}` is not template syntax here: placeholders are `{model}`, `{prompt}`, `{prompt_file}`",
                ));
            }
            for p in placeholders(arg) {
                if !PLACEHOLDERS.contains(&p) {
                    warnings.push(format!("command_template[{i}]: unknown placeholder `{{{p}}}` is passed as is"));
                }
                if p == "prompt" && arg == "{prompt}" && (i == 0 || self.command_template[i - 1] != "--") {
                    warnings.push(format!(
                        "command_template[{i}]: `{{prompt}}` without `--` before it: a prompt that starts with `-` would be read as a flag"
                    ));
                }
                if p == "prompt" && arg != "{prompt}" {
                    warnings.push(format!(
                        "command_template[{i}]: `{{prompt}}` inside a larger argument; it is safest as an argument of its own"
                    ));
                }
            }
            if arg.contains("{prompt_file}") {
                warnings.push(format!(
                    "command_template[{i}]: `{{prompt_file}}` is a path on the machine that runs the agent; on a remote pool the worker writes it"
                ));
            }
        }
        let on_stdin = self.stdin.as_deref().is_some_and(|s| s.contains("{prompt}") || s.contains("{prompt_file}"));
        if !on_stdin && !self.command_template.iter().any(|a| a.contains("{prompt}") || a.contains("{prompt_file}")) {
            warnings.push(
                "command_template: neither `{prompt}` nor `{prompt_file}`, and no `stdin`: the agent gets no prompt"
                    .into(),
            );
        }
        if let Some(stdin) = &self.stdin {
            for p in placeholders(stdin) {
                if !PLACEHOLDERS.contains(&p) {
                    warnings.push(format!("stdin: unknown placeholder `{{{p}}}` is passed as is"));
                }
            }
        }
        for (name, value) in &self.env {
            if !valid_env_name(name) || name.starts_with("POND_") && name != "POND_AGENT_KEY" {
                return Err(invalid(format!("env.{name}"), "not a valid variable name (`POND_` is reserved)"));
            }
            for p in placeholders(value) {
                if !PLACEHOLDERS.contains(&p) {
                    warnings.push(format!("env.{name}: unknown placeholder `{{{p}}}` is passed as is"));
                }
            }
        }
        Ok(warnings)
    }

    /// The argv and environment a task would run with, placeholders filled from `values`.
    pub fn render(&self, values: &BTreeMap<&str, String>) -> (Vec<String>, BTreeMap<String, String>) {
        let argv = self.command_template.iter().map(|a| fill(a, values)).collect();
        let env = self.env.iter().map(|(k, v)| (k.clone(), fill(v, values))).collect();
        (argv, env)
    }

    /// What the task reads on stdin, placeholders filled from `values`.
    pub fn render_stdin(&self, values: &BTreeMap<&str, String>) -> Option<String> {
        self.stdin.as_deref().map(|s| fill(s, values))
    }

    /// Whether the prompt goes into the argv (and so is bound by one argument's size).
    pub fn prompt_in_argv(&self) -> bool {
        self.command_template.iter().any(|a| a.contains("{prompt}"))
    }
}

/// `text` with its placeholders filled from `values`, in one pass: what a value holds (a prompt
/// mentioning `{model}`) is never read as a placeholder, and `{prompt}` stays one argument,
/// never shell-parsed.
fn fill(text: &str, values: &BTreeMap<&str, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('}').map(|end| (&after[..end], end)) {
            Some((name, end)) if values.contains_key(name) => {
                out.push_str(&values[name]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

impl Model {
    /// Checks a model.
    pub fn lint(&self) -> Result<(), FieldError> {
        if !valid_key(&self.key) {
            return Err(invalid("key", "use 1 to 64 letters, digits, `-`, `_` or `.`"));
        }
        if !["openai", "anthropic"].contains(&self.provider.as_str()) {
            return Err(invalid("provider", format!("`{}` is not `openai` or `anthropic`", self.provider)));
        }
        if self.model_id.trim().is_empty() || self.model_id.len() > 200 {
            return Err(invalid("model_id", "must be 1 to 200 characters"));
        }
        if !crate::definition::valid_capability(&self.capability) {
            return Err(invalid("capability", "a capability such as `harness.codex`"));
        }
        if let Some(url) = &self.base_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(invalid("base_url", "must be an http(s) URL"));
            }
        }
        for (field, price) in
            [("input_usd_per_mtok", self.input_usd_per_mtok), ("output_usd_per_mtok", self.output_usd_per_mtok)]
        {
            if price.is_some_and(|p| !(0.0..=1_000_000.0).contains(&p)) {
                return Err(invalid(field, "must be from 0 to 1000000"));
            }
        }
        Ok(())
    }
}

/// The presets: `codex` and `claude`, with the flags that keep each CLI offline-safe (no
/// lookups beyond the broker, no retries that hang) and non-interactive.
pub fn presets() -> Vec<Harness> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let env = |v: &[(&str, &str)]| v.iter().map(|(k, x)| (k.to_string(), x.to_string())).collect();
    vec![
        Harness {
            key: "codex".into(),
            capability: "harness.codex".into(),
            command_template: s(&[
                "codex",
                "exec",
                "--ephemeral",
                "--dangerously-bypass-approvals-and-sandbox",
                "--skip-git-repo-check",
                "-c",
                "model_provider=pond",
                "-c",
                "model_providers.pond.name=pond",
                "-c",
                "model_providers.pond.base_url={broker_url}/v1",
                "-c",
                "model_providers.pond.env_key=POND_AGENT_KEY",
                "-c",
                "model_providers.pond.wire_api=responses",
                "-c",
                "model_providers.pond.request_max_retries=0",
                "-c",
                "model_providers.pond.stream_max_retries=0",
                "--disable",
                "unbounded_connection_retries",
                "-c",
                "analytics.enabled=false",
                "--disable",
                "plugins",
                "-m",
                "{model}",
                // The prompt comes on stdin: any size, never a flag.
                "-",
            ]),
            env: env(&[("CODEX_HOME", "{home}"), ("POND_AGENT_KEY", "{dummy_key}")]),
            stdin: Some("{prompt}".into()),
        },
        Harness {
            key: "claude".into(),
            capability: "harness.claude".into(),
            command_template: s(&[
                "claude",
                "-p",
                "--dangerously-skip-permissions",
                "--no-session-persistence",
                "--model",
                "{model}",
            ]),
            env: env(&[
                ("HOME", "{home}"),
                ("ANTHROPIC_BASE_URL", "{broker_url}"),
                ("ANTHROPIC_API_KEY", "{dummy_key}"),
                ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
                ("CLAUDE_CODE_MAX_RETRIES", "0"),
                ("IS_SANDBOX", "1"),
            ]),
            // The prompt comes on stdin: any size, never a flag.
            stdin: Some("{prompt}".into()),
        },
    ]
}

/// What a task of a harness would run, without running it.
#[derive(Clone, Debug, PartialEq)]
pub struct DryRun {
    /// The exact argv.
    pub argv: Vec<String>,
    /// The names of the environment variables it sets (never their values).
    pub env: Vec<String>,
    /// What it reads on stdin.
    pub stdin: Option<String>,
    /// The lint's warnings.
    pub warnings: Warnings,
}

/// A harness with what it needs for one task: the model and the real key (unsealed only in
/// the process that runs the broker).
pub struct ResolvedAgent {
    /// The harness.
    pub harness: Harness,
    /// The model, if the stage names one.
    pub model: Option<Model>,
    /// The model's real key.
    pub real_key: Option<String>,
}

/// Finds a stage's harness, model and key (the server: from its registry and credentials).
#[async_trait::async_trait]
pub trait AgentResolver: Send + Sync {
    /// Resolves `harness` and `model` for a run of `project` (whose use of the model's key is
    /// checked).
    async fn resolve(&self, harness: &str, model: Option<&str>, project: &str) -> Result<ResolvedAgent, String>;

    /// Where a stage's model calls are booked and which run and project budgets hold them
    /// (none: the calls are metered for the stage only).
    fn account(
        &self,
        _run: &crate::run::Run,
        _stage: &str,
        _attempt: u32,
        _model: Option<&Model>,
    ) -> Option<std::sync::Arc<dyn SpendAccount>> {
        None
    }
}

/// A budget beyond the stage's own that a broker's calls count against, with what it had spent
/// when read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BudgetCap {
    /// Whose budget: `run`, `project acme in 2026-12`.
    pub scope: String,
    /// Its limits.
    pub budget: crate::definition::Budget,
    /// What was spent against it.
    pub spent: crate::usage::Spend,
}

impl BudgetCap {
    /// Why it is spent: it was when read, or spending `more_tokens` and `more_usd` on top
    /// passes it.
    pub fn passed(&self, more_tokens: u64, more_usd: f64) -> Option<String> {
        let tokens = self.spent.tokens().saturating_add(more_tokens);
        if let Some(max) = self.budget.tokens.filter(|max| tokens > *max || self.spent.tokens() >= *max) {
            return Some(format!("{BUDGET_EXHAUSTED} ({}): {tokens} of {max} tokens", self.scope));
        }
        let cost = self.spent.cost_usd + more_usd;
        self.budget
            .usd
            .filter(|max| cost > *max || self.spent.cost_usd >= *max)
            .map(|max| format!("{BUDGET_EXHAUSTED} ({}): ${cost:.6} of ${max:.6}", self.scope))
    }
}

/// A stage's account: the run and project budgets its calls count against, and where each call
/// is booked as it ends. Read before every call and every 0.5 s while a response streams, so
/// what other stages booked counts; the broker adds what its own stage spends beyond what it had
/// booked, streaming responses included (other stages' responses streaming at the same moment
/// may pass a budget together by what they spend until they are booked).
#[async_trait::async_trait]
pub trait SpendAccount: Send + Sync {
    /// The budgets with what they have spent so far.
    async fn caps(&self) -> Result<Vec<BudgetCap>, String>;
    /// Books one finished call; an error says it could not be (the broker then stops).
    async fn book(&self, usage: crate::usage::TokenUsage) -> Result<(), String>;
    /// USD per million input and output tokens (the model's registered prices).
    fn prices(&self) -> (f64, f64);
}

/// A running broker for one task.
pub trait BrokerSession: Send + Sync {
    /// Where the agent reaches it.
    fn url(&self) -> String;
    /// (requests, input tokens, output tokens) so far.
    fn usage(&self) -> (u64, u64, u64);
    /// The last error status the model API answered, if any.
    fn last_error(&self) -> Option<u16> {
        None
    }
    /// Why the broker stopped relaying (its budget ran out), if it did.
    fn exhausted(&self) -> Option<String> {
        None
    }
    /// Calls it is still reading and metering.
    fn in_flight(&self) -> usize {
        0
    }
}

/// How a stage's error starts when its budget ran out: such a failure is not retried (a new
/// attempt would start with the budget whole again).
pub const BUDGET_EXHAUSTED: &str = "budget exhausted";

/// What a broker may let its calls spend, and at what prices.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BrokerLimit {
    /// Tokens, input (cache included) and output together.
    pub tokens: Option<u64>,
    /// US dollars at these prices.
    pub usd: Option<f64>,
    /// USD per million input tokens.
    pub input_usd_per_mtok: f64,
    /// USD per million output tokens.
    pub output_usd_per_mtok: f64,
}

impl BrokerLimit {
    /// Why `input` and `output` tokens pass the limit, if they do.
    pub fn passed(&self, input: u64, output: u64) -> Option<String> {
        let tokens = input + output;
        if let Some(max) = self.tokens.filter(|max| tokens > *max) {
            return Some(format!("{BUDGET_EXHAUSTED}: {tokens} of {max} tokens"));
        }
        let cost = input as f64 / 1e6 * self.input_usd_per_mtok + output as f64 / 1e6 * self.output_usd_per_mtok;
        self.usd.filter(|max| cost > *max).map(|max| format!("{BUDGET_EXHAUSTED}: ${cost:.6} of ${max:.6}"))
    }
}

/// Starts brokers (implemented over HTTP in `pond-http`).
#[async_trait::async_trait]
pub trait KeyBroker: Send + Sync {
    /// A broker in front of `upstream` for `provider` (`openai`, `anthropic`) that swaps
    /// `dummy_key` for `real_key`.
    async fn start(
        &self,
        provider: &str,
        upstream: &str,
        real_key: &str,
        dummy_key: &str,
        limit: Option<BrokerLimit>,
        account: Option<std::sync::Arc<dyn SpendAccount>>,
    ) -> Result<Box<dyn BrokerSession>, String>;
}

/// A provider's own API base URL.
pub fn default_base_url(provider: &str) -> &'static str {
    match provider {
        "anthropic" => "https://api.anthropic.com",
        _ => "https://api.openai.com",
    }
}

/// The fenced blocks named `fence` in a transcript: each block's text, JSON-checked. Returns the
/// compact JSON lines and a note for each malformed block.
pub fn extract_results(transcript: &[String], fence: &str) -> (Vec<String>, Vec<String>) {
    let open = format!("```{fence}");
    let (mut results, mut problems) = (Vec::new(), Vec::new());
    let mut block: Option<Vec<&str>> = None;
    let mut n = 0;
    for line in transcript {
        let trimmed = line.trim();
        match &mut block {
            None if trimmed == open => {
                n += 1;
                block = Some(Vec::new());
            }
            None => {}
            Some(lines) if trimmed == "```" => {
                let text = lines.join("\n");
                match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(value) => results.push(value.to_string()),
                    Err(e) => problems.push(format!("result block {n} is not JSON ({e}); skipped")),
                }
                block = None;
            }
            Some(lines) => lines.push(line),
        }
    }
    if block.is_some() {
        problems.push(format!("result block {n} is not closed; skipped"));
    }
    (results, problems)
}

/// A swarm stage's `foreach`: fan out over the lines of an earlier stage's artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Foreach {
    /// The artifact whose lines (JSON values, e.g. `areas.jsonl`) are the items.
    pub artifact: String,
    /// Tasks at once (default 4, at most 16).
    #[serde(default)]
    pub max_concurrency: Option<usize>,
}

impl Foreach {
    /// Parses and checks a stage's `foreach`; errors name the field under `at`.
    pub fn parse(value: &serde_json::Value, at: &str) -> Result<Foreach, FieldError> {
        let foreach: Foreach = crate::json::from_value_at(value.clone(), at)?;
        if !crate::engine::valid_artifact_name(&foreach.artifact) {
            return Err(invalid(format!("{at}.artifact"), format!("`{}` is not an artifact name", foreach.artifact)));
        }
        if foreach.max_concurrency.is_some_and(|n| n == 0 || n > 16) {
            return Err(invalid(format!("{at}.max_concurrency"), "must be from 1 to 16"));
        }
        Ok(foreach)
    }

    /// Tasks at once.
    pub fn concurrency(&self) -> usize {
        self.max_concurrency.unwrap_or(4)
    }
}

/// Most items one `foreach` fans out over.
pub const MAX_FOREACH_ITEMS: usize = 1000;

/// The items of a `foreach` artifact: its non-empty lines.
pub fn foreach_items(data: &[u8]) -> Result<Vec<String>, String> {
    let text = std::str::from_utf8(data).map_err(|_| "the foreach artifact is not UTF-8 text".to_string())?;
    let items: Vec<String> = text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
    if items.len() > MAX_FOREACH_ITEMS {
        return Err(format!("the foreach artifact has {} items; at most {MAX_FOREACH_ITEMS}", items.len()));
    }
    Ok(items)
}

/// A task's prompt: `{item}` in the prompt is replaced by the item; without it the item is
/// appended.
pub fn item_prompt(prompt: &str, item: &str) -> String {
    if prompt.contains("{item}") {
        prompt.replace("{item}", item)
    } else {
        format!("{prompt}\n\nItem:\n{item}")
    }
}

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A field is wrong.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// Not registered.
    #[error("no {kind} `{key}`")]
    Unknown {
        /// `model` or `harness`.
        kind: &'static str,
        /// The key.
        key: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Models and harnesses over a [`Store`].
pub struct Registry {
    store: Arc<dyn Store>,
    /// Origins (`scheme://host[:port]`) a model's `base_url` may point at besides the
    /// providers' own: the broker sends the real key there, so it is the operator's list.
    model_origins: Vec<String>,
}

/// The origin (`scheme://host[:port]`, lowercase, no path) of an http(s) URL.
pub fn url_origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() || authority.contains('@') || !["http", "https"].contains(&scheme) {
        return None;
    }
    Some(format!("{scheme}://{}", authority.to_ascii_lowercase()))
}

fn to_json<T: Serialize>(v: &T) -> Result<String, RegistryError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()).into())
}

fn from_json<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, RegistryError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()).into())
}

impl Registry {
    /// The registry over `store`; models may point only at the providers' own APIs.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Registry { store, model_origins: Vec::new() }
    }

    /// Also allows these origins for a model's `base_url` (the operator's `--model-origin`).
    pub fn with_model_origins(mut self, origins: Vec<String>) -> Self {
        self.model_origins = origins;
        self
    }

    /// Adds or replaces a model. Its `base_url`, if any, must be on a provider's own origin or
    /// one the operator allowed: an admin token alone cannot send the key elsewhere.
    pub async fn put_model(&self, model: &Model) -> Result<(), RegistryError> {
        model.lint()?;
        if let Some(url) = &model.base_url {
            let origin = url_origin(url).ok_or_else(|| invalid("base_url", "must be an http(s) URL with a host"))?;
            let allowed = ["https://api.openai.com", "https://api.anthropic.com"]
                .iter()
                .map(|o| o.to_string())
                .chain(self.model_origins.iter().filter_map(|o| url_origin(o)))
                .any(|o| o == origin);
            if !allowed {
                return Err(invalid(
                    "base_url",
                    format!("`{origin}` is not an origin this server sends model keys to (the operator allows more with `pond server --model-origin URL`)"),
                )
                .into());
            }
        }
        self.store.put_record(MODEL, &model.key, &to_json(model)?).await?;
        Ok(())
    }

    /// Adds or replaces a harness; returns the lint's warnings.
    pub async fn put_harness(&self, harness: &Harness) -> Result<Warnings, RegistryError> {
        let warnings = harness.lint()?;
        self.store.put_record(HARNESS, &harness.key, &to_json(harness)?).await?;
        Ok(warnings)
    }

    /// A model by key.
    pub async fn model(&self, key: &str) -> Result<Option<Model>, RegistryError> {
        match self.store.get_record(MODEL, key).await? {
            Some(text) if text != "{}" => Ok(Some(from_json(&text)?)),
            _ => Ok(None),
        }
    }

    /// A harness by key.
    pub async fn harness(&self, key: &str) -> Result<Option<Harness>, RegistryError> {
        match self.store.get_record(HARNESS, key).await? {
            Some(text) if text != "{}" => Ok(Some(from_json(&text)?)),
            _ => Ok(None),
        }
    }

    /// Every model.
    pub async fn models(&self) -> Result<Vec<Model>, RegistryError> {
        let mut out = Vec::new();
        for (_, text) in self.store.list_records(MODEL).await? {
            if text != "{}" {
                out.push(from_json(&text)?);
            }
        }
        Ok(out)
    }

    /// Every harness.
    pub async fn harnesses(&self) -> Result<Vec<Harness>, RegistryError> {
        let mut out = Vec::new();
        for (_, text) in self.store.list_records(HARNESS).await? {
            if text != "{}" {
                out.push(from_json(&text)?);
            }
        }
        Ok(out)
    }

    /// Removes a model or harness (`kind`: `model` or `harness`); false when there was none.
    pub async fn remove(&self, kind: &'static str, key: &str) -> Result<bool, RegistryError> {
        let record = if kind == "model" { MODEL } else { HARNESS };
        match self.store.get_record(record, key).await? {
            Some(text) if text != "{}" => {
                self.store.put_record(record, key, "{}").await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// What a task of `harness` with `model` and `prompt` would exec: the argv and the names of
    /// the environment variables (never their values: one of them carries the per-task key).
    pub async fn dry_run(&self, harness: &str, model: Option<&str>, prompt: &str) -> Result<DryRun, RegistryError> {
        let h = self
            .harness(harness)
            .await?
            .ok_or_else(|| RegistryError::Unknown { kind: "harness", key: harness.into() })?;
        let model_id = match model {
            Some(key) => {
                self.model(key)
                    .await?
                    .ok_or_else(|| RegistryError::Unknown { kind: "model", key: key.into() })?
                    .model_id
            }
            None => String::new(),
        };
        let values = BTreeMap::from([
            ("model", model_id),
            ("prompt", prompt.to_string()),
            ("prompt_file", "<task home>/prompt.txt".to_string()),
            ("broker_url", "http://127.0.0.1:<broker-port>".to_string()),
            ("dummy_key", "<per-task dummy key>".to_string()),
            ("home", "<task home>".to_string()),
        ]);
        let (argv, env) = h.render(&values);
        Ok(DryRun { stdin: h.render_stdin(&values), argv, env: env.into_keys().collect(), warnings: h.lint()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn harness(argv: &[&str]) -> Harness {
        Harness {
            key: "h".into(),
            capability: "harness.x".into(),
            command_template: argv.iter().map(|a| a.to_string()).collect(),
            env: BTreeMap::new(),
            stdin: None,
        }
    }

    #[test]
    fn lint_refuses_double_braces_and_warns_about_the_rest() {
        let e = harness(&["tool", "{{prompt}}"]).lint().unwrap_err();
        assert_eq!(e.field, "command_template[1]");
        let w = harness(&["tool", "--x={colour}", "{prompt}"]).lint().unwrap();
        assert!(w.iter().any(|w| w.contains("unknown placeholder `{colour}`")), "{w:?}");
        let w = harness(&["tool", "--file", "{prompt_file}"]).lint().unwrap();
        assert!(w.iter().any(|w| w.contains("remote pool")), "{w:?}");
        let w = harness(&["tool", "-m", "{model}"]).lint().unwrap();
        assert!(w.iter().any(|w| w.contains("no prompt")), "{w:?}");
        assert!(w.iter().all(|w| !w.contains("without `--`")), "{w:?}");
        let w = harness(&["tool", "{prompt}"]).lint().unwrap();
        assert!(w.iter().any(|w| w.contains("without `--` before it")), "{w:?}");
        assert!(harness(&["tool", "--", "{prompt}"]).lint().unwrap().is_empty());
        let on_stdin = Harness { stdin: Some("{prompt}".into()), ..harness(&["tool", "-"]) };
        assert!(on_stdin.lint().unwrap().is_empty(), "a prompt on stdin is a prompt");
        for preset in presets() {
            assert_eq!(preset.lint().unwrap(), Warnings::new(), "{}", preset.key);
        }
    }

    #[test]
    fn result_blocks_become_json_lines_and_bad_ones_are_reported() {
        let transcript: Vec<String> = [
            "thinking...",
            "```result",
            "{\"file\": \"a.rs\",",
            " \"issue\": \"unwrap\"}",
            "```",
            "```result",
            "not json",
            "```",
            "```json",
            "{\"ignored\": true}",
            "```",
            "```result",
            "[1, 2]",
            "```",
            "```result",
            "{\"open\": 1}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (results, problems) = extract_results(&transcript, "result");
        assert_eq!(results, [r#"{"file":"a.rs","issue":"unwrap"}"#, "[1,2]"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("block 2 is not JSON") && problems[1].contains("block 4 is not closed"));
    }

    #[test]
    fn a_prompt_stays_one_argument_whatever_it_holds() {
        let h = harness(&["tool", "-m", "{model}", "{prompt}"]);
        let prompt = "fix it; rm -rf / \"$(whoami)\" {model}";
        let values = BTreeMap::from([("model", "m1".to_string()), ("prompt", prompt.to_string())]);
        let (argv, _) = h.render(&values);
        assert_eq!(argv.len(), 4);
        assert_eq!(argv[2], "m1");
        assert_eq!(argv[3], prompt, "the prompt verbatim, its `{{model}}` not filled");
        let h = Harness { stdin: Some("{prompt}".into()), ..harness(&["tool", "-"]) };
        assert_eq!(h.render_stdin(&values).as_deref(), Some(prompt));
        assert!(!h.prompt_in_argv());
    }
}
