//! Configuration: built-in defaults < user file < project file < environment < flags.
//!
//! Each file is checked on its own (so an error names its file, line and column), then the
//! files are merged table by table, then the environment is applied. Flags are applied by the
//! caller through [`crate::Selection`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The effective configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The provider used when `-p` is not given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The model used when `-m` is not given and the provider has no `model` of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Most model calls in one run.
    pub max_turns: u32,
    /// The system prompt given to the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Model providers by name. `openai` and `anthropic` are built in; entries here change them
    /// or add OpenAI- or Anthropic-compatible servers (`kind = "openai"`).
    pub providers: BTreeMap<String, ProviderConfig>,
    pub tools: ToolsConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            provider: None,
            model: None,
            max_turns: 50,
            system_prompt: None,
            providers: BTreeMap::new(),
            tools: ToolsConfig::default(),
            log: LogConfig::default(),
        }
    }
}

#[derive(Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// Wire format: `openai` (Chat Completions) or `anthropic` (Messages). Defaults to the
    /// provider's name for the built-in ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// The environment variable holding the API key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// The API key itself (prefer `api_key_env`). Never printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

impl fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("api_key_env", &self.api_key_env)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ToolsConfig {
    /// Default timeout of a `shell` command.
    pub shell_timeout_secs: u64,
    /// Most bytes of one output stream given back to the model.
    pub max_output_bytes: usize,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        Self { shell_timeout_secs: 120, max_output_bytes: 64 * 1024 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` or `json` (diagnostics on stderr).
    pub format: LogFormat,
    /// A tracing filter such as `info` or `descartes=debug`; `RUST_LOG` wins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// A configuration error, located.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    /// A file is not valid TOML or has an unknown key or a wrong type.
    #[error("{file}:{line}:{column}: {message}")]
    File { file: PathBuf, line: usize, column: usize, message: String },
    #[error("cannot read {file}: {message}")]
    Read { file: PathBuf, message: String },
    /// An environment variable has an invalid value.
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

/// The built-in providers: (name, wire kind, default base URL, key variable, base URL variable,
/// default model).
pub const BUILTIN_PROVIDERS: &[(&str, &str, &str, &str, &str, &str)] = &[
    ("openai", "openai", "https://api.openai.com/v1", "OPENAI_API_KEY", "OPENAI_BASE_URL", "gpt-4o-mini"),
    (
        "anthropic",
        "anthropic",
        "https://api.anthropic.com",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "claude-sonnet-4-5",
    ),
];

/// Checks one config file and returns its table.
pub fn read_file(path: &Path) -> Result<Option<toml::Table>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ConfigError::Read { file: path.to_owned(), message: e.to_string() }),
    };
    parse_str(path, &text).map(Some)
}

/// Parses and checks config text (`path` is only for messages).
pub fn parse_str(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    let located = |e: toml::de::Error| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ConfigError::File { file: path.to_owned(), line, column, message: e.message().trim().to_owned() }
    };
    let table: toml::Table = toml::from_str(text).map_err(located)?;
    // Check keys and types against the schema, with positions.
    let _: Config = toml::from_str(text).map_err(located)?;
    Ok(table)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, column)
}

/// Merges `over` into `base`, table by table.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Loads the configuration from the given files (in increasing precedence; missing files are
/// skipped) and the environment. Returns it with the files that were read.
pub fn load(files: &[PathBuf], env: &dyn Fn(&str) -> Option<String>) -> Result<(Config, Vec<PathBuf>), ConfigError> {
    let mut merged = toml::Table::new();
    let mut read = Vec::new();
    for f in files {
        if let Some(table) = read_file(f)? {
            merge(&mut merged, table);
            read.push(f.clone());
        }
    }
    let mut config: Config = toml::Value::Table(merged).try_into().map_err(|e: toml::de::Error| ConfigError::File {
        file: read.last().cloned().unwrap_or_default(),
        line: 1,
        column: 1,
        message: e.message().to_owned(),
    })?;
    apply_env(&mut config, env)?;
    Ok((config, read))
}

fn apply_env(config: &mut Config, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(p) = get("DESCARTES_PROVIDER") {
        config.provider = Some(p);
    }
    if let Some(m) = get("DESCARTES_MODEL") {
        config.model = Some(m);
    }
    if let Some(t) = get("DESCARTES_MAX_TURNS") {
        config.max_turns = t.parse().map_err(|_| ConfigError::Env {
            var: "DESCARTES_MAX_TURNS".into(),
            message: format!("expected a whole number, got {t:?}"),
        })?;
    }
    if let Some(f) = get("DESCARTES_LOG_FORMAT") {
        config.log.format = match f.as_str() {
            "human" => LogFormat::Human,
            "json" => LogFormat::Json,
            _ => {
                return Err(ConfigError::Env {
                    var: "DESCARTES_LOG_FORMAT".into(),
                    message: format!("expected `human` or `json`, got {f:?}"),
                });
            }
        };
    }
    for (name, _, _, _, base_var, _) in BUILTIN_PROVIDERS {
        if let Some(url) = get(base_var) {
            config.providers.entry((*name).to_owned()).or_default().base_url = Some(url);
        }
    }
    Ok(())
}

/// The effective configuration as TOML, with secrets redacted.
pub fn redacted_toml(config: &Config) -> String {
    let mut c = config.clone();
    for p in c.providers.values_mut() {
        if p.api_key.is_some() {
            p.api_key = Some("<redacted>".into());
        }
    }
    toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
}

/// The commented config file `descartes init` writes.
pub const TEMPLATE: &str = r#"# Descartes project configuration.
# Precedence: built-in defaults < user config < this file < environment < command-line flags.
# `descartes config show` prints the effective configuration; `descartes config check` checks it.

# provider = "openai"        # or "anthropic"; -p on the command line wins
# model = "gpt-4o-mini"      # -m on the command line wins
# max_turns = 50             # most model calls in one run
# system_prompt = "You are a careful software engineer."

# [providers.openai]
# base_url = "https://api.openai.com/v1"   # or set OPENAI_BASE_URL
# api_key_env = "OPENAI_API_KEY"
# model = "gpt-4o-mini"

# [providers.anthropic]
# base_url = "https://api.anthropic.com"   # or set ANTHROPIC_BASE_URL
# api_key_env = "ANTHROPIC_API_KEY"
# model = "claude-sonnet-4-5"

# [tools]
# shell_timeout_secs = 120
# max_output_bytes = 65536

# [log]
# format = "human"   # or "json"; diagnostics go to stderr
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_reported_with_file_and_line() {
        let text = "max_turns = 3\n\n[providers.openai]\nbase_url = \"x\"\nbase_urll = \"y\"\n";
        let err = parse_str(Path::new("/p/config.toml"), text).unwrap_err().to_string();
        assert!(err.starts_with("/p/config.toml:5:1:"), "{err}");
        assert!(err.contains("base_urll"), "{err}");
    }

    #[test]
    fn syntax_and_type_errors_are_located() {
        let err =
            parse_str(Path::new("c.toml"), "provider = \"openai\"\nmax_turns = \"many\"\n").unwrap_err().to_string();
        assert!(err.starts_with("c.toml:2:"), "{err}");
        let err = parse_str(Path::new("c.toml"), "a = \n").unwrap_err().to_string();
        assert!(err.starts_with("c.toml:1:"), "{err}");
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("user.toml");
        let project = dir.path().join("project.toml");
        std::fs::write(&user, "provider = \"anthropic\"\nmax_turns = 7\n[providers.openai]\nmodel = \"u\"\n").unwrap();
        std::fs::write(&project, "max_turns = 9\n[providers.openai]\nbase_url = \"http://p\"\n").unwrap();
        let env = |k: &str| match k {
            "DESCARTES_PROVIDER" => Some("openai".to_owned()),
            "ANTHROPIC_BASE_URL" => Some("http://a".to_owned()),
            _ => None,
        };
        let (c, read) = load(&[user.clone(), project.clone(), dir.path().join("missing.toml")], &env).unwrap();
        assert_eq!(read, vec![user, project]);
        assert_eq!(c.max_turns, 9, "project over user");
        assert_eq!(c.provider.as_deref(), Some("openai"), "env over files");
        assert_eq!(c.providers["openai"].model.as_deref(), Some("u"), "tables merge");
        assert_eq!(c.providers["openai"].base_url.as_deref(), Some("http://p"));
        assert_eq!(c.providers["anthropic"].base_url.as_deref(), Some("http://a"));
    }

    #[test]
    fn bad_env_names_the_variable() {
        let err = load(&[], &|k| (k == "DESCARTES_MAX_TURNS").then(|| "lots".to_owned())).unwrap_err().to_string();
        assert!(err.contains("DESCARTES_MAX_TURNS"), "{err}");
    }

    #[test]
    fn secrets_are_redacted() {
        let mut c = Config::default();
        c.providers.insert("openai".into(), ProviderConfig { api_key: Some("sk-secret".into()), ..Default::default() });
        let shown = redacted_toml(&c);
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(!format!("{c:?}").contains("sk-secret"));
    }

    #[test]
    fn template_is_valid() {
        parse_str(Path::new("t"), TEMPLATE).unwrap();
    }
}
