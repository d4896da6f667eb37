//! Property: the code that reads bytes from clients, providers and operators (event-stream
//! decoder, SSE usage scanner, Bedrock transcoders, JSON peek/rewrite, config loader, path
//! routing) never panics on arbitrary input, and reads well-formed input as a reference does
//! (its encoder, serde_json, the unsplit stream) however it is chunked: a bounded fuzz run in CI.
//! Cases per block: PROPTEST_CASES, else small defaults.

use std::sync::OnceLock;

use base64::Engine as _;
use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::{json, Map, Value};
use tollgate::config::load_str;
use tollgate::mock::{sse_events, MockUsage};
use tollgate::protocol::bedrock::{self, chunk_frame, SseToStream, StreamToSse};
use tollgate::protocol::eventstream::{encode, Decoder, Frame, FrameError, HeaderValue};
use tollgate::protocol::inbound::{from_bedrock, from_vertex, parse_path, Call};
use tollgate::protocol::json_peek::{peek_request, replace_string_value, rewrite_members, scan_object};
use tollgate::protocol::sse::SseUsageScanner;
use tollgate::protocol::usage::Usage;
use tollgate::protocol::vertex;

/// `default` cases, or PROPTEST_CASES when it is set.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

fn cuts() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..24)
}

/// `bytes` cut at the given points (empty chunks included, as a socket can deliver them).
fn split<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

// ---------------------------------------------------------------------------------------------
// Event-stream decoder
// ---------------------------------------------------------------------------------------------

/// What a decoder yields for `chunks`: the frames in order, the error that stopped it (the stream
/// is unusable after one), and the bytes it still holds.
fn decode_all(chunks: &[&[u8]]) -> (Vec<Frame>, Option<FrameError>, usize) {
    let mut d = Decoder::new();
    let mut frames = Vec::new();
    for c in chunks {
        d.feed(c);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e), d.pending()),
            }
        }
    }
    (frames, None, d.pending())
}

/// A prelude with a correct CRC around any lengths.
fn prelude(total: u32, headers_len: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&headers_len.to_be_bytes());
    let crc = crc32fast::hash(&p);
    p.extend_from_slice(&crc.to_be_bytes());
    p
}

/// A frame with correct lengths and CRCs around any header bytes: what reaches the header parser.
fn raw_frame(headers: &[u8], payload: &[u8]) -> Vec<u8> {
    let total = 12 + headers.len() + payload.len() + 4;
    let mut f = prelude(total as u32, headers.len() as u32);
    f.extend_from_slice(headers);
    f.extend_from_slice(payload);
    let crc = crc32fast::hash(&f);
    f.extend_from_slice(&crc.to_be_bytes());
    f
}

/// Header sections: random bytes, or name/type/value triples with any type byte and any length.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    let triple = (prop::collection::vec(any::<u8>(), 0..8), 0u8..12, prop::collection::vec(any::<u8>(), 0..20));
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(triple, 0..4).prop_map(|hs| {
            let mut b = Vec::new();
            for (name, t, value) in hs {
                b.push(name.len() as u8);
                b.extend_from_slice(&name);
                b.push(t);
                if t == 6 || t == 7 {
                    b.extend_from_slice(&(value.len() as u16).to_be_bytes());
                }
                b.extend_from_slice(&value);
            }
            b
        }),
    ]
}

/// A frame from the crate's encoder and the frame it must decode to. Names stay under the
/// format's 255 bytes; values sometimes run to a few KiB.
fn valid_frame() -> impl Strategy<Value = (Frame, Vec<u8>)> {
    let name = "[:a-zA-Z0-9_\\-é😀]{0,40}";
    let value = prop_oneof![3 => ".{0,40}", 1 => "[a-z]{0,1500}"];
    (prop::collection::vec((name, value), 0..5), prop::collection::vec(any::<u8>(), 0..200)).prop_map(
        |(headers, payload)| {
            let refs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let bytes = encode(&refs, &payload).to_vec();
            let headers = headers.into_iter().map(|(n, v)| (n, HeaderValue::String(v))).collect();
            (Frame { headers, payload: Bytes::from(payload) }, bytes)
        },
    )
}

/// Bytes a broken or hostile peer could send: noise, frames whose CRCs hold around garbage
/// headers, valid frames, and preludes with any lengths (tiny, inverted, huge).
fn hostile_stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..48),
        (header_bytes(), prop::collection::vec(any::<u8>(), 0..48)).prop_map(|(h, p)| raw_frame(&h, &p)),
        valid_frame().prop_map(|(_, b)| b),
        (any::<u32>(), any::<u32>()).prop_map(|(t, h)| prelude(t, h)),
        (0u32..64, 0u32..64).prop_map(|(t, h)| prelude(t, h)),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(cases(400))]

    /// Any bytes: no panic, no more frames than 16-byte minimal frames could fill, and the same
    /// frames and error whether the bytes come at once or in pieces.
    #[test]
    fn eventstream_hostile_bytes(bytes in hostile_stream(), cuts in cuts()) {
        let (frames, error, pending) = decode_all(&[&bytes]);
        prop_assert!(frames.len() <= bytes.len() / 16);
        prop_assert!(pending <= bytes.len());
        let (pieces, pieces_error, _) = decode_all(&split(&bytes, &cuts));
        prop_assert_eq!(pieces, frames);
        prop_assert_eq!(pieces_error, error);
    }

    /// Encoded frames, concatenated and cut anywhere, decode to exactly what was encoded.
    #[test]
    fn eventstream_valid_frames_round_trip(frames in prop::collection::vec(valid_frame(), 0..6), cuts in cuts()) {
        let wire: Vec<u8> = frames.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        let expected: Vec<Frame> = frames.into_iter().map(|(f, _)| f).collect();
        let (got, error, pending) = decode_all(&split(&wire, &cuts));
        prop_assert_eq!(error, None);
        prop_assert_eq!(got, expected);
        prop_assert_eq!(pending, 0);
    }

    /// One flipped bit anywhere in a frame is a CRC error (the prelude's for the first 12 bytes,
    /// the message's after), never a frame, even with a good frame behind it.
    #[test]
    fn eventstream_flipped_bit_is_a_crc_error(
        (_, frame) in valid_frame(), (_, next) in valid_frame(), bit in any::<Index>(), cuts in cuts(),
    ) {
        let mut wire = frame;
        let bit = bit.index(wire.len() * 8);
        wire[bit / 8] ^= 1 << (bit % 8);
        wire.extend_from_slice(&next);
        let (got, error, _) = decode_all(&split(&wire, &cuts));
        prop_assert!(got.is_empty(), "flipped bit {} decoded as {:?}", bit, got);
        let expected = if bit / 8 < 12 { FrameError::PreludeCrc } else { FrameError::MessageCrc };
        prop_assert_eq!(error, Some(expected));
    }
}

// ---------------------------------------------------------------------------------------------
// SSE usage scanner
// ---------------------------------------------------------------------------------------------

