//! The `builtin` executor: repository analyses that run inside pond, over the checkout.
//!
//! - `file_inventory`: every file with size and language → `inventory.jsonl`
//! - `todo_scan`: TODO / FIXME / XXX markers with file and line → `todos.jsonl`
//! - `repo_map`: top-level areas with file counts, bytes and languages → `areas.jsonl`
//!
//! `.git` is skipped; binary files (a NUL byte in their first 8 KiB) are listed but not scanned.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::Path;

use async_trait::async_trait;
use pond_core::definition::{BuiltinName, ExecutorSpec};
use pond_core::exec::{ExecContext, Executor};
use pond_core::run::StageOutcome;
use pond_core::store::LogStream;
use serde::Serialize;

/// Runs `builtin` stages.
#[derive(Debug, Default)]
pub struct BuiltinExecutor;

/// One file of the checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileEntry {
    /// Path relative to the checkout, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Language guessed from the name, or `other`.
    pub language: &'static str,
}

/// One marker found by `todo_scan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Todo {
    /// File path.
    pub path: String,
    /// 1-based line.
    pub line: u64,
    /// `TODO`, `FIXME` or `XXX`.
    pub kind: &'static str,
    /// The line, trimmed, at most 300 bytes.
    pub text: String,
}

/// One top-level area found by `repo_map`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Area {
    /// Top-level directory, or `.` for files at the root.
    pub area: String,
    /// Files in it.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// File count per language.
    pub languages: BTreeMap<&'static str, u64>,
}

/// The language of a file, from its name.
pub fn language_of(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    match name {
        "Dockerfile" => return "dockerfile",
        "Makefile" | "makefile" | "GNUmakefile" => return "make",
        _ => {}
    }
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "rs" => "rust",
        "py" | "pyi" => "python",
        "js" | "mjs" | "cjs" | "jsx" => "javascript",
        "ts" | "tsx" | "mts" | "cts" => "typescript",
        "go" => "go",
        "java" => "java",
        "kt" | "kts" => "kotlin",
        "c" | "h" => "c",
        "cc" | "cpp" | "cxx" | "hpp" | "hh" | "hxx" => "cpp",
        "cs" => "csharp",
        "rb" => "ruby",
        "php" => "php",
        "swift" => "swift",
        "scala" => "scala",
        "sh" | "bash" | "zsh" => "shell",
        "sql" => "sql",
        "html" | "htm" => "html",
        "css" | "scss" | "sass" | "less" => "css",
        "md" | "markdown" | "rst" | "txt" => "text",
        "json" => "json",
        "yaml" | "yml" => "yaml",
        "toml" => "toml",
        "xml" => "xml",
        "proto" => "protobuf",
        "lua" => "lua",
        "ex" | "exs" => "elixir",
        "hs" => "haskell",
        "ml" | "mli" => "ocaml",
        "dart" => "dart",
        "r" => "r",
        "vue" => "vue",
        "svelte" => "svelte",
        _ => "other",
    }
}

/// Every regular file under `root` (not following links, skipping `.git`), sorted by path.
pub fn file_inventory(root: &Path) -> std::io::Result<Vec<FileEntry>> {
    let mut out = Vec::new();
    let walker = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| !(e.depth() > 0 && e.file_type().is_dir() && e.file_name() == ".git"));
    for entry in walker {
        let entry = entry.map_err(std::io::Error::other)?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
        let path = rel.to_string_lossy().replace('\\', "/");
        let size = entry.metadata().map_err(std::io::Error::other)?.len();
        out.push(FileEntry { language: language_of(&path), path, size });
    }
    Ok(out)
}

fn is_binary(path: &Path) -> std::io::Result<bool> {
    let mut head = [0u8; 8192];
    let mut file = std::fs::File::open(path)?;
    let n = file.read(&mut head)?;
    Ok(head[..n].contains(&0))
}

fn marker_in(line: &str) -> Option<&'static str> {
    for kind in ["TODO", "FIXME", "XXX"] {
        let mut from = 0;
        while let Some(pos) = line[from..].find(kind) {
            let start = from + pos;
            let end = start + kind.len();
            let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
            let before_ok = line[..start].chars().next_back().is_none_or(|c| !word_char(c));
            let after_ok = line[end..].chars().next().is_none_or(|c| !word_char(c));
            if before_ok && after_ok {
                return Some(kind);
            }
            from = end;
        }
    }
    None
}

/// TODO / FIXME / XXX markers (as whole words) in the text files under `root`.
pub fn todo_scan(root: &Path) -> std::io::Result<Vec<Todo>> {
    let mut out = Vec::new();
    for file in file_inventory(root)? {
        let path = root.join(&file.path);
        if file.size > 8 * 1024 * 1024 || is_binary(&path)? {
            continue;
        }
        let reader = std::io::BufReader::new(std::fs::File::open(&path)?);
        for (i, line) in reader.split(b'\n').enumerate() {
            let line = line?;
            let line = String::from_utf8_lossy(&line);
            if let Some(kind) = marker_in(&line) {
                let mut text = line.trim().to_string();
                if text.len() > 300 {
                    let mut cut = 300;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                }
                out.push(Todo { path: file.path.clone(), line: i as u64 + 1, kind, text });
            }
        }
    }
    Ok(out)
}

