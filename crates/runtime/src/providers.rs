//! Providers of the runtime: the [`Selection`] of a provider and model (flag > environment >
//! config > default), the building of model providers and agent CLIs, their environment,
//! status and health, and the resilience (retries, fallbacks, breakers, prices) around them.
//! What is known about each kind and built-in provider is looked up in
//! [`descartes_providers::catalog`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use descartes_core::{
    BreakerFold, BreakerPolicy, Breakers, ChainEntry, EventStore, PriceTable, Provider, Resilience, RetryPolicy,
    SystemClock,
};
use descartes_providers::catalog::{self, KindInfo};
use descartes_providers::{AnyProvider, ProviderSettings};

use crate::config::BUILTIN_PROVIDERS;
use crate::wiring::{Runtime, RuntimeError};

/// The provider and model a run uses, resolved from flags, environment and config.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// The provider's name (an alias resolved).
    pub provider: String,
    /// Its kind, one of [`catalog::KIND_NAMES`].
    pub kind: String,
    /// The model (empty: an agent CLI's own default).
    pub model: String,
    /// Base URL (empty for providers that are not HTTP APIs).
    pub base_url: String,
    /// The variable holding the API key (empty: no key).
    pub api_key_env: String,
    /// `max_tokens` of each call, when configured.
    pub max_tokens: Option<u32>,
    /// The longest silence tolerated from the server (`timeout_secs`).
    pub timeout: Option<Duration>,
    /// Recognise tool calls written as text.
    pub text_tool_calls: bool,
    /// The program (and arguments) of a `command` provider, or an agent CLI's binary override.
    pub command: Vec<String>,
}

impl Selection {
    /// What is known about the provider's kind (`None` only for a kind the catalog does not
    /// have, which [`Runtime::select`] refuses).
    pub fn kind_info(&self) -> Option<&'static KindInfo> {
        catalog::kind_info(&self.kind)
    }

    /// Whether the provider is a whole agent CLI (run by its own loop) rather than a model.
    pub fn is_agent_cli(&self) -> bool {
        self.kind_info().is_some_and(KindInfo::is_agent_cli)
    }

    /// Whether the provider is the in-process model.
    pub fn is_in_process(&self) -> bool {
        self.kind_info().is_some_and(KindInfo::is_in_process)
    }
}

