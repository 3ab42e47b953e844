//! A loaded GGUF model: weights, tokenizer, chat template, and the generation loop.

use std::fs::File;
use std::io::BufReader;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::{MAX_SEQ_LEN, ModelWeights};
use descartes_protocol::{Message, ToolSpec};
use tokenizers::Tokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

use crate::error::{LocalError, Result};
use crate::template::{ChatTemplate, map_messages};

/// Prompt tokens fed to the model per forward pass (cancellation is checked between chunks).
const PREFILL_CHUNK: usize = 128;

/// End-of-turn tokens of the common chat formats, used when the vocabulary has them.
const STOP_TOKENS: &[&str] = &["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>"];

/// A model loaded in memory. Cheap to share behind an `Arc`; every generation works on its own
/// copy of the (reference-counted) weights with its own KV cache, so generations may run
/// concurrently.
pub struct LocalModel {
    path: PathBuf,
    name: String,
    weights: ModelWeights,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    stop_tokens: Vec<u32>,
    bos_token: String,
    context: usize,
}

impl std::fmt::Debug for LocalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalModel")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("context", &self.context)
            .field("model_template", &self.template.is_model_template())
            .finish_non_exhaustive()
    }
}

/// How to generate.
#[derive(Debug, Clone, PartialEq)]
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

/// Quantization types whose CPU dot product candle has no SIMD kernel for (their matmuls are
/// several times slower than Q8_0's).
fn slow_on_cpu(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_1 | GgmlDType::Q8_1)
}

/// The weights; tensors of a type candle multiplies slowly on the CPU are requantized to Q8_0
/// (finer than what they come from, so no quality is lost; about 1.5 times their memory), through
/// an in-memory GGUF.
fn load_weights<R: std::io::Read + std::io::Seek>(
    content: gguf_file::Content,
    reader: &mut R,
) -> candle_core::Result<ModelWeights> {
    let device = Device::Cpu;
    if !content.tensor_infos.values().any(|t| slow_on_cpu(t.ggml_dtype)) {
        return ModelWeights::from_gguf(content, reader, &device);
    }
    let mut tensors = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let tensor = content.tensor(reader, name, &device)?;
        let block = GgmlDType::Q8_0.block_size();
        let tensor = if slow_on_cpu(info.ggml_dtype) && info.shape.dims().last().is_some_and(|d| d % block == 0) {
            QTensor::quantize(&tensor.dequantize(&device)?, GgmlDType::Q8_0)?
        } else {
            tensor
        };
        tensors.push((name.as_str(), tensor));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut buffer = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buffer, &metadata, &tensor_refs)?;
    drop(tensors);
    buffer.set_position(0);
    let converted = gguf_file::Content::read(&mut buffer)?;
    ModelWeights::from_gguf(converted, &mut buffer, &device)
}

fn inference(e: impl std::fmt::Display) -> LocalError {
    LocalError::Inference(e.to_string())
}

impl LocalModel {
    /// Loads a GGUF file (blocking; a 100 MB model takes well under a second).
    pub fn load(path: &Path) -> Result<Self> {
        let load_error = |message: String| LocalError::Load { path: path.to_owned(), message };
        let file = File::open(path).map_err(|e| LocalError::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| load_error(format!("not a GGUF file: {e}")))?;
        let meta_str = |key: &str| content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned();
        let meta_u32 = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());

        let arch = meta_str("general.architecture").unwrap_or_default();
        if arch != "llama" {
            return Err(load_error(format!(
                "architecture `{arch}` is not supported (only llama-family models: Llama, SmolLM, TinyLlama, Mistral)"
            )));
        }
        let name = meta_str("general.name")
            .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let context = meta_u32("llama.context_length").map_or(MAX_SEQ_LEN, |c| (c as usize).min(MAX_SEQ_LEN));

