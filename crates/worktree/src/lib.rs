//! Execution in git worktrees: every task that touches a repository works in its own worktree on
//! its own branch, and what it did is collected as evidence.
//!
//! - [`Repo::discover`]: is a directory inside a git work tree; its top level, branch and HEAD.
//! - [`Worktrees::create`]: `git worktree add -b descartes/<slug> <root>/<slug> <base commit>`,
//!   idempotent for a retry of the same task. Parallel agents never share a working tree, and the
//!   user's checkout is never written (only `.git` is: objects, refs, worktree registrations).
//! - [`collect_evidence`]: commits what the agent left uncommitted on the task branch, then the
//!   diff against the base commit, the changed files, changed paths outside the task's lock globs,
//!   and the result of a test command.
//! - [`EvidenceStore`]: content-addressed blobs (SHA-256) and [`EvidenceRef`], the small manifest
//!   an event carries.
//! - [`Worktrees::merge`]: the task branch into its base branch (fast-forward, else a merge
//!   commit), refused on conflict or when the user's checkout of the base branch is not clean.
//! - [`Worktrees::discard`]: removes the worktree and deletes the branch.
//!
//! Everything is done by the `git` program (gitoxide cannot add worktrees): git ≥ 2.38 is needed
//! (`merge-tree --write-tree`). Commands run with `LC_ALL=C`, without the caller's `GIT_DIR`,
//! `GIT_WORK_TREE`, `GIT_INDEX_FILE` and similar variables, and without a terminal prompt.
//! Commits Descartes makes (left-over changes, merge commits) are authored and committed by
//! `Descartes <descartes@localhost>`, unsigned, without running `pre-commit`/`commit-msg` hooks.
//!
//! # On disk
//!
//! ```text
//! <root>/                     Worktrees::new(repo, root); the caller's <state_dir>/worktrees
//!   <slug>/                   the task's worktree, branch `descartes/<slug>`
//!   .meta/<slug>.json         the Worktree record (base commit and branch), so that a retry
//!                             keeps the first attempt's base; removed by discard
//! <repo>/.git/worktrees/<slug>/   git's own registration of the worktree
//! <evidence dir>/ab/cdef…     EvidenceStore blobs: the SHA-256 of the content, hex, split 2/62
//! ```
//!
//! The slug of a task id is the id itself when it is made of ASCII letters, digits, `-`, `_` and
//! single inner dots, at most 64 characters, not ending in `.lock`; otherwise every other
//! character becomes `-`, dots that would make a bad ref name become `-`, the result is cut to 64
//! characters, and `-` plus the first 8 hex digits of the id's SHA-256 is appended (so `a/b` and
//! `a_b` never share a worktree). See [`task_slug`].

mod evidence;
mod git;
mod merge;
mod repo;
mod store;
mod worktree;

use std::path::PathBuf;

pub use evidence::{
    ChangedFile, Evidence, EvidenceOptions, FileStatus, TestResult, collect_evidence, diff, outside_locks,
};
pub use merge::{MergeKind, MergeOutcome};
pub use repo::Repo;
pub use store::{ContentHash, EvidenceRef, EvidenceStore, TestRef};
pub use worktree::{BRANCH_PREFIX, Worktree, Worktrees, task_slug};

/// The identity of the commits Descartes makes.
pub const COMMIT_NAME: &str = "Descartes";
/// The e-mail address of the commits Descartes makes.
pub const COMMIT_EMAIL: &str = "descartes@localhost";

