//! Finding the repository a directory belongs to.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::git::{Git, resolve_commit};
use crate::{Result, io_err};

/// A git repository with a work tree, as seen from the user's checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repo {
    /// The top level of the work tree the directory is in (the user's checkout; a linked
    /// worktree's own top level when the directory is inside one).
    pub toplevel: PathBuf,
    /// The repository's common git directory (absolute), shared by all its worktrees.
    pub common_dir: PathBuf,
    /// The branch checked out there (`main`), `None` when HEAD is detached.
    pub branch: Option<String>,
    /// The commit checked out there, `None` in a repository without commits.
    pub head_commit: Option<String>,
}

impl Repo {
    /// The repository whose work tree contains `cwd`, or `None` when `cwd` is not inside a work
    /// tree (not a repository, a bare repository, or inside a `.git` directory). Errors are
    /// real failures: `git` missing, `cwd` missing, a repository git refuses to open (e.g.
    /// "dubious ownership").
    pub async fn discover(cwd: &Path) -> Result<Option<Repo>> {
        if !cwd.is_dir() {
            return Err(io_err(cwd)(std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory")));
        }
        let out = Git::new(cwd)
            .args([
                "rev-parse",
                "--is-inside-work-tree",
                "--show-toplevel",
                "--path-format=absolute",
                "--git-common-dir",
            ])
            .run()
            .await?;
        if !out.success() {
            if out.stderr.contains("not a git repository") || out.stderr.contains("must be run in a work tree") {
                return Ok(None);
            }
            return Err(out.error());
        }
        let text = out.text();
        let mut lines = text.lines();
        if lines.next() != Some("true") {
            return Ok(None);
        }
        let (Some(toplevel), Some(common_dir)) = (lines.next(), lines.next()) else {
            return Ok(None);
        };
        let toplevel = PathBuf::from(toplevel);
        let branch = current_branch(&toplevel).await?;
        let head_commit = resolve_commit(&toplevel, "HEAD").await?;
        Ok(Some(Repo { toplevel, common_dir: PathBuf::from(common_dir), branch, head_commit }))
    }
}

/// The short name of the branch checked out in `dir`, `None` when HEAD is detached.
pub(crate) async fn current_branch(dir: &Path) -> Result<Option<String>> {
    let out = Git::new(dir).args(["symbolic-ref", "-q", "HEAD"]).run().await?;
    match out.code {
        Some(0) => Ok(out.text().strip_prefix("refs/heads/").map(str::to_owned)),
        Some(1) => Ok(None),
        _ => Err(out.error()),
    }
}
