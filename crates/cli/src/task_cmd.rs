//! `descartes task ...`: the control plane from the command line.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use descartes_core::task::waiting_reason;
use descartes_core::{Clock, EventStore, SystemClock, TaskError, TaskFilter, TaskStore};
use descartes_protocol::{NewTask, Task, TaskStatus};
use descartes_runtime::Runtime;
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

/// Exit code of a task error.
pub fn exit_code(e: &TaskError) -> u8 {
    match e {
        TaskError::NotFound(_) => 5,
        TaskError::StaleToken { .. } | TaskError::LeaseExpired { .. } => 6,
        TaskError::Store(_) => 4,
        _ => 2,
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

/// Resolves a full id or a unique prefix of one.
/// A task, its dependencies and, when it waits, why.
async fn shown(tasks: &dyn TaskStore, id: &str) -> Result<(Task, Vec<Task>, Option<String>)> {
    let t = tasks.get_task(&resolve(tasks, id).await?).await?;
    let mut deps = Vec::new();
    for d in &t.depends_on {
        deps.push(tasks.get_task(d).await?);
    }
    let leased: Vec<Task> =
        tasks.list_tasks(&TaskFilter::default()).await?.into_iter().filter(|x| x.status.is_leased()).collect();
    let waiting = waiting_reason(&t, &deps, &leased, SystemClock.now());
    Ok((t, deps, waiting))
}

/// `task show --json`: the task, with `waiting` when it waits.
fn task_json(t: &Task, waiting: Option<&str>) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(t)?;
    if let (Some(obj), Some(w)) = (v.as_object_mut(), waiting) {
        obj.insert("waiting".into(), serde_json::Value::String(w.to_owned()));
    }
    Ok(v)
}

pub(crate) async fn resolve(store: &dyn TaskStore, id: &str) -> Result<String, TaskError> {
    match store.get_task(id).await {
        Ok(t) => Ok(t.id),
        Err(TaskError::NotFound(_)) => {
            let all = store.list_tasks(&TaskFilter::default()).await?;
            let found: Vec<&Task> = all.iter().filter(|t| t.id.starts_with(id)).collect();
            match found.as_slice() {
                [one] => Ok(one.id.clone()),
                [] => Err(TaskError::NotFound(id.to_owned())),
                many => {
                    let shown = many.iter().take(5).map(|t| t.id.as_str()).collect::<Vec<_>>().join(", ");
                    let more = if many.len() > 5 { format!(" and {} more", many.len() - 5) } else { String::new() };
                    Err(TaskError::Invalid(format!(
                        "`{id}` matches {} tasks ({shown}{more}); give more of the id",
                        many.len()
                    )))
                }
            }
        }
        Err(e) => Err(e),
    }
}

pub async fn run(rt: Runtime, command: TaskCommand) -> Result<u8> {
    let stores = rt.open_stores().await?;
    let (tasks, store) = (stores.tasks.clone(), stores.events.clone());
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
        TaskCommand::Show { ref id, json: true, evidence: true } => {
            // The task's JSON with its evidence: the same fields as the human output, plus the
            // content-addressed references.
            match shown(&*tasks, id).await {
                Ok((t, _, waiting)) => {
                    let mut v = task_json(&t, waiting.as_deref())?;
                    let evidence = crate::task_exec_cmd::evidence_json(&rt, &stores, &t.id).await?;
                    if let Some(obj) = v.as_object_mut() {
                        obj.insert("evidence".into(), evidence);
                    }
                    print_json(&v).map(|()| 0)
                }
                Err(e) => Err(e),
            }
        }
        TaskCommand::Show { ref id, json, evidence } if !json => {
            let id = resolve(&*tasks, id).await;
            match id {
                Ok(id) => {
                    let code = dispatch(&*tasks, &*store, TaskCommand::Show { id: id.clone(), json, evidence }).await;
                    match code {
                        Ok(0) => crate::task_exec_cmd::show_extra(&rt, &stores, &id, evidence).await,
                        other => other,
                    }
                }
                Err(e) => Err(e.into()),
            }
        }
        command => dispatch(&*tasks, &*store, command).await,
    };
    match result {
        Ok(code) => {
            if wakes {
                descartes_runtime::daemon::poke(&rt.places.state_dir);
            }
            Ok(code)
        }
        Err(e) => match e.downcast::<TaskError>() {
            Ok(te) => {
                eprintln!("descartes: error: {te}");
                Ok(exit_code(&te))
            }
            Err(other) => Err(other),
        },
    }
}

