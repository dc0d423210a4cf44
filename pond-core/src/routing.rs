//! Placement: which worker may run which job. Two axes (seed 000): **tags**, matched as a
//! subset (`pool:trusted`, `tenant:acme`, `repo:x`), and **capabilities**, matched by glob
//! (`harness.*` matches `harness.codex`). Trust tiers add required tags, so routing stays one
//! rule: a worker may take a job only if it has every required tag and, for each required
//! capability pattern, some capability that matches it. Fail closed: nothing widens a job's
//! requirements into a looser match.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::definition::{ExecutorSpec, SandboxProfile, SandboxSpec, Tier};

/// The capability a worker advertises when its OCI sandbox backend passed its self-check; a
/// pooled stage asking for a confined profile requires it, so it never runs unconfined.
pub const SANDBOX_CAPABILITY: &str = "sandbox.oci";

/// What a job requires of the worker that runs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Requirements {
    /// Tags the worker must all have.
    pub tags: BTreeSet<String>,
    /// Capability patterns; each must match one of the worker's capabilities.
    pub capabilities: Vec<String>,
}

/// What a worker offers. Its tags are the ones pinned by the operator at enrollment, never
/// the ones a claim request states.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerOffer {
    /// Tags.
    pub tags: BTreeSet<String>,
    /// Capabilities (plain names such as `harness.codex`, `sandbox.oci`).
    pub capabilities: Vec<String>,
}

/// The tier a stage runs under: its explicit `tier`, else `trusted` for the untrusted-code
/// profiles (agent code never lands on a BYO host by accident) and `any` otherwise.
pub fn effective_tier(sandbox: Option<&SandboxSpec>) -> Tier {
    match sandbox {
        Some(SandboxSpec { tier: Some(tier), .. }) => *tier,
        Some(SandboxSpec {
            profile: SandboxProfile::UntrustedCodeRead | SandboxProfile::UntrustedCodeWrite, ..
        }) => Tier::Trusted,
        _ => Tier::Any,
    }
}

/// The requirements of a job of `project_id` with the stage's own `tags` and `capabilities`
/// under `tier`: `trusted` adds `pool:trusted`; `byo` adds `pool:byo` and `tenant:<project>`.
pub fn requirements(project_id: &str, tier: Tier, tags: &[String], capabilities: &[String]) -> Requirements {
    let mut required: BTreeSet<String> = tags.iter().cloned().collect();
    match tier {
        Tier::Trusted => {
            required.insert("pool:trusted".into());
        }
        Tier::Byo => {
            required.insert("pool:byo".into());
            required.insert(tenant_tag(project_id));
        }
        Tier::Any => {}
    }
    Requirements { tags: required, capabilities: capabilities.to_vec() }
}

/// The requirements of a pooled stage of `project_id` (`None` for a stage that runs on the
/// control plane): its tags and capabilities, its tier's tags, and [`SANDBOX_CAPABILITY`] when
/// it asks for a confined profile.
pub fn stage_requirements(project_id: &str, executor: &ExecutorSpec) -> Option<Requirements> {
    let (tags, capabilities) = executor.pool_request()?;
    let sandbox = executor.sandbox();
    let mut required = requirements(project_id, effective_tier(sandbox), tags, capabilities);
    if sandbox.is_some_and(|s| s.profile != SandboxProfile::None) {
        required.capabilities.push(SANDBOX_CAPABILITY.to_string());
    }
    Some(required)
}

/// The tag of bring-your-own workers: such a worker runs only jobs that ask for it (the `byo`
/// tier, which also pins the tenant), never another tenant's general work.
pub const BYO_TAG: &str = "pool:byo";

/// The tag that pins a host to one tenant (project).
pub fn tenant_tag(project_id: &str) -> String {
    format!("tenant:{project_id}")
}

/// Whether `worker` may run a job of `project_id` with `required`.
///
/// The tenant rule does not trust `required` alone: a bring-your-own host (`pool:byo`) takes a
/// job only if the job asks for `pool:byo` **and** the host is pinned to the job's own project
/// (`tenant:<project_id>`), whatever tags the job carries. The stores' claim statements and the
/// worker itself (before it runs anything) apply the same rule.
pub fn admits(required: &Requirements, project_id: &str, worker: &WorkerOffer) -> bool {
    admits_some_project(required, worker)
        && (!worker.tags.contains(BYO_TAG) || worker.tags.contains(&tenant_tag(project_id)))
}

/// Whether `worker` may run some job with `required`, whatever its project: [`admits`] without
/// the check of the run's own project against a bring-your-own host's tenant tag. Stores use it
/// to pick which kinds of queued work (same requirements) a worker's claim walks at all; the
/// claim statement still applies the whole rule to every row it takes.
pub fn admits_some_project(required: &Requirements, worker: &WorkerOffer) -> bool {
    let byo_ok = !worker.tags.contains(BYO_TAG) || required.tags.contains(BYO_TAG);
    byo_ok
        && required.tags.is_subset(&worker.tags)
        && required.capabilities.iter().all(|pattern| worker.capabilities.iter().any(|c| glob_match(pattern, c)))
}