/// Errors of this crate. [`Error::is_retryable`] says which ones may succeed if tried again.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `git` program cannot be started. Not retryable: install git (≥ 2.38) or fix `PATH`.
    #[error("cannot run `git` ({source}); install git 2.38 or later and make sure it is on PATH")]
    GitMissing {
        #[source]
        source: std::io::Error,
    },
    /// A git command failed: the command and its standard error. Retryable only when git says a
    /// lock file exists (another git process was busy); see [`Error::is_retryable`].
    #[error("`{command}` failed{}: {stderr}", code.map(|c| format!(" (exit code {c})")).unwrap_or_default())]
    Git { command: String, code: Option<i32>, stderr: String },
    /// The task id cannot be used (it is empty). Not retryable.
    #[error("invalid task id {task_id:?}: {reason}")]
    InvalidTaskId { task_id: String, reason: &'static str },
    /// The repository has no commit yet, so there is nothing to base a worktree on. Not retryable:
    /// make a first commit.
    #[error("the repository at {} has no commit yet; commit something first", repo.display())]
    NoCommit { repo: PathBuf },
    /// The base given for a worktree is not a commit of the repository. Not retryable.
    #[error("`{base}` is not a commit, branch or tag of the repository")]
    UnknownBase { base: String },
    /// The worktree's directory is taken by something that is not a worktree of this repository.
    /// Not retryable: nothing is deleted that Descartes did not make; remove it by hand.
    #[error("{} exists and is not a worktree of this repository; remove it or use another root", path.display())]
    PathInUse { path: PathBuf },
    /// The task's worktree directory does not exist (discarded, or deleted by hand). Not
    /// retryable as such: `Worktrees::create` for the task makes it again from its branch.
    #[error("the worktree {} does not exist; create it again for the task", path.display())]
    WorktreeMissing { path: PathBuf },
    /// The task's worktree is not on the task branch (the agent switched branches or detached
    /// HEAD). Not retryable: check out the task branch in the worktree again.
    #[error(
        "the worktree {} is on {} instead of {expected}; run `git checkout {expected}` in it",
        path.display(),
        found.as_deref().unwrap_or("a detached HEAD")
    )]
    NotOnTaskBranch { path: PathBuf, expected: String, found: Option<String> },
    /// The task branch is checked out in a worktree outside the worktrees root, which Descartes
    /// does not remove. Not retryable: switch that checkout to another branch.
    #[error("the branch {branch} is checked out at {}; switch that checkout to another branch first", path.display())]
    BranchCheckedOut { branch: String, path: PathBuf },
    /// The task branch does not exist (the task was discarded). Not retryable.
    #[error("the branch {branch} does not exist (was the task discarded?)")]
    BranchMissing { branch: String },
    /// A lock glob is not a valid glob. Not retryable.
    #[error("invalid lock glob {glob:?}: {message}")]
    InvalidGlob { glob: String, message: String },
    /// The test command could not be started (`sh` missing, or the worktree unreadable). Not
    /// retryable.
    #[error("cannot run the test command `{command}`: {source}")]
    TestSpawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// A merge was refused or failed: see [`MergeError`].
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// No blob with that hash in the evidence store. Not retryable.
    #[error("evidence blob {hash} not found at {}", path.display())]
    BlobNotFound { hash: String, path: PathBuf },
    /// A stored blob's content does not match its hash: the file was corrupted or edited. Not
    /// retryable: the evidence is lost (putting the same content again repairs the file).
    #[error("evidence blob {} is corrupted: its content hashes to {actual}, not {expected}", path.display())]
    Corrupt { path: PathBuf, expected: String, actual: String },
    /// A string is not a content hash (64 lowercase hex digits). Not retryable.
    #[error("{value:?} is not a content hash (64 lowercase hex digits)")]
    InvalidHash { value: String },
    /// A file operation failed. Retryable when the cause is transient (a full disk that was
    /// cleaned, an interrupted call); not for permission errors or missing directories.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file written by this crate cannot be read. Not retryable: delete the file.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Why a merge was refused. Nothing was changed when one of these is returned: no ref moved and
/// no file of the user's checkout was written.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The task branch and the base branch change the same lines. Not retryable: merge by hand
    /// or retry the task on the new base.
    #[error(
        "cannot merge {task_branch} into {base_branch}: conflicts in {}; merge it by hand (`git merge {task_branch}`) \
         or retry the task on the current {base_branch}",
        files.join(", ")
    )]
    Conflict { task_branch: String, base_branch: String, files: Vec<String> },
    /// The base branch is checked out in a worktree with uncommitted changes to tracked files.
    /// Not retryable until the user commits or stashes them.
    #[error(
        "{base_branch} is checked out at {} with uncommitted changes ({}); commit or stash them, then merge again",
        path.display(),
        files.join(", ")
    )]
    DirtyCheckout { base_branch: String, path: PathBuf, files: Vec<String> },
    /// Git refused to update the checkout of the base branch (an untracked file is in the way, a
    /// merge or rebase is in progress there). Not retryable until that is resolved.
    #[error("cannot update the checkout of {base_branch} at {}: {message}", path.display())]
    CheckoutRefused { base_branch: String, path: PathBuf, message: String },
    /// The base branch moved while the merge was being computed. Retryable: merge again.
    #[error("{base_branch} moved while merging; merge again")]
    BaseMoved { base_branch: String },
    /// The task was based on a commit, not on a branch, so there is nothing to merge into. Not
    /// retryable: merge `descartes/<task>` by hand.
    #[error("task {task_id} was not started from a branch (base {base_commit}); merge {branch} by hand")]
    NoBaseBranch { task_id: String, base_commit: String, branch: String },
    /// The base branch no longer exists. Not retryable.
    #[error("the base branch {base_branch} does not exist any more")]
    BaseBranchMissing { base_branch: String },
}

impl Error {
    /// Whether trying the same operation again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Git { stderr, .. } => stderr.contains(".lock': File exists") || stderr.contains("Unable to create"),
            Error::Merge(MergeError::BaseMoved { .. }) => true,
            Error::Io { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput
            ),
            _ => false,
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