async fn dispatch(tasks: &dyn TaskStore, events: &dyn EventStore, command: TaskCommand) -> Result<u8> {
    match command {
        TaskCommand::Create(a) => {
            let mut depends_on = Vec::new();
            for d in &a.depends_on {
                depends_on.push(match resolve(tasks, d).await {
                    Err(TaskError::NotFound(_)) => return Err(TaskError::MissingDependency(d.clone()).into()),
                    other => other?,
                });
            }
            let t = tasks
                .create_task(NewTask {
                    id: a.id,
                    title: a.title,
                    prompt: a.prompt,
                    kind: a.kind,
                    priority: a.priority,
                    labels: a.labels,
                    depends_on,
                    locks: a.locks,
                    max_attempts: a.max_attempts,
                    needs: descartes_protocol::Requirements {
                        labels: a.needs_labels,
                        capabilities: a.needs_capabilities,
                        agent: a.agent,
                    },
                    test_command: a.test_command,
                })
                .await?;
            if a.json { print_json(&t)? } else { println!("{}", t.id) }
        }
        TaskCommand::List { status, label, json } => {
            let list = tasks.list_tasks(&TaskFilter { status, label }).await?;
            if json {
                print_json(&list)?;
            } else if list.is_empty() {
                eprintln!("no tasks; create one with `descartes task create TITLE`");
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{:<26}  {:<9}  {:>4}  TITLE", "ID", "STATUS", "PRIO")?;
                for t in &list {
                    writeln!(out, "{}", line(t))?;
                }
            }
        }
        TaskCommand::Show { id, json, .. } => {
            let (t, deps, waiting) = shown(tasks, &id).await?;
            if json {
                print_json(&task_json(&t, waiting.as_deref())?)?;
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "id:        {}", t.id)?;
                writeln!(out, "title:     {}", t.title)?;
                writeln!(out, "status:    {}", t.status)?;
                if let Some(w) = &waiting {
                    writeln!(out, "waiting:   {w}")?;
                }
                if !t.kind.is_empty() {
                    writeln!(out, "type:      {}", t.kind)?;
                }
                writeln!(out, "priority:  {}", t.priority)?;
                if !t.labels.is_empty() {
                    writeln!(out, "labels:    {}", t.labels.join(", "))?;
                }
                for d in &deps {
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
            }
        }
        TaskCommand::Claim { worker, ttl, max, json } => {
            let claims = tasks.claim(&worker, ttl, max.max(1)).await?;
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
            tasks.start(&resolve(tasks, &l.id).await?, l.token).await?;
        }
        TaskCommand::Heartbeat { lease, ttl } => {
            let t = tasks.heartbeat(&resolve(tasks, &lease.id).await?, lease.token, ttl).await?;
            if let Some(exp) = t.lease_expires_at {
                println!("lease until {exp}");
            }
        }
        TaskCommand::Complete { lease, result } => {
            tasks.complete(&resolve(tasks, &lease.id).await?, lease.token, result).await?;
        }
        TaskCommand::Fail { lease, reason } => {
            let t = tasks.fail(&resolve(tasks, &lease.id).await?, lease.token, &reason).await?;
            println!("{}", t.status);
        }
        TaskCommand::Release(l) => {
            tasks.release(&resolve(tasks, &l.id).await?, l.token).await?;
        }
        TaskCommand::Cancel { id } => {
            tasks.cancel(&resolve(tasks, &id).await?).await?;
        }
        TaskCommand::Retry { id } => {
            tasks.retry(&resolve(tasks, &id).await?).await?;
        }
        TaskCommand::Depend { id, dependency } => {
            let dep = resolve(tasks, &dependency).await.map_err(|e| match e {
                TaskError::NotFound(d) => TaskError::MissingDependency(d),
                other => other,
            })?;
            tasks.add_dependency(&resolve(tasks, &id).await?, &dep).await?;
        }
        TaskCommand::Watch { all, json } => watch(events, all, json).await?,
        TaskCommand::Graph { dot } => graph(tasks, dot).await?,
        // Handled by `task_exec_cmd` (they need the runtime).
        TaskCommand::Execute { .. }
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
