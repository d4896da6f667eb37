//! Reads usage out of an Anthropic SSE stream as it passes, chunk by chunk.
//!
//! The stream is never copied: lines are classified from their first bytes and the bulk of a
//! stream (`content_block_delta` data) is skipped with `memchr`. Only the few lines that carry
//! usage (`message_start`, `message_delta`, `error`) are parsed; when such a line straddles a
//! chunk boundary, just that line is buffered.

use memchr::memchr;

use super::usage::{Usage, UsageJson};

/// A usage line longer than this is not buffered (no real one comes near it).
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// No `event:` line in this event yet.
    Unnamed,
    MessageStart,
    MessageDelta,
    MessageStop,
    Error,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineState {
    /// At the start of a line, or inside one not yet classified (its head is in `line`).
    Undecided,
    /// Inside a line that matters; its bytes so far are in `line`.
    Keep,
    /// Inside a line that does not matter.
    Skip,
}

/// Accumulates usage across `feed` calls.
#[derive(Debug)]
pub struct SseUsageScanner {
    state: LineState,
    event: Event,
    line: Vec<u8>,
    usage: Usage,
    saw_message_stop: bool,
    error_type: Option<String>,
}

impl Default for SseUsageScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl SseUsageScanner {
    pub fn new() -> Self {
        SseUsageScanner {
            state: LineState::Undecided,
            event: Event::Unnamed,
            line: Vec::new(),
            usage: Usage::default(),
            saw_message_stop: false,
            error_type: None,
        }
    }

    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// True once `message_stop` went by: the stream is complete.
    pub fn completed(&self) -> bool {
        self.saw_message_stop
    }

    /// The `error.type` of an `error` event, if the stream carried one.
    pub fn error_type(&self) -> Option<&str> {
        self.error_type.as_deref()
    }

    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            let nl = memchr(b'\n', chunk);
            let (part, rest, ends_line) = match nl {
                Some(i) => (&chunk[..i], &chunk[i + 1..], true),
                None => (chunk, &chunk[chunk.len()..], false),
            };
            chunk = rest;
            match self.state {
                LineState::Skip => {}
                LineState::Keep => self.push(part),
                LineState::Undecided => {
                    if ends_line && self.line.is_empty() {
                        // The common case: a whole line inside one chunk, read in place.
                        self.line_done(part);
                        continue;
                    }
                    self.push(part);
                    self.state = self.classify();
                    if self.state == LineState::Skip {
                        self.line.clear();
                    }
                }
            }
            if ends_line {
                if self.state == LineState::Keep || self.state == LineState::Undecided {
                    let line = std::mem::take(&mut self.line);
                    self.line_done(&line);
                    self.line = line;
                    self.line.clear();
                }
                self.state = LineState::Undecided;
            }
        }
    }

    fn push(&mut self, part: &[u8]) {
        if self.line.len() + part.len() > MAX_LINE {
            self.line.clear();
            self.state = LineState::Skip;
        } else {
            self.line.extend_from_slice(part);
        }
    }

    /// Decides from the head of a partial line whether the rest must be kept.
    fn classify(&self) -> LineState {
        let head = &self.line[..];
        if head.starts_with(b"event:") {
            return LineState::Keep;
        }
        if head.starts_with(b"data:") {
            return match self.event {
                Event::MessageStart | Event::MessageDelta | Event::Error | Event::Unnamed => LineState::Keep,
                _ => LineState::Skip,
            };
        }
        // A lone CR may be the start of a blank CRLF line, which ends the event.
        if b"event:".starts_with(head) || b"data:".starts_with(head) || head == b"\r" {
            return LineState::Undecided;
        }
        LineState::Skip
    }

    fn line_done(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            // A blank line ends the event.
            self.event = Event::Unnamed;
        } else if let Some(name) = line.strip_prefix(b"event:") {
            self.event = match trim(name) {
                b"message_start" => Event::MessageStart,
                b"message_delta" => Event::MessageDelta,
                b"message_stop" => Event::MessageStop,
                b"error" => Event::Error,
                _ => Event::Other,
            };
            if self.event == Event::MessageStop {
                self.saw_message_stop = true;
            }
        } else if let Some(data) = line.strip_prefix(b"data:") {
            match self.event {
                Event::MessageStart | Event::MessageDelta | Event::Error | Event::Unnamed => self.data(trim(data)),
                _ => {}
            }
        }
    }

    fn data(&mut self, json: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Data {
            #[serde(rename = "type")]
            kind: String,
            message: Option<Message>,
            usage: Option<UsageJson>,
            error: Option<super::usage::ErrorJson>,
        }
        #[derive(serde::Deserialize)]
        struct Message {
            usage: Option<UsageJson>,
        }
        let Ok(d) = serde_json::from_slice::<Data>(json) else {
            return;
        };
        match d.kind.as_str() {
            "message_start" => {
                if let Some(u) = d.message.and_then(|m| m.usage) {
                    self.usage.apply(&u);
                }
            }
            "message_delta" => {
                if let Some(u) = d.usage {
                    self.usage.apply(&u);
                }
            }
            "message_stop" => self.saw_message_stop = true,
            "error" => {
                self.error_type = Some(d.error.and_then(|e| e.kind).unwrap_or_else(|| "error".into()));
            }
            _ => {}
        }
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| *c != b' ').unwrap_or(b.len());
    &b[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const STREAM: &str = "event: message_start\r\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":300,\"cache_read_input_tokens\":4000,\"cache_creation\":{\"ephemeral_5m_input_tokens\":100,\"ephemeral_1h_input_tokens\":200},\"output_tokens\":1}}}\r\n\r\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\ndata: {\"type\": \"ping\"}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"h\u{e9}llo \\\"message_delta\\\" data: \"}}\n\n\
event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    fn expected() -> Usage {
        Usage {
            input_tokens: 25,
            output_tokens: 15,
            cache_read_input_tokens: 4000,
            cache_creation_input_tokens: 300,
            cache_creation_5m_input_tokens: 100,
            cache_creation_1h_input_tokens: 200,
        }
    }

    #[test]
    fn whole_stream() {
        let mut s = SseUsageScanner::new();
        s.feed(STREAM.as_bytes());
        assert_eq!(s.usage(), expected());
        assert!(s.completed());
    }

    #[test]
    fn every_split_point_and_byte_by_byte() {
        let bytes = STREAM.as_bytes();
        for cut in 0..=bytes.len() {
            let mut s = SseUsageScanner::new();
            s.feed(&bytes[..cut]);
            s.feed(&bytes[cut..]);
            assert_eq!(s.usage(), expected(), "split at {cut}");
            assert!(s.completed());
        }
        let mut s = SseUsageScanner::new();
        for b in bytes {
            s.feed(std::slice::from_ref(b));
        }
        assert_eq!(s.usage(), expected());
    }

    #[test]
    fn truncated_stream_keeps_what_it_saw() {
        let bytes = STREAM.as_bytes();
        let cut = STREAM.find("event: message_delta").unwrap();
        let mut s = SseUsageScanner::new();
        s.feed(&bytes[..cut]);
        assert_eq!(s.usage().input_tokens, 25);
        assert_eq!(s.usage().output_tokens, 1);
        assert!(!s.completed());
    }

    #[test]
    fn error_event() {
        let mut s = SseUsageScanner::new();
        s.feed(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n");
        assert_eq!(s.error_type(), Some("overloaded_error"));
    }
}
