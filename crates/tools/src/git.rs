//! `git_status`, `git_diff` and `git_log` through gitoxide (no `git` binary needed).
//!
//! `git_diff` compares blobs itself (index or HEAD against the worktree or the index, found by
//! gix's status) and renders unified hunks with gix's `UnifiedDiff`: what `git diff` and
//! `git diff --cached` show for text files, without rename detection and with binary files
//! reported as such.

use async_trait::async_trait;
use descartes_core::{Tool, ToolContext, ToolOutput};
use descartes_protocol::ToolSpec;
use gix::bstr::ByteSlice;
use serde_json::{Value, json};

use crate::confine::Workspace;
use crate::fs::{bool_arg, confined, uint_arg};
use crate::{clip, str_arg};

fn describe() -> Value {
    json!({"type": "string", "description": "A directory inside the repository, default the working directory"})
}

/// Where to look for the repository: the confined `path` argument (opened on the blocking
/// thread: a `gix::Repository` is not `Send` without gix's `parallel` feature).
struct RepoAt {
    dir: std::path::PathBuf,
    shown: String,
}

impl RepoAt {
    fn open(&self) -> Result<gix::Repository, ToolOutput> {
        gix::discover(&self.dir)
            .map_err(|e| ToolOutput::error(format!("`{}` is not in a git repository: {e}", self.shown)))
    }
}

fn open_repo(ws: &Workspace, ctx: &ToolContext, input: &Value) -> Result<RepoAt, ToolOutput> {
    let path = if input.get("path").is_some_and(|p| !p.is_null()) { str_arg(input, "path")? } else { ".".into() };
    Ok(RepoAt { dir: confined(ws, ctx, &path)?, shown: path })
}

fn err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> ToolOutput + '_ {
    move |e| ToolOutput::error(format!("{what}: {e}"))
}

async fn blocking(f: impl FnOnce() -> ToolOutput + Send + 'static) -> ToolOutput {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| ToolOutput::error(format!("git tool failed: {e}")))
}

macro_rules! read_only_tool {
    () => {
        fn read_only(&self) -> bool {
            true
        }
        fn idempotent(&self) -> bool {
            true
        }
        fn timeout(&self) -> Option<std::time::Duration> {
            Some(std::time::Duration::from_secs(120))
        }
    };
}

/// `git_status {"path"?}`: branch, staged changes, unstaged changes and untracked files.
#[derive(Debug, Clone)]
pub struct GitStatusTool {
    pub max_bytes: usize,
    pub workspace: Workspace,
}

#[async_trait]
impl Tool for GitStatusTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "git_status".into(),
            description: "Show the git status of the repository containing `path`: the branch, then one line per \
                          changed path: `staged <kind> <path>` (HEAD vs index), `unstaged <kind> <path>` (index vs \
                          worktree) or `untracked <path>`. Paths are relative to the repository root."
                .into(),
            input_schema: json!({
                "type": "object",
                "properties": {"path": describe()},
                "additionalProperties": false
            }),
        }
    }
    read_only_tool!();
    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput {
        let repo = match open_repo(&self.workspace, ctx, &input) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let max = self.max_bytes;
        blocking(move || match repo.open().and_then(|repo| status_lines(&repo)) {
            Ok((branch, lines)) => {
                let mut text = format!("branch: {branch}\n");
                if lines.is_empty() {
                    text.push_str("clean: nothing to commit\n");
                }
                for l in &lines {
                    text.push_str(l);
                    text.push('\n');
                }
                let (text, truncated) = clip(text.as_bytes(), max);
                ToolOutput::ok(text).with_details(json!({"changes": lines.len(), "truncated": truncated}))
            }
            Err(e) => e,
        })
        .await
    }
}

fn branch_of(repo: &gix::Repository) -> String {
    match repo.head_name() {
        Ok(Some(name)) => name.shorten().to_string(),
        Ok(None) => "(detached HEAD)".into(),
        Err(e) => format!("(unknown: {e})"),
    }
}

fn summary_word(s: gix::status::index_worktree::iter::Summary) -> &'static str {
    use gix::status::index_worktree::iter::Summary::*;
    match s {
        Added => "added",
        Removed => "deleted",
        Modified => "modified",
        TypeChange => "typechange",
        Renamed => "renamed",
        Copied => "copied",
        IntentToAdd => "intent-to-add",
        Conflict => "conflict",
    }
}

