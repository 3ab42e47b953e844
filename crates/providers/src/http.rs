//! HTTP plumbing shared by the providers: client, request sending, error mapping, and the
//! adapter from a streamed body to a [`ModelStream`].

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use descartes_core::{ModelStream, ProviderError, StreamEvent};
use futures::Stream;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use crate::sse::{SseDecoder, SseEvent};
use crate::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, MAX_ERROR_BODY_BYTES, ProviderSettings};

/// The HTTP client of these timeouts (connect, read), built once per process and shared by
/// every provider that uses them: building one reads and parses the system's CA certificates
/// (milliseconds), which a long-lived server would otherwise pay for every run; sharing also
/// keeps connections to a provider alive from one run to the next.
fn shared_client(timeouts: (Duration, Duration)) -> Result<reqwest::Client, reqwest::Error> {
    type Clients = std::sync::Mutex<Vec<((Duration, Duration), reqwest::Client)>>;
    static CLIENTS: std::sync::OnceLock<Clients> = std::sync::OnceLock::new();
    let clients = CLIENTS.get_or_init(Default::default);
    let mut clients = clients.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = clients.iter().find(|(t, _)| *t == timeouts) {
        return Ok(c.clone());
    }
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Fails only when another thread installed one meanwhile, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let client = reqwest::Client::builder()
        .connect_timeout(timeouts.0)
        .read_timeout(timeouts.1)
        .user_agent(concat!("descartes/", env!("CARGO_PKG_VERSION")))
        .build()?;
    clients.push((timeouts, client.clone()));
    Ok(client)
}

/// Settings checked and normalised, plus the HTTP client shared per process (see [`shared_client`]).
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub settings: ProviderSettings,
    pub client: reqwest::Client,
}

impl Endpoint {
    pub fn new(mut settings: ProviderSettings) -> Result<Self, ProviderError> {
        let trimmed = settings.base_url.trim().trim_end_matches('/').to_owned();
        settings.base_url = trimmed;
        let config_error = |message: String| ProviderError::Config { provider: settings.name.clone(), message };
        match reqwest::Url::parse(&settings.base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            Ok(_) => return Err(config_error(format!("base URL {:?} is not an http(s) URL", settings.base_url))),
            Err(e) => return Err(config_error(format!("invalid base URL {:?}: {e}", settings.base_url))),
        }
        if let Some(key) = &settings.api_key
            && HeaderValue::from_str(key).is_err()
        {
            return Err(config_error("the API key contains characters not allowed in an HTTP header".into()));
        }
        let timeouts = (
            settings.timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            settings.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT),
        );
        let client = shared_client(timeouts)
            .map_err(|e| config_error(format!("cannot build the HTTP client: {}", error_chain(&e))))?;
        Ok(Self { settings, client })
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The API key, or `None` for keyless servers (empty `api_key_env`).
    pub fn api_key(&self) -> Result<Option<&str>, ProviderError> {
        match self.settings.api_key.as_deref().map(str::trim) {
            Some(key) if !key.is_empty() => Ok(Some(key)),
            _ if self.settings.api_key_env.is_empty() => Ok(None),
            _ => Err(ProviderError::MissingApiKey {
                provider: self.settings.name.clone(),
                var: self.settings.api_key_env.clone(),
            }),
        }
    }

    /// The auth header of `auth` with the key (none for keyless servers), or the missing-key
    /// error.
    pub fn auth_headers(&self, auth: Auth) -> Result<HeaderMap, ProviderError> {
        let mut headers = HeaderMap::new();
        if let Some(key) = self.api_key()? {
            let name = self.name();
            match auth {
                Auth::Bearer => {
                    insert_header(&mut headers, "authorization", header_value(name, &format!("Bearer {key}"))?)
                }
                Auth::Header(header) => insert_header(&mut headers, header, header_value(name, key)?),
            }
        }
        Ok(headers)
    }

    /// POSTs a JSON body and returns the response if its status is 2xx; otherwise the mapped
    /// error. `headers` must already hold the auth header. Expects an event stream.
    pub async fn post(&self, url: &str, headers: HeaderMap, body: Vec<u8>) -> Result<reqwest::Response, ProviderError> {
        self.post_stream(url, headers, body, "text/event-stream").await
    }

