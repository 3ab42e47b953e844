//! Creating and discarding task worktrees.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::git::{Git, WorktreeEntry, list_worktrees, resolve_commit};
use crate::repo::current_branch;
use crate::store::{hex, write_atomic};
use crate::{Error, Repo, Result, io_err};

/// Task branches are `descartes/<slug>`.
pub const BRANCH_PREFIX: &str = "descartes/";

const MAX_SLUG: usize = 64;

/// A task's worktree: where it is, its branch, and what it was based on. Serializable, so it can
/// be stored in an event and given back to [`Worktrees::merge`], [`Worktrees::discard`] and
/// [`crate::collect_evidence`] later, in another process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worktree {
    /// The task id as given (not sanitised).
    pub task_id: String,
    /// The worktree's directory (`<root>/<slug>`, canonical).
    pub path: PathBuf,
    /// The task branch, short name (`descartes/<slug>`).
    pub branch: String,
    /// The commit the task started from: diffs are computed against it.
    pub base_commit: String,
    /// The branch `base_commit` was taken from (`main`), where [`Worktrees::merge`] merges to;
    /// `None` when the base was a detached HEAD, a tag or a commit id.
    pub base_branch: Option<String>,
    /// The top level of the checkout the worktree was created from.
    pub repo: PathBuf,
}

/// The task worktrees of one repository, kept under one root directory.
#[derive(Debug, Clone)]
pub struct Worktrees {
    pub(crate) repo: Repo,
    root: PathBuf,
    /// Merges into a base branch are serialized within the process (across processes the ref
    /// update is a compare-and-swap).
    pub(crate) merge_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Worktrees {
    /// Worktrees of `repo` under `root` (created on first use; keep it outside the user's
    /// checkout, e.g. `<state_dir>/worktrees`). A relative `root` is taken from the current
    /// directory.
    pub fn new(repo: Repo, root: PathBuf) -> Self {
        let root = std::path::absolute(&root).unwrap_or(root);
        Self { repo, root, merge_lock: Arc::new(tokio::sync::Mutex::new(())) }
    }

    /// The repository.
    pub fn repo(&self) -> &Repo {
        &self.repo
    }

    /// Where the worktrees live.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self) -> &Path {
        &self.repo.toplevel
    }

    fn meta_path(&self, root: &Path, slug: &str) -> PathBuf {
        root.join(".meta").join(format!("{slug}.json"))
    }

    /// The worktree of task `task_id`: `git worktree add -b descartes/<slug> <root>/<slug> <base>`.
    ///
    /// `base` is a commit, branch or tag; `None` means the commit checked out in the user's
    /// checkout now (and its branch). The base branch recorded is the branch `base` names (or the
    /// checked-out branch), `None` for a commit id, a tag or a detached HEAD.
    ///
    /// A retry of the same task is idempotent:
    /// - the task's worktree exists: it is returned as it is (uncommitted changes left by a
    ///   crashed attempt included), with the base recorded by the first attempt;
    /// - the branch exists but its worktree does not (or is broken): the worktree is made again
    ///   from the branch, keeping its commits (a failed attempt's work), and the first
    ///   attempt's base (if that record is lost: the merge base of the branch and `base`/HEAD).
    pub async fn create(&self, task_id: &str, base: Option<&str>) -> Result<Worktree> {
        let slug = task_slug(task_id)?;
        let branch = format!("{BRANCH_PREFIX}{slug}");
        let full_ref = format!("refs/heads/{branch}");
        std::fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let root = std::fs::canonicalize(&self.root).map_err(io_err(&self.root))?;
        let path = root.join(&slug);
        let meta_path = self.meta_path(&root, &slug);

        let existing = resolve_commit(self.dir(), &full_ref).await?;
        let Some(_) = existing else {
            // A new task (a record without its branch is stale: the branch was deleted by hand).
            let (base_commit, base_branch) = self.resolve_base(base).await?;
            if path.exists() {
                self.clear_path(&root, &path, &list_worktrees(self.dir()).await?).await?;
            }
            let wt = Worktree {
                task_id: task_id.to_owned(),
                path: path.clone(),
                branch: branch.clone(),
                base_commit: base_commit.clone(),
                base_branch,
                repo: self.repo.toplevel.clone(),
            };
            write_meta(&meta_path, &wt)?;
            Git::new(self.dir())
                .args(["worktree", "add", "--quiet", "-b", &branch])
                .arg(&path)
                .arg(&base_commit)
                .ok()
                .await?;
            return Ok(wt);
        };

        // A retry: the branch exists.
        let mut wt = match read_meta(&meta_path)? {
            Some(meta) if meta.branch == branch && meta.task_id == task_id => meta,
            _ => {
                let (base_commit, base_branch) = self.resolve_base(base).await?;
                let base_commit = Git::new(self.dir()).args(["merge-base", &base_commit, &full_ref]).text().await?;
                Worktree {
                    task_id: task_id.to_owned(),
                    path: path.clone(),
                    branch: branch.clone(),
                    base_commit,
                    base_branch,
                    repo: self.repo.toplevel.clone(),
                }
            }
        };
        let entries = list_worktrees(self.dir()).await?;
        if let Some(entry) = entries.iter().find(|e| e.branch.as_deref() == Some(full_ref.as_str())) {
            let broken = entry.prunable
                || !entry.path.join(".git").exists()
                || entry.locked.as_deref().is_some_and(|r| r.contains("initializing"));
            if !broken {
                wt.path = entry.path.clone();
                write_meta(&meta_path, &wt)?;
                return Ok(wt);
            }
            self.remove_registered(&root, entry).await?;
        }
        wt.path = path.clone();
        if path.exists() {
            let entries = list_worktrees(self.dir()).await?;
            self.clear_path(&root, &path, &entries).await?;
        }
        write_meta(&meta_path, &wt)?;
        Git::new(self.dir()).args(["worktree", "add", "--quiet"]).arg(&path).arg(&branch).ok().await?;
        Ok(wt)
    }

