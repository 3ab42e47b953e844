//! Merging a task branch into its base branch.
//!
//! See [`Worktrees::merge`] for the rules.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::git::{Git, is_ancestor, list_worktrees, resolve_commit, split_nul};
use crate::{Error, MergeError, Result, Worktree, Worktrees};

/// How the base branch was updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeKind {
    /// The task branch was already merged: nothing changed.
    UpToDate,
    /// The base branch now points at the task branch's head.
    FastForward,
    /// A merge commit (parents: the base branch's head, the task branch's head) was made.
    MergeCommit,
}

/// The result of [`Worktrees::merge`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeOutcome {
    pub kind: MergeKind,
    /// The branch merged into.
    pub base_branch: String,
    /// Its commit before the merge.
    pub previous_commit: String,
    /// Its commit after the merge.
    pub commit: String,
    /// The checkout of the base branch that was updated along with it, if it was checked out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkout_updated: Option<PathBuf>,
}

impl Worktrees {
    /// Merges the task branch into its base branch. Refusals are [`Error::Merge`]; after one, no
    /// ref and no file of any checkout has changed.
    ///
    /// The rules, in order:
    /// 1. The task branch is already contained in the base branch: nothing to do
    ///    ([`MergeKind::UpToDate`]).
    /// 2. The base branch has not moved since the task started (it is an ancestor of the task
    ///    branch): fast-forward ([`MergeKind::FastForward`]).
    /// 3. Otherwise the merge is computed without touching any working tree (`git merge-tree
    ///    --write-tree`): on conflict the merge is refused with the conflicting paths
    ///    ([`MergeError::Conflict`]) and nothing is changed; else a merge commit with the base and
    ///    the task as parents is made (`git commit-tree`, [`MergeKind::MergeCommit`]).
    /// 4. The base branch is moved to the new commit:
    ///    - if it is checked out in a worktree (typically the user's checkout), that worktree must
    ///      have no uncommitted changes to tracked files ([`MergeError::DirtyCheckout`]; untracked
    ///      files are allowed unless the merge would overwrite one, [`MergeError::CheckoutRefused`]),
    ///      and it is updated by `git merge --ff-only <commit>` run there, which moves the branch
    ///      and the files together (and refuses if the branch moved meanwhile);
    ///    - otherwise the ref is updated with a compare-and-swap (`git update-ref <ref> <new>
    ///      <old>`), so a concurrent change of the base branch is never overwritten
    ///      ([`MergeError::BaseMoved`]).
    ///
    /// Only the task branch's commits are merged: uncommitted changes in the task's worktree are
    /// not ([`crate::collect_evidence`] commits them first). The task's worktree and branch are
    /// kept ([`Worktrees::discard`] removes them).
    pub async fn merge(&self, wt: &Worktree) -> Result<MergeOutcome> {
        let _serial = self.merge_lock.lock().await;
        let dir = self.repo.toplevel.clone();
        let Some(base_branch) = wt.base_branch.clone() else {
            return Err(MergeError::NoBaseBranch {
                task_id: wt.task_id.clone(),
                base_commit: wt.base_commit.clone(),
                branch: wt.branch.clone(),
            }
            .into());
        };
        let base_ref = format!("refs/heads/{base_branch}");
        let task_ref = format!("refs/heads/{}", wt.branch);
        let task_head =
            resolve_commit(&dir, &task_ref).await?.ok_or_else(|| Error::BranchMissing { branch: wt.branch.clone() })?;
        let base_head = resolve_commit(&dir, &base_ref)
            .await?
            .ok_or_else(|| MergeError::BaseBranchMissing { base_branch: base_branch.clone() })?;

        if is_ancestor(&dir, &task_head, &base_head).await? {
            return Ok(MergeOutcome {
                kind: MergeKind::UpToDate,
                base_branch,
                previous_commit: base_head.clone(),
                commit: base_head,
                checkout_updated: None,
            });
        }
        let (kind, new) = if is_ancestor(&dir, &base_head, &task_head).await? {
            (MergeKind::FastForward, task_head.clone())
        } else {
            let out = Git::new(&dir)
                .args(["merge-tree", "--write-tree", "--name-only", "--no-messages", "-z", &base_head, &task_head])
                .run()
                .await?;
            let mut fields = split_nul(&out.stdout).into_iter();
            match out.code {
                Some(0) => {}
                Some(1) => {
                    let _tree = fields.next();
                    let mut files: Vec<String> = Vec::new();
                    for f in fields {
                        if !f.is_empty() && !files.contains(&f) {
                            files.push(f);
                        }
                    }
                    return Err(MergeError::Conflict { task_branch: wt.branch.clone(), base_branch, files }.into());
                }
                _ => return Err(out.error()),
            }
            let tree = fields.next().unwrap_or_default();
            let message = format!("Merge task {} ({}) into {base_branch}", wt.task_id, wt.branch);
            let commit = Git::new(&dir)
                .by_descartes()
                .args(["commit-tree", &tree, "-p", &base_head, "-p", &task_head, "-m", &message])
                .text()
                .await?;
            (MergeKind::MergeCommit, commit)
        };

        let checkout = list_worktrees(&dir)
            .await?
            .into_iter()
            .find(|e| !e.bare && !e.prunable && e.branch.as_deref() == Some(base_ref.as_str()) && e.path.is_dir());
        let reflog = format!("descartes: merge task {} ({})", wt.task_id, wt.branch);
        let checkout_updated = match checkout {
            Some(entry) => {
                let status = Git::new(&entry.path)
                    .args(["status", "--porcelain=v1", "-z", "--untracked-files=no", "--ignore-submodules=none"])
                    .run()
                    .await?;
                if !status.success() {
                    return Err(status.error());
                }
                let dirty = porcelain_paths(&status.stdout);
                if !dirty.is_empty() {
                    return Err(MergeError::DirtyCheckout { base_branch, path: entry.path, files: dirty }.into());
                }
                let out = Git::new(&entry.path)
                    .args(["merge", "--ff-only", "--quiet", "--no-stat", "--no-edit", &new])
                    .run()
                    .await?;
                if !out.success() {
                    if resolve_commit(&dir, &base_ref).await?.as_deref() != Some(base_head.as_str()) {
                        return Err(MergeError::BaseMoved { base_branch }.into());
                    }
                    return Err(MergeError::CheckoutRefused {
                        base_branch,
                        path: entry.path,
                        message: out.stderr.trim().to_owned(),
                    }
                    .into());
                }
                Some(entry.path)
            }
            None => {
                let out = Git::new(&dir).args(["update-ref", "-m", &reflog, &base_ref, &new, &base_head]).run().await?;
                if !out.success() {
                    if resolve_commit(&dir, &base_ref).await?.as_deref() != Some(base_head.as_str()) {
                        return Err(MergeError::BaseMoved { base_branch }.into());
                    }
                    return Err(out.error());
                }
                None
            }
        };
        Ok(MergeOutcome { kind, base_branch, previous_commit: base_head, commit: new, checkout_updated })
    }
}

/// The paths of `git status --porcelain=v1 -z` (the source of a rename skipped).
fn porcelain_paths(bytes: &[u8]) -> Vec<String> {
    let mut paths = Vec::new();
    let mut fields = split_nul(bytes).into_iter();
    while let Some(f) = fields.next() {
        if f.len() < 4 {
            continue;
        }
        let (xy, path) = f.split_at(3);
        if xy.starts_with('R') || xy.starts_with('C') {
            fields.next();
        }
        paths.push(path.to_owned());
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn porcelain() {
        assert_eq!(porcelain_paths(b" M a.txt\0R  new\0old\0?? x\0"), vec!["a.txt", "new", "x"]);
    }
}