/// What a scanner reads from `chunks`.
fn scan(chunks: &[&[u8]]) -> (Usage, bool, Option<String>) {
    let mut s = SseUsageScanner::new();
    for c in chunks {
        s.feed(c);
    }
    (s.usage(), s.completed(), s.error_type().map(str::to_string))
}

/// A token count as a provider might (mis)write it.
fn count() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0u64..100_000).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => select(vec![json!(-1), json!(1.5), json!("7"), json!({})]),
    ]
}

fn usage_object() -> impl Strategy<Value = Value> {
    (count(), count(), count(), count(), prop::option::of((count(), count()))).prop_map(|(i, o, r, w, split)| {
        let mut u = json!({"input_tokens": i, "output_tokens": o, "cache_read_input_tokens": r,
            "cache_creation_input_tokens": w});
        if let Some((m5, h1)) = split {
            u["cache_creation"] = json!({"ephemeral_5m_input_tokens": m5, "ephemeral_1h_input_tokens": h1});
        }
        u
    })
}

/// SSE-looking lines: the events and data that carry usage, partial field names, noise.
fn sse_line() -> impl Strategy<Value = String> {
    let names =
        select(vec!["message_start", "message_delta", "message_stop", "error", "ping", "content_block_delta", ""]);
    prop_oneof![
        Just(String::new()),
        names.prop_map(|n| format!("event: {n}")),
        "(event|data|id|retry|:|ev|dat)[a-z_ :]{0,12}",
        usage_object().prop_map(|u| format!("data: {}", json!({"type": "message_start", "message": {"usage": u}}))),
        usage_object().prop_map(|u| format!("data:{}", json!({"type": "message_delta", "usage": u}))),
        "[a-z_]{0,12}".prop_map(|t| format!("data: {}", json!({"type": "error", "error": {"type": t}}))),
        Just("data: {\"type\":\"message_stop\"}".to_string()),
        ".{0,30}",
    ]
}

/// SSE-looking text, its lines ended by LF, CRLF, a lone CR or nothing.
fn sse_text() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((sse_line(), select(vec!["\n", "\n", "\r\n", "\r", ""])), 0..24)
        .prop_map(|lines| lines.into_iter().flat_map(|(l, end)| [l, end.to_string()]).collect::<String>().into_bytes())
}

/// Lines SSE lets appear anywhere in a stream without changing an event: comments (here ones
/// that quote usage), `id` and `retry`.
fn junk_line() -> impl Strategy<Value = String> {
    prop_oneof![
        "[^\r\n]{0,40}".prop_map(|t| format!(":{t}")),
        usage_object().prop_map(|u| format!(": data: {}", json!({"type": "message_delta", "usage": u}))),
        Just(": event: message_stop".to_string()),
        Just(":".to_string()),
        "[0-9a-z]{0,10}".prop_map(|t| format!("id: {t}")),
        "[0-9]{1,6}".prop_map(|t| format!("retry: {t}")),
    ]
}

/// The lines of a real streamed answer (the mock's event sequence) with `texts` as its deltas;
/// `""` is the blank line that ends an event.
fn anthropic_lines(u: &MockUsage, texts: &[String]) -> Vec<String> {
    let mut events = sse_events("claude-sonnet-5", u, 0);
    let stop = events.len() - 3; // content_block_stop, message_delta, message_stop follow
    for (i, t) in texts.iter().enumerate() {
        let delta = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}});
        events.insert(stop + i, Bytes::from(format!("event: content_block_delta\ndata: {delta}\n\n")));
    }
    let mut lines = Vec::new();
    for e in events {
        let text = std::str::from_utf8(&e).expect("the mock writes UTF-8");
        lines.extend(text.strip_suffix("\n\n").expect("events end with a blank line").split('\n').map(String::from));
        lines.push(String::new());
    }
    lines
}

/// `lines` joined, line `i` ended by CRLF where bit `i % 64` of `crlf` is set, LF elsewhere.
fn join_lines(lines: &[String], crlf: u64) -> Vec<u8> {
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        out.push_str(l);
        out.push_str(if crlf >> (i % 64) & 1 == 1 { "\r\n" } else { "\n" });
    }
    out.into_bytes()
}

/// `bytes` cut at the given points, or byte by byte when `cuts` is `None`.
fn split_sse<'a>(bytes: &'a [u8], cuts: Option<&[Index]>) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = match cuts {
        Some(cuts) => cuts.iter().map(|i| i.index(bytes.len() + 1)).collect(),
        None => (0..=bytes.len()).collect(),
    };
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

proptest! {
    #![proptest_config(cases(400))]

    /// Any bytes, and SSE-looking text: no panic, and the same usage, completion and error type
    /// read whole, in random chunks and byte by byte (the scanner reads whole lines in place and
    /// buffers split ones: both paths must agree).
    #[test]
    fn sse_any_bytes_read_the_same_in_any_chunks(
        bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..512), sse_text()], cuts in cuts(),
    ) {
        let whole = scan(&[&bytes]);
        prop_assert_eq!(scan(&split_sse(&bytes, Some(&cuts))), whole.clone());
        prop_assert_eq!(scan(&split_sse(&bytes, None)), whole);
    }

    /// A real answer's usage, with comments, `id` and `retry` lines anywhere, CRLF or LF line
    /// ends, cut anywhere, reads the same as the clean stream, and is the usage the answer sent.
    #[test]
    fn sse_usage_survives_comments_line_ends_and_splits(
        input in 0u64..2_000_000, output in 0u64..128_000, read in 0u64..1_000_000,
        w5 in 0u64..100_000, w1 in 0u64..100_000,
        texts in prop::collection::vec(".{0,40}", 0..6),
        junk in prop::collection::vec((any::<Index>(), junk_line()), 0..12),
        crlf in any::<u64>(), cuts in cuts(),
    ) {
        let u = MockUsage { input_tokens: input, output_tokens: output, cache_read_input_tokens: read,
            cache_creation_5m_input_tokens: w5, cache_creation_1h_input_tokens: w1, ..Default::default() };
        let lines = anthropic_lines(&u, &texts);
        let clean = scan(&[&join_lines(&lines, 0)]);
        let expected = Usage { input_tokens: input, output_tokens: output, cache_read_input_tokens: read,
            cache_creation_input_tokens: w5 + w1, cache_creation_5m_input_tokens: w5,
            cache_creation_1h_input_tokens: w1, ..Default::default() };
        prop_assert_eq!(&clean, &(expected, true, None));

        let mut noisy = lines;
        for (at, line) in junk {
            noisy.insert(at.index(noisy.len() + 1), line);
        }
        let bytes = join_lines(&noisy, crlf);
        prop_assert_eq!(scan(&split(&bytes, &cuts)), clean);
    }
}

// ---------------------------------------------------------------------------------------------
// Bedrock transcoders
// ---------------------------------------------------------------------------------------------