/// Glob match over the whole text: `*` matches any run of characters (including none), `?`
/// exactly one; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and how much of the text it has swallowed so far.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tags: &[&str]) -> BTreeSet<String> {
        tags.iter().map(|t| t.to_string()).collect()
    }

    fn offer(tags: &[&str], caps: &[&str]) -> WorkerOffer {
        WorkerOffer { tags: set(tags), capabilities: caps.iter().map(|c| c.to_string()).collect() }
    }

    #[test]
    fn globs_match_whole_names() {
        let cases = [
            ("harness.*", "harness.codex", true),
            ("harness.*", "harness.", true),
            ("harness.*", "harnesses.codex", false),
            ("harness.codex", "harness.codex", true),
            ("harness.codex", "harness.codex2", false),
            ("*", "", true),
            ("*.oci", "sandbox.oci", true),
            ("sandbox.?ci", "sandbox.oci", true),
            ("sandbox.?ci", "sandbox.ci", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("", "x", false),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(glob_match(pattern, text), want, "{pattern} vs {text}");
        }
    }

    #[test]
    fn placement_table() {
        let trusted_codex = offer(&["pool:trusted"], &["harness.codex", "sandbox.oci"]);
        let byo_acme = offer(&["pool:byo", "tenant:acme"], &["harness.claude"]);
        let byo_globex = offer(&["pool:byo", "tenant:globex"], &["harness.claude", "harness.codex"]);
        let untagged = offer(&[], &["harness.codex"]);
        // Requirements a stage's row could carry if someone other than `requirements` wrote
        // them (an old row, a hand-edited database): tags naming another tenant.
        let forged = |tags: &[&str]| Requirements { tags: set(tags), capabilities: Vec::new() };
        let cases: Vec<(&str, Requirements, &WorkerOffer, bool)> = vec![
            ("any tier, no needs: anyone", requirements("acme", Tier::Any, &[], &[]), &untagged, true),
            ("trusted needs pool:trusted", requirements("acme", Tier::Trusted, &[], &[]), &untagged, false),
            (
                "trusted on the trusted pool",
                requirements("acme", Tier::Trusted, &[], &["harness.*".into()]),
                &trusted_codex,
                true,
            ),
            ("trusted never on byo", requirements("acme", Tier::Trusted, &[], &[]), &byo_acme, false),
            (
                "byo to its own tenant",
                requirements("acme", Tier::Byo, &[], &["harness.claude".into()]),
                &byo_acme,
                true,
            ),
            ("byo never to another tenant", requirements("acme", Tier::Byo, &[], &[]), &byo_globex, false),
            ("byo never to the trusted pool", requirements("acme", Tier::Byo, &[], &[]), &trusted_codex, false),
            ("a byo host takes no general work", requirements("acme", Tier::Any, &[], &[]), &byo_acme, false),
            ("general work goes to general workers", requirements("acme", Tier::Any, &[], &[]), &untagged, true),
            ("capability missing", requirements("acme", Tier::Byo, &[], &["sandbox.oci".into()]), &byo_acme, false),
            (
                "every capability must match",
                requirements("x", Tier::Any, &[], &["harness.codex".into(), "sandbox.*".into()]),
                &trusted_codex,
                true,
            ),
            (
                "extra stage tags are required too",
                requirements("x", Tier::Trusted, &["repo:widgets".into()], &[]),
                &trusted_codex,
                false,
            ),
        ];
        for (what, req, worker, want) in cases {
            assert_eq!(admits(&req, "acme", worker), want, "{what}: {req:?} vs {worker:?}");
        }
        // A job of project acme never reaches globex's host, whatever tags it carries.
        for tags in [&["pool:byo", "tenant:globex"][..], &["pool:byo"], &["tenant:globex"], &[]] {
            assert!(!admits(&forged(tags), "acme", &byo_globex), "{tags:?}");
        }
        assert!(admits(&forged(&["pool:byo"]), "globex", &byo_globex));
        assert!(!admits(&forged(&["tenant:globex"]), "globex", &byo_globex), "a byo host takes only byo work");
    }

    /// Every tier × project × kind of host, against the rule as the README states it.
    #[test]
    fn tenant_rule_over_every_tier_and_host() {
        let hosts = [
            ("untagged", offer(&[], &[])),
            ("trusted", offer(&["pool:trusted"], &[])),
            ("byo acme", offer(&["pool:byo", "tenant:acme"], &[])),
            ("byo globex", offer(&["pool:byo", "tenant:globex"], &[])),
            ("byo of no tenant", offer(&["pool:byo"], &[])),
            ("byo of both", offer(&["pool:byo", "tenant:acme", "tenant:globex", "pool:trusted"], &[])),
        ];
        for tier in [Tier::Any, Tier::Trusted, Tier::Byo] {
            for project in ["acme", "globex", "initech"] {
                for (host, worker) in &hosts {
                    let byo_host = worker.tags.contains(BYO_TAG);
                    let want = match tier {
                        Tier::Byo => byo_host && worker.tags.contains(&tenant_tag(project)),
                        Tier::Trusted => !byo_host && worker.tags.contains("pool:trusted"),
                        Tier::Any => !byo_host,
                    };
                    let required = requirements(project, tier, &[], &[]);
                    assert_eq!(admits(&required, project, worker), want, "{tier:?} job of {project} on {host}");
                }
            }
        }
    }

    #[test]
    fn untrusted_code_defaults_to_the_trusted_tier() {
        let spec = |profile, tier| SandboxSpec { profile, tier, limits: Default::default() };
        assert_eq!(effective_tier(None), Tier::Any);
        assert_eq!(effective_tier(Some(&spec(SandboxProfile::None, None))), Tier::Any);
        assert_eq!(effective_tier(Some(&spec(SandboxProfile::UntrustedCodeWrite, None))), Tier::Trusted);
        assert_eq!(effective_tier(Some(&spec(SandboxProfile::UntrustedCodeRead, None))), Tier::Trusted);
        assert_eq!(effective_tier(Some(&spec(SandboxProfile::UntrustedCodeWrite, Some(Tier::Byo)))), Tier::Byo);
    }
}
