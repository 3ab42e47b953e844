//! `descartes task ...`: the control plane from the command line. What the commands do is
//! `descartes_app::tasks`'; the printing takes data (`print_*`), so the same commands through a
//! server (`client.rs`) print the same.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use descartes_app::error::task_problem;
use descartes_app::tasks::{self, TaskShown, resolve};
use descartes_core::{EventStore, TaskError, TaskFilter, TaskStore};
use descartes_protocol::{Task, TaskStatus};
use descartes_runtime::Runtime;
use descartes_server::{CreateTask, Needs};
use descartes_worktree::{EvidenceRef, Worktree};
use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::output::clip_line;

#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// Create a task; prints its id.
    Create(CreateArgs),
    /// List tasks, oldest first.
    List {
        /// Only tasks with this status (queued, claimed, running, blocked, done, failed, cancelled).
        #[arg(long, value_parser = parse_status)]
        status: Option<TaskStatus>,
        /// Only tasks with this label.
        #[arg(long)]
        label: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one task, and why it waits if it does.
    Show {
        /// The task id (or a unique prefix of it).
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also the evidence of its last attempt (changed files, tests, cost).
        #[arg(long)]
        evidence: bool,
    },
    /// Run one task now on the agent the router picks (in its own git worktree). Exit 7 when
    /// the task cannot be claimed now, 1 when the attempt failed, 130 when interrupted.
    Execute {
        /// The task id (or a unique prefix of it).
        id: String,
        /// Lease duration while it runs (renewed by heartbeats).
        #[arg(long, default_value = "30s", value_parser = parse_ttl, allow_hyphen_values = true)]
        ttl: Duration,
    },
    /// Print the diff of the task's last attempt against its base commit.
    Diff {
        /// The task id (or a unique prefix of it).
        id: String,
    },
    /// Merge the task's branch into its base branch (fast-forward or a merge commit). Exit 9
    /// when git cannot merge it (a conflict), 10 when the policy refuses or an approval it
    /// requires is missing (`task approve ID --stage merge`).
    Merge {
        /// The task id (or a unique prefix of it).
        id: String,
    },
    /// Remove the task's worktree and branch.
    Discard {
        /// The task id (or a unique prefix of it).
        id: String,
    },
    /// Approve what the project policy requires approval for: running the task (`claim`) or
    /// merging it (`merge`).
    Approve {
        /// The task id (or a unique prefix of it).
        id: String,
        /// What is approved: running the task (`claim`) or merging it (`merge`).
        #[arg(long, default_value = "claim", value_parser = ["claim", "merge"])]
        stage: String,
    },
    /// Claim the highest-priority ready task(s); prints `ID TOKEN` per task.
    Claim {
        /// The name the lease is held under (e.g. a host and process).
        #[arg(long)]
        worker: String,
        /// Lease duration (e.g. 30s, 2m).
        #[arg(long, default_value = "30s", value_parser = parse_ttl, allow_hyphen_values = true)]
        ttl: Duration,
        /// Claim up to this many tasks at once.
        #[arg(long, default_value_t = 1)]
        max: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Mark a claimed task as started.
    Start(TokenArgs),
    /// Extend a lease.
    Heartbeat {
        #[command(flatten)]
        lease: TokenArgs,
        /// The lease's new duration from now (e.g. 30s, 2m).
        #[arg(long, default_value = "30s", value_parser = parse_ttl, allow_hyphen_values = true)]
        ttl: Duration,
    },
    /// Finish a task successfully.
    Complete {
        #[command(flatten)]
        lease: TokenArgs,
        /// The task's result (shown by `task show`).
        #[arg(long)]
        result: Option<String>,
    },
    /// Report a failed attempt (the task is retried with backoff while attempts remain).
    Fail {
        #[command(flatten)]
        lease: TokenArgs,
        /// Why the attempt failed (shown by `task show`).
        #[arg(long, default_value = "failed")]
        reason: String,
    },
    /// Give a claimed task back without charging an attempt.
    Release(TokenArgs),
    /// Cancel a task (its dependents become blocked).
    Cancel {
        /// The task id (or a unique prefix of it).
        id: String,
    },
    /// Queue a failed, cancelled or blocked task again (unblocks its dependents).
    Retry {
        /// The task id (or a unique prefix of it).
        id: String,
    },
    /// Make a task depend on another one (cycles are refused).
    Depend {
        /// The task id (or a unique prefix of it).
        id: String,
        /// The task it must wait for.
        #[arg(long = "on", value_name = "ID")]
        dependency: String,
    },
    /// Print task changes as they happen.
    Watch {
        /// Print the whole history first.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The dependency graph, as text or as Graphviz DOT.
    Graph {
        /// Print Graphviz DOT (`descartes task graph --dot | dot -Tsvg > tasks.svg`) instead of an
        /// indented tree.
        #[arg(long)]
        dot: bool,
    },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// A short title.
    pub title: String,
    /// What to do: the agent's prompt (`DESCARTES_TASK_PROMPT` for a command).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// A type of your own (e.g. bug, feature); policies can match it.
    #[arg(long = "type", value_name = "TYPE", default_value = "")]
    pub kind: String,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// A label (repeatable).
    #[arg(long = "label", value_name = "LABEL")]
    pub labels: Vec<String>,
    /// A task that must be done first (repeatable).
    #[arg(long = "depends-on", value_name = "ID")]
    pub depends_on: Vec<String>,
    /// Path glob this task locks while it runs (repeatable).
    #[arg(long = "lock", value_name = "GLOB")]
    pub locks: Vec<String>,
    /// Attempts before the task fails for good [default: 3].
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Route only to an agent with this label (repeatable).
    #[arg(long = "needs-label", value_name = "LABEL")]
    pub needs_labels: Vec<String>,
    /// Route only to an agent with this capability (repeatable).
    #[arg(long = "needs-capability", value_name = "CAPABILITY")]
    pub needs_capabilities: Vec<String>,
    /// Route only to this registered agent.
    #[arg(long)]
    pub agent: Option<String>,
    /// A command run in the task's worktree after an agent's attempt (e.g. `cargo test`); a
    /// failure fails the attempt, and its output is evidence.
    #[arg(long)]
    pub test_command: Option<String>,
    /// Choose the id (letters, digits, - and _).
    #[arg(long)]
    pub id: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// The task id (or a unique prefix of it).
    pub id: String,
    /// The fencing token of the claim.
    #[arg(long, allow_negative_numbers = true)]
    pub token: i64,
}

fn parse_status(s: &str) -> Result<TaskStatus, String> {
    TaskStatus::parse(s)
        .ok_or_else(|| format!("unknown status {s:?}; one of: {}", TaskStatus::ALL.map(|t| t.as_str()).join(", ")))
}

/// A positive duration such as `30s`, `2m`, `1h30m`.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("{s:?} is negative; a duration must be positive (e.g. 30s)"));
    }
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration ({e}); e.g. 30s, 2m"))?;
    if d.is_zero() {
        return Err("a duration must be positive (e.g. 30s)".into());
    }
    Ok(d)
}

