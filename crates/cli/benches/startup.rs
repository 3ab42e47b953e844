//! Cold start of the binary (`cargo bench -p descartes --bench startup`): `descartes --version`
//! and `descartes list` (which also loads the config and opens the database), spawned many times.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn measure(args: &[&str], dir: &std::path::Path, n: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let status = Command::new(env!("CARGO_BIN_EXE_descartes"))
            .args(args)
            .current_dir(dir)
            .env("DESCARTES_HOME", dir.join("home"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        samples.push(t.elapsed());
        assert!(status.success(), "{args:?}");
    }
    samples.sort();
    samples
}

fn main() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    measure(&["init"], dir.path(), 1);
    for args in [&["--version"][..], &["list"][..]] {
        let s = measure(args, dir.path(), 300);
        println!(
            "descartes {}: n={} p50={:?} p90={:?} p99={:?}",
            args.join(" "),
            s.len(),
            s[s.len() / 2],
            s[s.len() * 9 / 10],
            s[s.len() * 99 / 100]
        );
    }
}
