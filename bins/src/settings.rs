//! The config file: one TOML file for `pond server`, `pond orchestrator` and `pond worker`
//! (`--config-file FILE` or `POND_CONFIG_FILE`), a table per command whose keys are the
//! command's long flags:
//!
//! ```toml
//! [server]
//! listen = "0.0.0.0:8420"
//! database-url = "postgres://pond@db/pond"
//! model-origin = ["https://llm.internal"]
//! [worker]
//! orchestrator = "http://orch:8430"
//! capabilities = ["harness.codex"]
//! ```
//!
//! Precedence: a flag on the command line, then its environment variable, then the file, then
//! the default. The file's settings become command-line arguments for the flags neither given
//! nor set in the environment, so clap checks them exactly as it checks flags; an unknown key
//! is an error naming it. `pond server --print-config` shows every setting and where it came from.

use anyhow::{bail, Context as _, Result};
use clap::CommandFactory;

/// The commands the file configures (its tables).
const SECTIONS: [&str; 3] = ["server", "orchestrator", "worker"];
/// Global flags the file may also set in each table (they matter to every long-running command).
const GLOBALS: [&str; 2] = ["ca-cert", "log-format"];

/// `argv` with the config file's settings for the command it runs added, and the flags that
/// came from the file (for `--print-config`).
pub fn apply<C: CommandFactory>(mut argv: Vec<String>) -> Result<(Vec<String>, Vec<String>)> {
    let Some(path) = file_path(&argv) else { return Ok((argv, Vec::new())) };
    // The command is the first argument that names one (a global flag's value never does).
    let commands: Vec<String> = C::command().get_subcommands().map(|c| c.get_name().to_string()).collect();
    let Some(section) = argv.iter().skip(1).find(|a| commands.contains(a)).cloned() else {
        return Ok((argv, Vec::new()));
    };
    if !SECTIONS.contains(&section.as_str()) {
        return Ok((argv, Vec::new()));
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading the config file {path}"))?;
    let table: toml::Table = text.parse().with_context(|| format!("the config file {path} is not TOML"))?;
    for key in table.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            bail!("the config file {path}: `[{key}]` is not one of [server], [orchestrator], [worker]");
        }
    }
    let Some(settings) = table.get(&section) else { return Ok((argv, Vec::new())) };
    let Some(settings) = settings.as_table() else { bail!("the config file {path}: `{section}` must be a table") };
    let command = C::command();
    let sub = command.find_subcommand(&section).context("no such command")?;
    let mut from_file = Vec::new();
    let globals = command.get_arguments().filter(|a| a.get_long().is_some_and(|l| GLOBALS.contains(&l)));
    let settable: Vec<&clap::Arg> =
        sub.get_arguments().chain(globals).filter(|a| !a.get_long().is_some_and(|l| ACTIONS.contains(&l))).collect();
    for (key, value) in settings {
        let Some(arg) = settable.iter().find(|a| a.get_long() == Some(key.as_str())) else {
            bail!("the config file {path}: [{section}] has no setting `{key}` (see `pond {section} --help`)");
        };
        let flag = format!("--{key}");
        let given = argv.iter().any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
        let in_env = arg.get_env().is_some_and(|name| std::env::var_os(name).is_some());
        if given || in_env {
            continue;
        }
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        let takes_value = arg.get_action().takes_values();
        for value in values {
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => bail!(
                    "the config file {path}: [{section}] `{key}` is a {}, not a string, number or boolean",
                    other.type_str()
                ),
            };
            // A switch is `true`/`false` (or the same as a string, as --print-config writes it).
            match (takes_value, text.as_str()) {
                (false, "true") => argv.push(flag.clone()),
                (false, "false") => {}
                (false, _) => bail!("the config file {path}: [{section}] `{key}` is a switch: true or false"),
                // `--flag=value`: a value that starts with `-` stays a value.
                (true, _) => argv.push(format!("{flag}={text}")),
            }
        }
        from_file.push(key.clone());
    }
    Ok((argv, from_file))
}

/// The file named by `--config-file FILE` / `--config-file=FILE`, else `POND_CONFIG_FILE`.
fn file_path(argv: &[String]) -> Option<String> {
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        if arg == "--config-file" {
            return args.next().cloned();
        }
        if let Some(path) = arg.strip_prefix("--config-file=") {
            return Some(path.to_string());
        }
    }
    std::env::var("POND_CONFIG_FILE").ok().filter(|p| !p.is_empty())
}

/// Flags that say what to do this once, not how to run: neither set from the file nor printed.
const ACTIONS: [&str; 5] = ["print-config", "help", "config-file", "check", "json"];

/// Every setting of the command `matches` holds, as TOML, each with where it came from.
pub fn print(section: &str, matches: &clap::ArgMatches, from_file: &[String]) {
    let command = crate::Cli::command();
    let Some(sub) = command.find_subcommand(section) else { return };
    say!("[{section}]");
    let globals = command.get_arguments().filter(|a| a.get_long().is_some_and(|l| GLOBALS.contains(&l)));
    for arg in sub.get_arguments().chain(globals) {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else { continue };
        if ACTIONS.contains(&long) || arg.is_hide_set() {
            continue;
        }
        let Some(raw) = matches.get_raw(id) else { continue };
        let values: Vec<String> = raw.map(|v| v.to_string_lossy().into_owned()).collect();
        let secret = arg.is_hide_env_values_set();
        let shown = |v: &String| if secret { "\"<hidden>\"".to_string() } else { format!("{v:?}") };
        let value = match values.len() {
            0 => continue,
            1 => shown(&values[0]),
            _ => format!("[{}]", values.iter().map(shown).collect::<Vec<_>>().join(", ")),
        };
        let source = match matches.value_source(id) {
            _ if from_file.iter().any(|k| k == long) => "file",
            Some(clap::parser::ValueSource::CommandLine) => "flag",
            Some(clap::parser::ValueSource::EnvVariable) => "env",
            Some(clap::parser::ValueSource::DefaultValue) => "default",
            _ => "?",
        };
        say!("{long} = {value}  # {source}");
    }
}
