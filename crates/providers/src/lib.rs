//! Model backends of Descartes, streaming first.
//!
//! * [`OpenAiProvider`]: OpenAI Chat Completions (`POST {base}/chat/completions`), also any
//!   OpenAI-compatible server (xAI, Ollama's `/v1`, vLLM, llama.cpp).
//! * [`AnthropicProvider`]: Anthropic Messages (`POST {base}/v1/messages`).
//! * [`OpenAiResponsesProvider`]: OpenAI Responses (`POST {base}/responses`).
//! * [`GeminiProvider`]: Google Gemini (`POST {base}/v1beta/models/{model}:streamGenerateContent`).
//! * [`OllamaProvider`]: Ollama's native API (`POST {host}/api/chat`, NDJSON).
//!
//! All implement [`descartes_core::Provider`] and have an inherent `check()` probe (the
//! cheapest authenticated call, for `descartes providers --check`). The wire parsing is kept in
//! pure state machines ([`SseDecoder`], [`OpenAiStreamParser`], [`AnthropicStreamParser`],
//! [`ResponsesStreamParser`], [`GeminiStreamParser`], [`OllamaStreamParser`], combined by
//! [`SseStreamDecoder`] / [`NdjsonStreamDecoder`]) that are tested and benchmarked without HTTP.
//! Tool calls that local models write as text are recognised by [`parse_text_tool_calls`].
//!
//! What is known about each provider kind and the built-in providers (default base URLs, key
//! variables, models, agent CLIs' programs, ...) is one table, [`catalog`]; the settings
//! constructors and [`AnyProvider`] take their facts from it.
//!
//! TLS: reqwest is compiled without a default crypto provider. The constructors install
//! rustls' `ring` provider as the process default if none is installed yet, so a binary that
//! installs its own provider at startup must ignore the "already installed" result.
//!
//! The API key is never written to an error, a log line or a `Debug` output.

mod anthropic;
pub mod catalog;
mod gemini;
mod http;
mod ollama;
mod openai;
mod responses;
pub mod sse;
mod text_tools;
mod tokens;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use catalog::{Builtin, WireFormat, builtin_row};
use descartes_core::{ModelRequest, ModelStream, Provider, ProviderError};

pub use anthropic::{AnthropicProvider, AnthropicStreamParser, build_anthropic_body};
pub use gemini::{GeminiProvider, GeminiStreamParser, build_gemini_body, clean_gemini_schema};
pub use http::{
    BodyDecoder, LineParser, NdjsonStreamDecoder, SseEventParser, SseStreamDecoder, parse_retry_after,
    retry_after_from_body,
};
pub use ollama::{OllamaProvider, OllamaStreamParser, build_ollama_body};
pub use openai::{OpenAiProvider, OpenAiStreamParser, build_openai_body};
pub use responses::{OpenAiResponsesProvider, ResponsesStreamParser, build_responses_body};
pub use sse::{SseDecoder, SseEvent};
pub use text_tools::{TextToolCall, TextToolCallFilter, filter_text_tool_calls, parse_text_tool_calls};
pub use tokens::{Tiktoken, token_counter};

// The built-in providers the settings constructors are for (rows of the catalog).
const OPENAI: Builtin = builtin_row("openai");
const OPENAI_RESPONSES: Builtin = builtin_row("openai-responses");
const ANTHROPIC: Builtin = builtin_row("anthropic");
const XAI: Builtin = builtin_row("xai");
const GEMINI: Builtin = builtin_row("gemini");
const OLLAMA: Builtin = builtin_row("ollama");

