//! The `[mcp]` section of the configuration, and edits of config files that keep comments.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::McpError;

/// Default time a tool call may take.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a server has to answer `initialize`.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// `[mcp]`: the MCP servers whose tools runs get.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// `[mcp.servers.NAME]`: one table per server.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub servers: BTreeMap<String, ServerConfig>,
}

impl McpConfig {
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// A copy fit to show: header and environment values replaced by `<redacted>`.
    pub fn redacted(&self) -> Self {
        let mut c = self.clone();
        for s in c.servers.values_mut() {
            s.env.values_mut().for_each(|v| *v = "<redacted>".into());
            s.headers.values_mut().for_each(|v| *v = "<redacted>".into());
        }
        c
    }
}

/// One MCP server: a command (stdio) or a `url` (streamable HTTP).
#[derive(Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// stdio: the program to start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Variables added to the server's environment (values are never shown).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The server's working directory (default: the run's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// Streamable HTTP: the endpoint, such as `http://127.0.0.1:3001/mcp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// HTTP headers sent with every request (values are never shown).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The environment variable holding a bearer token (`Authorization: Bearer ...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bearer_token_env: Option<String>,
    /// Most seconds one tool call may take (default 60).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Most seconds the server has to start and answer `initialize` (default 30).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_timeout_secs: Option<u64>,
    /// `false` keeps the entry but offers none of its tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("command", &self.command)
            .field("args", &self.args)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("cwd", &self.cwd)
            .field("url", &self.url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("bearer_token_env", &self.bearer_token_env)
            .finish()
    }
}

impl ServerConfig {
    /// A stdio server.
    pub fn stdio(command: impl Into<String>, args: Vec<String>) -> Self {
        Self { command: Some(command.into()), args, ..Default::default() }
    }

    /// A streamable HTTP server.
    pub fn http(url: impl Into<String>) -> Self {
        Self { url: Some(url.into()), ..Default::default() }
    }

    pub fn call_timeout(&self) -> Duration {
        self.timeout_secs.map(|s| Duration::from_secs(s.max(1))).unwrap_or(DEFAULT_CALL_TIMEOUT)
    }

    pub fn startup_timeout(&self) -> Duration {
        self.startup_timeout_secs.map(|s| Duration::from_secs(s.max(1))).unwrap_or(DEFAULT_STARTUP_TIMEOUT)
    }

    pub fn enabled(&self) -> bool {
        self.enabled.unwrap_or(true)
    }

    /// `stdio: cmd args` or `http: url`, for people.
    pub fn describe(&self) -> String {
        match (&self.command, &self.url) {
            (Some(c), _) => {
                let mut s = format!("stdio: {c}");
                for a in &self.args {
                    s.push(' ');
                    s.push_str(a);
                }
                s
            }
            (None, Some(u)) => format!("http: {u}"),
            (None, None) => "(no command or url)".into(),
        }
    }

    /// Checks that exactly one transport is configured.
    pub fn check(&self, name: &str) -> Result<(), McpError> {
        let bad = |message: &str| Err(McpError::Config { server: name.to_owned(), message: message.to_owned() });
        match (&self.command, &self.url) {
            (Some(_), Some(_)) => bad("has both `command` and `url`; keep one"),
            (None, None) => bad("needs `command` (stdio) or `url` (streamable HTTP)"),
            (Some(c), None) if c.is_empty() => bad("has an empty `command`"),
            (None, Some(u)) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                bad("`url` must start with http:// or https://")
            }
            _ => Ok(()),
        }
    }
}

/// Adds (or replaces) `[mcp.servers.NAME]` in config text, keeping everything else as written.
pub fn add_server_to_toml(text: &str, name: &str, server: &ServerConfig) -> Result<String, McpError> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| McpError::ConfigEdit { message: e.to_string().trim().to_owned() })?;
    let rendered = toml_edit::ser::to_document(server)?;
    let mcp = doc.entry("mcp").or_insert_with(implicit_table);
    let mcp = mcp.as_table_mut().ok_or_else(|| McpError::ConfigEdit { message: "`mcp` is not a table".into() })?;
    let servers = mcp.entry("servers").or_insert_with(implicit_table);
    let servers = servers
        .as_table_mut()
        .ok_or_else(|| McpError::ConfigEdit { message: "`mcp.servers` is not a table".into() })?;
    let mut table = toml_edit::Table::new();
    for (k, v) in rendered.iter() {
        let v = match v {
            // `env = { K = "v" }` rather than a sub-table.
            toml_edit::Item::Table(t) => toml_edit::Item::Value(t.clone().into_inline_table().into()),
            other => other.clone(),
        };
        table.insert(k, v);
    }
    servers.insert(name, toml_edit::Item::Table(table));
    // Comments at the end of the file belong to the document's trailing text, which is printed
    // after every table: keep them above the new table instead, so the file only grows at its end.
    let trailing = doc.trailing().as_str().unwrap_or_default().to_owned();
    if !trailing.trim().is_empty()
        && let Some(t) = doc
            .get_mut("mcp")
            .and_then(|m| m.get_mut("servers"))
            .and_then(|s| s.get_mut(name))
            .and_then(|t| t.as_table_mut())
    {
        t.decor_mut().set_prefix(trailing);
        doc.set_trailing("");
    }
    Ok(doc.to_string())
}

