use crate::{ProviderError, StoreError};

/// Errors of the core crate.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The event store failed. Retryable only if the store says so.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A model call failed (after the provider's own retries).
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// No run with this id. Not retryable.
    #[error("no run with id {0}; `descartes list` shows the runs")]
    RunNotFound(String),
    /// The run cannot be resumed in its current state. Not retryable.
    #[error("{0}")]
    NotResumable(String),
    /// The user cancelled (SIGINT/SIGTERM). Not an error of the run itself.
    #[error("cancelled")]
    Cancelled,
    /// The log of a run contradicts itself (e.g. events of a run without `run_started`).
    #[error("inconsistent run log: {0}")]
    Inconsistent(String),
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
