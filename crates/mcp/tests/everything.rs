//! The MCP client against real servers: `@modelcontextprotocol/server-everything` from npm
//! (stdio and streamable HTTP, installed by `.ci/install-mcp`), a server written with the
//! official TypeScript SDK whose tool list changes, and a server that never answers.
//!
//! Without npm (or the registry) the tests that need the npm servers skip loudly, unless
//! `DESCARTES_TEST_REQUIRE_MCP=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use descartes_core::{Tool, ToolContext};
use descartes_mcp::{McpConfig, McpManager, McpServer, McpTool, ServerConfig};
use descartes_protocol::RunId;
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The npm bin directory holding `mcp-server-everything`, installing it if needed.
fn npm_bin() -> Option<PathBuf> {
    static BIN: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let require = std::env::var("DESCARTES_TEST_REQUIRE_MCP").is_ok_and(|v| v == "1");
        let out = std::process::Command::new(repo().join(".ci/install-mcp")).output();
        let bin = match out {
            Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
            Ok(o) => {
                let why = String::from_utf8_lossy(&o.stderr).into_owned();
                assert!(!require, "DESCARTES_TEST_REQUIRE_MCP=1 but .ci/install-mcp failed: {why}");
                eprintln!("SKIPPED: the npm MCP servers cannot be installed (.ci/install-mcp: {why})");
                return None;
            }
            Err(e) => {
                assert!(!require, "DESCARTES_TEST_REQUIRE_MCP=1 but .ci/install-mcp cannot run: {e}");
                eprintln!("SKIPPED: .ci/install-mcp cannot run: {e}");
                return None;
            }
        };
        bin.join("mcp-server-everything").exists().then_some(bin)
    })
    .clone()
}

macro_rules! need_npm {
    () => {
        match npm_bin() {
            Some(b) => b,
            None => {
                eprintln!("SKIPPED: no mcp-server-everything (set DESCARTES_TEST_REQUIRE_MCP=1 to fail instead)");
                return;
            }
        }
    };
}

fn ctx() -> ToolContext {
    ToolContext {
        cwd: std::env::temp_dir(),
        run_id: RunId::generate(),
        call_id: "c1".into(),
        spool_dir: std::env::temp_dir(),
        cancel: CancellationToken::new(),
    }
}

fn env() -> descartes_mcp::EnvFn {
    Arc::new(|k: &str| std::env::var(k).ok())
}

fn manager(servers: &[(&str, ServerConfig)]) -> McpManager {
    let mut config = McpConfig::default();
    for (name, s) in servers {
        config.servers.insert((*name).to_owned(), s.clone());
    }
    McpManager::new(&config, env(), None, 64 * 1024)
}

fn everything(bin: &Path) -> ServerConfig {
    ServerConfig::stdio(bin.join("mcp-server-everything").display().to_string(), vec![])
}

async fn tool(m: &McpManager, name: &str) -> McpTool {
    let (tools, errors) = m.tools().await;
    assert!(errors.is_empty(), "{errors:?}");
    let names: Vec<String> = tools.iter().map(|t| t.spec().name).collect();
    tools.into_iter().find(|t| t.spec().name == name).unwrap_or_else(|| panic!("no {name} in {names:?}"))
}

#[tokio::test]
async fn stdio_lists_tools_and_calls_echo() {
    let bin = need_npm!();
    let m = manager(&[("everything", everything(&bin))]);
    let echo = tool(&m, "mcp__everything__echo").await;
    let spec = echo.spec();
    assert!(spec.description.contains("Echoes back"), "{spec:?}");
    assert_eq!(spec.input_schema["properties"]["message"]["type"], "string", "{spec:?}");
    assert!(echo.read_only() && echo.idempotent(), "echo is annotated read-only and idempotent");
    let sum = tool(&m, "mcp__everything__get-sum").await;
    assert!(sum.read_only());
    let out = echo.call(json!({"message": "hello MCP"}), &ctx()).await;
    assert!(!out.is_error, "{out:?}");
    assert_eq!(out.content, "Echo: hello MCP");
    // An image is described, not dumped.
    let image = tool(&m, "mcp__everything__get-tiny-image").await;
    let out = image.call(json!({}), &ctx()).await;
    assert!(out.content.contains("[image: image/png, "), "{}", out.content);
    m.shutdown().await;
}

