//! Diagnostics (every problem found in policy files, located) and the crate's error type.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// What a [`Diagnostic`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiagnosticKind {
    /// The file cannot be used as written (syntax, unknown field, wrong type, bad glob, bad CEL,
    /// unreadable file). A policy set with an error does not load.
    Error,
    /// Two rules of equal specificity that could match the same input have opposite effects
    /// (allow against deny or require_approval). The set still loads (the tie is broken by
    /// deny > require_approval > allow), but `descartes policy validate` reports it.
    Conflict,
}

/// One problem in a policy file, with where it is. Lines and columns count from 1; a problem
/// that concerns the whole file (it cannot be read) has line and column 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub kind: DiagnosticKind,
    pub message: String,
}

impl Diagnostic {
    pub(crate) fn error(file: &Path, line: usize, column: usize, message: impl Into<String>) -> Self {
        Self { file: file.to_owned(), line, column, kind: DiagnosticKind::Error, message: message.into() }
    }

    pub fn is_error(&self) -> bool {
        self.kind == DiagnosticKind::Error
    }
}

/// `file:line:column: message` (`file: message` when the problem has no position); a conflict's
/// message starts with `conflict: `.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        match self.kind {
            DiagnosticKind::Error => write!(f, ": {}", self.message),
            DiagnosticKind::Conflict => write!(f, ": conflict: {}", self.message),
        }
    }
}

/// Diagnostics displayed one per line.
#[derive(Debug, Clone, Copy)]
pub struct DisplayDiagnostics<'a>(pub &'a [Diagnostic]);

impl fmt::Display for DisplayDiagnostics<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Why a policy set could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// One or more policy files cannot be used: every problem found in every file, each with
    /// file, line and column (displayed one per line as `file:line:column: message`). Not
    /// retryable: fix the files (`descartes policy validate` lists the same problems).
    #[error("{}", DisplayDiagnostics(.0))]
    Invalid(Vec<Diagnostic>),
    /// The agent name cannot name a policy file (`.ai/policies/<agent>.yaml`): it is empty or
    /// holds a path separator, `..` or a NUL. Not retryable.
    #[error("agent name {0:?} cannot name a policy file: use a name without `/`, `\\` or `..`")]
    BadAgentName(String),
}

impl PolicyError {
    /// The located problems (empty for [`PolicyError::BadAgentName`]).
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            PolicyError::Invalid(d) => d,
            PolicyError::BadAgentName(_) => &[],
        }
    }
}

/// The crate's result type.
pub type Result<T, E = PolicyError> = std::result::Result<T, E>;