/// A reference SSE parser (the WHATWG rules): events as (name, data); lines end with LF, CRLF
/// or CR, a trailing partial line is dropped, an event without data is not dispatched.
fn parse_sse(bytes: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(bytes).replace("\r\n", "\n").replace('\r', "\n");
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop(); // after the last line end: incomplete
    let (mut out, mut name, mut data) = (Vec::new(), String::new(), None::<String>);
    for line in lines {
        if line.is_empty() {
            if let Some(d) = data.take() {
                out.push((std::mem::take(&mut name), d));
            }
            name.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => name = value.to_string(),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            _ => {}
        }
    }
    out
}

fn json_string_leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z\"\\\\{}\\[\\]:,é😀\\n\\t\\u{0}]{0,12}",
        select(vec![
            r#""model":"evil""#.to_string(),
            r#"","model":"evil"#.to_string(),
            "model".to_string(),
            "{\"model\":1}".to_string(),
            "\\u006dodel".to_string(),
            "event: message_delta\n\ndata: {}".to_string(),
        ]),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        select(vec![json!(0.5), json!(-1.25e10), json!(1e-7), json!(-0.0)]),
        json_string_leaf().prop_map(Value::String),
    ]
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z_]{1,8}",
        1 => select(vec!["model", "stream", "max_tokens", "type", "anthropic_beta"]).prop_map(String::from),
        1 => json_string_leaf(),
        1 => "\\PC{0,6}",
    ]
}

/// Any JSON value, a few levels deep, with decoys: nested `model` keys, strings that quote JSON.
fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(json_key(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// An SSE event as Anthropic writes one: (name, data), the data a one-line JSON object whose
/// `type` is the name.
fn sse_event() -> impl Strategy<Value = (String, String)> {
    ("[a-z_]{1,20}", prop::collection::btree_map(json_key(), json_value(), 0..4)).prop_map(|(kind, m)| {
        let mut m: Map<String, Value> = m.into_iter().collect();
        m.insert("type".into(), Value::String(kind.clone()));
        (kind, serde_json::to_string(&Value::Object(m)).expect("JSON serializes"))
    })
}

/// Frames a Bedrock stream could carry: chunk events, exceptions and unknown messages, with
/// payloads from valid (base64 of an event) to broken (not base64, not JSON, no `type`).
fn bedrock_frame() -> impl Strategy<Value = Vec<u8>> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let inner = prop_oneof![
        sse_event().prop_map(|(_, d)| d.into_bytes()),
        json_value().prop_map(|v| serde_json::to_vec(&v).expect("JSON serializes")),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    let payload = prop_oneof![
        3 => inner.prop_map(move |b| serde_json::to_vec(&json!({"bytes": b64(&b)})).expect("JSON serializes")),
        1 => "[ -~]{0,20}".prop_map(|s| serde_json::to_vec(&json!({"bytes": s})).expect("JSON serializes")),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).expect("JSON serializes")),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ];
    let message_type = select(vec!["event", "event", "exception", "error", "other"]);
    let event_type = select(vec!["chunk", "chunk", "metadata"]);
    let exception = select(vec!["throttlingException", "validationException", "modelStreamErrorException", ""]);
    (message_type, event_type, exception, payload).prop_map(|(m, e, x, p)| {
        encode(&[(":message-type", m), (":event-type", e), (":exception-type", x)], &p).to_vec()
    })
}

/// SSE through SseToStream in `cuts_a` pieces, then the frames back through StreamToSse in
/// `cuts_b` pieces.
fn sse_round_trip(sse: &[u8], cuts_a: &[Index], cuts_b: &[Index]) -> (Vec<u8>, Vec<u8>) {
    let mut to_frames = SseToStream::new();
    let mut frames = Vec::new();
    for c in split(sse, cuts_a) {
        frames.extend_from_slice(&to_frames.feed(c));
    }
    let mut to_sse = StreamToSse::new();
    let mut back = Vec::new();
    for c in split(&frames, cuts_b) {
        back.extend_from_slice(&to_sse.feed(c).expect("the frames SseToStream writes decode"));
    }
    (frames, back)
}

proptest! {
    #![proptest_config(cases(300))]

    /// Anthropic SSE to Bedrock frames and back, both cut anywhere: every event keeps its name
    /// and its data byte for byte (comment-only blocks and comments inside events drop out).
    #[test]
    fn bedrock_sse_to_frames_and_back(
        events in prop::collection::vec(sse_event(), 0..8), comments in any::<bool>(),
        cuts_a in cuts(), cuts_b in cuts(),
    ) {
        let mut sse = String::new();
        for (kind, data) in &events {
            if comments {
                sse.push_str(": ping\n\n: keep-alive\n");
            }
            sse.push_str(&format!("event: {kind}\ndata: {data}\n\n"));
        }
        let (frames, back) = sse_round_trip(sse.as_bytes(), &cuts_a, &cuts_b);
        prop_assert_eq!(decode_all(&[&frames]).0.len(), events.len());
        prop_assert_eq!(parse_sse(&back), events);
        if !comments {
            prop_assert_eq!(String::from_utf8_lossy(&back), sse);
        }
    }

    /// Any bytes into either transcoder: no panic, and whatever SSE came in, a Bedrock client
    /// gets only well-formed frames whose `bytes` are valid base64.
    #[test]
    fn bedrock_transcoders_take_any_bytes(
        frames in prop_oneof![hostile_stream(), prop::collection::vec(bedrock_frame(), 0..6).prop_map(|f| f.concat())],
        sse in prop_oneof![prop::collection::vec(any::<u8>(), 0..512), sse_text()],
        cuts in cuts(),
    ) {
        let mut to_sse = StreamToSse::new();
        for c in split(&frames, &cuts) {
            // Past an error the gateway stops reading; feeding on must still not panic.
            let _ = to_sse.feed(c);
        }
        let mut to_frames = SseToStream::new();
        let mut out = Vec::new();
        for c in split(&sse, &cuts) {
            out.extend_from_slice(&to_frames.feed(c));
        }
        let (got, error, pending) = decode_all(&[&out]);
        prop_assert_eq!(error, None);
        prop_assert_eq!(pending, 0);
        for f in got {
            // An `error` event becomes the exception frame Bedrock ends a stream with.
            if f.header(":message-type") == Some("exception") {
                prop_assert!(f.header(":exception-type").is_some());
                let v: Value = serde_json::from_slice(&f.payload).expect("exception payloads are JSON");
                prop_assert!(v["message"].is_string());
                continue;
            }
            prop_assert_eq!(f.header(":event-type"), Some("chunk"));
            let v: Value = serde_json::from_slice(&f.payload).expect("chunk payloads are JSON");
            let b = v["bytes"].as_str().expect("chunk payloads carry bytes");
            prop_assert!(base64::engine::general_purpose::STANDARD.decode(b).is_ok());
        }
    }

    /// Well-formed chunk frames (each a one-line event JSON) become one SSE event each, named by
    /// the JSON's `type`, the JSON as its data, at any split.
    #[test]
    fn bedrock_chunks_become_one_sse_event_each(events in prop::collection::vec(sse_event(), 0..8), cuts in cuts()) {
        let wire: Vec<u8> = events.iter().flat_map(|(_, d)| chunk_frame(d.as_bytes()).to_vec()).collect();
        let mut to_sse = StreamToSse::new();
        let mut out = Vec::new();
        for c in split(&wire, &cuts) {
            out.extend_from_slice(&to_sse.feed(c).expect("valid chunks transcode"));
        }
        prop_assert_eq!(parse_sse(&out), events);
    }
}

