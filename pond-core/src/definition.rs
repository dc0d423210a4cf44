//! Workflow definitions: what a run carries as its own snapshot, and their validation.
//!
//! A definition is an ordered list of stages. A stage without `needs` depends on the stage
//! before it, so a plain list runs in order; `needs` (even `[]`) makes the dependencies
//! explicit and turns the list into a DAG whose independent stages may run concurrently.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::time::Millis;

/// Longest a definition may be, in stages.
pub const MAX_STAGES: usize = 256;
/// Most attempts a stage may ask for.
pub const MAX_ATTEMPTS: u32 = 20;
/// Timeout used when a stage names none.
pub const DEFAULT_TIMEOUT: Millis = Millis::from_secs(3600);
/// Longest timeout a stage may ask for.
pub const MAX_TIMEOUT: Millis = Millis::from_secs(7 * 24 * 3600);
/// Backoff before the first retry when a stage names none; it doubles on each further retry.
pub const DEFAULT_BACKOFF: Millis = Millis::from_secs(1);
/// Longest wait between two attempts.
pub const MAX_BACKOFF: Millis = Millis::from_secs(600);

/// A workflow: an ordered list of stages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Definition {
    /// The stages, in order.
    pub stages: Vec<StageDef>,
    /// The most the run's agent stages may spend on model calls, all together (each stage's own
    /// `budget` holds as well, and so does its project's monthly budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// One step of a workflow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StageDef {
    /// Unique within the definition: lowercase letters, digits, `-` and `_`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9_-]{1,64}$"))]
    pub key: String,
    /// A human name; the key when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What runs the stage.
    pub executor: ExecutorSpec,
    /// Keys of the stages this one waits for. Absent: the previous stage. `[]`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs: Option<Vec<String>>,
    /// Wall-clock limit of one attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Millis>,
    /// How many attempts before the stage fails (1 = no retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Wait before the first retry; doubles on each further retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Millis>,
    /// A failure of this stage does not fail the run; stages that need it still run.
    #[serde(default, skip_serializing_if = "is_false")]
    pub continue_on_error: bool,
    /// For a pooled stage: what a worker's result that fails verification does. Absent: the
    /// server's default (`required`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationPolicy>,
}

/// What pond does with a pool worker's result that fails verification (a bad signature, an
/// input it did not issue, outputs other than the ones stored).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum AttestationPolicy {
    /// The stage fails, naming why (the default).
    #[default]
    Required,
    /// The result is applied and kept flagged `attestation_verified: false` (an explicit
    /// opt-out, for workers whose results are checked some other way).
    Record,
}

impl AttestationPolicy {
    /// The name as written in a definition.
    pub fn as_str(self) -> &'static str {
        match self {
            AttestationPolicy::Required => "required",
            AttestationPolicy::Record => "record",
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl StageDef {
    /// The display name.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.key)
    }
    /// The effective wall-clock limit of one attempt.
    pub fn effective_timeout(&self) -> Millis {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }
    /// The effective number of attempts.
    pub fn effective_max_attempts(&self) -> u32 {
        self.max_attempts.unwrap_or(1)
    }
    /// Wait before the attempt that follows `failures` failed attempts.
    pub fn backoff_after(&self, failures: u32) -> Millis {
        let base = self.backoff.unwrap_or(DEFAULT_BACKOFF).0;
        let factor = 1u64 << failures.saturating_sub(1).min(20);
        Millis(base.saturating_mul(factor).min(MAX_BACKOFF.0))
    }
}

/// Which executor runs a stage, with its settings. The `kind` field selects the variant.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExecutorSpec {
    /// Does nothing, optionally after a delay.
    Noop(NoopSpec),
    /// A task built into pond.
    Builtin(BuiltinSpec),
    /// A subprocess on the executing host.
    Shell(ShellSpec),
    /// An AI coding agent; runs on a worker pool.
    Swarm(SwarmSpec),
}

