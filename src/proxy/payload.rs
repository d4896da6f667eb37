//! A request body on its way to a provider: one buffer, or the client's body with its `model`
//! replaced, kept as pieces of the client's buffer around the new value.
//!
//! A large body is not copied whole to change a few bytes in it: the copy costs more time than
//! its instructions say. On the benchmark machine (plain HTTP to the mock) the kernel read a
//! fresh 53 KB copy for the send four times more slowly than the client's buffer, which the
//! request's walk had just read; without the copy the upstream write took about a fifth less
//! time (docs/benchmarks.md, "Time per request"). Each piece is a write of its own, so small
//! bodies, and small pieces at either end, are still copied.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::protocol::json_peek::replace_string_value;

/// Below this size a body with a replaced value is copied into one buffer. A judgement, not a
/// measured crossing: copying 16 KiB takes about a microsecond, a write of its own (a syscall,
/// over TLS a record) a few.
const PIECES_FROM: usize = 16 << 10;

/// A piece at either end of the replaced value shorter than this is copied into the value's
/// piece rather than written on its own (the same judgement).
const MERGE_BELOW: usize = 4 << 10;

#[derive(Clone, Debug, Default)]
pub(super) struct Payload {
    /// In order; empty pieces are skipped when written.
    pieces: [Bytes; 3],
}

impl Payload {
    pub fn whole(body: Bytes) -> Self {
        Payload { pieces: [body, Bytes::new(), Bytes::new()] }
    }

    /// `body` with the JSON string at `span` (its quotes included) replaced by `value`.
    pub fn with_string(body: &Bytes, span: Range<usize>, value: &str) -> Self {
        let small_before = span.start < MERGE_BELOW;
        let small_after = body.len() - span.end < MERGE_BELOW;
        if body.len() < PIECES_FROM || (small_before && small_after) {
            return Payload::whole(replace_string_value(body, span, value));
        }
        let quoted = serde_json::to_string(value).expect("a string always serializes");
        let (before, after) = (&body[..span.start], &body[span.end..]);
        let pieces = match (small_before, small_after) {
            (true, _) => [joined(&[before, quoted.as_bytes()]), body.slice(span.end..), Bytes::new()],
            (_, true) => [body.slice(..span.start), joined(&[quoted.as_bytes(), after]), Bytes::new()],
            _ => [body.slice(..span.start), Bytes::from(quoted), body.slice(span.end..)],
        };
        Payload { pieces }
    }

    pub fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }

    /// The pieces to write, in order (cheap clones of shared buffers).
    pub fn pieces(&self) -> impl Iterator<Item = &Bytes> {
        self.pieces.iter().filter(|p| !p.is_empty())
    }

    /// The body as one buffer: the piece itself when there is only one, else a copy.
    pub fn to_bytes(&self) -> Bytes {
        let mut pieces = self.pieces();
        match (pieces.next(), pieces.next()) {
            (None, _) => Bytes::new(),
            (Some(only), None) => only.clone(),
            _ => joined(&self.pieces().map(|p| &p[..]).collect::<Vec<_>>()),
        }
    }
}

fn joined(parts: &[&[u8]]) -> Bytes {
    let mut out = BytesMut::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        out.extend_from_slice(p);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A body whose bytes before the model's value number `before` and after it `after`
    /// (at least 16 and 8).
    fn body(before: usize, after: usize) -> (Bytes, Range<usize>) {
        let head = format!("{{\"a\":\"{}\",\"model\":", "x".repeat(before - 16));
        assert_eq!(head.len(), before);
        let span = head.len()..head.len() + "\"claude-sonnet-4-5\"".len();
        let text = format!("{head}\"claude-sonnet-4-5\",\"b\":\"{}\"}}", "y".repeat(after - 8));
        assert_eq!(text.len() - span.end, after);
        (Bytes::from(text), span)
    }

    /// The copy the pieces stand for.
    fn expected(b: &Bytes, span: &Range<usize>, value: &str) -> Vec<u8> {
        replace_string_value(b, span.clone(), value).to_vec()
    }

    fn written(p: &Payload) -> Vec<u8> {
        p.pieces().flat_map(|x| x.iter().copied()).collect()
    }

    #[test]
    fn pieces_spell_the_replaced_body_at_every_shape() {
        // Small body; large with the value near the start, near the end, in the middle.
        for (before, after, pieces) in [(20, 20, 1), (20, 40_000, 2), (40_000, 20, 2), (20_000, 20_000, 3)] {
            let (b, span) = body(before, after);
            let p = Payload::with_string(&b, span.clone(), "claude-sonnet-4-5-20250929");
            let want = expected(&b, &span, "claude-sonnet-4-5-20250929");
            assert_eq!(p.pieces().count(), pieces, "before {before}, after {after}");
            assert_eq!(p.len(), want.len());
            assert_eq!(&p.to_bytes()[..], &want[..]);
            assert_eq!(written(&p), want);
        }
    }

    #[test]
    fn pieces_are_exact_at_the_size_boundaries() {
        let value = "claude-opus-4-1-20250805";
        // The body's size against PIECES_FROM, the value before the change being 19 bytes.
        let whole = |before: usize| PIECES_FROM - 19 - before;
        let sides = [MERGE_BELOW - 1, MERGE_BELOW, MERGE_BELOW + 1, 16, 9_000];
        for before in sides {
            for after in sides.iter().copied().chain([whole(before) - 1, whole(before)]) {
                let (b, span) = body(before, after.max(8));
                let p = Payload::with_string(&b, span.clone(), value);
                assert_eq!(written(&p), expected(&b, &span, value), "before {before}, after {after}");
                assert_eq!(p.len(), written(&p).len());
                let want = if b.len() < PIECES_FROM {
                    1
                } else {
                    1 + usize::from(before >= MERGE_BELOW) + usize::from(after.max(8) >= MERGE_BELOW)
                };
                assert_eq!(p.pieces().count(), want, "before {before}, after {after}, body {}", b.len());
                assert!(p.pieces().all(|x| !x.is_empty()));
            }
        }
    }

    proptest! {
        #[test]
        fn pieces_are_the_copy(before in 16usize..30_000, after in 8usize..30_000, value in "\\PC{0,40}") {
            let (b, span) = body(before, after);
            let p = Payload::with_string(&b, span.clone(), &value);
            let want = expected(&b, &span, &value);
            prop_assert_eq!(written(&p), want.clone());
            prop_assert_eq!(p.len(), want.len());
            prop_assert_eq!(&p.to_bytes()[..], &want[..]);
        }
    }

    #[test]
    fn large_pieces_share_the_clients_buffer() {
        let (b, span) = body(20_000, 20_000);
        let p = Payload::with_string(&b, span, "m");
        let first = p.pieces().next().unwrap();
        assert_eq!(first.as_ptr(), b.as_ptr(), "the piece before the value is the client's own bytes");
    }

    #[test]
    fn a_value_that_needs_escaping_is_escaped() {
        let (b, span) = body(20, 20_000);
        let p = Payload::with_string(&b, span.clone(), "a\"b");
        assert_eq!(&p.to_bytes()[..], &expected(&b, &span, "a\"b")[..]);
        assert!(p.to_bytes().windows(6).any(|w| w == br#""a\"b""#));
    }

    #[test]
    fn a_whole_body_is_one_piece_and_an_empty_one_none() {
        assert_eq!(Payload::whole(Bytes::from_static(b"{}")).pieces().count(), 1);
        assert_eq!(Payload::whole(Bytes::new()).pieces().count(), 0);
        assert_eq!(Payload::whole(Bytes::new()).len(), 0);
    }
}
