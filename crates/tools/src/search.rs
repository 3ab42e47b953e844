//! `list_files` (glob) and `search_files` (regex), both respecting `.gitignore` (also outside a
//! git repository), `.ignore` and hidden files, walking the tree in parallel, confined to the
//! workspace and bounded in output.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use descartes_core::{Tool, ToolContext, ToolOutput};
use descartes_protocol::ToolSpec;
use globset::{GlobBuilder, GlobMatcher};
use grep_regex::RegexMatcherBuilder;
use grep_searcher::{BinaryDetection, SearcherBuilder, sinks::Lossy};
use ignore::{WalkBuilder, WalkState};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::confine::Workspace;
use crate::fs::{bool_arg, confined, uint_arg};
use crate::{clip, str_arg};

/// Longest line of a match given back (the rest is cut with `…`).
const MAX_LINE_CHARS: usize = 300;

/// A file filter: a glob with a `/` matches the path relative to the searched directory, one
/// without matches the file name (like `rg -g`).
struct FileGlob {
    matcher: GlobMatcher,
    whole_path: bool,
}

impl FileGlob {
    fn new(glob: &str) -> Result<Self, ToolOutput> {
        let g = GlobBuilder::new(glob)
            .literal_separator(true)
            .build()
            .map_err(|e| ToolOutput::error(format!("argument `glob`/`pattern` is not a valid glob: {e}")))?;
        Ok(Self { matcher: g.compile_matcher(), whole_path: glob.contains('/') })
    }
    fn matches(&self, rel: &Path) -> bool {
        if self.whole_path {
            self.matcher.is_match(rel)
        } else {
            rel.file_name().is_some_and(|n| self.matcher.is_match(n))
        }
    }
}

fn walker(root: &Path, hidden: bool) -> ignore::WalkParallel {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(12);
    WalkBuilder::new(root).hidden(!hidden).require_git(false).threads(threads).build_parallel()
}

fn rel_of<'a>(root: &Path, p: &'a Path) -> &'a Path {
    p.strip_prefix(root).unwrap_or(p)
}

/// `list_files {"pattern"?, "path"?, "max_results"?, "include_hidden"?}`.
#[derive(Debug, Clone)]
pub struct ListFilesTool {
    pub max_bytes: usize,
    pub workspace: Workspace,
}

