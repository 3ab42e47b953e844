//! MCP servers: their tools for runs, and `descartes mcp add/remove` edits of config files.
//!
//! The servers come from `[mcp.servers.NAME]` (see [`descartes_mcp::ServerConfig`]). A run gets
//! the built-in tools plus every enabled server's tools ([`Runtime::tools_with_mcp`]); a server
//! that cannot be started is skipped with a warning (the run goes on without its tools).

use std::path::PathBuf;
use std::sync::Arc;

use descartes_core::ToolRegistry;
use descartes_mcp::{McpError, McpManager, ServerConfig};

use crate::Runtime;
use crate::config;

/// Which config file `mcp add` / `mcp remove` edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigScope {
    /// The project's `.descartes/config.toml` when in a project, else the user's file.
    Default,
    /// The user's config file.
    User,
}

impl Runtime {
    /// The configured MCP servers (none is started until its tools are asked for).
    pub fn mcp_manager(&self) -> McpManager {
        let env = self.env.clone();
        McpManager::new(
            &self.config.mcp,
            Arc::new(move |k: &str| env(k)),
            Some(self.cwd.clone()),
            self.config.tools.max_output_bytes,
        )
    }

    /// The built-in tools and the tools of every enabled MCP server (servers are started in
    /// parallel; one that fails is skipped with a warning).
    pub async fn tools_with_mcp(&self) -> ToolRegistry {
        let registry = self.tools();
        if self.config.mcp.is_empty() {
            return registry;
        }
        for e in self.mcp_manager().register(&registry).await {
            tracing::warn!("{e}; its tools are not offered to this run");
        }
        registry
    }

    /// The config file that `mcp add`/`mcp remove` edit.
    pub fn mcp_config_file(&self, scope: ConfigScope) -> Result<PathBuf, McpError> {
        let file = match scope {
            ConfigScope::Default => self.places.project_config.clone().or_else(|| self.places.user_config.clone()),
            ConfigScope::User => self.places.user_config.clone(),
        };
        file.ok_or_else(|| McpError::ConfigEdit {
            message: "no user config directory is known; set DESCARTES_HOME or HOME".into(),
        })
    }

    /// Writes `[mcp.servers.NAME]` into a config file (made if missing), keeping its comments
    /// and layout. Returns the file.
    pub fn mcp_add(&self, name: &str, server: &ServerConfig, scope: ConfigScope) -> Result<PathBuf, McpError> {
        server.check(name)?;
        let file = self.mcp_config_file(scope)?;
        let text = read(&file)?;
        let edited = descartes_mcp::add_server_to_toml(&text, name, server)?;
        write_checked(&file, &edited)?;
        Ok(file)
    }

    /// Removes `[mcp.servers.NAME]` from the file of `scope`; with the default scope, from the
    /// project file or else the user file, whichever has it. Returns the file edited.
    pub fn mcp_remove(&self, name: &str, scope: ConfigScope) -> Result<PathBuf, McpError> {
        let candidates: Vec<PathBuf> = match scope {
            ConfigScope::User => self.places.user_config.iter().cloned().collect(),
            ConfigScope::Default => {
                self.places.project_config.iter().chain(self.places.user_config.iter()).cloned().collect()
            }
        };
        for file in candidates {
            let text = read(&file)?;
            if let Some(edited) = descartes_mcp::remove_server_from_toml(&text, name)? {
                write_checked(&file, &edited)?;
                return Ok(file);
            }
        }
        Err(McpError::UnknownServer(name.to_owned()))
    }
}

fn read(file: &std::path::Path) -> Result<String, McpError> {
    match std::fs::read_to_string(file) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(McpError::ConfigEdit { message: format!("cannot read {}: {e}", file.display()) }),
    }
}

/// Writes config text only if it is a valid configuration (atomically: temp file, rename).
fn write_checked(file: &std::path::Path, text: &str) -> Result<(), McpError> {
    config::parse_str(file, text).map_err(|e| McpError::ConfigEdit { message: e.to_string() })?;
    let io = |e: std::io::Error| McpError::ConfigEdit { message: format!("cannot write {}: {e}", file.display()) };
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = file.with_extension("toml.tmp");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, file).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Places;

    #[test]
    fn add_and_remove_edit_the_project_file_keeping_comments() {
        let dir = tempfile::tempdir().unwrap();
        let (places, _) = Runtime::init_project(dir.path()).unwrap();
        let places = Places { user_config: Some(dir.path().join("user/config.toml")), ..places };
        let rt = Runtime::with_places(dir.path().to_owned(), places, Arc::new(|_: &str| None)).unwrap();
        let before = std::fs::read_to_string(rt.places.project_config.as_ref().unwrap()).unwrap();
        let file = rt.mcp_add("fs", &ServerConfig::stdio("mcp-fs", vec!["/tmp".into()]), ConfigScope::Default).unwrap();
        assert_eq!(Some(&file), rt.places.project_config.as_ref());
        let after = std::fs::read_to_string(&file).unwrap();
        assert!(after.starts_with(&before), "comments kept");
        let user = rt.mcp_add("web", &ServerConfig::http("http://127.0.0.1:1/mcp"), ConfigScope::User).unwrap();
        assert_eq!(Some(&user), rt.places.user_config.as_ref());
        let rt = Runtime::with_places(dir.path().to_owned(), rt.places.clone(), Arc::new(|_: &str| None)).unwrap();
        assert_eq!(rt.config.mcp.servers.keys().collect::<Vec<_>>(), ["fs", "web"]);
        assert!(rt.mcp_add("bad", &ServerConfig::default(), ConfigScope::Default).is_err());
        assert_eq!(rt.mcp_remove("web", ConfigScope::Default).unwrap(), user);
        assert_eq!(rt.mcp_remove("fs", ConfigScope::Default).unwrap(), file);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), before);
        assert!(matches!(rt.mcp_remove("fs", ConfigScope::Default), Err(McpError::UnknownServer(_))));
    }
}
