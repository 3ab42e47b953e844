use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use descartes_core::{
    BreakerFold, BreakerPolicy, Breakers, ChainEntry, EventStore, PriceTable, Provider, Resilience, RetryPolicy,
    RunSummary, StoreError, SystemClock, ToolRegistry,
};
use descartes_protocol::RunId;
use descartes_providers::{AnyProvider, ProviderSettings};
use descartes_store::{SqliteEventStore, SqliteOptions, SyncMode};
use descartes_tools::{Protected, Sandbox, SandboxHelper, ShellEnv, ToolLimits, builtin_registry_with_sandbox};

use crate::config::{self, BUILTIN_PROVIDERS, Config, ConfigError, PROVIDER_ALIASES, PROVIDER_KINDS};
use crate::locks::RunLock;
use crate::places::Places;

/// The tools the guardrail rules cover: every tool that writes its path, Descartes' and the
/// agent CLIs' (their permission requests pass the same decision).
/// The agent CLIs' files (under the home directory) that decide what they run without asking.
const AGENT_CLI_CONTROL_FILES: &[&str] = &[
    ".codex/rules",
    ".codex/config.toml",
    ".gemini/policies",
    ".gemini/settings.json",
    ".claude/settings.json",
    ".cache/descartes",
];

/// The file-reading tools, Descartes' and the agent CLIs'.
const READ_TOOLS: &str = "{read_file,Read,NotebookRead}";

const GUARDED_TOOLS: &str = "{write_file,edit_file,apply_patch,Write,Edit,MultiEdit,NotebookEdit}";

/// The variables each agent CLI needs from Descartes' environment (prefixes end in `*`),
/// given back after the environment policy left them out.
pub const AGENT_CLI_VARS: &[(&str, &[&str])] = &[
    ("claude-code", &["ANTHROPIC_*", "CLAUDE_*", "DISABLE_*"]),
    ("codex", &["OPENAI_*", "CODEX_*"]),
    ("gemini-cli", &["GEMINI_*", "GOOGLE_*"]),
];

/// Reads an environment variable.
pub type EnvFn = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Errors of the runtime. None is retryable by itself; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unknown provider `{name}`; known providers: {known}")]
    UnknownProvider { name: String, known: String },
    #[error(
        "provider `{name}` has an unknown kind `{kind}`; use openai, openai-responses, anthropic, gemini, ollama, \
         local, claude-code, codex, gemini-cli or command"
    )]
    UnknownKind { name: String, kind: String },
    #[error("{provider}: no API key; set {var}")]
    MissingApiKey { provider: String, var: String },
    #[error(transparent)]
    Provider(#[from] descartes_core::ProviderError),
    #[error("no run matches `{0}`; `descartes list` shows the runs")]
    RunNotFound(String),
    #[error("the run id is empty; give a run id or a unique prefix of one (`descartes list` shows the runs)")]
    EmptyRunId,
    #[error("`{prefix}` matches several runs ({candidates}); give more of the id")]
    AmbiguousRun { prefix: String, candidates: String },
    #[error(
        "guardrail files were changed during a run: {0}; no agent runs until you have reviewed them and run \
         `descartes config trust`"
    )]
    GuardrailsChanged(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The stores of a place: one database serving the event log and the task queue.
#[derive(Clone)]
pub struct Stores {
    pub events: Arc<dyn EventStore>,
    pub tasks: Arc<dyn descartes_core::TaskStore>,
    pub agents: Arc<dyn descartes_core::routing::AgentStore>,
    pub audit: Arc<dyn descartes_core::audit::AuditStore>,
    /// Where they are (a file path, or a PostgreSQL URL without password).
    pub location: String,
}

/// The provider and model a run uses, resolved from flags, environment and config.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub provider: String,
    pub kind: String,
    pub model: String,
    pub base_url: String,
    pub api_key_env: String,
    pub max_tokens: Option<u32>,
    pub timeout: Option<Duration>,
    /// Recognise tool calls written as text.
    pub text_tool_calls: bool,
    /// The program (and arguments) of a `command` provider, or an agent CLI's binary override.
    pub command: Vec<String>,
}

impl Selection {
    /// Whether the provider is a whole agent CLI (run by its own loop) rather than a model.
    pub fn is_agent_cli(&self) -> bool {
        matches!(self.kind.as_str(), "claude-code" | "codex" | "gemini-cli" | "command")
    }
}

/// Everything a command needs: places, configuration, and factories for the rest.
pub struct Runtime {
    pub cwd: PathBuf,
    pub places: Places,
    pub config: Config,
    /// The config files that were read, in precedence order.
    pub config_files: Vec<PathBuf>,
    pub(crate) env: EnvFn,
    /// `--sandbox MODE` on the command line: wins over config; `full-access` from here (and
    /// only from here) also lifts the protection of Descartes' own files.
    pub sandbox_flag: Option<descartes_tools::SandboxMode>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("cwd", &self.cwd).field("places", &self.places).finish()
    }
}