#[async_trait]
impl Tool for ListFilesTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "list_files".into(),
            description: "List files in the workspace whose path matches a glob, skipping what .gitignore/.ignore \
                          exclude and hidden files. A glob with `/` (e.g. `src/**/*.rs`) matches the path relative \
                          to `path`; one without (e.g. `*.rs`) matches the file name at any depth. Paths are \
                          printed relative to the working directory, sorted, one per line."
                .into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "pattern": {"type": "string", "description": "Glob, default `*` (every file)"},
                    "path": {"type": "string", "description": "Directory to list, default the working directory"},
                    "max_results": {"type": "integer", "minimum": 1, "maximum": 100000, "description": "Most paths returned (default 1000)"},
                    "include_hidden": {"type": "boolean", "description": "Also list hidden files (default false)"}
                },
                "additionalProperties": false
            }),
        }
    }
    fn read_only(&self) -> bool {
        true
    }
    fn idempotent(&self) -> bool {
        true
    }
    fn timeout(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(120))
    }
    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput {
        let args = (|| -> Result<_, ToolOutput> {
            let pattern = if input.get("pattern").is_some() { str_arg(&input, "pattern")? } else { "*".into() };
            let path = if input.get("path").is_some() { str_arg(&input, "path")? } else { ".".into() };
            let max = uint_arg(&input, "max_results")?.unwrap_or(1000).clamp(1, 100_000) as usize;
            let hidden = bool_arg(&input, "include_hidden")?;
            let root = confined(&self.workspace, ctx, &path)?;
            Ok((FileGlob::new(&pattern)?, root, max, hidden))
        })();
        let (glob, root, max, hidden) = match args {
            Ok(a) => a,
            Err(e) => return e,
        };
        if !root.is_dir() {
            return ToolOutput::error(format!("`{}` is not a directory", Workspace::display(&ctx.cwd, &root)));
        }
        let cwd = ctx.cwd.clone();
        let cancel = ctx.cancel.clone();
        let max_bytes = self.max_bytes;
        let job = tokio::task::spawn_blocking(move || {
            let found = Mutex::new(Vec::new());
            let count = AtomicUsize::new(0);
            let more = AtomicBool::new(false);
            walker(&root, hidden).run(|| {
                Box::new(|entry| {
                    if cancel.is_cancelled() {
                        return WalkState::Quit;
                    }
                    let Ok(entry) = entry else { return WalkState::Continue };
                    if !entry.file_type().is_some_and(|t| t.is_file()) || !glob.matches(rel_of(&root, entry.path())) {
                        return WalkState::Continue;
                    }
                    if count.fetch_add(1, Ordering::Relaxed) >= max {
                        more.store(true, Ordering::Relaxed);
                        return WalkState::Quit;
                    }
                    if let Ok(mut f) = found.lock() {
                        f.push(entry.into_path());
                    }
                    WalkState::Continue
                })
            });
            let mut found: Vec<PathBuf> = found.into_inner().unwrap_or_default();
            found.sort();
            let more = more.load(Ordering::Relaxed);
            let mut text = String::new();
            for p in &found {
                text.push_str(&Workspace::display(&cwd, p));
                text.push('\n');
            }
            if found.is_empty() {
                text.push_str("no files match\n");
            }
            if more {
                text.push_str(&format!("[stopped at {max} files; narrow the pattern or raise max_results]\n"));
            }
            let (text, clipped) = clip(text.as_bytes(), max_bytes);
            ToolOutput::ok(text).with_details(json!({"count": found.len(), "truncated": more || clipped}))
        });
        job.await.unwrap_or_else(|e| ToolOutput::error(format!("list_files failed: {e}")))
    }
}

/// `search_files {"pattern", "path"?, "glob"?, "case_insensitive"?, "max_results"?, "include_hidden"?}`.
#[derive(Debug, Clone)]
pub struct SearchFilesTool {
    pub max_bytes: usize,
    pub workspace: Workspace,
}

#[async_trait]
impl Tool for SearchFilesTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "search_files".into(),
            description: "Search file contents in the workspace for a regular expression (Rust regex syntax), \
                          skipping what .gitignore/.ignore exclude, hidden and binary files. Prints one match per \
                          line as `file:line:text`, sorted by file and line, at most `max_results` matches."
                .into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "pattern": {"type": "string", "minLength": 1, "description": "Regular expression to search for"},
                    "path": {"type": "string", "description": "Directory or file to search, default the working directory"},
                    "glob": {"type": "string", "description": "Only files matching this glob (`*.rs`, `src/**/*.ts`)"},
                    "case_insensitive": {"type": "boolean", "description": "Ignore case (default false)"},
                    "max_results": {"type": "integer", "minimum": 1, "maximum": 10000, "description": "Most matching lines returned (default 200)"},
                    "include_hidden": {"type": "boolean", "description": "Also search hidden files (default false)"}
                },
                "required": ["pattern"],
                "additionalProperties": false
            }),
        }
    }
    fn read_only(&self) -> bool {
        true
    }
    fn idempotent(&self) -> bool {
        true
    }
    fn timeout(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(120))
    }
    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput {
        let args = (|| -> Result<_, ToolOutput> {
            let pattern = str_arg(&input, "pattern")?;
            let path = if input.get("path").is_some() { str_arg(&input, "path")? } else { ".".into() };
            let glob = match input.get("glob") {
                None | Some(Value::Null) => None,
                Some(_) => Some(FileGlob::new(&str_arg(&input, "glob")?)?),
            };
            let max = uint_arg(&input, "max_results")?.unwrap_or(200).clamp(1, 10_000) as usize;
            let matcher = RegexMatcherBuilder::new()
                .case_insensitive(bool_arg(&input, "case_insensitive")?)
                .build(&pattern)
                .map_err(|e| ToolOutput::error(format!("argument `pattern` is not a valid regex: {e}")))?;
            let root = confined(&self.workspace, ctx, &path)?;
            Ok((matcher, glob, root, max, bool_arg(&input, "include_hidden")?))
        })();
        let (matcher, glob, root, max, hidden) = match args {
            Ok(a) => a,
            Err(e) => return e,
        };
        let cwd = ctx.cwd.clone();
        let cancel = ctx.cancel.clone();
        let max_bytes = self.max_bytes;
        let job = tokio::task::spawn_blocking(move || {
            search(&SearchJob { matcher, glob, root, max, hidden, cwd, cancel, max_bytes })
        });
        job.await.unwrap_or_else(|e| ToolOutput::error(format!("search_files failed: {e}")))
    }
}

