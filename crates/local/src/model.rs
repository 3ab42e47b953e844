//! A loaded GGUF model: weights (run by llama.cpp), tokenizer and chat template from the file, and
//! the generation loop.

use std::num::NonZeroU32;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use descartes_protocol::{Message, ToolSpec};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::error::{LocalError, Result};
use crate::grammar::{JsonGrammar, Matcher, TokenChecker};
use crate::template::{ChatTemplate, ToolCallFormat, map_messages};

/// Prompt tokens fed to the model per forward pass (cancellation is checked between chunks).
const PREFILL_CHUNK: usize = 512;

/// The context window a generation allocates is what it needs (prompt + room to answer), rounded
/// up to this, so a small prompt does not pay for the model's whole window.
const CONTEXT_STEP: usize = 512;

/// A model loaded in memory. Shared behind an `Arc`: every generation makes its own context (KV
/// cache) over the one copy of the weights, so generations may run concurrently.
pub struct LocalModel {
    path: PathBuf,
    name: String,
    model: LlamaModel,
    template: ChatTemplate,
    bos_token: String,
    context: usize,
    threads: i32,
    /// llama.cpp's context creation is not safe to run concurrently on one model.
    new_context: Mutex<()>,
    /// Every token's text, for constrained decoding (built on first use).
    vocab: OnceLock<Vocab>,
}

/// The vocabulary as a grammar sees it: each token's bytes in the decoded text, and whether it
/// ends generation.
struct Vocab {
    pieces: Vec<Box<[u8]>>,
    end: Vec<bool>,
}

impl std::fmt::Debug for LocalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalModel")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("context", &self.context)
            .field("threads", &self.threads)
            .field("model_template", &self.template.is_model_template())
            .finish_non_exhaustive()
    }
}

/// Tool calls the model may write: once one starts (the format's opener), every token must keep
/// the call valid JSON of the offered tools' schemas (see [`crate::grammar`]).
#[derive(Debug, Clone)]
pub struct ToolCalls {
    pub format: ToolCallFormat,
    pub grammar: JsonGrammar,
    /// The prompt already opens a call (it ends with the opener, e.g. `<tool_call>\n`): the
    /// answer starts constrained (a forced tool call).
    pub open: bool,
}

impl ToolCalls {
    /// The constraint for `tools` in the template's format; `None` when the format is unknown
    /// or no tool's schema can be satisfied.
    pub fn new(format: ToolCallFormat, tools: &[ToolSpec]) -> Option<Self> {
        let grammar = match format {
            ToolCallFormat::Hermes => JsonGrammar::for_tool_call(tools),
            ToolCallFormat::LlamaJson => {
                JsonGrammar::for_tools(tools.iter().map(|t| (t.name.as_str(), &t.input_schema)), "name", "parameters")
            }
            ToolCallFormat::None => return None,
        };
        match grammar {
            Ok(grammar) => Some(Self { format, grammar, open: false }),
            Err(e) => {
                tracing::warn!(error = %e, "tool calls of the local model are not constrained");
                None
            }
        }
    }

    /// If `text` (this answer so far, special tokens included) has just opened a call, the
    /// matcher with what follows the opener fed to it.
    fn opened(&self, text: &str) -> Option<Matcher> {
        let after = match self.format {
            ToolCallFormat::Hermes => text.rfind("<tool_call>").map(|i| &text[i + "<tool_call>".len()..])?,
            // Llama writes the call as the whole answer: `<|python_tag|>` or `{` first.
            ToolCallFormat::LlamaJson => {
                let t = text.trim_start();
                match t.strip_prefix("<|python_tag|>") {
                    Some(rest) => rest,
                    None if t.starts_with('{') => t,
                    None => return None,
                }
            }
            ToolCallFormat::None => return None,
        };
        let mut matcher = self.grammar.start();
        matcher.advance(after.as_bytes()).then_some(matcher)
    }
}

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate (also bounded by the context window).
    pub max_tokens: usize,
    /// `None` or ≤ 0: greedy decoding. Otherwise seeded sampling at this temperature.
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold (with a temperature only).
    pub top_p: Option<f64>,
    pub seed: u64,
    /// 1.0 disables it.
    pub repeat_penalty: f32,
    /// How many of the last generated tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    /// Stop at an end-of-turn token (benchmarks turn this off to generate a fixed count).
    pub stop_at_eos: bool,
    /// Constrain tool calls the model writes (`None`: free text throughout).
    pub tool_calls: Option<ToolCalls>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 512,
            temperature: None,
            top_p: None,
            seed: 299_792_458,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            stop_at_eos: true,
            tool_calls: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model ended its turn.
    EndOfTurn,
    /// `max_tokens` reached.
    MaxTokens,
    /// The context window is full.
    ContextFull,
    /// The caller stopped it.
    Cancelled,
}