impl<'de> Deserialize<'de> for ExecutorSpec {
    // Hand-written so errors inside a variant keep their field path (serde's internally tagged
    // enums lose it); see `crate::json` for how the nested path travels.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let kind = match map.remove("kind") {
            Some(serde_json::Value::String(k)) => k,
            Some(_) => return Err(crate::json::nested_error("kind", "must be a string")),
            None => return Err(D::Error::missing_field("kind")),
        };
        let rest = serde_json::Value::Object(map);
        Ok(match kind.as_str() {
            "noop" => ExecutorSpec::Noop(crate::json::nested(rest)?),
            "builtin" => ExecutorSpec::Builtin(crate::json::nested(rest)?),
            "shell" => ExecutorSpec::Shell(crate::json::nested(rest)?),
            "swarm" => ExecutorSpec::Swarm(crate::json::nested(rest)?),
            other => {
                return Err(crate::json::nested_error(
                    "kind",
                    &format!("unknown executor kind `{other}`, expected one of `noop`, `builtin`, `shell`, `swarm`"),
                ))
            }
        })
    }
}

impl ExecutorSpec {
    /// The credentials the stage asks for.
    pub fn credentials(&self) -> &[String] {
        match self {
            ExecutorSpec::Shell(s) => &s.credentials,
            _ => &[],
        }
    }

    /// The `kind` text.
    pub fn kind(&self) -> &'static str {
        match self {
            ExecutorSpec::Noop(_) => "noop",
            ExecutorSpec::Builtin(_) => "builtin",
            ExecutorSpec::Shell(_) => "shell",
            ExecutorSpec::Swarm(_) => "swarm",
        }
    }
    /// The sandbox a stage asks for, if its executor takes one.
    pub fn sandbox(&self) -> Option<&SandboxSpec> {
        match self {
            ExecutorSpec::Shell(s) => s.sandbox.as_ref(),
            ExecutorSpec::Swarm(s) => s.sandbox.as_ref(),
            ExecutorSpec::Noop(s) => s.sandbox.as_ref(),
            ExecutorSpec::Builtin(_) => None,
        }
    }

    /// For a stage that runs on a worker pool: the tags and capability patterns it asks for.
    /// Swarm stages always run on a pool.
    pub fn pool_request(&self) -> Option<(&[String], &[String])> {
        match self {
            ExecutorSpec::Swarm(s) if s.placement != Some(Placement::Local) => Some((&s.tags, &s.capabilities)),
            ExecutorSpec::Shell(s) if s.placement == Placement::Pool => Some((&s.tags, &s.capabilities)),
            ExecutorSpec::Noop(s) if s.placement == Placement::Pool => Some((&s.tags, &s.capabilities)),
            _ => None,
        }
    }

    /// The kind stores filter claims on: [`POOL_KIND`] for pooled stages, else the executor kind.
    pub fn claim_kind(&self) -> &'static str {
        if self.pool_request().is_some() {
            POOL_KIND
        } else {
            self.kind()
        }
    }
}

/// Settings of the `noop` executor.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NoopSpec {
    /// Wait this long before succeeding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Millis>,
    /// Where the stage runs.
    #[serde(default, skip_serializing_if = "Placement::is_local")]
    pub placement: Placement,
    /// Tags a pool worker must have (subset match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Capabilities a pool worker must have (glob match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Trust tier of the pool that may run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxSpec>,
}

/// Where a stage runs: on the control plane's own driver, or on a worker pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Placement {
    /// On a pond server node.
    #[default]
    Local,
    /// On a worker of an attached pool, chosen by tags, capabilities and tier.
    Pool,
}

impl Placement {
    fn is_local(&self) -> bool {
        *self == Placement::Local
    }
}

/// The claim kind of every pooled stage: stores filter claims on it, so a server's own driver
/// never takes a stage meant for a pool.
pub const POOL_KIND: &str = "pool";

/// Settings of the `builtin` executor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BuiltinSpec {
    /// Which builtin task.
    pub name: BuiltinName,
}

/// The builtin tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum BuiltinName {
    /// Every file with its size and language → `inventory.jsonl`.
    FileInventory,
    /// TODO/FIXME/XXX markers with file and line → `todos.jsonl`.
    TodoScan,
    /// Top-level areas with file counts → `areas.jsonl`.
    RepoMap,
}

/// Settings of the `shell` executor: a program run directly (no implicit shell).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ShellSpec {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment variables with literal values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The sandbox profile (only `none` until a sandbox backend is configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxSpec>,
    /// Where the stage runs.
    #[serde(default, skip_serializing_if = "Placement::is_local")]
    pub placement: Placement,
    /// Tags a pool worker must have (subset match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Capabilities a pool worker must have (glob match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Registered credentials the process gets as environment variables; delivered sealed to
    /// the claiming pool worker only (pooled stages).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<String>,
    /// A file the process reads as stdin (an agent's prompt, set by the swarm executor; never
    /// from a definition). Absent: `/dev/null`.
    #[serde(skip)]
    pub stdin_file: Option<std::path::PathBuf>,
}

