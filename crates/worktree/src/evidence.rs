//! What a task did: its commits, diff, changed files, and test results.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::git::{Git, split_nul};
use crate::repo::current_branch;
use crate::{Error, Result, Worktree};

/// What [`collect_evidence`] does besides the diff.
#[derive(Debug, Clone)]
pub struct EvidenceOptions {
    /// A command run with `sh -c` in the worktree after the changes are committed (its exit
    /// code and output are recorded; a failure is evidence, not an error).
    pub test_command: Option<String>,
    /// The task's path locks (globs relative to the repository root, `*` not crossing `/`, as
    /// in task locks). Changed paths matching none of them are flagged; no globs, no flags.
    pub lock_globs: Vec<String>,
    /// The test command is killed (its whole process group) after this long.
    pub test_timeout: Duration,
    /// The test output kept: the first and last halves of this many bytes.
    pub max_output_bytes: usize,
}

impl Default for EvidenceOptions {
    fn default() -> Self {
        Self {
            test_command: None,
            lock_globs: Vec::new(),
            test_timeout: Duration::from_secs(600),
            max_output_bytes: 64 * 1024,
        }
    }
}

/// What a task did, collected from its worktree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub task_id: String,
    pub branch: String,
    pub base_commit: String,
    /// The task branch's commit when the evidence was collected.
    pub head_commit: String,
    /// The commit [`collect_evidence`] made of changes the agent left uncommitted, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_commit: Option<String>,
    /// `git diff <base_commit> <head_commit>` (with rename detection, no colour, `a/`/`b/`
    /// prefixes; binary files as "Binary files ... differ"; bytes that are not UTF-8 replaced).
    pub diff: String,
    pub changed_files: Vec<ChangedFile>,
    /// Changed paths (both sides of a rename) matching none of the lock globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outside_locks: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<TestResult>,
}

/// A path changed between the base commit and the task branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedFile {
    /// The path relative to the repository root (the new path of a rename).
    pub path: String,
    pub status: FileStatus,
    /// The old path of a rename.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_path: Option<String>,
}

/// How a path changed (a type change, file ↔ symlink, counts as modified; a copy as added).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    Added,
    Modified,
    Deleted,
    Renamed,
}

/// The result of the test command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResult {
    pub command: String,
    /// The exit code; `None` when the command was killed by a signal (a timeout included).
    pub exit_code: Option<i32>,
    /// Whether it was killed for taking longer than the timeout.
    #[serde(default)]
    pub timed_out: bool,
    /// Standard output and standard error interleaved as written, clipped to the head and the
    /// tail with a `[... N bytes omitted ...]` line between them.
    pub output: String,
    /// How many bytes the command wrote in all.
    pub output_bytes: u64,
    pub duration_ms: u64,
}

impl TestResult {
    /// Exit code 0 within the timeout.
    pub fn passed(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }
}

/// Collects the evidence of the task in `wt`:
/// 1. whatever the agent left uncommitted (untracked files included, ignored files not) is
///    committed on the task branch by `Descartes <descartes@localhost>` with a message naming
///    the task (nothing to commit is fine);
/// 2. the diff and the changed paths between the base commit and the branch's head;
/// 3. changed paths outside the lock globs;
/// 4. the test command, if any, in the worktree (after the commit, so what it builds is not
///    committed).
///
/// The worktree must be on its task branch ([`Error::NotOnTaskBranch`] otherwise). Safe to call
/// again: a second call commits only what changed since.
pub async fn collect_evidence(wt: &Worktree, opts: &EvidenceOptions) -> Result<Evidence> {
    let locks = lock_set(&opts.lock_globs)?;
    if !wt.path.is_dir() {
        return Err(Error::WorktreeMissing { path: wt.path.clone() });
    }
    let on = current_branch(&wt.path).await?;
    if on.as_deref() != Some(wt.branch.as_str()) {
        return Err(Error::NotOnTaskBranch { path: wt.path.clone(), expected: wt.branch.clone(), found: on });
    }
    Git::new(&wt.path).args(["add", "--all"]).ok().await?;
    let staged = Git::new(&wt.path).args(["diff", "--cached", "--quiet", "--no-ext-diff"]).run().await?;
    let auto_commit = match staged.code {
        Some(0) => None,
        Some(1) => {
            let message = format!(
                "descartes: changes left uncommitted by task {}\n\nCommitted by Descartes when collecting the task's evidence.",
                wt.task_id
            );
            Git::new(&wt.path).by_descartes().args(["commit", "--quiet", "--no-verify", "-m", &message]).ok().await?;
            Some(Git::new(&wt.path).args(["rev-parse", "HEAD"]).text().await?)
        }
        _ => return Err(staged.error()),
    };
    let head_commit = match &auto_commit {
        Some(c) => c.clone(),
        None => Git::new(&wt.path).args(["rev-parse", "HEAD"]).text().await?,
    };
    let diff_text = diff_between(&wt.path, &wt.base_commit, &head_commit).await?;
    let changed_files = changed_between(&wt.path, &wt.base_commit, &head_commit).await?;
    let outside = match &locks {
        Some(set) => outside(set, &changed_files),
        None => Vec::new(),
    };
    let test = match &opts.test_command {
        Some(command) => Some(run_test(&wt.path, command, opts.test_timeout, opts.max_output_bytes).await?),
        None => None,
    };
    Ok(Evidence {
        task_id: wt.task_id.clone(),
        branch: wt.branch.clone(),
        base_commit: wt.base_commit.clone(),
        head_commit,
        auto_commit,
        diff: diff_text,
        changed_files,
        outside_locks: outside,
        test,
    })
}

