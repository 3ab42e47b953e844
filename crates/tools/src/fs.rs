//! `read_file` (with line ranges), `write_file` and `edit_file`, confined to the workspace.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use descartes_core::{Tool, ToolContext, ToolOutput};
use descartes_protocol::ToolSpec;
use serde_json::{Value, json};

use crate::confine::Workspace;
use crate::{clip, str_arg};

/// An optional non-negative integer argument.
pub(crate) fn uint_arg(input: &Value, name: &str) -> Result<Option<u64>, ToolOutput> {
    match input.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            match v.as_u64().or_else(|| v.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0).map(|f| f as u64)) {
                Some(n) => Ok(Some(n)),
                None => Err(ToolOutput::error(format!("argument `{name}` must be a non-negative integer, got {v}"))),
            }
        }
    }
}

/// An optional boolean argument.
pub(crate) fn bool_arg(input: &Value, name: &str) -> Result<bool, ToolOutput> {
    match input.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ToolOutput::error(format!("argument `{name}` must be a boolean, got {v}"))),
    }
}

/// Resolves a path argument inside the workspace, or an error output.
pub(crate) fn confined(ws: &Workspace, ctx: &ToolContext, path: &str) -> Result<PathBuf, ToolOutput> {
    ws.resolve(&ctx.cwd, path).map_err(|e| ToolOutput::error(e.to_string()))
}

/// Resolves a path to write inside the workspace (a protected path is refused), or an error
/// output.
pub(crate) fn confined_write(ws: &Workspace, ctx: &ToolContext, path: &str) -> Result<PathBuf, ToolOutput> {
    ws.resolve_write(&ctx.cwd, path).map_err(|e| ToolOutput::error(e.to_string()))
}

/// Writes `content` to `full` through a temporary file and a rename: a crash leaves the old or
/// the new file, never half of one.
async fn write_atomically(full: &Path, content: &[u8]) -> std::io::Result<()> {
    let tmp = full.with_file_name(format!(
        ".{}.descartes-tmp",
        full.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    tokio::fs::write(&tmp, content).await?;
    // Keep the permissions of the file it replaces.
    if let Ok(meta) = tokio::fs::metadata(full).await {
        let _ = tokio::fs::set_permissions(&tmp, meta.permissions()).await;
    }
    if let Err(e) = tokio::fs::rename(&tmp, full).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    Ok(())
}

/// Reads a file, or only its head and tail when it is larger than `max`: (text, size, clipped).
async fn read_clipped(full: &Path, max: usize) -> std::io::Result<(String, u64, bool)> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = tokio::fs::File::open(full).await?;
    let size = f.metadata().await?.len();
    if size <= max as u64 {
        let mut bytes = Vec::with_capacity(size as usize);
        f.read_to_end(&mut bytes).await?;
        let (text, clipped) = clip(&bytes, max);
        return Ok((text, bytes.len() as u64, clipped));
    }
    let half = max / 2;
    let mut head = vec![0; half];
    f.read_exact(&mut head).await?;
    f.seek(std::io::SeekFrom::Start(size - half as u64)).await?;
    let mut tail = vec![0; half];
    f.read_exact(&mut tail).await?;
    let omitted = size - 2 * half as u64;
    let text = format!(
        "{}\n[… {omitted} bytes omitted …]\n{}",
        String::from_utf8_lossy(&head),
        String::from_utf8_lossy(&tail)
    );
    Ok((text, size, true))
}

/// `read_file {"path", "offset"?, "limit"?, "start_line"?, "end_line"?}`: a file's content as
/// text, whole or a range of lines.
#[derive(Debug, Clone)]
pub struct ReadFileTool {
    pub max_bytes: usize,
    pub workspace: Workspace,
}

#[async_trait]
impl Tool for ReadFileTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "read_file".into(),
            description: "Read a text file inside the workspace. The path is relative to the working directory. \
                          Optionally read only some lines: `offset` (first line, 1-based) and `limit` (number of \
                          lines), or `start_line` and `end_line` (1-based, inclusive). A range is preceded by a \
                          line `[lines A-B of N]`. Large outputs are clipped (head and tail)."
                .into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1, "description": "File to read"},
                    "offset": {"type": "integer", "minimum": 1, "description": "First line to read (1-based)"},
                    "limit": {"type": "integer", "minimum": 1, "description": "Number of lines to read from `offset`"},
                    "start_line": {"type": "integer", "minimum": 1, "description": "First line to read (1-based)"},
                    "end_line": {"type": "integer", "minimum": 1, "description": "Last line to read (inclusive)"}
                },
                "required": ["path"],
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
        Some(std::time::Duration::from_secs(60))
    }
    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput {
        match self.read(&input, ctx).await {
            Ok(out) | Err(out) => out,
        }
    }
}

