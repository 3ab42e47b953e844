//! What Descartes knows about providers, in one place.
//!
//! * [`KINDS`]: every provider *kind* (a wire format or a driver: `openai`, `anthropic`,
//!   `local`, `claude-code`, ...) with its facts ([`KindInfo`]): how it is driven, whether it
//!   needs a key, the program of an agent CLI and the variables it needs, its capabilities.
//! * [`BUILTIN_PROVIDERS`]: the providers users select by name without configuring them
//!   ([`Builtin`]: kind, default base URL, key and base-URL variables, default model), and
//!   [`PROVIDER_ALIASES`], other names of some of them.
//!
//! Everything else (the runtime's provider selection, the environment of agent CLIs, the
//! defaults of [`crate::ProviderSettings`], [`crate::AnyProvider::new`], the capabilities an
//! agent registers with) looks facts up here instead of matching names. Adding a provider that
//! speaks a known wire format is one row of [`BUILTIN_PROVIDERS`]; a new kind is one row of
//! [`KINDS`] and the built-in provider of the same name, plus its implementation (for a model
//! API: a [`WireFormat`] variant, its module and its arm in [`crate::AnyProvider`]). Prices stay per model (`descartes_core::cost::DEFAULT_PRICES`); the
//! kind says only whether its calls cost money at all (the `cost` capability).

/// How a provider kind is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// A model API over HTTP, driven by Descartes' own agent loop and built by
    /// [`crate::AnyProvider::new`].
    Api(WireFormat),
    /// The in-process model (`descartes_local`), driven by Descartes' own agent loop.
    InProcess,
    /// A whole agent CLI that runs its own loop (`descartes_agent_cli`); Descartes records and
    /// governs it.
    AgentCli,
}

/// The wire formats of the model APIs, one per implementation in this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// OpenAI Chat Completions ([`crate::OpenAiProvider`]): OpenAI, xAI and every
    /// OpenAI-compatible server.
    OpenAiChat,
    /// OpenAI Responses ([`crate::OpenAiResponsesProvider`]).
    OpenAiResponses,
    /// Anthropic Messages ([`crate::AnthropicProvider`]).
    Anthropic,
    /// Google Gemini ([`crate::GeminiProvider`]).
    Gemini,
    /// Ollama's native API ([`crate::OllamaProvider`]).
    Ollama,
}

/// Everything known about one provider kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    /// The kind's name, as in `[providers.NAME] kind = "..."`.
    pub name: &'static str,
    /// How it is driven (and, for a model API, its wire format).
    pub driver: Driver,
    /// Other names [`crate::AnyProvider::new`] accepts for this kind (the configuration does
    /// not: there a kind is one of [`KIND_NAMES`]).
    pub aliases: &'static [&'static str],
    /// Whether a provider of this kind needs an API key: a declared provider that names no key
    /// variable then reads `NAME_API_KEY`.
    pub needs_key: bool,
    /// Whether the base URL may be a bare host (`host`, `host:port`, as Ollama's
    /// `OLLAMA_HOST`), made a URL by [`crate::ollama_base_url`].
    pub host_base_url: bool,
    /// Whether it serves OpenAI's models: an unknown `gpt*` model is counted with `o200k_base`
    /// (see [`crate::token_counter`]).
    pub openai_models: bool,
    /// The program an agent CLI runs (`providers.NAME.command` overrides it); `None` for the
    /// other kinds and for `command`.
    pub program: Option<&'static str>,
    /// Whether the whole command line comes from `providers.NAME.command` (the `command`
    /// kind). Being the user's own program, it gets every provider variable.
    pub user_command: bool,
    /// The variables an agent CLI needs from Descartes' environment (a trailing `*` makes a
    /// prefix), given back after the environment policy left them out.
    pub cli_vars: &'static [&'static str],
    /// What an agent of this kind can do (recorded by `descartes ai register`): `tools`,
    /// `streaming`, `sandbox` (its commands run sandboxed), `cost` (its calls cost money and are
    /// priced, by the price table or the CLI's own report), `resume`.
    pub capabilities: &'static [&'static str],
}

impl KindInfo {
    /// Whether the kind is a whole agent CLI (run by its own loop) rather than a model.
    pub const fn is_agent_cli(&self) -> bool {
        matches!(self.driver, Driver::AgentCli)
    }

    /// Whether the kind is the in-process model.
    pub const fn is_in_process(&self) -> bool {
        matches!(self.driver, Driver::InProcess)
    }

