//! Protected paths: Descartes' own state and control files, never writable by a tool or a
//! sandboxed command (short of `full-access` chosen on the command line).
//!
//! Two kinds: absolute paths the runtime knows (the state directory with the database, spool,
//! evidence and worktree metadata; the config files; the user's policy directory), and names
//! protected in every workspace root ([`PROTECTED_NAMES`]: `.descartes`, `.ai`, `.git/hooks`,
//! `.git/config`, as Codex protects `.git` in workspace-write, and the agent CLIs' project
//! settings: `.claude/settings*.json`, `.codex`, `.gemini/settings.json`, `.gemini/policies`). Paths beneath a protected one
//! can be writable again (`writable_within`: the worktrees under the state directory, where
//! tasks run, except their metadata).
//!
//! File tools check every write with [`Protected::check_write`]; the sandbox helper makes the
//! existing ones read-only for shell commands ([`Protected::mounts`]). A protected path that does
//! not exist yet cannot be made read-only by a mount; file tools still refuse to create it, and
//! the runtime notices a guardrail file that a run created or changed (see the runtime's
//! `guardrails`).

use std::path::{Path, PathBuf};

/// Names protected beneath every workspace root.
/// Besides Descartes' own, the agent CLIs' project settings: a permission rule or a hook written
/// there would run calls without asking Descartes (and the user's next direct use of the CLI).
pub const PROTECTED_NAMES: &[&str] = &[
    ".descartes",
    ".ai",
    ".git/hooks",
    ".git/config",
    ".claude/settings.json",
    ".claude/settings.local.json",
    ".codex",
    ".gemini/settings.json",
    ".gemini/policies",
];

/// The protected paths of a place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protected {
    /// Absolute paths (files or directories) protected wherever they are.
    pub absolute: Vec<PathBuf>,
    /// Paths beneath protected ones that stay writable (each may itself contain protected
    /// paths: a worktree's `.ai` is protected again by [`PROTECTED_NAMES`]).
    pub writable_within: Vec<PathBuf>,
    /// Files no tool may even read (the tokens of the daemon's socket and of the API): the
    /// file tools refuse them, and the sandbox helper mounts `/dev/null` over them.
    pub hidden: Vec<PathBuf>,
    /// Nothing is protected: `full-access` chosen on the command line.
    pub disabled: bool,
}

impl Protected {
    /// Nothing protected.
    pub fn none() -> Self {
        Self { disabled: true, ..Self::default() }
    }

    /// The protected paths for work in `roots` (the call's working directory first), each with
    /// whether it is protected (`true`) or writable again (`false`), canonical where they exist.
    pub fn entries(&self, roots: &[&Path]) -> Vec<(PathBuf, bool)> {
        if self.disabled {
            return Vec::new();
        }
        let mut out: Vec<(PathBuf, bool)> = Vec::new();
        let mut push = |p: PathBuf, protected: bool| {
            let p = canonical_or_self(&p);
            if !out.iter().any(|(q, _)| *q == p) {
                out.push((p, protected));
            }
        };
        for p in &self.absolute {
            push(p.clone(), true);
        }
        for w in &self.writable_within {
            push(w.clone(), false);
        }
        for root in roots {
            for name in PROTECTED_NAMES {
                push(root.join(name), true);
            }
        }
        out
    }

    /// Refuses a write to `path` (canonical, inside `roots`) when it is protected: beneath a
    /// protected entry and not beneath a more specific writable one.
    pub fn check_write(&self, path: &Path, roots: &[&Path]) -> Result<(), String> {
        let entries = self.entries(roots);
        let deepest = entries.iter().filter(|(p, _)| path.starts_with(p)).max_by_key(|(p, _)| p.components().count());
        match deepest {
            Some((p, true)) => Err(format!(
                "`{}` is protected: {} belongs to Descartes (state, configuration, policy or git control files) and \
                 tools may not change it; edit it yourself outside the run",
                path.display(),
                p.display()
            )),
            _ => Ok(()),
        }
    }

