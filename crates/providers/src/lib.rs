//! Model backends of Descartes, streaming first.
//!
//! * [`OpenAiProvider`]: OpenAI Chat Completions (`POST {base}/chat/completions`), also any
//!   OpenAI-compatible server (xAI, Ollama's `/v1`, vLLM, llama.cpp).
//! * [`AnthropicProvider`]: Anthropic Messages (`POST {base}/v1/messages`).
//!
//! Both implement [`descartes_core::Provider`]. The wire parsing is kept in pure state machines
//! ([`SseDecoder`], [`OpenAiStreamParser`], [`AnthropicStreamParser`], combined by
//! [`SseStreamDecoder`]) that are tested and benchmarked without HTTP.
//!
//! TLS: reqwest is compiled without a default crypto provider. The constructors install
//! rustls' `ring` provider as the process default if none is installed yet, so a binary that
//! installs its own provider at startup must ignore the "already installed" result.
//!
//! The API key is never written to an error, a log line or a `Debug` output.

mod anthropic;
mod http;
mod openai;
pub mod sse;

use std::fmt;
use std::time::Duration;

pub use anthropic::{AnthropicProvider, AnthropicStreamParser, build_anthropic_body};
pub use http::{SseEventParser, SseStreamDecoder, parse_retry_after};
pub use openai::{OpenAiProvider, OpenAiStreamParser, build_openai_body};
pub use sse::{SseDecoder, SseEvent};

/// Default base URL of OpenAI (overridden by `OPENAI_BASE_URL`).
pub const OPENAI_DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// Default base URL of Anthropic (overridden by `ANTHROPIC_BASE_URL`).
pub const ANTHROPIC_DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
/// The `anthropic-version` header sent with every Anthropic request.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// `max_tokens` sent to Anthropic when the request has none (the field is required there).
pub const ANTHROPIC_DEFAULT_MAX_TOKENS: u32 = 4096;
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default read timeout: the longest wait for the response headers, and then for each next
/// piece of the streamed body.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(300);
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
            .finish()
    }
}

fn env_nonempty(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}
