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