impl StopReason {
    /// The reason as a provider stop reason (OpenAI's vocabulary).
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::EndOfTurn => "stop",
            StopReason::MaxTokens | StopReason::ContextFull => "length",
            StopReason::Cancelled => "cancelled",
        }
    }
}

/// What a generation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Every token sampled, the stop token included.
    pub generated_tokens: usize,
    pub stop: StopReason,
}

/// llama.cpp's process-wide state, initialized once; its logs go to `tracing` (target
/// `llama-cpp-2`) instead of stderr.
fn backend() -> Result<&'static LlamaBackend> {
    static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| LocalError::Inference(format!("cannot start llama.cpp: {e}")))
}

/// Threads for generation: one per core the process may use, at most 4. Decoding a small model
/// is bound by memory and by synchronisation between threads, so more threads than that only
/// add waiting; `DESCARTES_LOCAL_THREADS` overrides it.
fn default_threads() -> i32 {
    if let Some(n) = std::env::var("DESCARTES_LOCAL_THREADS").ok().and_then(|v| v.trim().parse::<i32>().ok())
        && n > 0
    {
        return n;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as i32)
}

fn inference(e: impl std::fmt::Display) -> LocalError {
    LocalError::Inference(e.to_string())
}

/// Whether the file starts with the GGUF magic (llama.cpp reports other files only in its log).
fn check_gguf(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| LocalError::io(path, e))?;
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == b"GGUF" => Ok(()),
        Ok(()) | Err(_) => {
            Err(LocalError::Load { path: path.to_owned(), message: "not a GGUF file (no GGUF magic)".into() })
        }
    }
}

/// Accumulates token bytes and hands out the longest complete UTF-8 prefix (a character may be
/// split across tokens).
#[derive(Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, bytes: &[u8]) -> Option<String> {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An invalid sequence (not just an incomplete one at the end) is replaced, not held.
            Err(e) if e.error_len().is_some() => {
                let text = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                return Some(text).filter(|t| !t.is_empty());
            }
            Err(e) => e.valid_up_to(),
        };
        if valid == 0 {
            return None;
        }
        let rest = self.pending.split_off(valid);
        let text = String::from_utf8(std::mem::replace(&mut self.pending, rest)).ok()?;
        Some(text)
    }
}

impl LocalModel {
    /// Loads a GGUF file (blocking; the weights are memory-mapped, so a 100 MB model takes tens
    /// of milliseconds).
    pub fn load(path: &Path) -> Result<Self> {
        let load_error = |message: String| LocalError::Load { path: path.to_owned(), message };
        check_gguf(path)?;
        let backend = backend()?;
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|e| load_error(format!("llama.cpp cannot load it ({e}); see the log for why")))?;
        let name = model
            .meta_val_str("general.name")
            .ok()
            .filter(|n| !n.trim().is_empty())
            .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let context = model.n_ctx_train().max(1) as usize;
        let vocab = model.vocab();
        let token_text = |token: LlamaToken| -> String {
            if token.0 < 0 {
                return String::new();
            }
            String::from_utf8_lossy(&vocab.token_to_piece(token, true, None)).into_owned()
        };
        let bos_token = token_text(vocab.bos());
        let eos_token = token_text(vocab.eos());
        let source = model.chat_template(None).ok().and_then(|t| t.to_string().ok());
        let (template, compiled) = ChatTemplate::new(source.as_deref(), &bos_token, &eos_token);
        if source.is_some() && !compiled {
            tracing::warn!(path = %path.display(), "the model's chat template does not compile; using ChatML");
        }
        Ok(Self {
            path: path.to_owned(),
            name,
            model,
            template,
            bos_token,
            context,
            threads: default_threads(),
            new_context: Mutex::new(()),
            vocab: OnceLock::new(),
        })
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model's name from its metadata (`general.name`), else the file name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The context window in tokens (the one the model was trained with).
    pub fn context(&self) -> usize {
        self.context
    }

