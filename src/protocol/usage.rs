//! Token usage as Anthropic reports it, and how the pieces of a response fold into one total.

use serde::{Deserialize, Serialize};

/// Tokens per billing class for one request, and what the provider says ran: the speed tier,
/// where inference ran, and the server tools it used (each billed on top of tokens).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// All cache writes; the split below says how many were 5-minute and 1-hour writes.
    pub cache_creation_input_tokens: u64,
    pub cache_creation_5m_input_tokens: u64,
    pub cache_creation_1h_input_tokens: u64,
    /// `usage.speed`: fast mode is billed at a multiple of the standard rates.
    #[serde(skip_serializing_if = "Speed::is_standard")]
    pub speed: Speed,
    /// `usage.inference_geo`, when the provider reports where the request ran.
    #[serde(skip_serializing_if = "Tag::is_empty")]
    pub inference_geo: Tag,
    /// `usage.server_tool_use.web_search_requests`: searches, billed per use.
    #[serde(skip_serializing_if = "is_zero")]
    pub web_search_requests: u64,
    /// `usage.server_tool_use.web_fetch_requests`: fetches (their content is billed as input).
    #[serde(skip_serializing_if = "is_zero")]
    pub web_fetch_requests: u64,
    /// Cache writes reported without a TTL split, counted above as 5-minute writes (the API's
    /// default TTL) until pricing knows better from the request.
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_writes_unsplit: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The speed tier a request ran at.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Speed {
    #[default]
    Standard,
    Fast,
}

impl Speed {
    pub fn is_standard(&self) -> bool {
        *self == Speed::Standard
    }

    /// Reads a `speed` value; anything but `fast` runs (and bills) at the standard tier.
    pub fn parse(s: &str) -> Speed {
        if s == "fast" {
            Speed::Fast
        } else {
            Speed::Standard
        }
    }
}

/// A short provider-reported label (`us`, `global`, ...) kept inline so [`Usage`] stays `Copy`.
/// Longer values are cut at a character boundary; no real label comes near the limit.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Tag {
    len: u8,
    bytes: [u8; 23],
}

impl Tag {
    pub fn new(s: &str) -> Tag {
        let mut end = s.len().min(23);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; 23];
        bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        Tag { len: end as u8, bytes }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Tag {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl Usage {
    /// Prompt tokens of every kind: what long-context price tiers are measured against.
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.cache_read_input_tokens).saturating_add(self.cache_creation_input_tokens)
    }

    pub fn is_zero(&self) -> bool {
        *self == Usage::default()
    }

    /// Applies a `usage` object: fields present replace what was known (a `message_delta`
    /// carries cumulative output and may revise the input side), absent or null ones are kept.
    pub fn apply(&mut self, u: &UsageJson) {
        if let Some(v) = u.input_tokens {
            self.input_tokens = v;
        }
        if let Some(v) = u.output_tokens {
            self.output_tokens = v;
        }
        if let Some(v) = u.cache_read_input_tokens {
            self.cache_read_input_tokens = v;
        }
        let split = u
            .cache_creation
            .as_ref()
            .map(|c| (c.ephemeral_5m_input_tokens.unwrap_or(0), c.ephemeral_1h_input_tokens.unwrap_or(0)));
        match (u.cache_creation_input_tokens, split) {
            (total, Some((m5, h1))) => {
                let explained = m5.saturating_add(h1);
                let total = total.unwrap_or(0).max(explained);
                self.set_cache_writes(total, h1);
                self.cache_writes_unsplit = total - explained;
            }
            // `message_delta` repeats the total without the split: keep the 1-hour part known
            // from `message_start`; only a difference nobody explained counts as 5-minute
            // writes, the API's default TTL, and is remembered as unsplit.
            (Some(total), None) => {
                let explained = self.cache_creation_input_tokens - self.cache_writes_unsplit;
                self.set_cache_writes(total, self.cache_creation_1h_input_tokens.min(total));
                self.cache_writes_unsplit = total.saturating_sub(explained);
            }
            (None, None) => {}
        }
        if let Some(speed) = &u.speed {
            self.speed = Speed::parse(speed);
        }
        if let Some(geo) = &u.inference_geo {
            self.inference_geo = Tag::new(geo);
        }
        // Counts are cumulative, like output tokens: a later report replaces an earlier one.
        if let Some(tools) = &u.server_tool_use {
            if let Some(n) = tools.web_search_requests {
                self.web_search_requests = n;
            }
            if let Some(n) = tools.web_fetch_requests {
                self.web_fetch_requests = n;
            }
        }
    }

    /// Counts the unsplit cache writes as 1-hour writes: the rule when the request asked for
    /// 1-hour caching. Returns whether anything moved.
    pub fn unsplit_writes_as_one_hour(&mut self) -> bool {
        let n = self.cache_writes_unsplit;
        if n == 0 {
            return false;
        }
        self.cache_creation_5m_input_tokens = self.cache_creation_5m_input_tokens.saturating_sub(n);
        self.cache_creation_1h_input_tokens += n;
        self.cache_writes_unsplit = 0;
        true
    }

    fn set_cache_writes(&mut self, total: u64, one_hour: u64) {
        self.cache_creation_input_tokens = total;
        self.cache_creation_1h_input_tokens = one_hour;
        self.cache_creation_5m_input_tokens = total - one_hour;
    }
}