        let mut tokenizer =
            Tokenizer::from_gguf(&content).map_err(|e| load_error(format!("cannot build the tokenizer: {e}")))?;
        let pre = meta_str("tokenizer.ggml.pre").unwrap_or_default();
        match pre.as_str() {
            // candle knows these pre-tokenizers.
            "qwen2" | "smaug-bpe" | "lfm2" | "llama3" => {}
            // SmolLM: digits split one by one, then byte-level without a prefix space (as in its
            // tokenizer.json).
            "smollm" => {
                tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])));
            }
            // GPT-2 style: byte-level, a prefix space only if the file asks for one.
            _ => {
                let prefix = content.metadata.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok());
                tokenizer.with_pre_tokenizer(Some(ByteLevel::new(prefix.unwrap_or(false), true, true)));
            }
        }
        let token_text = |key: &str| meta_u32(key).and_then(|id| tokenizer.id_to_token(id)).unwrap_or_default();
        let bos_token = token_text("tokenizer.ggml.bos_token_id");
        let eos_token = token_text("tokenizer.ggml.eos_token_id");
        let mut stop_tokens: Vec<u32> = meta_u32("tokenizer.ggml.eos_token_id").into_iter().collect();
        stop_tokens.extend(STOP_TOKENS.iter().filter_map(|t| tokenizer.token_to_id(t)));
        stop_tokens.sort_unstable();
        stop_tokens.dedup();

        let source = meta_str("tokenizer.chat_template");
        let (template, compiled) = ChatTemplate::new(source.as_deref(), &bos_token, &eos_token);
        if source.is_some() && !compiled {
            tracing::warn!(path = %path.display(), "the model's chat template does not compile; using ChatML");
        }

        let weights =
            load_weights(content, &mut reader).map_err(|e| load_error(format!("cannot load the weights: {e}")))?;
        Ok(Self { path: path.to_owned(), name, weights, tokenizer, template, stop_tokens, bos_token, context })
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model's name from its metadata (`general.name`), else the file name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The context window in tokens (the file's, capped at what candle's llama supports).
    pub fn context(&self) -> usize {
        self.context
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The prompt for a conversation, rendered with the model's chat template.
    pub fn render_prompt(&self, system: Option<&str>, messages: &[Message], tools: &[ToolSpec]) -> Result<String> {
        self.template.render(&map_messages(system, messages), tools).map_err(|e| LocalError::Template(e.to_string()))
    }

    /// Tokenizes a rendered prompt. Special tokens written in it (`<|im_start|>`) are recognized;
    /// a BOS token is added only when the template did not write one and the file asks for it.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let add_special = self.bos_token.is_empty() || !prompt.starts_with(&self.bos_token);
        let encoding = self.tokenizer.encode(prompt, add_special).map_err(inference)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes tokens to text (special tokens skipped).
    pub fn decode(&self, tokens: &[u32]) -> Result<String> {
        self.tokenizer.decode(tokens, true).map_err(inference)
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

        let mut weights = self.weights.clone();
        let device = Device::Cpu;
        let mut logits = None;
        let mut pos = 0;
        for chunk in prompt.chunks(PREFILL_CHUNK) {
            if cancelled() {
                return Ok(generation);
            }
            let input = Tensor::new(chunk, &device).and_then(|t| t.unsqueeze(0)).map_err(inference)?;
            logits = Some(weights.forward(&input, pos).map_err(inference)?);
            pos += chunk.len();
        }
        let Some(mut logits) = logits else {
            return Err(LocalError::Inference("empty prompt".into()));
        };

        let sampling = match options.temperature.filter(|t| *t > 1e-7) {
            None => Sampling::ArgMax,
            Some(temperature) => match options.top_p {
                Some(p) if p > 0.0 && p < 1.0 => Sampling::TopP { p, temperature },
                _ => Sampling::All { temperature },
            },
        };
        let mut sampler = LogitsProcessor::from_sampling(options.seed, sampling);
        let mut generated: Vec<u32> = Vec::with_capacity(limit);
        let mut decoder = self.tokenizer.decode_stream(true);
        loop {
            let mut last = logits.squeeze(0).and_then(|l| l.to_dtype(DType::F32)).map_err(inference)?;
            if options.repeat_penalty != 1.0 && !generated.is_empty() {
                let start = generated.len().saturating_sub(options.repeat_last_n);
                last = candle_transformers::utils::apply_repeat_penalty(
                    &last,
                    options.repeat_penalty,
                    &generated[start..],
                )
                .map_err(inference)?;
            }
            let next = sampler.sample(&last).map_err(inference)?;
            generated.push(next);
            generation.generated_tokens = generated.len();
            if options.stop_at_eos && self.stop_tokens.contains(&next) {
                generation.stop = StopReason::EndOfTurn;
                break;
            }
            if let Some(text) = decoder.step(next).map_err(inference)?
                && !text.is_empty()
                && on_text(&text).is_break()
            {
                generation.stop = StopReason::Cancelled;
                break;
            }
            if generated.len() >= limit {
                generation.stop =
                    if limit < options.max_tokens { StopReason::ContextFull } else { StopReason::MaxTokens };
                break;
            }
            if cancelled() {
                generation.stop = StopReason::Cancelled;
                break;
            }
            let input = Tensor::new(&[next], &device).and_then(|t| t.unsqueeze(0)).map_err(inference)?;
            logits = weights.forward(&input, prompt.len() + generated.len() - 1).map_err(inference)?;
        }
        Ok(generation)
    }
}
