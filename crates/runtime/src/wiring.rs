use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use descartes_core::{EventStore, RunSummary, StoreError, ToolRegistry};
use descartes_protocol::RunId;
use descartes_providers::catalog;
use descartes_store::{SqliteEventStore, SqliteOptions, SyncMode};
use descartes_tools::{Protected, Sandbox, SandboxHelper, ShellEnv, ToolLimits, builtin_registry_with_sandbox};

use crate::config::{self, BUILTIN_PROVIDERS, Config, ConfigError};
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
    #[error("provider `{name}` has an unknown kind `{kind}`; use {}", catalog::kind_names_text())]
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

    /// Resolves a full or abbreviated run id (see [`descartes_core::store::resolve_run`]).
    pub async fn resolve_run(&self, store: &dyn EventStore, prefix: &str) -> Result<RunId, RuntimeError> {
        use descartes_core::store::RunLookupError;
        descartes_core::store::resolve_run(store, prefix).await.map_err(|e| match e {
            RunLookupError::Empty => RuntimeError::EmptyRunId,
            RunLookupError::NotFound(p) => RuntimeError::RunNotFound(p),
            RunLookupError::Ambiguous { prefix, candidates } => RuntimeError::AmbiguousRun { prefix, candidates },
            RunLookupError::Store(e) => RuntimeError::Store(e),
        })
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
