use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use descartes_core::{EventStore, Provider, RunSummary, StoreError, ToolRegistry};
use descartes_protocol::RunId;
use descartes_providers::{AnthropicProvider, OpenAiProvider, ProviderSettings};
use descartes_store::{SqliteEventStore, SqliteOptions, SyncMode};
use descartes_tools::{ToolLimits, builtin_registry};

use crate::config::{self, BUILTIN_PROVIDERS, Config, ConfigError};
use crate::locks::RunLock;
use crate::places::Places;

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
    #[error("provider `{name}` has an unknown kind `{kind}`; use `openai` or `anthropic`")]
    UnknownKind { name: String, kind: String },
    #[error(
        "no model provider is configured: set OPENAI_API_KEY (and OPENAI_BASE_URL for a compatible server) or \
         ANTHROPIC_API_KEY, or choose one with -p"
    )]
    NoProvider,
    #[error("{provider}: no API key; set {var}")]
    MissingApiKey { provider: String, var: String },
    #[error("{0}")]
    Provider(#[from] descartes_core::ProviderError),
    #[error("no run matches `{0}`; `descartes list` shows the runs")]
    RunNotFound(String),
    #[error("`{prefix}` matches several runs ({candidates}); give more of the id")]
    AmbiguousRun { prefix: String, candidates: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The stores of a place: one database serving the event log and the task queue.
#[derive(Clone)]
pub struct Stores {
    pub events: Arc<dyn EventStore>,
    pub tasks: Arc<dyn descartes_core::TaskStore>,
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
}

/// Everything a command needs: places, configuration, and factories for the rest.
pub struct Runtime {
    pub cwd: PathBuf,
    pub places: Places,
    pub config: Config,
    /// The config files that were read, in precedence order.
    pub config_files: Vec<PathBuf>,
    env: EnvFn,
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
        let (config, config_files) = config::load(&files, &*env)?;
        Ok(Self { cwd, places, config, config_files, env })
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
            return Ok(Stores { events: pg.clone(), tasks: pg, location });
        }
        let sqlite = self.open_sqlite()?;
        Ok(Stores { events: sqlite.clone(), tasks: sqlite, location: self.places.db_path.display().to_string() })
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

    /// Names of every known provider.
    pub fn provider_names(&self) -> Vec<String> {
        let mut names: Vec<String> = BUILTIN_PROVIDERS.iter().map(|p| p.0.to_owned()).collect();
        for k in self.config.providers.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
        names
    }

    /// Resolves the provider and model: flag > environment > config > first built-in provider
    /// whose API key is set.
    pub fn select(&self, provider: Option<&str>, model: Option<&str>) -> Result<Selection, RuntimeError> {
        let name = match provider.map(str::to_owned).or_else(|| self.config.provider.clone()) {
            Some(n) => n,
            None => BUILTIN_PROVIDERS
                .iter()
                .find(|p| self.env(p.3).is_some())
                .map(|p| p.0.to_owned())
                .ok_or(RuntimeError::NoProvider)?,
        };
        let builtin = BUILTIN_PROVIDERS.iter().find(|p| p.0 == name);
        let custom = self.config.providers.get(&name);
        if builtin.is_none() && custom.is_none() {
            return Err(RuntimeError::UnknownProvider { name, known: self.provider_names().join(", ") });
        }
        let custom = custom.cloned().unwrap_or_default();
        let kind = custom.kind.clone().or_else(|| builtin.map(|b| b.1.to_owned())).unwrap_or_else(|| "openai".into());
        let default_base = match kind.as_str() {
            "openai" => BUILTIN_PROVIDERS[0].2,
            "anthropic" => BUILTIN_PROVIDERS[1].2,
            _ => return Err(RuntimeError::UnknownKind { name, kind }),
        };
        let model = model
            .map(str::to_owned)
            .or_else(|| self.env("DESCARTES_MODEL"))
            .or_else(|| custom.model.clone())
            .or_else(|| self.config.model.clone())
            .or_else(|| builtin.map(|b| b.5.to_owned()))
            .ok_or_else(|| {
                RuntimeError::Provider(descartes_core::ProviderError::Config {
                    provider: name.clone(),
                    message: format!("no model configured; pass -m or set providers.{name}.model"),
                })
            })?;
        Ok(Selection {
            base_url: custom
                .base_url
                .clone()
                .or_else(|| builtin.map(|b| b.2.to_owned()))
                .unwrap_or_else(|| default_base.to_owned()),
            api_key_env: custom
                .api_key_env
                .clone()
                .or_else(|| builtin.map(|b| b.3.to_owned()))
                .unwrap_or_else(|| format!("{}_API_KEY", name.to_uppercase().replace('-', "_"))),
            max_tokens: custom.max_tokens,
            timeout: custom.timeout_secs.map(Duration::from_secs),
            provider: name,
            kind,
            model,
        })
    }

    /// Builds the provider of a selection. Fails if its API key is missing.
    pub fn build_provider(&self, sel: &Selection) -> Result<Arc<dyn Provider>, RuntimeError> {
        let custom = self.config.providers.get(&sel.provider);
        let api_key = custom.and_then(|c| c.api_key.clone()).or_else(|| self.env(&sel.api_key_env));
        if api_key.is_none() && !sel.api_key_env.is_empty() {
            return Err(RuntimeError::MissingApiKey { provider: sel.provider.clone(), var: sel.api_key_env.clone() });
        }
        let settings = ProviderSettings {
            name: sel.provider.clone(),
            base_url: sel.base_url.clone(),
            api_key,
            api_key_env: sel.api_key_env.clone(),
            timeout: None,
            read_timeout: sel.timeout,
        };
        Ok(match sel.kind.as_str() {
            "anthropic" => Arc::new(AnthropicProvider::new(settings)?),
            _ => Arc::new(OpenAiProvider::new(settings)?),
        })
    }

    /// The built-in tools with the configured limits.
    pub fn tools(&self) -> ToolRegistry {
        builtin_registry(&ToolLimits {
            shell_timeout: Duration::from_secs(self.config.tools.shell_timeout_secs.max(1)),
            max_output_bytes: self.config.tools.max_output_bytes.max(1024),
        })
    }

    /// Resolves a full or abbreviated run id.
    pub async fn resolve_run(&self, store: &dyn EventStore, prefix: &str) -> Result<RunId, RuntimeError> {
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
        if summary.status == "running" && !RunLock::is_held(&self.places.locks_dir(), summary.run_id.as_str()) {
            "interrupted".to_owned()
        } else {
            summary.status.clone()
        }
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
        let existed = places.state_dir.is_dir();
        std::fs::create_dir_all(&places.state_dir)?;
        let config_path = places.state_dir.join("config.toml");
        if !config_path.exists() {
            std::fs::write(&config_path, config::TEMPLATE)?;
        }
        let ignore = places.state_dir.join(".gitignore");
        if !ignore.exists() {
            std::fs::write(&ignore, "descartes.db*\nruns/\nspool/\n")?;
        }
        SqliteEventStore::open(&places.db_path, SqliteOptions::default())?.close();
        Ok((places, existed))
    }

    /// Removes a finished run's tool spools (its results are all in the log by then).
    pub fn clean_spool(&self, run_id: &RunId) {
        let _ = std::fs::remove_dir_all(self.places.spool_dir().join(run_id.as_str()));
    }
}