/// SSE events as the spec allows them: data of several lines, and CRLF line ends.
fn multiline_event() -> impl Strategy<Value = (String, String)> {
    (sse_event(), any::<bool>()).prop_map(|((kind, data), pretty)| {
        if pretty {
            let v: Value = serde_json::from_str(&data).expect("sse_event writes JSON");
            (kind, serde_json::to_string_pretty(&v).expect("JSON serializes"))
        } else {
            (kind, data)
        }
    })
}

proptest! {
    #![proptest_config(cases(300))]

    /// Spec-valid SSE, with multi-line data
    /// and CRLF line ends, should survive the round trip too.
    #[test]
    fn bedrock_spec_sse_round_trip(
        events in prop::collection::vec(multiline_event(), 1..6), crlf in any::<bool>(), cuts in cuts(),
    ) {
        let end = if crlf { "\r\n" } else { "\n" };
        let mut sse = String::new();
        for (kind, data) in &events {
            sse.push_str(&format!("event: {kind}{end}"));
            for line in data.split('\n') {
                sse.push_str(&format!("data: {line}{end}"));
            }
            sse.push_str(end);
        }
        prop_assert_eq!(parse_sse(sse.as_bytes()), events.clone(), "the test's own SSE");
        let (_, back) = sse_round_trip(sse.as_bytes(), &cuts, &[]);
        prop_assert_eq!(parse_sse(&back), events);
    }
}

// ---------------------------------------------------------------------------------------------
// JSON request peek and rewrites
// ---------------------------------------------------------------------------------------------

/// `s` as a JSON string, the characters picked by `escape` (bit `i % 64` for char `i`) written
/// as `\uXXXX` escapes (surrogate pairs beyond the BMP), in upper or lower case hex.
fn json_string(s: &str, escape: u64) -> String {
    let mut out = String::from("\"");
    for (i, c) in s.chars().enumerate() {
        if escape >> (i % 64) & 1 == 1 {
            for u in c.encode_utf16(&mut [0; 2]) {
                out.push_str(&if i % 2 == 0 { format!("\\u{u:04x}") } else { format!("\\u{u:04X}") });
            }
        } else {
            let q = serde_json::to_string(&c.to_string()).expect("a string serializes");
            out.push_str(&q[1..q.len() - 1]);
        }
    }
    out.push('"');
    out
}

const WS: &[&str] = &["", "", " ", "\n", "\t", "\r\n  ", "  "];

/// A request body as text, and the value serde_json must read from it: members in any order,
/// keys escaped at random (`"mod\u0065l"` is `model`), whitespace anywhere between tokens,
/// nested values compact or pretty. `model` is usually a string, sometimes absent or not one;
/// `anthropic_beta` sometimes a list of strings, sometimes anything.
fn request_doc() -> impl Strategy<Value = (Vec<u8>, Value)> {
    let model = prop::option::weighted(0.9, prop_oneof![9 => ".{0,20}".prop_map(Value::String), 1 => json_leaf()]);
    let betas = prop::option::of(prop_oneof![
        3 => prop::collection::vec("[a-z0-9\\-]{1,12}", 0..3).prop_map(|b| json!(b)),
        1 => json_value(),
    ]);
    (
        prop::collection::btree_map(json_key(), json_value(), 0..7),
        model,
        betas,
        any::<Index>(),
        any::<u64>(),
        prop::collection::vec(any::<Index>(), 32),
        any::<bool>(),
    )
        .prop_flat_map(|(mut members, model, betas, at, escape, ws, pretty)| {
            members.remove("model");
            if let Some(b) = betas {
                members.insert("anthropic_beta".into(), b);
            }
            let mut members: Vec<(String, Value)> = members.into_iter().collect();
            if let Some(m) = model {
                members.insert(at.index(members.len() + 1), ("model".into(), m));
            }
            (Just(members).prop_shuffle(), Just((escape, ws, pretty)))
        })
        .prop_map(|(members, (escape, ws, pretty))| {
            let mut gap = ws.iter().cycle().map(|i| WS[i.index(WS.len())]);
            let mut text = String::new();
            text.push_str(gap.next().unwrap_or(""));
            text.push('{');
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                text.push_str(gap.next().unwrap_or(""));
                text.push_str(&json_string(k, escape.rotate_left(i as u32 * 7)));
                text.push_str(gap.next().unwrap_or(""));
                text.push(':');
                text.push_str(gap.next().unwrap_or(""));
                let v = if pretty { serde_json::to_string_pretty(v) } else { serde_json::to_string(v) };
                text.push_str(&v.expect("JSON serializes"));
                text.push_str(gap.next().unwrap_or(""));
            }
            text.push('}');
            text.push_str(gap.next().unwrap_or(""));
            (text.into_bytes(), Value::Object(members.into_iter().collect()))
        })
}

/// A request body with a few bytes inserted, deleted or replaced: mostly broken JSON, some of it
/// still valid with a different meaning.
fn mutated_doc() -> impl Strategy<Value = Vec<u8>> {
    let byte = select(b"{}[]\":,\\ u0aelmodtrfn-.9\n\x00\xff".to_vec());
    (request_doc(), prop::collection::vec((any::<Index>(), 0u8..3, byte), 1..4)).prop_map(|((mut text, _), edits)| {
        for (at, op, b) in edits {
            let i = at.index(text.len() + 1);
            match op {
                0 => text.insert(i, b),
                1 if i < text.len() => {
                    text.remove(i);
                }
                _ if i < text.len() => text[i] = b,
                _ => text.push(b),
            }
        }
        text
    })
}

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("the rewrite is valid JSON")
}

fn without(doc: &Map<String, Value>, drop: &[&str]) -> Map<String, Value> {
    let mut m = doc.clone();
    for d in drop {
        m.remove(*d);
    }
    m
}