    /// [`post`](Self::post) expecting the stream type `accept` (`text/event-stream`,
    /// `application/x-ndjson`). A 200 `application/json` body is an error either way.
    pub async fn post_stream(
        &self,
        url: &str,
        headers: HeaderMap,
        body: Vec<u8>,
        accept: &'static str,
    ) -> Result<reqwest::Response, ProviderError> {
        let name = self.name();
        tracing::debug!(provider = name, url, bytes = body.len(), "model request");
        let response = self
            .client
            .post(url)
            .headers(headers)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, accept)
            .body(body)
            .send()
            .await
            .map_err(|e| request_error(name, &e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(http_error(name, response).await);
        }
        let is_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("application/json"));
        if is_json {
            // Some compatible servers answer errors (or ignore `stream`) with a 200 JSON body.
            let body = read_bounded(response).await;
            let (message, _code) = parse_error_body(&body);
            let detail = message.unwrap_or_else(|| excerpt(body.trim(), 200));
            return Err(ProviderError::Protocol {
                provider: name.to_owned(),
                message: format!("expected an event stream, got a JSON body: {detail}"),
            });
        }
        Ok(response)
    }

    /// GETs `url` and parses the JSON answer (a probe or a listing: `GET /models`, ...).
    pub async fn get_json(&self, url: &str, headers: HeaderMap) -> Result<Value, ProviderError> {
        let name = self.name();
        let response = self
            .client
            .get(url)
            .headers(headers)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| request_error(name, &e))?;
        if !response.status().is_success() {
            return Err(http_error(name, response).await);
        }
        let body = read_bounded_to(response, MAX_LISTING_BYTES).await;
        serde_json::from_str(&body).map_err(|e| ProviderError::Protocol {
            provider: name.to_owned(),
            message: format!("invalid JSON answer ({e}): {}", excerpt(body.trim(), 200)),
        })
    }

    /// Serialises a request body.
    pub fn encode(&self, body: &Value) -> Result<Vec<u8>, ProviderError> {
        serde_json::to_vec(body).map_err(|e| ProviderError::Config {
            provider: self.name().to_owned(),
            message: format!("cannot encode the request: {e}"),
        })
    }
}

/// How a provider sends its key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Auth {
    /// `Authorization: Bearer KEY`.
    Bearer,
    /// `NAME: KEY` (`x-api-key`, `x-goog-api-key`).
    Header(&'static str),
}

/// Model listings are read up to this many bytes.
const MAX_LISTING_BYTES: usize = 8 * 1024 * 1024;

pub(crate) fn header_value(name: &str, value: &str) -> Result<HeaderValue, ProviderError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| ProviderError::Config {
        provider: name.to_owned(),
        message: "a header value contains characters not allowed in HTTP".into(),
    })?;
    v.set_sensitive(true);
    Ok(v)
}

pub(crate) fn insert_header(headers: &mut HeaderMap, name: &'static str, value: HeaderValue) {
    headers.insert(HeaderName::from_static(name), value);
}

/// Maps a reqwest error that happened before or while receiving a response.
pub(crate) fn request_error(provider: &str, e: &reqwest::Error) -> ProviderError {
    if e.is_builder() {
        return ProviderError::Config { provider: provider.to_owned(), message: error_chain(e) };
    }
    let message = if e.is_timeout() {
        format!(
            "timed out: no answer from the server within the connect or idle timeout; `timeout_secs` in \
             [providers.{provider}] changes it ({})",
            error_chain(e)
        )
    } else {
        error_chain(e)
    };
    ProviderError::Network { provider: provider.to_owned(), message }
}