    /// Whether the kind is a model API built by [`crate::AnyProvider::new`].
    pub const fn is_model_api(&self) -> bool {
        matches!(self.driver, Driver::Api(_))
    }

    /// The wire format of a model API, `None` for the other kinds.
    pub const fn wire_format(&self) -> Option<WireFormat> {
        match self.driver {
            Driver::Api(w) => Some(w),
            _ => None,
        }
    }
}

/// What the hosted model APIs can do.
const API_CAPABILITIES: &[&str] = &["tools", "streaming", "sandbox", "cost"];

/// A row with no key, no program and no capabilities.
const fn kind(name: &'static str, driver: Driver) -> KindInfo {
    KindInfo {
        name,
        driver,
        aliases: &[],
        needs_key: false,
        host_base_url: false,
        openai_models: false,
        program: None,
        user_command: false,
        cli_vars: &[],
        capabilities: &[],
    }
}

/// A model API's row: it needs a key and has the hosted APIs' capabilities.
const fn api(name: &'static str, wire: WireFormat) -> KindInfo {
    KindInfo { needs_key: true, capabilities: API_CAPABILITIES, ..kind(name, Driver::Api(wire)) }
}

/// Every provider kind. The order is the one users see (error messages, listings).
pub const KINDS: &[KindInfo] = &[
    KindInfo { aliases: &["openai-compatible", "xai"], openai_models: true, ..api("openai", WireFormat::OpenAiChat) },
    KindInfo { aliases: &["responses"], openai_models: true, ..api("openai-responses", WireFormat::OpenAiResponses) },
    api("anthropic", WireFormat::Anthropic),
    api("gemini", WireFormat::Gemini),
    // A local server: no key, no price.
    KindInfo {
        needs_key: false,
        host_base_url: true,
        capabilities: &["tools", "streaming", "sandbox"],
        ..api("ollama", WireFormat::Ollama)
    },
    KindInfo { capabilities: &["tools", "streaming", "sandbox"], ..kind("local", Driver::InProcess) },
    KindInfo {
        program: Some("claude"),
        cli_vars: &["ANTHROPIC_*", "CLAUDE_*", "DISABLE_*"],
        capabilities: &["tools", "streaming", "cost", "resume"],
        ..kind("claude-code", Driver::AgentCli)
    },
    KindInfo {
        program: Some("codex"),
        cli_vars: &["OPENAI_*", "CODEX_*"],
        capabilities: &["tools", "streaming", "sandbox", "resume"],
        ..kind("codex", Driver::AgentCli)
    },
    KindInfo {
        program: Some("gemini"),
        cli_vars: &["GEMINI_*", "GOOGLE_*"],
        capabilities: &["tools", "streaming"],
        ..kind("gemini-cli", Driver::AgentCli)
    },
    KindInfo { user_command: true, ..kind("command", Driver::AgentCli) },
];

/// The names of every kind, in [`KINDS`] order.
pub const KIND_NAMES: &[&str] = &kind_names::<{ KINDS.len() }>(false);

/// The names of the model API kinds (those [`crate::AnyProvider::new`] builds), in [`KINDS`]
/// order.
pub const API_KIND_NAMES: &[&str] = &kind_names::<{ count_api_kinds() }>(true);

/// The kind of a provider declared in configuration without one.
pub const DEFAULT_KIND: &str = "openai";

const fn count_api_kinds() -> usize {
    let (mut i, mut n) = (0, 0);
    while i < KINDS.len() {
        if KINDS[i].is_model_api() {
            n += 1;
        }
        i += 1;
    }
    n
}

/// The names of the kinds (only the model APIs when `api_only`), `N` of them.
const fn kind_names<const N: usize>(api_only: bool) -> [&'static str; N] {
    let mut out = [""; N];
    let (mut i, mut n) = (0, 0);
    while i < KINDS.len() {
        if !api_only || KINDS[i].is_model_api() {
            out[n] = KINDS[i].name;
            n += 1;
        }
        i += 1;
    }
    out
}

/// The kind called `kind` (exactly; aliases are not names here).
pub fn kind_info(kind: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.name == kind)
}

/// The wire format [`crate::AnyProvider::new`] builds for `kind`, a model API kind's name or
/// one of its aliases; `None` for other names.
pub fn wire_format(kind: &str) -> Option<WireFormat> {
    KINDS.iter().find(|k| k.name == kind || k.aliases.contains(&kind)).and_then(KindInfo::wire_format)
}

