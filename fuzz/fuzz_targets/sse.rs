//! The SSE parser on arbitrary bytes, split at arbitrary points: never panics, and the events (their fields and
//! byte ranges) do not depend on how the stream was split into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenrelay_core::sse::SseParser;

type Seen = Vec<(Vec<u8>, Vec<u8>, Option<Vec<u8>>, u64, u64)>;

fn parse(data: &[u8], cuts: &[usize], limit: usize) -> (Seen, usize) {
    let mut parser = SseParser::new(limit);
    let mut seen = Seen::new();
    let mut errors = 0;
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&data.len())) {
        let end = cut.clamp(start, data.len());
        let res = parser.feed(&data[start..end], |ev| {
            assert!(
                ev.start <= ev.end && ev.end <= end as u64,
                "event range outside the bytes fed"
            );
            seen.push((
                ev.event.to_vec(),
                ev.data.to_vec(),
                ev.id.map(<[u8]>::to_vec),
                ev.start,
                ev.end,
            ));
        });
        errors += usize::from(res.is_err());
        start = end;
    }
    parser.finish(|ev| {
        seen.push((
            ev.event.to_vec(),
            ev.data.to_vec(),
            ev.id.map(<[u8]>::to_vec),
            ev.start,
            ev.end,
        ));
    });
    assert!(
        seen.windows(2).all(|w| w[0].4 <= w[1].3),
        "events out of order or overlapping"
    );
    (seen, errors)
}

fuzz_target!(|input: &[u8]| {
    // First byte: a small event-size limit (exercises the oversized path); next bytes: where to split.
    let Some((&head, rest)) = input.split_first() else {
        return;
    };
    let ncuts = usize::from(head & 0x0f).min(rest.len());
    let (cut_bytes, data) = rest.split_at(ncuts);
    let mut cuts: Vec<usize> = cut_bytes
        .iter()
        .map(|&b| usize::from(b) * data.len() / 256)
        .collect();
    cuts.sort_unstable();
    let limit = if head & 0x80 != 0 { 64 } else { 1 << 20 };
    let (whole, whole_errors) = parse(data, &[], limit);
    let (split, split_errors) = parse(data, &cuts, limit);
    if whole_errors == 0 && split_errors == 0 {
        assert_eq!(whole, split, "events depend on how the stream was split");
    }
});