/// Settings of the `swarm` (AI agent) executor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SwarmSpec {
    /// Registered harness key (e.g. `codex`).
    pub harness: String,
    /// Registered model key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_ref: Option<String>,
    /// The prompt given to the agent.
    pub prompt: String,
    /// Isolation profile and trust tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxSpec>,
    /// Capabilities a worker must have (glob match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Tags a worker must have (subset match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// How results are extracted from the transcript.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse: Option<serde_json::Value>,
    /// Fan the stage out over the items of an earlier stage's artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreach: Option<serde_json::Value>,
    /// `pool` (default) or `local` (run by the control plane itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// The most the stage's model calls may spend, all its tasks together: when a response
    /// passes it, the broker cuts that response off, refuses further calls, and the stage fails
    /// (`budget exhausted: …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// The longest prompt of an agent stage, in bytes. The presets pass it on stdin; a harness that
/// passes it as one argument is bound at run time by Linux's 128 KiB for one argument.
pub const MAX_PROMPT_BYTES: usize = 1024 * 1024;

/// A spending limit of an agent stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Budget {
    /// US dollars, at the model's registered prices (cache tokens counted as input): more than 0,
    /// at most 1000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // No `maximum` in the schema: a number within a float's precision of the limit reads as the
    // limit, so no server could tell `1000000.0000000001` from it.
    #[cfg_attr(feature = "openapi", schema(exclusive_minimum = 0.0))]
    pub usd: Option<f64>,
    /// Tokens, input (cache included) and output together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 9_223_372_036_854_775_807_i64))]
    pub tokens: Option<u64>,
}

impl Budget {
    /// Checks its limits; errors name the field under `at`.
    pub fn validate(&self, at: &str) -> Result<(), FieldError> {
        if self.usd.is_none() && self.tokens.is_none() {
            return Err(FieldError::new(at, "set `usd`, `tokens` or both"));
        }
        if self.usd.is_some_and(|u| !(u.is_finite() && u > 0.0 && u <= 1_000_000.0)) {
            return Err(FieldError::new(format!("{at}.usd"), "must be more than 0 and at most 1000000"));
        }
        // The API documents counts as int64; a larger budget was kept and shown back as a
        // number no int64 client can read.
        if self.tokens.is_some_and(|t| t == 0 || t > i64::MAX as u64) {
            return Err(FieldError::new(
                format!("{at}.tokens"),
                format!("must be more than 0 and at most {}", i64::MAX),
            ));
        }
        Ok(())
    }
}

/// How a stage is contained and where it may run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxSpec {
    /// Isolation profile.
    #[serde(default)]
    pub profile: SandboxProfile,
    /// Trust tier of the pool that may run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    /// Resource limits of a confined profile; unset fields take the operator's defaults.
    #[serde(default, skip_serializing_if = "SandboxLimits::is_empty")]
    pub limits: SandboxLimits,
}

/// Resource limits of a confined stage. Each is checked against the executing host's
/// ceilings; a request above a ceiling fails the stage (never silently lowered).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxLimits {
    /// Memory (RAM + tmpfs pages written) in MiB; exceeding it is an OOM kill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Most processes and threads at once (a fork bomb stops here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// CPU quota in cores (`0.5` is half a core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Wall-clock limit in seconds; the sandbox is killed when it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Size in MiB of the writable space (workspace copy, home, outputs, /tmp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u64>,
}

impl SandboxLimits {
    fn is_empty(&self) -> bool {
        *self == SandboxLimits::default()
    }

    /// Checks that every set limit is positive and finite; `at` names the field's place.
    pub fn validate(&self, at: &str) -> Result<(), FieldError> {
        let positive = [
            ("memory_mib", self.memory_mib),
            ("pids", self.pids),
            ("timeout_secs", self.timeout_secs),
            ("disk_mib", self.disk_mib),
        ];
        for (name, value) in positive {
            if value == Some(0) {
                return Err(FieldError::new(format!("{at}.{name}"), "must be at least 1"));
            }
        }
        if let Some(cpus) = self.cpus {
            if !(cpus.is_finite() && (0.01..=1024.0).contains(&cpus)) {
                return Err(FieldError::new(format!("{at}.cpus"), "must be a number of cores between 0.01 and 1024"));
            }
        }
        Ok(())
    }
}