impl ReadFileTool {
    async fn read(&self, input: &Value, ctx: &ToolContext) -> Result<ToolOutput, ToolOutput> {
        let path = str_arg(input, "path")?;
        let offset = uint_arg(input, "offset")?;
        let limit = uint_arg(input, "limit")?;
        let start = uint_arg(input, "start_line")?;
        let end = uint_arg(input, "end_line")?;
        if (offset.is_some() || limit.is_some()) && (start.is_some() || end.is_some()) {
            return Err(ToolOutput::error("give either `offset`/`limit` or `start_line`/`end_line`, not both"));
        }
        let full = confined(&self.workspace, ctx, &path)?;
        let ranged = offset.is_some() || limit.is_some() || start.is_some() || end.is_some();
        if !ranged {
            // Whole file: only its head and tail are read when it is larger than the limit.
            let (text, size, truncated) = read_clipped(&full, self.max_bytes)
                .await
                .map_err(|e| ToolOutput::error(format!("cannot read {path}: {e}")))?;
            return Ok(ToolOutput::ok(text).with_details(json!({"bytes": size, "truncated": truncated})));
        }
        let bytes = tokio::fs::read(&full).await.map_err(|e| ToolOutput::error(format!("cannot read {path}: {e}")))?;
        let first = offset.or(start).unwrap_or(1).max(1);
        let last = match (limit, end) {
            (Some(n), _) => Some(first.saturating_add(n).saturating_sub(1)),
            (None, Some(e)) => Some(e),
            (None, None) => None,
        };
        if let Some(l) = last
            && l < first
        {
            return Err(ToolOutput::error(format!("`end_line` ({l}) is before the first line to read ({first})")));
        }
        let total = bytes.split_inclusive(|b| *b == b'\n').count() as u64;
        if first > total.max(1) {
            return Err(ToolOutput::error(format!("{path} has {total} lines; line {first} does not exist")));
        }
        let last = last.unwrap_or(total).min(total);
        let selected: Vec<u8> = bytes
            .split_inclusive(|b| *b == b'\n')
            .skip((first - 1) as usize)
            .take((last + 1 - first) as usize)
            .flatten()
            .copied()
            .collect();
        let (text, truncated) = clip(&selected, self.max_bytes);
        Ok(ToolOutput::ok(format!("[lines {first}-{last} of {total}]\n{text}")).with_details(json!({
            "bytes": bytes.len(),
            "truncated": truncated,
            "start_line": first,
            "end_line": last,
            "total_lines": total
        })))
    }
}

/// `write_file {"path","content"}`: creates or replaces a file (and its parent directories).
#[derive(Debug, Clone, Default)]
pub struct WriteFileTool {
    pub workspace: Workspace,
}

