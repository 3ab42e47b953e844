//! Running the `git` program.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::{COMMIT_EMAIL, COMMIT_NAME, Error, Result};

/// Variables that would point git somewhere else than the directory we name with `-C`.
const SCRUBBED: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
    "GIT_QUARANTINE_PATH",
];

/// What a git command printed and how it ended.
#[derive(Debug)]
pub(crate) struct Output {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub command: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The error for this (failed) command.
    pub fn error(self) -> Error {
        Error::Git { command: self.command, code: self.code, stderr: self.stderr.trim().to_owned() }
    }

    /// Standard output as text, trailing newline removed.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim_end_matches(['\n', '\r']).to_owned()
    }
}

/// A git command in `dir` (`git -C dir ...`).
#[derive(Debug)]
pub(crate) struct Git {
    dir: PathBuf,
    args: Vec<OsString>,
    identity: bool,
}

impl Git {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned(), args: Vec::new(), identity: false }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Commits made by this command are Descartes' (author and committer), unsigned.
    pub fn by_descartes(mut self) -> Self {
        self.identity = true;
        self
    }

    fn display(&self) -> String {
        let mut s = format!("git -C {}", self.dir.display());
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// Runs the command whatever its exit code.
    pub async fn run(self) -> Result<Output> {
        let command = self.display();
        let mut cmd = tokio::process::Command::new("git");
        if self.identity {
            cmd.args(["-c", "commit.gpgSign=false"]);
            for (k, v) in [
                ("GIT_AUTHOR_NAME", COMMIT_NAME),
                ("GIT_AUTHOR_EMAIL", COMMIT_EMAIL),
                ("GIT_COMMITTER_NAME", COMMIT_NAME),
                ("GIT_COMMITTER_EMAIL", COMMIT_EMAIL),
            ] {
                cmd.env(k, v);
            }
        }
        cmd.arg("-C").arg(&self.dir).args(&self.args);
        for var in SCRUBBED {
            cmd.env_remove(var);
        }
        cmd.env("LC_ALL", "C")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_EDITOR", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let out = cmd.output().await.map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::GitMissing { source },
            _ => Error::Git { command: command.clone(), code: None, stderr: source.to_string() },
        })?;
        Ok(Output {
            code: out.status.code(),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            command,
        })
    }

    /// Runs the command; a non-zero exit is an error.
    pub async fn ok(self) -> Result<Output> {
        let out = self.run().await?;
        if out.success() { Ok(out) } else { Err(out.error()) }
    }

    /// Runs the command and returns its standard output as text (trimmed at the end).
    pub async fn text(self) -> Result<String> {
        Ok(self.ok().await?.text())
    }
}

/// The commit a revision names, or `None` when it names none.
pub(crate) async fn resolve_commit(dir: &Path, rev: &str) -> Result<Option<String>> {
    let out = Git::new(dir).args(["rev-parse", "-q", "--verify"]).arg(format!("{rev}^{{commit}}")).run().await?;
    match out.code {
        Some(0) => Ok(Some(out.text())),
        Some(1) => Ok(None),
        // `fatal: ... ambiguous argument` and the like: no such commit.
        Some(128) if !out.stderr.contains("not a git repository") => Ok(None),
        _ => Err(out.error()),
    }
}

/// Whether `a` is an ancestor of `b` (or equal to it).
pub(crate) async fn is_ancestor(dir: &Path, a: &str, b: &str) -> Result<bool> {
    let out = Git::new(dir).args(["merge-base", "--is-ancestor", a, b]).run().await?;
    match out.code {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(out.error()),
    }
}

/// Splits NUL-separated output into lossy strings (an empty last field is dropped).
pub(crate) fn split_nul(bytes: &[u8]) -> Vec<String> {
    let mut fields: Vec<String> = bytes.split(|b| *b == 0).map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    if fields.last().is_some_and(|f| f.is_empty()) {
        fields.pop();
    }
    fields
}

/// One entry of `git worktree list --porcelain -z`.
#[derive(Debug, Clone, Default)]
pub(crate) struct WorktreeEntry {
    pub path: PathBuf,
    /// The full ref name (`refs/heads/...`) checked out there, if any.
    pub branch: Option<String>,
    pub bare: bool,
    pub locked: Option<String>,
    pub prunable: bool,
}

pub(crate) async fn list_worktrees(dir: &Path) -> Result<Vec<WorktreeEntry>> {
    let out = Git::new(dir).args(["worktree", "list", "--porcelain", "-z"]).ok().await?;
    let mut entries = Vec::new();
    let mut current: Option<WorktreeEntry> = None;
    for field in out.stdout.split(|b| *b == 0) {
        let field = String::from_utf8_lossy(field);
        if field.is_empty() {
            entries.extend(current.take());
            continue;
        }
        let (key, value) = field.split_once(' ').unwrap_or((&field, ""));
        match key {
            "worktree" => {
                entries.extend(current.take());
                current = Some(WorktreeEntry { path: PathBuf::from(value), ..Default::default() });
            }
            _ => {
                let Some(e) = current.as_mut() else { continue };
                match key {
                    "branch" => e.branch = Some(value.to_owned()),
                    "bare" => e.bare = true,
                    "locked" => e.locked = Some(value.to_owned()),
                    "prunable" => e.prunable = true,
                    _ => {}
                }
            }
        }
    }
    entries.extend(current);
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_fields() {
        assert_eq!(split_nul(b"a\0b c\0"), vec!["a", "b c"]);
        assert_eq!(split_nul(b""), Vec::<String>::new());
    }
}