    /// Threads a generation uses.
    pub fn threads(&self) -> i32 {
        self.threads
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The prompt for a conversation, rendered with the model's chat template.
    pub fn render_prompt(&self, system: Option<&str>, messages: &[Message], tools: &[ToolSpec]) -> Result<String> {
        self.template.render(&map_messages(system, messages), tools).map_err(|e| LocalError::Template(e.to_string()))
    }

    /// Tokenizes a rendered prompt with the file's tokenizer. Special tokens written in it
    /// (`<|im_start|>`) are recognized; a BOS token is added only when the template did not write
    /// one and the file asks for it.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let add_special = self.bos_token.is_empty() || !prompt.starts_with(&self.bos_token);
        let tokens = self.model.vocab().tokenize(prompt.as_bytes(), add_special, true);
        Ok(tokens.into_iter().map(|t| t.0 as u32).collect())
    }

    /// Decodes tokens to text (special tokens skipped).
    pub fn decode(&self, tokens: &[u32]) -> Result<String> {
        let vocab = self.model.vocab();
        let mut bytes = Vec::new();
        for &token in tokens {
            vocab.token_to_piece_into(to_token(token)?, &mut bytes, false, None);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Generates after `prompt`. `on_text` receives the text as it is produced (complete UTF-8
    /// pieces) and may stop generation with `ControlFlow::Break`; `cancelled` is checked before
    /// every forward pass. Blocking: run it on a blocking thread.
    pub fn generate(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        cancelled: &dyn Fn() -> bool,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(LocalError::Inference("empty prompt".into()));
        }
        if prompt.len() >= self.context {
            return Err(LocalError::PromptTooLong { tokens: prompt.len(), context: self.context });
        }
        let room = self.context - prompt.len();
        let limit = options.max_tokens.min(room);
        let mut generation =
            Generation { prompt_tokens: prompt.len(), generated_tokens: 0, stop: StopReason::Cancelled };
        if limit == 0 {
            generation.stop = StopReason::MaxTokens;
            return Ok(generation);
        }
        let prompt: Vec<LlamaToken> = prompt.iter().map(|&t| to_token(t)).collect::<Result<_>>()?;

        // The KV cache holds what this generation can reach, not the model's whole window.
        let needed = (prompt.len() + limit).div_ceil(CONTEXT_STEP) * CONTEXT_STEP;
        let n_ctx = needed.min(self.context) as u32;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(PREFILL_CHUNK as u32)
            .with_n_ubatch(PREFILL_CHUNK as u32)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads)
            .with_no_perf(true);
        let mut ctx = {
            let _one_at_a_time = self.new_context.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            self.model.new_context(backend()?, params).map_err(inference)?
        };

        let mut batch = LlamaBatch::new(PREFILL_CHUNK, 1);
        let mut pos = 0i32;
        for chunk in prompt.chunks(PREFILL_CHUNK) {
            if cancelled() {
                return Ok(generation);
            }
            batch.clear();
            for (i, &token) in chunk.iter().enumerate() {
                batch.add(token, pos, &[0], i + 1 == chunk.len()).map_err(inference)?;
                pos += 1;
            }
            ctx.decode(&mut batch).map_err(inference)?;
        }

        let mut sampler = self.sampler(options);
        let vocab = self.model.vocab();
        let mut text = Utf8Stream::default();
        let mut piece = Vec::with_capacity(16);
        // This answer with special tokens written out, to see a tool call open; the matcher of
        // the call being written.
        let mut raw = String::new();
        let mut call: Option<Matcher> = options.tool_calls.as_ref().filter(|t| t.open).map(|t| t.grammar.start());
        loop {
            let idx = batch.n_tokens() - 1;
            let next = match &call {
                None => sampler.sample(&ctx, idx),
                Some(matcher) => {
                    let next = self.constrained(ctx.get_logits_ith(idx), matcher)?;
                    sampler.accept(next);
                    next
                }
            };
            generation.generated_tokens += 1;
            if options.stop_at_eos && vocab.is_eog(next) {
                generation.stop = StopReason::EndOfTurn;
                break;
            }
            piece.clear();
            vocab.token_to_piece_into(next, &mut piece, false, None);
            if let Some(tools) = &options.tool_calls {
                match &mut call {
                    Some(matcher) => {
                        matcher.advance(&piece);
                        if matcher.is_complete() {
                            call = None;
                            raw.clear();
                        }
                    }
                    None => {
                        raw.push_str(&String::from_utf8_lossy(&vocab.token_to_piece(next, true, None)));
                        call = tools.opened(&raw);
                    }
                }
            }
            if let Some(text) = text.push(&piece)
                && on_text(&text).is_break()
            {
                generation.stop = StopReason::Cancelled;
                break;
            }
            if generation.generated_tokens >= limit {
                generation.stop =
                    if limit < options.max_tokens { StopReason::ContextFull } else { StopReason::MaxTokens };
                break;
            }
            if cancelled() {
                generation.stop = StopReason::Cancelled;
                break;
            }
            batch.clear();
            batch.add(next, pos, &[0], true).map_err(inference)?;
            pos += 1;
            ctx.decode(&mut batch).map_err(inference)?;
        }
        Ok(generation)
    }

    /// The most likely token that keeps the tool call valid (the grammar has no dead ends, so
    /// there is one): the 64 best are tried in order, then the rest.
    fn constrained(&self, logits: &[f32], matcher: &Matcher) -> Result<LlamaToken> {
        const FIRST: usize = 64;
        let vocab = self.vocab.get_or_init(|| {
            let v = self.model.vocab();
            let n = self.model.n_vocab().max(0);
            let (mut pieces, mut end) = (Vec::with_capacity(n as usize), Vec::with_capacity(n as usize));
            for id in 0..n {
                pieces.push(v.token_to_piece(LlamaToken(id), false, None).into_boxed_slice());
                end.push(v.is_eog(LlamaToken(id)));
            }
            Vocab { pieces, end }
        });
        let n = logits.len().min(vocab.pieces.len());
        let mut order: Vec<u32> = (0..n as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let first = FIRST.min(n);
        if first > 0 && first < n {
            order.select_nth_unstable_by(first - 1, by_logit);
        }
        order[..first].sort_unstable_by(by_logit);
        let mut checker = TokenChecker::new(matcher);
        let mut fits = |id: &u32| {
            let i = *id as usize;
            // An end-of-generation token is the empty string (allowed once the call is whole);
            // other control tokens have no text and are never allowed inside a call.
            if vocab.end[i] {
                checker.accepts(b"")
            } else {
                !vocab.pieces[i].is_empty() && checker.accepts(&vocab.pieces[i])
            }
        };
        if let Some(id) = order[..first].iter().find(|id| fits(id)) {
            return Ok(LlamaToken(*id as i32));
        }
        order[first..].sort_unstable_by(by_logit);
        order[first..]
            .iter()
            .find(|id| fits(id))
            .map(|id| LlamaToken(*id as i32))
            .ok_or_else(|| LocalError::Inference("no token continues the tool call".into()))
    }

    /// The sampler chain: the repeat penalty, then greedy choice, or top-p and temperature with a
    /// fixed seed.
    fn sampler(&self, options: &GenerateOptions) -> LlamaSampler {
        let mut chain = Vec::new();
        if options.repeat_penalty != 1.0 && options.repeat_last_n > 0 {
            chain.push(LlamaSampler::penalties(
                self.model.n_vocab(),
                options.repeat_last_n.min(i32::MAX as usize) as i32,
                options.repeat_penalty,
                0.0,
                0.0,
            ));
        }
        match options.temperature.filter(|t| *t > 1e-7) {
            None => chain.push(LlamaSampler::greedy()),
            Some(temperature) => {
                if let Some(p) = options.top_p.filter(|p| *p > 0.0 && *p < 1.0) {
                    chain.push(LlamaSampler::top_p(p as f32, 1));
                }
                chain.push(LlamaSampler::temp(temperature as f32));
                chain.push(LlamaSampler::dist(options.seed as u32));
            }
        }
        LlamaSampler::chain_simple(chain)
    }
}

fn to_token(token: u32) -> Result<LlamaToken> {
    i32::try_from(token).map(LlamaToken).map_err(|_| LocalError::Inference(format!("token id {token} out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stream_holds_split_characters_until_complete() {
        let mut s = Utf8Stream::default();
        let e = "é".as_bytes();
        assert_eq!(s.push(b"caf"), Some("caf".into()));
        assert_eq!(s.push(&e[..1]), None);
        assert_eq!(s.push(&e[1..]), Some("é".into()));
        assert_eq!(s.push(&[0xff, b'a']), Some("\u{fffd}a".into()));
    }
}