fn status_lines(repo: &gix::Repository) -> Result<(String, Vec<String>), ToolOutput> {
    let iter = repo
        .status(gix::progress::Discard)
        .map_err(|e| err("cannot read the status")(&e))?
        .untracked_files(gix::status::UntrackedFiles::Files)
        .into_iter(None)
        .map_err(|e| err("cannot read the status")(&e))?;
    let mut lines = Vec::new();
    for item in iter {
        let item = item.map_err(|e| err("cannot read the status")(&e))?;
        match &item {
            gix::status::Item::TreeIndex(change) => {
                use gix::diff::index::ChangeRef::*;
                let line = match change {
                    Addition { location, .. } => format!("staged added {location}"),
                    Deletion { location, .. } => format!("staged deleted {location}"),
                    Modification { location, .. } => format!("staged modified {location}"),
                    Rewrite { source_location, location, copy, .. } => {
                        format!("staged {} {source_location} -> {location}", if *copy { "copied" } else { "renamed" })
                    }
                };
                lines.push(line);
            }
            gix::status::Item::IndexWorktree(change) => match change.summary() {
                Some(gix::status::index_worktree::iter::Summary::Added) => {
                    lines.push(format!("untracked {}", change.rela_path()));
                }
                Some(s) => lines.push(format!("unstaged {} {}", summary_word(s), change.rela_path())),
                None => {}
            },
        }
    }
    lines.sort_by(|a, b| a.split(' ').next_back().cmp(&b.split(' ').next_back()).then(a.cmp(b)));
    Ok((branch_of(repo), lines))
}

/// `git_diff {"path"?, "staged"?, "context_lines"?}`: unified diff of the worktree against the
/// index, or of the index against HEAD.
#[derive(Debug, Clone)]
pub struct GitDiffTool {
    pub max_bytes: usize,
    pub workspace: Workspace,
}

#[async_trait]
impl Tool for GitDiffTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "git_diff".into(),
            description: "Show a unified diff of the repository containing `path`: by default the unstaged changes \
                          (worktree vs index, like `git diff`), with `staged: true` the staged ones (index vs HEAD, \
                          like `git diff --cached`). Untracked files are not shown (see git_status). Large diffs \
                          are clipped."
                .into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "path": describe(),
                    "staged": {"type": "boolean", "description": "Diff the index against HEAD instead (default false)"},
                    "context_lines": {"type": "integer", "minimum": 0, "maximum": 100, "description": "Lines of context around changes (default 3)"}
                },
                "additionalProperties": false
            }),
        }
    }
    read_only_tool!();
    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput {
        let args = (|| -> Result<_, ToolOutput> {
            Ok((
                open_repo(&self.workspace, ctx, &input)?,
                bool_arg(&input, "staged")?,
                uint_arg(&input, "context_lines")?.unwrap_or(3).min(100) as u32,
            ))
        })();
        let (repo, staged, context) = match args {
            Ok(a) => a,
            Err(e) => return e,
        };
        let max = self.max_bytes;
        blocking(move || match repo.open().and_then(|repo| diff_text(&repo, staged, context)) {
            Ok((text, files)) => {
                let text = if files == 0 { "no changes\n".to_owned() } else { text };
                let (text, truncated) = clip(text.as_bytes(), max);
                ToolOutput::ok(text).with_details(json!({"files": files, "truncated": truncated}))
            }
            Err(e) => e,
        })
        .await
    }
}

fn blob(repo: &gix::Repository, id: &gix::oid) -> Result<Vec<u8>, ToolOutput> {
    repo.find_blob(id.to_owned()).map(|b| b.detach().data).map_err(|e| err("cannot read a blob")(&e))
}

fn unified(path: &str, old: Option<&[u8]>, new: Option<&[u8]>, context: u32) -> Result<String, ToolOutput> {
    use gix::diff::blob::unified_diff::{ConsumeBinaryHunk, ContextSize};
    use gix::diff::blob::{Algorithm, Diff, InternedInput, UnifiedDiff};
    let (a, b) = (old.unwrap_or_default(), new.unwrap_or_default());
    let mut out = format!("diff --git a/{path} b/{path}\n");
    match (old, new) {
        (None, _) => out.push_str("new file\n--- /dev/null\n"),
        (_, None) => out.push_str(&format!("deleted file\n--- a/{path}\n")),
        _ => out.push_str(&format!("--- a/{path}\n")),
    }
    out.push_str(&if new.is_none() { "+++ /dev/null\n".to_owned() } else { format!("+++ b/{path}\n") });
    if a.contains(&0) || b.contains(&0) {
        out.push_str("Binary files differ\n");
        return Ok(out);
    }
    let (a, b) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));
    let input = InternedInput::new(a.as_ref(), b.as_ref());
    let diff = Diff::compute(Algorithm::Histogram, &input);
    let hunks =
        UnifiedDiff::new(&diff, &input, ConsumeBinaryHunk::new(String::new(), "\n"), ContextSize::symmetrical(context))
            .consume()
            .map_err(|e| err("cannot render the diff")(&e))?;
    out.push_str(&hunks);
    Ok(out)
}