/// Top-level areas of the checkout.
pub fn repo_map(root: &Path) -> std::io::Result<Vec<Area>> {
    let mut areas: BTreeMap<String, Area> = BTreeMap::new();
    for file in file_inventory(root)? {
        let name = match file.path.split_once('/') {
            Some((top, _)) => top.to_string(),
            None => ".".to_string(),
        };
        let area = areas.entry(name.clone()).or_insert_with(|| Area {
            area: name,
            files: 0,
            bytes: 0,
            languages: BTreeMap::new(),
        });
        area.files += 1;
        area.bytes += file.size;
        *area.languages.entry(file.language).or_default() += 1;
    }
    Ok(areas.into_values().collect())
}

fn jsonl<T: Serialize>(items: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        // Serializing these plain structs cannot fail.
        if let Ok(line) = serde_json::to_vec(item) {
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
    }
    out
}

#[async_trait]
impl Executor for BuiltinExecutor {
    fn kind(&self) -> &'static str {
        "builtin"
    }

    async fn execute(&self, ctx: ExecContext<'_>) -> StageOutcome {
        let ExecutorSpec::Builtin(spec) = &ctx.stage.executor else {
            return StageOutcome::Failed { error: "not a builtin stage".into(), exit_code: None };
        };
        let root = ctx.workspace.cwd.clone();
        let name = spec.name;
        let work = tokio::task::spawn_blocking(move || -> std::io::Result<(String, String, Vec<u8>)> {
            Ok(match name {
                BuiltinName::FileInventory => {
                    let files = file_inventory(&root)?;
                    let bytes: u64 = files.iter().map(|f| f.size).sum();
                    (
                        format!("inventory: {} files, {bytes} bytes", files.len()),
                        "inventory.jsonl".into(),
                        jsonl(&files),
                    )
                }
                BuiltinName::TodoScan => {
                    let todos = todo_scan(&root)?;
                    (format!("todo_scan: {} markers", todos.len()), "todos.jsonl".into(), jsonl(&todos))
                }
                BuiltinName::RepoMap => {
                    let areas = repo_map(&root)?;
                    (format!("repo_map: {} areas", areas.len()), "areas.jsonl".into(), jsonl(&areas))
                }
            })
        });
        let result = tokio::select! {
            r = work => r,
            _ = ctx.stop.stopped() => return StageOutcome::Cancelled,
        };
        match result {
            Ok(Ok((summary, artifact, data))) => {
                ctx.output.lines(vec![pond_core::exec::OutputLine::text(LogStream::Stdout, summary)]).await;
                match ctx.output.artifact(&artifact, data).await {
                    Ok(()) => StageOutcome::Succeeded,
                    Err(e) => StageOutcome::Failed { error: format!("storing {artifact}: {e}"), exit_code: None },
                }
            }
            Ok(Err(e)) => StageOutcome::Failed { error: format!("reading the checkout: {e}"), exit_code: None },
            Err(e) => StageOutcome::Failed { error: format!("builtin task stopped: {e}"), exit_code: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_whole_words() {
        let cases = [
            ("// TODO: fix", Some("TODO")),
            ("# FIXME later", Some("FIXME")),
            ("XXX", Some("XXX")),
            ("let TODOS = 1;", None),
            ("my_TODO", None),
            ("nothing here", None),
            ("/* todo lower */", None),
        ];
        for (line, want) in cases {
            assert_eq!(marker_in(line), want, "{line}");
        }
    }

    #[test]
    fn analyses_read_a_real_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("src/inner")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::write(root.join(".git/config"), "TODO hidden").unwrap();
        std::fs::write(root.join("README.md"), "hello\n").unwrap();
        std::fs::write(root.join("src/main.rs"), "fn main() {}\n// TODO: error handling\n").unwrap();
        std::fs::write(root.join("src/inner/x.py"), "x = 1  # FIXME\n").unwrap();
        std::fs::write(root.join("src/blob.bin"), b"\0TODO\0").unwrap();
        let files = file_inventory(root).unwrap();
        let paths: Vec<_> = files.iter().map(|f| (f.path.as_str(), f.language)).collect();
        assert_eq!(
            paths,
            vec![
                ("README.md", "text"),
                ("src/blob.bin", "other"),
                ("src/inner/x.py", "python"),
                ("src/main.rs", "rust")
            ]
        );
        let todos = todo_scan(root).unwrap();
        let found: Vec<_> = todos.iter().map(|t| (t.path.as_str(), t.line, t.kind)).collect();
        assert_eq!(found, vec![("src/inner/x.py", 1, "FIXME"), ("src/main.rs", 2, "TODO")]);
        let areas = repo_map(root).unwrap();
        assert_eq!(areas.len(), 2);
        assert_eq!((areas[0].area.as_str(), areas[0].files), (".", 1));
        assert_eq!((areas[1].area.as_str(), areas[1].files, areas[1].languages["rust"]), ("src", 3, 1));
    }
}