#[async_trait]
impl Tool for WriteFileTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "write_file".into(),
            description: "Create or overwrite a file inside the workspace with the given content (parent \
                          directories are created). The path is relative to the working directory. To change \
                          part of an existing file, prefer `edit_file`."
                .into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1, "description": "File to write"},
                    "content": {"type": "string", "description": "The whole new content"}
                },
                "required": ["path", "content"],
                "additionalProperties": false
            }),
        }
    }
    fn read_only(&self) -> bool {
        false
    }
    /// Writing the same content twice leaves the same file.
    fn idempotent(&self) -> bool {
        true
    }
    fn timeout(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(60))
    }
    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput {
        let (path, content) = match (str_arg(&input, "path"), str_arg(&input, "content")) {
            (Ok(p), Ok(c)) => (p, c),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        let full = match confined_write(&self.workspace, ctx, &path) {
            Ok(f) => f,
            Err(e) => return e,
        };
        if let Some(parent) = full.parent()
            && let Err(e) = tokio::fs::create_dir_all(parent).await
        {
            return ToolOutput::error(format!("cannot create directory for {path}: {e}"));
        }
        if let Err(e) = write_atomically(&full, content.as_bytes()).await {
            return ToolOutput::error(format!("cannot write {path}: {e}"));
        }
        ToolOutput::ok(format!("wrote {} bytes to {path}", content.len())).with_details(json!({"bytes": content.len()}))
    }
}

/// `edit_file {"path","old_string","new_string","replace_all"?}`: exact string replacement.
#[derive(Debug, Clone, Default)]
pub struct EditFileTool {
    pub workspace: Workspace,
}

#[async_trait]
impl Tool for EditFileTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "edit_file".into(),
            description: "Replace an exact string in a file inside the workspace. `old_string` must occur exactly \
                          once (include enough surrounding lines to make it unique), unless `replace_all` is true, \
                          which replaces every occurrence. Whitespace and indentation must match exactly. Fails \
                          without changing the file when the string is absent or not unique."
                .into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1, "description": "File to edit"},
                    "old_string": {"type": "string", "minLength": 1, "description": "Exact text to replace"},
                    "new_string": {"type": "string", "description": "Replacement text (different from old_string)"},
                    "replace_all": {"type": "boolean", "description": "Replace every occurrence (default false)"}
                },
                "required": ["path", "old_string", "new_string"],
                "additionalProperties": false
            }),
        }
    }
    fn read_only(&self) -> bool {
        false
    }
    /// A second run finds the old string gone (or, with `replace_all`, may replace again).
    fn idempotent(&self) -> bool {
        false
    }
    fn timeout(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(60))
    }
    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput {
        match self.edit(&input, ctx).await {
            Ok(out) | Err(out) => out,
        }
    }
}

