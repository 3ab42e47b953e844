//! A local OpenAI-compatible server that reports no usage: llama.cpp's, through
//! `llama-cpp-python`'s `llama_cpp.server` (installed by `.ci/run` with
//! `crates/local/benches/install_llama_cpp.sh`), serving the default local model's GGUF. Its
//! stream carries no `usage` despite `stream_options.include_usage`, so Descartes counts the
//! tokens itself and marks them estimated: in the event, in `list` and in the run's totals.
//!
//! Without `llama_cpp` the test says so loudly and passes, unless
//! `DESCARTES_TEST_REQUIRE_LLAMA_CPP=1` (CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn model_path() -> Option<PathBuf> {
    let dir = match std::env::var_os("DESCARTES_TEST_MODEL_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/models"),
    };
    let name = descartes_local::DEFAULT_MODEL;
    if let Ok(path) = descartes_local::resolve_model(name, &dir) {
        return Some(path);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    match rt.block_on(descartes_local::pull(name, &dir)) {
        Ok(path) => Some(path),
        Err(e) => skip(&format!("the model {name} could not be pulled: {e}")),
    }
}

fn skip<T>(why: &str) -> Option<T> {
    if std::env::var("DESCARTES_TEST_REQUIRE_LLAMA_CPP").as_deref() == Ok("1") {
        panic!("DESCARTES_TEST_REQUIRE_LLAMA_CPP=1 but {why}");
    }
    eprintln!("\n**********\nSKIPPED: llama.cpp server test: {why}\n**********\n");
    None
}

/// `python3 -m llama_cpp.server` on a free port, killed on drop.
struct LlamaServer {
    child: Child,
    port: u16,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LlamaServer {
    fn start(model: &std::path::Path) -> Option<LlamaServer> {
        if !descartes_test_support::python::module(
            "llama_cpp.server",
            "llama.cpp's OpenAI-compatible server (llama_cpp.server)",
            "'llama-cpp-python[server]'",
            "DESCARTES_TEST_REQUIRE_LLAMA_CPP",
        ) {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("python3")
            .args(["-m", "llama_cpp.server", "--host", "127.0.0.1", "--n_ctx", "4096", "--n_threads", "2"])
            .arg("--port")
            .arg(port.to_string())
            .arg("--model")
            .arg(model)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = LlamaServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "llama_cpp.server did not listen on {port} within 120 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(server)
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

#[test]
fn a_server_without_usage_is_counted_and_marked_estimated() {
    let Some(model) = model_path() else { return };
    let Some(llama) = LlamaServer::start(&model) else { return };
    let env = Env::new(|_| panic!("the fake server is not used"));
    let out = env
        .cmd(&["run", "-p", "openai", "--model", "smollm2", "What is the capital of France?"])
        .env("OPENAI_BASE_URL", llama.base_url())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run failed: {stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty(), "no answer; stderr: {stderr}");

    let run_id = env.run_id();
    let events = env.events(&run_id);
    let completed: Vec<_> = events.iter().filter(|e| e["type"] == "model_call_completed").collect();
    assert_eq!(completed.len(), 1, "{events:?}");
    let usage = &completed[0]["data"]["usage"];
    assert_eq!(usage["estimated"], true, "{usage}");
    let (input, output) = (usage["input_tokens"].as_u64().unwrap(), usage["output_tokens"].as_u64().unwrap());
    // The system prompt and the question are well over 20 tokens; the answer is a few.
    assert!(input > 20 && output > 0, "{usage}");

    let runs = env.runs();
    assert_eq!(runs[0]["tokens"].as_u64(), Some(input + output), "{runs:?}");
    assert_eq!(runs[0]["estimated_tokens"], runs[0]["tokens"], "{runs:?}");
    let list = env.run(&["list"]);
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains(&format!("~{}", input + output)) || list.contains(" ~"), "{list}");
    let logs = env.run(&["logs", &run_id]);
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("counted by Descartes"), "{logs}");
}