/// The committed diff of the task branch against its base (`git diff <base_commit> <branch>`);
/// uncommitted changes are not included.
pub async fn diff(wt: &Worktree) -> Result<String> {
    let dir = if wt.path.is_dir() { wt.path.as_path() } else { wt.repo.as_path() };
    diff_between(dir, &wt.base_commit, &format!("refs/heads/{}", wt.branch)).await
}

async fn diff_between(dir: &Path, base: &str, head: &str) -> Result<String> {
    let out = Git::new(dir)
        .args(["-c", "core.quotePath=false", "diff", "--no-color", "--no-ext-diff", "--no-textconv", "--find-renames"])
        .args(["--no-relative", "--src-prefix=a/", "--dst-prefix=b/", base, head, "--"])
        .ok()
        .await?;
    Ok(String::from_utf8(out.stdout).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

async fn changed_between(dir: &Path, base: &str, head: &str) -> Result<Vec<ChangedFile>> {
    let out = Git::new(dir)
        .args(["diff", "--name-status", "-z", "--no-ext-diff", "--find-renames", "--no-relative", base, head, "--"])
        .ok()
        .await?;
    let fields = split_nul(&out.stdout);
    let mut files = Vec::new();
    let mut it = fields.into_iter();
    while let Some(code) = it.next() {
        let Some(path) = it.next() else { break };
        let file = match code.chars().next() {
            Some('C') => {
                // A copy: `C<score> <from> <to>`.
                let to = it.next().unwrap_or_default();
                ChangedFile { path: to, status: FileStatus::Added, old_path: None }
            }
            Some('R') => {
                let to = it.next().unwrap_or_default();
                ChangedFile { path: to, status: FileStatus::Renamed, old_path: Some(path) }
            }
            Some('A') => ChangedFile { path, status: FileStatus::Added, old_path: None },
            Some('D') => ChangedFile { path, status: FileStatus::Deleted, old_path: None },
            _ => ChangedFile { path, status: FileStatus::Modified, old_path: None },
        };
        files.push(file);
    }
    Ok(files)
}

fn lock_set(globs: &[String]) -> Result<Option<globset::GlobSet>> {
    if globs.is_empty() {
        return Ok(None);
    }
    let mut builder = globset::GlobSetBuilder::new();
    for glob in globs {
        let g = globset::GlobBuilder::new(glob)
            .literal_separator(true)
            .build()
            .map_err(|e| Error::InvalidGlob { glob: glob.clone(), message: e.kind().to_string() })?;
        builder.add(g);
    }
    builder.build().map(Some).map_err(|e| Error::InvalidGlob { glob: globs.join(" "), message: e.to_string() })
}

fn outside(set: &globset::GlobSet, files: &[ChangedFile]) -> Vec<String> {
    let mut flagged = Vec::new();
    for f in files {
        for p in std::iter::once(&f.path).chain(f.old_path.as_ref()) {
            if !set.is_match(p) && !flagged.contains(p) {
                flagged.push(p.clone());
            }
        }
    }
    flagged
}

/// The changed paths (both sides of renames) that match none of `lock_globs`; empty when
/// `lock_globs` is empty.
pub fn outside_locks(files: &[ChangedFile], lock_globs: &[String]) -> Result<Vec<String>> {
    Ok(match lock_set(lock_globs)? {
        Some(set) => outside(&set, files),
        None => Vec::new(),
    })
}

/// Head and tail of a byte stream.
struct Clip {
    max: usize,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    total: u64,
}

impl Clip {
    fn new(max: usize) -> Self {
        Self { max, head: Vec::new(), tail: std::collections::VecDeque::new(), total: 0 }
    }

    fn push(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let head_max = self.max / 2;
        if self.head.len() < head_max {
            let n = (head_max - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        let tail_max = self.max - head_max;
        if bytes.len() >= tail_max {
            self.tail.clear();
            self.tail.extend(&bytes[bytes.len() - tail_max..]);
        } else {
            let excess = (self.tail.len() + bytes.len()).saturating_sub(tail_max);
            self.tail.drain(..excess);
            self.tail.extend(bytes);
        }
    }

    fn finish(self) -> (String, u64) {
        let kept = (self.head.len() + self.tail.len()) as u64;
        let mut out = self.head;
        if self.total > kept {
            out.extend_from_slice(format!("\n[... {} bytes omitted ...]\n", self.total - kept).as_bytes());
        }
        out.extend(self.tail);
        (String::from_utf8_lossy(&out).into_owned(), self.total)
    }
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // ESRCH (already gone) is fine.
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Runs `sh -c command` in `dir`, in its own process group, stdin closed, stdout and stderr into
/// one pipe. When the shell exits, what it left running in the background is killed; after
/// `timeout`, the whole group is.
async fn run_test(dir: &Path, command: &str, timeout: Duration, max_output: usize) -> Result<TestResult> {
    let spawn_err = |source| Error::TestSpawn { command: command.to_owned(), source };
    let (reader, writer) = std::io::pipe().map_err(spawn_err)?;
    let writer2 = writer.try_clone().map_err(spawn_err)?;
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .process_group(0)
        .kill_on_drop(true);
    for var in ["GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"] {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().map_err(spawn_err)?;
    // Our copies of the write end must be closed, or the pipe never reaches end of file.
    drop(cmd);
    let pid = child.id();
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader)).map_err(spawn_err)?;

    let mut clip = Clip::new(max_output);
    let mut chunk = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + timeout;
    let mut status = None;
    let mut eof = false;
    let mut timed_out = false;
    // After the command is over, the pipe is drained for at most this long (a process that left
    // the group may still hold it open).
    let mut drain_until: Option<tokio::time::Instant> = None;
    while !eof || status.is_none() {
        let until = drain_until.map_or(deadline, |d| d.min(deadline));
        tokio::select! {
            r = pipe.read(&mut chunk), if !eof => match r {
                Ok(0) => eof = true,
                Ok(n) => clip.push(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => eof = true,
            },
            s = child.wait(), if status.is_none() => {
                let s = s.map_err(spawn_err)?;
                kill_group(pid);
                status = Some(s);
                drain_until = Some(tokio::time::Instant::now() + Duration::from_secs(2));
            },
            _ = tokio::time::sleep_until(until) => {
                if status.is_none() {
                    timed_out = true;
                    kill_group(pid);
                    status = Some(child.wait().await.map_err(spawn_err)?);
                    drain_until = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                } else {
                    break;
                }
            },
        }
    }
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (output, output_bytes) = clip.finish();
    let exit_code = if timed_out { None } else { status.and_then(|s| s.code()) };
    Ok(TestResult { command: command.to_owned(), exit_code, timed_out, output, output_bytes, duration_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_head_and_tail() {
        let mut c = Clip::new(10);
        c.push(b"0123");
        c.push(b"456789abcdef");
        c.push(b"XYZ");
        let (out, total) = c.finish();
        assert_eq!(total, 19);
        assert_eq!(out, "01234\n[... 9 bytes omitted ...]\nefXYZ");
        let mut c = Clip::new(100);
        c.push(b"short");
        assert_eq!(c.finish(), ("short".to_owned(), 5));
    }

    #[test]
    fn lock_flags() {
        let files = vec![
            ChangedFile { path: "src/a.rs".into(), status: FileStatus::Modified, old_path: None },
            ChangedFile { path: "src/deep/b.rs".into(), status: FileStatus::Added, old_path: None },
            ChangedFile {
                path: "docs/new.md".into(),
                status: FileStatus::Renamed,
                old_path: Some("src/old.md".into()),
            },
            ChangedFile { path: "README.md".into(), status: FileStatus::Deleted, old_path: None },
        ];
        assert_eq!(
            outside_locks(&files, &["src/*".into()]).unwrap(),
            vec!["src/deep/b.rs", "docs/new.md", "README.md"]
        );
        assert_eq!(outside_locks(&files, &["src/**".into(), "docs/**".into()]).unwrap(), vec!["README.md"]);
        assert!(outside_locks(&files, &[]).unwrap().is_empty());
        assert!(matches!(outside_locks(&files, &["src/[".into()]), Err(Error::InvalidGlob { .. })));
    }
}
