//! The non-streaming body decoder on arbitrary bytes, for every API: never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenrelay_core::api::Api;
use tokenrelay_core::events::decode_body;

const APIS: [Api; 5] = [
    Api::Chat,
    Api::Completions,
    Api::Responses,
    Api::Messages,
    Api::Embeddings,
];

fuzz_target!(|input: &[u8]| {
    let Some((&head, body)) = input.split_first() else {
        return;
    };
    let api = APIS[usize::from(head) % APIS.len()];
    let _ = decode_body(api, body, "gpt-4o", Some(body));
});
