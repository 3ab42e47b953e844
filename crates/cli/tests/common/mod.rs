//! Harness for tests that run the real `descartes` binary against a fake model server.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub use descartes_test_support::{FakeServer, RecordedRequest, Reply, anthropic, openai, sequence, with_delay};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_descartes");

/// The secret marker of this test run: part of every API key the tests hand the binary, so a
/// leak of a key anywhere (stdout, stderr, a database, a log, a spool file) is found. CI sets
/// `DESCARTES_TEST_SECRET_MARKER` to a fresh value and also searches the whole test output.
pub fn marker() -> String {
    std::env::var("DESCARTES_TEST_SECRET_MARKER").ok().filter(|m| !m.is_empty()).unwrap_or_else(|| "test-secret".into())
}

/// The `OPENAI_API_KEY` the tests use.
pub fn openai_key() -> String {
    format!("sk-{}-openai", marker())
}

/// The `ANTHROPIC_API_KEY` the tests use.
pub fn anthropic_key() -> String {
    format!("sk-ant-{}", marker())
}

/// Panics when `text` holds an API key of the tests.
pub fn assert_no_secret(text: &[u8], what: &str) {
    for key in [openai_key(), anthropic_key()] {
        if text.windows(key.len()).any(|w| w == key.as_bytes()) {
            panic!("an API key of the tests leaked into {what}");
        }
    }
}

/// A project directory, a private DESCARTES_HOME and a fake model server.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub server: FakeServer,
    pub durable: bool,
}

impl Env {
    pub fn new<F>(responder: F) -> Env
    where
        F: Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("project")).unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        Env { dir, server: FakeServer::start_blocking(responder), durable: false }
    }

    /// The project directory (`descartes init` is not run by default).
    pub fn project(&self) -> PathBuf {
        self.dir.path().join("project")
    }

    pub fn init(&self) {
        let out = self.cmd(&["init"]).output().unwrap();
        assert!(out.status.success(), "init failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `descartes ARGS` in the project, with a clean environment pointing at the fake server.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args).current_dir(self.project()).env_clear().stdin(Stdio::null());
        let home = self.dir.path().join("home");
        c.env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("DESCARTES_HOME", &home)
            .env("OPENAI_API_KEY", openai_key())
            .env("OPENAI_BASE_URL", self.server.openai_base_url())
            .env("ANTHROPIC_API_KEY", anthropic_key())
            .env("ANTHROPIC_BASE_URL", self.server.url())
            .env("NO_COLOR", "1");
        if !self.durable {
            c.env("DESCARTES_SYNC", "normal");
        }
        c
    }

    /// `descartes ARGS`; its stdout and stderr must not hold an API key.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        assert_no_secret(&out.stdout, &format!("the stdout of `descartes {}`", args.join(" ")));
        assert_no_secret(&out.stderr, &format!("the stderr of `descartes {}`", args.join(" ")));
        out
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// `descartes list --json`.
    pub fn runs(&self) -> Vec<Value> {
        let out = self.run(&["list", "--json"]);
        assert!(out.status.success(), "list failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().cloned().unwrap()
    }

    /// The only run's id.
    pub fn run_id(&self) -> String {
        let runs = self.runs();
        assert_eq!(runs.len(), 1, "expected one run: {runs:?}");
        runs[0]["run_id"].as_str().unwrap().to_owned()
    }

    /// `descartes logs ID --json`.
    pub fn events(&self, run_id: &str) -> Vec<Value> {
        let out = self.run(&["logs", run_id, "--json"]);
        assert!(out.status.success(), "logs failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

/// `git ARGS` in `dir`, which must succeed; its stdout, trimmed.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Env {
    /// Makes the project a git repository with one commit on `main` (`README.md` and `files`,
    /// each a path and its text); `.descartes/` is ignored.
    pub fn git_repo(&self, files: &[(&str, &str)]) {
        let p = self.project();
        git(&p, &["init", "-q", "-b", "main"]);
        git(&p, &["config", "user.email", "dev@example.com"]);
        git(&p, &["config", "user.name", "Dev"]);
        std::fs::write(p.join(".git/info/exclude"), ".descartes/\n").unwrap();
        for (path, text) in [("README.md", "hello\n")].iter().chain(files) {
            let file = p.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, text).unwrap();
            git(&p, &["add", "-f", path]);
        }
        git(&p, &["commit", "-q", "-m", "start"]);
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["type"] == kind).count()
}

/// The invariants every finished run must hold: one `run_started`, one `run_completed`, at
/// most one `tool_call_started` and exactly one `tool_call_completed` per tool call, `seq`
/// strictly increasing, and every executed call decided before it ran
/// ([`descartes_test_support::agent_clis::assert_every_call_decided`]).
pub fn assert_log_invariants(events: &[Value]) {
    descartes_test_support::agent_clis::assert_every_call_decided(events);
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq not strictly increasing: {seqs:?}");
    assert_eq!(count(events, "run_started"), 1, "run_started: {events:#?}");
    assert_eq!(count(events, "run_completed"), 1, "run_completed: {events:#?}");
    let mut calls = std::collections::BTreeMap::<String, (usize, usize)>::new();
    for e in events {
        let id = e["data"]["call_id"].as_str().unwrap_or_default().to_owned();
        match e["type"].as_str().unwrap() {
            "tool_call_started" => calls.entry(id).or_default().0 += 1,
            "tool_call_completed" => calls.entry(id).or_default().1 += 1,
            _ => {}
        }
    }
    for (id, (started, completed)) in calls {
        assert!(started <= 1, "tool call {id} started {started} times");
        assert_eq!(completed, 1, "tool call {id} completed {completed} times");
    }
}

pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).map(|s| s.lines().map(str::to_owned).collect()).unwrap_or_default()
}

/// Sends a signal to a child.
pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Every file a test leaves (databases and their WAL, daemon logs, spools, evidence, config)
/// is searched for the API keys when the test ends.
impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let mut dirs = vec![self.dir.path().to_owned()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
                if meta.is_dir() {
                    // The agent CLIs' own homes (npm caches, their transcripts) are theirs.
                    if !path.ends_with("node_modules") {
                        dirs.push(path);
                    }
                } else if meta.is_file()
                    && meta.len() < 256 * 1024 * 1024
                    && let Ok(bytes) = std::fs::read(&path)
                {
                    assert_no_secret(&bytes, &path.display().to_string());
                }
            }
        }
    }
}

/// A model that runs `command` with `shell`, then answers with what it saw.
pub fn shell_model(command: &'static str) -> impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static {
    move |req: &RecordedRequest| {
        if let Some((_, out)) = req.tool_results().last() {
            Reply::Stream(openai::text(&[&format!("saw: {}", out.replace('\n', " "))]))
        } else {
            let args = serde_json::json!({ "command": command }).to_string();
            Reply::Stream(openai::tool_call("call_1", "shell", &[&args]))
        }
    }
}
