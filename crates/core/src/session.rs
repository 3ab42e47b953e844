//! Sessions (interactive chats) and context-window management.
//!
//! A session is a run marked by `session_started`. Each turn appends the user's message and
//! the loop's events to the same log. When a conversation grows past a threshold of the model's
//! context window it is compacted: the old turns are summarised by the model (one call, no
//! tools), the system prompt, the recent turns and pinned messages are kept; when summarising
//! fails the old turns are dropped (truncation). Either way a `context_compacted` event records
//! it and the fold applies it, so a resumed session sends the compacted conversation.

use std::sync::Arc;

use descartes_protocol::{ContentPart, ContextCompacted, Event, EventData, Message, Role};
use futures::StreamExt;

use crate::cost::TokenCounter;
use crate::provider::{ModelRequest, Provider, ProviderError, ResponseAssembler};
use crate::state::RunState;

/// When and how to compact.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContextPolicy {
    /// The model's context window in tokens.
    pub window: u64,
    /// Compact when the conversation (with the system prompt) reaches this fraction of it.
    pub compact_at: f64,
    /// Turns (a user message and everything after it) always kept verbatim.
    pub keep_turns: usize,
}

impl Default for ContextPolicy {
    fn default() -> Self {
        Self { window: 128_000, compact_at: 0.8, keep_turns: 2 }
    }
}

impl ContextPolicy {
    /// The token count at which a conversation is compacted.
    pub fn threshold(&self) -> u64 {
        (self.window as f64 * self.compact_at.clamp(0.05, 1.0)) as u64
    }
}

/// Tokens of a conversation as sent: the system prompt and the messages.
pub fn conversation_tokens(counter: &dyn TokenCounter, system: Option<&str>, messages: &[Message]) -> u64 {
    counter.count_messages(messages) + system.map_or(0, |s| counter.count(s))
}

/// Tokens of each message (for `/cost` and the compaction plan).
pub fn message_tokens(counter: &dyn TokenCounter, messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| counter.count_messages(std::slice::from_ref(m))).collect()
}

/// Whether `m` starts a turn: a user message that is not only tool results.
fn starts_turn(m: &Message) -> bool {
    m.role == Role::User && m.content.iter().any(|p| !matches!(p, ContentPart::ToolResult { .. }))
}

/// How many leading messages to replace so that the last `keep_turns` turns stay. The cut is
/// always at the start of a turn (a tool call and its result are never separated). `None` when
/// there is nothing old enough to replace.
pub fn plan_compaction(messages: &[Message], keep_turns: usize) -> Option<usize> {
    let starts: Vec<usize> = messages.iter().enumerate().filter(|(_, m)| starts_turn(m)).map(|(i, _)| i).collect();
    let keep = keep_turns.max(1);
    if starts.len() <= keep {
        return None;
    }
    let cut = starts[starts.len() - keep];
    (cut > 0).then_some(cut)
}

/// The conversation as plain text, for the summariser and for search.
pub fn render_plain(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        for part in &m.content {
            match part {
                ContentPart::Text { text } => {
                    out.push_str(&format!("{}: {}\n", m.role.as_str(), text));
                }
                ContentPart::ToolUse { name, input, .. } => {
                    out.push_str(&format!("{} called tool {name} with {input}\n", m.role.as_str()));
                }
                ContentPart::ToolResult { content, is_error, .. } => {
                    let clipped: String = content.chars().take(2000).collect();
                    let label = if *is_error { "tool error" } else { "tool result" };
                    out.push_str(&format!("{label}: {clipped}\n"));
                }
                ContentPart::Thinking { .. } => {}
            }
        }
    }
    out
}

const SUMMARY_PROMPT: &str = "You compact a conversation between a user and an AI assistant so it can continue \
within a limited context window. Summarise the conversation below: the user's goals and requests, decisions made, \
facts learned (file names, commands, results, numbers), and what is still open. Be concise and specific; write \
only the summary.";