proptest! {
    #![proptest_config(cases(400))]

    /// Any bytes and broken bodies: no panic anywhere a body is read; and where serde_json (a
    /// provider's reading) also accepts the body, the scanner found the same top-level `model`
    /// and `stream`: no body can show the gateway one model and the provider another.
    #[test]
    fn json_any_bytes_and_no_model_smuggling(
        bytes in prop_oneof![prop::collection::vec(any::<u8>(), 0..256), mutated_doc()],
    ) {
        let _ = scan_object(&bytes, |_, span| {
            assert!(span.start <= span.end && span.end <= bytes.len());
            Ok(())
        });
        let _ = rewrite_members(&bytes, &["model", "stream"], &[("model", b"\"x\"")]);
        let _ = from_bedrock(&bytes, "m", true);
        let _ = from_vertex(&bytes, Some("m"));
        let _ = from_vertex(&bytes, None);
        let _ = bedrock::request_body(&bytes, Some("a, b,"));
        let _ = bedrock::count_tokens_body(&bytes);
        let _ = bedrock::count_tokens_answer(&bytes);
        let _ = bedrock::anthropic_error(400, &bytes);
        let _ = vertex::request_body(&bytes);
        let _ = vertex::count_tokens_body(&bytes);
        let _ = vertex::anthropic_error(400, &bytes);
        if let Ok(peek) = peek_request(&bytes) {
            if let Some((_, span)) = &peek.model {
                let _ = replace_string_value(&bytes, span.clone(), "claude-x");
            }
            if let Ok(Value::Object(v)) = serde_json::from_slice::<Value>(&bytes) {
                let theirs = v.get("model").and_then(Value::as_str);
                prop_assert_eq!(peek.model.as_ref().map(|(m, _)| m.as_str()), theirs);
                prop_assert_eq!(peek.stream, v.get("stream") == Some(&Value::Bool(true)));
            }
        }
    }

    /// Valid bodies, however written: peek finds the top-level `model` serde_json finds (never a
    /// nested or quoted one), refuses a non-string one, and every rewrite (the model replaced,
    /// members dropped and added, the Bedrock and Vertex envelopes removed) is JSON that
    /// serde_json reads as the original with exactly those changes.
    #[test]
    fn json_peek_and_rewrites_agree_with_serde(
        (text, doc) in request_doc(), replacement in ".{0,20}", drop_mask in any::<u64>(),
        model_id in ".{0,20}", stream in any::<bool>(),
    ) {
        prop_assert_eq!(&parse(&text), &doc, "the generator's text and value differ");
        let obj = doc.as_object().expect("an object");
        let peek = peek_request(&text);
        match obj.get("model") {
            Some(Value::String(m)) => {
                let peek = peek.expect("a valid body");
                let (found, span) = peek.model.clone().expect("model is found");
                prop_assert_eq!(&found, m);
                prop_assert_eq!(peek.stream, obj.get("stream") == Some(&Value::Bool(true)));
                prop_assert_eq!(peek.max_tokens, obj.get("max_tokens").and_then(Value::as_u64));
                let mut want = doc.clone();
                want["model"] = Value::String(replacement.clone());
                prop_assert_eq!(parse(&replace_string_value(&text, span, &replacement)), want);
            }
            Some(other) => prop_assert!(peek.is_err(), "model {} accepted", other),
            None => prop_assert_eq!(peek.expect("a valid body").model, None),
        }

        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        let drop: Vec<&str> =
            keys.iter().enumerate().filter(|(i, _)| drop_mask >> (i % 64) & 1 == 1).map(|(_, k)| *k).collect();
        let added = "tg_fuzz_added_member";
        let out = rewrite_members(&text, &drop, &[(added, br#"{"model":"nested"}"#)]).expect("a valid body");
        let mut want = without(obj, &drop);
        want.insert(added.into(), json!({"model": "nested"}));
        prop_assert_eq!(parse(&out), Value::Object(want));

        let bedrock = from_bedrock(&text, &model_id, stream);
        match obj.get("anthropic_beta").map(|b| serde_json::from_value::<Vec<String>>(b.clone())) {
            Some(Err(_)) => prop_assert!(bedrock.is_err()),
            betas => {
                let (body, got) = bedrock.expect("a valid body");
                prop_assert_eq!(got, betas.map(Result::unwrap).unwrap_or_default());
                let mut want = without(obj, &["anthropic_version", "anthropic_beta", "model", "stream"]);
                want.insert("model".into(), Value::String(model_id.clone()));
                if stream {
                    want.insert("stream".into(), Value::Bool(true));
                }
                prop_assert_eq!(parse(&body), Value::Object(want));
            }
        }
        let mut want = without(obj, &["anthropic_version", "model"]);
        want.insert("model".into(), Value::String(model_id.clone()));
        prop_assert_eq!(parse(&from_vertex(&text, Some(&model_id)).expect("a valid body")), Value::Object(want));
        let want = without(obj, &["anthropic_version"]);
        prop_assert_eq!(parse(&from_vertex(&text, None).expect("a valid body")), Value::Object(want));
    }
}

// ---------------------------------------------------------------------------------------------
// Config loader (what `tollgate check` runs: load, then build the state)
// ---------------------------------------------------------------------------------------------

const SHIPPED: &str = include_str!("../conf/tollgate.toml");

/// The value of every secret the fuzzed configs reference: it must never show in an error.
const SENTINEL: &str = "tg-fuzz-sentinel-5f0c2a9e";

/// Secrets in the environment, shaped as a token, as a JSON string and as a service-account
/// key (each holds the sentinel). Set once, before any config is read.
fn secrets_in_env() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        std::env::set_var("TG_FUZZ_SECRET", SENTINEL);
        std::env::set_var("TG_FUZZ_SECRET_JSON", format!("\"{SENTINEL}\""));
        let key = json!({"type": "service_account", "client_email": "fuzz@example.iam.gserviceaccount.com",
            "private_key": SENTINEL, "token_uri": "https://oauth2.googleapis.com/token"});
        std::env::set_var("TG_FUZZ_SECRET_KEY", key.to_string());
    });
}

/// Everything checking `text` can say: the load error, or the state's build error, or each
/// provider's reason not to be ready. Panics only if the code under test does.
fn check_config(text: &str) -> Vec<String> {
    let config = match load_str(text, "fuzz.toml") {
        Ok(c) => c,
        Err(e) => {
            assert!(e.line <= text.split('\n').count() && (e.line == 0 || e.column >= 1), "{e} is outside the text");
            return vec![e.to_string()];
        }
    };
    match tollgate::runtime::State::build(&config, None) {
        Err(e) => vec![e],
        Ok(state) => state.providers.iter().filter_map(|p| p.unready_reason()).collect(),
    }
}

const VALUES: &[&str] = &[
    "\"\"",
    "0",
    "-1",
    "1",
    "18446744073709551616",
    "9223372036854775807",
    "1.5",
    "nan",
    "-inf",
    "true",
    "[]",
    "{}",
    "[\"\"]",
    "{ a = 1 }",
    "\"0s\"",
    "\"1y\"",
    "\"18446744073709551615s\"",
    "\"99999999999999999999999s\"",
    "\"::1\"",
    "\"[::1]:0\"",
    "\"127.0.0.1:99999\"",
    "\"env:TG_FUZZ_SECRET\"",
    "\"env:TG_FUZZ_SECRET_JSON\"",
    "\"env:TG_FUZZ_SECRET_KEY\"",
    "\"env:TG_FUZZ_UNSET\"",
    "\"env:\"",
    "\"file:\"",
    "\"file:/nonexistent/tg-fuzz\"",
    "\"file:/dev/null\"",
    "\"http://\"",
    "\"https://[::1]:0/x?y#z\"",
    "\"ftp://x\"",
    "\"sha256:\"",
    "\"sha256:zz\"",
    "\"Mars/Olympus\"",
    "\"*\"",
    "\"é😀\\u0000\"",
    "\"\\ud800\"",
    "2027-01-01T00:00:00Z",
    "'''\n'''",
];