/// The wire shape of a `usage` object; every field may be missing or null.
#[derive(Debug, Default, Deserialize)]
pub struct UsageJson {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cache_read_input_tokens: Option<u64>,
    pub cache_creation_input_tokens: Option<u64>,
    pub cache_creation: Option<CacheCreationJson>,
    pub speed: Option<String>,
    pub inference_geo: Option<String>,
    pub server_tool_use: Option<ServerToolUseJson>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ServerToolUseJson {
    pub web_search_requests: Option<u64>,
    pub web_fetch_requests: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct CacheCreationJson {
    pub ephemeral_5m_input_tokens: Option<u64>,
    pub ephemeral_1h_input_tokens: Option<u64>,
}

/// The part of an error body metering reads.
#[derive(Debug, Default, Deserialize)]
pub struct ErrorJson {
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

/// Reads usage from a complete non-streamed JSON body. `None` when the body is not a JSON
/// object, or its `usage` or `error` is not of their shape.
///
/// Only those two members are parsed: the top level is walked with the JSON peek (the content,
/// nearly all of the bytes, is skipped at memchr speed), not deserialized whole.
pub fn usage_from_json(body: &[u8]) -> Option<(Usage, Option<String>)> {
    let (mut usage_span, mut error_span) = (None, None);
    // A member given twice makes the body ambiguous: no usage is read from it.
    let twice = || super::json_peek::JsonError { what: "a member given twice", at: 0 };
    super::json_peek::scan_object(body, |key, span| {
        match key {
            "usage" if usage_span.is_some() => return Err(twice()),
            "error" if error_span.is_some() => return Err(twice()),
            "usage" => usage_span = Some(span),
            "error" => error_span = Some(span),
            _ => {}
        }
        Ok(())
    })
    .ok()?;
    let mut usage = Usage::default();
    if let Some(span) = usage_span {
        if let Some(u) = serde_json::from_slice::<Option<UsageJson>>(&body[span]).ok()? {
            usage.apply(&u);
        }
    }
    let error = match error_span {
        Some(span) => serde_json::from_slice::<Option<ErrorJson>>(&body[span]).ok()?.and_then(|e| e.kind),
        None => None,
    };
    Some((usage, error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_with_usage_twice_gives_no_usage() {
        let body = br#"{"usage":{"input_tokens":1,"output_tokens":1},"usage":{"input_tokens":9,"output_tokens":9}}"#;
        assert_eq!(usage_from_json(body), None);
        assert!(usage_from_json(br#"{"usage":{"input_tokens":1,"output_tokens":2}}"#).is_some());
        assert_eq!(usage_from_json(b"[1,2]"), None);
    }

    #[test]
    fn non_stream_usage_with_cache_split() {
        let body = br#"{"id":"msg_1","type":"message","content":[{"type":"text","text":"hi"}],
          "usage":{"input_tokens":12,"cache_creation_input_tokens":300,"cache_read_input_tokens":4000,
          "cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200},
          "output_tokens":55,"service_tier":"standard"}}"#;
        let (u, err) = usage_from_json(body).unwrap();
        assert_eq!(err, None);
        assert_eq!(
            u,
            Usage {
                input_tokens: 12,
                output_tokens: 55,
                cache_read_input_tokens: 4000,
                cache_creation_input_tokens: 300,
                cache_creation_5m_input_tokens: 100,
                cache_creation_1h_input_tokens: 200,
                ..Default::default()
            }
        );
    }

    #[test]
    fn delta_total_without_split_keeps_the_one_hour_part() {
        let mut u = Usage::default();
        let start: UsageJson = serde_json::from_str(
            r#"{"input_tokens":3,"cache_creation_input_tokens":2400,"cache_read_input_tokens":0,
                "cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":2400},"output_tokens":1}"#,
        )
        .unwrap();
        u.apply(&start);
        // The real message_delta: cumulative totals, no cache_creation object.
        let delta: UsageJson = serde_json::from_str(
            r#"{"input_tokens":3,"cache_creation_input_tokens":2400,"cache_read_input_tokens":0,"output_tokens":812}"#,
        )
        .unwrap();
        u.apply(&delta);
        assert_eq!((u.cache_creation_1h_input_tokens, u.cache_creation_5m_input_tokens), (2400, 0));
        assert_eq!(u.output_tokens, 812);
        // A larger total than the split explains: the difference is 5-minute writes.
        let more: UsageJson = serde_json::from_str(r#"{"cache_creation_input_tokens":2500}"#).unwrap();
        u.apply(&more);
        assert_eq!((u.cache_creation_1h_input_tokens, u.cache_creation_5m_input_tokens), (2400, 100));
        assert_eq!(u.cache_writes_unsplit, 100);
    }

    #[test]
    fn write_without_split_is_five_minutes() {
        let (u, _) =
            usage_from_json(br#"{"usage":{"input_tokens":1,"cache_creation_input_tokens":7,"output_tokens":2}}"#)
                .unwrap();
        assert_eq!(u.cache_creation_5m_input_tokens, 7);
        assert_eq!(u.cache_creation_1h_input_tokens, 0);
        assert_eq!(u.cache_writes_unsplit, 7);
    }
}
