//! A small, allocation-conscious Server-Sent Events decoder (the `text/event-stream` format).
//!
//! Bytes go in as they arrive from the network (chunk boundaries anywhere, even inside a UTF-8
//! character or between `\r` and `\n`); whole events come out. Follows the WHATWG rules that
//! matter for model APIs: lines end with `\n`, `\r\n` or `\r`; `field: value` with one optional
//! space after the colon; `data` lines of one event are joined with `\n`; lines starting with
//! `:` are comments; a blank line dispatches the event; an event without data is not dispatched.

use std::fmt;

/// Refuse events (or lines) larger than this: a server that never sends a newline must not make
/// us buffer without bound.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// One dispatched SSE event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, if the event had one.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Why the byte stream is not SSE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseError {
    /// A field was not valid UTF-8.
    InvalidUtf8,
    /// A line or event exceeded [`MAX_EVENT_BYTES`].
    TooLarge,
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SseError::InvalidUtf8 => f.write_str("event stream is not valid UTF-8"),
            SseError::TooLarge => write!(f, "event stream line or event larger than {MAX_EVENT_BYTES} bytes"),
        }
    }
}

impl std::error::Error for SseError {}

/// Incremental SSE decoder.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    /// The previous chunk ended with `\r`: a leading `\n` of the next chunk belongs to it.
    skip_lf: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; complete events are appended to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if self.skip_lf && !input.is_empty() {
            if input[0] == b'\n' {
                input = &input[1..];
            }
            self.skip_lf = false;
        }
        while !input.is_empty() {
            let Some(pos) = input.iter().position(|&b| b == b'\n' || b == b'\r') else {
                if self.line.len() + input.len() > MAX_EVENT_BYTES {
                    return Err(SseError::TooLarge);
                }
                self.line.extend_from_slice(input);
                break;
            };
            if self.line.is_empty() {
                self.process_line(&input[..pos], out)?;
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&input[..pos]);
                let result = self.process_line(&line, out);
                line.clear();
                self.line = line;
                result?;
            }
            let mut next = pos + 1;
            if input[pos] == b'\r' {
                match input.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
            input = &input[next..];
        }
        Ok(())
    }

    /// The byte stream ended cleanly: an unterminated last line is taken as a line and a
    /// pending event is dispatched (lenient: some servers omit the final blank line).
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.process_line(&line, out)?;
        }
        self.dispatch(out);
        self.skip_lf = false;
        Ok(())
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                let value = value.strip_prefix(b" ").unwrap_or(value);
                (&line[..colon], value)
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                let value = std::str::from_utf8(value).map_err(|_| SseError::InvalidUtf8)?;
                if self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                    return Err(SseError::TooLarge);
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            b"event" => {
                let value = std::str::from_utf8(value).map_err(|_| SseError::InvalidUtf8)?;
                self.event = Some(value.to_owned());
            }
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        if self.has_data {
            out.push(SseEvent { event: self.event.take(), data: std::mem::take(&mut self.data) });
            self.has_data = false;
        } else {
            self.event = None;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn decode_chunks(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c, &mut out).unwrap();
        }
        d.finish(&mut out).unwrap();
        out
    }

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent { event: event.map(str::to_owned), data: data.to_owned() }
    }

    #[test]
    fn basic_events() {
        let out = decode_chunks(&[b"data: a\n\nevent: x\ndata: {\"k\":1}\n\n: comment\n\ndata:b\ndata:  c\n\n"]);
        assert_eq!(out, vec![ev(None, "a"), ev(Some("x"), "{\"k\":1}"), ev(None, "b\n c")]);
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let text = "event: message_start\r\ndata: {\"t\":\"h\u{e9}llo \u{1F600}\"}\r\n\r\nevent: ping\rdata: p\r\rdata: [DONE]\n\n";
        let whole = decode_chunks(&[text.as_bytes()]);
        assert_eq!(
            whole,
            vec![
                ev(Some("message_start"), "{\"t\":\"h\u{e9}llo \u{1F600}\"}"),
                ev(Some("ping"), "p"),
                ev(None, "[DONE]")
            ]
        );
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            for j in i..bytes.len() {
                let got = decode_chunks(&[&bytes[..i], &bytes[i..j], &bytes[j..]]);
                assert_eq!(got, whole, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn event_without_data_is_not_dispatched_and_name_resets() {
        let out = decode_chunks(&[b"event: a\n\ndata: x\n\n"]);
        assert_eq!(out, vec![ev(None, "x")]);
    }

    #[test]
    fn unterminated_last_event_is_flushed_on_clean_end() {
        let out = decode_chunks(&[b"data: one\n\ndata: [DONE]"]);
        assert_eq!(out, vec![ev(None, "one"), ev(None, "[DONE]")]);
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        assert_eq!(d.feed(b"data: \xff\xfe\n\n", &mut out), Err(SseError::InvalidUtf8));
    }

    #[test]
    fn field_without_colon_and_unknown_fields() {
        let out = decode_chunks(&[b"id: 7\nretry: 10\ndata\n\n"]);
        assert_eq!(out, vec![ev(None, "")]);
    }
}
