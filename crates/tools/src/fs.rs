use std::path::{Path, PathBuf};

use async_trait::async_trait;
use descartes_core::{Tool, ToolContext, ToolOutput};
use descartes_protocol::ToolSpec;
use serde_json::{Value, json};

use crate::{clip, str_arg};

fn resolve(cwd: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() { p.to_owned() } else { cwd.join(p) }
}

/// `read_file {"path"}`: a file's content as text.
#[derive(Debug, Clone)]
pub struct ReadFileTool {
    pub max_bytes: usize,
}

#[async_trait]
impl Tool for ReadFileTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "read_file".into(),
            description: "Read a text file. The path is relative to the working directory.".into(),
            input_schema: json!({
                "type": "object",
                "properties": {"path": {"type": "string", "description": "File to read"}},
                "required": ["path"]
            }),
        }
    }
    fn read_only(&self) -> bool {
        true
    }
    fn idempotent(&self) -> bool {
        true
    }
    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput {
        let path = match str_arg(&input, "path") {
            Ok(p) => p,
            Err(e) => return e,
        };
        let full = resolve(&ctx.cwd, &path);
        match tokio::fs::read(&full).await {
            Ok(bytes) => {
                let (text, truncated) = clip(&bytes, self.max_bytes);
                ToolOutput::ok(text).with_details(json!({"bytes": bytes.len(), "truncated": truncated}))
            }
            Err(e) => ToolOutput::error(format!("cannot read {path}: {e}")),
        }
    }
}

/// `write_file {"path","content"}`: creates or replaces a file (and its parent directories).
#[derive(Debug, Clone, Copy)]
pub struct WriteFileTool;

#[async_trait]
impl Tool for WriteFileTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "write_file".into(),
            description:
                "Create or overwrite a file with the given content. The path is relative to the working directory."
                    .into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File to write"},
                    "content": {"type": "string", "description": "The whole new content"}
                },
                "required": ["path", "content"]
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
    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput {
        let (path, content) = match (str_arg(&input, "path"), str_arg(&input, "content")) {
            (Ok(p), Ok(c)) => (p, c),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        let full = resolve(&ctx.cwd, &path);
        if let Some(parent) = full.parent()
            && let Err(e) = tokio::fs::create_dir_all(parent).await
        {
            return ToolOutput::error(format!("cannot create directory for {path}: {e}"));
        }
        // Write to a temporary file beside it, then rename: a crash leaves the old or the new file.
        let tmp = full.with_file_name(format!(
            ".{}.descartes-tmp",
            full.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ));
        if let Err(e) = tokio::fs::write(&tmp, content.as_bytes()).await {
            return ToolOutput::error(format!("cannot write {path}: {e}"));
        }
        if let Err(e) = tokio::fs::rename(&tmp, &full).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return ToolOutput::error(format!("cannot write {path}: {e}"));
        }
        ToolOutput::ok(format!("wrote {} bytes to {path}", content.len())).with_details(json!({"bytes": content.len()}))
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
        let tool = ReadFileTool { max_bytes: 1024 };

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
        let out = ReadFileTool { max_bytes: 1024 }.call(json!({"path": "nope/missing.txt"}), &ctx(dir.path())).await;
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
        let out = ReadFileTool { max_bytes: 100 }.call(json!({"path": "big.txt"}), &ctx(dir.path())).await;
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
        let tool = ReadFileTool { max_bytes: 1024 };
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
        let out = WriteFileTool.call(json!({"path": "a/b/c.txt", "content": content}), &ctx(dir.path())).await;
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
        let out = WriteFileTool.call(json!({"path": "f.txt", "content": "new"}), &ctx(dir.path())).await;
        assert!(!out.is_error, "{}", out.content);
        assert_eq!(std::fs::read_to_string(dir.path().join("f.txt")).unwrap(), "new");
        let out = WriteFileTool.call(json!({"path": "f.txt", "content": ""}), &ctx(dir.path())).await;
        assert!(!out.is_error, "{}", out.content);
        assert_eq!(std::fs::read_to_string(dir.path().join("f.txt")).unwrap(), "");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn write_file_without_content_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = WriteFileTool.call(json!({"path": "x/y.txt"}), &ctx(dir.path())).await;
        assert!(out.is_error);
        assert!(out.content.contains("missing required argument `content`"), "{}", out.content);
        assert!(!dir.path().join("x").exists());

        let out = WriteFileTool.call(json!({"path": "y.txt", "content": 5}), &ctx(dir.path())).await;
        assert!(out.is_error);
        assert!(out.content.contains("`content` must be a string"), "{}", out.content);
        let out = WriteFileTool.call(json!({"content": "c"}), &ctx(dir.path())).await;
        assert!(out.is_error);
        assert!(out.content.contains("missing required argument `path`"), "{}", out.content);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn write_file_into_a_path_under_a_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plain"), "x").unwrap();
        let out = WriteFileTool.call(json!({"path": "plain/child.txt", "content": "c"}), &ctx(dir.path())).await;
        assert!(out.is_error);
        assert!(out.content.contains("plain/child.txt"), "{}", out.content);
    }
}
