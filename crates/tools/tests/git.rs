//! `git_status`, `git_diff`, `git_log` on a repository made with the git CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use descartes_core::{ToolContext, ToolRegistry};
use descartes_protocol::RunId;
use descartes_tools::{ToolLimits, builtin_registry};
use serde_json::json;
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

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Ada")
        .env("GIT_AUTHOR_EMAIL", "ada@example.invalid")
        .env("GIT_COMMITTER_NAME", "Ada")
        .env("GIT_COMMITTER_EMAIL", "ada@example.invalid")
        .env("GIT_AUTHOR_DATE", "2024-05-06T07:08:09Z")
        .env("GIT_COMMITTER_DATE", "2024-05-06T07:08:09Z")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn repo() -> (tempfile::TempDir, ToolRegistry) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    git(d, &["init", "-q", "-b", "main"]);
    std::fs::write(d.join("a.txt"), "one\ntwo\nthree\n").unwrap();
    std::fs::write(d.join("gone.txt"), "bye\n").unwrap();
    git(d, &["add", "."]);
    git(d, &["commit", "-q", "-m", "first commit"]);
    std::fs::write(d.join("a.txt"), "one\n2\nthree\n").unwrap();
    git(d, &["commit", "-q", "-am", "second: change a"]);
    (dir, builtin_registry(&ToolLimits::default()))
}

#[tokio::test]
async fn git_log_lists_commits_newest_first() {
    let (dir, r) = repo();
    let out = r.execute("git_log", json!({}), &ctx(dir.path())).await;
    assert!(!out.is_error, "{}", out.content);
    let lines: Vec<&str> = out.content.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.content);
    assert!(lines[0].ends_with(" 2024-05-06 Ada second: change a"), "{}", lines[0]);
    assert!(lines[1].ends_with(" 2024-05-06 Ada first commit"), "{}", lines[1]);
    assert_eq!(lines[0].split(' ').next().unwrap().len(), 8);
    let out = r.execute("git_log", json!({"max_count": 1}), &ctx(dir.path())).await;
    assert_eq!(out.content.lines().count(), 1);
}

#[tokio::test]
async fn git_status_and_diff_show_staged_unstaged_and_untracked() {
    let (dir, r) = repo();
    let d = dir.path();
    let c = ctx(d);
    let out = r.execute("git_status", json!({}), &c).await;
    assert_eq!(out.content, "branch: main\nclean: nothing to commit\n");
    let out = r.execute("git_diff", json!({}), &c).await;
    assert_eq!(out.content, "no changes\n");

    std::fs::write(d.join("a.txt"), "one\n2\nthree\nfour\n").unwrap();
    std::fs::remove_file(d.join("gone.txt")).unwrap();
    std::fs::write(d.join("new.txt"), "fresh\n").unwrap();
    std::fs::write(d.join("staged.txt"), "s1\n").unwrap();
    git(d, &["add", "staged.txt"]);

    let out = r.execute("git_status", json!({}), &c).await;
    assert!(!out.is_error, "{}", out.content);
    assert_eq!(
        out.content,
        "branch: main\nunstaged modified a.txt\nunstaged deleted gone.txt\nuntracked new.txt\nstaged added staged.txt\n"
    );

    let out = r.execute("git_diff", json!({}), &c).await;
    assert!(!out.is_error, "{}", out.content);
    assert!(
        out.content.contains(
            "diff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n@@ -1,3 +1,4 @@\n one\n 2\n three\n+four\n"
        ),
        "{}",
        out.content
    );
    assert!(
        out.content.contains("deleted file\n--- a/gone.txt\n+++ /dev/null\n@@ -1,1 +1,0 @@\n-bye\n"),
        "{}",
        out.content
    );
    assert!(!out.content.contains("staged.txt") && !out.content.contains("new.txt"), "{}", out.content);
    assert_eq!(out.details.unwrap()["files"], 2);

    let out = r.execute("git_diff", json!({"staged": true}), &c).await;
    assert!(
        out.content.contains(
            "diff --git a/staged.txt b/staged.txt\nnew file\n--- /dev/null\n+++ b/staged.txt\n@@ -1,0 +1,1 @@\n+s1\n"
        ),
        "{}",
        out.content
    );
    assert!(!out.content.contains("a.txt b/a.txt"), "{}", out.content);
}

#[tokio::test]
async fn git_tools_outside_a_repository_or_the_workspace_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let r = builtin_registry(&ToolLimits::default());
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    // Keep gix from finding a repository above the temporary directory.
    let c = ctx(&plain);
    let out = r.execute("git_status", json!({"path": "../.."}), &c).await;
    assert!(out.is_error && out.content.contains("outside the workspace"), "{}", out.content);
    let out = r.execute("git_log", json!({"path": "/"}), &c).await;
    assert!(out.is_error && out.content.contains("outside the workspace"), "{}", out.content);
}
