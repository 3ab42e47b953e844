//! Configuration: built-in defaults < user file < project file < environment < flags.
//!
//! Each file is checked on its own (so an error names its file, line and column), then the
//! files are merged table by table, then the environment is applied. Flags are applied by the
//! caller through [`crate::Selection`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use descartes_core::policy::{Action, PermissionRules, Policy, Rule, RuleError, RuleSpec, Source};
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
    /// Most model calls in one run (at least 1).
    #[serde(deserialize_with = "at_least_one")]
    pub max_turns: u32,
    /// The system prompt given to the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Model providers by name. `openai` and `anthropic` are built in; entries here change them
    /// or add OpenAI- or Anthropic-compatible servers (`kind = "openai"`).
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Providers that continue a run when its provider fails after its retries, in order
    /// (`--fallback` adds to the front).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<String>,
    pub retry: RetryConfig,
    pub budget: BudgetConfig,
    /// Prices in USD per million tokens by model-name prefix, over the built-in table.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub prices: BTreeMap<String, descartes_core::Price>,
    pub tools: ToolsConfig,
    /// How `shell` commands are confined (Landlock + seccomp on Linux). Settings that loosen it
    /// are honoured only from the user config and flags (see [`guard_project`]).
    pub sandbox: descartes_tools::SandboxPolicy,
    /// The environment of `shell` and task commands (`env`, `include`, `exclude`, `set`).
    pub shell: descartes_tools::EnvPolicy,
    /// `[mcp.servers.NAME]`: MCP servers whose tools runs get (see `crate::mcp`).
    #[serde(skip_serializing_if = "descartes_mcp::McpConfig::is_empty")]
    pub mcp: descartes_mcp::McpConfig,
    pub log: LogConfig,
    /// The interactive chat (`descartes chat`).
    pub chat: ChatConfig,
    /// Context-window management and the rules files loaded into the system prompt.
    pub context: ContextConfig,
    /// Saved prompts: `review = "..."` is `/review` in the chat.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub prompts: BTreeMap<String, String>,
    /// Permission rules: `allow`, `ask`, `deny` lists of `TOOL` or `TOOL(PATTERN)` (see
    /// `descartes_core::policy`). The rules of every file are kept (the project's are added
    /// to the user's), here all together; [`Config::permission_layers`] says which file has which.
    #[serde(skip_serializing_if = "PermissionRules::is_empty")]
    pub permissions: PermissionRules,
    /// The `[permissions]` rules of each file read, in the order read.
    #[serde(skip)]
    pub permission_layers: Vec<(PathBuf, PermissionRules)>,
    /// Settings of project files that were not honoured because they loosen a guardrail.
    #[serde(skip)]
    pub ignored: Vec<String>,
}

/// A count that must be at least 1 (`max_turns = 0` would still make calls).
fn at_least_one<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if n == 0 { Err(serde::de::Error::custom("must be at least 1")) } else { Ok(n) }
}

/// Retries, parking and circuit breakers of model calls.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries of a failed model call before falling back or failing.
    pub max_retries: u32,
    /// First backoff, doubled by each retry (with jitter); `retry-after` wins.
    pub base_delay_ms: u64,
    pub max_delay_secs: u64,
    /// A rate limit that resets later than this parks the run until it resets.
    pub park_after_secs: u64,
    /// The longest a run stays parked; a later reset fails the call.
    pub max_park_secs: u64,
    /// Consecutive failures that open a provider's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls.
    pub breaker_open_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 4,
            base_delay_ms: 500,
            max_delay_secs: 30,
            park_after_secs: 60,
            max_park_secs: 6 * 3600,
            breaker_failures: 5,
            breaker_open_secs: 60,
        }
    }
}

