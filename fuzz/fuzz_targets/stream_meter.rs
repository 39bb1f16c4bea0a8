//! `StreamMeter` (SSE split + per-API event decoders + usage strip) on arbitrary bytes for every API: never
//! panics; without stripping every read is forwarded unchanged; with stripping the output is the input with
//! whole events removed, so it never invents bytes and never grows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenrelay_core::api::Api;
use tokenrelay_core::events::StreamMeter;

const APIS: [Api; 4] = [Api::Chat, Api::Completions, Api::Responses, Api::Messages];

fuzz_target!(|input: &[u8]| {
    let Some((&head, rest)) = input.split_first() else {
        return;
    };
    let api = APIS[usize::from(head & 0x03)];
    let strip = head & 0x04 != 0;
    let limit = if head & 0x08 != 0 { 48 } else { 1 << 20 };
    let step = usize::from(head >> 4) * 7 + 1;
    let mut meter = StreamMeter::with_limit(api, "gpt-4o", strip, limit);
    let mut out = Vec::new();
    for chunk in rest.chunks(step) {
        match meter.feed(chunk) {
            None => out.extend_from_slice(chunk),
            Some(bytes) => {
                assert!(
                    strip,
                    "a meter that does not strip must forward every read unchanged"
                );
                out.extend_from_slice(&bytes);
            }
        }
    }
    out.extend_from_slice(&meter.flush());
    if strip {
        assert!(out.len() <= rest.len(), "stripping made the stream longer");
    } else {
        assert_eq!(out, rest);
    }
    let usage = meter.usage(Some(rest));
    let _ = (
        usage,
        meter.events(),
        meter.malformed(),
        meter.done(),
        meter.error(),
    );
});
