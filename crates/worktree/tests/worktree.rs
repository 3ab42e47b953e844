//! Worktrees, evidence, merges and the content store against the real `git` in temporary
//! directories.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use descartes_worktree::{
    ContentHash, Error, EvidenceOptions, EvidenceStore, FileStatus, MergeError, MergeKind, Repo, Worktree, Worktrees,
    collect_evidence,
};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=Tester", "-c", "user.email=tester@example.com", "-c", "commit.gpgSign=false"])
        .args(args)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?} in {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim_end().to_owned()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    repo: PathBuf,
    root: PathBuf,
    store: PathBuf,
}

/// A repository `repo/` on `main` with a.txt, b.txt, shared.txt, src/lib.rs and docs/guide.md,
/// and a worktrees root outside it.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    std::fs::create_dir_all(repo.join("docs")).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["config", "user.name", "Tester"]);
    git(&repo, &["config", "user.email", "tester@example.com"]);
    git(&repo, &["config", "commit.gpgSign", "false"]);
    std::fs::write(repo.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(repo.join("b.txt"), "bravo\n").unwrap();
    std::fs::write(repo.join("shared.txt"), "one\ntwo\nthree\n").unwrap();
    std::fs::write(repo.join("src/lib.rs"), "pub fn f() {}\n").unwrap();
    std::fs::write(repo.join("docs/guide.md"), "# Guide\n").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "initial"]);
    let root = tmp.path().join("state/worktrees");
    let store = tmp.path().join("state/evidence");
    Fixture { repo: std::fs::canonicalize(&repo).unwrap(), root, store, _tmp: tmp }
}

impl Fixture {
    async fn worktrees(&self) -> Worktrees {
        let repo = Repo::discover(&self.repo).await.unwrap().unwrap();
        Worktrees::new(repo, self.root.clone())
    }

    fn store(&self) -> EvidenceStore {
        EvidenceStore::new(&self.store).with_fsync(false)
    }
}

