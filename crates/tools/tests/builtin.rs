//! The built-in tools through the registry: validation, listing, search, HTTP, bounded output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use descartes_core::{ToolContext, ToolRegistry};
use descartes_protocol::RunId;
use descartes_tools::{ToolLimits, builtin_registry};
use serde_json::{Value, json};
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

fn registry() -> ToolRegistry {
    builtin_registry(&ToolLimits { max_output_bytes: 4096, ..ToolLimits::default() })
}

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

async fn run(r: &ToolRegistry, dir: &Path, name: &str, input: Value) -> descartes_core::ToolOutput {
    r.execute(name, input, &ctx(dir)).await
}

#[test]
fn every_builtin_has_a_described_object_schema() {
    let r = registry();
    let names = r.names();
    for n in ["edit_file", "http_request", "list_files", "read_file", "search_files", "shell", "write_file"] {
        assert!(names.contains(&n.to_owned()), "{names:?}");
    }
    for spec in r.specs() {
        assert!(spec.description.len() > 40, "{}", spec.name);
        assert_eq!(spec.input_schema["type"], "object", "{}", spec.name);
        for (k, p) in spec.input_schema["properties"].as_object().unwrap() {
            assert!(p["description"].is_string(), "{}.{k} has no description", spec.name);
        }
    }
}

#[tokio::test]
async fn bad_arguments_become_error_outputs_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let r = registry();
    let cases = [
        ("read_file", json!({"path": "a", "offset": "3"}), "argument `offset` must be an integer, got \"3\""),
        ("read_file", json!({"pth": "a"}), "missing required argument `path`"),
        (
            "edit_file",
            json!({"path": "a", "old_string": "x", "new_string": 2}),
            "argument `new_string` must be a string",
        ),
        ("search_files", json!({"pattern": "x", "max_results": 0}), "argument `max_results` must be at least 1"),
        ("http_request", json!({"url": "http://x", "method": "FETCH"}), "argument `method` must be one of"),
        ("http_request", json!({"url": "http://x", "headers": {"a": 1}}), "argument `headers.a` must be a string"),
        ("list_files", json!({"pattern": 3}), "argument `pattern` must be a string"),
        ("write_file", json!({"path": "a", "content": "c", "mode": 1}), "unknown argument `mode`"),
    ];
    for (tool, input, expected) in cases {
        let out = run(&r, dir.path(), tool, input.clone()).await;
        assert!(out.is_error, "{tool} {input}");
        assert!(out.content.contains(expected), "{tool} {input}: {}", out.content);
    }
    // Nothing ran: no file was written.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let stats = r.stats();
    assert_eq!(stats["read_file"].calls, 2);
    assert_eq!(stats["read_file"].errors, 2);
}

#[tokio::test]
async fn list_files_respects_gitignore_globs_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, ".gitignore", "target/\n*.log\n");
    write(d, "src/main.rs", "fn main() {}\n");
    write(d, "src/lib/mod.rs", "\n");
    write(d, "README.md", "# r\n");
    write(d, "debug.log", "x\n");
    write(d, "target/out.rs", "\n");
    write(d, ".hidden/secret.rs", "\n");
    let r = registry();
    let out = run(&r, d, "list_files", json!({"pattern": "*.rs"})).await;
    assert!(!out.is_error, "{}", out.content);
    assert_eq!(out.content, "src/lib/mod.rs\nsrc/main.rs\n");
    let out = run(&r, d, "list_files", json!({})).await;
    assert_eq!(out.content, "README.md\nsrc/lib/mod.rs\nsrc/main.rs\n");
    let out = run(&r, d, "list_files", json!({"pattern": "src/*.rs"})).await;
    assert_eq!(out.content, "src/main.rs\n");
    let out = run(&r, d, "list_files", json!({"pattern": "*.rs", "include_hidden": true})).await;
    assert_eq!(out.content, ".hidden/secret.rs\nsrc/lib/mod.rs\nsrc/main.rs\n");
    let out = run(&r, d, "list_files", json!({"pattern": "**/*.rs", "path": "src"})).await;
    assert_eq!(out.content, "src/lib/mod.rs\nsrc/main.rs\n");
    let out = run(&r, d, "list_files", json!({"max_results": 1})).await;
    assert!(out.content.contains("[stopped at 1 files"), "{}", out.content);
    assert_eq!(out.details.unwrap()["truncated"], true);
    let out = run(&r, d, "list_files", json!({"pattern": "*.nothing"})).await;
    assert_eq!(out.content, "no files match\n");
    let out = run(&r, d, "list_files", json!({"path": ".."})).await;
    assert!(out.is_error && out.content.contains("outside the workspace"), "{}", out.content);
    let out = run(&r, d, "list_files", json!({"pattern": "a{b"})).await;
    assert!(out.is_error && out.content.contains("not a valid glob"), "{}", out.content);
}

