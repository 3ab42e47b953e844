//! `Worktrees::create` against plain `git worktree add -b` on a generated 10,000-file repository
//! (`cargo bench -p descartes-worktree --bench worktree`; `DESCARTES_BENCH_RUNS`, default 9).
//!
//! The repository: 100 directories × 100 files of ~20 lines, one commit, packed (`git gc`),
//! automatic gc off. Then the same on a 10-file repository, where the
//! difference is Descartes' fixed cost (its extra git calls and the record it writes).
//! Each side creates a worktree on a new branch from HEAD; the two sides alternate (so drift in
//! the machine's load hits both), each worktree is removed (untimed) before the next one, and
//! one untimed warm-up per side comes first. Medians are compared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use descartes_worktree::{Repo, Worktrees};

const DIRS: usize = 100;
const FILES_PER_DIR: usize = 100;

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=Bench", "-c", "user.email=bench@example.com", "-c", "commit.gpgSign=false"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn generate(repo: &Path, dirs: usize, files_per_dir: usize) {
    git(repo, &["init", "-q", "-b", "main"]);
    // No automatic gc: a background gc after the big commit would run during the measurements.
    git(repo, &["config", "gc.auto", "0"]);
    for d in 0..dirs {
        let dir = repo.join(format!("mod_{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..files_per_dir {
            let mut text = String::with_capacity(1000);
            for l in 0..20 {
                text.push_str(&format!("    let value_{l} = compute(input_{f}, {d}, \"some text on line {l}\");\n"));
            }
            std::fs::write(dir.join(format!("file_{f:03}.rs")), text).unwrap();
        }
    }
    git(repo, &["add", "."]);
    git(repo, &["commit", "-q", "-m", "generated"]);
    git(repo, &["gc", "-q"]);
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let runs: usize = std::env::var("DESCARTES_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(9);
    compare("10,000-file repository", DIRS, FILES_PER_DIR, runs);
    // The same on a 10-file repository: what remains is Descartes' fixed cost per creation.
    compare("10-file repository (fixed overhead)", 1, 10, runs.max(21));
}

fn compare(title: &str, dirs: usize, files_per_dir: usize, runs: usize) {
    println!("== {title}");
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = tmp.path().join("repo");
    std::fs::create_dir_all(&repo_dir).unwrap();
    let t = Instant::now();
    generate(&repo_dir, dirs, files_per_dir);
    let secs = t.elapsed().as_secs_f64();
    println!("generated {} files in {secs:.1}s under {}", dirs * files_per_dir, repo_dir.display());
    let probe = format!("mod_{:03}/file_{:03}.rs", dirs - 1, files_per_dir - 1);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let repo = rt.block_on(Repo::discover(&repo_dir)).unwrap().unwrap();
    let wts = Worktrees::new(repo, tmp.path().join("ours"));
    let plain_root = tmp.path().join("plain");
    std::fs::create_dir_all(&plain_root).unwrap();

    let mut ours = Vec::new();
    let mut plain = Vec::new();
    for i in 0..=runs {
        let t = Instant::now();
        let wt = rt.block_on(wts.create(&format!("task-{i}"), None)).unwrap();
        let elapsed = t.elapsed();
        assert!(wt.path.join(&probe).is_file());
        rt.block_on(wts.discard(&wt)).unwrap();
        if i > 0 {
            ours.push(elapsed);
        }

        let path = plain_root.join(format!("plain-{i}"));
        let branch = format!("plain-{i}");
        let t = Instant::now();
        git(&repo_dir, &["worktree", "add", "--quiet", "-b", &branch, path.to_str().unwrap(), "HEAD"]);
        let elapsed = t.elapsed();
        assert!(path.join(&probe).is_file());
        git(&repo_dir, &["worktree", "remove", "--force", path.to_str().unwrap()]);
        git(&repo_dir, &["branch", "-q", "-D", &branch]);
        if i > 0 {
            plain.push(elapsed);
        }
    }
    let (o, p) = (median(ours.clone()), median(plain.clone()));
    let range = |v: &[Duration]| {
        let min = v.iter().min().copied().unwrap_or_default();
        let max = v.iter().max().copied().unwrap_or_default();
        format!("min {:.1} ms, max {:.1} ms", ms(min), ms(max))
    };
    println!("Worktrees::create:      median {:.1} ms over {runs} runs ({})", ms(o), range(&ours));
    println!("git worktree add -b:    median {:.1} ms over {runs} runs ({})", ms(p), range(&plain));
    println!(
        "ratio create / git worktree add = {:.2} (difference {:+.1} ms)",
        o.as_secs_f64() / p.as_secs_f64(),
        ms(o) - ms(p)
    );
}