    /// Removes the task's worktree (uncommitted changes are lost) and deletes its branch
    /// (its commits are lost unless merged), and the record of its base. Idempotent: discarding
    /// a discarded task does nothing. A checkout of the branch outside the root is never
    /// removed ([`Error::BranchCheckedOut`]).
    pub async fn discard(&self, wt: &Worktree) -> Result<()> {
        let full_ref = format!("refs/heads/{}", wt.branch);
        let root = match std::fs::canonicalize(&self.root) {
            Ok(r) => r,
            Err(_) => self.root.clone(),
        };
        let entries = list_worktrees(self.dir()).await?;
        for entry in &entries {
            let ours = entry.branch.as_deref() == Some(full_ref.as_str()) || same_path(&entry.path, &wt.path);
            if ours && !entry.bare {
                self.remove_registered(&root, entry).await?;
            }
        }
        // A directory left behind (not registered): removed only if it is not a git checkout.
        if wt.path.starts_with(&root) && wt.path.is_dir() && !wt.path.join(".git").exists() {
            std::fs::remove_dir_all(&wt.path).map_err(io_err(&wt.path))?;
        }
        if resolve_commit(self.dir(), &full_ref).await?.is_some() {
            Git::new(self.dir()).args(["branch", "-D", &wt.branch]).ok().await?;
        }
        if let Some(slug) = wt.branch.strip_prefix(BRANCH_PREFIX) {
            let meta = self.meta_path(&root, slug);
            match std::fs::remove_file(&meta) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(meta)(e)),
            }
        }
        Ok(())
    }

    /// `git worktree remove --force --force` for a registered worktree under the root; the
    /// registration only (`prune`) when its directory is gone.
    async fn remove_registered(&self, root: &Path, entry: &WorktreeEntry) -> Result<()> {
        if !entry.path.starts_with(root) {
            let branch = entry.branch.as_deref().unwrap_or("").trim_start_matches("refs/heads/").to_owned();
            return Err(Error::BranchCheckedOut { branch, path: entry.path.clone() });
        }
        if entry.path.exists() {
            Git::new(self.dir()).args(["worktree", "remove", "--force", "--force"]).arg(&entry.path).ok().await?;
        } else {
            if entry.locked.is_some() {
                Git::new(self.dir()).args(["worktree", "unlock"]).arg(&entry.path).run().await?;
            }
            Git::new(self.dir()).args(["worktree", "prune"]).ok().await?;
        }
        Ok(())
    }

    /// Makes `path` free for a new worktree: a registered worktree of this repository is
    /// removed, an empty directory too; anything else is [`Error::PathInUse`].
    async fn clear_path(&self, root: &Path, path: &Path, entries: &[WorktreeEntry]) -> Result<()> {
        if let Some(entry) = entries.iter().find(|e| same_path(&e.path, path)) {
            return self.remove_registered(root, entry).await;
        }
        let empty = std::fs::read_dir(path).map(|mut d| d.next().is_none()).unwrap_or(false);
        if empty {
            std::fs::remove_dir(path).map_err(io_err(path))?;
            return Ok(());
        }
        Err(Error::PathInUse { path: path.to_owned() })
    }

    /// The base commit and branch for a new worktree.
    async fn resolve_base(&self, base: Option<&str>) -> Result<(String, Option<String>)> {
        match base {
            None => {
                let commit = resolve_commit(self.dir(), "HEAD")
                    .await?
                    .ok_or_else(|| Error::NoCommit { repo: self.repo.toplevel.clone() })?;
                Ok((commit, current_branch(self.dir()).await?))
            }
            Some(name) => {
                let unknown = || Error::UnknownBase { base: name.to_owned() };
                if name.is_empty() || name.starts_with('-') {
                    return Err(unknown());
                }
                let commit = resolve_commit(self.dir(), name).await?.ok_or_else(unknown)?;
                let full = Git::new(self.dir()).args(["rev-parse", "--symbolic-full-name", name]).run().await?;
                let branch =
                    if full.success() { full.text().strip_prefix("refs/heads/").map(str::to_owned) } else { None };
                Ok((commit, branch))
            }
        }
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    a == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

fn write_meta(path: &Path, wt: &Worktree) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(wt).map_err(|source| Error::Json { path: path.to_owned(), source })?;
    write_atomic(path, &bytes, false)
}

