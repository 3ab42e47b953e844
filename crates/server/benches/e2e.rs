//! A run driven over the API's WebSocket against the same run made by `descartes run`
//! (`cargo bench -p descartes-server --bench e2e`): target, the WebSocket adds ≤ 5%.
//!
//! Needs the binary: `target/release/descartes` (`cargo build --release -p descartes`), or the
//! one `DESCARTES_BIN` names; without it the benchmark says so and does nothing. One place (a
//! project with `descartes init`, a private `DESCARTES_HOME`), one fake OpenAI server
//! (`descartes_test_support::FakeServer`), one `descartes serve --listen 127.0.0.1:0`; then,
//! pair after pair, in alternating order:
//! - `local`: `descartes run -p openai PROMPT`, a process, from spawn to exit;
//! - `ws`: this process's WebSocket client: connect, `start_run` with `subscribe`, until the
//!   run's `run_completed` event arrives;
//! - `remote`: `descartes --server URL run -p openai PROMPT`, the CLI's own WebSocket client, a
//!   process, from spawn to exit.
//!
//! Two models: `text` (one model call streaming an answer) and `tool` (a `shell` call, then
//! the answer: two model calls, a tool run). Durable commits on every side (no
//! `DESCARTES_SYNC`). `DESCARTES_BENCH_PAIRS` (20) sets how many counted rounds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use descartes_test_support::{FakeServer, RecordedRequest, Reply, openai};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const API_KEY: &str = "sk-bench-openai";

