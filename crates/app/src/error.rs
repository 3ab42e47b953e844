//! What went wrong, as every front end reports it: one table maps each kind of problem to the
//! CLI's exit code, the API's HTTP status and the API's error code, so `descartes --server`
//! exits exactly as the local CLI does.

use descartes_core::{CoreError, StoreError, TaskError};
use descartes_runtime::RuntimeError;

macro_rules! problems {
    ($($(#[$doc:meta])* $variant:ident = $code:literal, exit $exit:literal, http $http:literal;)*) => {
        /// The kinds of problem a front end reports.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Problem {
            $($(#[$doc])* $variant,)*
        }

        impl Problem {
            /// Every kind, in table order.
            pub const ALL: &'static [Problem] = &[$(Problem::$variant),*];

            /// The API's error code (`{error: {code, ...}}`).
            pub fn code(self) -> &'static str {
                match self { $(Problem::$variant => $code,)* }
            }

            /// The CLI's exit code.
            pub fn exit_code(self) -> u8 {
                match self { $(Problem::$variant => $exit,)* }
            }

            /// The API's HTTP status.
            pub fn http_status(self) -> u16 {
                match self { $(Problem::$variant => $http,)* }
            }

            /// The kind an API error code names (`None` for a code of no kind).
            pub fn from_code(code: &str) -> Option<Problem> {
                match code { $($code => Some(Problem::$variant),)* _ => None }
            }
        }
    };
}

problems! {
    /// Bad arguments or input (for tasks also: invalid glob, missing dependency, cycle).
    Usage = "bad_request", exit 2, http 400;
    /// A task operation its status does not allow (cancel a done task, retry a queued one):
    /// the CLI's usage error, the API's conflict.
    IllegalTransition = "illegal_transition", exit 2, http 409;
    /// Bad configuration: a config or policy file, a missing API key, an unknown provider,
    /// guardrail files awaiting `config trust`.
    Config = "config", exit 3, http 422;
    /// The database cannot be opened or written.
    Store = "store", exit 4, http 503;
    /// An unknown run, task, agent or session.
    NotFound = "not_found", exit 5, http 404;
    /// The wrong state: a run already completed or driven elsewhere, a daemon not running.
    Conflict = "conflict", exit 5, http 409;
    /// A fencing token that is no longer current.
    StaleLease = "stale_lease", exit 6, http 409;
    /// Nothing to do: no ready task to claim or execute.
    NothingToDo = "nothing_to_do", exit 7, http 409;
    /// A run stopped before crossing its token or cost cap.
    BudgetExceeded = "budget_exceeded", exit 8, http 409;
    /// A merge that git could not make (a conflict).
    MergeFailed = "merge_failed", exit 9, http 409;
    /// The policy refuses (a deny rule, or an approval it requires is missing).
    PolicyRefused = "policy_refused", exit 10, http 403;
    /// A run or an attempt failed.
    Failed = "failed", exit 1, http 500;
    /// Stopped by the user.
    Cancelled = "cancelled", exit 130, http 409;
    /// Anything else.
    Internal = "internal", exit 1, http 500;
}

/// A problem with a message that says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AppError {
    pub problem: Problem,
    pub message: String,
}

/// An [`AppError`] as an `anyhow` error.
pub fn fail(problem: Problem, message: impl Into<String>) -> anyhow::Error {
    AppError { problem, message: message.into() }.into()
}

/// The kind of problem `err` is, from the errors of every layer.
pub fn classify(err: &anyhow::Error) -> Problem {
    if let Some(a) = err.downcast_ref::<AppError>() {
        return a.problem;
    }
    if let Some(r) = err.downcast_ref::<RuntimeError>() {
        return match r {
            RuntimeError::Config(_)
            | RuntimeError::UnknownProvider { .. }
            | RuntimeError::UnknownKind { .. }
            | RuntimeError::MissingApiKey { .. }
            | RuntimeError::Provider(_)
            | RuntimeError::GuardrailsChanged(_) => Problem::Config,
            RuntimeError::Store(_) => Problem::Store,
            RuntimeError::EmptyRunId => Problem::Usage,
            RuntimeError::RunNotFound(_) => Problem::NotFound,
            RuntimeError::AmbiguousRun { .. } => Problem::NotFound,
            RuntimeError::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock => Problem::Conflict,
            RuntimeError::Io(_) => Problem::Internal,
        };
    }
    if err.downcast_ref::<StoreError>().is_some() {
        return Problem::Store;
    }
    if let Some(t) = err.downcast_ref::<TaskError>() {
        return task_problem(t);
    }
    if let Some(c) = err.downcast_ref::<CoreError>() {
        return match c {
            CoreError::Store(_) => Problem::Store,
            CoreError::RunNotFound(_) => Problem::NotFound,
            CoreError::NotResumable(_) => Problem::Conflict,
            CoreError::Cancelled => Problem::Cancelled,
            _ => Problem::Failed,
        };
    }
    if err.downcast_ref::<descartes_policy::PolicyError>().is_some() {
        return Problem::Config;
    }
    Problem::Internal
}

/// The kind of problem a task store's refusal is.
pub fn task_problem(e: &TaskError) -> Problem {
    match e {
        TaskError::NotFound(_) => Problem::NotFound,
        TaskError::StaleToken { .. } | TaskError::LeaseExpired { .. } => Problem::StaleLease,
        TaskError::Store(_) => Problem::Store,
        TaskError::IllegalTransition { .. } => Problem::IllegalTransition,
        _ => Problem::Usage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for p in Problem::ALL {
            assert!(seen.insert(p.code()), "{} twice", p.code());
            assert_eq!(Problem::from_code(p.code()), Some(*p));
        }
        assert_eq!(Problem::from_code("nope"), None);
    }

    #[test]
    fn every_layer_s_errors_are_classified() {
        let e: anyhow::Error = RuntimeError::RunNotFound("x".into()).into();
        assert_eq!(classify(&e), Problem::NotFound);
        let e: anyhow::Error = TaskError::NotFound("t".into()).into();
        assert_eq!((classify(&e).exit_code(), classify(&e).http_status()), (5, 404));
        let e = fail(Problem::PolicyRefused, "no");
        assert_eq!((classify(&e).exit_code(), classify(&e).http_status()), (10, 403));
        assert_eq!(classify(&anyhow::anyhow!("what")), Problem::Internal);
        // The CLI's exit code of an illegal transition is a usage error's, as before.
        let e: anyhow::Error = TaskError::IllegalTransition {
            id: "t".into(),
            action: "cancel",
            status: descartes_protocol::TaskStatus::Done,
        }
        .into();
        assert_eq!((classify(&e).exit_code(), classify(&e).http_status()), (2, 409));
    }
}