/// Removes `[mcp.servers.NAME]` from config text; `None` if it is not there.
pub fn remove_server_from_toml(text: &str, name: &str) -> Result<Option<String>, McpError> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| McpError::ConfigEdit { message: e.to_string().trim().to_owned() })?;
    let Some(servers) = doc.get_mut("mcp").and_then(|m| m.get_mut("servers")).and_then(|s| s.as_table_like_mut())
    else {
        return Ok(None);
    };
    let Some(removed) = servers.remove(name) else {
        return Ok(None);
    };
    // Comments written above the table (see `add_server_to_toml`) stay in the file.
    if let Some(prefix) = removed.as_table().and_then(|t| t.decor().prefix()).and_then(|p| p.as_str())
        && !prefix.trim().is_empty()
    {
        let trailing = doc.trailing().as_str().unwrap_or_default().to_owned();
        doc.set_trailing(format!("{prefix}{trailing}"));
    }
    Ok(Some(doc.to_string()))
}

fn implicit_table() -> toml_edit::Item {
    let mut t = toml_edit::Table::new();
    t.set_implicit(true);
    toml_edit::Item::Table(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_keeps_comments_and_remove_restores() {
        let text = "# my config\nmax_turns = 7 # inline comment\n\n[tools]\n# keep me\nshell_timeout_secs = 5\n";
        let mut s = ServerConfig::stdio("npx", vec!["-y".into(), "server".into()]);
        s.env.insert("TOKEN".into(), "x".into());
        let added = add_server_to_toml(text, "every-thing", &s).unwrap();
        assert!(added.starts_with(text), "{added}");
        assert!(added.contains("[mcp.servers.every-thing]"), "{added}");
        assert!(!added.contains("[mcp]\n"), "{added}");
        let parsed: toml::Table = toml::from_str(&added).unwrap();
        let back: ServerConfig = parsed["mcp"]["servers"]["every-thing"].clone().try_into().unwrap();
        assert_eq!(back, s);
        let removed = remove_server_from_toml(&added, "every-thing").unwrap().unwrap();
        assert!(removed.starts_with(text), "{removed}");
        assert!(!removed.contains("every-thing"), "{removed}");
        assert_eq!(remove_server_from_toml(&removed, "every-thing").unwrap(), None);
    }

    #[test]
    fn trailing_comments_stay_above_the_new_table() {
        let text = "max_turns = 3\n\n# [log]\n# format = \"human\"\n";
        let added = add_server_to_toml(text, "a", &ServerConfig::http("http://h/mcp")).unwrap();
        assert!(added.starts_with(text), "{added}");
        assert_eq!(remove_server_from_toml(&added, "a").unwrap().unwrap(), text);
        let only_comments = "# a\n# b\n";
        let added = add_server_to_toml(only_comments, "a", &ServerConfig::http("http://h/mcp")).unwrap();
        assert!(added.starts_with(only_comments), "{added}");
        assert_eq!(remove_server_from_toml(&added, "a").unwrap().unwrap(), only_comments);
    }

    #[test]
    fn add_replaces_an_existing_entry() {
        let text = "[mcp.servers.a]\nurl = \"http://x/mcp\"\n";
        let out = add_server_to_toml(text, "a", &ServerConfig::stdio("srv", vec![])).unwrap();
        let parsed: toml::Table = toml::from_str(&out).unwrap();
        let back: ServerConfig = parsed["mcp"]["servers"]["a"].clone().try_into().unwrap();
        assert_eq!(back.command.as_deref(), Some("srv"));
        assert_eq!(back.url, None);
    }

    #[test]
    fn secrets_are_not_shown() {
        let mut s = ServerConfig::http("http://h/mcp");
        s.headers.insert("X-Key".into(), "hunter2".into());
        s.env.insert("TOKEN".into(), "hunter3".into());
        assert!(!format!("{s:?}").contains("hunter"));
        let mut c = McpConfig::default();
        c.servers.insert("a".into(), s);
        assert!(!format!("{:?}", c.redacted()).contains("hunter"));
        assert!(!toml::to_string(&c.redacted()).unwrap().contains("hunter"));
    }

    #[test]
    fn check_wants_one_transport() {
        assert!(ServerConfig::default().check("a").is_err());
        let mut both = ServerConfig::stdio("x", vec![]);
        both.url = Some("http://h".into());
        assert!(both.check("a").unwrap_err().to_string().contains("`a`"));
        assert!(ServerConfig::http("ftp://h").check("a").is_err());
        assert!(ServerConfig::http("http://h/mcp").check("a").is_ok());
    }
}