impl CreateArgs {
    /// The request that creates the task (the API's, which the local command makes too);
    /// dependencies still by prefix.
    pub(crate) fn request(self) -> CreateTask {
        CreateTask {
            title: self.title,
            prompt: self.prompt,
            kind: self.kind,
            priority: self.priority,
            labels: self.labels,
            depends_on: self.depends_on,
            locks: self.locks,
            max_attempts: self.max_attempts,
            needs: Needs { labels: self.needs_labels, capabilities: self.needs_capabilities },
            agent: self.agent,
            test_command: self.test_command,
            id: self.id,
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn line(t: &Task) -> String {
    let mut extra = String::new();
    if let Some(w) = &t.claimed_by {
        extra.push_str(&format!(" by {w}"));
    }
    if !t.depends_on.is_empty() {
        extra.push_str(&format!(" after {}", t.depends_on.join(",")));
    }
    format!("{:<26}  {:<9}  {:>4}  {}{}", t.id, t.status, t.priority, clip_line(&t.title, 60), extra)
}

/// `task create`: the new task's id, or the task as JSON.
pub(crate) fn print_created(t: &Task, json: bool) -> Result<u8> {
    if json {
        print_json(t)?;
    } else {
        println!("{}", t.id);
    }
    Ok(0)
}

/// `task list`: the tasks, oldest first.
pub(crate) fn print_tasks(list: &[Task], json: bool) -> Result<u8> {
    if json {
        print_json(&list)?;
    } else if list.is_empty() {
        eprintln!("no tasks; create one with `descartes task create TITLE`");
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{:<26}  {:<9}  {:>4}  TITLE", "ID", "STATUS", "PRIO")?;
        for t in list {
            writeln!(out, "{}", line(t))?;
        }
    }
    Ok(0)
}

/// `task show`: the task, why it waits, its dependencies, why no agent takes it, and with
/// `evidence` (the JSON of `descartes_app::tasks::evidence_json`) its last attempt's evidence.
/// As JSON: the task with `waiting`, and `evidence`.
pub(crate) fn print_shown(shown: &TaskShown, evidence: Option<&Value>, json: bool) -> Result<u8> {
    let t = &shown.task;
    if json {
        let mut v = tasks::task_json(t, shown.waiting.as_deref());
        if let (Some(obj), Some(evidence)) = (v.as_object_mut(), evidence) {
            obj.insert("evidence".into(), evidence.clone());
        }
        print_json(&v)?;
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "id:        {}", t.id)?;
    writeln!(out, "title:     {}", t.title)?;
    writeln!(out, "status:    {}", t.status)?;
    if let Some(w) = &shown.waiting {
        writeln!(out, "waiting:   {w}")?;
    }
    if !t.kind.is_empty() {
        writeln!(out, "type:      {}", t.kind)?;
    }
    writeln!(out, "priority:  {}", t.priority)?;
    if !t.labels.is_empty() {
        writeln!(out, "labels:    {}", t.labels.join(", "))?;
    }
    for d in &shown.dependencies {
        writeln!(out, "depends:   {} ({})", d.id, d.status)?;
    }
    if !t.locks.is_empty() {
        writeln!(out, "locks:     {}", t.locks.join(", "))?;
    }
    writeln!(out, "attempts:  {}/{}", t.attempts, t.max_attempts)?;
    if let (Some(w), Some(exp)) = (&t.claimed_by, t.lease_expires_at) {
        writeln!(out, "lease:     {w}, token {}, until {exp}", t.token.unwrap_or_default())?;
    }
    if let Some(e) = &t.error {
        writeln!(out, "error:     {e}")?;
    }
    if let Some(r) = &t.result {
        writeln!(out, "result:    {r}")?;
    }
    if !t.prompt.is_empty() {
        writeln!(out, "prompt:\n{}", t.prompt)?;
    }
    if let Some(agent) = &t.agent {
        writeln!(out, "agent:     {agent}")?;
    }
    if let Some(why) = &shown.routing {
        writeln!(out, "routing:   {why}")?;
    }
    if let Some(evidence) = evidence {
        print_evidence(&mut out, evidence)?;
    }
    Ok(0)
}

/// The evidence lines of `task show --evidence`, from the evidence's JSON.
fn print_evidence(out: &mut impl Write, ev: &Value) -> Result<()> {
    if let Ok(wt) = Worktree::deserialize(&ev["worktree"]) {
        writeln!(out, "worktree:  {} (branch {}, base {})", wt.path.display(), wt.branch, short(&wt.base_commit))?;
    }
    let (Some(attempt), Some(succeeded), Ok(r)) =
        (ev["attempt"].as_u64(), ev["succeeded"].as_bool(), EvidenceRef::deserialize(&ev["files"]))
    else {
        writeln!(out, "evidence:  none yet")?;
        return Ok(());
    };
    writeln!(out, "evidence:  attempt {attempt} ({})", if succeeded { "succeeded" } else { "failed" })?;
    writeln!(out, "  head:    {} (diff {} bytes, blob {})", short(&r.head_commit), r.diff_bytes, r.diff.as_str())?;
    for f in &r.changed_files {
        let flag = if r.outside_locks.contains(&f.path) { "  [outside the task's locks]" } else { "" };
        writeln!(out, "  {:<8} {}{flag}", format!("{:?}", f.status).to_lowercase(), f.path)?;
    }
    if let Some(t) = &r.test {
        let status = match (t.timed_out, t.exit_code) {
            (true, _) => "timed out".to_owned(),
            (false, Some(c)) => format!("exit {c}"),
            (false, None) => "killed".to_owned(),
        };
        writeln!(
            out,
            "  test:    `{}`: {status} in {} ms (output blob {})",
            t.command,
            t.duration_ms,
            t.output.as_str()
        )?;
    }
    if let Some(run) = ev["run_id"].as_str() {
        writeln!(out, "  run:     {run} (transcript blob {})", ev["transcript"].as_str().unwrap_or("-"))?;
    }
    if let Some(tokens) = ev["tokens"].as_u64() {
        writeln!(out, "  usage:   {tokens} tokens, ${:.4}", ev["cost_usd"].as_f64().unwrap_or(0.0))?;
    }
    if let Some(f) = ev["failure"].as_str() {
        writeln!(out, "  failure: {f}")?;
    }
    if let Some(m) = ev["merged"].as_str() {
        writeln!(out, "merged:    {m}")?;
    }
    Ok(())
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// `task diff`: the diff as it is.
pub(crate) fn print_diff(diff: &[u8]) -> Result<u8> {
    std::io::stdout().lock().write_all(diff)?;
    Ok(0)
}

/// `task merge`: the merge made; `kind` as `descartes_app::tasks::Merged::kind_name`.
pub(crate) fn print_merged(branch: &str, into: &str, kind: &str, commit: &str) -> Result<u8> {
    let how = match kind {
        "up_to_date" => "already merged",
        "fast_forward" => "fast-forward",
        _ => "merge commit",
    };
    println!("merged {branch} into {into} ({how}): {commit}");
    Ok(0)
}

/// `task discard`: the branch and the worktree removed.
pub(crate) fn print_discarded(branch: &str, path: &str) -> Result<u8> {
    println!("discarded {branch} and {path}");
    Ok(0)
}

/// `task approve`: what was approved.
pub(crate) fn print_approved(stage: &str, id: &str) -> Result<u8> {
    println!("approved {stage} of task {id}");
    Ok(0)
}

pub async fn run(rt: Runtime, command: TaskCommand) -> Result<u8> {
    let stores = rt.open_stores().await?;
    let rt = std::sync::Arc::new(rt);
    // New or requeued work: a local daemon's idle workers are woken at once instead of at
    // their next poll.
    let wakes = matches!(command, TaskCommand::Create(_) | TaskCommand::Retry { .. } | TaskCommand::Release(_));
    let result = match command {
        TaskCommand::Execute { .. }
        | TaskCommand::Diff { .. }
        | TaskCommand::Merge { .. }
        | TaskCommand::Discard { .. }
        | TaskCommand::Approve { .. } => crate::task_exec_cmd::run(rt.clone(), stores.clone(), command).await,
        TaskCommand::Show { id, json, evidence } => match tasks::show(&stores, &id).await {
            Ok(shown) => {
                let evidence = match evidence {
                    true => Some(crate::task_exec_cmd::evidence_json(&rt, &stores, &shown.task.id).await?),
                    false => None,
                };
                print_shown(&shown, evidence.as_ref(), json)
            }
            Err(e) => Err(e.into()),
        },
        command => dispatch(&*stores.tasks, &*stores.events, command).await,
    };
    match result {
        Ok(code) => {
            if wakes {
                tasks::wake_daemon(&rt);
            }
            Ok(code)
        }
        // A task store's refusal: its message and its exit code.
        Err(e) => match e.downcast::<TaskError>() {
            Ok(te) => {
                eprintln!("descartes: error: {te}");
                Ok(task_problem(&te).exit_code())
            }
            Err(other) => Err(other),
        },
    }
}

async fn dispatch(store: &dyn TaskStore, events: &dyn EventStore, command: TaskCommand) -> Result<u8> {
    match command {
        TaskCommand::Create(a) => {
            let json = a.json;
            let t = tasks::create(store, a.request().into_new_task()).await?;
            return print_created(&t, json);
        }
        TaskCommand::List { status, label, json } => {
            return print_tasks(&store.list_tasks(&TaskFilter { status, label }).await?, json);
        }
        TaskCommand::Claim { worker, ttl, max, json } => {
            let claims = store.claim(&worker, ttl, max.max(1)).await?;
            if json {
                print_json(&claims)?;
            } else if claims.is_empty() {
                eprintln!("no task is ready");
                return Ok(7);
            } else {
                for c in &claims {
                    println!("{} {}", c.task.id, c.token);
                }
            }
        }
        TaskCommand::Start(l) => {
            store.start(&resolve(store, &l.id).await?, l.token).await?;
        }
        TaskCommand::Heartbeat { lease, ttl } => {
            let t = store.heartbeat(&resolve(store, &lease.id).await?, lease.token, ttl).await?;
            if let Some(exp) = t.lease_expires_at {
                println!("lease until {exp}");
            }
        }
        TaskCommand::Complete { lease, result } => {
            store.complete(&resolve(store, &lease.id).await?, lease.token, result).await?;
        }
        TaskCommand::Fail { lease, reason } => {
            let t = store.fail(&resolve(store, &lease.id).await?, lease.token, &reason).await?;
            println!("{}", t.status);
        }
        TaskCommand::Release(l) => {
            store.release(&resolve(store, &l.id).await?, l.token).await?;
        }
        TaskCommand::Cancel { id } => {
            store.cancel(&resolve(store, &id).await?).await?;
        }
        TaskCommand::Retry { id } => {
            store.retry(&resolve(store, &id).await?).await?;
        }
        TaskCommand::Depend { id, dependency } => {
            let dep = resolve(store, &dependency).await.map_err(|e| match e {
                TaskError::NotFound(d) => TaskError::MissingDependency(d),
                other => other,
            })?;
            store.add_dependency(&resolve(store, &id).await?, &dep).await?;
        }
        TaskCommand::Watch { all, json } => watch(events, all, json).await?,
        TaskCommand::Graph { dot } => graph(store, dot).await?,
        // Handled by `run`.
        TaskCommand::Show { .. }
        | TaskCommand::Execute { .. }
        | TaskCommand::Diff { .. }
        | TaskCommand::Merge { .. }
        | TaskCommand::Discard { .. }
        | TaskCommand::Approve { .. } => {
            return Ok(2);
        }
    }
    Ok(0)
}

async fn watch(events: &dyn EventStore, all: bool, json: bool) -> Result<()> {
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
    }
    let after = if all { 0 } else { events.last_seq().await? };
    let filter = descartes_core::follow::EventFilter { stream: None, kinds: vec!["task_*".into()] };
    let mut follower = descartes_core::follow::Follower::new(events, filter, after);
    loop {
        let batch = follower.next_page(1000).await?;
        {
            let mut out = std::io::stdout().lock();
            for e in &batch {
                if json {
                    writeln!(out, "{}", serde_json::to_string(e)?)?;
                } else {
                    writeln!(
                        out,
                        "{}  {}  {:<20} {}",
                        e.at.to_local("%H:%M:%S%.3f"),
                        e.run_id,
                        e.kind(),
                        crate::output::event_summary(e)
                    )?;
                }
            }
            out.flush()?;
        }
        if batch.len() == 1000 {
            continue;
        }
        tokio::select! {
            _ = events.wait_for_events(follower.cursor(), Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

async fn graph(tasks: &dyn TaskStore, dot: bool) -> Result<()> {
    let all = tasks.list_tasks(&TaskFilter::default()).await?;
    let mut out = std::io::stdout().lock();
    if dot {
        writeln!(out, "digraph tasks {{")?;
        writeln!(out, "  rankdir=LR;")?;
        for t in &all {
            let color = match t.status {
                TaskStatus::Done => "palegreen",
                TaskStatus::Failed | TaskStatus::Cancelled => "lightpink",
                TaskStatus::Blocked => "orange",
                TaskStatus::Claimed | TaskStatus::Running => "lightblue",
                TaskStatus::Queued => "white",
            };
            let label = format!("{}\\n{} ({})", t.title.replace('"', "'"), t.status, t.id);
            writeln!(out, "  \"{}\" [label=\"{label}\", style=filled, fillcolor={color}];", t.id)?;
        }
        for t in &all {
            for d in &t.depends_on {
                writeln!(out, "  \"{d}\" -> \"{}\";", t.id)?;
            }
        }
        writeln!(out, "}}")?;
        return Ok(());
    }
    // Text: each root, then what depends on it, indented.
    let by_id: std::collections::HashMap<&str, &Task> = all.iter().map(|t| (t.id.as_str(), t)).collect();
    let mut children: std::collections::HashMap<&str, Vec<&Task>> = std::collections::HashMap::new();
    for t in &all {
        for d in &t.depends_on {
            children.entry(d.as_str()).or_default().push(t);
        }
    }
    fn walk(
        out: &mut dyn Write,
        t: &Task,
        depth: usize,
        children: &std::collections::HashMap<&str, Vec<&Task>>,
        seen: &mut std::collections::HashSet<String>,
    ) -> std::io::Result<()> {
        let again = !seen.insert(t.id.clone());
        writeln!(
            out,
            "{}{} [{}] {}{}",
            "  ".repeat(depth),
            t.id,
            t.status,
            clip_line(&t.title, 60),
            if again { " (see above)" } else { "" }
        )?;
        if !again {
            for c in children.get(t.id.as_str()).into_iter().flatten() {
                walk(out, c, depth + 1, children, seen)?;
            }
        }
        Ok(())
    }
    let mut seen = std::collections::HashSet::new();
    for t in
        all.iter().filter(|t| t.depends_on.iter().all(|d| !by_id.contains_key(d.as_str())) || t.depends_on.is_empty())
    {
        walk(&mut out, t, 0, &children, &mut seen)?;
    }
    Ok(())
}
