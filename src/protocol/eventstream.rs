//! AWS event-stream framing (`application/vnd.amazon.eventstream`), as Bedrock streams answers:
//!
//! ```text
//! total length (u32) | headers length (u32) | prelude CRC (u32) | headers | payload | message CRC (u32)
//! ```
//!
//! Big-endian, CRC-32 (IEEE) over the prelude and over everything before the message CRC. Each
//! header is a name (u8 length) and a typed value; Bedrock only uses strings. The decoder is
//! incremental: frames may arrive split anywhere, and only an incomplete frame is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

const PRELUDE: usize = 12;
const MIN_FRAME: usize = PRELUDE + 4;
/// AWS caps a message at 16 MiB; anything larger is a broken stream, not a big answer.
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Bool(bool),
    Byte(i8),
    Short(i16),
    Int(i32),
    Long(i64),
    Bytes(Bytes),
    String(String),
    Timestamp(i64),
    Uuid([u8; 16]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub headers: Vec<(String, HeaderValue)>,
    pub payload: Bytes,
}

impl Frame {
    /// A string header's value (`:event-type`, `:message-type`, `:exception-type`, ...).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).and_then(|(_, v)| match v {
            HeaderValue::String(s) => Some(s.as_str()),
            _ => None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("event-stream prelude CRC mismatch")]
    PreludeCrc,
    #[error("event-stream message CRC mismatch")]
    MessageCrc,
    #[error("event-stream frame length {0} is out of bounds")]
    Length(usize),
    #[error("event-stream headers are malformed: {0}")]
    Headers(&'static str),
}

/// Incremental decoder: feed bytes as they arrive, take whole frames out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn new() -> Self {
        Decoder::default()
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes held that do not make a whole frame yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `None` until one is complete. After an error the stream is
    /// unusable: framing cannot be found again.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < PRELUDE {
            return Ok(None);
        }
        let total = u32::from_be_bytes(self.buf[0..4].try_into().expect("4 bytes")) as usize;
        let headers_len = u32::from_be_bytes(self.buf[4..8].try_into().expect("4 bytes")) as usize;
        let prelude_crc = u32::from_be_bytes(self.buf[8..12].try_into().expect("4 bytes"));
        if crc32fast::hash(&self.buf[..8]) != prelude_crc {
            return Err(FrameError::PreludeCrc);
        }
        if !(MIN_FRAME..=MAX_FRAME).contains(&total) || headers_len > total - MIN_FRAME {
            return Err(FrameError::Length(total));
        }
        if self.buf.len() < total {
            return Ok(None);
        }
        let frame = self.buf.split_to(total).freeze();
        let message_crc = u32::from_be_bytes(frame[total - 4..].try_into().expect("4 bytes"));
        if crc32fast::hash(&frame[..total - 4]) != message_crc {
            return Err(FrameError::MessageCrc);
        }
        let headers = parse_headers(&frame[PRELUDE..PRELUDE + headers_len])?;
        let payload = frame.slice(PRELUDE + headers_len..total - 4);
        Ok(Some(Frame { headers, payload }))
    }
}

fn parse_headers(mut b: &[u8]) -> Result<Vec<(String, HeaderValue)>, FrameError> {
    let mut out = Vec::new();
    let need = |b: &[u8], n: usize| if b.len() < n { Err(FrameError::Headers("truncated")) } else { Ok(()) };
    while !b.is_empty() {
        let name_len = b.get_u8() as usize;
        need(b, name_len + 1)?;
        let name =
            std::str::from_utf8(&b[..name_len]).map_err(|_| FrameError::Headers("name is not UTF-8"))?.to_string();
        b.advance(name_len);
        let value = match b.get_u8() {
            0 => HeaderValue::Bool(true),
            1 => HeaderValue::Bool(false),
            2 => {
                need(b, 1)?;
                HeaderValue::Byte(b.get_i8())
            }
            3 => {
                need(b, 2)?;
                HeaderValue::Short(b.get_i16())
            }
            4 => {
                need(b, 4)?;
                HeaderValue::Int(b.get_i32())
            }
            5 => {
                need(b, 8)?;
                HeaderValue::Long(b.get_i64())
            }
            t @ (6 | 7) => {
                need(b, 2)?;
                let len = b.get_u16() as usize;
                need(b, len)?;
                let v = &b[..len];
                let value = if t == 6 {
                    HeaderValue::Bytes(Bytes::copy_from_slice(v))
                } else {
                    HeaderValue::String(
                        std::str::from_utf8(v).map_err(|_| FrameError::Headers("string is not UTF-8"))?.to_string(),
                    )
                };
                b.advance(len);
                value
            }
            8 => {
                need(b, 8)?;
                HeaderValue::Timestamp(b.get_i64())
            }
            9 => {
                need(b, 16)?;
                let mut u = [0u8; 16];
                b.copy_to_slice(&mut u);
                HeaderValue::Uuid(u)
            }
            _ => return Err(FrameError::Headers("unknown value type")),
        };
        out.push((name, value));
    }
    Ok(out)
}