/// The error and its sources, joined with ": ".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Builds [`ProviderError::Http`] from a non-2xx response: reads the body (bounded), extracts
/// the provider's error message and code, and the retry delay headers.
pub(crate) async fn http_error(provider: &str, response: reqwest::Response) -> ProviderError {
    let status = response.status();
    let header_delay = parse_retry_after(response.headers());
    let text = read_bounded(response).await;
    let retry_after = header_delay.or_else(|| retry_after_from_body(&text));
    let (message, code) = parse_error_body(&text);
    let message = message.unwrap_or_else(|| {
        let raw = excerpt(text.trim(), 500);
        if raw.is_empty() { status.canonical_reason().unwrap_or("error").to_owned() } else { raw }
    });
    tracing::debug!(provider, status = status.as_u16(), ?code, ?retry_after, "model request failed");
    ProviderError::Http { provider: provider.to_owned(), status: status.as_u16(), message, code, retry_after }
}

/// The body as text, at most [`MAX_ERROR_BODY_BYTES`]; a broken body gives what came.
async fn read_bounded(response: reqwest::Response) -> String {
    read_bounded_to(response, MAX_ERROR_BODY_BYTES).await
}

async fn read_bounded_to(mut response: reqwest::Response, max: usize) -> String {
    let mut body = Vec::new();
    while body.len() < max {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(max);
    String::from_utf8_lossy(&body).into_owned()
}

/// A retry delay written in an error body: a Google `RetryInfo` detail (`"retryDelay": "24s"`),
/// else a sentence such as "Please retry in 24.4s." / "try again in 20ms" (Gemini, OpenAI).
pub fn retry_after_from_body(text: &str) -> Option<Duration> {
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        let error = match &value {
            Value::Array(items) => items.first().and_then(|v| v.get("error")),
            other => other.get("error"),
        };
        let details = error.and_then(|e| e.get("details")).and_then(Value::as_array);
        for detail in details.into_iter().flatten() {
            if let Some(delay) = detail.get("retryDelay").and_then(Value::as_str)
                && let Some(d) = parse_duration_text(delay.trim())
            {
                return Some(d);
            }
        }
    }
    let lower = text.to_ascii_lowercase();
    for marker in ["retry in ", "try again in ", "retry after "] {
        let mut rest = lower.as_str();
        while let Some(pos) = rest.find(marker) {
            rest = &rest[pos + marker.len()..];
            let token: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '.').take(24).collect();
            if let Some(d) = parse_duration_text(token.trim_end_matches('.')) {
                return Some(d);
            }
        }
    }
    None
}

/// `24s`, `24.4s`, `20ms`, `1.5 seconds`-less forms: a number followed by `ms`, `s`, `m` or `h`.
fn parse_duration_text(token: &str) -> Option<Duration> {
    let split = token.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = token.split_at(split);
    let n: f64 = number.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "sec" | "secs" | "seconds" => n,
        "m" | "min" | "mins" | "minutes" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    if secs.is_finite() && secs >= 0.0 { Duration::try_from_secs_f64(secs).ok() } else { None }
}

/// Extracts `(message, code)` from an error body of either provider:
/// OpenAI `{"error":{"message","type","code"}}`, Anthropic `{"type":"error","error":{"type","message"}}`,
/// and the usual variants of compatible servers (`[{"error":...}]`, `{"error":"text"}`,
/// `{"message":...}`, `{"detail":...}`). `code` is the error's `code`, else its `type`.
pub(crate) fn parse_error_body(text: &str) -> (Option<String>, Option<String>) {
    let Ok(mut value) = serde_json::from_str::<Value>(text) else {
        return (None, None);
    };
    if let Value::Array(items) = &mut value {
        match items.first_mut() {
            Some(first) => value = first.take(),
            None => return (None, None),
        }
    }
    let as_code = |v: Option<&Value>| match v {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    match value.get("error") {
        Some(Value::Object(err)) => {
            let message = err.get("message").and_then(Value::as_str).map(|m| excerpt(m, 2000));
            let code = as_code(err.get("code")).or_else(|| as_code(err.get("type")));
            (message, code)
        }
        Some(Value::String(s)) => (Some(excerpt(s, 2000)), as_code(value.get("code"))),
        _ => {
            let message = value.get("message").or_else(|| value.get("detail")).map(|m| match m {
                Value::String(s) => excerpt(s, 2000),
                other => excerpt(&other.to_string(), 2000),
            });
            (message, as_code(value.get("code")))
        }
    }
}

/// At most `max` characters of `s` (cut at a char boundary), with "..." when cut.
pub(crate) fn excerpt(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((cut, _)) => format!("{}...", &s[..cut]),
    }
}