/// Default caps of every run (`--max-tokens` / `--max-cost-usd` win).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            provider: None,
            model: None,
            max_turns: 50,
            system_prompt: None,
            providers: BTreeMap::new(),
            fallback: Vec::new(),
            retry: RetryConfig::default(),
            budget: BudgetConfig::default(),
            prices: BTreeMap::new(),
            tools: ToolsConfig::default(),
            sandbox: descartes_tools::SandboxPolicy::default(),
            shell: descartes_tools::EnvPolicy::default(),
            mcp: Default::default(),
            log: LogConfig::default(),
            permissions: PermissionRules::default(),
            permission_layers: Vec::new(),
            chat: ChatConfig::default(),
            context: ContextConfig::default(),
            prompts: BTreeMap::new(),
            ignored: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChatConfig {
    /// Lines of input history kept across sessions (in the state directory).
    pub history_size: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self { history_size: 1000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    /// The model's context window in tokens.
    pub window: u64,
    /// A session is compacted when its conversation reaches this fraction of the window.
    pub compact_at: f64,
    /// Turns always kept verbatim by a compaction.
    pub keep_turns: usize,
    /// Load rules and context files (AGENTS.md, CLAUDE.md, .cursorrules, .windsurfrules).
    pub rules: bool,
    /// Most bytes read from one rules file, and from all of them.
    pub max_file_bytes: usize,
    pub max_total_bytes: usize,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            window: 128_000,
            compact_at: 0.8,
            keep_turns: 2,
            rules: true,
            max_file_bytes: 16 * 1024,
            max_total_bytes: 48 * 1024,
        }
    }
}

#[derive(Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// What the provider is: an API wire format (`openai` for Chat Completions and every
    /// OpenAI-compatible server, `openai-responses`, `anthropic`, `gemini`, `ollama`), the
    /// in-process `local` model, or an agent CLI (`claude-code`, `codex`, `gemini-cli`,
    /// `command`). Built-in providers have theirs; a new entry defaults to `openai`.
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
    /// The models the server offers (shown by `descartes providers`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Recognise tool calls that the model writes as text (JSON or XML in its answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_tool_calls: Option<bool>,
    /// `command` kind (and to override an agent CLI's binary): the program and its arguments;
    /// `{prompt}` in an argument is replaced by the prompt, else the prompt goes to stdin.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
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
    /// Directories the file tools may touch besides the run's working directory. Relative
    /// paths are taken from the project root (or the working directory outside a project);
    /// `~/` is the home directory.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<PathBuf>,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        Self { shell_timeout_secs: 120, max_output_bytes: 64 * 1024, roots: Vec::new() }
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
    /// Several problems in one file (every unknown key), in order.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Many(Vec<ConfigError>),
    #[error("cannot read {file}: {message}")]
    Read { file: PathBuf, message: String },
    /// An environment variable has an invalid value.
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

