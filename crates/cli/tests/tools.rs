//! The tool belt through the binary: the workspace confinement of the file tools, extra roots
//! from config, and bad tool calls (invalid arguments, a command printing 100 MB) that give the
//! model a clear, bounded result while the run goes on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

/// A model that makes one call of `tool` with `args`, then answers with what it got back.
fn one_call(tool: &'static str, args: &'static str) -> impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static {
    move |req: &RecordedRequest| match req.tool_results().last() {
        Some((_, out)) => Reply::Stream(openai::text(&[&format!("got {} bytes: {}", out.len(), clip(out))])),
        None => Reply::Stream(openai::tool_call("call_1", tool, &[args])),
    }
}

fn clip(s: &str) -> String {
    s.chars().take(300).collect::<String>().replace('\n', " ")
}

fn completed(env: &Env) -> Value {
    let events = env.events(env.runs()[0]["run_id"].as_str().unwrap());
    assert_log_invariants(&events);
    assert_eq!(events.last().unwrap()["type"], "run_completed", "the run went on to its end");
    events.into_iter().find(|e| e["type"] == "tool_call_completed").unwrap()
}

#[test]
fn read_file_outside_the_workspace_is_refused_until_a_root_is_added() {
    let env = Env::new(one_call("read_file", r#"{"path":"../outside/secret.txt"}"#));
    env.init();
    std::fs::create_dir_all(env.dir.path().join("outside")).unwrap();
    std::fs::write(env.dir.path().join("outside/secret.txt"), "the secret\n").unwrap();

    let out = env.run(&["run", "-p", "openai", "read it"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("outside the workspace"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("the secret"), "{}", stdout(&out));
    let done = completed(&env);
    assert_eq!(done["data"]["is_error"], true, "{done}");

    // A symlink inside the workspace that leads outside is refused too.
    let env2 = Env::new(one_call("read_file", r#"{"path":"link/secret.txt"}"#));
    env2.init();
    std::os::unix::fs::symlink(env.dir.path().join("outside"), env2.project().join("link")).unwrap();
    let out = env2.run(&["run", "-p", "openai", "read it"]);
    assert!(stdout(&out).contains("outside the workspace"), "{}", stdout(&out));

    // Adding the directory as a root (relative to the project) lets the same call through; only
    // the user config can (a project file that asks for it is ignored, with a warning).
    let project_config = env.project().join(".descartes/config.toml");
    std::fs::write(&project_config, "[tools]\nroots = [\"../outside\"]\n").unwrap();
    let out = env.run(&["run", "-p", "openai", "read it"]);
    assert!(!stdout(&out).contains("the secret") && stderr(&out).contains("is ignored"), "{}", stderr(&out));
    std::fs::write(&project_config, "").unwrap();
    let config = env.dir.path().join("home/config.toml");
    std::fs::write(&config, "[tools]\nroots = [\"../outside\"]\n").unwrap();
    let out = env.run(&["run", "-p", "openai", "read it"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("the secret"), "{}", stdout(&out));
}

#[test]
fn invalid_tool_arguments_go_back_to_the_model_and_the_run_goes_on() {
    let env = Env::new(one_call("read_file", r#"{"path":5,"start_line":"x"}"#));
    env.init();
    let out = env.run(&["run", "-p", "openai", "read"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(said.contains("invalid arguments for `read_file`") && said.contains("path"), "{said}");
    let done = completed(&env);
    assert_eq!(done["data"]["is_error"], true, "{done}");
}

#[test]
fn a_command_printing_100_mb_gives_a_bounded_result() {
    let env =
        Env::new(one_call("shell", r#"{"command":"head -c 100000000 /dev/zero | tr '\\0' a; echo tail-marker"}"#));
    env.init();
    std::fs::write(env.project().join(".descartes/config.toml"), "[tools]\nmax_output_bytes = 65536\n").unwrap();
    let started = std::time::Instant::now();
    let out = env.run(&["run", "-y", "-p", "openai", "flood"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    let bytes: usize = said.split("got ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!(bytes < 200_000, "the model got {bytes} bytes");
    let result = &env.server.requests().last().unwrap().tool_results()[0].1;
    assert!(result.contains("tail-marker"), "the end of the output is kept");
    assert!(result.contains("clipped") || result.contains("omitted"), "the clip is said: {}", clip(result));
    let done = completed(&env);
    assert!(done["data"]["output"].as_str().unwrap().len() < 200_000, "the event is bounded too");
    assert!(started.elapsed() < std::time::Duration::from_secs(120));
}