const SNIPPETS: &[&str] = &[
    "[[provider]]\nname = \"bedrock\"\nkind = \"bedrock\"\nregion = \"us-east-1\"\ncredential = \"env:TG_FUZZ_SECRET\"",
    "[[provider]]\nname = \"bedrock-sigv4\"\nkind = \"bedrock\"\nregion = \"us-east-1\"\n\
     aws = { access_key_id = \"env:TG_FUZZ_SECRET\", secret_access_key = \"env:TG_FUZZ_SECRET_JSON\" }",
    "[[provider]]\nname = \"vertex\"\nkind = \"vertex\"\nproject = \"p\"\nregion = \"us-east5\"\n\
     service_account = \"env:TG_FUZZ_SECRET_KEY\"",
    "[[provider]]\nname = \"vertex-json\"\nkind = \"vertex\"\nproject = \"p\"\nregion = \"global\"\n\
     service_account = \"env:TG_FUZZ_SECRET_JSON\"",
    "[[provider]]\nname = \"vertex-plain\"\nkind = \"vertex\"\nproject = \"p\"\nregion = \"global\"\n\
     service_account = \"env:TG_FUZZ_SECRET\"",
    "[[provider]]\nname = \"vertex-token\"\nkind = \"vertex\"\nproject = \"p\"\nregion = \"us-east5\"\n\
     credential = \"env:TG_FUZZ_SECRET\"",
    "[[provider]]\nname = \"pool\"\nkind = \"anthropic\"\n\
     endpoints = [{ url = \"https://a.example\" }, { url = \"http://127.0.0.1:1\", weight = 0 }]\n\
     credentials = [\"env:TG_FUZZ_SECRET\", \"env:TG_FUZZ_SECRET_JSON\"]\nselection = \"session_affinity\"",
    "[[jwt_issuer]]\nname = \"idp\"\nalgorithms = [\"HS256\"]\nsecrets = [{ secret = \"env:TG_FUZZ_SECRET\" }]",
    "[[jwt_issuer]]\nname = \"idp2\"\nissuer = \"x\"\nalgorithms = [\"RS256\"]\njwks_url = \"https://idp.example/jwks\"",
    "[[model]]\nname = \"via-clouds\"\n\
     deployments = [{ provider = \"bedrock\", model = \"anthropic.claude-sonnet-4-5-20250929-v1:0\" }, { provider = \"vertex\" }]",
    "[[key]]\nid = \"k2\"\nhash = \"sha256:e1e4b52abb42337543d5fec0eb66b7dbe9489135f7596d984aee31ab512a499a\"\n\
     expires = \"2027-01-01T00:00:00Z\"\nbudget = { usd = 5, period = \"daily\" }\nlimits = { rpm = 1 }",
    "[[price]]\nmatch = \"claude-*\"\ninput = 1e300\noutput = -0.0",
    "[[user]]\nid = \"u\"\nbudget = { usd = 0, period = \"none\" }",
    "[[listener]]\naddress = \"127.0.0.1:8081\"\nanonymous_key = \"local-dev\"",
];

