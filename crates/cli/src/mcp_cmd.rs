//! `descartes mcp add|list|remove`: the MCP servers whose tools runs get.

use std::io::Write;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use descartes_runtime::Runtime;
use descartes_runtime::mcp::ConfigScope;
use serde_json::json;

#[derive(Subcommand, Debug)]
pub enum McpCommand {
    /// Add (or replace) a server in the project config (the user config outside a project or
    /// with --user): `mcp add NAME -- COMMAND ARGS...` (stdio) or `mcp add NAME --url URL`
    /// (streamable HTTP).
    Add {
        /// The server's name: its tools are offered as mcp__NAME__TOOL.
        name: String,
        /// A streamable HTTP endpoint instead of a command.
        #[arg(long)]
        url: Option<String>,
        /// A variable for the server's environment (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// An HTTP header sent with every request (repeatable).
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// The environment variable holding a bearer token for an HTTP server.
        #[arg(long, value_name = "VAR")]
        bearer_token_env: Option<String>,
        /// Most seconds one tool call may take (default 60).
        #[arg(long, value_name = "SECS")]
        timeout_secs: Option<u64>,
        /// Write to the user config file rather than the project's.
        #[arg(long)]
        user: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// List the servers: each is started and its tools listed, or its error shown.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a server from the project config (or the user config).
    Remove {
        /// The server's name (as `mcp list` shows it).
        name: String,
        /// Remove it from the user config file only.
        #[arg(long)]
        user: bool,
    },
}

pub async fn run(rt: Runtime, command: McpCommand) -> Result<u8> {
    match command {
        McpCommand::Add { name, url, env, headers, bearer_token_env, timeout_secs, user, command } => {
            let mut server = match (url, command.split_first()) {
                (Some(_), Some(_)) => bail!("give either --url or a command after `--`, not both"),
                (None, None) => bail!("give a command after `--` (mcp add NAME -- COMMAND ARGS...) or --url URL"),
                (Some(url), None) => descartes_mcp::ServerConfig::http(url),
                (None, Some((program, args))) => descartes_mcp::ServerConfig::stdio(program.clone(), args.to_vec()),
            };
            server.env = pairs(&env, "--env")?;
            server.headers = pairs(&headers, "--header")?;
            server.bearer_token_env = bearer_token_env;
            server.timeout_secs = timeout_secs;
            let scope = if user { ConfigScope::User } else { ConfigScope::Default };
            let file = rt.mcp_add(&name, &server, scope)?;
            println!("added MCP server `{name}` ({}) to {}", server.describe(), file.display());
            Ok(0)
        }
        McpCommand::Remove { name, user } => {
            let scope = if user { ConfigScope::User } else { ConfigScope::Default };
            let file = rt.mcp_remove(&name, scope)?;
            println!("removed MCP server `{name}` from {}", file.display());
            Ok(0)
        }
        McpCommand::List { json } => list(&rt, json).await,
    }
}

fn pairs(items: &[String], flag: &str) -> Result<std::collections::BTreeMap<String, String>> {
    items
        .iter()
        .map(|i| {
            let (k, v) = i.split_once('=').with_context(|| format!("{flag} takes KEY=VALUE, got `{i}`"))?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

async fn list(rt: &Runtime, json: bool) -> Result<u8> {
    let manager = rt.mcp_manager();
    if manager.is_empty() && !json {
        eprintln!("no MCP servers configured; add one with `descartes mcp add NAME -- COMMAND ARGS...`");
        return Ok(0);
    }
    let statuses = manager.status().await;
    manager.shutdown().await;
    if json {
        let rows: Vec<_> = statuses
            .iter()
            .map(|s| {
                let mut row = json!({"name": s.name, "target": s.target, "enabled": s.enabled});
                match &s.tools {
                    Ok(tools) => {
                        row["status"] = json!("ok");
                        row["tools"] = tools
                            .iter()
                            .map(|t| {
                                json!({
                                    "name": t.name,
                                    "model_name": descartes_mcp::model_tool_name(&s.name, &t.name),
                                    "description": t.description,
                                    "read_only": t.read_only,
                                    "idempotent": t.idempotent,
                                })
                            })
                            .collect();
                    }
                    Err(e) => {
                        row["status"] = json!("error");
                        row["error"] = json!(e);
                    }
                }
                row
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    for s in &statuses {
        match (&s.tools, s.enabled) {
            (_, false) => writeln!(out, "{}  {}  disabled", s.name, s.target)?,
            (Ok(tools), true) => {
                writeln!(out, "{}  {}  ok, {} tools", s.name, s.target, tools.len())?;
                for t in tools.iter() {
                    let first = t.description.lines().next().unwrap_or("");
                    writeln!(out, "  {}  {}", descartes_mcp::model_tool_name(&s.name, &t.name), first)?;
                }
            }
            (Err(e), true) => writeln!(out, "{}  {}  error: {e}", s.name, s.target)?,
        }
    }
    Ok(0)
}
