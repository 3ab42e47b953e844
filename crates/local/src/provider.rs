//! [`LocalProvider`]: the [`Provider`] over a [`LocalModel`].

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use descartes_core::{ModelRequest, ModelStream, Provider, ProviderError, StreamEvent};
use descartes_protocol::Usage;
use tokio::sync::mpsc;

use crate::error::LocalError;
use crate::model::{GenerateOptions, LocalModel, StopReason, ToolCalls};

/// The provider's name as users select it.
pub const PROVIDER_NAME: &str = "local";

/// Generation defaults; a request's `max_tokens` and `temperature` override them.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalOptions {
    /// Default 512.
    pub max_tokens: u32,
    /// Default `None`: greedy decoding (deterministic).
    pub temperature: Option<f32>,
    pub top_p: Option<f64>,
    /// Seed of sampling when a temperature is set (fixed, so runs are reproducible).
    pub seed: u64,
    /// Default 1.1; 1.0 disables it.
    pub repeat_penalty: f32,
    /// Default 64.
    pub repeat_last_n: usize,
}

impl Default for LocalOptions {
    fn default() -> Self {
        let g = GenerateOptions::default();
        Self {
            max_tokens: 512,
            temperature: None,
            top_p: None,
            seed: g.seed,
            repeat_penalty: g.repeat_penalty,
            repeat_last_n: g.repeat_last_n,
        }
    }
}

/// A model file run in-process. Cloning shares the loaded model.
#[derive(Clone)]
pub struct LocalProvider {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    options: LocalOptions,
    /// This provider's model, once loaded (from the process-wide cache).
    model: Mutex<Option<Arc<LocalModel>>>,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("path", &self.inner.path)
            .field("options", &self.inner.options)
            .field("loaded", &self.is_loaded())
            .finish()
    }
}

fn config_error(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Config { provider: PROVIDER_NAME.into(), message: e.to_string() }
}

impl LocalProvider {
    /// A provider for a model file (see [`crate::resolve_model`]). Nothing is read until the
    /// first call.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self::with_options(model_path, LocalOptions::default())
    }

    pub fn with_options(model_path: impl Into<PathBuf>, options: LocalOptions) -> Self {
        Self { inner: Arc::new(Inner { path: model_path.into(), options, model: Mutex::new(None) }) }
    }

    pub fn model_path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether the model is in memory.
    pub fn is_loaded(&self) -> bool {
        self.inner.model.lock().map(|m| m.is_some()).unwrap_or(false)
    }

    /// Loads the model now (otherwise the first call does). Concurrent callers share one load;
    /// a failed load is tried again by the next call.
    pub async fn preload(&self) -> Result<Arc<LocalModel>, ProviderError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.load())
            .await
            .map_err(|e| config_error(format!("loading the model panicked: {e}")))?
            .map_err(|e| match e {
                LocalError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => config_error(
                    format!("model file {} not found; pull it with `descartes model pull`", self.inner.path.display()),
                ),
                e => config_error(e),
            })
    }

    fn generate_options(&self, request: &ModelRequest) -> GenerateOptions {
        let o = &self.inner.options;
        GenerateOptions {
            max_tokens: request.max_tokens.unwrap_or(o.max_tokens) as usize,
            temperature: request.temperature.or(o.temperature).map(f64::from),
            top_p: o.top_p,
            seed: o.seed,
            repeat_penalty: o.repeat_penalty,
            repeat_last_n: o.repeat_last_n,
            stop_at_eos: true,
            tool_calls: None,
        }
    }
}

impl Inner {
    fn load(&self) -> Result<Arc<LocalModel>, LocalError> {
        let mut slot = self.model.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(model) = slot.as_ref() {
            return Ok(model.clone());
        }
        let model = shared_model(&self.path)?;
        *slot = Some(model.clone());
        Ok(model)
    }
}

/// Which file a loaded model came from: its path and the file's size and modification time, so a
/// file replaced in place (a new pull) is loaded again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileKey {
    path: PathBuf,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