fn diff_text(repo: &gix::Repository, staged: bool, context: u32) -> Result<(String, usize), ToolOutput> {
    let iter = repo
        .status(gix::progress::Discard)
        .map_err(|e| err("cannot read the status")(&e))?
        .untracked_files(gix::status::UntrackedFiles::None)
        .into_iter(None)
        .map_err(|e| err("cannot read the status")(&e))?;
    let mut parts: Vec<(String, String)> = Vec::new();
    for item in iter {
        let item = item.map_err(|e| err("cannot read the status")(&e))?;
        match (&item, staged) {
            (gix::status::Item::TreeIndex(change), true) => {
                use gix::diff::index::ChangeRef::*;
                let (path, old, new) = match change {
                    Addition { location, id, .. } => (location.to_string(), None, Some(blob(repo, id)?)),
                    Deletion { location, id, .. } => (location.to_string(), Some(blob(repo, id)?), None),
                    Modification { location, previous_id, id, .. } => {
                        (location.to_string(), Some(blob(repo, previous_id)?), Some(blob(repo, id)?))
                    }
                    Rewrite { location, source_id, id, .. } => {
                        (location.to_string(), Some(blob(repo, source_id)?), Some(blob(repo, id)?))
                    }
                };
                let text = unified(&path, old.as_deref(), new.as_deref(), context)?;
                parts.push((path, text));
            }
            (gix::status::Item::IndexWorktree(change), false) => {
                use gix::status::index_worktree::iter::Summary;
                let gix::status::index_worktree::Item::Modification { entry, rela_path, .. } = change else {
                    continue;
                };
                let path = rela_path.to_str_lossy().into_owned();
                let new = match change.summary() {
                    Some(Summary::Removed) => None,
                    Some(Summary::Modified | Summary::TypeChange) => {
                        let Some(file) = repo.workdir_path(rela_path) else { continue };
                        Some(std::fs::read(&file).map_err(|e| err(&format!("cannot read {path}"))(&e))?)
                    }
                    _ => continue,
                };
                let old = blob(repo, &entry.id)?;
                if new.as_deref() == Some(old.as_slice()) {
                    continue;
                }
                parts.push((path.clone(), unified(&path, Some(&old), new.as_deref(), context)?));
            }
            _ => {}
        }
    }
    parts.sort();
    let files = parts.len();
    Ok((parts.into_iter().map(|(_, t)| t).collect(), files))
}

/// `git_log {"path"?, "max_count"?}`: the latest commits reachable from HEAD.
#[derive(Debug, Clone)]
pub struct GitLogTool {
    pub max_bytes: usize,
    pub workspace: Workspace,
}

#[async_trait]
impl Tool for GitLogTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "git_log".into(),
            description: "Show the latest commits reachable from HEAD in the repository containing `path`, newest \
                          first, one per line: `<short id> <date> <author> <subject>`."
                .into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "path": describe(),
                    "max_count": {"type": "integer", "minimum": 1, "maximum": 1000, "description": "Most commits shown (default 20)"}
                },
                "additionalProperties": false
            }),
        }
    }
    read_only_tool!();
    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput {
        let args = (|| -> Result<_, ToolOutput> {
            Ok((
                open_repo(&self.workspace, ctx, &input)?,
                uint_arg(&input, "max_count")?.unwrap_or(20).clamp(1, 1000) as usize,
            ))
        })();
        let (repo, count) = match args {
            Ok(a) => a,
            Err(e) => return e,
        };
        let max = self.max_bytes;
        blocking(move || match repo.open().and_then(|repo| log_lines(&repo, count)) {
            Ok(lines) => {
                let n = lines.len();
                let text = if n == 0 { "no commits\n".to_owned() } else { lines.join("\n") + "\n" };
                let (text, truncated) = clip(text.as_bytes(), max);
                ToolOutput::ok(text).with_details(json!({"commits": n, "truncated": truncated}))
            }
            Err(e) => e,
        })
        .await
    }
}

fn log_lines(repo: &gix::Repository, count: usize) -> Result<Vec<String>, ToolOutput> {
    let head = match repo.head_id() {
        Ok(id) => id.detach(),
        Err(_) => return Ok(Vec::new()),
    };
    let walk = repo.rev_walk([head]).all().map_err(|e| err("cannot walk the history")(&e))?;
    let mut lines = Vec::new();
    for info in walk.take(count) {
        let info = info.map_err(|e| err("cannot walk the history")(&e))?;
        let commit = info.object().map_err(|e| err("cannot read a commit")(&e))?;
        let subject = commit.message().map(|m| m.summary().to_string()).unwrap_or_default();
        let (author, date) = match commit.author() {
            Ok(a) => (
                a.name.to_string(),
                a.time().map(|t| t.format_or_unix(gix::date::time::format::SHORT)).unwrap_or_default(),
            ),
            Err(_) => (String::new(), String::new()),
        };
        lines.push(format!("{} {date} {author} {subject}", info.id.to_hex_with_len(8)));
    }
    Ok(lines)
}
