//! Sources: what a run's stages work on. A run's checkout is fetched per node on first use and
//! removed when the run ends; what was fetched (commit, `input_sha`) is recorded on the run so
//! every later fetch, on any node, gets the same tree.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::ids::BlobId;

/// A source of a run, as submitted plus what fetching it resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// Name of the source within the run; also its directory name in the checkout.
    pub label: String,
    /// Where it comes from.
    #[serde(flatten)]
    pub spec: SourceSpec,
    /// What the first fetch found; later fetches reproduce it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<ResolvedSource>,
}

/// Where a source comes from. Serialized as `{"kind": …, "config": {…}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "config", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SourceSpec {
    /// A git repository over HTTPS.
    GitHttps {
        /// Clone URL.
        url: String,
        /// Branch, tag or commit; the remote's default branch when absent.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        git_ref: Option<String>,
    },
    /// A directory on the pond host (allowed by the operator per root directory).
    Local {
        /// Absolute path.
        #[cfg_attr(feature = "openapi", schema(value_type = String))]
        path: PathBuf,
    },
    /// An uploaded `tar.zst` archive.
    Bundle {
        /// The id `POST /v1/bundles` returned.
        bundle_id: BlobId,
    },
}

/// What fetching a source found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResolvedSource {
    /// For git: the commit checked out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// SHA-256 over the checkout's tree (see `pond_exec::tree_digest`), hex.
    pub input_sha: String,
}

/// The operator's rules for sources.
#[derive(Clone, Debug, Default)]
pub struct SourcePolicy {
    /// Directories under which `local` sources may point; empty: `local` is disabled.
    pub local_roots: Vec<PathBuf>,
    /// Allow `http://` git URLs (test setups, private networks). Off by default.
    pub allow_plain_http_git: bool,
}

/// A submitted source before validation.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SourceInput {
    /// See [`Source::label`].
    #[serde(default)]
    pub label: Option<String>,
    /// `git_https`, `local` or `bundle`.
    pub kind: String,
    /// Kind-specific settings.
    #[serde(default)]
    pub config: serde_json::Value,
}