/// Default base URL of OpenAI (overridden by `OPENAI_BASE_URL`).
pub const OPENAI_DEFAULT_BASE_URL: &str = OPENAI.base_url;
/// Default base URL of Anthropic (overridden by `ANTHROPIC_BASE_URL`).
pub const ANTHROPIC_DEFAULT_BASE_URL: &str = ANTHROPIC.base_url;
/// Default base URL of xAI (overridden by `XAI_BASE_URL`).
pub const XAI_DEFAULT_BASE_URL: &str = XAI.base_url;
/// Default base URL of Gemini (overridden by `GOOGLE_GEMINI_BASE_URL`).
pub const GEMINI_DEFAULT_BASE_URL: &str = GEMINI.base_url;
/// Default Ollama server (overridden by `OLLAMA_HOST`, which may omit the scheme).
pub const OLLAMA_DEFAULT_HOST: &str = OLLAMA.base_url;
/// The `anthropic-version` header sent with every Anthropic request.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// `max_tokens` sent to Anthropic when the request has none (the field is required there).
pub const ANTHROPIC_DEFAULT_MAX_TOKENS: u32 = 4096;
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default idle timeout: the longest wait for the response headers (the first byte), and then
/// for each next piece of the streamed body (`timeout_secs` in `[providers.NAME]` changes it). A
/// server silent that long fails the attempt with a retryable error that says so.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Error bodies are read up to this many bytes.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// How to reach one provider.
///
/// The key is optional at construction so that a provider can be built (for `config show`,
/// listing, ...) without it: a missing key is reported by [`descartes_core::Provider::stream`]
/// as [`ProviderError::MissingApiKey`](descartes_core::ProviderError::MissingApiKey), naming
/// `api_key_env`. Servers that need no key (a local Ollama or vLLM): set `api_key_env` to the
/// empty string and `api_key` to `None`; then no auth header is sent.
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderSettings {
    /// The name users select the provider by (`openai`, `anthropic`, `xai`, ...). Used in errors.
    pub name: String,
    /// Base URL; a trailing `/` is ignored.
    pub base_url: String,
    /// The API key itself.
    pub api_key: Option<String>,
    /// The environment variable the key comes from (for the "missing key" message).
    pub api_key_env: String,
    /// Connect timeout (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub timeout: Option<Duration>,
    /// Longest silence tolerated: waiting for the response headers, then between two pieces of
    /// the streamed body (default [`DEFAULT_READ_TIMEOUT`]).
    pub read_timeout: Option<Duration>,
    /// Recognise tool calls the model writes as text (see [`parse_text_tool_calls`]) when it
    /// made no native one. Used by the OpenAI-compatible provider (for local servers whose
    /// models do not use the tool-call channel); the Ollama provider always does it.
    pub text_tool_calls: bool,
}

impl Default for ProviderSettings {
    /// OpenAI's settings without a key.
    fn default() -> Self {
        Self::openai(None)
    }
}

impl ProviderSettings {
    /// A built-in provider (a row of [`catalog::BUILTIN_PROVIDERS`]): its name, default base
    /// URL and key variable, with `api_key`.
    pub fn for_builtin(builtin: &Builtin, api_key: Option<String>) -> Self {
        Self {
            name: builtin.name.into(),
            base_url: builtin.base_url.into(),
            api_key,
            api_key_env: builtin.key_env.into(),
            timeout: None,
            read_timeout: None,
            text_tool_calls: false,
        }
    }

    /// [`ProviderSettings::for_builtin`] with the key from its key variable and the base URL
    /// from its base-URL variable when set (a bare host, for a kind whose base URL may be one,
    /// made a URL by [`ollama_base_url`]).
    pub fn for_builtin_from_env(builtin: &Builtin) -> Self {
        let api_key = Some(builtin.key_env).filter(|v| !v.is_empty()).and_then(env_nonempty);
        let mut s = Self::for_builtin(builtin, api_key);
        if let Some(base) = Some(builtin.base_env).filter(|v| !v.is_empty()).and_then(env_nonempty) {
            let host = catalog::kind_info(builtin.kind).is_some_and(|k| k.host_base_url);
            s.base_url = if host { ollama_base_url(&base) } else { base };
        }
        s
    }

    /// OpenAI with the default base URL and `OPENAI_API_KEY` as key variable.
    pub fn openai(api_key: Option<String>) -> Self {
        Self::for_builtin(&OPENAI, api_key)
    }

    /// Anthropic with the default base URL and `ANTHROPIC_API_KEY` as key variable.
    pub fn anthropic(api_key: Option<String>) -> Self {
        Self::for_builtin(&ANTHROPIC, api_key)
    }

    /// [`ProviderSettings::openai`] with the key from `OPENAI_API_KEY` and the base URL from
    /// `OPENAI_BASE_URL` when set.
    pub fn openai_from_env() -> Self {
        Self::for_builtin_from_env(&OPENAI)
    }

    /// [`ProviderSettings::anthropic`] with the key from `ANTHROPIC_API_KEY` and the base URL
    /// from `ANTHROPIC_BASE_URL` when set.
    pub fn anthropic_from_env() -> Self {
        Self::for_builtin_from_env(&ANTHROPIC)
    }

    /// OpenAI Responses API (same host and key as [`ProviderSettings::openai`]; the provider
    /// type, [`OpenAiResponsesProvider`], decides the wire format).
    pub fn openai_responses(api_key: Option<String>) -> Self {
        Self::for_builtin(&OPENAI_RESPONSES, api_key)
    }