// What is known about providers (the built-in ones, aliases, kinds) is one table, in the
// providers crate; re-exported here, where the configuration's users have always found it.
pub use descartes_providers::catalog::{BUILTIN_PROVIDERS, Builtin, KIND_NAMES as PROVIDER_KINDS, PROVIDER_ALIASES};

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
    // Check keys and types against the schema, with positions. Serde stops at the first
    // unknown key: each one found is commented out of a working copy and the check runs again,
    // so every unknown key is reported at once (other errors, and an unknown table, whose keys
    // would then seem to belong to the table before it, stop the search).
    let mut errors = Vec::new();
    let mut working = text.to_owned();
    while let Err(e) = toml::from_str::<Config>(&working) {
        let unknown = e.message().starts_with("unknown field");
        let line_start = e.span().map(|s| working[..s.start.min(working.len())].rfind('\n').map_or(0, |i| i + 1));
        errors.push(located(e));
        match line_start {
            // The line's first character becomes `#`: offsets (so positions) stay those of
            // the user's file.
            Some(at)
                if unknown
                    && errors.len() < 50
                    && working[at..].starts_with(|c: char| c.is_ascii() && c != '#' && c != '[') =>
            {
                working.replace_range(at..at + 1, "#")
            }
            _ => break,
        }
    }
    match errors.len() {
        0 => Ok(table),
        1 => Err(errors.remove(0)),
        _ => Err(ConfigError::Many(errors)),
    }
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
/// skipped) and the environment. Returns it with the files that were read. Every file but
/// `user_config` is a project file: its settings that loosen a guardrail are left out (see
/// [`guard_project`]) and listed in [`Config::ignored`].
pub fn load(
    files: &[PathBuf],
    user_config: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Vec<PathBuf>), ConfigError> {
    let mut merged = toml::Table::new();
    let mut read = Vec::new();
    let mut layers = Vec::new();
    let mut ignored = Vec::new();
    for f in files {
        if let Some(mut table) = read_file(f)? {
            if Some(f.as_path()) != user_config {
                let so_far: Config = toml::Value::Table(merged.clone()).try_into().unwrap_or_default();
                ignored.extend(guard_project(&mut table, &so_far).into_iter().map(|what| {
                    format!(
                        "{}: {what} is ignored: settings that loosen the sandbox or expose more are honoured only \
                         from the user config{} or the command line (--sandbox)",
                        f.display(),
                        user_config.map(|u| format!(" ({})", u.display())).unwrap_or_default()
                    )
                }));
            }
            // Permission rules add up across files instead of replacing each other.
            if let Some(p) = table.remove("permissions") {
                let rules: PermissionRules = p.try_into().map_err(|e: toml::de::Error| ConfigError::File {
                    file: f.clone(),
                    line: 1,
                    column: 1,
                    message: e.message().to_owned(),
                })?;
                layers.push((f.clone(), rules));
            }
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
    for (_, rules) in &layers {
        config.permissions.extend(rules);
    }
    config.permission_layers = layers;
    config.ignored = ignored;
    apply_env(&mut config, env)?;
    Ok((config, read))
}

/// Removes from a project file's `table` every setting that would loosen a guardrail of `base`
/// (the defaults and the user config): a project file is writable by whoever controls the
/// repository (a cloned repository, an agent's earlier run), so it may tighten but never loosen
/// the sandbox, add writable or file-tool roots, or pass more of the environment to commands.
/// Returns what was removed, as `[table] key = value`.
pub fn guard_project(table: &mut toml::Table, base: &Config) -> Vec<String> {
    use descartes_tools::{EnvInherit, SandboxMode};
    let rank = |m: SandboxMode| match m {
        SandboxMode::ReadOnly => 0,
        SandboxMode::WorkspaceWrite => 1,
        SandboxMode::FullAccess => 2,
    };
    let mut removed = Vec::new();
    let mut take = |section: &str, key: &str, loosens: &dyn Fn(&toml::Value) -> bool| {
        if let Some(toml::Value::Table(t)) = table.get_mut(section)
            && let Some(v) = t.get(key)
            && loosens(v)
        {
            removed.push(format!("[{section}] {key} = {v}"));
            t.remove(key);
        }
    };
    let sandbox = &base.sandbox;
    take("sandbox", "mode", &|v| {
        v.as_str().and_then(|m| m.parse::<SandboxMode>().ok()).is_some_and(|m| rank(m) > rank(sandbox.mode))
    });
    take("sandbox", "network", &|v| v.as_bool() == Some(true) && !sandbox.network);
    take("sandbox", "unix_sockets", &|v| v.as_bool() == Some(true) && !sandbox.unix_sockets);
    take("sandbox", "require", &|v| v.as_bool() == Some(false) && sandbox.require);
    take("sandbox", "writable_roots", &|v| v.as_array().is_some_and(|a| !a.is_empty()));
    take("tools", "roots", &|v| v.as_array().is_some_and(|a| !a.is_empty()));
    let env = base.shell.env;
    take("shell", "env", &|v| {
        let asked = match v.as_str() {
            Some("none") => EnvInherit::None,
            Some("core") => EnvInherit::Core,
            Some("inherit") => EnvInherit::Inherit,
            _ => return false,
        };
        asked > env
    });
    take("shell", "include", &|v| v.as_array().is_some_and(|a| !a.is_empty()));
    removed
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
        config.max_turns = t.parse().ok().filter(|n| *n > 0).ok_or_else(|| ConfigError::Env {
            var: "DESCARTES_MAX_TURNS".into(),
            message: format!("expected a whole number of at least 1, got {t:?}"),
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
    for b in BUILTIN_PROVIDERS.iter().filter(|b| !b.base_env.is_empty()) {
        if let Some(url) = get(b.base_env) {
            config.providers.entry(b.name.to_owned()).or_default().base_url = Some(url);
        }
    }
    Ok(())
}

impl Config {
    /// The permission policy: the rules of `user_config` are the user's, those of every other
    /// file the project's.
    pub fn policy(&self, user_config: Option<&Path>) -> Result<Policy, RuleError> {
        let mut rules = Vec::new();
        for (file, layer) in &self.permission_layers {
            let source = if Some(file.as_path()) == user_config { Source::User } else { Source::Project };
            let lines = permission_lines(file);
            for (action, list) in
                [(Action::Allow, &layer.allow), (Action::Ask, &layer.ask), (Action::Deny, &layer.deny)]
            {
                for spec in list {
                    let rule = Rule::new(action, source, spec.clone())?;
                    let line = lines.iter().find(|(a, s, _)| *a == action && s == spec).map(|(_, _, l)| *l);
                    rules.push(rule.at(file.clone(), line));
                }
            }
        }
        Ok(Policy::from_rules(rules))
    }
}

/// The line of each rule of a config file's `[permissions]` (read again for the positions the
/// merged table does not keep); empty when the file cannot be read or parsed.
fn permission_lines(file: &Path) -> Vec<(Action, RuleSpec, usize)> {
    #[derive(Deserialize, Default)]
    struct Lists {
        #[serde(default)]
        allow: Vec<toml::Spanned<String>>,
        #[serde(default)]
        ask: Vec<toml::Spanned<String>>,
        #[serde(default)]
        deny: Vec<toml::Spanned<String>>,
    }
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        permissions: Lists,
    }
    let Ok(text) = std::fs::read_to_string(file) else { return Vec::new() };
    let Ok(parsed) = toml::from_str::<File>(&text) else { return Vec::new() };
    let p = parsed.permissions;
    [(Action::Allow, p.allow), (Action::Ask, p.ask), (Action::Deny, p.deny)]
        .into_iter()
        .flat_map(|(action, list)| {
            let text = &text;
            list.into_iter().filter_map(move |s| {
                let line = line_col(text, s.span().start).0;
                RuleSpec::parse(s.get_ref()).ok().map(|spec| (action, spec, line))
            })
        })
        .collect()
}

/// The effective configuration as TOML, with secrets redacted.
pub fn redacted_toml(config: &Config) -> String {
    let mut c = config.clone();
    for p in c.providers.values_mut() {
        if p.api_key.is_some() {
            p.api_key = Some("<redacted>".into());
        }
        if let Some(u) = &p.base_url {
            p.base_url = Some(descartes_core::redact::redact_url(u).into_owned());
        }
    }
    c.mcp = c.mcp.redacted();
    let text = toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"));
    descartes_core::redact::redact(&text).into_owned()
}

/// The commented config file `descartes init` writes.
pub const TEMPLATE: &str = r#"# Descartes project configuration.
# Precedence: built-in defaults < user config < this file < environment < command-line flags.
# `descartes config show` prints the effective configuration; `descartes config check` checks it.

# provider = "openai"        # openai, openai-responses, anthropic, gemini, xai, ollama, local,
#                            # claude-code, codex, gemini-cli, command; -p on the command line wins.
#                            # Unset: the first of OPENAI_API_KEY, ANTHROPIC_API_KEY, GEMINI_API_KEY,
#                            # XAI_API_KEY that is set, else the in-process local model.
# model = "gpt-4o-mini"      # -m on the command line wins
# max_turns = 50             # most model calls in one run
# system_prompt = "You are a careful software engineer."
# fallback = ["anthropic", "local"]   # continue a run on these when its provider fails

# [retry]
# max_retries = 4            # per model call, with exponential backoff and jitter
# base_delay_ms = 500        # a server's retry-after wins
# park_after_secs = 60       # a longer rate-limit wait parks the run until the limit resets
# breaker_failures = 5       # consecutive failures that open a provider's circuit breaker
# breaker_open_secs = 60

# [budget]                   # caps per run; --max-tokens / --max-cost-usd win
# max_tokens = 200000
# max_cost_usd = 1.0

# [prices."my-model"]        # USD per million tokens, over the built-in table
# input = 1.0
# output = 2.0

# An OpenAI-compatible server, declared without code:
# [providers.groq]
# kind = "openai"
# base_url = "https://api.groq.com/openai/v1"
# api_key_env = "GROQ_API_KEY"
# model = "llama-3.3-70b-versatile"
# models = ["llama-3.3-70b-versatile", "qwen-qwq-32b"]

# [providers.openai]
# base_url = "https://api.openai.com/v1"   # or set OPENAI_BASE_URL
# api_key_env = "OPENAI_API_KEY"
# model = "gpt-4o-mini"

# [providers.anthropic]
# base_url = "https://api.anthropic.com"   # or set ANTHROPIC_BASE_URL
# api_key_env = "ANTHROPIC_API_KEY"
# model = "claude-sonnet-4-5"

# [sandbox]                  # how `shell` commands are confined (Linux: Landlock + seccomp)
#                            # In this (project) file settings may only tighten the sandbox;
#                            # looser ones are honoured from the user config or `--sandbox`.
# mode = "workspace-write"   # read-only | workspace-write | full-access
# network = false            # IP sockets for commands
# unix_sockets = false       # Unix sockets for commands (e.g. to reach Docker)
# writable_roots = []        # more writable directories (e.g. a cache)
# require = false            # refuse commands when the kernel cannot enforce the sandbox

# [shell]                    # the environment of shell and task commands
# env = "inherit"            # inherit | core (HOME, PATH, USER, LANG, ...) | none
# exclude = ["AWS_*"]        # always left out: *KEY*, *SECRET*, *TOKEN*, *PASSWORD*, provider variables
# include = ["GITHUB_TOKEN"] # kept despite the excludes (user config only)
# set = { CI = "1" }

# [tools]
# shell_timeout_secs = 120
# max_output_bytes = 65536
# roots = ["../shared-docs"]  # more directories the file tools may read and write (user config only)

# MCP servers: their tools are offered as mcp__<server>__<tool> (`descartes mcp add|list|remove`).
# [mcp.servers.everything]
# command = "npx"            # stdio: a program, its args, env, cwd
# args = ["-y", "@modelcontextprotocol/server-everything"]
# timeout_secs = 60          # per tool call
# [mcp.servers.remote]
# url = "https://example.com/mcp"    # streamable HTTP
# bearer_token_env = "REMOTE_MCP_TOKEN"

# [log]
# format = "human"   # or "json"; diagnostics go to stderr

# [permissions]      # added to the user's rules; `descartes permissions` lists them all
# allow = ["shell(cargo test*)", "shell(git status)", "mcp__github__get_*"]
# ask = ["shell(git push*)"]
# deny = ["write_file(/etc/**)", "shell(rm -rf *)", "http_request(*.internal)"]
# The most specific rule wins (a command/path/host pattern over a tool name, more literal
# characters over fewer); on a tie deny > ask > allow. -y answers asks, never denies.
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
    fn every_unknown_key_is_reported_and_max_turns_zero_is_refused() {
        let err = parse_str(Path::new("c.toml"), "colour = 1\nmax_turns = 3\n[retry]\nmax_retrys = 2\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("c.toml:1:1: unknown field `colour`"), "{text}");
        assert!(text.contains("c.toml:4:1: unknown field `max_retrys`"), "{text}");
        assert_eq!(text.lines().count(), 2, "{text}");
        let err = parse_str(Path::new("c.toml"), "\nmax_turns = 0\n").unwrap_err().to_string();
        assert!(err.starts_with("c.toml:2:") && err.contains("at least 1"), "{err}");
        let err = load(&[], None, &|k| (k == "DESCARTES_MAX_TURNS").then(|| "0".to_owned())).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
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
        let (c, read) =
            load(&[user.clone(), project.clone(), dir.path().join("missing.toml")], Some(&user), &env).unwrap();
        assert_eq!(read, vec![user, project]);
        assert_eq!(c.max_turns, 9, "project over user");
        assert_eq!(c.provider.as_deref(), Some("openai"), "env over files");
        assert_eq!(c.providers["openai"].model.as_deref(), Some("u"), "tables merge");
        assert_eq!(c.providers["openai"].base_url.as_deref(), Some("http://p"));
        assert_eq!(c.providers["anthropic"].base_url.as_deref(), Some("http://a"));
    }

    #[test]
    fn bad_env_names_the_variable() {
        let err =
            load(&[], None, &|k| (k == "DESCARTES_MAX_TURNS").then(|| "lots".to_owned())).unwrap_err().to_string();
        assert!(err.contains("DESCARTES_MAX_TURNS"), "{err}");
    }

    #[test]
    fn a_project_file_may_tighten_but_not_loosen_the_guardrails() {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("user.toml");
        let project = dir.path().join("project.toml");
        std::fs::write(&user, "[sandbox]\nnetwork = true\n").unwrap();
        std::fs::write(
            &project,
            "[sandbox]\nmode = \"full-access\"\nnetwork = false\nunix_sockets = true\nwritable_roots = [\"/\"]\n\
             require = true\n[tools]\nroots = [\"/\"]\n[shell]\ninclude = [\"*KEY*\"]\nexclude = [\"AWS_*\"]\n",
        )
        .unwrap();
        let (c, _) = load(&[user.clone(), project.clone()], Some(&user), &|_| None).unwrap();
        assert_eq!(c.sandbox.mode, descartes_tools::SandboxMode::WorkspaceWrite);
        assert!(!c.sandbox.network, "tightened by the project");
        assert!(c.sandbox.require, "tightened by the project");
        assert!(!c.sandbox.unix_sockets && c.sandbox.writable_roots.is_empty() && c.tools.roots.is_empty());
        assert!(c.shell.include.is_empty() && c.shell.exclude == vec!["AWS_*".to_owned()]);
        assert_eq!(c.ignored.len(), 5, "{:?}", c.ignored);
        assert!(c.ignored[0].contains("project.toml") && c.ignored[0].contains("mode = \"full-access\""));
        // The same settings from the user file are honoured.
        std::fs::write(&user, "[sandbox]\nmode = \"full-access\"\nunix_sockets = true\n").unwrap();
        let (c, _) = load(std::slice::from_ref(&user), Some(&user), &|_| None).unwrap();
        assert_eq!(c.sandbox.mode, descartes_tools::SandboxMode::FullAccess);
        assert!(c.sandbox.unix_sockets && c.ignored.is_empty());
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

    #[test]
    fn the_template_and_the_local_model_agree_with_the_provider_table() {
        let providers = TEMPLATE.lines().find(|l| l.starts_with("# provider =")).unwrap();
        let more = TEMPLATE.lines().skip_while(|l| !l.starts_with("# provider =")).nth(1).unwrap();
        let listed = format!("{providers} {more}");
        for b in BUILTIN_PROVIDERS {
            assert!(listed.split([' ', ',', ';', '"']).any(|w| w == b.name), "{} is not in the template", b.name);
        }
        // The default provider's order, as the template tells it.
        let mut keys: Vec<&str> = Vec::new();
        for b in BUILTIN_PROVIDERS.iter().filter(|b| !b.key_env.is_empty()) {
            if !keys.contains(&b.key_env) {
                keys.push(b.key_env);
            }
        }
        let flat = TEMPLATE.replace('#', " ").split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains(&format!("the first of {} that is set", keys.join(", "))), "{keys:?}");
        let local = BUILTIN_PROVIDERS.iter().find(|b| b.name == descartes_providers::catalog::LOCAL_PROVIDER);
        assert_eq!(local.map(|b| b.model), Some(descartes_local::DEFAULT_MODEL));
    }
}