impl SourceInput {
    /// Validates the input at `field` (e.g. `sources[0]`) against the operator's policy.
    pub fn validate(self, field: &str, policy: &SourcePolicy) -> Result<Source, FieldError> {
        let label = self.label.unwrap_or_else(|| "repo".to_string());
        let label_ok = !label.is_empty()
            && label.len() <= 64
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !label.starts_with('.');
        if !label_ok {
            return Err(FieldError::new(
                format!("{field}.label"),
                format!("`{label}` is not a valid label: use 1 to 64 letters, digits, `-`, `_` or `.`"),
            ));
        }
        let spec = match self.kind.as_str() {
            "git_https" => {
                let c: GitConfig = parse_config(self.config, field)?;
                SourceSpec::GitHttps { url: c.url, git_ref: c.git_ref }
            }
            "local" => SourceSpec::Local { path: parse_config::<LocalConfig>(self.config, field)?.path },
            "bundle" => SourceSpec::Bundle { bundle_id: parse_config::<BundleConfig>(self.config, field)?.bundle_id },
            other => {
                return Err(FieldError::new(
                    format!("{field}.kind"),
                    format!("unknown source kind `{other}`, expected one of `git_https`, `local`, `bundle`"),
                ))
            }
        };
        match &spec {
            SourceSpec::GitHttps { url, git_ref } => {
                check_git_url(url, policy).map_err(|r| FieldError::new(format!("{field}.config.url"), r))?;
                if let Some(r) = git_ref {
                    let ok = !r.is_empty()
                        && !r.starts_with('-')
                        && r.len() <= 255
                        && !r.contains("..")
                        && r.bytes().all(|b| b.is_ascii_graphic() && !b"~^:?*[\\".contains(&b));
                    if !ok {
                        return Err(FieldError::new(
                            format!("{field}.config.ref"),
                            format!("`{r}` is not a valid git ref"),
                        ));
                    }
                }
            }
            SourceSpec::Local { path } => {
                check_local_path(path, policy).map_err(|r| FieldError::new(format!("{field}.config.path"), r))?
            }
            SourceSpec::Bundle { .. } => {}
        }
        Ok(Source { label, spec, resolved: None })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GitConfig {
    url: String,
    #[serde(rename = "ref", default)]
    git_ref: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalConfig {
    path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleConfig {
    bundle_id: BlobId,
}

fn parse_config<T: serde::de::DeserializeOwned>(config: serde_json::Value, field: &str) -> Result<T, FieldError> {
    crate::json::from_value_at(config, &format!("{field}.config"))
}

fn check_git_url(url: &str, policy: &SourcePolicy) -> Result<(), String> {
    if url.starts_with("http://") && !policy.allow_plain_http_git {
        return Err(format!("`{url}` is not an https URL (plain http is disabled on this server)"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the URL contains whitespace or control characters".into());
    }
    git_remote(url).map(|_| ())
}

/// The host (lowercase; an IPv6 literal in brackets) and port of a git remote URL, accepted only
/// in a plain form every URL parser reads alike: `https://` or `http://`, no credentials, no
/// `\`, a host of DNS labels (letters, digits, `-`) without a trailing dot or an IP literal,
/// a numeric port. Pond checks and pins the address of this host before git connects; a URL
/// that git's parser could read as another host is refused rather than guessed at.
pub fn git_remote(url: &str) -> Result<(String, u16), String> {
    let (rest, default_port) = if let Some(rest) = url.strip_prefix("https://") {
        (rest, 443)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (rest, 80)
    } else {
        return Err(format!("`{url}` is not an https URL"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    if authority.contains('@') {
        return Err("credentials in the URL are not accepted; register a credential instead".into());
    }
    if authority.contains('\\') || url.split(['?', '#']).next().unwrap_or("").contains('\\') {
        return Err(format!("`{url}`: `\\` is not accepted in a git URL"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (inside, after) = v6.split_once(']').ok_or_else(|| format!("`{url}`: unclosed `[` in the host"))?;
        inside.parse::<std::net::Ipv6Addr>().map_err(|_| format!("`{url}`: `[{inside}]` is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| format!("`{url}`: unexpected `{p}` after the host"))?),
        };
        (format!("[{}]", inside.to_ascii_lowercase()), port)
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(format!(
                "`{url}`: the host must be a plain DNS name (letters, digits, `-`, dots between labels, no trailing dot) or an IP address"
            ));
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u16>().map_err(|_| format!("`{url}`: port `{p}` is out of range"))?
        }
        Some(p) => return Err(format!("`{url}`: port `{p}` is not a number")),
        None => default_port,
    };
    Ok((host, port))
}

fn check_local_path(path: &Path, policy: &SourcePolicy) -> Result<(), String> {
    if policy.local_roots.is_empty() {
        return Err("local sources are disabled on this server (the operator enables them per directory with --allow-local-source)".into());
    }
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("`{}` must be an absolute path without `..`", path.display()));
    }
    if !policy.local_roots.iter().any(|root| path.starts_with(root)) {
        return Err(format!("`{}` is outside the directories the operator allowed", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(input: serde_json::Value) -> Result<Source, String> {
        let policy = SourcePolicy { local_roots: vec!["/srv/repos".into()], allow_plain_http_git: false };
        let input: SourceInput = serde_json::from_value(input).map_err(|e| e.to_string())?;
        input.validate("sources[0]", &policy).map_err(|e| e.to_string())
    }

    #[test]
    fn sources_are_validated_field_by_field() {
        let ok =
            check(json!({"label":"repo","kind":"git_https","config":{"url":"https://example.com/a.git","ref":"main"}}))
                .unwrap();
        assert!(matches!(ok.spec, SourceSpec::GitHttps { .. }));
        check(json!({"kind":"local","config":{"path":"/srv/repos/x"}})).unwrap();
        let cases = [
            (
                json!({"kind":"git_https","config":{"url":"ftp://x/y"}}),
                "sources[0].config.url: `ftp://x/y` is not an https URL",
            ),
            (
                json!({"kind":"git_https","config":{"url":"http://x/y"}}),
                "sources[0].config.url: `http://x/y` is not an https URL (plain http",
            ),
            (json!({"kind":"git_https","config":{"url":"https://u:p@x/y"}}), "sources[0].config.url: credentials"),
            (json!({"kind":"git_https","config":{"url":"https://example.com./y"}}), "no trailing dot"),
            (json!({"kind":"git_https","config":{"url":"https://exa%6dple.com/y"}}), "plain DNS name"),
            (
                json!({"kind":"git_https","config":{"url":"https://good.com\\@evil.com/y"}}),
                "sources[0].config.url: credentials",
            ),
            (json!({"kind":"git_https","config":{"url":"https://good.com\\.evil.com/y"}}), "`\\` is not accepted"),
            (json!({"kind":"git_https","config":{"url":"https://example.com:443x/y"}}), "is not a number"),
            (json!({"kind":"git_https","config":{"url":"https://[::1/y"}}), "unclosed"),
            (
                json!({"kind":"git_https","config":{"url":"https://x/y","ref":"--upload-pack=evil"}}),
                "sources[0].config.ref",
            ),
            (json!({"kind":"git_https","config":{}}), "sources[0].config.url: is required"),
            (json!({"kind":"svn","config":{}}), "sources[0].kind: unknown source kind `svn`"),
            (json!({"kind":"local","config":{"path":"/etc"}}), "sources[0].config.path: `/etc` is outside"),
            (json!({"kind":"local","config":{"path":"/srv/repos/../../etc"}}), "sources[0].config.path"),
            (json!({"kind":"bundle","config":{"bundle_id":"nope"}}), "sources[0].config.bundle_id"),
            (json!({"label":"../x","kind":"bundle","config":{}}), "sources[0].label"),
        ];
        for (input, expected) in cases {
            let err = check(input.clone()).expect_err(&input.to_string());
            assert!(
                err.starts_with(expected) || (err.starts_with("sources[0].config.url: ") && err.contains(expected)),
                "for {input}\n got: {err}\nwant: {expected}"
            );
        }
    }
}
