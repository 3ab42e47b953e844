//! Token counting per provider: OpenAI's own tiktoken tables for OpenAI models, and
//! `cl100k_base` as an estimate for models whose tokenizer is not published (Anthropic,
//! Gemini, xAI, local models served elsewhere). Used to estimate the next call for budgets;
//! the providers' reported usage is what is recorded.

use std::sync::Arc;

use descartes_core::TokenCounter;
use tiktoken_rs::CoreBPE;
use tiktoken_rs::tokenizer::Tokenizer;

/// A tiktoken table. The tables load on first use (tens of milliseconds), once per process.
#[derive(Clone, Copy)]
pub struct Tiktoken {
    table: Tokenizer,
}

impl std::fmt::Debug for Tiktoken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiktoken").field("table", &self.table).finish()
    }
}

impl Tiktoken {
    /// The table of an OpenAI model name, `None` for other models.
    pub fn for_openai_model(model: &str) -> Option<Self> {
        tiktoken_rs::tokenizer::get_tokenizer(model).map(|table| Self { table })
    }

    /// `cl100k_base`.
    pub fn cl100k() -> Self {
        Self { table: Tokenizer::Cl100kBase }
    }

    /// `o200k_base` (GPT-4o and later).
    pub fn o200k() -> Self {
        Self { table: Tokenizer::O200kBase }
    }

    fn bpe(&self) -> &'static CoreBPE {
        match self.table {
            Tokenizer::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Tokenizer::O200kHarmony => tiktoken_rs::o200k_harmony_singleton(),
            Tokenizer::R50kBase => tiktoken_rs::r50k_base_singleton(),
            Tokenizer::P50kBase => tiktoken_rs::p50k_base_singleton(),
            Tokenizer::P50kEdit => tiktoken_rs::p50k_edit_singleton(),
            _ => tiktoken_rs::cl100k_base_singleton(),
        }
    }
}

impl TokenCounter for Tiktoken {
    fn count(&self, text: &str) -> u64 {
        self.bpe().encode_ordinary(text).len() as u64
    }
}

/// The counter for a provider kind and model: the model's tiktoken table for OpenAI models
/// (`o200k_base` for unknown `gpt*` models of the kinds that serve OpenAI's models, see
/// [`crate::catalog::KindInfo::openai_models`]), `cl100k_base` otherwise.
pub fn token_counter(kind: &str, model: &str) -> Arc<dyn TokenCounter> {
    let bare = model.rsplit('/').next().unwrap_or(model);
    match Tiktoken::for_openai_model(bare) {
        Some(t) => Arc::new(t),
        None if crate::catalog::kind_info(kind).is_some_and(|k| k.openai_models) && bare.starts_with("gpt") => {
            Arc::new(Tiktoken::o200k())
        }
        None => Arc::new(Tiktoken::cl100k()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_the_model_table() {
        // "hello world" is two tokens in both tables.
        assert_eq!(token_counter("openai", "gpt-4o-mini").count("hello world"), 2);
        assert_eq!(token_counter("anthropic", "claude-sonnet-4-5").count("hello world"), 2);
        let long = "The quick brown fox jumps over the lazy dog. ".repeat(100);
        let n = token_counter("openai", "gpt-4o").count(&long);
        assert!((900..=1100).contains(&n), "{n}");
    }
}