impl EditFileTool {
    async fn edit(&self, input: &Value, ctx: &ToolContext) -> Result<ToolOutput, ToolOutput> {
        let path = str_arg(input, "path")?;
        let old = str_arg(input, "old_string")?;
        let new = str_arg(input, "new_string")?;
        let all = bool_arg(input, "replace_all")?;
        if old.is_empty() {
            return Err(ToolOutput::error("argument `old_string` must not be empty"));
        }
        if old == new {
            return Err(ToolOutput::error("`old_string` and `new_string` are the same: nothing to change"));
        }
        let full = confined_write(&self.workspace, ctx, &path)?;
        let text = tokio::fs::read_to_string(&full)
            .await
            .map_err(|e| ToolOutput::error(format!("cannot read {path}: {e}")))?;
        let count = text.matches(old.as_str()).count();
        if count == 0 {
            return Err(ToolOutput::error(format!(
                "`old_string` was not found in {path} (0 occurrences); the file is unchanged"
            )));
        }
        if count > 1 && !all {
            return Err(ToolOutput::error(format!(
                "`old_string` occurs {count} times in {path}; include more context to make it unique, or set \
                 `replace_all`; the file is unchanged"
            )));
        }
        let line = text[..text.find(old.as_str()).unwrap_or(0)].matches('\n').count() + 1;
        let updated = if all { text.replace(old.as_str(), &new) } else { text.replacen(old.as_str(), &new, 1) };
        write_atomically(&full, updated.as_bytes())
            .await
            .map_err(|e| ToolOutput::error(format!("cannot write {path}: {e}")))?;
        let what = if count == 1 { format!("1 occurrence (line {line})") } else { format!("{count} occurrences") };
        Ok(ToolOutput::ok(format!("replaced {what} in {path}"))
            .with_details(json!({"replacements": count, "first_line": line, "bytes": updated.len()})))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use descartes_protocol::RunId;
    use tokio_util::sync::CancellationToken;

    fn ctx(dir: &Path) -> ToolContext {
        ToolContext {
            cwd: dir.to_owned(),
            run_id: RunId::from("run"),
            call_id: "call-1".into(),
            spool_dir: dir.join(".spool"),
            cancel: CancellationToken::new(),
        }
    }

    #[tokio::test]
    async fn read_file_reads_relative_and_absolute_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), "hello\nwörld\n").unwrap();
        let tool = ReadFileTool { max_bytes: 1024, workspace: Workspace::default() };

        let out = tool.call(json!({"path": "sub/a.txt"}), &ctx(dir.path())).await;
        assert!(!out.is_error, "{}", out.content);
        assert_eq!(out.content, "hello\nwörld\n");
        assert_eq!(out.details, Some(json!({"bytes": 13, "truncated": false})));

        let abs = dir.path().join("sub/a.txt");
        let out = tool.call(json!({"path": abs.to_str().unwrap()}), &ctx(Path::new("/"))).await;
        assert_eq!(out.content, "hello\nwörld\n");
    }

    #[tokio::test]
    async fn read_file_of_a_missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let out = ReadFileTool { max_bytes: 1024, workspace: Workspace::default() }
            .call(json!({"path": "nope/missing.txt"}), &ctx(dir.path()))
            .await;
        assert!(out.is_error);
        assert!(out.content.contains("nope/missing.txt"), "{}", out.content);
    }

    #[tokio::test]
    async fn read_file_clips_a_large_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut content = "h".repeat(500);
        content.push_str(&"m".repeat(1000));
        content.push_str(&"t".repeat(500));
        std::fs::write(dir.path().join("big.txt"), &content).unwrap();
        let out = ReadFileTool { max_bytes: 100, workspace: Workspace::default() }
            .call(json!({"path": "big.txt"}), &ctx(dir.path()))
            .await;
        assert!(!out.is_error);
        assert!(out.content.starts_with(&"h".repeat(50)), "{}", out.content);
        assert!(out.content.ends_with(&"t".repeat(50)), "{}", out.content);
        assert!(out.content.contains("[… 1900 bytes omitted …]"), "{}", out.content);
        assert!(!out.content.contains("mm"), "{}", out.content);
        assert_eq!(out.details, Some(json!({"bytes": 2000, "truncated": true})));
    }

    #[tokio::test]
    async fn read_file_with_bad_arguments_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let tool = ReadFileTool { max_bytes: 1024, workspace: Workspace::default() };
        for input in [json!({}), json!({"path": 1}), json!(null)] {
            let out = tool.call(input.clone(), &ctx(dir.path())).await;
            assert!(out.is_error, "{input}");
            assert!(out.content.contains("`path`"), "{input}: {}", out.content);
        }
        // A directory is not a file.
        let out = tool.call(json!({"path": "."}), &ctx(dir.path())).await;
        assert!(out.is_error);
    }

    #[tokio::test]
    async fn write_file_creates_parents_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let content = "line 1\nünïcödé ✓\n\n  trailing spaces  ";
        let out =
            WriteFileTool::default().call(json!({"path": "a/b/c.txt", "content": content}), &ctx(dir.path())).await;
        assert!(!out.is_error, "{}", out.content);
        assert_eq!(out.details, Some(json!({"bytes": content.len()})));
        assert_eq!(std::fs::read_to_string(dir.path().join("a/b/c.txt")).unwrap(), content);
        let names: Vec<String> = std::fs::read_dir(dir.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["c.txt"]);
    }

    #[tokio::test]
    async fn write_file_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.txt"), "old and longer content").unwrap();
        let out = WriteFileTool::default().call(json!({"path": "f.txt", "content": "new"}), &ctx(dir.path())).await;
        assert!(!out.is_error, "{}", out.content);
        assert_eq!(std::fs::read_to_string(dir.path().join("f.txt")).unwrap(), "new");
        let out = WriteFileTool::default().call(json!({"path": "f.txt", "content": ""}), &ctx(dir.path())).await;
        assert!(!out.is_error, "{}", out.content);
        assert_eq!(std::fs::read_to_string(dir.path().join("f.txt")).unwrap(), "");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn write_file_without_content_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = WriteFileTool::default().call(json!({"path": "x/y.txt"}), &ctx(dir.path())).await;
        assert!(out.is_error);
        assert!(out.content.contains("missing required argument `content`"), "{}", out.content);
        assert!(!dir.path().join("x").exists());

        let out = WriteFileTool::default().call(json!({"path": "y.txt", "content": 5}), &ctx(dir.path())).await;
        assert!(out.is_error);
        assert!(out.content.contains("`content` must be a string"), "{}", out.content);
        let out = WriteFileTool::default().call(json!({"content": "c"}), &ctx(dir.path())).await;
        assert!(out.is_error);
        assert!(out.content.contains("missing required argument `path`"), "{}", out.content);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn write_file_into_a_path_under_a_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plain"), "x").unwrap();
        let out =
            WriteFileTool::default().call(json!({"path": "plain/child.txt", "content": "c"}), &ctx(dir.path())).await;
        assert!(out.is_error);
        assert!(out.content.contains("plain/child.txt"), "{}", out.content);
    }

    #[tokio::test]
    async fn read_file_reads_line_ranges() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.txt"), "one\ntwo\nthree\nfour\nfive").unwrap();
        let tool = ReadFileTool { max_bytes: 1024, workspace: Workspace::default() };
        let c = ctx(dir.path());
        let out = tool.call(json!({"path": "f.txt", "offset": 2, "limit": 2}), &c).await;
        assert_eq!(out.content, "[lines 2-3 of 5]\ntwo\nthree\n");
        assert_eq!(out.details.as_ref().unwrap()["total_lines"], 5);
        let out = tool.call(json!({"path": "f.txt", "start_line": 4, "end_line": 99}), &c).await;
        assert_eq!(out.content, "[lines 4-5 of 5]\nfour\nfive");
        let out = tool.call(json!({"path": "f.txt", "start_line": 5}), &c).await;
        assert_eq!(out.content, "[lines 5-5 of 5]\nfive");
        let out = tool.call(json!({"path": "f.txt", "end_line": 1}), &c).await;
        assert_eq!(out.content, "[lines 1-1 of 5]\none\n");
        let out = tool.call(json!({"path": "f.txt", "offset": 9}), &c).await;
        assert!(out.is_error && out.content.contains("has 5 lines; line 9 does not exist"), "{}", out.content);
        let out = tool.call(json!({"path": "f.txt", "start_line": 3, "end_line": 2}), &c).await;
        assert!(out.is_error && out.content.contains("is before"), "{}", out.content);
        let out = tool.call(json!({"path": "f.txt", "offset": 1, "end_line": 2}), &c).await;
        assert!(out.is_error && out.content.contains("not both"), "{}", out.content);
        let out = tool.call(json!({"path": "f.txt", "offset": -1}), &c).await;
        assert!(out.is_error && out.content.contains("`offset` must be a non-negative integer"), "{}", out.content);
    }

    #[tokio::test]
    async fn file_tools_refuse_paths_outside_the_workspace() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        std::fs::write(dir.path().join("outside.txt"), "secret").unwrap();
        std::os::unix::fs::symlink(dir.path(), ws.join("up")).unwrap();
        let c = ctx(&ws);
        let read = ReadFileTool { max_bytes: 1024, workspace: Workspace::default() };
        let outside_abs = dir.path().join("outside.txt");
        for p in ["../outside.txt", outside_abs.to_str().unwrap(), "up/outside.txt"] {
            let out = read.call(json!({"path": p}), &c).await;
            assert!(out.is_error, "{p}");
            assert!(out.content.contains("is outside the workspace"), "{p}: {}", out.content);
            assert!(!out.content.contains("secret"));
        }
        let out = WriteFileTool::default().call(json!({"path": "up/new.txt", "content": "x"}), &c).await;
        assert!(out.is_error && out.content.contains("is outside the workspace"), "{}", out.content);
        assert!(!dir.path().join("new.txt").exists());
        let edit = EditFileTool::default();
        let out = edit.call(json!({"path": "../outside.txt", "old_string": "secret", "new_string": "x"}), &c).await;
        assert!(out.is_error && out.content.contains("is outside the workspace"), "{}", out.content);
        assert_eq!(std::fs::read_to_string(dir.path().join("outside.txt")).unwrap(), "secret");

        // Inside an added root it works.
        let read = ReadFileTool { max_bytes: 1024, workspace: Workspace::new(vec![dir.path().to_owned()]) };
        let out = read.call(json!({"path": "../outside.txt"}), &c).await;
        assert_eq!(out.content, "secret");
    }

    #[tokio::test]
    async fn edit_file_replaces_a_unique_string() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.rs"), "fn a() {}\nfn b() {}\n").unwrap();
        let c = ctx(dir.path());
        let out = EditFileTool::default()
            .call(json!({"path": "f.rs", "old_string": "fn b() {}", "new_string": "fn c() { 1 }"}), &c)
            .await;
        assert!(!out.is_error, "{}", out.content);
        assert_eq!(out.content, "replaced 1 occurrence (line 2) in f.rs");
        assert_eq!(std::fs::read_to_string(dir.path().join("f.rs")).unwrap(), "fn a() {}\nfn c() { 1 }\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn edit_file_fails_clearly_on_absent_or_ambiguous_strings() {
        let dir = tempfile::tempdir().unwrap();
        let original = "x = 1\nx = 1\nx = 1\ny = 2\n";
        std::fs::write(dir.path().join("f.txt"), original).unwrap();
        let c = ctx(dir.path());
        let tool = EditFileTool::default();
        let out = tool.call(json!({"path": "f.txt", "old_string": "z = 3", "new_string": "q"}), &c).await;
        assert!(out.is_error);
        assert!(out.content.contains("not found in f.txt (0 occurrences)"), "{}", out.content);
        let out = tool.call(json!({"path": "f.txt", "old_string": "x = 1", "new_string": "x = 2"}), &c).await;
        assert!(out.is_error);
        assert!(out.content.contains("occurs 3 times in f.txt"), "{}", out.content);
        let out = tool.call(json!({"path": "f.txt", "old_string": "y", "new_string": "y"}), &c).await;
        assert!(out.is_error && out.content.contains("are the same"), "{}", out.content);
        let out = tool.call(json!({"path": "f.txt", "old_string": "", "new_string": "y"}), &c).await;
        assert!(out.is_error && out.content.contains("must not be empty"), "{}", out.content);
        let out = tool.call(json!({"path": "missing.txt", "old_string": "a", "new_string": "b"}), &c).await;
        assert!(out.is_error && out.content.contains("cannot read missing.txt"), "{}", out.content);
        assert_eq!(std::fs::read_to_string(dir.path().join("f.txt")).unwrap(), original);

        let out = tool
            .call(json!({"path": "f.txt", "old_string": "x = 1", "new_string": "x = 2", "replace_all": true}), &c)
            .await;
        assert!(!out.is_error, "{}", out.content);
        assert_eq!(out.content, "replaced 3 occurrences in f.txt");
        assert_eq!(std::fs::read_to_string(dir.path().join("f.txt")).unwrap(), "x = 2\nx = 2\nx = 2\ny = 2\n");
    }
}