struct SearchJob {
    matcher: grep_regex::RegexMatcher,
    glob: Option<FileGlob>,
    root: PathBuf,
    max: usize,
    hidden: bool,
    cwd: PathBuf,
    cancel: CancellationToken,
    max_bytes: usize,
}

fn search(job: &SearchJob) -> ToolOutput {
    let hits: Mutex<Vec<(PathBuf, u64, String)>> = Mutex::new(Vec::new());
    let count = AtomicUsize::new(0);
    let more = AtomicBool::new(false);
    let files = AtomicUsize::new(0);
    walker(&job.root, job.hidden).run(|| {
        let mut searcher = SearcherBuilder::new().line_number(true).binary_detection(BinaryDetection::quit(0)).build();
        let (hits, count, more, files) = (&hits, &count, &more, &files);
        Box::new(move |entry| {
            if job.cancel.is_cancelled() || more.load(Ordering::Relaxed) {
                return WalkState::Quit;
            }
            let Ok(entry) = entry else { return WalkState::Continue };
            if !entry.file_type().is_some_and(|t| t.is_file()) {
                return WalkState::Continue;
            }
            if let Some(g) = &job.glob
                && !g.matches(rel_of(&job.root, entry.path()))
            {
                return WalkState::Continue;
            }
            files.fetch_add(1, Ordering::Relaxed);
            let mut local = Vec::new();
            let _ = searcher.search_path(
                &job.matcher,
                entry.path(),
                Lossy(|line, text| {
                    if count.fetch_add(1, Ordering::Relaxed) >= job.max {
                        more.store(true, Ordering::Relaxed);
                        return Ok(false);
                    }
                    let text = text.trim_end_matches(['\n', '\r']);
                    let text = match text.char_indices().nth(MAX_LINE_CHARS) {
                        Some((i, _)) => format!("{}…", &text[..i]),
                        None => text.to_owned(),
                    };
                    local.push((line, text));
                    Ok(true)
                }),
            );
            if !local.is_empty()
                && let Ok(mut h) = hits.lock()
            {
                let path = entry.into_path();
                h.extend(local.into_iter().map(|(l, t)| (path.clone(), l, t)));
            }
            WalkState::Continue
        })
    });
    let mut hits = hits.into_inner().unwrap_or_default();
    hits.sort();
    let more = more.load(Ordering::Relaxed);
    let mut text = String::new();
    let mut last: Option<(&Path, String)> = None;
    for (path, line, t) in &hits {
        let shown = match &last {
            Some((p, s)) if *p == path.as_path() => s.clone(),
            _ => Workspace::display(&job.cwd, path),
        };
        text.push_str(&format!("{shown}:{line}:{t}\n"));
        last = Some((path.as_path(), shown));
    }
    if hits.is_empty() {
        text.push_str("no matches\n");
    }
    if more {
        text.push_str(&format!("[stopped at {} matches; narrow the search or raise max_results]\n", job.max));
    }
    let (text, clipped) = clip(text.as_bytes(), job.max_bytes);
    ToolOutput::ok(text).with_details(json!({
        "matches": hits.len(),
        "files_searched": files.load(Ordering::Relaxed),
        "truncated": more || clipped
    }))
}
