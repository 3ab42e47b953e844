//! The local model against llama.cpp on the same GGUF, the same prompt tokens and the same
//! threads, in one run: decoding (128 greedy tokens after the first), prompt processing (a
//! 1,000-token prompt), time to first token for a 100-token prompt, and model load.
//!
//! `cargo bench -p descartes-local --bench tokens`. The model comes from `DESCARTES_TEST_MODEL_DIR`
//! (default `<repo>/target/models`; pulled there if missing). The peer is llama-cpp-python
//! (`benches/llama_cpp_peer.py`); when `python3 -c "import llama_cpp"` fails, this bench installs
//! it first with `benches/install_llama_cpp.sh` (a source build, several minutes).
//! `DESCARTES_BENCH_RUNS` (default 5) runs per side, taken in alternating rounds so both sides
//! see the same machine load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use descartes_local::{DEFAULT_MODEL, GenerateOptions, LocalModel, pull, resolve_model};
use descartes_protocol::Message;

const DECODE_TOKENS: usize = 128;
const PP_TOKENS: usize = 1000;
const TTFT_TOKENS: usize = 100;
const ROUNDS: usize = 3;

fn main() {
    let dir = match std::env::var_os("DESCARTES_TEST_MODEL_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/models"),
    };
    let path = match resolve_model(DEFAULT_MODEL, &dir) {
        Ok(path) => path,
        Err(_) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            match rt.block_on(pull(DEFAULT_MODEL, &dir)) {
                Ok(path) => path,
                Err(e) => {
                    eprintln!("SKIPPED: no model in {}: {e}", dir.display());
                    return;
                }
            }
        }
    };
    let runs: usize = std::env::var("DESCARTES_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let started = Instant::now();
    let model = LocalModel::load(&path).expect("load");
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    println!("model {} loaded in {load_ms:.0} ms, {} threads", path.display(), model.threads());

    let prompt = model
        .render_prompt(None, &[Message::user_text("Tell me a story about a lighthouse keeper.")], &[])
        .expect("prompt");
    let decode_prompt = model.encode(&prompt).expect("encode");
    let pp_prompt = long_prompt(&model, PP_TOKENS);
    let ttft_prompt = pp_prompt[..TTFT_TOKENS].to_vec();

    let peer_ready = ensure_peer();
    let per_round = runs.div_ceil(ROUNDS).max(1);
    let (mut ours_decode, mut ours_pp, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
    let (mut peer_decode, mut peer_pp, mut peer_version) = (Vec::new(), Vec::new(), String::new());
    for round in 0..ROUNDS {
        for run in 0..per_round + usize::from(round == 0) {
            let decode = decode_rate(&model, &decode_prompt);
            let pp = PP_TOKENS as f64 / first_token_secs(&model, &pp_prompt);
            let first = first_token_secs(&model, &ttft_prompt) * 1e3;
            if round == 0 && run == 0 {
                println!("warm-up: decode {decode:.1} tokens/s, prompt {pp:.0} tokens/s");
                continue;
            }
            println!(
                "descartes: decode {decode:.1} tokens/s, prompt processing {pp:.0} tokens/s, first token after {TTFT_TOKENS} prompt tokens {first:.1} ms"
            );
            ours_decode.push(decode);
            ours_pp.push(pp);
            ttft.push(first);
        }
        if peer_ready {
            match run_peer(&path, model.threads(), &decode_prompt, &pp_prompt, per_round) {
                Ok((version, decode, pp)) => {
                    for (d, p) in decode.iter().zip(&pp) {
                        println!("llama.cpp: decode {d:.1} tokens/s, prompt processing {p:.0} tokens/s");
                    }
                    peer_version = version;
                    peer_decode.extend(decode);
                    peer_pp.extend(pp);
                }
                Err(e) => println!("llama.cpp peer failed: {e}"),
            }
        }
    }

    println!();
    println!("median of {} runs each, {} threads, {}:", ours_decode.len(), model.threads(), path.display());
    println!("  model load: {load_ms:.0} ms");
    println!("  first token after a {TTFT_TOKENS}-token prompt: {:.1} ms", median(&mut ttft));
    let (d, p) = (median(&mut ours_decode), median(&mut ours_pp));
    if peer_decode.is_empty() {
        println!("  decode: descartes {d:.1} tokens/s (no llama.cpp figure)");
        println!("  prompt processing: descartes {p:.0} tokens/s (no llama.cpp figure)");
    } else {
        let (pd, pp) = (median(&mut peer_decode), median(&mut peer_pp));
        println!(
            "  decode: descartes {d:.1} tokens/s, llama.cpp (llama-cpp-python {peer_version}) {pd:.1}: {:.2}x",
            d / pd
        );
        println!("  prompt processing: descartes {p:.0} tokens/s, llama.cpp {pp:.0}: {:.2}x", p / pp);
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Prose tokenized to exactly `n` tokens (the BOS token, if the file has one, included).
fn long_prompt(model: &LocalModel, n: usize) -> Vec<u32> {
    let sentence = "The keeper climbed the one hundred and twelve steps of the lighthouse every evening, \
        trimmed the wick, wound the clockwork that turned the lens, and wrote the weather in his log. ";
    let mut text = String::new();
    loop {
        text.push_str(sentence);
        let tokens = model.encode(&text).expect("encode");
        if tokens.len() >= n {
            return tokens[..n].to_vec();
        }
    }
}

/// Decode rate: the tokens after the first over the time after it (prompt processing excluded).
fn decode_rate(model: &LocalModel, prompt: &[u32]) -> f64 {
    let options = GenerateOptions { max_tokens: DECODE_TOKENS, stop_at_eos: false, ..GenerateOptions::default() };
    let mut first = None;
    let started = Instant::now();
    let generation = model
        .generate(prompt, &options, &|| false, &mut |_| {
            first.get_or_insert_with(|| started.elapsed());
            ControlFlow::Continue(())
        })
        .expect("generate");
    let total = started.elapsed();
    assert_eq!(generation.generated_tokens, DECODE_TOKENS);
    (DECODE_TOKENS - 1) as f64 / (total - first.unwrap_or(total)).as_secs_f64()
}

/// Seconds from the call to the first generated token (context set up, prompt processed, one
/// token sampled).
fn first_token_secs(model: &LocalModel, prompt: &[u32]) -> f64 {
    let options = GenerateOptions { max_tokens: 1, stop_at_eos: false, ..GenerateOptions::default() };
    let started = Instant::now();
    model.generate(prompt, &options, &|| false, &mut |_| ControlFlow::Continue(())).expect("generate");
    started.elapsed().as_secs_f64()
}

fn bench_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches")
}

fn has_llama_cpp_python() -> bool {
    Command::new("python3")
        .args(["-c", "import llama_cpp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// llama-cpp-python importable, installed by `install_llama_cpp.sh` if it is not.
fn ensure_peer() -> bool {
    if has_llama_cpp_python() {
        return true;
    }
    println!("llama-cpp-python is not installed: building it (benches/install_llama_cpp.sh, several minutes)");
    let status = Command::new("bash").arg(bench_dir().join("install_llama_cpp.sh")).status();
    if !status.is_ok_and(|s| s.success()) || !has_llama_cpp_python() {
        println!("cannot install llama-cpp-python: no llama.cpp figures in this run");
        return false;
    }
    true
}

type PeerFigures = (String, Vec<f64>, Vec<f64>);

fn run_peer(model: &Path, threads: i32, decode: &[u32], pp: &[u32], runs: usize) -> Result<PeerFigures, String> {
    let job = serde_json::json!({
        "model": model, "threads": threads, "decode_prompt": decode, "decode_tokens": DECODE_TOKENS,
        "pp_prompt": pp, "runs": runs,
    });
    let mut child = Command::new("python3")
        .arg(bench_dir().join("llama_cpp_peer.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3: {e}"))?;
    child.stdin.take().expect("stdin").write_all(job.to_string().as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let list = |key: &str| -> Vec<f64> {
        value[key].as_array().map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect()).unwrap_or_default()
    };
    Ok((value["version"].as_str().unwrap_or("?").to_owned(), list("decode"), list("pp")))
}