/// Asks the model for a summary of `messages` (one call, no tools).
pub async fn summarize(
    provider: &dyn Provider,
    model: &str,
    messages: &[Message],
    max_tokens: Option<u32>,
) -> Result<String, ProviderError> {
    let request = ModelRequest {
        model: model.to_owned(),
        system: Some(SUMMARY_PROMPT.to_owned()),
        messages: Arc::new(vec![Message::user_text(format!(
            "<conversation>\n{}</conversation>\n\nSummarise it.",
            render_plain(messages)
        ))]),
        tools: Arc::new(Vec::new()),
        max_tokens,
        temperature: None,
    };
    let mut stream = provider.stream(request).await?;
    let mut assembler = ResponseAssembler::default();
    while let Some(item) = stream.next().await {
        assembler.push(item?);
        if assembler.stopped {
            break;
        }
    }
    let text = Message::new(Role::Assistant, assembler.finish()).text();
    if text.trim().is_empty() {
        return Err(ProviderError::Protocol {
            provider: provider.name().to_owned(),
            message: "the summary was empty".into(),
        });
    }
    Ok(text.trim().to_owned())
}

/// Compacts a session's conversation: summarises the turns before the last
/// `policy.keep_turns` (truncation when the summary call fails). Returns the event to append,
/// or `None` when there is nothing to compact. `trigger` says why (`threshold`, `command`).
pub async fn compact(
    state: &RunState,
    provider: &dyn Provider,
    model: &str,
    counter: &dyn TokenCounter,
    system: Option<&str>,
    policy: &ContextPolicy,
    trigger: &str,
) -> Option<(ContextCompacted, Option<ProviderError>)> {
    let messages = state.messages();
    let replaced = plan_compaction(messages, policy.keep_turns)?;
    let tokens_before = conversation_tokens(counter, system, messages);
    let old = &messages[..replaced];
    let (summary, error) = match summarize(provider, model, old, None).await {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(e)),
    };
    let method = if summary.is_some() { "summary" } else { "truncate" };
    let mut kept_messages: Vec<Message> = summary.iter().map(|s| summary_message(s)).collect();
    kept_messages.extend(state.pinned.iter().filter(|i| **i < replaced).map(|i| messages[*i].clone()));
    kept_messages.extend_from_slice(&messages[replaced..]);
    let tokens_after = conversation_tokens(counter, system, &kept_messages);
    Some((
        ContextCompacted {
            summary,
            replaced: replaced as u64,
            kept: (messages.len() - replaced) as u64,
            tokens_before,
            tokens_after,
            method: method.to_owned(),
            trigger: trigger.to_owned(),
        },
        error,
    ))
}

/// The message a compaction summary becomes in the conversation.
pub fn summary_message(summary: &str) -> Message {
    Message::user_text(format!("[Summary of the earlier conversation]\n{summary}"))
}

/// One entry of a session's transcript (every message ever added, compaction markers too).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TranscriptEntry {
    /// `user`, `assistant`, `tool`, `compaction`, `cancelled`.
    pub role: String,
    pub text: String,
    pub at: descartes_protocol::Timestamp,
}

/// The transcript of a session from its events: user and assistant text, tool calls and
/// results (abridged), compactions and cancelled turns. Unlike the fold, nothing compacted away
/// is missing.
pub fn transcript(events: &[Event]) -> Vec<TranscriptEntry> {
    let mut out = Vec::new();
    for e in events {
        let mut push = |role: &str, text: String| out.push(TranscriptEntry { role: role.to_owned(), text, at: e.at });
        match &e.data {
            EventData::MessageAdded(m) => {
                let role = m.message.role;
                let text = m.message.text();
                if !text.trim().is_empty() {
                    push(role.as_str(), text);
                }
                for part in &m.message.content {
                    match part {
                        ContentPart::ToolUse { name, input, .. } => push("tool", format!("{name} {input}")),
                        ContentPart::ToolResult { content, .. } => {
                            let first: String = content.lines().next().unwrap_or("").chars().take(200).collect();
                            push("tool", format!("→ {first}"));
                        }
                        _ => {}
                    }
                }
            }
            EventData::ContextCompacted(c) => push(
                "compaction",
                format!(
                    "{} earlier messages {} ({} → {} tokens)",
                    c.replaced,
                    if c.method == "summary" { "summarised" } else { "dropped" },
                    c.tokens_before,
                    c.tokens_after
                ),
            ),
            EventData::RunCancelled(_) => push("cancelled", "the answer was cancelled".into()),
            _ => {}
        }
    }
    out
}

