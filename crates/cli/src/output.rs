//! Printing: the human and JSON-lines sinks, the terminal permission prompt, event summaries.

use descartes_core::redact::redact;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use descartes_core::agent::summarize;
use descartes_core::{OutputSink, PermissionRequest, PromptAnswer, Prompter};
use descartes_protocol::{ContentPart, Event, EventData};

/// Whether colour may be used on stderr.
pub fn color() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

fn dim(s: &str) -> String {
    if color() { format!("\x1b[2m{s}\x1b[0m") } else { s.to_owned() }
}

/// Prints the answer to stdout as it streams, tool activity and notices to stderr.
pub struct HumanSink {
    mid_line: AtomicBool,
    out: Mutex<()>,
    /// Whether stdout is a terminal: the answer streams there as it comes; into a pipe or a
    /// file each model call's text is written only once the call succeeded, so a failed and
    /// retried call leaves no partial copy.
    live: bool,
    /// The current call's text not yet written (pipes and files).
    held: Mutex<String>,
    /// Whether the current call has streamed text to the terminal.
    streamed: AtomicBool,
    /// Tool calls whose start was shown and whose result is still to come (several when the
    /// model's read-only calls run in parallel), with their one-line summaries.
    /// The flag marks a call that ran beside others.
    pending_calls: Mutex<Vec<(String, String, bool)>>,
}

impl HumanSink {
    pub fn new() -> Self {
        Self {
            mid_line: AtomicBool::new(false),
            out: Mutex::new(()),
            live: std::io::stdout().is_terminal(),
            held: Mutex::new(String::new()),
            streamed: AtomicBool::new(false),
            pending_calls: Mutex::new(Vec::new()),
        }
    }

    fn write_answer(&self, text: &str) {
        let _guard = self.out.lock();
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(redact(text).as_bytes());
        let _ = out.flush();
        self.mid_line.store(!text.ends_with('\n'), Ordering::SeqCst);
    }

    /// Ends the answer's last line, so diagnostics start on their own line.
    pub fn end_line(&self) {
        if self.mid_line.swap(false, Ordering::SeqCst) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out);
            let _ = out.flush();
        }
    }
}

impl OutputSink for HumanSink {
    fn text_delta(&self, text: &str) {
        if text.is_empty() {
            return;
        }
        if self.live {
            self.streamed.store(true, Ordering::SeqCst);
            self.write_answer(text);
        } else if let Ok(mut held) = self.held.lock() {
            held.push_str(text);
        }
    }

    fn attempt_ended(&self, kept: bool) {
        let held = self.held.lock().map(|mut h| std::mem::take(&mut *h)).unwrap_or_default();
        let streamed = self.streamed.swap(false, Ordering::SeqCst);
        if kept {
            if !held.is_empty() {
                self.write_answer(&held);
            }
        } else if streamed {
            self.end_line();
            eprintln!("{}", dim("(the answer above was cut off and is discarded)"));
        }
    }

    fn event(&self, event: &Event) {
        match &event.data {
            EventData::ToolCallStarted(t) => {
                self.end_line();
                let summary = summarize(&t.tool, &t.input);
                eprintln!("{}", dim(&redact(&format!("▸ {summary}"))));
                if let Ok(mut pending) = self.pending_calls.lock() {
                    let batch = !pending.is_empty();
                    for p in pending.iter_mut() {
                        p.2 = true;
                    }
                    pending.push((t.call_id.clone(), summary, batch));
                }
            }
            // Refused calls never started; their notice already said why.
            EventData::ToolCallCompleted(t) => {
                let Ok(mut pending) = self.pending_calls.lock() else { return };
                let Some(at) = pending.iter().position(|(id, _, _)| *id == t.call_id) else { return };
                let (_, summary, batch) = pending.remove(at);
                let first = t.output.lines().next().unwrap_or("");
                let mark = if t.is_error { "✗" } else { "✓" };
                // Results of parallel calls arrive after all their starts: name the call.
                let line = if !batch {
                    format!("  {mark} {}", clip_line(first, 120))
                } else {
                    format!("  {mark} {}: {}", clip_line(&summary, 60), clip_line(first, 100))
                };
                eprintln!("{}", dim(&redact(&line)));
            }
            EventData::RunCompleted(_)
            | EventData::RunFailed(_)
            | EventData::RunCancelled(_)
            | EventData::BudgetExceeded(_) => self.end_line(),
            _ => {}
        }
    }

    fn notice(&self, message: &str) {
        self.end_line();
        eprintln!("descartes: {}", redact(message));
    }
}

/// Prints every event as one JSON line on stdout.
pub struct JsonSink;

impl OutputSink for JsonSink {
    fn event(&self, event: &Event) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", redact(&line));
            let _ = out.flush();
        }
    }
    fn notice(&self, message: &str) {
        eprintln!("descartes: {}", redact(message));
    }
}

/// Asks on the terminal (`/dev/tty`), so it works even when stdin is a pipe. Without a
/// terminal, nobody can be asked.
pub struct TerminalPrompter;

#[async_trait]
impl Prompter for TerminalPrompter {
    async fn ask(&self, request: &PermissionRequest) -> PromptAnswer {
        if !std::io::stderr().is_terminal() {
            return PromptAnswer::Unavailable;
        }
        let summary = request.summary.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(tty) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty") else {
                return PromptAnswer::Unavailable;
            };
            let mut reader = std::io::BufReader::new(&tty);
            loop {
                eprint!("\nAllow {summary}?\n  [y] yes, once   [a] yes, for this run   [n] no  > ");
                let _ = std::io::stderr().flush();
                let mut line = String::new();
                match std::io::BufRead::read_line(&mut reader, &mut line) {
                    Ok(0) | Err(_) => return PromptAnswer::Deny,
                    Ok(_) => {}
                }
                match line.trim().to_lowercase().as_str() {
                    "y" | "yes" => return PromptAnswer::AllowOnce,
                    "a" | "always" => return PromptAnswer::AllowForRun,
                    "n" | "no" | "" => return PromptAnswer::Deny,
                    _ => eprintln!("please answer y, a or n"),
                }
            }
        })
        .await
        .unwrap_or(PromptAnswer::Deny)
    }
}