/// The kind names for people: `a, b, ... or z`.
pub fn kind_names_text() -> String {
    match KIND_NAMES.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => KIND_NAMES.join(""),
    }
}

/// A built-in provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Builtin {
    /// The name users select it by (`-p NAME`, `provider = "NAME"`).
    pub name: &'static str,
    /// Its kind, one of [`KIND_NAMES`].
    pub kind: &'static str,
    /// Default base URL (empty for providers that are not HTTP APIs).
    pub base_url: &'static str,
    /// The variable holding the API key (empty: no key).
    pub key_env: &'static str,
    /// The variable overriding the base URL (empty: none).
    pub base_env: &'static str,
    /// The model used when none is chosen (empty: the agent CLI's own default).
    pub model: &'static str,
}

const fn builtin(
    name: &'static str,
    kind: &'static str,
    base_url: &'static str,
    key_env: &'static str,
    base_env: &'static str,
    model: &'static str,
) -> Builtin {
    Builtin { name, kind, base_url, key_env, base_env, model }
}

/// The built-in providers. When no provider is chosen, the first API provider (in this order)
/// whose key is set is used, else [`LOCAL_PROVIDER`] (see [`default_provider`]).
pub const BUILTIN_PROVIDERS: &[Builtin] = &[
    builtin("openai", "openai", "https://api.openai.com/v1", "OPENAI_API_KEY", "OPENAI_BASE_URL", "gpt-4o-mini"),
    builtin(
        "anthropic",
        "anthropic",
        "https://api.anthropic.com",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "claude-sonnet-4-5",
    ),
    builtin(
        "gemini",
        "gemini",
        "https://generativelanguage.googleapis.com",
        "GEMINI_API_KEY",
        "GOOGLE_GEMINI_BASE_URL",
        "gemini-2.5-flash",
    ),
    builtin("xai", "openai", "https://api.x.ai/v1", "XAI_API_KEY", "XAI_BASE_URL", "grok-3-mini"),
    builtin(
        "openai-responses",
        "openai-responses",
        "https://api.openai.com/v1",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "gpt-4o-mini",
    ),
    builtin("ollama", "ollama", "http://localhost:11434", "", "OLLAMA_HOST", "llama3.2"),
    builtin(LOCAL_PROVIDER, "local", "", "", "", "smollm2-135m"),
    builtin("claude-code", "claude-code", "", "", "", ""),
    builtin("codex", "codex", "", "", "", ""),
    builtin("gemini-cli", "gemini-cli", "", "", "", ""),
    builtin("command", "command", "", "", "", ""),
];

/// Other names of built-in providers: (alias, provider).
pub const PROVIDER_ALIASES: &[(&str, &str)] = &[("headless", "claude-code"), ("claude", "claude-code")];

/// The provider used when none is chosen and no API key is set: the in-process model.
pub const LOCAL_PROVIDER: &str = "local";

/// The built-in provider called `name` (exactly; see [`resolve_alias`]).
pub fn builtin_provider(name: &str) -> Option<&'static Builtin> {
    BUILTIN_PROVIDERS.iter().find(|b| b.name == name)
}

/// The first built-in provider of `kind`: the defaults a declared provider of that kind
/// inherits.
pub fn kind_default(kind: &str) -> Option<&'static Builtin> {
    BUILTIN_PROVIDERS.iter().find(|b| b.kind == kind)
}

/// The provider an alias stands for, or `name` itself.
pub fn resolve_alias(name: &str) -> &str {
    PROVIDER_ALIASES.iter().find(|(a, _)| *a == name).map_or(name, |(_, n)| n)
}

/// The provider used when none is chosen: the first API provider, in [`BUILTIN_PROVIDERS`]
/// order, whose key variable `key_set` says is set, else [`LOCAL_PROVIDER`].
pub fn default_provider(key_set: impl Fn(&str) -> bool) -> &'static str {
    BUILTIN_PROVIDERS
        .iter()
        .filter(|b| !b.key_env.is_empty())
        .find(|b| key_set(b.key_env))
        .map_or(LOCAL_PROVIDER, |b| b.name)
}

