//! Money and budgets: a price table (USD per million tokens, matched on the model name), the
//! cost of a call, per-run caps, and the token counter the caps estimate with.

use std::collections::BTreeMap;

pub use descartes_protocol::Budget;
use descartes_protocol::{Message, Usage};
use serde::{Deserialize, Serialize};

/// Prices of one model in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Cached input tokens read (defaults to `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read: Option<f64>,
    /// Input tokens written to a cache (defaults to `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write: Option<f64>,
}

impl Price {
    const fn new(input: f64, output: f64, cache_read: f64) -> Self {
        Self { input, output, cache_read: Some(cache_read), cache_write: None }
    }

    /// The cost of a call's usage. `input_tokens` counts uncached input only (the providers
    /// report cache reads and writes apart).
    pub fn cost(&self, u: &Usage) -> f64 {
        let per = |tokens: u64, price: f64| tokens as f64 * price / 1_000_000.0;
        per(u.input_tokens, self.input)
            + per(u.output_tokens, self.output)
            + per(u.cache_read_tokens, self.cache_read.unwrap_or(self.input))
            + per(u.cache_write_tokens, self.cache_write.unwrap_or(self.input))
    }
}

/// Default prices (USD per million tokens, list prices as published by the vendors in 2025).
/// Keys are model name prefixes; the longest matching prefix wins. Override or extend them in
/// config (`[prices."model"] input = .., output = ..`).
pub const DEFAULT_PRICES: &[(&str, Price)] = &[
    ("gpt-5", Price::new(1.25, 10.0, 0.125)),
    ("gpt-5-mini", Price::new(0.25, 2.0, 0.025)),
    ("gpt-5-nano", Price::new(0.05, 0.40, 0.005)),
    ("gpt-4.1", Price::new(2.0, 8.0, 0.50)),
    ("gpt-4.1-mini", Price::new(0.40, 1.60, 0.10)),
    ("gpt-4.1-nano", Price::new(0.10, 0.40, 0.025)),
    ("gpt-4o", Price::new(2.50, 10.0, 1.25)),
    ("gpt-4o-mini", Price::new(0.15, 0.60, 0.075)),
    ("o3", Price::new(2.0, 8.0, 0.50)),
    ("o4-mini", Price::new(1.10, 4.40, 0.275)),
    ("claude-opus-4", Price { input: 15.0, output: 75.0, cache_read: Some(1.50), cache_write: Some(18.75) }),
    ("claude-sonnet-4", Price { input: 3.0, output: 15.0, cache_read: Some(0.30), cache_write: Some(3.75) }),
    ("claude-3-7-sonnet", Price { input: 3.0, output: 15.0, cache_read: Some(0.30), cache_write: Some(3.75) }),
    ("claude-3-5-sonnet", Price { input: 3.0, output: 15.0, cache_read: Some(0.30), cache_write: Some(3.75) }),
    ("claude-3-5-haiku", Price { input: 0.80, output: 4.0, cache_read: Some(0.08), cache_write: Some(1.0) }),
    ("claude-haiku-4", Price { input: 1.0, output: 5.0, cache_read: Some(0.10), cache_write: Some(1.25) }),
    ("gemini-2.5-pro", Price::new(1.25, 10.0, 0.31)),
    ("gemini-2.5-flash", Price::new(0.30, 2.50, 0.075)),
    ("gemini-2.5-flash-lite", Price::new(0.10, 0.40, 0.025)),
    ("gemini-2.0-flash", Price::new(0.10, 0.40, 0.025)),
    ("grok-4", Price::new(3.0, 15.0, 0.75)),
    ("grok-3", Price::new(3.0, 15.0, 0.75)),
    ("grok-3-mini", Price::new(0.30, 0.50, 0.075)),
];

/// Prices by model-name prefix.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PriceTable {
    prices: BTreeMap<String, Price>,
}

impl PriceTable {
    /// The default prices.
    pub fn with_defaults() -> Self {
        Self { prices: DEFAULT_PRICES.iter().map(|(k, p)| ((*k).to_owned(), *p)).collect() }
    }

    /// Adds or replaces the price of a model prefix.
    pub fn set(&mut self, model_prefix: impl Into<String>, price: Price) {
        self.prices.insert(model_prefix.into(), price);
    }