/// Tokens for a table: `812`, `12.3k`, `4.56M`.
pub fn human_tokens(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.2}M", n as f64 / 1e6),
    }
}

/// Dollars for a table: `-` for nothing, `<$0.01`, `$1.23`.
pub fn money(usd: f64) -> String {
    if usd <= 0.0 {
        "-".into()
    } else if usd < 0.01 {
        "<$0.01".into()
    } else {
        format!("${usd:.2}")
    }
}

pub fn clip_line(s: &str, max: usize) -> String {
    let one: String = s.replace(['\n', '\r'], " ");
    if one.chars().count() <= max {
        return one;
    }
    let mut out: String = one.chars().take(max).collect();
    out.push('…');
    out
}

/// A one-line human summary of an event.
pub fn event_summary(e: &Event) -> String {
    match &e.data {
        EventData::RunStarted(s) => format!("\"{}\" ({}/{})", clip_line(&s.prompt, 80), s.provider, s.model),
        EventData::RunResumed(r) => format!("from {} ({}/{})", r.previous_status, r.provider, r.model),
        EventData::MessageAdded(m) => {
            let mut parts = Vec::new();
            let text = m.message.text();
            if !text.is_empty() {
                parts.push(clip_line(&text, 100));
            }
            for p in &m.message.content {
                match p {
                    ContentPart::ToolUse { name, input, .. } => {
                        parts.push(format!("[call {}]", summarize(name, input)))
                    }
                    ContentPart::ToolResult { tool_use_id, .. } => parts.push(format!("[result {tool_use_id}]")),
                    ContentPart::Thinking { .. } => parts.push("[thinking]".into()),
                    ContentPart::Text { .. } => {}
                }
            }
            format!("{}: {}", m.message.role.as_str(), parts.join(" "))
        }
        EventData::ModelCallStarted(c) => format!("turn {} {}/{}", c.turn, c.provider, c.model),
        EventData::ModelCallCompleted(c) => format!(
            "{}{} in / {} out tokens{}{}, {} ms{}",
            if c.usage.estimated { "~" } else { "" },
            c.usage.input_tokens,
            c.usage.output_tokens,
            if c.usage.estimated { " (counted by Descartes: no usage reported)" } else { "" },
            c.cost_usd.map(|usd| format!(", ${usd:.4}")).unwrap_or_default(),
            c.duration_ms,
            c.stop_reason.as_ref().map(|r| format!(", stop: {r}")).unwrap_or_default()
        ),
        EventData::ModelCallFailed(f) => format!(
            "{}{}",
            clip_line(&f.error, 120),
            match (f.attempt, f.retry_in_ms) {
                (Some(a), Some(ms)) => format!(" (attempt {a}, retry in {:.1}s)", ms as f64 / 1000.0),
                (Some(a), None) => format!(" (attempt {a}, not retried)"),
                _ => String::new(),
            }
        ),
        EventData::RunParked(p) => {
            format!(
                "{} rate-limited; continues at {}: {}",
                p.provider,
                p.until.to_local("%H:%M:%S"),
                clip_line(&p.reason, 80)
            )
        }
        EventData::BudgetExceeded(b) => descartes_core::cost::budget_message(b),
        EventData::ProviderSwitched(p) => {
            format!("{} -> {}/{}: {}", p.from, p.to, p.model, clip_line(&p.reason, 100))
        }
        EventData::BackendSession(b) => format!("{} session {}", b.backend, b.session_id),
        EventData::ToolCallStarted(t) => summarize(&t.tool, &t.input),
        EventData::ToolCallCompleted(t) => format!(
            "{} {}{}: {}",
            t.tool,
            if t.is_error { "error" } else { "ok" },
            if t.recovered { " (recovered)" } else { "" },
            clip_line(t.output.lines().next().unwrap_or(""), 100)
        ),
        EventData::PermissionDecided(p) => {
            format!("{:?} {} by {} ({}): {}", p.decision, p.tool, p.actor, p.rule, clip_line(&p.reason, 80))
                .to_lowercase()
        }
        EventData::RunCompleted(c) => {
            format!("{} turns, {} tokens: {}", c.turns, c.usage.total(), clip_line(&c.result, 80))
        }
        EventData::RunFailed(f) => format!("{}: {}", f.kind, clip_line(&f.error, 120)),
        EventData::RunCancelled(c) => c.reason.clone(),
        EventData::TaskCreated(t) => format!("\"{}\" (priority {})", clip_line(&t.task.title, 80), t.task.priority),
        EventData::TaskClaimed(c) => format!("by {} (token {}, attempt {})", c.worker, c.token, c.attempt),
        EventData::TaskFailed(f) => {
            format!("{}{}", clip_line(&f.reason, 100), if f.is_final { " (final)" } else { "" })
        }
        EventData::TaskLeaseExpired(x) => format!("worker {} lost the lease (token {})", x.worker, x.token),
        EventData::TaskBlocked(b) => format!("by {}", b.dependency),
        other => clip_line(&other.to_json().unwrap_or_default(), 100),
    }
}