    /// [`ProviderSettings::openai_responses`] from `OPENAI_API_KEY` / `OPENAI_BASE_URL`.
    pub fn openai_responses_from_env() -> Self {
        Self::for_builtin_from_env(&OPENAI_RESPONSES)
    }

    /// xAI (OpenAI Chat Completions format) with `XAI_API_KEY` as key variable.
    pub fn xai(api_key: Option<String>) -> Self {
        Self::for_builtin(&XAI, api_key)
    }

    /// [`ProviderSettings::xai`] with the key from `XAI_API_KEY` and the base URL from
    /// `XAI_BASE_URL` when set.
    pub fn xai_from_env() -> Self {
        Self::for_builtin_from_env(&XAI)
    }

    /// Gemini with `GEMINI_API_KEY` as key variable.
    pub fn gemini(api_key: Option<String>) -> Self {
        Self::for_builtin(&GEMINI, api_key)
    }

    /// [`ProviderSettings::gemini`] with the key from `GEMINI_API_KEY` and the base URL from
    /// `GOOGLE_GEMINI_BASE_URL` when set.
    pub fn gemini_from_env() -> Self {
        Self::for_builtin_from_env(&GEMINI)
    }

    /// A local Ollama (no key).
    pub fn ollama() -> Self {
        Self::for_builtin(&OLLAMA, None)
    }

    /// [`ProviderSettings::ollama`] at `OLLAMA_HOST` when set (`host:port`, `host`, or a URL;
    /// `0.0.0.0` means this machine).
    pub fn ollama_from_env() -> Self {
        Self::for_builtin_from_env(&OLLAMA)
    }

    /// The same settings with another base URL.
    pub fn with_base_url(mut self, base_url: impl Into<String>) -> Self {
        self.base_url = base_url.into();
        self
    }

    /// The same settings with an API key.
    pub fn with_api_key(mut self, api_key: impl Into<String>) -> Self {
        self.api_key = Some(api_key.into());
        self
    }
}

impl fmt::Debug for ProviderSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderSettings")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("api_key_env", &self.api_key_env)
            .field("timeout", &self.timeout)
            .field("read_timeout", &self.read_timeout)
            .field("text_tool_calls", &self.text_tool_calls)
            .finish()
    }
}

/// Any provider type, chosen by its wire-format kind: for the runtime's configuration
/// (`[providers.NAME] kind = "..."`) and `descartes providers --check`.
#[derive(Debug, Clone)]
pub enum AnyProvider {
    /// [`WireFormat::OpenAiChat`].
    OpenAi(OpenAiProvider),
    /// [`WireFormat::OpenAiResponses`].
    OpenAiResponses(OpenAiResponsesProvider),
    /// [`WireFormat::Anthropic`].
    Anthropic(AnthropicProvider),
    /// [`WireFormat::Gemini`].
    Gemini(GeminiProvider),
    /// [`WireFormat::Ollama`].
    Ollama(OllamaProvider),
}

impl AnyProvider {
    /// The wire-format kinds [`AnyProvider::new`] accepts (the model API kinds of
    /// [`catalog::KINDS`]).
    pub const KINDS: &[&str] = catalog::API_KIND_NAMES;

    /// Builds the provider of `kind`, a model API kind of [`catalog::KINDS`] or one of its
    /// aliases: `openai` (Chat Completions: OpenAI, xAI and any OpenAI-compatible server; `xai`
    /// and `openai-compatible` are accepted as aliases), `openai-responses` (alias `responses`),
    /// `anthropic`, `gemini`, `ollama`. Another kind is a [`ProviderError::Config`].
    pub fn new(kind: &str, settings: ProviderSettings) -> Result<Self, ProviderError> {
        let Some(wire) = catalog::wire_format(kind) else {
            return Err(ProviderError::Config {
                provider: settings.name,
                message: format!("unknown provider kind {kind:?} (known: {})", Self::KINDS.join(", ")),
            });
        };
        Ok(match wire {
            WireFormat::OpenAiChat => Self::OpenAi(OpenAiProvider::new(settings)?),
            WireFormat::OpenAiResponses => Self::OpenAiResponses(OpenAiResponsesProvider::new(settings)?),
            WireFormat::Anthropic => Self::Anthropic(AnthropicProvider::new(settings)?),
            WireFormat::Gemini => Self::Gemini(GeminiProvider::new(settings)?),
            WireFormat::Ollama => Self::Ollama(OllamaProvider::new(settings)?),
        })
    }

