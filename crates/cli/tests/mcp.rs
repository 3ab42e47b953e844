//! `descartes mcp add|list|remove` and a run whose model calls an MCP tool, with the real
//! `@modelcontextprotocol/server-everything` (installed by `.ci/install-mcp`; without npm the
//! test skips loudly, unless `DESCARTES_TEST_REQUIRE_MCP=1`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// The npm bin directory holding `mcp-server-everything`, installing it if needed.
fn npm_bin() -> Option<PathBuf> {
    let require = std::env::var("DESCARTES_TEST_REQUIRE_MCP").is_ok_and(|v| v == "1");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ci/install-mcp");
    match std::process::Command::new(&script).output() {
        Ok(o) if o.status.success() => {
            let bin = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            assert!(bin.join("mcp-server-everything").exists(), "install-mcp did not install mcp-server-everything");
            Some(bin)
        }
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(!require, "DESCARTES_TEST_REQUIRE_MCP=1 but .ci/install-mcp failed: {why}");
            eprintln!("SKIPPED: the npm MCP servers cannot be installed ({why})");
            None
        }
    }
}

/// A model that calls the MCP echo tool once, then answers.
fn echo_then_answer(req: &RecordedRequest) -> Reply {
    if req.has_tool_result() {
        Reply::Stream(openai::text(&["The server echoed."]))
    } else {
        Reply::Stream(openai::tool_call("call_m", "mcp__everything__echo", &[r#"{"message":"#, r#""from the model"}"#]))
    }
}

#[test]
fn mcp_add_list_run_remove() {
    let Some(bin) = npm_bin() else { return };
    let env = Env::new(echo_then_answer);
    env.init();
    let config = env.project().join(".descartes/config.toml");
    let template = std::fs::read_to_string(&config).unwrap();

    let server = bin.join("mcp-server-everything");
    let out = env.run(&["mcp", "add", "everything", "--", server.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("added MCP server `everything`"), "{}", stdout(&out));
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(written.starts_with(&template), "the user's comments are kept:\n{written}");
    assert!(written.contains("[mcp.servers.everything]"), "{written}");

    let out = env.run(&["mcp", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = stdout(&out);
    assert!(listed.contains("everything  stdio: ") && listed.contains(" ok, "), "{listed}");
    assert!(listed.contains("mcp__everything__echo  Echoes back the input string"), "{listed}");
    let out = env.run(&["mcp", "list", "--json"]);
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["status"], "ok", "{rows}");
    let echo = rows[0]["tools"].as_array().unwrap().iter().find(|t| t["name"] == "echo").unwrap();
    assert_eq!(echo["model_name"], "mcp__everything__echo");
    assert_eq!(echo["read_only"], true);

    // The model sees the tool, calls it (read-only: no approval needed), and gets its result.
    let out = env.run(&["run", "-p", "openai", "echo", "something"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "The server echoed.\n");
    let requests = env.server.requests();
    assert!(requests[0].tool_names().contains(&"mcp__everything__echo".to_owned()), "{:?}", requests[0].tool_names());
    let spec = requests[0].body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == "mcp__everything__echo")
        .cloned()
        .unwrap();
    assert_eq!(spec["function"]["parameters"]["properties"]["message"]["type"], "string", "{spec}");
    let last = requests.last().unwrap();
    assert_eq!(last.last_tool_results(), vec![("call_m".to_owned(), "Echo: from the model".to_owned())]);
    let events = env.events(&env.run_id());
    assert_log_invariants(&events);
    let done = events.iter().find(|e| e["type"] == "tool_call_completed").unwrap();
    assert_eq!(done["data"]["is_error"], false, "{done}");

    let out = env.run(&["mcp", "remove", "everything"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), template, "remove restores the file");
    let out = env.run(&["mcp", "list"]);
    assert!(stderr(&out).contains("no MCP servers configured"), "{}", stderr(&out));
}

#[test]
fn a_broken_server_does_not_stop_a_run_and_errors_are_clear() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["fine"])));
    env.init();
    let out = env.run(&["mcp", "add", "broken", "--user", "--", "/nonexistent/mcp-server"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read_to_string(env.dir.path().join("home/config.toml")).unwrap().contains("[mcp.servers.broken]"));
    let out = env.run(&["mcp", "list"]);
    assert!(
        stdout(&out).contains("broken  stdio: /nonexistent/mcp-server  error: MCP server `broken` cannot be started")
    );
    let out = env.run(&["run", "-p", "openai", "hi"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("MCP server `broken` cannot be started"), "{}", stderr(&out));
    let out = env.run(&["mcp", "add", "both", "--url", "http://127.0.0.1:1/mcp", "--", "x"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = env.run(&["mcp", "remove", "nothere"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no MCP server named `nothere`"), "{}", stderr(&out));
}

/// A server that adds a tool when `add_tool` is called (and announces it with
/// `notifications/tools/list_changed`): the model sees the new tool at its next call, within
/// the same run, and can call it.
#[test]
fn a_tool_added_by_the_server_mid_run_is_offered_at_the_next_model_call() {
    let Some(bin) = npm_bin() else { return };
    let sdk = bin.parent().unwrap().join("@modelcontextprotocol/sdk/dist/esm/server");
    let env = Env::new(|req: &RecordedRequest| match req.tool_results().len() {
        0 => Reply::Stream(openai::tool_call("c1", "mcp__changing__add_tool", &["{}"])),
        1 if req.tool_names().contains(&"mcp__changing__new_tool".to_owned()) => {
            Reply::Stream(openai::tool_call("c2", "mcp__changing__new_tool", &["{}"]))
        }
        1 => Reply::Stream(openai::text(&["the new tool was not offered"])),
        _ => Reply::Stream(openai::text(&["done"])),
    });
    env.init();
    let script = env.dir.path().join("changing.mjs");
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
    let out = env.run(&["mcp", "add", "changing", "--", "node", script.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.run(&["run", "-y", "-p", "openai", "grow"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "done\n", "{}", stderr(&out));
    assert!(stderr(&out).contains("the tools of MCP server `changing` changed"), "{}", stderr(&out));
    let requests = env.server.requests();
    assert!(!requests[0].tool_names().contains(&"mcp__changing__new_tool".to_owned()));
    assert!(requests[1].tool_names().contains(&"mcp__changing__new_tool".to_owned()));
    assert_eq!(requests.last().unwrap().last_tool_results(), vec![("c2".to_owned(), "new!".to_owned())]);
}

/// The same round trip as `mcp_add_list_run_remove`, with the server over streamable HTTP.
#[test]
fn a_streamable_http_server_added_by_url_serves_the_model() {
    let Some(bin) = npm_bin() else { return };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = std::process::Command::new(bin.join("mcp-server-everything"))
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "server-everything did not listen on {port}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let env = Env::new(echo_then_answer);
    env.init();
    let url = format!("http://127.0.0.1:{port}/mcp");
    let out = env.run(&["mcp", "add", "everything", "--url", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.run(&["mcp", "list"]);
    let listed = stdout(&out);
    assert!(listed.contains(&format!("everything  http: {url}")) && listed.contains(" ok, "), "{listed}");
    assert!(listed.contains("mcp__everything__echo"), "{listed}");
    let out = env.run(&["run", "-p", "openai", "echo", "something"]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "The server echoed.\n");
    let last = env.server.requests().last().cloned().unwrap();
    assert_eq!(last.last_tool_results(), vec![("call_m".to_owned(), "Echo: from the model".to_owned())]);
}

/// A server that starts but never answers `initialize`: the run waits only the configured
/// startup timeout, says which server, and goes on without its tools.
#[test]
fn a_server_that_never_answers_is_skipped_after_its_timeout() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["fine"])));
    env.init();
    let config = env.project().join(".descartes/config.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[mcp.servers.mute]\ncommand = \"sleep\"\nargs = [\"600\"]\nstartup_timeout_secs = 2\n");
    std::fs::write(&config, text).unwrap();
    let started = std::time::Instant::now();
    let out = env.run(&["run", "-p", "openai", "hi"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "fine\n");
    assert!(stderr(&out).contains("`mute`"), "{}", stderr(&out));
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "bounded by the startup timeout");
}
