//! `descartes session`: chat sessions (runs marked `session_started`).

use std::io::Write;

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use descartes_app::listings;
use descartes_core::session::{transcript, transcript_markdown};
use descartes_core::state::RunState;
use descartes_core::{EventStore, RunSummary};
use descartes_protocol::{NewEvent, SessionDeleted};
use descartes_runtime::Runtime;

use crate::chat::ChatArgs;

#[derive(Subcommand, Debug)]
pub enum SessionCommand {
    /// List chat sessions, newest first (deleted ones are hidden).
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a session's transcript.
    Show {
        /// The session id (or a unique prefix of it).
        id: String,
    },
    /// Open the chat on a session: the earlier turns are sent to the model.
    Resume {
        /// The session id (or a unique prefix of it).
        id: String,
        #[command(flatten)]
        args: ChatArgs,
    },
    /// Hide a session from `list` and `search`. The log is append-only: this records a
    /// tombstone (`session_deleted`); the session's events stay in the database.
    Delete {
        /// The session id (or a unique prefix of it).
        id: String,
    },
    /// Print a session as JSON or Markdown (every message, including compacted ones).
    Export {
        /// The session id (or a unique prefix of it).
        id: String,
        /// Markdown (`md`) or JSON.
        #[arg(long, value_enum, default_value_t = Format::Md)]
        format: Format,
    },
    /// Find sessions whose messages contain QUERY (case-insensitive) and show the lines.
    Search {
        /// Text to find (case-insensitive).
        query: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Format {
    Json,
    Md,
}

pub async fn run(rt: Runtime, command: SessionCommand) -> Result<u8> {
    let store = rt.open_store().await?;
    match command {
        SessionCommand::List { json } => list(&rt, &*store, json).await,
        SessionCommand::Show { id } => {
            let (summary, _) = session(&rt, &*store, &id).await?;
            let events = store.read_run(&summary.run_id, 0).await?;
            let mut out = std::io::stdout().lock();
            for e in transcript(&events) {
                writeln!(out, "{}: {}", e.role, e.text.trim_end())?;
            }
            Ok(0)
        }
        SessionCommand::Resume { id, args } => {
            let (_, state) = session(&rt, &*store, &id).await?;
            drop(store);
            crate::chat::run(rt, args, Some(state)).await
        }
        SessionCommand::Delete { id } => {
            let (summary, _) = session(&rt, &*store, &id).await?;
            store.append(vec![NewEvent::new(&summary.run_id, SessionDeleted {})]).await?;
            eprintln!("descartes: session {} deleted (hidden; its events stay in the log)", summary.run_id);
            Ok(0)
        }
        SessionCommand::Export { id, format } => {
            let (summary, state) = session(&rt, &*store, &id).await?;
            let events = store.read_run(&summary.run_id, 0).await?;
            let entries = transcript(&events);
            let mut out = std::io::stdout().lock();
            match format {
                Format::Md => write!(out, "{}", transcript_markdown(&summary.prompt, &entries))?,
                Format::Json => {
                    let doc = serde_json::json!({
                        "session": row(&rt, &summary, &state),
                        "system_prompt": state.started.as_ref().and_then(|s| s.system_prompt.clone()),
                        "transcript": entries,
                        "conversation": state.messages(),
                    });
                    writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
                }
            }
            Ok(0)
        }
        SessionCommand::Search { query, json } => search(&rt, &*store, &query, json).await,
    }
}

async fn session(rt: &Runtime, store: &dyn EventStore, id: &str) -> Result<(RunSummary, RunState)> {
    let run_id = rt.resolve_run(store, id).await?;
    let state = store.replay_run(&run_id).await?;
    if state.session.is_none() {
        return Err(descartes_app::fail(
            descartes_app::Problem::NotFound,
            format!("run {run_id} is not a chat session; `descartes logs {run_id}` shows it"),
        ));
    }
    if state.deleted {
        return Err(descartes_app::fail(descartes_app::Problem::NotFound, format!("session {run_id} was deleted")));
    }
    let summary = store
        .list_runs()
        .await?
        .into_iter()
        .find(|r| r.run_id == run_id)
        .ok_or_else(|| descartes_app::fail(descartes_app::Problem::NotFound, format!("no session {run_id}")))?;
    Ok((summary, state))
}

fn row(rt: &Runtime, r: &RunSummary, st: &RunState) -> serde_json::Value {
    listings::session_row(r, st, rt.run_status(r))
}

async fn list(rt: &Runtime, store: &dyn EventStore, json: bool) -> Result<u8> {
    let all = listings::sessions(store).await?;
    if json {
        let items: Vec<_> = all.iter().map(|(r, st)| row(rt, r, st)).collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(0);
    }
    if all.is_empty() {
        eprintln!("no sessions yet; start one with `descartes chat`");
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<26}  {:<19}  {:>5}  {:>9}  TITLE", "ID", "UPDATED", "TURNS", "TOKENS")?;
    for (r, st) in &all {
        writeln!(
            out,
            "{:<26}  {:<19}  {:>5}  {:>9}  {}",
            r.run_id,
            r.updated_at.to_local("%Y-%m-%d %H:%M:%S"),
            listings::user_turns(st),
            crate::output::human_tokens(r.tokens),
            crate::output::clip_line(&r.prompt, 50)
        )?;
    }
    Ok(0)
}

async fn search(rt: &Runtime, store: &dyn EventStore, query: &str, json: bool) -> Result<u8> {
    let needle = query.to_lowercase();
    let mut found = Vec::new();
    for (r, st) in listings::sessions(store).await? {
        let events = store.read_run(&r.run_id, 0).await?;
        let lines: Vec<(String, String)> = transcript(&events)
            .into_iter()
            .flat_map(|e| {
                let role = e.role.clone();
                e.text
                    .lines()
                    .filter(|l| l.to_lowercase().contains(&needle))
                    .map(|l| (role.clone(), l.to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect();
        if !lines.is_empty() {
            found.push((row(rt, &r, &st), r, lines));
        }
    }
    if json {
        let items: Vec<_> = found
            .iter()
            .map(|(row, _, lines)| {
                let mut row = row.clone();
                row["matches"] =
                    lines.iter().map(|(role, line)| serde_json::json!({"role": role, "line": line})).collect();
                row
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(0);
    }
    if found.is_empty() {
        eprintln!("no session mentions `{query}`");
        return Ok(1);
    }
    let mut out = std::io::stdout().lock();
    for (_, r, lines) in &found {
        writeln!(out, "{}  {}", r.run_id, crate::output::clip_line(&r.prompt, 60))?;
        for (role, line) in lines {
            writeln!(out, "    {role}: {}", crate::output::clip_line(line.trim(), 100))?;
        }
    }
    Ok(0)
}