#[tokio::test]
async fn search_files_finds_matches_as_file_line_text() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, ".gitignore", "ignored/\n");
    write(d, "a.rs", "fn alpha() {}\nlet x = 1;\nfn beta() {}\n");
    write(d, "sub/b.txt", "nothing\nFN upper\n");
    write(d, "ignored/c.rs", "fn hidden_by_gitignore() {}\n");
    std::fs::write(d.join("bin.dat"), b"fn in\0binary\n").unwrap();
    let r = registry();
    let out = run(&r, d, "search_files", json!({"pattern": "fn \\w+"})).await;
    assert!(!out.is_error, "{}", out.content);
    assert_eq!(out.content, "a.rs:1:fn alpha() {}\na.rs:3:fn beta() {}\n");
    let out = run(&r, d, "search_files", json!({"pattern": "^fn", "case_insensitive": true, "glob": "*.txt"})).await;
    assert_eq!(out.content, "sub/b.txt:2:FN upper\n");
    let out = run(&r, d, "search_files", json!({"pattern": "fn", "max_results": 1})).await;
    assert!(out.content.contains("[stopped at 1 matches"), "{}", out.content);
    assert_eq!(out.content.lines().count(), 2, "{}", out.content);
    let out = run(&r, d, "search_files", json!({"pattern": "zzz"})).await;
    assert_eq!(out.content, "no matches\n");
    let out = run(&r, d, "search_files", json!({"pattern": "(unclosed"})).await;
    assert!(out.is_error && out.content.contains("not a valid regex"), "{}", out.content);
    let out = run(&r, d, "search_files", json!({"pattern": "x", "path": "/"})).await;
    assert!(out.is_error && out.content.contains("outside the workspace"), "{}", out.content);
}

#[tokio::test]
async fn search_output_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // One 2 MB line and many matching lines: lines are cut, the whole output is clipped.
    let mut text = "m".repeat(2 << 20);
    text.push('\n');
    for i in 0..5000 {
        text.push_str(&format!("match {i}\n"));
    }
    write(dir.path(), "big.txt", &text);
    let out = run(&registry(), dir.path(), "search_files", json!({"pattern": "m", "max_results": 10000})).await;
    assert!(!out.is_error);
    assert!(out.content.len() < 4096 + 200, "{}", out.content.len());
    assert!(out.content.starts_with(&format!("big.txt:1:{}…", "m".repeat(300))), "{}", &out.content[..400]);
    assert!(out.content.contains("bytes omitted"));
    assert!(out.content.ends_with("big.txt:5001:match 4999\n"), "{}", out.content);
}

#[tokio::test]
async fn read_file_of_100_mb_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(dir.path().join("huge.bin")).unwrap();
    f.set_len(100 << 20).unwrap();
    let out = run(&registry(), dir.path(), "read_file", json!({"path": "huge.bin"})).await;
    assert!(!out.is_error);
    assert!(out.content.len() < 4 * 4096 + 100);
    assert!(out.content.contains(&format!("[… {} bytes omitted …]", (100 << 20) - 4 * 4096)));
    assert_eq!(out.details.unwrap(), json!({"bytes": 100 << 20, "truncated": true}));
}