impl Runtime {
    /// Loads places and configuration for a command run in `cwd`, with the process environment.
    pub fn load(cwd: PathBuf) -> Result<Self, RuntimeError> {
        Self::load_with_env(cwd, Arc::new(|k: &str| std::env::var(k).ok()))
    }

    pub fn load_with_env(cwd: PathBuf, env: EnvFn) -> Result<Self, RuntimeError> {
        let places = Places::discover(&cwd, &*env);
        Self::with_places(cwd, places, env)
    }

    pub fn with_places(cwd: PathBuf, places: Places, env: EnvFn) -> Result<Self, RuntimeError> {
        let files: Vec<PathBuf> = places.user_config.iter().chain(places.project_config.iter()).cloned().collect();
        let (config, config_files) = config::load(&files, places.user_config.as_deref(), &*env)?;
        register_secrets(&config, &*env);
        Ok(Self { cwd, places, config, config_files, env, sandbox_flag: None })
    }

    pub fn env(&self, key: &str) -> Option<String> {
        (self.env)(key).filter(|v| !v.is_empty())
    }

    /// Opens the stores: the PostgreSQL database named by `DESCARTES_DATABASE_URL`
    /// (`postgres://...`: how several machines share the work), else this place's SQLite file
    /// (created and migrated if needed). One database serves the event log and the task queue.
    pub async fn open_stores(&self) -> Result<Stores, RuntimeError> {
        if let Some(url) = self.env("DESCARTES_DATABASE_URL") {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(RuntimeError::Config(ConfigError::Env {
                    var: "DESCARTES_DATABASE_URL".into(),
                    message: "expected a postgres:// URL (unset it to use the local SQLite database)".into(),
                }));
            }
            // DESCARTES_SYNC=normal: commits do not wait for the WAL flush (as SQLite's NORMAL).
            let options = descartes_store_pg::PgOptions {
                synchronous_commit: self.env("DESCARTES_SYNC").as_deref() != Some("normal"),
                ..Default::default()
            };
            let pg = tokio::task::spawn_blocking(move || descartes_store_pg::PgStore::connect_with(&url, options))
                .await
                .map_err(|e| StoreError::Io { message: format!("cannot connect: {e}"), busy: false })??;
            let location = pg.target().to_owned();
            let pg = Arc::new(pg);
            return Ok(Stores {
                events: redacting(pg.clone()),
                tasks: pg.clone(),
                agents: pg.clone(),
                audit: pg,
                location,
            });
        }
        let sqlite = self.open_sqlite()?;
        Ok(Stores {
            events: redacting(sqlite.clone()),
            tasks: sqlite.clone(),
            agents: sqlite.clone(),
            audit: sqlite,
            location: self.places.db_path.display().to_string(),
        })
    }

    /// The event log (see [`Runtime::open_stores`]).
    pub async fn open_store(&self) -> Result<Arc<dyn EventStore>, RuntimeError> {
        Ok(self.open_stores().await?.events)
    }

    /// Where the stores are, for people: the PostgreSQL URL (without password) or the file.
    pub fn database_location(&self) -> String {
        match self.env("DESCARTES_DATABASE_URL") {
            Some(url) => descartes_store_pg::redact_url(&url),
            None => self.places.db_path.display().to_string(),
        }
    }

    /// This place's SQLite database.
    pub fn open_sqlite(&self) -> Result<Arc<SqliteEventStore>, RuntimeError> {
        // DESCARTES_SYNC=normal trades power-loss durability for speed (tests, scratch work).
        let sync = match self.env("DESCARTES_SYNC").as_deref() {
            Some("normal") => SyncMode::Normal,
            _ => SyncMode::Full,
        };
        Ok(Arc::new(SqliteEventStore::open(&self.places.db_path, SqliteOptions { sync })?))
    }

    /// Names of every known provider: the built-in ones, then those declared in config.
    pub fn provider_names(&self) -> Vec<String> {
        let mut names: Vec<String> = BUILTIN_PROVIDERS.iter().map(|p| p.name.to_owned()).collect();
        for k in self.config.providers.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
        names
    }

    /// The provider used when none is chosen: config (or `DESCARTES_PROVIDER`), else the first
    /// API provider whose key is set, else the in-process local model.
    pub fn default_provider(&self) -> String {
        if let Some(p) = &self.config.provider {
            return p.clone();
        }
        BUILTIN_PROVIDERS
            .iter()
            .filter(|b| !b.key_env.is_empty())
            .find(|b| self.env(b.key_env).is_some())
            .map(|b| b.name.to_owned())
            .unwrap_or_else(|| "local".to_owned())
    }

    /// Resolves the provider and model: flag > environment > config > default (see
    /// [`Runtime::default_provider`]).
    pub fn select(&self, provider: Option<&str>, model: Option<&str>) -> Result<Selection, RuntimeError> {
        let name = provider.map(str::to_owned).unwrap_or_else(|| self.default_provider());
        let name = PROVIDER_ALIASES.iter().find(|(a, _)| *a == name).map(|(_, n)| (*n).to_owned()).unwrap_or(name);
        let builtin = BUILTIN_PROVIDERS.iter().find(|p| p.name == name);
        let custom = self.config.providers.get(&name);
        if builtin.is_none() && custom.is_none() {
            return Err(RuntimeError::UnknownProvider { name, known: self.provider_names().join(", ") });
        }
        let custom = custom.cloned().unwrap_or_default();
        let kind =
            custom.kind.clone().or_else(|| builtin.map(|b| b.kind.to_owned())).unwrap_or_else(|| "openai".into());
        if !PROVIDER_KINDS.contains(&kind.as_str()) {
            return Err(RuntimeError::UnknownKind { name, kind });
        }
        // A declared provider of a built-in kind inherits that kind's defaults.
        let kind_default = BUILTIN_PROVIDERS.iter().find(|b| b.kind == kind);
        let defaults = builtin.or(kind_default);
        let agent_cli = matches!(kind.as_str(), "claude-code" | "codex" | "gemini-cli" | "command");
        let model = model
            .map(str::to_owned)
            .or_else(|| self.env("DESCARTES_MODEL"))
            .or_else(|| custom.model.clone())
            .or_else(|| custom.models.first().cloned())
            .or_else(|| if agent_cli || builtin.is_none() { None } else { self.config.model.clone() })
            .or_else(|| defaults.map(|b| b.model.to_owned()).filter(|m| !m.is_empty()));
        let model = match model {
            Some(m) => m,
            // Agent CLIs use their own default model when none is given.
            None if agent_cli => String::new(),
            None => {
                return Err(RuntimeError::Provider(descartes_core::ProviderError::Config {
                    provider: name.clone(),
                    message: format!("no model configured; pass -m or set providers.{name}.model"),
                }));
            }
        };
        let api_key_env = match (&custom.api_key_env, builtin) {
            (Some(v), _) => v.clone(),
            (None, Some(b)) => b.key_env.to_owned(),
            (None, None) if agent_cli || matches!(kind.as_str(), "ollama" | "local") => String::new(),
            (None, None) => format!("{}_API_KEY", name.to_uppercase().replace('-', "_")),
        };
        Ok(Selection {
            base_url: custom.base_url.clone().or_else(|| defaults.map(|b| b.base_url.to_owned())).unwrap_or_default(),
            api_key_env,
            max_tokens: custom.max_tokens,
            timeout: custom.timeout_secs.map(Duration::from_secs),
            text_tool_calls: custom.text_tool_calls.unwrap_or(false),
            command: custom.command.clone(),
            provider: name,
            kind,
            model,
        })
    }

    /// Builds the provider of a selection. Fails if its API key is missing, and for agent CLIs
    /// (they are run by [`Runtime::build_agent_cli`] instead).
    pub fn build_provider(&self, sel: &Selection) -> Result<Arc<dyn Provider>, RuntimeError> {
        if sel.kind == "local" {
            return self.build_local(sel);
        }
        Ok(self.build_api_provider(sel)?.into_provider())
    }

    fn build_api_provider(&self, sel: &Selection) -> Result<AnyProvider, RuntimeError> {
        let custom = self.config.providers.get(&sel.provider);
        let api_key = custom.and_then(|c| c.api_key.clone()).or_else(|| self.env(&sel.api_key_env));
        if api_key.is_none() && !sel.api_key_env.is_empty() {
            return Err(RuntimeError::MissingApiKey { provider: sel.provider.clone(), var: sel.api_key_env.clone() });
        }
        let base_url = if sel.kind == "ollama" {
            descartes_providers::ollama_base_url(&sel.base_url)
        } else {
            sel.base_url.clone()
        };
        let settings = ProviderSettings {
            name: sel.provider.clone(),
            base_url,
            api_key,
            api_key_env: sel.api_key_env.clone(),
            timeout: None,
            read_timeout: sel.timeout,
            text_tool_calls: sel.text_tool_calls,
        };
        if sel.is_agent_cli() {
            return Err(RuntimeError::Provider(descartes_core::ProviderError::Config {
                provider: sel.provider.clone(),
                message: format!("`{}` is an agent CLI, not a model API", sel.kind),
            }));
        }
        Ok(AnyProvider::new(&sel.kind, settings)?)
    }

    /// The agent CLI of a selection (`claude-code`, `codex`, `gemini-cli`, `command`).
    /// `providers.NAME.command` overrides the CLI's binary (and, for `command`, is the whole
    /// command line, with `{prompt}` where the prompt goes, else it goes to stdin).
    pub fn build_agent_cli(
        &self,
        sel: &Selection,
    ) -> Result<Arc<dyn descartes_core::external::AgentCli>, RuntimeError> {
        let config_error = |message: String| {
            RuntimeError::Provider(descartes_core::ProviderError::Config { provider: sel.provider.clone(), message })
        };
        let mut options = descartes_agent_cli::CliOptions {
            env: self.agent_cli_env(&sel.kind),
            clear_env: true,
            // The CLI's own tools run in its process, outside Descartes' sandbox: they must not
            // read the tokens (one would let a run answer its own asks through the API).
            wrapper: self.sandbox().hiding_prefix(),
            ..Default::default()
        };
        if sel.kind == "command" {
            let Some((program, args)) = sel.command.split_first() else {
                return Err(config_error(format!(
                    "a `command` provider needs its command line: set providers.{}.command = [\"prog\", \"{{prompt}}\"]",
                    sel.provider
                )));
            };
            return Ok(Arc::new(descartes_agent_cli::CommandCli::new(program.clone(), args.to_vec(), options)));
        }
        if let Some((program, args)) = sel.command.split_first() {
            options.program = Some(PathBuf::from(program));
            options.extra_args = args.to_vec();
        }
        descartes_agent_cli::backend(&sel.kind, options)
            .ok_or_else(|| config_error(format!("`{}` is not an agent CLI", sel.kind)))
    }

    /// The environment of an agent CLI of `kind`: the environment policy's (no secrets), plus
    /// the variables the CLI itself needs (its API key, base URL and settings, per
    /// [`AGENT_CLI_VARS`]; a `command` provider, a program the user declared, gets every
    /// provider variable). The CLI's own tools see what the CLI sees: its own key stays visible
    /// to them, no other secret does.
    pub fn agent_cli_env(&self, kind: &str) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        self.agent_cli_env_from(kind, std::env::vars_os().collect())
    }

    /// [`Runtime::agent_cli_env`] built from `vars` instead of the process's environment.
    pub fn agent_cli_env_from(
        &self,
        kind: &str,
        vars: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    ) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        let mut env = self.shell_env().build(vars.iter().cloned());
        let own = AGENT_CLI_VARS.iter().find(|(k, _)| *k == kind).map(|(_, globs)| *globs).unwrap_or(&[]);
        let matches = |name: &str| {
            own.iter().any(|g| match g.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == *g,
            })
        };
        let provider_vars = if kind == "command" { self.provider_variables() } else { Vec::new() };
        for (k, v) in vars {
            let Some(name) = k.to_str() else { continue };
            if (matches(name) || provider_vars.iter().any(|p| p == name)) && !env.iter().any(|(e, _)| *e == k) {
                env.push((k.clone(), v));
            }
        }
        env
    }

    /// The in-process local model (see `descartes model pull`): `sel.model` is a name in the
    /// models directory or a path to a GGUF file.
    fn build_local(&self, sel: &Selection) -> Result<Arc<dyn Provider>, RuntimeError> {
        let path = descartes_local::resolve_model(&sel.model, &self.places.models_dir).map_err(|e| {
            RuntimeError::Provider(descartes_core::ProviderError::Config {
                provider: sel.provider.clone(),
                message: e.to_string(),
            })
        })?;
        let options = descartes_local::LocalOptions { max_tokens: sel.max_tokens.unwrap_or(512), ..Default::default() };
        Ok(Arc::new(descartes_local::LocalProvider::with_options(path, options)))
    }

    /// Whether the local model `name` is in the models directory.
    pub fn local_model_present(&self, name: &str) -> bool {
        descartes_local::resolve_model(name, &self.places.models_dir).is_ok()
    }

    /// Retries, fallbacks, circuit breakers (seeded from the log's recent model calls), prices
    /// and the token counter for a run whose primary is `primary`. `fallbacks` are provider
    /// names (from `--fallback`, then config); a fallback whose key is missing is skipped with a
    /// warning rather than failing the run.
    pub async fn resilience(
        &self,
        store: &dyn EventStore,
        primary: &Selection,
        fallbacks: &[String],
    ) -> Result<(Resilience, Vec<String>), RuntimeError> {
        let r = &self.config.retry;
        let retry = RetryPolicy {
            max_retries: r.max_retries,
            base_delay: Duration::from_millis(r.base_delay_ms.max(1)),
            max_delay: Duration::from_secs(r.max_delay_secs.max(1)),
            park_after: Duration::from_secs(r.park_after_secs),
            max_park: Duration::from_secs(r.max_park_secs),
        };
        let policy = BreakerPolicy {
            failure_threshold: r.breaker_failures.max(1),
            open_for: Duration::from_secs(r.breaker_open_secs),
        };
        let fold = self.provider_health(store, policy).await?;
        let mut prices = PriceTable::with_defaults();
        for (model, price) in &self.config.prices {
            prices.set(model.clone(), *price);
        }
        let mut names: Vec<String> = Vec::new();
        for n in fallbacks.iter().chain(self.config.fallback.iter()) {
            if n != &primary.provider && !names.contains(n) {
                names.push(n.clone());
            }
        }
        let mut chain = Vec::new();
        let mut warnings = Vec::new();
        for name in names {
            let sel = self.select(Some(&name), None)?;
            match self.build_provider(&sel) {
                Ok(provider) => chain.push(ChainEntry { provider, model: sel.model }),
                Err(e) => warnings.push(format!("fallback `{name}` is not usable: {e}")),
            }
        }
        Ok((
            Resilience {
                retry,
                fallbacks: chain,
                breakers: Arc::new(Breakers::from_fold(policy, &fold)),
                prices: Arc::new(prices),
                counter: descartes_providers::token_counter(&primary.kind, &primary.model),
                clock: Arc::new(SystemClock),
            },
            warnings,
        ))
    }

    /// Circuit breakers and call statistics of every provider, folded from the most recent
    /// model call events in the log (the last 20,000 events).
    pub async fn provider_health(
        &self,
        store: &dyn EventStore,
        policy: BreakerPolicy,
    ) -> Result<BreakerFold, RuntimeError> {
        let last = store.last_seq().await?;
        let mut fold = BreakerFold::new(policy);
        let mut after = last.saturating_sub(20_000);
        loop {
            let events = store.read_all(after, 5_000).await?;
            let Some(tail) = events.last() else { break };
            after = tail.seq;
            for e in &events {
                fold.apply(e.at, &e.data);
            }
        }
        Ok(fold)
    }

    /// Whether a provider can be used as configured: `Ok(what it uses)` or `Err(what is missing)`.
    pub fn provider_status(&self, sel: &Selection) -> Result<String, String> {
        if sel.is_agent_cli() {
            let program = sel.command.first().cloned().unwrap_or_else(|| match sel.kind.as_str() {
                "claude-code" => "claude".into(),
                "gemini-cli" => "gemini".into(),
                other => other.to_owned(),
            });
            if sel.kind == "command" && sel.command.is_empty() {
                return Err(format!("no command: set providers.{}.command = [\"prog\", \"{{prompt}}\"]", sel.provider));
            }
            return match find_program(&program) {
                Some(path) => Ok(format!("CLI {}", path.display())),
                None => Err(format!("`{program}` is not installed (not on PATH)")),
            };
        }
        if sel.kind == "local" {
            return Ok(format!("in-process model {}", sel.model));
        }
        if sel.api_key_env.is_empty() {
            return Ok(format!("no key needed ({})", sel.base_url));
        }
        let configured = self.config.providers.get(&sel.provider).is_some_and(|c| c.api_key.is_some());
        if configured || self.env(&sel.api_key_env).is_some() {
            Ok(format!("key from {}", if configured { "config" } else { &sel.api_key_env }))
        } else {
            Err(format!("no key: set {}", sel.api_key_env))
        }
    }

    /// Probes a provider with its cheapest authenticated call.
    pub async fn check_provider(&self, sel: &Selection) -> Result<(), RuntimeError> {
        if sel.is_agent_cli() || sel.kind == "local" {
            self.provider_status(sel).map_err(|message| {
                RuntimeError::Provider(descartes_core::ProviderError::Config {
                    provider: sel.provider.clone(),
                    message,
                })
            })?;
            if sel.kind == "local" {
                self.build_local(sel)?;
            }
            return Ok(());
        }
        Ok(self.build_api_provider(sel)?.check().await?)
    }

    /// The built-in tools with the configured limits.
    pub fn tools(&self) -> ToolRegistry {
        let limits = ToolLimits {
            shell_timeout: Duration::from_secs(self.config.tools.shell_timeout_secs.max(1)),
            max_output_bytes: self.config.tools.max_output_bytes.max(1024),
            roots: self.tool_roots(),
            protected: self.protected(),
            ..ToolLimits::default()
        };
        builtin_registry_with_sandbox(&limits, self.sandbox())
    }

    /// `--sandbox MODE` from the command line.
    pub fn set_sandbox_flag(&mut self, mode: descartes_tools::SandboxMode) {
        self.sandbox_flag = Some(mode);
        self.config.sandbox.mode = mode;
    }

    /// Descartes' own files, which no tool or sandboxed command may change: the state
    /// directory (database, spool, evidence, worktree metadata, daemon files; the worktrees
    /// themselves stay writable), the config files and the user's policy directory, plus
    /// `.descartes`, `.ai`, `.git/hooks` and `.git/config` in every workspace root. Nothing is
    /// protected only under `--sandbox full-access`.
    pub fn protected(&self) -> Protected {
        if self.sandbox_flag == Some(descartes_tools::SandboxMode::FullAccess) {
            return Protected::none();
        }
        let state = &self.places.state_dir;
        let mut absolute = vec![state.clone(), state.join("worktrees").join(".meta")];
        absolute.extend(self.places.user_config.iter().cloned());
        absolute.extend(self.places.user_config.as_ref().and_then(|u| u.parent()).map(|d| d.join("policy.yaml")));
        absolute.extend(self.places.project_config.iter().cloned());
        if let crate::Mode::Project { root } = &self.places.mode {
            absolute.extend(descartes_tools::PROTECTED_NAMES.iter().map(|n| root.join(n)));
        }
        // The agent CLIs' own permission settings: a rule written there would run calls
        // without asking Descartes.
        if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
            absolute.extend(AGENT_CLI_CONTROL_FILES.iter().map(|f| home.join(f)));
        }
        Protected {
            absolute,
            writable_within: vec![state.join("worktrees")],
            // The tokens of the daemon's socket and of the API: a command that read one could
            // answer its own permission asks.
            hidden: vec![state.join(crate::daemon::TOKEN_FILE), state.join(crate::serve::SERVER_TOKEN_FILE)],
            disabled: false,
        }
    }

    /// The variables that carry provider secrets: every provider's key and base-URL variable
    /// (built in and configured) and the database URL.
    pub fn provider_variables(&self) -> Vec<String> {
        let mut names: Vec<String> = BUILTIN_PROVIDERS
            .iter()
            .flat_map(|b| [b.key_env, b.base_env])
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect();
        names.extend(self.config.providers.values().filter_map(|p| p.api_key_env.clone()));
        names.push("DESCARTES_DATABASE_URL".into());
        names.sort();
        names.dedup();
        names
    }

    /// The permission rules of a run: the `[permissions]` of the config files, and the
    /// guardrail rules that deny every file-writing tool (Descartes' and the agent CLIs':
    /// `Write`, `Edit`, ...) the protected paths, before any other policy decides.
    pub fn permission_policy(&self) -> Result<descartes_core::policy::Policy, descartes_core::policy::RuleError> {
        use descartes_core::policy::{Action, Rule, RuleSpec, Source};
        let policy = self.config.policy(self.places.user_config.as_deref())?;
        let protected = self.protected();
        if protected.disabled {
            return Ok(policy);
        }
        let rule = |action: Action, path: String| {
            let spec = RuleSpec { tool: GUARDED_TOOLS.to_owned(), pattern: Some(path) };
            Rule::new(action, Source::Guardrail, spec)
        };
        let mut rules = Vec::new();
        for p in &protected.absolute {
            rules.push(rule(Action::Deny, p.display().to_string())?);
        }
        for name in descartes_tools::PROTECTED_NAMES {
            rules.push(rule(Action::Deny, (*name).to_owned())?);
        }
        for p in &protected.writable_within {
            rules.push(rule(Action::Allow, p.display().to_string())?);
        }
        // The tokens: no tool reads them (a shell command finds `/dev/null` there).
        for p in &protected.hidden {
            let spec = RuleSpec { tool: READ_TOOLS.to_owned(), pattern: Some(p.display().to_string()) };
            rules.push(Rule::new(Action::Deny, Source::Guardrail, spec)?);
        }
        // An agent CLI's request for more than its sandbox allows (Codex's retry without the
        // sandbox, network access, writes outside it): only `--sandbox full-access` grants it.
        let escalation = RuleSpec { tool: descartes_agent_cli::codex::ESCALATION_TOOL.to_owned(), pattern: None };
        rules.push(Rule::new(Action::Deny, Source::Guardrail, escalation)?);
        Ok(policy.with_rules(rules))
    }

    /// The environment policy of commands: `[shell]`, with every provider's key and base-URL
    /// variables (and those configured) excluded.
    pub fn shell_env(&self) -> ShellEnv {
        ShellEnv::new(&self.config.shell, &self.provider_variables()).unwrap_or_else(|e| {
            tracing::warn!("[shell] {e}; commands get no environment variables");
            ShellEnv::new(
                &descartes_tools::EnvPolicy { env: descartes_tools::EnvInherit::None, ..Default::default() },
                &[],
            )
            .unwrap_or_default()
        })
    }

    /// `[tools] roots`, absolute: relative ones from the project root (or the working directory
    /// in direct mode), `~/` from the home directory.
    pub fn tool_roots(&self) -> Vec<PathBuf> {
        let base = match &self.places.mode {
            crate::Mode::Project { root } => root.clone(),
            crate::Mode::Direct => std::env::current_dir().unwrap_or_default(),
        };
        let home = (self.env)("HOME").map(PathBuf::from);
        self.config
            .tools
            .roots
            .iter()
            .map(|r| match (r.strip_prefix("~"), &home) {
                (Ok(rest), Some(home)) => home.join(rest),
                _ if r.is_absolute() => r.clone(),
                _ => base.join(r),
            })
            .collect()
    }

    /// The sandbox of `shell` commands, as configured. The `descartes` binary is its own helper
    /// (the hidden `__sandbox` subcommand); other programs look for `descartes-sandbox`.
    pub fn sandbox(&self) -> Arc<Sandbox> {
        let policy = self.config.sandbox.clone();
        let exe = std::env::current_exe().ok();
        let is_descartes = exe.as_ref().and_then(|e| e.file_name()).is_some_and(|n| n == "descartes");
        let sandbox = match exe.filter(|_| is_descartes) {
            Some(exe) => Sandbox::with_helper(policy, SandboxHelper::subcommand(exe, "__sandbox")),
            None => Sandbox::new(policy),
        };
        Arc::new(sandbox.protecting(self.protected()).with_env(self.shell_env()))
    }

    /// Resolves a full or abbreviated run id.
    pub async fn resolve_run(&self, store: &dyn EventStore, prefix: &str) -> Result<RunId, RuntimeError> {
        if prefix.trim().is_empty() {
            // An empty prefix would match every run, and pick the only one.
            return Err(RuntimeError::EmptyRunId);
        }
        let mut found = store.find_runs(prefix).await?;
        if let Some(exact) = found.iter().find(|r| r.as_str() == prefix) {
            return Ok(exact.clone());
        }
        match found.len() {
            0 => Err(RuntimeError::RunNotFound(prefix.to_owned())),
            1 => Ok(found.remove(0)),
            _ => Err(RuntimeError::AmbiguousRun {
                prefix: prefix.to_owned(),
                candidates: found.iter().take(5).map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
            }),
        }
    }

    /// A run's status for users: `running` in the log but held by no process is `interrupted`.
    pub fn run_status(&self, summary: &RunSummary) -> String {
        crate::serve::run_status(&self.places.locks_dir(), summary)
    }

    /// Takes the lock of a run this process is about to drive.
    pub fn lock_run(&self, run_id: &RunId) -> Result<RunLock, RuntimeError> {
        Ok(RunLock::acquire(&self.places.locks_dir(), run_id.as_str())?)
    }

    /// Makes (or completes) a project in `dir`: `.descartes/` with a commented `config.toml`, a
    /// `.gitignore` for the state files, and a migrated database. Never overwrites anything.
    /// Returns the places and whether the project existed before.
    pub fn init_project(dir: &std::path::Path) -> Result<(Places, bool), RuntimeError> {
        let places = Places::project_in(dir, None);
        if places.state_dir.exists() && !places.state_dir.is_dir() {
            return Err(RuntimeError::Io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a directory; move it away, then run `descartes init` again",
                    places.state_dir.display()
                ),
            )));
        }
        let existed = places.state_dir.is_dir();
        std::fs::create_dir_all(&places.state_dir)?;
        let config_path = places.state_dir.join("config.toml");
        if !config_path.exists() {
            std::fs::write(&config_path, config::TEMPLATE)?;
        }
        let ignore = places.state_dir.join(".gitignore");
        if !ignore.exists() {
            std::fs::write(&ignore, "descartes.db*\nruns/\nspool/\nworktrees/\nevidence/\n")?;
        }
        SqliteEventStore::open(&places.db_path, SqliteOptions::default())?.close();
        Ok((places, existed))
    }

    /// Removes a finished run's tool spools (its results are all in the log by then).
    pub fn clean_spool(&self, run_id: &RunId) {
        let _ = std::fs::remove_dir_all(self.places.spool_dir().join(run_id.as_str()));
    }

    /// Removes the spools and lock files left by runs that completed but whose process died
    /// before cleaning up (killed just after `run_completed`). Returns how many runs it swept.
    pub async fn sweep_completed(&self, store: &dyn EventStore) -> usize {
        let names = |dir: PathBuf, suffix: &'static str| {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(move |e| e.file_name().to_str().and_then(|n| n.strip_suffix(suffix)).map(str::to_owned))
                .collect::<Vec<_>>()
        };
        let mut left: Vec<String> = names(self.places.locks_dir(), ".lock");
        left.extend(names(self.places.spool_dir(), ""));
        left.retain(|n| !n.starts_with('.'));
        if left.is_empty() {
            return 0;
        }
        let Ok(runs) = store.list_runs().await else { return 0 };
        let mut swept = 0;
        for run in runs.iter().filter(|r| r.status == "completed" && left.iter().any(|n| n == r.run_id.as_str())) {
            if RunLock::is_held(&self.places.locks_dir(), run.run_id.as_str()) {
                continue;
            }
            self.clean_spool(&run.run_id);
            let _ = std::fs::remove_file(self.places.locks_dir().join(format!("{}.lock", run.run_id)));
            swept += 1;
        }
        swept
    }
}

