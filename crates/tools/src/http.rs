//! `http_request`: one HTTP request to exactly the URL given (redirects are not followed), with
//! a timeout and a size limit on the response body.

use std::time::Duration;

use async_trait::async_trait;
use descartes_core::{Tool, ToolContext, ToolOutput};
use descartes_protocol::ToolSpec;
use serde_json::{Value, json};

use crate::fs::uint_arg;
use crate::{clip, str_arg};

/// `http_request {"url", "method"?, "headers"?, "body"?, "timeout_secs"?, "max_bytes"?}`.
#[derive(Debug, Clone)]
pub struct HttpRequestTool {
    /// Default and largest body size read.
    pub max_bytes: usize,
    pub default_timeout: Duration,
    client: reqwest::Client,
}

impl HttpRequestTool {
    pub fn new(max_bytes: usize, default_timeout: Duration) -> Result<Self, String> {
        // Built once per process: building one reads and parses the system's CA certificates
        // (milliseconds), which a server would otherwise pay for every run.
        static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
        if let Some(client) = CLIENT.get() {
            return Ok(Self { max_bytes, default_timeout, client: client.clone() });
        }
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Fails only when another thread installed one meanwhile, which is as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("descartes/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self { max_bytes, default_timeout, client: CLIENT.get_or_init(|| client).clone() })
    }
}

const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

#[async_trait]
impl Tool for HttpRequestTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "http_request".into(),
            description: "Send one HTTP(S) request to exactly the given URL (redirects are not followed: a 3xx \
                          response shows its `location` header). Returns the status line, the response headers and \
                          the body as text, clipped to `max_bytes`."
                .into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "url": {"type": "string", "minLength": 1, "description": "Absolute http:// or https:// URL"},
                    "method": {"enum": METHODS, "description": "HTTP method, default GET"},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Request headers"},
                    "body": {"type": "string", "description": "Request body"},
                    "timeout_secs": {"type": "integer", "minimum": 1, "maximum": 300, "description": "Whole-request timeout (default 30)"},
                    "max_bytes": {"type": "integer", "minimum": 1, "description": "Most body bytes returned"}
                },
                "required": ["url"],
                "additionalProperties": false
            }),
        }
    }
    fn read_only(&self) -> bool {
        false
    }
    /// A POST may not be repeatable.
    fn idempotent(&self) -> bool {
        false
    }
    async fn call(&self, input: Value, _ctx: &ToolContext) -> ToolOutput {
        match self.request(&input).await {
            Ok(out) | Err(out) => out,
        }
    }
}

impl HttpRequestTool {
    async fn request(&self, input: &Value) -> Result<ToolOutput, ToolOutput> {
        let url_text = str_arg(input, "url")?;
        let url = reqwest::Url::parse(&url_text)
            .map_err(|e| ToolOutput::error(format!("argument `url` is not a valid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ToolOutput::error(format!("argument `url` must be http or https, not `{}`", url.scheme())));
        }
        let method = if input.get("method").is_some() { str_arg(input, "method")? } else { "GET".into() };
        let method = method.to_ascii_uppercase();
        if !METHODS.contains(&method.as_str()) {
            return Err(ToolOutput::error(format!("argument `method` must be one of {}", METHODS.join(", "))));
        }
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| ToolOutput::error(format!("argument `method`: {e}")))?;
        let timeout = uint_arg(input, "timeout_secs")?.map(Duration::from_secs).unwrap_or(self.default_timeout);
        let max = uint_arg(input, "max_bytes")?.map(|n| n as usize).unwrap_or(self.max_bytes).min(self.max_bytes);
        let mut req = self.client.request(method, url).timeout(timeout);
        match input.get("headers") {
            None | Some(Value::Null) => {}
            Some(Value::Object(h)) => {
                for (k, v) in h {
                    let Some(v) = v.as_str() else {
                        return Err(ToolOutput::error(format!("argument `headers.{k}` must be a string")));
                    };
                    req = req.header(k.as_str(), v);
                }
            }
            Some(_) => return Err(ToolOutput::error("argument `headers` must be an object of strings")),
        }
        if input.get("body").is_some_and(|b| !b.is_null()) {
            req = req.body(str_arg(input, "body")?);
        }
        let started = std::time::Instant::now();
        let fail = |e: reqwest::Error| {
            let kind = if e.is_timeout() { format!("timed out after {}s", timeout.as_secs()) } else { chain(&e) };
            ToolOutput::error(format!("request to {url_text} failed: {kind}"))
        };
        let mut resp = req.send().await.map_err(fail)?;
        let status = resp.status();
        let mut head = format!("HTTP {} {}\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
        for (k, v) in resp.headers() {
            head.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        let mut body = Vec::new();
        let mut truncated = false;
        loop {
            match tokio::time::timeout(timeout.saturating_sub(started.elapsed()), resp.chunk()).await {
                Err(_) => return Err(ToolOutput::error(format!("reading the body of {url_text} timed out"))),
                Ok(Err(e)) => return Err(fail(e)),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => {
                    let room = max.saturating_sub(body.len());
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if chunk.len() > room {
                        truncated = true;
                        break;
                    }
                }
            }
        }
        let (text, _) = clip(&body, max);
        let mut content = format!("{head}\n{text}");
        if truncated {
            content.push_str(&format!("\n[body clipped at {max} bytes]"));
        }
        let details = json!({"status": status.as_u16(), "body_bytes": body.len(), "truncated": truncated});
        // An error status is still an answer: the model reads it in the status line.
        Ok(ToolOutput::ok(content).with_details(details))
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}
