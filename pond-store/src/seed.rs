//! Benchmark support: a backlog of runs written straight into a store's tables, so a
//! benchmark can start from a million stored or queued runs in seconds rather than submitting
//! them one by one. Seeded runs belong to project [`BACKLOG_PROJECT`] and have one stage `s`.

use pond_core::time::Timestamp;

/// The project seeded runs belong to (a benchmark's own runs use another, so listing them
/// does not page through the backlog).
pub const BACKLOG_PROJECT: &str = "backlog";

/// What a seeded backlog holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backlog {
    /// Runs whose `noop` stage waits for a server's own driver, due now.
    Local,
    /// Runs whose `noop` stage waits for a pool worker (no tags, no capabilities), due now.
    Pooled,
    /// Runs that succeeded: a stage and an attempt each, nothing waiting.
    Finished,
    /// Runs whose `noop` stage waits for a pool worker tagged `gpu` (which no benchmark worker
    /// is), due a second before the others: another pool's backlog, ahead in due order.
    OtherPool,
}

impl Backlog {
    /// Parses `local`, `pooled`, `finished` or `other-pool`.
    pub fn parse(text: &str) -> Option<Backlog> {
        match text {
            "local" => Some(Backlog::Local),
            "pooled" => Some(Backlog::Pooled),
            "finished" => Some(Backlog::Finished),
            "other-pool" => Some(Backlog::OtherPool),
            _ => None,
        }
    }

    /// The name `parse` reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Backlog::Local => "local",
            Backlog::Pooled => "pooled",
            Backlog::Finished => "finished",
            Backlog::OtherPool => "other-pool",
        }
    }

    pub(crate) fn definition(self) -> &'static str {
        match self {
            Backlog::Pooled => r#"{"stages":[{"key":"s","executor":{"kind":"noop","placement":"pool"}}]}"#,
            Backlog::OtherPool => {
                r#"{"stages":[{"key":"s","executor":{"kind":"noop","placement":"pool","tags":["gpu"]}}]}"#
            }
            Backlog::Local | Backlog::Finished => r#"{"stages":[{"key":"s","executor":{"kind":"noop"}}]}"#,
        }
    }

    pub(crate) fn state(self) -> &'static str {
        match self {
            Backlog::Local | Backlog::Pooled | Backlog::OtherPool => "queued",
            Backlog::Finished => "succeeded",
        }
    }

    pub(crate) fn executor_kind(self) -> &'static str {
        match self {
            Backlog::Pooled | Backlog::OtherPool => pond_core::definition::POOL_KIND,
            Backlog::Local | Backlog::Finished => "noop",
        }
    }

    /// `pool_tags` and `pool_caps` of the stage.
    pub(crate) fn requirements(self) -> Option<(&'static str, &'static str)> {
        match self {
            Backlog::Pooled => Some(("[]", "[]")),
            Backlog::OtherPool => Some((r#"["gpu"]"#, "[]")),
            Backlog::Local | Backlog::Finished => None,
        }
    }

    /// The stage's `ready_at`, `attempt`, `started_at` and `finished_at`.
    pub(crate) fn stage_times(self, now: Timestamp) -> (Option<i64>, i64, Option<i64>, Option<i64>) {
        let now = now.as_millis();
        match self {
            Backlog::Local | Backlog::Pooled => (Some(now), 0, None, None),
            Backlog::OtherPool => (Some(now - 1000), 0, None, None),
            Backlog::Finished => (None, 1, Some(now), Some(now)),
        }
    }
}