    /// The provider's `check()` probe (its cheapest authenticated call).
    pub async fn check(&self) -> Result<(), ProviderError> {
        match self {
            Self::OpenAi(p) => p.check().await,
            Self::OpenAiResponses(p) => p.check().await,
            Self::Anthropic(p) => p.check().await,
            Self::Gemini(p) => p.check().await,
            Self::Ollama(p) => p.check().await,
        }
    }

    /// As a shared [`Provider`].
    pub fn into_provider(self) -> Arc<dyn Provider> {
        match self {
            Self::OpenAi(p) => Arc::new(p),
            Self::OpenAiResponses(p) => Arc::new(p),
            Self::Anthropic(p) => Arc::new(p),
            Self::Gemini(p) => Arc::new(p),
            Self::Ollama(p) => Arc::new(p),
        }
    }
}

#[async_trait::async_trait]
impl Provider for AnyProvider {
    fn name(&self) -> &str {
        match self {
            Self::OpenAi(p) => p.name(),
            Self::OpenAiResponses(p) => p.name(),
            Self::Anthropic(p) => p.name(),
            Self::Gemini(p) => p.name(),
            Self::Ollama(p) => p.name(),
        }
    }

    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError> {
        match self {
            Self::OpenAi(p) => p.stream(request).await,
            Self::OpenAiResponses(p) => p.stream(request).await,
            Self::Anthropic(p) => p.stream(request).await,
            Self::Gemini(p) => p.stream(request).await,
            Self::Ollama(p) => p.stream(request).await,
        }
    }
}

/// `OLLAMA_HOST` as a base URL: adds `http://` when there is no scheme, port 11434 when there is
/// none, and maps the listen-everywhere addresses to localhost.
pub fn ollama_base_url(host: &str) -> String {
    let host = host.trim().trim_end_matches('/');
    let (scheme, rest) = match host.split_once("://") {
        Some((scheme, rest)) => (scheme.to_owned(), rest),
        None => ("http".to_owned(), host),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let has_port = match authority.rfind(':') {
        Some(i) => !authority.ends_with(']') && authority[i + 1..].chars().all(|c| c.is_ascii_digit()),
        None => false,
    };
    let authority = if authority.is_empty() {
        "localhost:11434".to_owned()
    } else if has_port {
        authority.to_owned()
    } else {
        let default_port = if scheme == "https" { 443 } else { 11434 };
        format!("{authority}:{default_port}")
    };
    let authority = authority.replacen("0.0.0.0:", "localhost:", 1).replacen("[::]:", "localhost:", 1);
    format!("{scheme}://{authority}{path}")
}

fn env_nonempty(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ollama_hosts() {
        assert_eq!(ollama_base_url("127.0.0.1:11500"), "http://127.0.0.1:11500");
        assert_eq!(ollama_base_url("gpu-box"), "http://gpu-box:11434");
        assert_eq!(ollama_base_url("0.0.0.0"), "http://localhost:11434");
        assert_eq!(ollama_base_url("https://ollama.example.com/"), "https://ollama.example.com:443");
        assert_eq!(ollama_base_url("http://[::1]:8080"), "http://[::1]:8080");
        assert_eq!(ollama_base_url("http://h:1/prefix"), "http://h:1/prefix");
    }

    #[test]
    fn constructors_and_debug() {
        let x = ProviderSettings::xai(Some("xai-SECRET".into()));
        assert_eq!(
            (x.name.as_str(), x.base_url.as_str(), x.api_key_env.as_str()),
            ("xai", XAI_DEFAULT_BASE_URL, "XAI_API_KEY")
        );
        assert!(!format!("{x:?}").contains("SECRET"));
        let g = ProviderSettings::gemini(None);
        assert_eq!(g.api_key_env, "GEMINI_API_KEY");
        let o = ProviderSettings::ollama();
        assert!(o.api_key_env.is_empty() && o.api_key.is_none());
        assert!(!ProviderSettings::default().text_tool_calls);
    }

    #[test]
    fn any_provider_kinds() {
        for kind in AnyProvider::KINDS {
            let p = AnyProvider::new(kind, ProviderSettings::default()).unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert_eq!(p.name(), "openai");
        }
        assert!(matches!(AnyProvider::new("ollama", ProviderSettings::ollama()), Ok(AnyProvider::Ollama(_))));
        assert!(matches!(
            AnyProvider::new("cohere", ProviderSettings::default()),
            Err(ProviderError::Config { message, .. }) if message.contains("known: openai")
        ));
    }
}