/// The row of the built-in provider `name`, at compile time (a missing name fails the build).
pub(crate) const fn builtin_row(name: &str) -> Builtin {
    let mut i = 0;
    while i < BUILTIN_PROVIDERS.len() {
        if str_eq(BUILTIN_PROVIDERS[i].name, name) {
            return BUILTIN_PROVIDERS[i];
        }
        i += 1;
    }
    panic!("not a built-in provider")
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{AnyProvider, ProviderSettings};

    /// Inserts every name, failing on a duplicate.
    fn unique<'a>(seen: &mut BTreeSet<&'a str>, names: impl IntoIterator<Item = &'a str>) {
        for n in names {
            assert!(!n.is_empty(), "an empty name");
            assert!(seen.insert(n), "`{n}` is defined twice");
        }
    }

    #[test]
    fn the_table_is_consistent() {
        // No duplicate kind names or aliases.
        let mut kinds = BTreeSet::new();
        unique(&mut kinds, KINDS.iter().flat_map(|k| std::iter::once(k.name).chain(k.aliases.iter().copied())));
        // No duplicate provider names or aliases; aliases point at a built-in provider.
        let mut providers = BTreeSet::new();
        unique(&mut providers, BUILTIN_PROVIDERS.iter().map(|b| b.name));
        unique(&mut providers, PROVIDER_ALIASES.iter().map(|(a, _)| *a));
        for (alias, target) in PROVIDER_ALIASES {
            assert!(builtin_provider(target).is_some(), "alias `{alias}` of unknown `{target}`");
        }
        // Every built-in provider's kind is known, and its row fits the kind.
        for b in BUILTIN_PROVIDERS {
            let k = kind_info(b.kind).unwrap_or_else(|| panic!("{}: kind `{}` has no KindInfo", b.name, b.kind));
            assert_eq!(k.needs_key, !b.key_env.is_empty(), "{}: key variable", b.name);
            assert_eq!(k.is_model_api(), !b.base_url.is_empty(), "{}: base URL", b.name);
            assert_eq!(k.is_model_api(), !b.base_env.is_empty(), "{}: base-URL variable", b.name);
            assert_eq!(k.is_agent_cli(), b.model.is_empty(), "{}: default model", b.name);
        }
        assert!(
            builtin_provider(LOCAL_PROVIDER).is_some_and(|b| kind_info(b.kind).is_some_and(KindInfo::is_in_process))
        );
        assert!(kind_info(DEFAULT_KIND).is_some_and(KindInfo::is_model_api));
        // Every kind has a built-in provider of that name (what `-p KIND` selects).
        for k in KINDS {
            assert!(builtin_provider(k.name).is_some_and(|b| b.kind == k.name), "kind `{}`", k.name);
        }
        // Agent CLIs have a program or take the user's command; other kinds have neither.
        for k in KINDS {
            if k.is_agent_cli() {
                assert!(k.program.is_some() != k.user_command, "{}", k.name);
            } else {
                assert!(k.program.is_none() && !k.user_command && k.cli_vars.is_empty(), "{}", k.name);
            }
            assert!(k.is_model_api() || (k.aliases.is_empty() && !k.host_base_url && !k.openai_models), "{}", k.name);
        }
    }

    #[test]
    fn any_provider_builds_every_model_api_kind() {
        assert_eq!(AnyProvider::KINDS, API_KIND_NAMES);
        assert_eq!(KIND_NAMES, KINDS.iter().map(|k| k.name).collect::<Vec<_>>());
        for k in KINDS {
            for name in std::iter::once(k.name).chain(k.aliases.iter().copied()) {
                let built = AnyProvider::new(name, ProviderSettings::default());
                assert_eq!(built.is_ok(), k.is_model_api(), "{name}: {built:?}");
                assert_eq!(wire_format(name), k.wire_format(), "{name}");
            }
        }
    }

    #[test]
    fn lookups() {
        assert_eq!(resolve_alias("headless"), "claude-code");
        assert_eq!(resolve_alias("openai"), "openai");
        assert_eq!(kind_default("openai").map(|b| b.name), Some("openai"));
        assert_eq!(default_provider(|_| false), "local");
        assert_eq!(default_provider(|v| v == "XAI_API_KEY" || v == "GEMINI_API_KEY"), "gemini");
        assert_eq!(
            kind_names_text(),
            "openai, openai-responses, anthropic, gemini, ollama, local, claude-code, codex, gemini-cli or command"
        );
        assert_eq!(builtin_row("xai").base_url, "https://api.x.ai/v1");
        assert!(kind_info("xai").is_none() && wire_format("xai") == Some(WireFormat::OpenAiChat));
    }
}