/// The process-wide cache of loaded models: every provider (every run of a server or daemon) of
/// one file shares one copy of its weights, loaded once and kept for the life of the process.
fn shared_model(path: &Path) -> Result<Arc<LocalModel>, LocalError> {
    static MODELS: OnceLock<Mutex<HashMap<FileKey, Arc<LocalModel>>>> = OnceLock::new();
    let meta = std::fs::metadata(path).map_err(|e| LocalError::io(path, e))?;
    let path = std::fs::canonicalize(path).map_err(|e| LocalError::io(path, e))?;
    let key = FileKey { path, len: meta.len(), modified: meta.modified().ok() };
    // Held while loading, so concurrent first calls load the weights once.
    let mut models = MODELS.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(model) = models.get(&key) {
        return Ok(model.clone());
    }
    let started = std::time::Instant::now();
    let model = Arc::new(LocalModel::load(&key.path)?);
    tracing::debug!(path = %key.path.display(), name = model.name(), ms = started.elapsed().as_millis() as u64, "local model loaded");
    // A replaced file's old copy is dropped once the runs using it end.
    models.retain(|k, _| k.path != key.path);
    models.insert(key, model.clone());
    Ok(model)
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &str {
        PROVIDER_NAME
    }

    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError> {
        let model = self.preload().await?;
        let prompt =
            model.render_prompt(request.system.as_deref(), &request.messages, &request.tools).map_err(config_error)?;
        let tokens = model.encode(&prompt).map_err(config_error)?;
        if tokens.len() >= model.context() {
            return Err(config_error(LocalError::PromptTooLong { tokens: tokens.len(), context: model.context() }));
        }
        let mut options = self.generate_options(&request);
        // Tool calls come back as text in the model's format (`<tool_call>{...}</tool_call>`,
        // Llama's JSON): the same filter as for text-calling servers turns them into calls.
        let tool_names: Vec<String> = if model.template().supports_tools() {
            request.tools.iter().map(|t| t.name.clone()).collect()
        } else {
            Vec::new()
        };
        if !tool_names.is_empty() {
            options.tool_calls = ToolCalls::new(model.template().tool_call_format(), &request.tools);
        }
        let (tx, rx) = mpsc::channel::<Result<StreamEvent, ProviderError>>(64);
        tokio::task::spawn_blocking(move || {
            let prompt_tokens = tokens.len() as u64;
            let _ = tx.blocking_send(Ok(StreamEvent::Usage(Usage { input_tokens: prompt_tokens, ..Usage::default() })));
            let mut on_text = |text: &str| {
                if tx.blocking_send(Ok(StreamEvent::TextDelta(text.to_owned()))).is_err() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            };
            let result = model.generate(&tokens, &options, &|| tx.is_closed(), &mut on_text);
            match result {
                Ok(g) if g.stop == StopReason::Cancelled => {}
                Ok(g) => {
                    let usage = Usage {
                        input_tokens: prompt_tokens,
                        output_tokens: g.generated_tokens as u64,
                        ..Usage::default()
                    };
                    let _ = tx.blocking_send(Ok(StreamEvent::Usage(usage)));
                    let _ = tx.blocking_send(Ok(StreamEvent::Stop { reason: Some(g.stop.as_str().to_owned()) }));
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(ProviderError::Stream {
                        provider: PROVIDER_NAME.into(),
                        kind: "inference".into(),
                        message: e.to_string(),
                        retryable: false,
                    }));
                }
            }
        });
        let stream: ModelStream =
            Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }));
        Ok(if tool_names.is_empty() { stream } else { descartes_providers::filter_text_tool_calls(stream, tool_names) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use descartes_protocol::Message;

    #[tokio::test]
    async fn a_missing_or_bad_model_file_is_a_config_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let request = ModelRequest {
            model: String::new(),
            system: None,
            messages: Arc::new(vec![Message::user_text("hi")]),
            tools: Arc::new(Vec::new()),
            max_tokens: None,
            temperature: None,
        };
        let missing = LocalProvider::new(dir.path().join("nope.gguf"));
        let Err(err) = missing.stream(request.clone()).await else { panic!("streamed without a model") };
        assert!(matches!(err, ProviderError::Config { .. }) && !err.is_retryable(), "{err}");
        assert!(err.to_string().contains("descartes model pull"), "{err}");
        assert!(!missing.is_loaded());

        let junk = dir.path().join("junk.gguf");
        std::fs::write(&junk, b"not a model at all").unwrap();
        let Err(err) = LocalProvider::new(&junk).stream(request).await else { panic!("streamed junk") };
        assert!(err.to_string().contains("not a GGUF file"), "{err}");
    }
}