#[tokio::test]
async fn tool_errors_become_error_outputs() {
    let bin = need_npm!();
    let m = manager(&[("everything", everything(&bin))]);
    let echo = tool(&m, "mcp__everything__echo").await;
    // The server rejects arguments that do not match the schema.
    let out = echo.call(json!({"message": 42}), &ctx()).await;
    assert!(out.is_error, "{out:?}");
    assert!(!out.content.is_empty());
    let out = echo.call(json!("not an object"), &ctx()).await;
    assert!(out.is_error && out.content.contains("JSON object"), "{out:?}");
    m.shutdown().await;
}

#[tokio::test]
async fn a_call_that_takes_too_long_times_out() {
    let bin = need_npm!();
    let mut config = everything(&bin);
    config.timeout_secs = Some(1);
    let m = manager(&[("slow", config)]);
    let long = tool(&m, "mcp__slow__trigger-long-running-operation").await;
    let started = Instant::now();
    let out = long.call(json!({"duration": 20, "steps": 2}), &ctx()).await;
    assert!(out.is_error, "{out:?}");
    assert!(out.content.contains("`slow` did not answer within 1 s"), "{}", out.content);
    assert!(started.elapsed() < Duration::from_secs(10));
    // The server still works afterwards.
    let echo = tool(&m, "mcp__slow__echo").await;
    assert_eq!(echo.call(json!({"message": "x"}), &ctx()).await.content, "Echo: x");
    m.shutdown().await;
}

#[tokio::test]
async fn a_killed_server_is_restarted_on_the_next_call() {
    let bin = need_npm!();
    let m = manager(&[("everything", everything(&bin))]);
    let echo = tool(&m, "mcp__everything__echo").await;
    assert_eq!(echo.call(json!({"message": "one"}), &ctx()).await.content, "Echo: one");
    let server = m.server("everything").unwrap().clone();
    let pid = server.pid().await.expect("a running stdio server has a pid");
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    wait_until(|| async { server.pid().await.is_none() }).await;
    let out = echo.call(json!({"message": "two"}), &ctx()).await;
    assert_eq!(out.content, "Echo: two", "{out:?}");
    let new_pid = server.pid().await.unwrap();
    assert_ne!(new_pid, pid);
    m.shutdown().await;
}

#[tokio::test]
async fn a_server_that_keeps_crashing_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("crash.sh");
    std::fs::write(&script, "#!/bin/sh\necho 'boom: cannot start' >&2\nexit 3\n").unwrap();
    make_executable(&script);
    let m = manager(&[("crashy", ServerConfig::stdio(script.display().to_string(), vec![]))]);
    let server = m.server("crashy").unwrap().clone();
    let first = server.tools().await.unwrap_err().to_string();
    assert!(first.contains("`crashy`"), "{first}");
    // The first restart is immediate; the next ones back off, and say so.
    let second = server.tools().await.unwrap_err().to_string();
    assert!(second.contains("`crashy`"), "{second}");
    let third = server.tools().await.unwrap_err().to_string();
    assert!(third.contains("keeps failing") && third.contains("next restart in"), "{third}");
}