impl Runtime {
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
        catalog::default_provider(|var| self.env(var).is_some()).to_owned()
    }

    /// Resolves the provider and model: flag > environment > config > default (see
    /// [`Runtime::default_provider`]).
    pub fn select(&self, provider: Option<&str>, model: Option<&str>) -> Result<Selection, RuntimeError> {
        let name = provider.map(str::to_owned).unwrap_or_else(|| self.default_provider());
        let name = catalog::resolve_alias(&name).to_owned();
        let builtin = catalog::builtin_provider(&name);
        let custom = self.config.providers.get(&name);
        if builtin.is_none() && custom.is_none() {
            return Err(RuntimeError::UnknownProvider { name, known: self.provider_names().join(", ") });
        }
        let custom = custom.cloned().unwrap_or_default();
        let kind = custom
            .kind
            .clone()
            .or_else(|| builtin.map(|b| b.kind.to_owned()))
            .unwrap_or_else(|| catalog::DEFAULT_KIND.into());
        let Some(info) = catalog::kind_info(&kind) else {
            return Err(RuntimeError::UnknownKind { name, kind });
        };
        // A declared provider of a built-in kind inherits that kind's defaults.
        let defaults = builtin.or_else(|| catalog::kind_default(&kind));
        let agent_cli = info.is_agent_cli();
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
            (None, None) if !info.needs_key => String::new(),
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
        if sel.is_in_process() {
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
        let base_url = if sel.kind_info().is_some_and(|k| k.host_base_url) {
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
        if sel.kind_info().is_some_and(|k| k.user_command) {
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
    /// the variables the CLI itself needs (its API key, base URL and settings, per its kind's
    /// [`KindInfo::cli_vars`]; a `command` provider, a program the user declared, gets every
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
        let info = catalog::kind_info(kind);
        let own = info.map_or(&[][..], |k| k.cli_vars);
        let matches = |name: &str| {
            own.iter().any(|g| match g.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == *g,
            })
        };
        let user_command = info.is_some_and(|k| k.user_command);
        let provider_vars = if user_command { self.provider_variables() } else { Vec::new() };
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

    /// What a run of the local model `sel` must be told at its start: that the model cannot
    /// call tools (its chat template has no place for them), so it answers without them. Loads
    /// the model (once per process; it is needed for the run anyway). `None` when it can, or when
    /// it cannot be loaded (the run reports that).
    pub async fn local_model_notice(&self, sel: &Selection) -> Option<String> {
        let path = descartes_local::resolve_model(&sel.model, &self.places.models_dir).ok()?;
        let model = descartes_local::LocalProvider::new(path).preload().await.ok()?;
        (!model.template().supports_tools()).then(|| {
            format!(
                "the local model {} cannot use tools (its chat template has none), so it answers without them; \
                 for agent work use a tool-capable GGUF (Qwen 2.5, Llama 3.x, SmolLM3: `descartes model pull \
                 ORG/REPO`) or an API provider",
                sel.model
            )
        })
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
            let info = sel.kind_info();
            if info.is_some_and(|k| k.user_command) && sel.command.is_empty() {
                return Err(format!("no command: set providers.{}.command = [\"prog\", \"{{prompt}}\"]", sel.provider));
            }
            let program = sel
                .command
                .first()
                .cloned()
                .or_else(|| info.and_then(|k| k.program).map(str::to_owned))
                .unwrap_or_else(|| sel.kind.clone());
            return match find_program(&program) {
                Some(path) => Ok(format!("CLI {}", path.display())),
                None => Err(format!("`{program}` is not installed (not on PATH)")),
            };
        }
        if sel.is_in_process() {
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
        if sel.is_agent_cli() || sel.is_in_process() {
            self.provider_status(sel).map_err(|message| {
                RuntimeError::Provider(descartes_core::ProviderError::Config {
                    provider: sel.provider.clone(),
                    message,
                })
            })?;
            if sel.is_in_process() {
                self.build_local(sel)?;
            }
            return Ok(());
        }
        Ok(self.build_api_provider(sel)?.check().await?)
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
    use crate::config::ProviderConfig;
    use crate::places::Places;

    fn runtime(vars: &'static [(&'static str, &'static str)]) -> (tempfile::TempDir, Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let places = Places::project_in(dir.path(), None);
        let env = move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned());
        let rt = Runtime::with_places(dir.path().to_owned(), places, Arc::new(env)).unwrap();
        (dir, rt)
    }

    #[test]
    fn selection_takes_its_facts_from_the_catalog() {
        let (_dir, rt) = runtime(&[("XAI_API_KEY", "x"), ("GEMINI_API_KEY", "g")]);
        assert_eq!(rt.default_provider(), "gemini", "the first in table order whose key is set");
        let (_dir, mut rt) = runtime(&[]);
        assert_eq!(rt.default_provider(), "local");
        let local = rt.select(None, None).unwrap();
        assert!(local.is_in_process() && !local.is_agent_cli());
        assert_eq!(rt.provider_status(&local), Ok("in-process model smollm2-135m".to_owned()));
        let claude = rt.select(Some("headless"), None).unwrap();
        assert_eq!((claude.provider.as_str(), claude.model.as_str()), ("claude-code", ""));
        assert!(claude.is_agent_cli());

        let declare = |kind: Option<&str>| ProviderConfig { kind: kind.map(str::to_owned), ..Default::default() };
        rt.config.providers.insert("groq".into(), ProviderConfig { model: Some("m".into()), ..declare(None) });
        rt.config.providers.insert("gpu-box".into(), declare(Some("ollama")));
        rt.config.providers.insert("mine".into(), declare(Some("command")));
        rt.config.providers.insert("bad".into(), declare(Some("cohere")));
        let groq = rt.select(Some("groq"), None).unwrap();
        assert_eq!(
            (groq.kind.as_str(), groq.api_key_env.as_str(), groq.base_url.as_str()),
            ("openai", "GROQ_API_KEY", "https://api.openai.com/v1")
        );
        let ollama = rt.select(Some("gpu-box"), None).unwrap();
        assert_eq!((ollama.api_key_env.as_str(), ollama.model.as_str()), ("", "llama3.2"));
        let mine = rt.select(Some("mine"), None).unwrap();
        assert_eq!(mine.api_key_env, "");
        assert_eq!(
            rt.provider_status(&mine),
            Err("no command: set providers.mine.command = [\"prog\", \"{prompt}\"]".to_owned())
        );
        assert_eq!(
            rt.select(Some("bad"), None).unwrap_err().to_string(),
            "provider `bad` has an unknown kind `cohere`; use openai, openai-responses, anthropic, gemini, ollama, \
             local, claude-code, codex, gemini-cli or command"
        );
    }

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