    /// Refuses a read of `path` (canonical) when it is a hidden file: a tool that read a token
    /// could answer its own permission asks.
    pub fn check_read(&self, path: &Path) -> Result<(), String> {
        if self.disabled || !self.hidden.iter().any(|h| canonical_or_self(h) == path) {
            return Ok(());
        }
        Err(format!("`{}` holds a secret of Descartes (a token): no tool reads it", path.display()))
    }

    /// What the sandbox helper mounts for a command whose writable paths are `writable`
    /// ([`PROTECTED_NAMES`] taken beneath `name_roots`): protected paths that exist beneath (or around) a writable
    /// path, read-only; and writable paths lying beneath a protected one, writable again.
    pub fn mounts(&self, name_roots: &[&Path], writable: &[&Path]) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let entries = self.entries(name_roots);
        let writable: Vec<PathBuf> = writable.iter().map(|w| canonical_or_self(w)).collect();
        let relevant = |p: &Path| writable.iter().any(|w| p.starts_with(w) || w.starts_with(p));
        let readonly: Vec<PathBuf> =
            entries.iter().filter(|(p, prot)| *prot && p.exists() && relevant(p)).map(|(p, _)| p.clone()).collect();
        let again: Vec<PathBuf> = entries
            .iter()
            .filter(|(_, prot)| !prot)
            .map(|(p, _)| p.clone())
            .chain(writable.iter().cloned())
            .filter(|p| p.exists() && readonly.iter().any(|r| p.starts_with(r) && p != r))
            .collect();
        // A protected path inside a writable-again one is protected again after it.
        (readonly, again)
    }
}

fn canonical_or_self(p: &Path) -> PathBuf {
    // The longest existing ancestor, canonicalized, with the rest appended.
    let mut existing = p.to_owned();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name().map(|n| n.to_owned()), existing.parent().map(Path::to_owned)) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent;
            }
            _ => return p.to_owned(),
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for name in rest.iter().rev() {
        out.push(name);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn writes_beneath_protected_paths_are_refused_unless_writable_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let state = root.join(".descartes");
        std::fs::create_dir_all(state.join("worktrees/t1/.ai")).unwrap();
        let p = Protected {
            absolute: vec![state.clone(), state.join("worktrees/.meta"), PathBuf::from("/etc/descartes.toml")],
            writable_within: vec![state.join("worktrees")],
            ..Protected::default()
        };
        let roots = [root.as_path()];
        for bad in [
            state.join("config.toml"),
            state.join("descartes.db"),
            root.join(".ai/policy.yaml"),
            root.join(".ai"),
            root.join(".git/hooks/pre-commit"),
            root.join(".git/config"),
        ] {
            let err = p.check_write(&bad, &roots).unwrap_err();
            assert!(err.contains("is protected"), "{err}");
        }
        for good in [root.join("src/main.rs"), root.join(".git/HEAD"), root.join(".gitignore"), root.join(".aix")] {
            p.check_write(&good, &roots).unwrap();
        }
        // A worktree under the state directory is writable, its own `.ai` is not.
        let wt = state.join("worktrees/t1");
        let wt_roots = [wt.as_path()];
        p.check_write(&wt.join("src/lib.rs"), &wt_roots).unwrap();
        assert!(p.check_write(&wt.join(".ai/policy.yaml"), &wt_roots).is_err());
        assert!(p.check_write(&state.join("worktrees/.meta/t1.json"), &wt_roots).is_err());
        // Disabled: nothing is protected.
        Protected::none().check_write(&state.join("config.toml"), &roots).unwrap();
    }

    #[test]
    fn mounts_cover_existing_protected_paths_near_the_writable_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let state = root.join(".descartes");
        let spool = state.join("spool/run/call");
        std::fs::create_dir_all(&spool).unwrap();
        std::fs::create_dir_all(root.join(".git/hooks")).unwrap();
        let p = Protected { absolute: vec![state.clone()], ..Protected::default() };
        let (ro, again) = p.mounts(&[root.as_path()], &[root.as_path(), spool.as_path()]);
        assert!(ro.contains(&state) && ro.contains(&root.join(".git/hooks")), "{ro:?}");
        assert!(!ro.contains(&root.join(".ai")), "missing paths are not mounted: {ro:?}");
        assert_eq!(again, vec![spool.clone()]);
    }
}