#[tokio::test]
async fn a_server_that_never_answers_initialize_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("mute.sh");
    std::fs::write(&script, "#!/bin/sh\nwhile read -r _; do :; done\n").unwrap();
    make_executable(&script);
    let mut config = ServerConfig::stdio(script.display().to_string(), vec![]);
    config.startup_timeout_secs = Some(1);
    let m = manager(&[("mute", config)]);
    let started = Instant::now();
    let (tools, errors) = m.tools().await;
    assert!(tools.is_empty());
    assert_eq!(errors.len(), 1);
    let e = errors[0].to_string();
    assert!(e.contains("MCP server `mute` did not answer `initialize` within 1 s"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[tokio::test]
async fn streamable_http_lists_tools_and_calls_echo() {
    let bin = need_npm!();
    let port = free_port();
    let mut child = tokio::process::Command::new(bin.join("mcp-server-everything"))
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until(|| async { tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() }).await;
    let mut config = ServerConfig::http(format!("http://127.0.0.1:{port}/mcp"));
    config.headers.insert("X-Test".into(), "secret-header".into());
    let m = manager(&[("web", config)]);
    let echo = tool(&m, "mcp__web__echo").await;
    let out = echo.call(json!({"message": "over http"}), &ctx()).await;
    assert_eq!(out.content, "Echo: over http", "{out:?}");
    m.shutdown().await;
    child.kill().await.unwrap();
}

#[tokio::test]
async fn an_http_server_that_is_not_there_names_the_server() {
    let port = free_port();
    let mut config = ServerConfig::http(format!("http://127.0.0.1:{port}/mcp"));
    config.startup_timeout_secs = Some(5);
    config.bearer_token_env = Some("DESCARTES_TEST_MCP_TOKEN_UNSET".into());
    let m = manager(&[("gone", config.clone())]);
    let e = m.server("gone").unwrap().tools().await.unwrap_err().to_string();
    assert!(e.contains("`gone`") && e.contains("DESCARTES_TEST_MCP_TOKEN_UNSET"), "{e}");
    config.bearer_token_env = None;
    let m = manager(&[("gone", config)]);
    let e = m.server("gone").unwrap().tools().await.unwrap_err().to_string();
    assert!(e.contains("`gone`"), "{e}");
}

#[tokio::test]
async fn tools_list_changed_is_honoured() {
    let bin = need_npm!();
    let sdk = bin.parent().unwrap().join("@modelcontextprotocol/sdk/dist/esm/server");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("changing.mjs");
    std::fs::write(
        &script,
        format!(
            r#"import {{ McpServer }} from "{mcp}";
import {{ StdioServerTransport }} from "{stdio}";
const server = new McpServer({{ name: "changing", version: "1.0.0" }}, {{ capabilities: {{ tools: {{ listChanged: true }} }} }});
server.registerTool("add_tool", {{ description: "Adds a tool" }}, async () => {{
  server.registerTool("new_tool", {{ description: "A new tool" }}, async () => ({{ content: [{{ type: "text", text: "new!" }}] }}));
  return {{ content: [{{ type: "text", text: "added" }}] }};
}});
await server.connect(new StdioServerTransport());
"#,
            mcp = sdk.join("mcp.js").display(),
            stdio = sdk.join("stdio.js").display()
        ),
    )
    .unwrap();
    let m = manager(&[("changing", ServerConfig::stdio("node", vec![script.display().to_string()]))]);
    let add = tool(&m, "mcp__changing__add_tool").await;
    let before = m.generation();
    let (tools, _) = m.tools().await;
    assert_eq!(tools.len(), 1);
    assert_eq!(add.call(json!({}), &ctx()).await.content, "added");
    let server = m.server("changing").unwrap().clone();
    wait_until(|| async { server.tools().await.unwrap().len() == 2 }).await;
    assert!(m.generation() > before, "the generation moves when the list changes");
    let new = tool(&m, "mcp__changing__new_tool").await;
    assert_eq!(new.call(json!({}), &ctx()).await.content, "new!");
    m.shutdown().await;
}

#[tokio::test]
async fn server_debug_and_errors_hide_secrets() {
    let mut config = ServerConfig::stdio("/nonexistent/mcp-server", vec![]);
    config.env.insert("API_TOKEN".into(), "tok-very-secret".into());
    let server = McpServer::new("s", config, env(), None);
    assert!(!format!("{server:?}").contains("tok-very-secret"));
    let e = server.tools().await.unwrap_err().to_string();
    assert!(e.contains("`s` cannot be started") && !e.contains("tok-very-secret"), "{e}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn make_executable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

async fn wait_until<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