/// Tells the one redactor (`descartes_core::redact`) every secret the configuration knows: the
/// providers' keys (configured or from their variables), credentials in base URLs and in the
/// database URL.
fn register_secrets(config: &Config, env: &dyn Fn(&str) -> Option<String>) {
    use descartes_core::redact;
    for b in BUILTIN_PROVIDERS {
        if !b.key_env.is_empty()
            && let Some(v) = env(b.key_env)
        {
            redact::register(&v);
        }
        if !b.base_env.is_empty()
            && let Some(v) = env(b.base_env)
        {
            redact::register_url(&v);
        }
    }
    for p in config.providers.values() {
        if let Some(k) = &p.api_key {
            redact::register(k);
        }
        if let Some(v) = p.api_key_env.as_deref().and_then(env) {
            redact::register(&v);
        }
        if let Some(u) = &p.base_url {
            redact::register_url(u);
        }
    }
    if let Some(u) = env("DESCARTES_DATABASE_URL") {
        redact::register_url(&u);
    }
}

/// The event log with every appended event redacted, when there is a secret to redact.
fn redacting(store: Arc<dyn EventStore>) -> Arc<dyn EventStore> {
    if descartes_core::redact::active() { Arc::new(descartes_core::redact::RedactingStore(store)) } else { store }
}