fn read_meta(path: &Path) -> Result<Option<Worktree>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map(Some).map_err(|source| Error::Json { path: path.to_owned(), source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// The name a task id gets in branch names and paths.
///
/// An id made only of ASCII letters, digits, `-`, `_` and `.` (not starting or ending with
/// `.`, without `..`, not ending in `.lock`), at most 64 characters, is kept as it is: so is a
/// ULID or `fix-login_2`. Otherwise every other character is replaced by `-`, offending dots
/// by `-`, the result is cut to 64 characters, and `-` and the first 8 hex digits of the
/// SHA-256 of the id are appended, so two ids never share a slug by sanitising (`a/b` →
/// `a-b-<hash>`, not `a-b`). An empty id is [`Error::InvalidTaskId`].
pub fn task_slug(task_id: &str) -> Result<String> {
    if task_id.is_empty() {
        return Err(Error::InvalidTaskId { task_id: task_id.to_owned(), reason: "it is empty" });
    }
    let chars: Vec<char> = task_id.chars().collect();
    let mut slug = String::with_capacity(task_id.len());
    for (i, &c) in chars.iter().enumerate() {
        let keep = match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' => true,
            // A dot is fine inside a component, not first, last or doubled.
            '.' => i > 0 && i + 1 < chars.len() && chars[i - 1] != '.' && chars[i + 1] != '.',
            _ => false,
        };
        slug.push(if keep { c } else { '-' });
    }
    if slug.ends_with(".lock") {
        let at = slug.len() - ".lock".len();
        slug.replace_range(at..=at, "-");
    }
    let mut changed = slug != task_id;
    if slug.len() > MAX_SLUG {
        slug.truncate(MAX_SLUG);
        changed = true;
    }
    if changed {
        let digest = Sha256::digest(task_id.as_bytes());
        slug.push('-');
        slug.push_str(&hex(&digest[..4]));
    }
    Ok(slug)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert_eq!(task_slug("01HZX3K6Q2V8J5T9W4N7B0C1D2").unwrap(), "01HZX3K6Q2V8J5T9W4N7B0C1D2");
        assert_eq!(task_slug("fix-login_2.v1").unwrap(), "fix-login_2.v1");
        let odd = ["a/b", "a b", "..", ".hidden", "x.", "a..b", "x.lock", "é", "a:b?c*[d]~^\\", "@{u}", "-x/../y"];
        let mut seen = std::collections::HashSet::new();
        for id in odd {
            let s = task_slug(id).unwrap();
            assert!(s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)), "{id:?} -> {s}");
            assert!(!s.starts_with('.') && !s.contains("..") && !s.ends_with(".lock") && !s.ends_with('.'));
            assert!(seen.insert(s.clone()), "{id:?} collides: {s}");
            assert_eq!(task_slug(id).unwrap(), s, "stable");
        }
        assert_ne!(task_slug("a/b").unwrap(), task_slug("a-b").unwrap());
        let long = "x".repeat(200);
        assert_eq!(task_slug(&long).unwrap().len(), MAX_SLUG + 9);
        assert!(task_slug("").is_err());
    }
}
