//! `search_files` against ripgrep on a generated 100,000-file tree
//! (`cargo bench -p descartes-tools --bench search`; needs `rg` on PATH for the comparison).
//!
//! The tree: 100 directories × 1,000 files of ~20 lines each; the pattern matches in 100 files.
//! Each side runs once to warm the page cache, then `RUNS` times; the median is compared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use descartes_core::ToolContext;
use descartes_protocol::RunId;
use descartes_tools::{ToolLimits, builtin_registry};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const DIRS: usize = 100;
const FILES_PER_DIR: usize = 1000;
const RUNS: usize = 7;
const PATTERN: &str = r"needle_[0-9]+\(";

fn generate(root: &Path) {
    for d in 0..DIRS {
        let dir = root.join(format!("mod_{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..FILES_PER_DIR {
            let mut text = String::with_capacity(800);
            for l in 0..20 {
                text.push_str(&format!("    let value_{l} = compute(input_{f}, {d}, \"some text on line {l}\");\n"));
            }
            // One file per directory matches: 100 in all.
            if f == 7 {
                text.push_str(&format!("fn needle_{d}(x: u32) -> u32 {{ x }}\n"));
            }
            std::fs::write(dir.join(format!("file_{f:04}.rs")), text).unwrap();
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let t = Instant::now();
    generate(root);
    println!("generated {} files in {:.1}s under {}", DIRS * FILES_PER_DIR, t.elapsed().as_secs_f64(), root.display());

    let registry = builtin_registry(&ToolLimits::default());
    let ctx = ToolContext {
        cwd: root.to_owned(),
        run_id: RunId::from("bench"),
        call_id: "call".into(),
        spool_dir: root.join(".spool"),
        cancel: CancellationToken::new(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let input = json!({"pattern": PATTERN, "max_results": 1000});
    let mut ours = Vec::new();
    let mut matches = 0;
    for i in 0..=RUNS {
        let t = Instant::now();
        let out = rt.block_on(registry.execute("search_files", input.clone(), &ctx));
        let elapsed = t.elapsed();
        assert!(!out.is_error, "{}", out.content);
        matches = out.content.lines().count();
        if i > 0 {
            ours.push(elapsed);
        }
    }
    let ours = median(ours);
    println!("search_files: median {:.1} ms over {RUNS} runs ({matches} matching lines)", ours.as_secs_f64() * 1e3);

    let mut theirs = Vec::new();
    let mut rg_matches = None;
    for i in 0..=RUNS {
        let t = Instant::now();
        let out = Command::new("rg").args(["--line-number", "--no-heading", PATTERN, "."]).current_dir(root).output();
        let elapsed = t.elapsed();
        let Ok(out) = out else {
            println!("ripgrep (rg) not found on PATH: no comparison");
            return;
        };
        rg_matches = Some(String::from_utf8_lossy(&out.stdout).lines().count());
        if i > 0 {
            theirs.push(elapsed);
        }
    }
    let theirs = median(theirs);
    println!(
        "ripgrep:      median {:.1} ms over {RUNS} runs ({} matching lines)",
        theirs.as_secs_f64() * 1e3,
        rg_matches.unwrap_or_default()
    );
    println!("ratio search_files / rg = {:.2}", ours.as_secs_f64() / theirs.as_secs_f64());
}
