//! Tokens per second of generating 128 tokens with SmolLM2-135M-Instruct (Q4_1) on the CPU.
//!
//! `cargo bench -p descartes-local --bench tokens` (model from `DESCARTES_TEST_MODEL_DIR`, default
//! `<repo>/target/models`, pulled there if missing; `DESCARTES_BENCH_RUNS` runs, default 5).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use descartes_local::{DEFAULT_MODEL, GenerateOptions, LocalModel, pull, resolve_model};
use descartes_protocol::Message;

const TOKENS: usize = 128;

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
    println!("model {} loaded in {:.0} ms", path.display(), started.elapsed().as_secs_f64() * 1e3);
    let prompt = model
        .render_prompt(None, &[Message::user_text("Tell me a story about a lighthouse keeper.")], &[])
        .expect("prompt");
    let tokens = model.encode(&prompt).expect("encode");
    let options = GenerateOptions { max_tokens: TOKENS, stop_at_eos: false, ..GenerateOptions::default() };

    let mut rates = Vec::new();
    for run in 0..runs + 1 {
        let mut first = None;
        let started = Instant::now();
        let generation = model
            .generate(&tokens, &options, &|| false, &mut |_| {
                first.get_or_insert_with(|| started.elapsed());
                ControlFlow::Continue(())
            })
            .expect("generate");
        let total = started.elapsed();
        assert_eq!(generation.generated_tokens, TOKENS);
        let first = first.unwrap_or(total);
        // Decode rate: the tokens after the first over the time after it (prefill excluded).
        let rate = (TOKENS - 1) as f64 / (total - first).as_secs_f64();
        if run == 0 {
            println!("warm-up: {rate:.1} tokens/s");
            continue;
        }
        println!(
            "run {run}: prompt {} tokens, first token {:.1} ms, {TOKENS} tokens in {:.0} ms, decode {rate:.1} tokens/s, overall {:.1} tokens/s",
            tokens.len(),
            first.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            TOKENS as f64 / total.as_secs_f64()
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    if let Some(median) = rates.get(rates.len() / 2) {
        println!(
            "median decode rate: {median:.1} tokens/s ({} threads)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
}