    /// The price of `model`: the longest prefix in the table that `model` starts with (a
    /// provider prefix such as `openai/` is ignored).
    pub fn price(&self, model: &str) -> Option<Price> {
        let bare = model.rsplit('/').next().unwrap_or(model);
        self.prices
            .iter()
            .filter(|(prefix, _)| bare.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, p)| *p)
    }

    /// The cost of a call, `None` when the model has no known price.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<f64> {
        self.price(model).map(|p| p.cost(usage))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Price)> {
        self.prices.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// The user-facing explanation of a `budget_exceeded` event.
pub fn budget_message(b: &descartes_protocol::BudgetExceeded) -> String {
    let (spent, limit, next, flag) = if b.kind == "tokens" {
        (format!("{:.0} tokens", b.spent), format!("{:.0}", b.limit), format!("{:.0}", b.next_estimate), "--max-tokens")
    } else {
        (format!("${:.4}", b.spent), format!("${:.4}", b.limit), format!("${:.4}", b.next_estimate), "--max-cost-usd")
    };
    format!(
        "budget exceeded: {spent} spent of {limit}, and the next model call would add about {next}; resume with a \
         higher {flag}"
    )
}

/// Counts tokens of text for a model family (estimates where the exact tokenizer is unknown).
pub trait TokenCounter: Send + Sync {
    fn count(&self, text: &str) -> u64;

    /// Tokens of messages as sent to a model (text, tool calls and results; a few tokens of
    /// framing per message).
    fn count_messages(&self, messages: &[Message]) -> u64 {
        messages
            .iter()
            .map(|m| {
                4 + m
                    .content
                    .iter()
                    .map(|p| match p {
                        descartes_protocol::ContentPart::Text { text } => self.count(text),
                        descartes_protocol::ContentPart::Thinking { text, .. } => self.count(text),
                        descartes_protocol::ContentPart::ToolUse { name, input, .. } => {
                            self.count(name) + self.count(&input.to_string())
                        }
                        descartes_protocol::ContentPart::ToolResult { content, .. } => self.count(content),
                    })
                    .sum::<u64>()
            })
            .sum()
    }
}

/// The usage of a call whose provider reported none, counted with `counter`: the system prompt,
/// the messages and the tools' specs as input, the answer as output; marked
/// [`Usage::estimated`](descartes_protocol::Usage::estimated).
pub fn estimate_usage(
    counter: &dyn TokenCounter,
    system: Option<&str>,
    messages: &[descartes_protocol::Message],
    tools: &[descartes_protocol::ToolSpec],
    output: &[descartes_protocol::ContentPart],
) -> descartes_protocol::Usage {
    let tools: u64 = tools
        .iter()
        .map(|t| counter.count(&t.name) + counter.count(&t.description) + counter.count(&t.input_schema.to_string()))
        .sum();
    let input = counter.count_messages(messages) + system.map_or(0, |s| counter.count(s)) + tools;
    let answer = descartes_protocol::Message::new(descartes_protocol::Role::Assistant, output.to_vec());
    // The framing `count_messages` adds per message is the prompt's, not the answer's.
    let output_tokens = counter.count_messages(std::slice::from_ref(&answer)).saturating_sub(4);
    descartes_protocol::Usage { input_tokens: input, output_tokens, estimated: true, ..Default::default() }
}

/// A counter without a tokenizer: about four bytes per token.
#[derive(Debug, Default, Clone, Copy)]
pub struct ByteEstimate;

impl TokenCounter for ByteEstimate {
    fn count(&self, text: &str) -> u64 {
        (text.len() as u64).div_ceil(4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let t = PriceTable::with_defaults();
        assert_eq!(t.price("gpt-4o-mini-2024-07-18").map(|p| p.input), Some(0.15));
        assert_eq!(t.price("gpt-4o-2024-08-06").map(|p| p.input), Some(2.50));
        assert_eq!(t.price("claude-sonnet-4-20250514").map(|p| p.output), Some(15.0));
        assert_eq!(t.price("openai/gpt-4.1-mini").map(|p| p.input), Some(0.40));
        assert_eq!(t.price("llama3.2"), None);
    }

    #[test]
    fn cost_counts_every_kind_of_token() {
        let p = Price { input: 3.0, output: 15.0, cache_read: Some(0.3), cache_write: None };
        let u = Usage {
            input_tokens: 1_000_000,
            output_tokens: 100_000,
            cache_read_tokens: 1_000_000,
            cache_write_tokens: 0,
            estimated: false,
        };
        assert!((p.cost(&u) - (3.0 + 1.5 + 0.3)).abs() < 1e-9);
    }
}