/// The provider variables (keys, base URLs, the database URL) set in the runtime's environment:
/// what a child `descartes` needs and the environment policy keeps from other commands.
pub fn provider_env(rt: &Runtime) -> Vec<(String, String)> {
    rt.provider_variables().into_iter().filter_map(|n| rt.env(&n).map(|v| (n, v))).collect()
}

/// The path of a program on `PATH` (or the path itself when it contains a `/`).
pub fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &std::path::Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(program)).find(|p| executable(p))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    #[test]
    fn an_agent_cli_gets_its_own_variables_and_no_other_secret() {
        let dir = tempfile::tempdir().unwrap();
        let places = Places::project_in(dir.path(), None);
        let rt = Runtime::with_places(dir.path().to_owned(), places, Arc::new(|_: &str| None)).unwrap();
        let vars: Vec<(OsString, OsString)> = [
            ("PATH", "/bin"),
            ("HOME", "/h"),
            ("ANTHROPIC_API_KEY", "sk-ant"),
            ("ANTHROPIC_BASE_URL", "http://a"),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
            ("OPENAI_API_KEY", "sk-openai"),
            ("GITHUB_TOKEN", "ghp"),
            ("AWS_SECRET_ACCESS_KEY", "aws"),
            ("CODEX_HOME", "/c"),
        ]
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect();
        let names = |kind: &str| -> Vec<String> {
            let mut n: Vec<String> =
                rt.agent_cli_env_from(kind, vars.clone()).into_iter().map(|(k, _)| k.into_string().unwrap()).collect();
            n.sort();
            n
        };
        // CODEX_HOME is no secret: the environment policy passes it to everyone.
        assert_eq!(
            names("claude-code"),
            [
                "ANTHROPIC_API_KEY",
                "ANTHROPIC_BASE_URL",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
                "CODEX_HOME",
                "HOME",
                "PATH"
            ]
        );
        assert_eq!(
            names("codex"),
            ["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "CODEX_HOME", "HOME", "OPENAI_API_KEY", "PATH"]
        );
        // A `command` provider (a program the user declared) gets every provider variable.
        assert_eq!(
            names("command"),
            [
                "ANTHROPIC_API_KEY",
                "ANTHROPIC_BASE_URL",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
                "CODEX_HOME",
                "HOME",
                "OPENAI_API_KEY",
                "PATH"
            ]
        );
    }
}
