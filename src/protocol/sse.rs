//! Reads usage out of an Anthropic SSE stream as it passes, chunk by chunk.
//!
//! The stream is never copied: lines are classified from their first bytes and the bulk of a
//! stream (`content_block_delta` data) is skipped with `memchr`. Only the few lines that carry
//! usage (`message_start`, `message_delta`, `error`) are parsed; when such a line straddles a
//! chunk boundary, just that line is buffered.
//!
//! For a stream that ends before its final `message_delta` (a client or provider cut, a
//! timeout), the scanner also counts the bytes of content streamed so far: every
//! `content_block_delta` data line beyond the smallest such event's wrapper. Each token is at
//! least one byte of text, and JSON escaping only adds bytes, so that count bounds the output
//! tokens that were streamed from above, without parsing a single delta.

use memchr::memchr;

use super::usage::{Usage, UsageJson};

/// A usage line longer than this is not buffered (no real one comes near it).
const MAX_LINE: usize = 1 << 20;

/// The bytes of the smallest `content_block_delta` data that carries no content:
/// `{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":""}}`.
const DELTA_WRAPPER: u64 = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// No `event:` line in this event yet.
    Unnamed,
    MessageStart,
    MessageDelta,
    MessageStop,
    Error,
    /// `content_block_delta`: only its size is counted (the bytes after `data:`).
    ContentDelta,
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
    /// Inside a content delta's data line: its bytes are counted, not kept.
    Count,
}

/// Accumulates usage across `feed` calls.
#[derive(Debug)]
pub struct SseUsageScanner {
    state: LineState,
    event: Event,
    line: Vec<u8>,
    usage: Usage,
    saw_message_stop: bool,
    /// A `message_delta` with usage went by: the output count is final.
    saw_final_usage: bool,
    /// The output count `message_start` reported (tokens before the first delta).
    start_output: u64,
    /// Bytes of the data line being counted so far (`Count` state).
    counting: u64,
    /// Upper bound of the content bytes streamed (see the module comment).
    content_bytes: u64,
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
            saw_final_usage: false,
            start_output: 0,
            counting: 0,
            content_bytes: 0,
            error_type: None,
        }
    }

    /// True once a `message_delta` reported usage: the provider's own final count.
    pub fn has_final_usage(&self) -> bool {
        self.saw_final_usage
    }

    /// An upper bound of the output tokens streamed so far, for a stream that ended without its
    /// final usage: the output `message_start` reported plus every content byte since.
    pub fn output_upper_bound(&self) -> u64 {
        self.usage.output_tokens.max(self.start_output.saturating_add(self.content_bytes))
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
                LineState::Count => self.counting += part.len() as u64,
                LineState::Keep => self.push(part),
                LineState::Undecided => {
                    if ends_line && self.line.is_empty() {
                        // The common case: a whole line inside one chunk, read in place.
                        self.line_done(part);
                        continue;
                    }
                    self.push(part);
                    self.state = self.classify();
                    if self.state == LineState::Count {
                        self.counting = self.line.len() as u64;
                    }
                    if matches!(self.state, LineState::Skip | LineState::Count) {
                        self.line.clear();
                    }
                }
            }
            if ends_line {
                if self.state == LineState::Count {
                    // `data:` is not content; the rest of the line counts, space and CR too.
                    self.add_content(self.counting.saturating_sub(5));
                    self.counting = 0;
                }
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

    fn add_content(&mut self, data_len: u64) {
        self.content_bytes = self.content_bytes.saturating_add(data_len.saturating_sub(DELTA_WRAPPER));
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
                Event::ContentDelta => LineState::Count,
                _ => LineState::Skip,
            };
        }
        // A lone CR may be the start of a blank CRLF line, which ends the event.
        if b"event:".starts_with(head) || b"data:".starts_with(head) || head == b"\r" {
            return LineState::Undecided;
        }
        LineState::Skip
    }

    fn line_done(&mut self, raw: &[u8]) {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            // A blank line ends the event.
            self.event = Event::Unnamed;
        } else if let Some(name) = line.strip_prefix(b"event:") {
            self.event = match trim(name) {
                b"message_start" => Event::MessageStart,
                b"message_delta" => Event::MessageDelta,
                b"message_stop" => Event::MessageStop,
                b"error" => Event::Error,
                b"content_block_delta" => Event::ContentDelta,
                _ => Event::Other,
            };
            if self.event == Event::MessageStop {
                self.saw_message_stop = true;
            }
        } else if let Some(data) = line.strip_prefix(b"data:") {
            match self.event {
                Event::MessageStart | Event::MessageDelta | Event::Error | Event::Unnamed => self.data(trim(data)),
                // Counted as the `Count` state counts a line split across chunks: every byte
                // after `data:`, so the bound does not depend on where chunks were cut.
                Event::ContentDelta => self.add_content(raw.len() as u64 - 5),
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
                    self.start_output = self.usage.output_tokens;
                }
            }
            "message_delta" => {
                if let Some(u) = d.usage {
                    self.usage.apply(&u);
                    self.saw_final_usage = true;
                }
            }
            // An unnamed event's content delta still counts.
            "content_block_delta" => self.add_content(json.len() as u64),
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
            ..Default::default()
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