async fn serve() -> String {
    use axum::routing::{any, get};
    let app = axum::Router::new()
        .route(
            "/echo",
            any(|method: axum::http::Method, headers: axum::http::HeaderMap, body: String| async move {
                let h = headers.get("x-test").map(|v| v.to_str().unwrap_or("").to_owned()).unwrap_or_default();
                ([("x-reply", "yes")], format!("{method} x-test={h} body={body}"))
            }),
        )
        .route("/big", get(|| async { "b".repeat(1 << 20) }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route(
            "/redirect",
            get(|| async { (axum::http::StatusCode::FOUND, [("location", "http://example.invalid/")]) }),
        )
        .route("/missing", get(|| async { (axum::http::StatusCode::NOT_FOUND, "no such thing") }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn http_request_sends_and_reports() {
    let base = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let r = registry();
    let out = run(
        &r,
        dir.path(),
        "http_request",
        json!({"url": format!("{base}/echo"), "method": "POST", "headers": {"x-test": "42"}, "body": "hello"}),
    )
    .await;
    assert!(!out.is_error, "{}", out.content);
    assert!(out.content.starts_with("HTTP 200 OK\n"), "{}", out.content);
    assert!(out.content.contains("x-reply: yes\n"), "{}", out.content);
    assert!(out.content.ends_with("\n\nPOST x-test=42 body=hello"), "{}", out.content);

    let out = run(&r, dir.path(), "http_request", json!({"url": format!("{base}/big"), "max_bytes": 1000})).await;
    assert!(out.content.ends_with(&format!("{}\n[body clipped at 1000 bytes]", "b".repeat(1000))), "{}", out.content);
    assert_eq!(out.details.unwrap()["truncated"], true);

    let out = run(&r, dir.path(), "http_request", json!({"url": format!("{base}/redirect")})).await;
    assert!(out.content.starts_with("HTTP 302 Found\n"), "{}", out.content);
    assert!(out.content.contains("location: http://example.invalid/"), "{}", out.content);

    let out = run(&r, dir.path(), "http_request", json!({"url": format!("{base}/missing")})).await;
    assert!(out.content.starts_with("HTTP 404 Not Found\n") && out.content.ends_with("no such thing"));
    assert_eq!(out.details.unwrap()["status"], 404);

    let out = run(&r, dir.path(), "http_request", json!({"url": format!("{base}/slow"), "timeout_secs": 1})).await;
    assert!(out.is_error && out.content.contains("timed out after 1s"), "{}", out.content);

    let out = run(&r, dir.path(), "http_request", json!({"url": "file:///etc/passwd"})).await;
    assert!(out.is_error && out.content.contains("must be http or https"), "{}", out.content);
    let out = run(&r, dir.path(), "http_request", json!({"url": "not a url"})).await;
    assert!(out.is_error && out.content.contains("not a valid URL"), "{}", out.content);
    // Nothing listens on port 1.
    let out = run(&r, dir.path(), "http_request", json!({"url": "http://127.0.0.1:1/"})).await;
    assert!(out.is_error && out.content.contains("request to http://127.0.0.1:1/ failed"), "{}", out.content);
}

#[tokio::test]
async fn edit_then_read_through_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let r = registry();
    let out = run(&r, dir.path(), "write_file", json!({"path": "n/f.txt", "content": "a\nb\nc\n"})).await;
    assert!(!out.is_error, "{}", out.content);
    let out =
        run(&r, dir.path(), "edit_file", json!({"path": "n/f.txt", "old_string": "b\n", "new_string": "B\n"})).await;
    assert!(!out.is_error, "{}", out.content);
    let out = run(&r, dir.path(), "read_file", json!({"path": "n/f.txt", "start_line": 2, "end_line": 2})).await;
    assert_eq!(out.content, "[lines 2-2 of 3]\nB\n");
    let s = r.stats();
    assert_eq!((s["edit_file"].calls, s["edit_file"].errors), (1, 0));
}

#[tokio::test]
async fn file_tools_refuse_protected_paths_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    write(&root, ".descartes/config.toml", "# mine\n");
    write(&root, ".git/config", "[core]\n");
    write(&root, "src/a.txt", "hello\n");
    let limits = ToolLimits {
        protected: descartes_tools::Protected { absolute: vec![root.join(".descartes")], ..Default::default() },
        ..ToolLimits::default()
    };
    let r = builtin_registry(&limits);
    for (tool, input) in [
        ("write_file", json!({"path": ".descartes/config.toml", "content": "[sandbox]\nmode = \"full-access\"\n"})),
        ("write_file", json!({"path": ".descartes/new.toml", "content": "x"})),
        ("write_file", json!({"path": ".ai/policy.yaml", "content": "rules: []\n"})),
        ("write_file", json!({"path": "./src/../.git/hooks/pre-commit", "content": "exit 0\n"})),
        ("edit_file", json!({"path": ".git/config", "old_string": "[core]", "new_string": "[x]"})),
        ("edit_file", json!({"path": ".descartes/config.toml", "old_string": "# mine", "new_string": "x"})),
    ] {
        let out = run(&r, &root, tool, input.clone()).await;
        assert!(out.is_error, "{tool} {input}: {}", out.content);
        assert!(out.content.contains("is protected"), "{}", out.content);
    }
    assert_eq!(std::fs::read_to_string(root.join(".descartes/config.toml")).unwrap(), "# mine\n");
    assert!(!root.join(".ai").exists() && !root.join(".git/hooks").exists());
    // Reading them and writing elsewhere are fine.
    let out = run(&r, &root, "read_file", json!({"path": ".descartes/config.toml"})).await;
    assert!(!out.is_error, "{}", out.content);
    let out =
        run(&r, &root, "edit_file", json!({"path": "src/a.txt", "old_string": "hello", "new_string": "bye"})).await;
    assert!(!out.is_error, "{}", out.content);
}