/// Every file of a checkout (`.git` excluded) and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_name() == ".git" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                walk(base, &path, out);
            } else {
                out.insert(path.strip_prefix(base).unwrap().to_owned(), std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn quick() -> EvidenceOptions {
    EvidenceOptions { test_timeout: Duration::from_secs(30), ..Default::default() }
}

/// A `command` agent: a shell command run in the task's worktree.
async fn agent(wt: &Worktree, script: &str) {
    let status = tokio::process::Command::new("sh").arg("-c").arg(script).current_dir(&wt.path).status().await.unwrap();
    assert!(status.success(), "{script}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_tasks_in_one_repository() {
    let f = fixture();
    let before = snapshot(&f.repo);
    let main_before = git(&f.repo, &["rev-parse", "main"]);
    let wts = f.worktrees().await;
    assert_eq!(wts.repo().toplevel, f.repo);
    assert_eq!(wts.repo().branch.as_deref(), Some("main"));
    assert_eq!(wts.repo().head_commit.as_deref(), Some(main_before.as_str()));

    let run = |id: &'static str, file: &'static str| {
        let wts = wts.clone();
        async move {
            let wt = wts.create(id, None).await.unwrap();
            agent(&wt, &format!("printf 'changed by {id}\\n' >> {file}")).await;
            let ev = collect_evidence(&wt, &quick()).await.unwrap();
            (wt, ev)
        }
    };
    let ((wa, ea), (wb, eb)) = tokio::join!(run("task-a", "a.txt"), run("task-b", "b.txt"));

    // Two worktrees on two branches, outside the user's checkout.
    assert_ne!(wa.path, wb.path);
    let root = std::fs::canonicalize(&f.root).unwrap();
    assert_eq!(wa.path, root.join("task-a"));
    assert_eq!(wb.path, root.join("task-b"));
    assert_eq!((wa.branch.as_str(), wb.branch.as_str()), ("descartes/task-a", "descartes/task-b"));
    assert_eq!(wa.base_commit, main_before);
    assert_eq!(wa.base_branch.as_deref(), Some("main"));
    let branches = git(&f.repo, &["branch", "--list", "descartes/*", "--format=%(refname:short)"]);
    assert_eq!(branches.lines().collect::<Vec<_>>(), ["descartes/task-a", "descartes/task-b"]);
    let listed = git(&f.repo, &["worktree", "list", "--porcelain"]);
    assert!(listed.contains(&format!("worktree {}", wa.path.display())), "{listed}");
    assert!(listed.contains(&format!("worktree {}", wb.path.display())), "{listed}");

    // The user's checkout is untouched.
    assert_eq!(snapshot(&f.repo), before);
    assert_eq!(git(&f.repo, &["status", "--porcelain", "--untracked-files=all"]), "");
    assert_eq!(git(&f.repo, &["rev-parse", "main"]), main_before);

    // Each task's evidence holds exactly its own diff.
    for (ev, wt, own, other) in [(&ea, &wa, "a.txt", "b.txt"), (&eb, &wb, "b.txt", "a.txt")] {
        assert_eq!(ev.changed_files.len(), 1, "{:?}", ev.changed_files);
        assert_eq!(ev.changed_files[0].path, own);
        assert_eq!(ev.changed_files[0].status, FileStatus::Modified);
        assert!(ev.diff.contains(&format!("+++ b/{own}")), "{}", ev.diff);
        assert!(ev.diff.contains(&format!("+changed by {}", wt.task_id)), "{}", ev.diff);
        assert!(!ev.diff.contains(other), "{}", ev.diff);
        assert_eq!(ev.base_commit, main_before);
        assert!(ev.auto_commit.is_some());
        assert_eq!(ev.head_commit, git(&f.repo, &["rev-parse", &wt.branch]));
        assert!(ev.outside_locks.is_empty() && ev.test.is_none());
        let author = git(&f.repo, &["log", "-1", "--format=%an <%ae>|%s", &wt.branch]);
        assert_eq!(
            author,
            format!("Descartes <descartes@localhost>|descartes: changes left uncommitted by task {}", wt.task_id)
        );
    }

    // Evidence round-trips through the content store and JSON.
    let store = f.store();
    let ra = store.put_evidence(&ea).unwrap();
    let json = serde_json::to_string(&ra).unwrap();
    let back: descartes_worktree::EvidenceRef = serde_json::from_str(&json).unwrap();
    assert_eq!(store.get_evidence(&back).unwrap(), ea);
    assert_eq!(ra.diff, ContentHash::of(ea.diff.as_bytes()));
    let wt_json = serde_json::to_string(&wa).unwrap();
    assert_eq!(serde_json::from_str::<Worktree>(&wt_json).unwrap(), wa);

    // Merge one (fast-forward) ...
    let ma = wts.merge(&wa).await.unwrap();
    assert_eq!(ma.kind, MergeKind::FastForward);
    assert_eq!(ma.previous_commit, main_before);
    assert_eq!(ma.commit, ea.head_commit);
    assert_eq!(ma.checkout_updated.as_deref(), Some(f.repo.as_path()));
    assert_eq!(std::fs::read_to_string(f.repo.join("a.txt")).unwrap(), "alpha\nchanged by task-a\n");
    assert_eq!(git(&f.repo, &["status", "--porcelain"]), "");
    // ... then the other: main moved, so a merge commit.
    let mb = wts.merge(&wb).await.unwrap();
    assert_eq!(mb.kind, MergeKind::MergeCommit);
    assert_eq!(mb.previous_commit, ea.head_commit);
    assert_eq!(git(&f.repo, &["rev-parse", "main"]), mb.commit);
    assert_eq!(git(&f.repo, &["rev-parse", "HEAD"]), mb.commit);
    assert_eq!(git(&f.repo, &["log", "-1", "--format=%P", "main"]), format!("{} {}", ea.head_commit, eb.head_commit));
    assert_eq!(std::fs::read_to_string(f.repo.join("b.txt")).unwrap(), "bravo\nchanged by task-b\n");
    assert_eq!(std::fs::read_to_string(f.repo.join("a.txt")).unwrap(), "alpha\nchanged by task-a\n");
    assert_eq!(git(&f.repo, &["status", "--porcelain"]), "");
    // Merging again changes nothing.
    assert_eq!(wts.merge(&wa).await.unwrap().kind, MergeKind::UpToDate);

    // Discard: worktrees and branches gone, twice is fine.
    for wt in [&wa, &wb] {
        wts.discard(wt).await.unwrap();
        wts.discard(wt).await.unwrap();
        assert!(!wt.path.exists());
    }
    assert_eq!(git(&f.repo, &["branch", "--list", "descartes/*"]), "");
    assert!(!git(&f.repo, &["worktree", "list"]).contains("task-"));
}

#[tokio::test]
async fn conflict_is_refused_and_nothing_changes() {
    let f = fixture();
    let wts = f.worktrees().await;
    let wt = wts.create("conflicting", None).await.unwrap();
    agent(&wt, "printf 'one\\nTWO from the task\\nthree\\n' > shared.txt").await;
    collect_evidence(&wt, &quick()).await.unwrap();
    // Meanwhile the user changes the same line on main.
    std::fs::write(f.repo.join("shared.txt"), "one\ntwo from the user\nthree\n").unwrap();
    git(&f.repo, &["commit", "-q", "-am", "user edit"]);
    let main_before = git(&f.repo, &["rev-parse", "main"]);
    let before = snapshot(&f.repo);

    let err = wts.merge(&wt).await.unwrap_err();
    match &err {
        Error::Merge(MergeError::Conflict { files, base_branch, task_branch }) => {
            assert_eq!(files, &["shared.txt"]);
            assert_eq!(base_branch, "main");
            assert_eq!(task_branch, "descartes/conflicting");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("conflicts in shared.txt") && message.contains("by hand"), "{message}");
    assert!(!err.is_retryable());
    assert_eq!(git(&f.repo, &["rev-parse", "main"]), main_before);
    assert_eq!(snapshot(&f.repo), before);
    assert_eq!(git(&f.repo, &["status", "--porcelain", "--untracked-files=all"]), "");
    assert!(!f.repo.join(".git/MERGE_HEAD").exists());
}

#[tokio::test]
async fn dirty_checkout_is_refused() {
    let f = fixture();
    let wts = f.worktrees().await;
    let wt = wts.create("tidy", None).await.unwrap();
    agent(&wt, "echo task >> a.txt").await;
    collect_evidence(&wt, &quick()).await.unwrap();
    // The user has an uncommitted change (to another file) and an untracked file.
    std::fs::write(f.repo.join("b.txt"), "user's work in progress\n").unwrap();
    std::fs::write(f.repo.join("notes.txt"), "untracked\n").unwrap();
    let main_before = git(&f.repo, &["rev-parse", "main"]);

    let err = wts.merge(&wt).await.unwrap_err();
    let Error::Merge(MergeError::DirtyCheckout { files, path, .. }) = &err else { panic!("{err:?}") };
    assert_eq!(files, &["b.txt"]);
    assert_eq!(path, &f.repo);
    assert!(err.to_string().contains("commit or stash"), "{err}");
    assert_eq!(git(&f.repo, &["rev-parse", "main"]), main_before);
    assert_eq!(std::fs::read_to_string(f.repo.join("b.txt")).unwrap(), "user's work in progress\n");
    assert_eq!(std::fs::read_to_string(f.repo.join("a.txt")).unwrap(), "alpha\n");

    // Once the change is committed, the merge goes through (the untracked file is not in the way).
    git(&f.repo, &["commit", "-q", "-am", "wip"]);
    let out = wts.merge(&wt).await.unwrap();
    assert_eq!(out.kind, MergeKind::MergeCommit);
    assert_eq!(std::fs::read_to_string(f.repo.join("a.txt")).unwrap(), "alpha\ntask\n");
    assert_eq!(std::fs::read_to_string(f.repo.join("notes.txt")).unwrap(), "untracked\n");
    assert_eq!(git(&f.repo, &["status", "--porcelain"]), "?? notes.txt");
}

#[tokio::test]
async fn untracked_file_in_the_way_is_refused() {
    let f = fixture();
    let wts = f.worktrees().await;
    let wt = wts.create("adds-file", None).await.unwrap();
    agent(&wt, "echo from the task > new.txt").await;
    collect_evidence(&wt, &quick()).await.unwrap();
    std::fs::write(f.repo.join("new.txt"), "the user's own\n").unwrap();
    let main_before = git(&f.repo, &["rev-parse", "main"]);
    let err = wts.merge(&wt).await.unwrap_err();
    assert!(matches!(err, Error::Merge(MergeError::CheckoutRefused { .. })), "{err:?}");
    assert_eq!(git(&f.repo, &["rev-parse", "main"]), main_before);
    assert_eq!(std::fs::read_to_string(f.repo.join("new.txt")).unwrap(), "the user's own\n");
}

#[tokio::test]
async fn merge_into_a_branch_that_is_not_checked_out() {
    let f = fixture();
    git(&f.repo, &["switch", "-q", "-c", "dev"]);
    let wts = f.worktrees().await;
    let wt = wts.create("on-main", Some("main")).await.unwrap();
    assert_eq!(wt.base_branch.as_deref(), Some("main"));
    agent(&wt, "echo x >> a.txt").await;
    collect_evidence(&wt, &quick()).await.unwrap();
    let before = snapshot(&f.repo);
    let out = wts.merge(&wt).await.unwrap();
    assert_eq!(out.kind, MergeKind::FastForward);
    assert_eq!(out.checkout_updated, None);
    assert_eq!(git(&f.repo, &["rev-parse", "main"]), out.commit);
    assert_eq!(git(&f.repo, &["branch", "--show-current"]), "dev");
    assert_eq!(snapshot(&f.repo), before);

    // A task based on a commit id has no base branch to merge into.
    let head = git(&f.repo, &["rev-parse", "HEAD"]);
    let detached = wts.create("detached", Some(&head)).await.unwrap();
    assert_eq!(detached.base_branch, None);
    let err = wts.merge(&detached).await.unwrap_err();
    assert!(matches!(err, Error::Merge(MergeError::NoBaseBranch { .. })), "{err:?}");
    let err = wts.create("nope", Some("no-such-branch")).await.unwrap_err();
    assert!(matches!(err, Error::UnknownBase { .. }), "{err:?}");
}

#[tokio::test]
async fn changes_outside_the_lock_paths_are_flagged() {
    let f = fixture();
    let wts = f.worktrees().await;
    let wt = wts.create("locked", None).await.unwrap();
    agent(&wt, "echo '// more' >> src/lib.rs && mkdir -p src/deep && echo x > src/deep/new.rs && echo y >> docs/guide.md && git rm -q b.txt && git mv a.txt src/a.txt").await;
    let opts = EvidenceOptions { lock_globs: vec!["src/**".into()], ..quick() };
    let ev = collect_evidence(&wt, &opts).await.unwrap();
    let mut outside = ev.outside_locks.clone();
    outside.sort();
    assert_eq!(outside, ["a.txt", "b.txt", "docs/guide.md"]);
    let renamed = ev.changed_files.iter().find(|c| c.status == FileStatus::Renamed).unwrap();
    assert_eq!((renamed.path.as_str(), renamed.old_path.as_deref()), ("src/a.txt", Some("a.txt")));
    assert!(ev.changed_files.iter().any(|c| c.path == "b.txt" && c.status == FileStatus::Deleted));
    assert!(ev.changed_files.iter().any(|c| c.path == "src/deep/new.rs" && c.status == FileStatus::Added));
    // No lock globs: nothing flagged.
    let ev = collect_evidence(&wt, &quick()).await.unwrap();
    assert!(ev.outside_locks.is_empty());
    assert_eq!(ev.auto_commit, None, "nothing new to commit");
    let bad = EvidenceOptions { lock_globs: vec!["src/[".into()], ..quick() };
    assert!(matches!(collect_evidence(&wt, &bad).await, Err(Error::InvalidGlob { .. })));
}

#[tokio::test]
async fn test_command_results() {
    let f = fixture();
    let wts = f.worktrees().await;
    let wt = wts.create("tested", None).await.unwrap();
    agent(&wt, "echo change >> a.txt").await;
    let with = |cmd: &str| EvidenceOptions { test_command: Some(cmd.into()), ..quick() };

    // Passing; what the test builds is not committed.
    let ev = collect_evidence(&wt, &with("echo to-stdout; echo to-stderr >&2; echo built > build.out; exit 0"))
        .await
        .unwrap();
    let t = ev.test.as_ref().unwrap();
    assert_eq!(t.exit_code, Some(0));
    assert!(t.passed() && !t.timed_out);
    assert_eq!(t.output, "to-stdout\nto-stderr\n");
    assert_eq!(t.output_bytes, 20);
    assert_eq!(ev.changed_files.len(), 1);

    // Failing: the exit code and the output are evidence, not an error.
    let ev = collect_evidence(&wt, &with("echo 'assertion failed: 1 == 2'; exit 3")).await.unwrap();
    let t = ev.test.unwrap();
    assert_eq!(t.exit_code, Some(3));
    assert!(!t.passed());
    assert_eq!(t.output, "assertion failed: 1 == 2\n");
    assert_eq!(ev.changed_files.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(), ["a.txt", "build.out"]);

    // Clipped to head and tail.
    let opts = EvidenceOptions { max_output_bytes: 1000, ..with("seq 1 20000") };
    let t = collect_evidence(&wt, &opts).await.unwrap().test.unwrap();
    assert_eq!(t.output_bytes, 108894);
    assert!(t.output.starts_with("1\n2\n3\n"), "{}", &t.output[..20]);
    assert!(t.output.ends_with("19999\n20000\n"));
    assert!(t.output.contains("bytes omitted ..."));
    assert!(t.output.len() < 1100);

    // Timed out: the whole process group is killed.
    let opts = EvidenceOptions { test_timeout: Duration::from_millis(300), ..with("echo start; sleep 30; echo never") };
    let t = collect_evidence(&wt, &opts).await.unwrap().test.unwrap();
    assert!(t.timed_out && t.exit_code.is_none() && !t.passed());
    assert_eq!(t.output, "start\n");
    assert!(t.duration_ms < 5000, "{}", t.duration_ms);

    // A background process left by the test does not hold evidence collection up.
    let started = std::time::Instant::now();
    let t = collect_evidence(&wt, &with("sleep 30 & echo done")).await.unwrap().test.unwrap();
    assert_eq!((t.exit_code, t.output.as_str()), (Some(0), "done\n"));
    assert!(started.elapsed() < Duration::from_secs(10));

    // Stored as a blob.
    let store = f.store();
    let ev = collect_evidence(&wt, &with("echo stored; exit 1")).await.unwrap();
    let r = store.put_evidence(&ev).unwrap();
    let tr = r.test.as_ref().unwrap();
    assert_eq!(tr.exit_code, Some(1));
    assert_eq!(store.get(&tr.output).unwrap(), b"stored\n");
}

#[test]
fn content_store_dedupes_and_detects_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EvidenceStore::new(tmp.path().join("evidence"));
    let h1 = store.put(b"diff --git a/x b/x\n").unwrap();
    let h2 = store.put(b"diff --git a/x b/x\n").unwrap();
    assert_eq!(h1, h2);
    let h3 = store.put(b"other").unwrap();
    assert_ne!(h1, h3);
    let path = store.path_of(&h1);
    assert_eq!(path, tmp.path().join("evidence").join(&h1.as_str()[..2]).join(&h1.as_str()[2..]));
    let files: Vec<_> = walk(store.dir());
    assert_eq!(files.len(), 2, "deduplicated, no temporary files left: {files:?}");
    assert_eq!(store.get(&h1).unwrap(), b"diff --git a/x b/x\n");

    // Corruption (same length and different length) is detected on read, naming the file.
    std::fs::write(&path, b"diff --git a/y b/y\n").unwrap();
    let err = store.get(&h1).unwrap_err();
    assert!(matches!(&err, Error::Corrupt { path: p, .. } if p == &path), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()));
    std::fs::write(&path, b"short").unwrap();
    assert!(matches!(store.get(&h1), Err(Error::Corrupt { .. })));
    // Putting the content again repairs it.
    assert_eq!(store.put(b"diff --git a/x b/x\n").unwrap(), h1);
    assert_eq!(store.get(&h1).unwrap(), b"diff --git a/x b/x\n");

    let missing = ContentHash::of(b"never stored");
    assert!(matches!(store.get(&missing), Err(Error::BlobNotFound { .. })));
    assert!(!store.contains(&missing) && store.contains(&h3));
    assert!("../../etc/passwd".parse::<ContentHash>().is_err());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

#[tokio::test]
async fn task_ids_with_odd_characters() {
    let f = fixture();
    let wts = f.worktrees().await;
    let root = std::fs::canonicalize(&f.root).ok();
    for id in ["feature/login fix", "../../escape", "naïve:id?*", "x.lock", ".hidden", "a..b", "-rf", "@{u}~^"] {
        let wt = wts.create(id, None).await.unwrap();
        let root = root.clone().unwrap_or_else(|| std::fs::canonicalize(&f.root).unwrap());
        assert_eq!(wt.path.parent(), Some(root.as_path()), "{id:?} -> {}", wt.path.display());
        assert!(wt.branch.starts_with("descartes/"));
        assert_eq!(wt.task_id, id);
        let out =
            Command::new("git").args(["check-ref-format", &format!("refs/heads/{}", wt.branch)]).status().unwrap();
        assert!(out.success(), "{}", wt.branch);
        agent(&wt, "echo odd >> a.txt").await;
        let ev = collect_evidence(&wt, &quick()).await.unwrap();
        assert_eq!(ev.changed_files.len(), 1);
        assert!(git(&f.repo, &["log", "-1", "--format=%s", &wt.branch]).ends_with(id));
        wts.discard(&wt).await.unwrap();
        assert!(!wt.path.exists());
    }
    assert_eq!(git(&f.repo, &["branch", "--list", "descartes/*"]), "");
    assert!(matches!(wts.create("", None).await, Err(Error::InvalidTaskId { .. })));
}

#[tokio::test]
async fn retry_reuses_the_branch_and_keeps_earlier_commits() {
    let f = fixture();
    let wts = f.worktrees().await;
    let first = wts.create("flaky", None).await.unwrap();
    let base = first.base_commit.clone();
    agent(&first, "echo attempt-1 > one.txt").await;
    let ev1 = collect_evidence(&first, &quick()).await.unwrap();
    // The user moves on meanwhile.
    std::fs::write(f.repo.join("b.txt"), "user\n").unwrap();
    git(&f.repo, &["commit", "-q", "-am", "user moves on"]);

    // Retry with the worktree in place: the same worktree, the same base, leftovers kept.
    agent(&first, "echo uncommitted > crash-leftover.txt").await;
    let again = wts.create("flaky", None).await.unwrap();
    assert_eq!(again, first);
    assert!(again.path.join("crash-leftover.txt").exists());

    // The worktree directory was lost: made again from the branch, commits kept, base kept.
    std::fs::remove_dir_all(&first.path).unwrap();
    let second = wts.create("flaky", None).await.unwrap();
    assert_eq!(second.path, first.path);
    assert_eq!(second.base_commit, base);
    assert_eq!(std::fs::read_to_string(second.path.join("one.txt")).unwrap(), "attempt-1\n");
    assert_eq!(git(&second.path, &["rev-parse", "HEAD"]), ev1.head_commit);
    agent(&second, "echo attempt-2 > two.txt").await;
    let ev2 = collect_evidence(&second, &quick()).await.unwrap();
    let paths: Vec<_> = ev2.changed_files.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(paths, ["one.txt", "two.txt"], "both attempts' work, not the user's b.txt");
    assert_eq!(git(&f.repo, &["rev-list", "--count", &format!("{base}..descartes/flaky")]), "2");

    // Worktree removed by git and the record lost: the base is the merge base with HEAD.
    git(&f.repo, &["worktree", "remove", "--force", second.path.to_str().unwrap()]);
    std::fs::remove_dir_all(f.root.join(".meta")).unwrap();
    let third = wts.create("flaky", None).await.unwrap();
    assert_eq!(third.base_commit, base);
    assert_eq!(third.base_branch.as_deref(), Some("main"));
    assert!(third.path.join("two.txt").exists());

    // The user's checkout was never touched.
    assert_eq!(git(&f.repo, &["status", "--porcelain", "--untracked-files=all"]), "");
}

#[tokio::test]
async fn refusals_and_discovery() {
    let f = fixture();
    let wts = f.worktrees().await;

    // Not a repository, inside .git: none.
    let plain = tempfile::tempdir().unwrap();
    assert_eq!(Repo::discover(plain.path()).await.unwrap(), None);
    assert_eq!(Repo::discover(&f.repo.join(".git")).await.unwrap(), None);
    // A subdirectory finds the top level.
    let sub = Repo::discover(&f.repo.join("src")).await.unwrap().unwrap();
    assert_eq!(sub.toplevel, f.repo);
    assert_eq!(sub.common_dir, f.repo.join(".git"));

    // A repository without commits.
    let empty = tempfile::tempdir().unwrap();
    git(empty.path(), &["init", "-q", "-b", "trunk"]);
    let repo = Repo::discover(empty.path()).await.unwrap().unwrap();
    assert_eq!((repo.branch.as_deref(), repo.head_commit.as_deref()), (Some("trunk"), None));
    let err = Worktrees::new(repo, empty.path().join("wt-root")).create("t", None).await.unwrap_err();
    assert!(matches!(err, Error::NoCommit { .. }), "{err:?}");

    // Something else where the worktree would go.
    let root = f.root.clone();
    std::fs::create_dir_all(root.join("occupied")).unwrap();
    std::fs::write(root.join("occupied/keep.txt"), "not ours").unwrap();
    let err = wts.create("occupied", None).await.unwrap_err();
    assert!(matches!(err, Error::PathInUse { .. }), "{err:?}");
    assert!(root.join("occupied/keep.txt").exists());

    // The agent switched branches in its worktree.
    let wt = wts.create("wanderer", None).await.unwrap();
    git(&wt.path, &["switch", "-q", "-c", "elsewhere"]);
    let err = collect_evidence(&wt, &quick()).await.unwrap_err();
    assert!(matches!(&err, Error::NotOnTaskBranch { found: Some(b), .. } if b == "elsewhere"), "{err:?}");
    assert!(err.to_string().contains("git checkout descartes/wanderer"), "{err}");

    // A failing git command names the command and its stderr.
    let ghost = Worktree { path: f.repo.join("nowhere"), ..wt.clone() };
    assert!(matches!(collect_evidence(&ghost, &quick()).await, Err(Error::WorktreeMissing { .. })));
    let broken = Worktree { base_commit: "0000000000000000000000000000000000000bad".into(), ..wt.clone() };
    git(&wt.path, &["switch", "-q", "descartes/wanderer"]);
    let err = collect_evidence(&broken, &quick()).await.unwrap_err();
    let Error::Git { command, stderr, .. } = &err else { panic!("{err:?}") };
    assert!(command.starts_with("git -C ") && command.contains(" diff "), "{command}");
    assert!(!stderr.is_empty());

    // Discarding a task whose branch the user checked out is refused, not forced.
    let other = wts.create("users-now", None).await.unwrap();
    git(&other.path, &["switch", "-q", "--detach"]);
    git(&f.repo, &["switch", "-q", "descartes/users-now"]);
    let err = wts.discard(&other).await.unwrap_err();
    assert!(matches!(&err, Error::BranchCheckedOut { path, .. } if path == &f.repo), "{err:?}");
    assert!(err.to_string().contains("switch that checkout to another branch"), "{err}");
    assert!(f.repo.join("a.txt").exists());
    assert_eq!(git(&f.repo, &["branch", "--show-current"]), "descartes/users-now");
}
