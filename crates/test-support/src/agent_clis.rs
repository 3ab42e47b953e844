//! The real coding-agent CLIs for tests: installed from npm by `.ci/install-clis` into
//! `<repo>/target/npm` (or found in `DESCARTES_TEST_CLI_DIR`). When a CLI cannot be had (no npm,
//! no registry), [`cli`] prints a loud skip notice and returns `None`, unless
//! `DESCARTES_TEST_REQUIRE_CLIS=1`, which makes it panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The directory holding `claude`, `codex` and `gemini`, installing them if needed.
pub fn cli_dir() -> &'static Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("DESCARTES_TEST_CLI_DIR") {
            return Some(PathBuf::from(dir));
        }
        let dir = repo_root().join("target/npm/node_modules/.bin");
        if ["claude", "codex", "gemini"].iter().all(|b| dir.join(b).exists()) {
            return Some(dir);
        }
        let script = repo_root().join(".ci/install-clis");
        eprintln!("real CLIs missing: running {}", script.display());
        match std::process::Command::new(&script).status() {
            Ok(s) if s.success() => Some(dir),
            Ok(s) => {
                eprintln!("{} failed ({s})", script.display());
                None
            }
            Err(e) => {
                eprintln!("cannot run {}: {e}", script.display());
                None
            }
        }
    })
}

/// The CLI binary, or `None` (after a loud skip notice) when it cannot be had.
pub fn cli(name: &str) -> Option<PathBuf> {
    let path = cli_dir().as_ref().map(|d| d.join(name)).filter(|p| p.exists());
    if path.is_none() {
        let message = format!(
            "the `{name}` CLI is not installed and .ci/install-clis could not install it (no npm or no registry?)"
        );
        if std::env::var("DESCARTES_TEST_REQUIRE_CLIS").as_deref() == Ok("1") {
            panic!("{message} and DESCARTES_TEST_REQUIRE_CLIS=1");
        }
        eprintln!("\n!!!!!!!! SKIPPED: {message}; set DESCARTES_TEST_REQUIRE_CLIS=1 to make this a failure !!!!!!!!\n");
    }
    path
}

/// The decision invariant, over a run's events as JSON (`{"type", "data"}`): every tool call
/// that was executed (a `tool_call_started`, by Descartes or by an agent CLI) has a
/// `permission_decided` allowing it, with its `call_id`, earlier in the log (a start marked
/// `not_run` is a call settled without running); and no call that was denied was executed. Panics naming the call otherwise.
pub fn assert_every_call_decided(events: &[serde_json::Value]) {
    use std::collections::HashMap;
    let mut decided: HashMap<String, String> = HashMap::new();
    for e in events {
        let data = &e["data"];
        let id = data["call_id"].as_str().unwrap_or_default().to_owned();
        match e["type"].as_str().unwrap_or_default() {
            "permission_decided" => {
                decided.insert(id, data["decision"].as_str().unwrap_or_default().to_owned());
            }
            // A call settled without running (unknown tool, invalid arguments) asks nothing.
            "tool_call_started" if data["not_run"] == true => {}
            "tool_call_started" => {
                let by = data["executed_by"].as_str().unwrap_or("descartes");
                match decided.get(&id).map(String::as_str) {
                    Some("allow") => {}
                    Some(other) => {
                        panic!("tool call {id} ({}) executed by {by} after a `{other}` decision", data["tool"])
                    }
                    None => panic!(
                        "tool call {id} ({}) executed by {by} without a permission decision before it: {events:#?}",
                        data["tool"]
                    ),
                }
            }
            _ => {}
        }
    }
}