/// Encodes one frame with string headers.
pub fn encode(headers: &[(&str, &str)], payload: &[u8]) -> Bytes {
    let headers_len: usize = headers.iter().map(|(n, v)| 1 + n.len() + 1 + 2 + v.len()).sum();
    let total = PRELUDE + headers_len + payload.len() + 4;
    let mut out = BytesMut::with_capacity(total);
    out.put_u32(total as u32);
    out.put_u32(headers_len as u32);
    let prelude_crc = crc32fast::hash(&out[..8]);
    out.put_u32(prelude_crc);
    for (name, value) in headers {
        out.put_u8(name.len() as u8);
        out.put_slice(name.as_bytes());
        out.put_u8(7);
        out.put_u16(value.len() as u16);
        out.put_slice(value.as_bytes());
    }
    out.put_slice(payload);
    let crc = crc32fast::hash(&out);
    out.put_u32(crc);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One frame from the aws-c-event-stream test vectors (a `content-type` header and a small
    /// JSON payload), as quoted by the aws-event-stream-parser crate's README.
    const VECTOR: &str = "0000003d0000002007fd83960c636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e\
                          7b27666f6f273a27626172277d8d9c08b1";

    #[test]
    fn decodes_the_published_vector_and_encodes_it_back() {
        let bytes = hex::decode(VECTOR).unwrap();
        let mut d = Decoder::new();
        d.feed(&bytes);
        let f = d.next_frame().unwrap().unwrap();
        assert_eq!(f.header("content-type"), Some("application/json"));
        assert_eq!(&f.payload[..], b"{'foo':'bar'}");
        assert_eq!(&encode(&[("content-type", "application/json")], b"{'foo':'bar'}")[..], &bytes[..]);
        assert_eq!(d.next_frame().unwrap(), None);
    }

    #[test]
    fn frames_split_at_every_byte_boundary() {
        let a = encode(&[(":event-type", "chunk"), (":message-type", "event")], br#"{"bytes":"eyJ0eXBlIjoicGluZyJ9"}"#);
        let b = encode(&[(":message-type", "exception"), (":exception-type", "throttlingException")], b"{}");
        let stream = [&a[..], &b[..]].concat();
        for cut in 0..=stream.len() {
            let mut d = Decoder::new();
            let mut frames = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                d.feed(part);
                while let Some(f) = d.next_frame().unwrap() {
                    frames.push(f);
                }
            }
            assert_eq!(frames.len(), 2, "cut at {cut}");
            assert_eq!(frames[0].header(":event-type"), Some("chunk"));
            assert_eq!(frames[1].header(":exception-type"), Some("throttlingException"));
            assert_eq!(d.pending(), 0);
        }
        // And one byte at a time.
        let mut d = Decoder::new();
        let mut n = 0;
        for byte in &stream {
            d.feed(std::slice::from_ref(byte));
            while d.next_frame().unwrap().is_some() {
                n += 1;
            }
        }
        assert_eq!(n, 2);
    }

    #[test]
    fn corruption_is_detected() {
        let frame = encode(&[(":event-type", "chunk")], b"payload");
        for (at, expected) in
            [(2, FrameError::PreludeCrc), (20, FrameError::MessageCrc), (frame.len() - 1, FrameError::MessageCrc)]
        {
            let mut bad = frame.to_vec();
            bad[at] ^= 0x01;
            let mut d = Decoder::new();
            d.feed(&bad);
            assert_eq!(d.next_frame(), Err(expected), "flipped byte {at}");
        }
    }

    #[test]
    fn absurd_lengths_are_refused_before_buffering() {
        let mut prelude = BytesMut::new();
        prelude.put_u32((MAX_FRAME + 1) as u32);
        prelude.put_u32(0);
        let crc = crc32fast::hash(&prelude);
        prelude.put_u32(crc);
        let mut d = Decoder::new();
        d.feed(&prelude);
        assert_eq!(d.next_frame(), Err(FrameError::Length(MAX_FRAME + 1)));
    }
}
