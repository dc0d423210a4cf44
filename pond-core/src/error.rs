//! Errors of pond-core.

use std::fmt;

/// A rejected input: which field (a path such as `definition.stages[1].key`) and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// Path of the offending field in the request.
    pub field: String,
    /// Why it was rejected, in lowercase, without a trailing period.
    pub reason: String,
}

impl FieldError {
    /// A new field error.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError { field: field.into(), reason: reason.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for FieldError {}

/// Why the engine or the state machine refused an operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// The request is invalid.
    #[error("invalid {0}")]
    Invalid(#[from] FieldError),
    /// No run has that id (or the caller may not see it).
    #[error("run {0} not found")]
    RunNotFound(crate::ids::RunId),
    /// A stage key that the run does not have.
    #[error("run {run} has no stage `{stage}`")]
    StageNotFound {
        /// The run.
        run: crate::ids::RunId,
        /// The missing key.
        stage: String,
    },
    /// A result for an attempt that no longer holds the stage (lease lost, run cancelled).
    #[error("stale result for stage `{stage}` attempt {attempt}: the stage is now {state} at attempt {current}")]
    StaleAttempt {
        /// The stage.
        stage: String,
        /// The attempt the result was for.
        attempt: u32,
        /// The stage's current attempt.
        current: u32,
        /// The stage's current state.
        state: crate::run::StageState,
    },
    /// A quota of the caller's project is used up (the message names it and what frees it).
    #[error("{0}")]
    Quota(String),
    /// Preparing or packing a run's checkout failed.
    #[error("preparing the run's checkout failed: {0}")]
    Workspace(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Errors of a [`crate::store::Store`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backing database cannot be reached right now; the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness rule was broken.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The thing looked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The mutation passed to `update_run` refused the change.
    #[error(transparent)]
    Rejected(Box<CoreError>),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// Any other backend failure.
    #[error("store error: {0}")]
    Backend(String),
}
