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