/// The delay a server asks for before retrying: `retry-after-ms` (milliseconds), else
/// `retry-after` (seconds, possibly fractional, or an HTTP date). Dates in the past give zero.
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers.get("retry-after-ms").and_then(|v| v.to_str().ok())
        && let Ok(ms) = ms.trim().parse::<f64>()
        && ms.is_finite()
        && ms >= 0.0
    {
        return Duration::try_from_secs_f64(ms / 1000.0).ok();
    }
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return if secs.is_finite() && secs >= 0.0 { Duration::try_from_secs_f64(secs).ok() } else { None };
    }
    let at = parse_http_date(value)?;
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form servers use today.
fn parse_http_date(s: &str) -> Option<SystemTime> {
    let mut parts = s.split_whitespace();
    let _weekday = parts.next()?;
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':');
    let (h, m, sec): (u64, u64, u64) =
        (hms.next()?.parse().ok()?, hms.next()?.parse().ok()?, hms.next()?.parse().ok()?);
    if parts.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 || year < 1970 {
        return None;
    }
    // Days from civil (H. Hinnant), for the proleptic Gregorian calendar.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + sec;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// A parser from SSE events to [`StreamEvent`]s ([`OpenAiStreamParser`](crate::OpenAiStreamParser),
/// [`AnthropicStreamParser`](crate::AnthropicStreamParser)).
pub trait SseEventParser {
    /// Handles one SSE event, appending what it means to `out`.
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError>;
    /// The body ended (cleanly or not): emits the final events or the "ended early" error.
    fn on_end(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError>;
    /// `Stop` was emitted; nothing more is expected.
    fn is_done(&self) -> bool;
    /// The provider name, for errors.
    fn provider(&self) -> &str;
}

/// Bytes in, [`StreamEvent`]s out: an [`SseDecoder`] feeding a [`SseEventParser`]. Pure (no
/// IO), so it can be benchmarked and tested on recorded streams.
#[derive(Debug)]
pub struct SseStreamDecoder<P> {
    decoder: SseDecoder,
    parser: P,
    events: Vec<SseEvent>,
}

impl<P: SseEventParser> SseStreamDecoder<P> {
    pub fn new(parser: P) -> Self {
        Self { decoder: SseDecoder::new(), parser, events: Vec::new() }
    }

    pub fn parser(&self) -> &P {
        &self.parser
    }

    pub fn is_done(&self) -> bool {
        self.parser.is_done()
    }

    /// Feeds bytes from the body. On error, `out` holds the events decoded before it.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if self.parser.is_done() {
            return Ok(());
        }
        let decoded = self.decoder.feed(bytes, &mut self.events);
        self.drain(out)?;
        decoded.map_err(|e| ProviderError::Protocol {
            provider: self.parser.provider().to_owned(),
            message: e.to_string(),
        })
    }

    /// The body ended cleanly.
    pub fn finish(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if self.parser.is_done() {
            return Ok(());
        }
        let decoded = self.decoder.finish(&mut self.events);
        self.drain(out)?;
        decoded.map_err(|e| ProviderError::Protocol {
            provider: self.parser.provider().to_owned(),
            message: e.to_string(),
        })?;
        if self.parser.is_done() {
            return Ok(());
        }
        self.parser.on_end(out)
    }

    /// The body broke: a partial line is dropped, the parser decides whether the response is
    /// complete enough.
    pub fn abort(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if self.parser.is_done() {
            return Ok(());
        }
        self.parser.on_end(out)
    }

    fn drain(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        let mut result = Ok(());
        for event in self.events.drain(..) {
            if self.parser.is_done() {
                break;
            }
            if let Err(e) = self.parser.on_event(&event, out) {
                result = Err(e);
                break;
            }
        }
        self.events.clear();
        result
    }
}