fn main() {
    let bin = std::env::var_os("DESCARTES_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("release").join("descartes"));
    if !bin.is_file() {
        println!(
            "e2e: skipped: no descartes binary at {} (build it with `cargo build --release -p descartes`, \
             or set DESCARTES_BIN)",
            bin.display()
        );
        return;
    }
    let pairs: usize = std::env::var("DESCARTES_BENCH_PAIRS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    println!("e2e: {} ({} pairs per model, alternating order)", bin.display(), pairs);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    for (name, model) in [("text", text_model as Model), ("tool", tool_model as Model)] {
        compare(&rt, &bin, name, model, pairs);
    }
}

type Model = fn(&RecordedRequest) -> Reply;

fn text_model(_: &RecordedRequest) -> Reply {
    Reply::Stream(openai::text(&["The answer ", "is ", "forty-two."]))
}

fn tool_model(req: &RecordedRequest) -> Reply {
    if req.has_tool_result() {
        Reply::Stream(openai::text(&["The command ", "printed hi."]))
    } else {
        Reply::Stream(openai::tool_call("call_1", "shell", &[r#"{"command":"echo hi"}"#]))
    }
}

/// A place with its fake model server: `descartes` commands run in its project.
struct Place {
    dir: tempfile::TempDir,
    bin: PathBuf,
    model: FakeServer,
}

impl Place {
    fn cmd(&self, args: &[&str]) -> Command {
        let home = self.dir.path().join("home");
        let mut c = Command::new(&self.bin);
        c.args(args)
            .current_dir(self.dir.path().join("project"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("DESCARTES_HOME", &home)
            .env("OPENAI_API_KEY", API_KEY)
            .env("OPENAI_BASE_URL", self.model.openai_base_url())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        c
    }

    /// Runs a command to its end; its wall time.
    fn timed(&self, args: &[&str]) -> Duration {
        let t = Instant::now();
        let out = self.cmd(args).output().unwrap();
        let d = t.elapsed();
        assert!(out.status.success(), "descartes {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        d
    }
}

/// A `descartes serve`, stopped when dropped.
struct Server {
    child: std::process::Child,
    url: String,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(place: &Place) -> Server {
    let out = place.cmd(&["serve", "--print-token"]).output().unwrap();
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut child = place.cmd(&["serve", "--listen", "127.0.0.1:0"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line}")).to_owned();
    Server { child, url, token }
}

/// The parts of a run over the WebSocket, in ms (clock times of this process and the server's
/// event `at`s, one machine, one clock).
const PARTS: [&str; 5] = [
    "WebSocket handshake",
    "start_run sent -> `run_started` reply",
    "start_run sent -> run_started event (`at`)",
    "the run in the server (its events' `at`)",
    "run_completed (`at`) -> this client",
];

/// One run over the WebSocket, from connecting to its `run_completed` event: its wall time,
/// and its [`PARTS`].
async fn ws_run(server: &Server, prompt: &str) -> (Duration, [f64; 5]) {
    let now_us = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as f64;
    let at_us = |frame: &Value| {
        let event: descartes_protocol::Event = serde_json::from_str(&frame["event"].to_string()).unwrap();
        event.at.as_micros() as f64
    };
    let t = Instant::now();
    let connect_at = now_us();
    let mut request = format!("{}/v1/ws", server.url.replacen("http", "ws", 1)).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", server.token).parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let connected_at = now_us();
    let start = json!({"type": "start_run", "run": {"prompt": prompt, "provider": "openai", "auto_approve": true},
        "subscribe": true});
    ws.send(Message::text(start.to_string())).await.unwrap();
    let sent_at = now_us();
    let (mut replied_at, mut started_at) = (0.0, 0.0);
    loop {
        let Some(message) = ws.next().await else { panic!("the socket ended before the run did") };
        let Message::Text(text) = message.unwrap() else { continue };
        let frame: Value = serde_json::from_str(text.as_str()).unwrap();
        match (frame["type"].as_str(), frame["event"]["type"].as_str()) {
            (Some("run_started"), _) => replied_at = now_us(),
            (Some("event"), Some("run_started")) => started_at = at_us(&frame),
            (Some("event"), Some("run_completed")) => {
                let d = t.elapsed();
                let completed_at = at_us(&frame);
                let parts = [
                    connected_at - connect_at,
                    replied_at - sent_at,
                    started_at - sent_at,
                    completed_at - started_at,
                    now_us() - completed_at,
                ];
                let _ = ws.close(None).await;
                return (d, parts.map(|us| us / 1000.0));
            }
            (Some("event"), Some(kind @ ("run_failed" | "run_cancelled"))) => panic!("{kind}: {frame}"),
            (Some("error" | "lagged" | "end"), _) => panic!("{frame}"),
            _ => {}
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn compare(rt: &tokio::runtime::Runtime, bin: &Path, name: &str, model: Model, pairs: usize) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::create_dir_all(dir.path().join("project")).unwrap();
    std::fs::create_dir_all(dir.path().join("home")).unwrap();
    let place = Place { dir, bin: bin.to_owned(), model: FakeServer::start_blocking(model) };
    place.timed(&["init"]);
    let server = start_server(&place);
    let prompt = "say what the answer is";
    let local_args = ["run", "-y", "-p", "openai", prompt];
    let remote_args = ["--server", server.url.as_str(), "run", "-y", "-p", "openai", prompt];
    let (mut local, mut ws, mut remote) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ws_ratio, mut remote_ratio) = (Vec::new(), Vec::new());
    let mut parts: [Vec<f64>; 5] = Default::default();
    // Three uncounted rounds first.
    for round in 0..pairs + 3 {
        let mut times = [Duration::ZERO; 3];
        let mut order = [0, 1, 2];
        order.rotate_left(round % 3);
        for which in order {
            times[which] = match which {
                0 => place.timed(&local_args),
                1 => {
                    let (d, p) = rt.block_on(ws_run(&server, prompt));
                    if round >= 3 {
                        for (all, part) in parts.iter_mut().zip(p) {
                            all.push(part);
                        }
                    }
                    d
                }
                _ => place.timed(&remote_args),
            };
        }
        if round >= 3 {
            let ms = times.map(|d| d.as_secs_f64() * 1000.0);
            local.push(ms[0]);
            ws.push(ms[1]);
            remote.push(ms[2]);
            ws_ratio.push(ms[1] / ms[0]);
            remote_ratio.push(ms[2] / ms[0]);
        }
    }
    let range = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        format!("{lo:.1}–{hi:.1}")
    };
    println!("\nmodel `{name}`: wall time of one run, median (range) over {pairs} rounds");
    println!("  local   `descartes run`                      {:>7.1} ms ({} ms)", median(local.clone()), range(&local));
    println!("  ws      WebSocket start_run -> run_completed  {:>7.1} ms ({} ms)", median(ws.clone()), range(&ws));
    for (what, part) in PARTS.iter().zip(parts) {
        println!("          {what:<44} {:>7.1} ms (median)", median(part));
    }
    println!(
        "  remote  `descartes --server URL run`          {:>7.1} ms ({} ms)",
        median(remote.clone()),
        range(&remote)
    );
    println!(
        "  ws / local: ratio of medians {:.3}, median of per-round ratios {:.3}  [target <= 1.05]",
        median(ws) / median(local.clone()),
        median(ws_ratio)
    );
    println!(
        "  remote / local: ratio of medians {:.3}, median of per-round ratios {:.3}",
        median(remote) / median(local),
        median(remote_ratio)
    );
}