#[derive(Debug, Clone)]
enum Edit {
    Delete(Index),
    Duplicate(Index),
    Truncate(Index),
    /// The value of one `key = value` (in a line or an inline table) becomes this.
    Replace(Index, &'static str),
    /// A commented-out line (the shipped file documents most options that way) comes in.
    Uncomment(Index),
    Insert(Index, &'static str),
    /// Every `env:NAME` reference names this variable instead.
    AllSecrets(&'static str),
}

fn edit(truncate: bool) -> impl Strategy<Value = Edit> {
    let secrets = select(vec!["TG_FUZZ_SECRET", "TG_FUZZ_SECRET_JSON", "TG_FUZZ_SECRET_KEY"]);
    prop_oneof![
        any::<Index>().prop_map(Edit::Delete),
        any::<Index>().prop_map(Edit::Duplicate),
        any::<Index>().prop_map(move |i| if truncate { Edit::Truncate(i) } else { Edit::Duplicate(i) }),
        (any::<Index>(), select(VALUES)).prop_map(|(i, v)| Edit::Replace(i, v)),
        any::<Index>().prop_map(Edit::Uncomment),
        (any::<Index>(), select(SNIPPETS)).prop_map(|(i, s)| Edit::Insert(i, s)),
        secrets.prop_map(Edit::AllSecrets),
    ]
}

fn apply(text: &str, e: &Edit) -> String {
    let mut lines: Vec<String> = text.split('\n').map(String::from).collect();
    let code = |l: &str| !l.trim_start().starts_with('#');
    match e {
        Edit::Delete(i) => {
            lines.remove(i.index(lines.len()));
        }
        Edit::Duplicate(i) => {
            let k = i.index(lines.len());
            lines.insert(k, lines[k].clone());
        }
        Edit::Truncate(i) => {
            let mut at = i.index(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            return text[..at].to_string();
        }
        Edit::Replace(i, value) => {
            let spots: Vec<(usize, usize)> = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| code(l))
                .flat_map(|(n, l)| l.match_indices('=').map(move |(at, _)| (n, at)))
                .collect();
            if spots.is_empty() {
                return text.to_string();
            }
            let (n, at) = spots[i.index(spots.len())];
            let line = &lines[n];
            let end = line[at..].find([',', '}']).map_or(line.len(), |e| at + e);
            lines[n] = format!("{}= {value}{}", &line[..at], &line[end..]);
        }
        Edit::Uncomment(i) => {
            let commented: Vec<usize> = (0..lines.len()).filter(|n| !code(&lines[*n])).collect();
            if let Some(n) = commented.get(i.index(commented.len().max(1))) {
                let l = lines[*n].trim_start();
                let l = l.strip_prefix('#').unwrap_or(l);
                lines[*n] = l.strip_prefix(' ').unwrap_or(l).to_string();
            }
        }
        Edit::Insert(i, snippet) => lines.insert(i.index(lines.len() + 1), snippet.to_string()),
        Edit::AllSecrets(name) => {
            let mut out = String::new();
            let mut rest = text;
            while let Some(at) = rest.find("env:") {
                out.push_str(&rest[..at + 4]);
                rest = &rest[at + 4..];
                let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
                out.push_str(name);
                rest = &rest[end..];
            }
            out.push_str(rest);
            return out;
        }
    }
    lines.join("\n")
}

/// Lines of the shipped file, some of them, in any order.
fn shuffled_shipped_lines() -> impl Strategy<Value = String> {
    let lines: Vec<&'static str> = SHIPPED.lines().collect();
    let n = lines.len();
    prop::sample::subsequence(lines, 0..=n).prop_shuffle().prop_map(|l| l.join("\n"))
}

proptest! {
    #![proptest_config(cases(150))]

    /// The shipped config, edited (lines deleted, duplicated, uncommented, inserted, the text
    /// truncated, values replaced, secrets pointed at variables holding a sentinel), and
    /// arbitrary text: checking never panics, an error points inside the text, and no error
    /// ever shows a secret's value.
    #[test]
    fn config_edits_load_or_fail_cleanly(
        edits in prop::collection::vec(edit(true), 1..5),
        noise in prop_oneof![Just(String::new()), any::<String>(), shuffled_shipped_lines()],
    ) {
        secrets_in_env();
        let mut text = SHIPPED.to_string();
        for e in &edits {
            text = apply(&text, e);
        }
        for t in [&text, &noise] {
            for message in check_config(t).iter() {
                prop_assert!(!message.contains(SENTINEL), "a secret's value in: {}", message);
            }
        }
    }

    /// A literal secret pasted where a reference belongs is refused without being echoed,
    /// whatever else the file gets wrong.
    #[test]
    fn config_literal_secret_is_never_echoed(
        which in any::<Index>(), secret in "[A-Za-z0-9_\\-]{8,40}",
        edits in prop::collection::vec(edit(false), 0..3),
    ) {
        secrets_in_env();
        let literal = format!("sk-tgfuzz-{secret}");
        let refs: Vec<usize> = SHIPPED.match_indices("\"env:").map(|(at, _)| at + 1).collect();
        let at = refs[which.index(refs.len())];
        let end = at + SHIPPED[at..].find('"').expect("a closing quote");
        let mut text = format!("{}{literal}{}", &SHIPPED[..at], &SHIPPED[end..]);
        for e in &edits {
            text = apply(&text, e);
        }
        for message in check_config(&text) {
            prop_assert!(!message.contains(&literal), "a pasted secret in: {}", message);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Path routing
// ---------------------------------------------------------------------------------------------

const SEGMENTS: &[&str] = &[
    "",
    ".",
    "..",
    "%2e%2e",
    "%2E%2E",
    ".%2e",
    "%2e.",
    "%2e",
    "%2F",
    "%2f",
    "..%2F..",
    "%2F..%2F",
    "%",
    "%z",
    "%zz",
    "%C3%A9",
    "%00",
    "%ff",
    "%25",
    "%2Fadmin",
    "admin",
    "metrics",
    "%61dmin",
    "v1",
    "messages",
    "count_tokens",
    "model",
    "m",
    "anthropic.claude-x-v1:0",
    "invoke",
    "invoke-with-response-stream",
    "projects",
    "p",
    "locations",
    "r",
    "publishers",
    "anthropic",
    "models",
    "m:rawPredict",
    "m:streamRawPredict",
    "count-tokens:rawPredict",
    "..:rawPredict",
    "bedrock",
    "vertex_ai",
    "é",
    "😀",
    ":",
    "?",
    "#",
    ";",
    " ",
    "\\",
];

const ROUTES: &[&str] = &[
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/anthropic/v1/messages",
    "/model/m/invoke",
    "/bedrock/model/m/invoke-with-response-stream",
    "/projects/p/locations/r/publishers/anthropic/models/m:rawPredict",
    "/vertex_ai/v1/projects/p/locations/r/publishers/anthropic/models/count-tokens:rawPredict",
    "/admin",
    "/admin/keys",
    "/metrics",
];

/// Request paths: segments that mean something to a router or a decoder, real routes with
/// things around them, arbitrary strings, and very long ones.
fn request_path() -> impl Strategy<Value = String> {
    let segments = prop::collection::vec((select(SEGMENTS), select(vec!["/", "/", "/", "//"])), 0..10)
        .prop_map(|s| s.iter().map(|(seg, sep)| format!("{sep}{seg}")).collect::<String>());
    prop_oneof![
        4 => segments.clone(),
        2 => (segments.clone(), select(ROUTES), segments).prop_map(|(a, r, b)| {
            let a = if a.is_empty() { a } else { a[1..].to_string() };
            if a.is_empty() { format!("{r}{b}") } else { format!("{r}/{a}{b}") }
        }),
        3 => (select(ROUTES), prop::collection::vec((any::<Index>(), any::<bool>(), select(SEGMENTS)), 1..4)).prop_map(
            |(route, edits)| {
                // A route with segments replaced or slipped in: `/model/%2e%2e/invoke`.
                let mut segs: Vec<&str> = route.split('/').skip(1).collect();
                for (at, replace, seg) in edits {
                    let i = at.index(segs.len() + 1);
                    if replace && i < segs.len() {
                        segs[i] = seg;
                    } else {
                        segs.insert(i, seg);
                    }
                }
                format!("/{}", segs.join("/"))
            }
        ),
        1 => any::<String>(),
        1 => ("/[a-z%./]{0,20}", 0usize..3000, "[a-z%./:]{0,20}").prop_map(|(a, n, b)| format!("{a}{}{b}", "../".repeat(n))),
    ]
}

/// `%XX` decoded wherever it is valid (the rest kept), as a lenient server or proxy would.
fn percent_decode_lossy(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%').then(|| s.get(i + 1..i + 3)).flatten().and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn names_admin_or_metrics(p: &str) -> bool {
    let p = p.trim_start_matches('/');
    ["admin", "metrics"].iter().any(|n| p.strip_prefix(n).is_some_and(|rest| rest.is_empty() || rest.starts_with('/')))
}

/// Path segments (`/`-separated) of `s` that are `..` or `.` once decoded.
fn dot_segments(s: &str) -> Vec<String> {
    percent_decode_lossy(s).split('/').filter(|seg| *seg == ".." || *seg == ".").map(String::from).collect()
}

proptest! {
    #![proptest_config(cases(1000))]

    /// Any path: no panic; a Messages call only at the four exact paths (no `//`, `..` or
    /// `%2F` spelling reaches one); nothing that names /admin or /metrics, raw or decoded, is a
    /// call; Bedrock and Vertex calls always carry a model, a Vertex one a single segment.
    #[test]
    fn paths_route_only_what_they_name(path in request_path()) {
        let call = parse_path(&path);
        if names_admin_or_metrics(&path) || names_admin_or_metrics(&percent_decode_lossy(&path)) {
            prop_assert_eq!(&call, &None, "{} is routed", path);
        }
        match &call {
            Some(Call::Messages) => {
                prop_assert!(["/v1/messages", "/anthropic/v1/messages"].contains(&path.as_str()), "{}", path)
            }
            Some(Call::CountTokens) => prop_assert!(
                ["/v1/messages/count_tokens", "/anthropic/v1/messages/count_tokens"].contains(&path.as_str()),
                "{}", path
            ),
            Some(Call::Bedrock { model, .. }) | Some(Call::BedrockCountTokens { model }) => {
                prop_assert!(!model.is_empty());
                prop_assert!(path.starts_with("/model/") || path.starts_with("/bedrock/model/"), "{}", path);
            }
            Some(Call::Vertex { model, .. }) => prop_assert!(!model.is_empty() && !model.contains('/'), "{}", path),
            Some(Call::VertexCountTokens) | None => {}
        }
    }

    /// A path parse_path accepts has no `..` segment,
    /// raw or percent-encoded.
    #[test]
    fn accepted_paths_have_no_dot_dot_segment(path in request_path()) {
        if parse_path(&path).is_some() {
            prop_assert!(!dot_segments(&path).contains(&"..".to_string()), "{} is accepted", path);
        }
    }

    /// Whatever model name a client sends (in a Bedrock path or in a body's `model`, passed on
    /// by a deployment without `model`), either the gateway refuses it before building a path
    /// (`is_path_safe_model_id`, and no `/` for Vertex), or it stays one segment of the upstream
    /// path: no `/`, `?`, `#` of its own, and never `.` or `..`.
    #[test]
    fn upstream_paths_keep_the_model_in_one_segment(
        model in prop_oneof![
            ".{1,30}",
            "[./%a-z?#]{1,12}",
            select(vec![".", "..", "claude-x/../../y"]).prop_map(String::from),
            // Names the gateway does send on: ids, version tags, ARNs.
            "[a-z0-9][a-z0-9.:@_-]{0,40}(/[a-z0-9.:@_-]{1,20})?",
        ],
        stream in any::<bool>(),
    ) {
        if !tollgate::protocol::is_path_safe_model_id(&model) {
            // Refused with a 400 before a path is built.
            return Ok(());
        }
        let invoke = bedrock::invoke_path(&model, stream);
        let parts: Vec<&str> = invoke.split('/').collect();
        prop_assert_eq!(parts.len(), 4, "{}", invoke);
        prop_assert!(!invoke.contains(['?', '#']) && dot_segments(&invoke).is_empty(), "{}", invoke);
        if !model.contains('/') {
            let predict = vertex::predict_path("p", "r", &model, stream);
            prop_assert_eq!(predict.split('/').count(), 10, "{}", predict);
            prop_assert!(!predict.contains(['?', '#']) && dot_segments(&predict).is_empty(), "{}", predict);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions: inputs the properties found (each was a bug, fixed).
// ---------------------------------------------------------------------------------------------

/// parse_path takes the Bedrock model id from everything between `/model/` and the last `/`,
/// then percent-decodes it: `..` segments pass, raw or encoded, and the decoded id names a
/// model `..` or `../../admin`.
#[test]
fn regression_dot_dot_in_accepted_paths() {
    for path in [
        "/model/../invoke",
        "/model/%2e%2e/invoke",
        "/model/..%2F..%2Fadmin/invoke",
        "/model/x/../../admin/invoke",
        "/bedrock/model/../invoke-with-response-stream",
        "/projects/../locations/r/publishers/anthropic/models/m:rawPredict",
    ] {
        assert_eq!(parse_path(path), None, "{path}");
    }
}

/// A pass-through Vertex deployment puts the requested model, as the client wrote it, into the
/// upstream path: `/`, `..`, `?` and `#` in it change which resource the gateway's credentials
/// reach (another model than the key may use, priced as the requested name). Bedrock's
/// percent-encoding leaves `.` unreserved, so a model named `..` or `.` is a dot segment there.
#[test]
fn regression_upstream_path_from_model_name() {
    let model = "claude-haiku-x/../claude-opus-4-1@20250805:rawPredict?";
    let path = vertex::predict_path("p", "r", model, false);
    assert!(!path.contains("/../") && !path.contains('?'), "{path}");
    // What would become a dot segment or leave the model's segment is refused before any path
    // is built (the gateway answers 400).
    for model in ["..", ".", "a/../b", "a/./b", "/a", "a//b", "#", "a?b", "a b", ""] {
        assert!(!tollgate::protocol::is_path_safe_model_id(model), "{model:?}");
    }
    for model in [
        "anthropic.claude-sonnet-4-5-20250929-v1:0",
        "claude-opus-4-1@20250805",
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-sonnet-4-5-20250929-v1:0",
    ] {
        assert!(tollgate::protocol::is_path_safe_model_id(model), "{model:?}");
    }
}

/// Spec-valid SSE with a multi-line `data` (a pretty-printed JSON event) becomes a chunk whose
/// JSON holds newlines; StreamToSse writes that JSON as one `data:` line, so the newlines end
/// the line early and the client reads `{` as the event's data.
#[test]
fn regression_multiline_sse_data_survives_transcoding() {
    let data = "{\n  \"type\": \"ping\"\n}";
    let (_, back) = sse_round_trip(b"event: ping\ndata: {\ndata:   \"type\": \"ping\"\ndata: }\n\n", &[], &[]);
    assert_eq!(parse_sse(&back), [("ping".to_string(), data.to_string())]);
}

/// SseToStream ends events only at `\n\n`: with CRLF line ends (valid SSE) it never emits a
/// frame and buffers the whole stream.
#[test]
fn regression_crlf_sse_events_are_framed() {
    let (frames, _) = sse_round_trip(b"event: ping\r\ndata: {\"type\":\"ping\"}\r\n\r\n", &[], &[]);
    assert_eq!(decode_all(&[&frames]).0.len(), 1);
}

/// A blank CRLF line whose CR ends one chunk and whose LF starts the next is classified from
/// its head `\r` as a line to skip, so the event does not end: a following event without an
/// `event:` line is read as part of the previous one (here a `ping`, whose data is not read) and
/// its usage is lost. Whole, the same bytes give 7 output tokens.
#[test]
fn regression_crlf_blank_line_split_between_cr_and_lf() {
    let stream: &[u8] = b"event: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\n\
        data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\r\n\r\n";
    let whole = scan(&[stream]);
    assert_eq!(whole.0.output_tokens, 7);
    let at = stream.windows(4).position(|w| w == b"\r\n\r\n").expect("a blank line") + 3;
    assert_eq!(scan(&[&stream[..at], &stream[at..]]), whole, "split at byte {at}");
}

/// A Vertex service-account secret that holds a JSON string (say a token pasted with its
/// quotes) is refused by serde_json with an error that quotes it, and that error is the
/// provider's reason not to be ready (`/readyz`, the logs).
#[test]
fn regression_service_account_error_shows_the_secret() {
    secrets_in_env();
    let text = format!("{SHIPPED}\n{}", SNIPPETS[3]);
    assert!(SNIPPETS[3].contains("service_account = \"env:TG_FUZZ_SECRET_JSON\""));
    for message in check_config(&text) {
        assert!(!message.contains(SENTINEL), "a secret's value in: {message}");
    }
}