/// A pure bytes → [`StreamEvent`]s decoder ([`SseStreamDecoder`], [`NdjsonStreamDecoder`]).
pub trait BodyDecoder {
    /// Feeds bytes from the body. On error, `out` holds the events decoded before it.
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<StreamEvent>) -> Result<(), ProviderError>;
    /// The body ended cleanly.
    fn finish(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError>;
    /// The body broke.
    fn abort(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError>;
    /// `Stop` was emitted.
    fn is_done(&self) -> bool;
    /// The provider name, for errors.
    fn provider(&self) -> &str;
}

impl<P: SseEventParser> BodyDecoder for SseStreamDecoder<P> {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        SseStreamDecoder::feed(self, bytes, out)
    }
    fn finish(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        SseStreamDecoder::finish(self, out)
    }
    fn abort(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        SseStreamDecoder::abort(self, out)
    }
    fn is_done(&self) -> bool {
        SseStreamDecoder::is_done(self)
    }
    fn provider(&self) -> &str {
        self.parser.provider()
    }
}

/// A parser of newline-delimited JSON lines (Ollama's native stream).
pub trait LineParser {
    /// Handles one non-empty line (without its line ending).
    fn on_line(&mut self, line: &str, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError>;
    /// The body ended (cleanly or not).
    fn on_end(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError>;
    fn is_done(&self) -> bool;
    fn provider(&self) -> &str;
}

/// Bytes in, [`StreamEvent`]s out, for NDJSON bodies: splits lines (any chunking, `\r\n`
/// tolerated, blank lines skipped) and hands them to a [`LineParser`]. Lines longer than
/// [`MAX_EVENT_BYTES`](crate::sse::MAX_EVENT_BYTES) are an error.
#[derive(Debug)]
pub struct NdjsonStreamDecoder<P> {
    line: Vec<u8>,
    parser: P,
}

impl<P: LineParser> NdjsonStreamDecoder<P> {
    pub fn new(parser: P) -> Self {
        Self { line: Vec::new(), parser }
    }

    pub fn parser(&self) -> &P {
        &self.parser
    }

    fn line(&mut self, bytes: &[u8], out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let text = std::str::from_utf8(bytes).map_err(|_| ProviderError::Protocol {
            provider: self.parser.provider().to_owned(),
            message: "stream line is not valid UTF-8".into(),
        })?;
        if text.trim().is_empty() { Ok(()) } else { self.parser.on_line(text, out) }
    }
}

impl<P: LineParser> BodyDecoder for NdjsonStreamDecoder<P> {
    fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        while !bytes.is_empty() && !self.parser.is_done() {
            let Some(pos) = bytes.iter().position(|&b| b == b'\n') else {
                if self.line.len() + bytes.len() > crate::sse::MAX_EVENT_BYTES {
                    return Err(ProviderError::Protocol {
                        provider: self.parser.provider().to_owned(),
                        message: format!("stream line larger than {} bytes", crate::sse::MAX_EVENT_BYTES),
                    });
                }
                self.line.extend_from_slice(bytes);
                break;
            };
            if self.line.is_empty() {
                self.line(&bytes[..pos], out)?;
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&bytes[..pos]);
                let result = self.line(&line, out);
                line.clear();
                self.line = line;
                result?;
            }
            bytes = &bytes[pos + 1..];
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if !self.line.is_empty() && !self.parser.is_done() {
            let line = std::mem::take(&mut self.line);
            self.line(&line, out)?;
        }
        if self.parser.is_done() { Ok(()) } else { self.parser.on_end(out) }
    }

    fn abort(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if self.parser.is_done() { Ok(()) } else { self.parser.on_end(out) }
    }

    fn is_done(&self) -> bool {
        self.parser.is_done()
    }

    fn provider(&self) -> &str {
        self.parser.provider()
    }
}

type BodyStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// The [`ModelStream`] over a streamed response body. Dropping it drops the body, which closes
/// the connection (or resets the HTTP/2 stream).
struct ResponseStream<D> {
    body: Option<BodyStream>,
    decoder: D,
    pending: VecDeque<Result<StreamEvent, ProviderError>>,
    scratch: Vec<StreamEvent>,
}

pub(crate) fn response_stream<P>(response: reqwest::Response, parser: P) -> ModelStream
where
    P: SseEventParser + Send + Unpin + 'static,
{
    decoded_stream(response, SseStreamDecoder::new(parser))
}

/// The [`ModelStream`] of a response body through any [`BodyDecoder`].
pub(crate) fn decoded_stream<D>(response: reqwest::Response, decoder: D) -> ModelStream
where
    D: BodyDecoder + Send + Unpin + 'static,
{
    Box::pin(ResponseStream {
        body: Some(Box::pin(response.bytes_stream())),
        decoder,
        pending: VecDeque::new(),
        scratch: Vec::new(),
    })
}

impl<D: BodyDecoder + Unpin> ResponseStream<D> {
    fn absorb(&mut self, result: Result<(), ProviderError>) {
        self.pending.extend(self.scratch.drain(..).map(Ok));
        match result {
            Err(e) => {
                self.pending.push_back(Err(e));
                self.body = None;
            }
            Ok(()) if self.decoder.is_done() => self.body = None,
            Ok(()) => {}
        }
    }
}

impl<D: BodyDecoder + Unpin> Stream for ResponseStream<D> {
    type Item = Result<StreamEvent, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.pending.pop_front() {
                return Poll::Ready(Some(item));
            }
            let Some(body) = this.body.as_mut() else {
                return Poll::Ready(None);
            };
            match body.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(bytes))) => {
                    let result = this.decoder.feed(&bytes, &mut this.scratch);
                    this.absorb(result);
                }
                Poll::Ready(Some(Err(e))) => {
                    this.body = None;
                    let provider = this.decoder.provider().to_owned();
                    let result = if e.is_timeout() {
                        Err(ProviderError::Network {
                            provider,
                            message: format!(
                                "the stream went silent: no bytes within the idle timeout; `timeout_secs` in \
                                 [providers.{}] changes it ({})",
                                this.decoder.provider(),
                                error_chain(&e)
                            ),
                        })
                    } else {
                        this.decoder.abort(&mut this.scratch).map_err(|err| match err {
                            ProviderError::Protocol { provider, message } => ProviderError::Protocol {
                                provider,
                                message: format!("{message} (connection error: {})", error_chain(&e)),
                            },
                            other => other,
                        })
                    };
                    this.absorb(result);
                    this.body = None;
                }
                Poll::Ready(None) => {
                    this.body = None;
                    let result = this.decoder.finish(&mut this.scratch);
                    this.absorb(result);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "2")])), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "1.5")])), Some(Duration::from_millis(1500)));
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", "2"), ("retry-after-ms", "250")])),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "-3")])), None);
        assert_eq!(parse_retry_after(&headers(&[])), None);
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")])),
            Some(Duration::ZERO)
        );
        let future = parse_retry_after(&headers(&[("retry-after", "Fri, 01 Jan 2100 00:00:00 GMT")])).unwrap();
        assert!(future > Duration::from_secs(365 * 86_400));
    }

    #[test]
    fn http_date() {
        let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 784_111_777);
        assert!(parse_http_date("Sun, 06 Foo 1994 08:49:37 GMT").is_none());
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            parse_error_body(
                r#"{"error":{"message":"slow down","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#
            ),
            (Some("slow down".into()), Some("rate_limit_exceeded".into()))
        );
        assert_eq!(
            parse_error_body(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#),
            (Some("Overloaded".into()), Some("overloaded_error".into()))
        );
        assert_eq!(
            parse_error_body(r#"[{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED"}}]"#),
            (Some("quota".into()), Some("429".into()))
        );
        assert_eq!(parse_error_body(r#"{"detail":"Not Found"}"#), (Some("Not Found".into()), None));
        assert_eq!(parse_error_body(r#"{"error":"model not found"}"#), (Some("model not found".into()), None));
        assert_eq!(parse_error_body("<html>bad gateway</html>"), (None, None));
    }

    #[test]
    fn excerpt_cuts_at_char_boundary() {
        assert_eq!(excerpt("héllo", 2), "hé...");
        assert_eq!(excerpt("abc", 3), "abc");
    }
}