/// Isolation profiles (seed 000).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SandboxProfile {
    /// Host process, network open: local development only.
    #[default]
    None,
    /// Read-only checkout, network only to the model API.
    UntrustedCodeRead,
    /// Throwaway writable copy, default-deny egress allowlist.
    UntrustedCodeWrite,
}

impl SandboxProfile {
    /// The profile's name as written in definitions.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxProfile::None => "none",
            SandboxProfile::UntrustedCodeRead => "untrusted-code-read",
            SandboxProfile::UntrustedCodeWrite => "untrusted-code-write",
        }
    }
}

/// Trust tiers: which pool may run a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Tier {
    /// Pond's own pool (`pool:trusted`).
    Trusted,
    /// A bring-your-own host, pinned to the run's tenant.
    Byo,
    /// Any pool.
    Any,
}

/// What the validating side knows about the server it runs on.
#[derive(Clone, Debug, Default)]
pub struct Capabilities {
    /// Executor kinds that can run stages here.
    pub executor_kinds: Vec<String>,
    /// Sandbox profiles a backend can enforce here.
    pub sandbox_profiles: Vec<SandboxProfile>,
    /// Executor kinds pool workers can run (`executor.placement: pool`).
    pub pool_kinds: Vec<String>,
    /// Sandbox profiles pool workers can enforce.
    pub pool_sandbox_profiles: Vec<SandboxProfile>,
    /// Tag prefixes only the operator may use (always [`OPERATOR_TAG_PREFIXES`], plus any the
    /// operator reserves): a stage naming such a tag is refused.
    pub reserved_tag_prefixes: Vec<String>,
}

/// Tag namespaces that belong to the operator: `pool:` (which pool, and its trust) and
/// `tenant:` (whose host). A consumer reaches them only through `sandbox.tier`, which derives
/// them from the run's own project.
pub const OPERATOR_TAG_PREFIXES: &[&str] = &["pool:", "tenant:"];

/// Whether `tag` is a valid tag: `name` or `name:value` of letters, digits and `._-/`.
pub fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/:".contains(&b))
        && !tag.starts_with(':')
}

/// Whether `name` is a valid worker capability (`harness.codex`, `sandbox.oci`).
pub fn valid_capability(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Whether `pattern` is a valid capability pattern: a capability with `*` and `?` wildcards.
/// (`[` is refused so SQL `GLOB` and [`crate::routing::glob_match`] agree.)
pub fn valid_capability_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= 128
        && pattern.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-*?".contains(&b))
}