/// The transcript as Markdown.
pub fn transcript_markdown(title: &str, entries: &[TranscriptEntry]) -> String {
    let mut out = format!("# {}\n", title.lines().next().unwrap_or(""));
    for e in entries {
        let heading = match e.role.as_str() {
            "user" => "## User",
            "assistant" => "## Assistant",
            "tool" => "### Tool",
            "compaction" => "### Compaction",
            "cancelled" => "### Cancelled",
            _ => "## System",
        };
        out.push_str(&format!("\n{heading}\n\n{}\n", e.text.trim_end()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Scripted, ScriptedProvider};
    use descartes_protocol::{MessageAdded, MessagePinned, RunId};

    fn conversation(turns: usize) -> RunState {
        let mut st = RunState::new(RunId::from("r"));
        for i in 0..turns {
            let filler = "and some more words to make the turn longer than its summary ".repeat(3);
            for m in
                [Message::user_text(format!("question {i}")), Message::assistant_text(format!("answer {i} {filler}"))]
            {
                st.apply(0, &EventData::MessageAdded(MessageAdded { message: m, model_call_id: None }));
            }
        }
        st
    }

    #[test]
    fn the_plan_keeps_the_recent_turns_and_cuts_at_a_turn() {
        let st = conversation(4);
        assert_eq!(plan_compaction(st.messages(), 2), Some(4));
        assert_eq!(plan_compaction(st.messages(), 4), None);
    }

    #[tokio::test]
    async fn compaction_summarises_keeps_pins_and_the_fold_applies_it() {
        let mut st = conversation(4);
        st.apply(0, &EventData::MessagePinned(MessagePinned { index: 2 }));
        let provider = ScriptedProvider::new(|_, _| Scripted::Text("they asked four questions".into()));
        let counter = crate::cost::ByteEstimate;
        let policy = ContextPolicy { window: 100, compact_at: 0.5, keep_turns: 2 };
        let (event, err) = compact(&st, &provider, "m", &counter, Some("sys"), &policy, "command").await.unwrap();
        assert!(err.is_none());
        assert_eq!((event.replaced, event.kept, event.method.as_str()), (4, 4, "summary"));
        assert!(event.tokens_after < event.tokens_before, "{event:?}");
        st.apply(0, &EventData::ContextCompacted(event));
        let texts: Vec<String> = st.messages().iter().map(Message::text).collect();
        assert!(texts[0].contains("they asked four questions"), "{texts:?}");
        assert_eq!(texts[1], "question 1", "the pinned message stays");
        assert_eq!(texts[2], "question 2");
        assert!(texts[3].starts_with("answer 2") && texts[5].starts_with("answer 3"), "{texts:?}");
        assert_eq!(st.pinned.iter().copied().collect::<Vec<_>>(), vec![1]);
    }

    #[tokio::test]
    async fn a_failed_summary_truncates() {
        let st = conversation(3);
        let provider = ScriptedProvider::new(|_, _| {
            Scripted::Fail(ProviderError::Protocol { provider: "p".into(), message: "down".into() })
        });
        let counter = crate::cost::ByteEstimate;
        let (event, err) =
            compact(&st, &provider, "m", &counter, None, &ContextPolicy::default(), "threshold").await.unwrap();
        assert!(err.is_some());
        assert_eq!((event.method.as_str(), event.summary.as_deref()), ("truncate", None));
        let mut st = st;
        st.apply(0, &EventData::ContextCompacted(event));
        assert_eq!(st.messages().len(), 4);
        assert_eq!(st.messages()[0].text(), "question 1");
    }
}
