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
//! TLS: reqwest is compiled without a default crypto provider. The constructors install
//! rustls' `ring` provider as the process default if none is installed yet, so a binary that
//! installs its own provider at startup must ignore the "already installed" result.
//!
//! The API key is never written to an error, a log line or a `Debug` output.

mod anthropic;
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
pub use text_tools::{TextToolCall, TextToolCallFilter, parse_text_tool_calls};
pub use tokens::{Tiktoken, token_counter};

/// Default base URL of OpenAI (overridden by `OPENAI_BASE_URL`).
pub const OPENAI_DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// Default base URL of Anthropic (overridden by `ANTHROPIC_BASE_URL`).
pub const ANTHROPIC_DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
/// Default base URL of xAI (overridden by `XAI_BASE_URL`).
pub const XAI_DEFAULT_BASE_URL: &str = "https://api.x.ai/v1";
/// Default base URL of Gemini (overridden by `GOOGLE_GEMINI_BASE_URL`).
pub const GEMINI_DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";
/// Default Ollama server (overridden by `OLLAMA_HOST`, which may omit the scheme).
pub const OLLAMA_DEFAULT_HOST: &str = "http://localhost:11434";
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
    /// OpenAI with the default base URL and `OPENAI_API_KEY` as key variable.
    pub fn openai(api_key: Option<String>) -> Self {
        Self {
            name: "openai".into(),
            base_url: OPENAI_DEFAULT_BASE_URL.into(),
            api_key,
            api_key_env: "OPENAI_API_KEY".into(),
            timeout: None,
            read_timeout: None,
            text_tool_calls: false,
        }
    }

    /// Anthropic with the default base URL and `ANTHROPIC_API_KEY` as key variable.
    pub fn anthropic(api_key: Option<String>) -> Self {
        Self {
            name: "anthropic".into(),
            base_url: ANTHROPIC_DEFAULT_BASE_URL.into(),
            api_key,
            api_key_env: "ANTHROPIC_API_KEY".into(),
            timeout: None,
            read_timeout: None,
            text_tool_calls: false,
        }
    }

    /// [`ProviderSettings::openai`] with the key from `OPENAI_API_KEY` and the base URL from
    /// `OPENAI_BASE_URL` when set.
    pub fn openai_from_env() -> Self {
        let mut s = Self::openai(env_nonempty("OPENAI_API_KEY"));
        if let Some(base) = env_nonempty("OPENAI_BASE_URL") {
            s.base_url = base;
        }
        s
    }

    /// [`ProviderSettings::anthropic`] with the key from `ANTHROPIC_API_KEY` and the base URL
    /// from `ANTHROPIC_BASE_URL` when set.
    pub fn anthropic_from_env() -> Self {
        let mut s = Self::anthropic(env_nonempty("ANTHROPIC_API_KEY"));
        if let Some(base) = env_nonempty("ANTHROPIC_BASE_URL") {
            s.base_url = base;
        }
        s
    }

    /// OpenAI Responses API (same host and key as [`ProviderSettings::openai`]; the provider
    /// type, [`OpenAiResponsesProvider`], decides the wire format).
    pub fn openai_responses(api_key: Option<String>) -> Self {
        Self { name: "openai-responses".into(), ..Self::openai(api_key) }
    }

    /// [`ProviderSettings::openai_responses`] from `OPENAI_API_KEY` / `OPENAI_BASE_URL`.
    pub fn openai_responses_from_env() -> Self {
        Self { name: "openai-responses".into(), ..Self::openai_from_env() }
    }

    /// xAI (OpenAI Chat Completions format) with `XAI_API_KEY` as key variable.
    pub fn xai(api_key: Option<String>) -> Self {
        Self {
            name: "xai".into(),
            base_url: XAI_DEFAULT_BASE_URL.into(),
            api_key_env: "XAI_API_KEY".into(),
            ..Self::openai(api_key)
        }
    }

    /// [`ProviderSettings::xai`] with the key from `XAI_API_KEY` and the base URL from
    /// `XAI_BASE_URL` when set.
    pub fn xai_from_env() -> Self {
        let mut s = Self::xai(env_nonempty("XAI_API_KEY"));
        if let Some(base) = env_nonempty("XAI_BASE_URL") {
            s.base_url = base;
        }
        s
    }

    /// Gemini with `GEMINI_API_KEY` as key variable.
    pub fn gemini(api_key: Option<String>) -> Self {
        Self {
            name: "gemini".into(),
            base_url: GEMINI_DEFAULT_BASE_URL.into(),
            api_key_env: "GEMINI_API_KEY".into(),
            ..Self::openai(api_key)
        }
    }

    /// [`ProviderSettings::gemini`] with the key from `GEMINI_API_KEY` and the base URL from
    /// `GOOGLE_GEMINI_BASE_URL` when set.
    pub fn gemini_from_env() -> Self {
        let mut s = Self::gemini(env_nonempty("GEMINI_API_KEY"));
        if let Some(base) = env_nonempty("GOOGLE_GEMINI_BASE_URL") {
            s.base_url = base;
        }
        s
    }

    /// A local Ollama (no key).
    pub fn ollama() -> Self {
        Self {
            name: "ollama".into(),
            base_url: OLLAMA_DEFAULT_HOST.into(),
            api_key: None,
            api_key_env: String::new(),
            ..Self::openai(None)
        }
    }

    /// [`ProviderSettings::ollama`] at `OLLAMA_HOST` when set (`host:port`, `host`, or a URL;
    /// `0.0.0.0` means this machine).
    pub fn ollama_from_env() -> Self {
        let mut s = Self::ollama();
        if let Some(host) = env_nonempty("OLLAMA_HOST") {
            s.base_url = ollama_base_url(&host);
        }
        s
    }

    pub fn with_base_url(mut self, base_url: impl Into<String>) -> Self {
        self.base_url = base_url.into();
        self
    }

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
    OpenAi(OpenAiProvider),
    OpenAiResponses(OpenAiResponsesProvider),
    Anthropic(AnthropicProvider),
    Gemini(GeminiProvider),
    Ollama(OllamaProvider),
}

impl AnyProvider {
    /// The wire-format kinds [`AnyProvider::new`] accepts.
    pub const KINDS: &[&str] = &["openai", "openai-responses", "anthropic", "gemini", "ollama"];

    /// Builds the provider of `kind`: `openai` (Chat Completions: OpenAI, xAI and any
    /// OpenAI-compatible server; `xai` and `openai-compatible` are accepted as aliases),
    /// `openai-responses` (alias `responses`), `anthropic`, `gemini`, `ollama`. Another kind is
    /// a [`ProviderError::Config`].
    pub fn new(kind: &str, settings: ProviderSettings) -> Result<Self, ProviderError> {
        Ok(match kind {
            "openai" | "openai-compatible" | "xai" => Self::OpenAi(OpenAiProvider::new(settings)?),
            "openai-responses" | "responses" => Self::OpenAiResponses(OpenAiResponsesProvider::new(settings)?),
            "anthropic" => Self::Anthropic(AnthropicProvider::new(settings)?),
            "gemini" => Self::Gemini(GeminiProvider::new(settings)?),
            "ollama" => Self::Ollama(OllamaProvider::new(settings)?),
            other => {
                return Err(ProviderError::Config {
                    provider: settings.name,
                    message: format!("unknown provider kind {other:?} (known: {})", Self::KINDS.join(", ")),
                });
            }
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
