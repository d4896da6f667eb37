//! Property: however a recorded SSE stream is cut into chunks, the usage read from it is the same.

use proptest::prelude::*;
use tollgate::mock::{sse_events, MockUsage};
use tollgate::protocol::sse::SseUsageScanner;

fn usage_of(chunks: &[&[u8]]) -> tollgate::protocol::usage::Usage {
    let mut s = SseUsageScanner::new();
    for c in chunks {
        s.feed(c);
    }
    assert!(s.completed());
    s.usage()
}

fn stream(u: &MockUsage, deltas: usize) -> Vec<u8> {
    sse_events("claude-sonnet-5", u, deltas).concat()
}

#[test]
fn every_single_split_point_gives_the_same_usage() {
    let u = MockUsage {
        input_tokens: 1234,
        output_tokens: 567,
        cache_read_input_tokens: 89_000,
        cache_creation_5m_input_tokens: 12,
        cache_creation_1h_input_tokens: 3456,
        ..Default::default()
    };
    let bytes = stream(&u, 20);
    let whole = usage_of(&[&bytes]);
    assert_eq!(whole.input_tokens, 1234);
    assert_eq!(whole.output_tokens, 567);
    assert_eq!(whole.cache_read_input_tokens, 89_000);
    assert_eq!(whole.cache_creation_1h_input_tokens, 3456);
    for cut in 0..=bytes.len() {
        assert_eq!(usage_of(&[&bytes[..cut], &bytes[cut..]]), whole, "split at byte {cut}");
    }
}

proptest! {
    #[test]
    fn random_chunkings_give_the_same_usage(
        input in 0u64..2_000_000, output in 0u64..128_000, read in 0u64..1_000_000,
        w5 in 0u64..100_000, w1 in 0u64..100_000, deltas in 0usize..40,
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..64),
    ) {
        let u = MockUsage { input_tokens: input, output_tokens: output, cache_read_input_tokens: read,
            cache_creation_5m_input_tokens: w5, cache_creation_1h_input_tokens: w1, ..Default::default() };
        let bytes = stream(&u, deltas);
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        let chunks: Vec<&[u8]> = points.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
        let got = usage_of(&chunks);
        prop_assert_eq!(got.input_tokens, input);
        prop_assert_eq!(got.output_tokens, output);
        prop_assert_eq!(got.cache_read_input_tokens, read);
        prop_assert_eq!(got.cache_creation_5m_input_tokens, w5);
        prop_assert_eq!(got.cache_creation_1h_input_tokens, w1);
        prop_assert_eq!(got.cache_creation_input_tokens, w5 + w1);
    }
}