/// Parses a definition from JSON, naming the failing field on error. `prefix` is the field
/// path of the definition inside the request (e.g. `definition`).
pub fn parse_definition(value: serde_json::Value, prefix: &str) -> Result<Definition, FieldError> {
    crate::json::from_value_at(value, prefix)
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Whether `name` is a valid environment variable name.
pub fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Definition {
    /// The keys each stage waits for, with the implicit "previous stage" made explicit.
    pub fn resolved_needs(&self) -> Vec<Vec<String>> {
        self.stages
            .iter()
            .enumerate()
            .map(|(i, s)| match &s.needs {
                Some(needs) => needs.clone(),
                None if i == 0 => Vec::new(),
                None => vec![self.stages[i - 1].key.clone()],
            })
            .collect()
    }

    /// Checks the definition against pond's rules and what this server can run. Errors name the
    /// field path under `prefix`.
    pub fn validate(&self, prefix: &str, caps: &Capabilities) -> Result<(), FieldError> {
        let stages = &self.stages;
        if stages.is_empty() {
            return Err(FieldError::new(format!("{prefix}.stages"), "must hold at least one stage"));
        }
        if stages.len() > MAX_STAGES {
            return Err(FieldError::new(
                format!("{prefix}.stages"),
                format!("holds {} stages; at most {MAX_STAGES} are allowed", stages.len()),
            ));
        }
        if let Some(budget) = &self.budget {
            budget.validate(&format!("{prefix}.budget"))?;
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, stage) in stages.iter().enumerate() {
            let at = format!("{prefix}.stages[{i}]");
            if !valid_key(&stage.key) {
                return Err(FieldError::new(
                    format!("{at}.key"),
                    format!("`{}` is not a valid key: use 1 to 64 lowercase letters, digits, `-` or `_`", stage.key),
                ));
            }
            if let Some(first) = index.insert(&stage.key, i) {
                return Err(FieldError::new(
                    format!("{at}.key"),
                    format!("duplicate stage key `{}` (also stages[{first}])", stage.key),
                ));
            }
            stage.validate_settings(&at, caps)?;
        }
        let needs = self.resolved_needs();
        for (i, stage_needs) in needs.iter().enumerate() {
            for (j, need) in stage_needs.iter().enumerate() {
                let field = format!("{prefix}.stages[{i}].needs[{j}]");
                if need == &stages[i].key {
                    return Err(FieldError::new(field, "a stage cannot need itself"));
                }
                if !index.contains_key(need.as_str()) {
                    return Err(FieldError::new(field, format!("no stage has the key `{need}`")));
                }
            }
        }
        if let Some(cycle) = find_cycle(stages, &needs, &index) {
            let first = index[cycle[0].as_str()];
            return Err(FieldError::new(
                format!("{prefix}.stages[{first}].needs"),
                format!("cycle in needs: {}", cycle.join(" -> ")),
            ));
        }
        Ok(())
    }
}

impl StageDef {
    fn validate_settings(&self, at: &str, caps: &Capabilities) -> Result<(), FieldError> {
        if let Some(name) = &self.name {
            if name.len() > 200 {
                return Err(FieldError::new(format!("{at}.name"), "longer than 200 bytes"));
            }
        }
        if let Some(timeout) = self.timeout {
            if timeout.0 == 0 || timeout > MAX_TIMEOUT {
                return Err(FieldError::new(
                    format!("{at}.timeout"),
                    format!("must be more than 0 and at most {MAX_TIMEOUT}"),
                ));
            }
        }
        if let Some(n) = self.max_attempts {
            if n == 0 || n > MAX_ATTEMPTS {
                return Err(FieldError::new(format!("{at}.max_attempts"), format!("must be from 1 to {MAX_ATTEMPTS}")));
            }
        }
        if let Some(backoff) = self.backoff {
            if backoff > MAX_BACKOFF {
                return Err(FieldError::new(format!("{at}.backoff"), format!("must be at most {MAX_BACKOFF}")));
            }
        }
        let kind = self.executor.kind();
        if let Some((tags, capabilities)) = self.executor.pool_request() {
            return self.validate_pooled(at, caps, tags, capabilities);
        }
        if !caps.executor_kinds.iter().any(|k| k == kind) {
            let reason = if kind == "swarm" {
                "executor `swarm` runs on a worker pool, and this server has none attached".to_string()
            } else {
                format!("executor `{kind}` is not enabled on this server")
            };
            return Err(FieldError::new(format!("{at}.executor.kind"), reason));
        }
        if let Some(sandbox) = self.executor.sandbox() {
            if !caps.sandbox_profiles.contains(&sandbox.profile) {
                return Err(FieldError::new(
                    format!("{at}.executor.sandbox.profile"),
                    format!(
                        "profile `{}` needs a sandbox backend that can enforce it, and this server has none (refused rather than run unconfined)",
                        sandbox.profile.as_str()
                    ),
                ));
            }
        }
        self.validate_executor(at)
    }

    /// A pooled stage: the kind must be one workers run; tags and capability patterns must be
    /// well formed. The sandbox profile is enforced by the worker (see
    /// [`crate::routing::stage_requirements`]), so the server's own profiles do not apply.
    fn validate_pooled(
        &self,
        at: &str,
        caps: &Capabilities,
        tags: &[String],
        capabilities: &[String],
    ) -> Result<(), FieldError> {
        let kind = self.executor.kind();
        // The executor's own fields first (an empty prompt is named as such).
        self.validate_executor(at)?;
        if let Some(sandbox) = self.executor.sandbox() {
            if !caps.pool_sandbox_profiles.contains(&sandbox.profile) {
                return Err(FieldError::new(
                    format!("{at}.executor.sandbox.profile"),
                    format!(
                        "profile `{}` cannot be enforced by any pool here (refused rather than run unconfined)",
                        sandbox.profile.as_str()
                    ),
                ));
            }
        }
        if !caps.pool_kinds.iter().any(|k| k == kind) {
            let reason = if kind == "swarm" {
                "agent stages (`swarm`) do not run on this server yet: the swarm executor is not built".to_string()
            } else {
                format!("executor `{kind}` cannot run on a worker pool")
            };
            return Err(FieldError::new(format!("{at}.executor.kind"), reason));
        }
        for (i, tag) in tags.iter().enumerate() {
            if !valid_tag(tag) {
                return Err(FieldError::new(
                    format!("{at}.executor.tags[{i}]"),
                    format!("`{tag}` is not a valid tag: use letters, digits and `._-/:` (e.g. `repo:web`)"),
                ));
            }
            let reserved =
                OPERATOR_TAG_PREFIXES.iter().copied().chain(caps.reserved_tag_prefixes.iter().map(String::as_str));
            if let Some(prefix) = reserved.into_iter().find(|p| tag.starts_with(p)) {
                return Err(FieldError::new(
                    format!("{at}.executor.tags[{i}]"),
                    format!(
                        "`{tag}` is under `{prefix}`, a namespace only the operator assigns: choose the pool with `executor.sandbox.tier` (`byo` runs on your own project's hosts)"
                    ),
                ));
            }
        }
        for (i, pattern) in capabilities.iter().enumerate() {
            if !valid_capability_pattern(pattern) {
                return Err(FieldError::new(
                    format!("{at}.executor.capabilities[{i}]"),
                    format!("`{pattern}` is not a valid capability pattern: letters, digits, `._-` and the wildcards `*` `?`"),
                ));
            }
        }
        self.validate_executor(at)
    }

    fn validate_executor(&self, at: &str) -> Result<(), FieldError> {
        if let Some(sandbox) = self.executor.sandbox() {
            sandbox.limits.validate(&format!("{at}.executor.sandbox.limits"))?;
        }
        match &self.executor {
            ExecutorSpec::Shell(shell) => {
                if !shell.credentials.is_empty() && shell.placement != Placement::Pool {
                    return Err(FieldError::new(
                        format!("{at}.executor.credentials"),
                        "credentials are delivered only to pool workers: set `placement: pool`",
                    ));
                }
                if shell.argv.is_empty() || shell.argv[0].is_empty() {
                    return Err(FieldError::new(format!("{at}.executor.argv"), "must name a program"));
                }
                if shell.argv.iter().any(|a| a.contains('\0')) {
                    return Err(FieldError::new(format!("{at}.executor.argv"), "must not contain NUL bytes"));
                }
                for (name, value) in &shell.env {
                    if !valid_env_name(name) || name.starts_with("POND_") {
                        return Err(FieldError::new(
                            format!("{at}.executor.env.{name}"),
                            "not a valid variable name (letters, digits, `_`; `POND_` is reserved)",
                        ));
                    }
                    if value.contains('\0') {
                        return Err(FieldError::new(format!("{at}.executor.env.{name}"), "must not contain NUL bytes"));
                    }
                }
            }
            ExecutorSpec::Swarm(swarm) => {
                if swarm.prompt.trim().is_empty() {
                    return Err(FieldError::new(format!("{at}.executor.prompt"), "must not be empty"));
                }
                // The prompt is one argument of the agent CLI, and Linux takes at most 128 KiB
                // in one argument: refused here rather than failing at exec.
                if swarm.prompt.len() > MAX_PROMPT_BYTES {
                    return Err(FieldError::new(
                        format!("{at}.executor.prompt"),
                        format!(
                            "{} bytes; at most {MAX_PROMPT_BYTES}: put long material in a file of the checkout and point the prompt at it",
                            swarm.prompt.len()
                        ),
                    ));
                }
                if let Some(foreach) = &swarm.foreach {
                    crate::agents::Foreach::parse(foreach, &format!("{at}.executor.foreach"))?;
                }
                if let Some(budget) = &swarm.budget {
                    if swarm.model_ref.is_none() {
                        return Err(FieldError::new(
                            format!("{at}.executor.budget"),
                            "needs `model_ref`: only calls through pond's broker (a registered model) are metered",
                        ));
                    }
                    budget.validate(&format!("{at}.executor.budget"))?;
                }
            }
            ExecutorSpec::Noop(_) | ExecutorSpec::Builtin(_) => {}
        }
        Ok(())
    }
}

/// Returns the keys of one cycle (first key repeated at the end), if any.
fn find_cycle(stages: &[StageDef], needs: &[Vec<String>], index: &HashMap<&str, usize>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        i: usize,
        needs: &[Vec<String>],
        index: &HashMap<&str, usize>,
        marks: &mut [Mark],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        marks[i] = Mark::OnPath;
        path.push(i);
        for need in &needs[i] {
            let j = index[need.as_str()];
            match marks[j] {
                Mark::OnPath => {
                    let start = path.iter().position(|&p| p == j).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(j);
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(j, needs, index, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks[i] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; stages.len()];
    for i in 0..stages.len() {
        if marks[i] == Mark::New {
            let mut path = Vec::new();
            if let Some(cycle) = visit(i, needs, index, &mut marks, &mut path) {
                return Some(cycle.into_iter().map(|k| stages[k].key.clone()).collect());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn caps() -> Capabilities {
        Capabilities {
            executor_kinds: vec!["noop".into(), "builtin".into(), "shell".into()],
            sandbox_profiles: vec![SandboxProfile::None],
            pool_kinds: vec!["noop".into(), "shell".into()],
            pool_sandbox_profiles: vec![SandboxProfile::None],
            reserved_tag_prefixes: vec!["site:".into()],
        }
    }

    /// Parses and validates `definition`; returns `Ok` or "field: reason".
    fn check(definition: serde_json::Value) -> Result<(), String> {
        let def = parse_definition(definition, "definition").map_err(|e| e.to_string())?;
        def.validate("definition", &caps()).map_err(|e| e.to_string())
    }

    #[test]
    fn valid_definitions_pass() {
        check(json!({"stages":[{"key":"a","executor":{"kind":"noop"}}]})).unwrap();
        check(json!({"stages":[
            {"key":"inv","name":"Inventory","executor":{"kind":"builtin","name":"file_inventory"}},
            {"key":"lint","executor":{"kind":"shell","argv":["true"],"env":{"A":"1"}},"needs":[],"timeout":"5m","max_attempts":3,"backoff":2},
            {"key":"end","executor":{"kind":"noop","delay":0.1},"needs":["inv","lint"],"continue_on_error":true}
        ]}))
        .unwrap();
    }

    #[test]
    fn agent_budgets_are_checked_field_by_field() {
        let caps = Capabilities { executor_kinds: vec!["swarm".into()], ..caps() };
        let check = |budget: serde_json::Value| {
            let def = parse_definition(
                json!({"stages":[{"key":"a","executor":{"kind":"swarm","placement":"local","harness":"codex","model_ref":"m","prompt":"x","budget":budget}}]}),
                "definition",
            )
            .map_err(|e| e.to_string())?;
            def.validate("definition", &caps).map_err(|e| e.to_string())
        };
        check(json!({"usd": 0.5, "tokens": 1000})).unwrap();
        let long = parse_definition(
            json!({"stages":[{"key":"a","executor":{"kind":"swarm","placement":"local","harness":"codex","prompt":"x".repeat(MAX_PROMPT_BYTES + 1)}}]}),
            "definition",
        )
        .unwrap();
        let err = long.validate("definition", &caps).unwrap_err().to_string();
        assert!(err.starts_with("definition.stages[0].executor.prompt: 1048577 bytes; at most 1048576"), "{err}");
        check(json!({"tokens": 1})).unwrap();
        let unmetered = parse_definition(
            json!({"stages":[{"key":"a","executor":{"kind":"swarm","placement":"local","harness":"codex","prompt":"x","budget":{"tokens":5}}}]}),
            "definition",
        )
        .unwrap();
        let err = unmetered.validate("definition", &caps).unwrap_err().to_string();
        assert!(err.starts_with("definition.stages[0].executor.budget: needs `model_ref`"), "{err}");
        for (budget, said) in [
            (json!({}), "definition.stages[0].executor.budget: set `usd`, `tokens` or both"),
            (json!({"usd": -1}), "definition.stages[0].executor.budget.usd: must be more than 0"),
            (json!({"usd": 0}), "definition.stages[0].executor.budget.usd: must be more than 0"),
            (json!({"tokens": 0}), "definition.stages[0].executor.budget.tokens: must be more than 0"),
            (json!({"dollars": 1}), "definition.stages[0].executor.budget"),
        ] {
            let err = check(budget.clone()).unwrap_err();
            assert!(err.starts_with(said), "{budget}: {err}");
        }
    }

    #[test]
    fn bad_definitions_name_the_field_and_reason() {
        let cases = [
            (json!({"stages":[]}), "definition.stages: must hold at least one stage"),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"teleport"}}]}),
                "definition.stages[0].executor.kind: unknown executor kind `teleport`",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"noop"}},{"key":"a","executor":{"kind":"noop"}}]}),
                "definition.stages[1].key: duplicate stage key `a`",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"noop"},"needs":["b"]},{"key":"b","executor":{"kind":"noop"},"needs":["a"]}]}),
                "definition.stages[0].needs: cycle in needs: a -> b -> a",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"noop"},"needs":["zz"]}]}),
                "definition.stages[0].needs[0]: no stage has the key `zz`",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"noop"},"needs":["a"]}]}),
                "definition.stages[0].needs[0]: a stage cannot need itself",
            ),
            (
                json!({"stages":[{"key":"A b","executor":{"kind":"noop"}}]}),
                "definition.stages[0].key: `A b` is not a valid key",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"shell","argv":[]}}]}),
                "definition.stages[0].executor.argv: must name a program",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"noop"},"max_attempts":0}]}),
                "definition.stages[0].max_attempts: must be from 1 to 20",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"noop"},"timeout":"soon"}]}),
                "definition.stages[0].timeout: `soon` is not a duration",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"noop"},"exector":1}]}),
                "definition.stages[0].exector: unknown field `exector`",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"builtin","name":"nope"}}]}),
                "definition.stages[0].executor.name: unknown variant `nope`",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"shell","argv":["x"],"sandbox":{"profile":"untrusted-code-write"}}}]}),
                "definition.stages[0].executor.sandbox.profile: profile `untrusted-code-write` needs a sandbox backend",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"swarm","harness":"codex","prompt":"hi"}}]}),
                "definition.stages[0].executor.kind: agent stages (`swarm`) do not run on this server yet",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"noop","placement":"pool","tags":["ok","no spaces"]}}]}),
                "definition.stages[0].executor.tags[1]: `no spaces` is not a valid tag",
            ),
            // Operator namespaces: built in (`pool:`, `tenant:`) and reserved by this operator.
            (
                json!({"stages":[{"key":"a","executor":{"kind":"shell","argv":["x"],"placement":"pool","tags":["pool:byo","tenant:b"]}}]}),
                "definition.stages[0].executor.tags[0]: `pool:byo` is under `pool:`, a namespace only the operator assigns",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"noop","placement":"pool","tags":["repo:x","tenant:b"]}}]}),
                "definition.stages[0].executor.tags[1]: `tenant:b` is under `tenant:`",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"noop","placement":"pool","tags":["site:eu"]}}]}),
                "definition.stages[0].executor.tags[0]: `site:eu` is under `site:`",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"shell","argv":["x"],"placement":"pool","capabilities":["harness.[ab]"]}}]}),
                "definition.stages[0].executor.capabilities[0]: `harness.[ab]` is not a valid capability pattern",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"noop","placement":"cloud"}}]}),
                "definition.stages[0].executor.placement: unknown variant `cloud`",
            ),
            (
                json!({"stages":[{"key":"a","executor":{"kind":"shell","argv":["x"],"env":{"POND_X":"1"}}}]}),
                "definition.stages[0].executor.env.POND_X: not a valid variable name",
            ),
        ];
        for (definition, expected) in cases {
            let got = check(definition.clone()).expect_err(&definition.to_string());
            assert!(got.starts_with(expected), "for {definition}\n got: {got}\nwant: {expected}");
        }
    }

    #[test]
    fn stages_without_needs_follow_the_previous_stage() {
        let def = parse_definition(
            json!({"stages":[{"key":"a","executor":{"kind":"noop"}},{"key":"b","executor":{"kind":"noop"}},{"key":"c","executor":{"kind":"noop"},"needs":[]}]}),
            "definition",
        )
        .unwrap();
        assert_eq!(def.resolved_needs(), vec![vec![], vec!["a".to_string()], vec![]]);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let mut stage: StageDef =
            serde_json::from_value(json!({"key":"a","executor":{"kind":"noop"},"backoff":"2s"})).unwrap();
        assert_eq!(stage.backoff_after(1), Millis(2000));
        assert_eq!(stage.backoff_after(2), Millis(4000));
        assert_eq!(stage.backoff_after(3), Millis(8000));
        stage.backoff = Some(Millis::from_secs(500));
        assert_eq!(stage.backoff_after(5), MAX_BACKOFF);
    }
}
