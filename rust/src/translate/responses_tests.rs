//! The Responses API on chat-only and Anthropic deployments: requests, answers and streams.

use proptest::prelude::*;
use serde_json::{json, Value};

use super::fixtures::*;
use super::*;
use crate::events::StreamMeter;
use crate::sse::SseParser;

fn req(kind: Kind, body: Value, drop: bool) -> Result<Value, TranslateError> {
    let bytes = body.to_string();
    let out = translate_request(Api::Responses, kind, bytes.as_bytes(), "up-model", drop)?;
    Ok(serde_json::from_slice(&out).unwrap())
}

fn translate_pieces(upstream: Api, pieces: &[&[u8]]) -> (Vec<u8>, StreamMeter) {
    let mut m =
        StreamMeter::translating(upstream, Api::Responses, "", false, 1_700_000_000).unwrap();
    let mut out = Vec::new();
    for p in pieces {
        out.extend(m.feed(p).expect("a translating meter always returns bytes"));
    }
    out.extend(m.flush());
    (out, m)
}

fn translate_all(upstream: Api, stream: &str) -> Vec<u8> {
    translate_pieces(upstream, &[stream.as_bytes()]).0
}

/// The (event name, data JSON) pairs of an SSE byte stream.
fn events(bytes: &[u8]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut p = SseParser::default();
    p.feed(bytes, |ev| {
        let data: Value = serde_json::from_slice(ev.data).unwrap();
        out.push((String::from_utf8_lossy(ev.event).into_owned(), data));
    })
    .unwrap();
    out
}

/// A conversation with every kind of input item: instructions, text and image parts, a function call and
/// its output, a prior reasoning item.
fn conversation() -> Value {
    json!({
        "model": "agent",
        "instructions": "Be terse.",
        "input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "Weather in Paris?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"},
            ]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
             "arguments": "{\"city\":\"Paris\"}", "status": "completed"},
            {"type": "function_call_output", "call_id": "call_1", "output": "18C, sunny"},
        ],
        "tools": [{"type": "function", "name": "get_weather", "description": "Weather",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                   "strict": true}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 300,
        "temperature": 1.5,
        "top_p": 0.9,
        "stream": true,
        "store": false,
        "include": ["reasoning.encrypted_content"],
        "truncation": "disabled",
        "parallel_tool_calls": true,
        "metadata": {"run": "r1"},
        "text": {"format": {"type": "text"}},
    })
}

// ------------------------------------------------------------------------------------------- requests

#[test]
fn responses_request_to_chat() {
    let out = req(Kind::OpenAi, conversation(), false).unwrap();
    assert_eq!(out["model"], "up-model");
    assert_eq!(
        out["messages"],
        json!([
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        ])
    );
    assert_eq!(
        out["tools"],
        json!([{"type": "function", "function": {
            "name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": true,
        }}])
    );
    assert_eq!(
        out["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
    assert_eq!(out["max_tokens"], 300);
    assert_eq!(
        (out["temperature"].clone(), out["top_p"].clone()),
        (json!(1.5), json!(0.9))
    );
    assert_eq!(out["stream_options"], json!({"include_usage": true}));
    for gone in [
        "store",
        "include",
        "truncation",
        "metadata",
        "text",
        "input",
        "instructions",
    ] {
        assert!(out.get(gone).is_none(), "{gone} left in {out}");
    }
}

#[test]
fn responses_request_to_messages() {
    let out = req(Kind::Anthropic, conversation(), false).unwrap();
    assert_eq!(
        out["system"],
        json!([{"type": "text", "text": "Be terse."}])
    );
    assert_eq!(
        out["messages"],
        json!([
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C, sunny"},
            ]},
        ])
    );
    assert_eq!(out["tools"][0]["name"], "get_weather");
    assert_eq!(
        out["tools"][0]["input_schema"],
        json!({"type": "object", "properties": {"city": {"type": "string"}}})
    );
    assert_eq!(
        out["tool_choice"],
        json!({"type": "tool", "name": "get_weather"})
    );
    assert_eq!(out["max_tokens"], 300);
    assert_eq!(out["temperature"], 1.0); // clamped to Anthropic's range
    assert_eq!(out["stream"], true);
    assert!(out.get("stream_options").is_none());
}

#[test]
fn a_plain_string_input_and_defaults() {
    let out = req(Kind::Anthropic, json!({"model": "m", "input": "Hi"}), false).unwrap();
    assert_eq!(
        out["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    );
    assert_eq!(out["max_tokens"], DEFAULT_MAX_TOKENS);
    let out = req(
        Kind::OpenAi,
        json!({"model": "m", "input": "Hi", "store": true}),
        false,
    )
    .unwrap();
    assert_eq!(out["messages"], json!([{"role": "user", "content": "Hi"}]));
    assert!(out.get("max_tokens").is_none());
}

#[test]
fn consecutive_function_calls_make_one_turn() {
    let body = json!({"model": "m", "input": [
        {"role": "user", "content": "Two cities"},
        {"type": "function_call", "call_id": "a", "name": "w", "arguments": "{}"},
        {"type": "function_call", "call_id": "b", "name": "w", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "a", "output": "1"},
        {"type": "function_call_output", "call_id": "b", "output": [{"type": "input_text", "text": "2"}]},
    ]});
    let chat = req(Kind::OpenAi, body.clone(), false).unwrap();
    let roles: Vec<&str> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "tool", "tool"]);
    assert_eq!(
        chat["messages"][1]["tool_calls"].as_array().unwrap().len(),
        2
    );
    assert_eq!(chat["messages"][1]["content"], Value::Null);
    assert_eq!(chat["messages"][3]["content"], "2");
    let an = req(Kind::Anthropic, body, false).unwrap();
    assert_eq!(an["messages"].as_array().unwrap().len(), 3);
    assert_eq!(an["messages"][2]["content"].as_array().unwrap().len(), 2);
}

#[test]
fn stateful_and_untranslatable_parameters_are_named() {
    let cases = [
        (
            Kind::OpenAi,
            json!({"previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (
            Kind::Anthropic,
            json!({"conversation": "conv_1"}),
            "conversation",
        ),
        (
            Kind::OpenAi,
            json!({"tools": [{"type": "web_search"}]}),
            "tools[0].type",
        ),
        (
            Kind::Anthropic,
            json!({"reasoning": {"effort": "high"}}),
            "reasoning.effort",
        ),
        (
            Kind::Anthropic,
            json!({"text": {"format": {"type": "json_object"}}}),
            "text.format",
        ),
        (Kind::OpenAi, json!({"truncation": "auto"}), "truncation"),
        (
            Kind::OpenAi,
            json!({"input": [{"role": "user", "content": "Hi"}, {"type": "item_reference", "id": "x"}]}),
            "input[1].type",
        ),
        (
            Kind::OpenAi,
            json!({"input": [{"role": "user", "content": [
                {"type": "input_text", "text": "Hi"}, {"type": "input_file", "file_id": "f"},
            ]}]}),
            "input[0].content[1].type",
        ),
    ];
    for (kind, extra, param) in cases {
        let mut body = json!({"model": "m", "input": "Hi"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let err = req(kind, body.clone(), false).unwrap_err();
        assert_eq!(err.param(), Some(param), "{err}");
        assert!(
            req(kind, body, true).is_ok(),
            "{param} is dropped on request"
        );
    }
}

#[test]
fn reasoning_effort_and_json_schema_reach_chat() {
    let body = json!({"model": "m", "input": "Hi", "reasoning": {"effort": "low", "summary": "auto"},
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": true}}});
    let out = req(Kind::OpenAi, body, false).unwrap();
    assert_eq!(out["reasoning_effort"], "low");
    assert_eq!(
        out["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": true}})
    );
}

// ------------------------------------------------------------------------------------ complete answers

#[test]
fn chat_body_to_response() {
    let out = translate_response(Api::Chat, Api::Responses, OA_BODY.as_bytes()).unwrap();
    let r: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(r["object"], "response");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["id"], "resp_chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG");
    assert_eq!(r["output"][0]["type"], "message");
    assert_eq!(
        r["output"][0]["content"][0]["text"],
        "The image shows a wooden boardwalk."
    );
    assert_eq!(
        r["usage"],
        json!({"input_tokens": 1117, "input_tokens_details": {"cached_tokens": 1024},
               "output_tokens": 46, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 1163})
    );
}

#[test]
fn message_body_to_response() {
    let out = translate_response(Api::Messages, Api::Responses, AN_BODY.as_bytes()).unwrap();
    let r: Value = serde_json::from_slice(&out).unwrap();
    let types: Vec<&str> = r["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["reasoning", "message", "function_call"]);
    assert_eq!(
        r["output"][0]["content"][0]["text"],
        "The user wants the weather."
    );
    let call = &r["output"][2];
    assert_eq!(call["call_id"], "toolu_01A09q90qw90lq917835lq9");
    assert_eq!(call["name"], "get_weather");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"location": "San Francisco, CA"}));
    // Anthropic's input excludes cache writes; Responses' includes them.
    assert_eq!(r["usage"]["input_tokens"], 2095 + 2051);
    assert_eq!(r["usage"]["output_tokens"], 503);
    assert_eq!(r["status"], "completed");
}

#[test]
fn a_length_stop_is_incomplete() {
    let mut body: Value = serde_json::from_str(OA_BODY).unwrap();
    body["choices"][0]["finish_reason"] = "length".into();
    let out = translate_response(Api::Chat, Api::Responses, body.to_string().as_bytes()).unwrap();
    let r: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(r["status"], "incomplete");
    assert_eq!(
        r["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
}

// --------------------------------------------------------------------------------------------- streams

/// Checks the invariants every Responses stream keeps; the final response object.
fn check_sequence(evs: &[(String, Value)]) -> Value {
    for (i, (name, data)) in evs.iter().enumerate() {
        assert_eq!(data["sequence_number"], i, "{name}");
        assert_eq!(data["type"].as_str(), Some(name.as_str()));
    }
    assert_eq!(evs[0].0, "response.created");
    assert_eq!(evs[1].0, "response.in_progress");
    let id = &evs[0].1["response"]["id"];
    let (last, data) = evs.last().unwrap();
    assert!(last == "response.completed" || last == "response.incomplete");
    assert_eq!(&data["response"]["id"], id);
    // Every item added is done at the same index, and the final output is the done items in order.
    let added: Vec<&Value> = evs
        .iter()
        .filter(|(n, _)| n == "response.output_item.added")
        .map(|(_, d)| &d["output_index"])
        .collect();
    let done: Vec<&Value> = evs
        .iter()
        .filter(|(n, _)| n == "response.output_item.done")
        .map(|(_, d)| &d["item"])
        .collect();
    assert_eq!(added.len(), done.len());
    for (i, idx) in added.iter().enumerate() {
        assert_eq!(**idx, i);
    }
    let output: Vec<Value> = done.into_iter().cloned().collect();
    assert_eq!(data["response"]["output"], Value::Array(output));
    data["response"].clone()
}

fn deltas(evs: &[(String, Value)], name: &str, index: usize) -> String {
    evs.iter()
        .filter(|(n, d)| n == name && d["output_index"] == index)
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect()
}

#[test]
fn chat_tool_stream_to_responses_events() {
    let evs = events(&translate_all(Api::Chat, OA_TOOLS));
    let r = check_sequence(&evs);
    let output = r["output"].as_array().unwrap();
    assert_eq!(output.len(), 2);
    assert_eq!(output[0]["type"], "function_call");
    assert_eq!(output[0]["call_id"], "call_a1");
    assert_eq!(output[0]["name"], "get_weather");
    assert_eq!(output[0]["arguments"], "{\"location\": \"Paris, FR\"}");
    assert_eq!(
        deltas(&evs, "response.function_call_arguments.delta", 0),
        "{\"location\": \"Paris, FR\"}"
    );
    assert_eq!(output[1]["call_id"], "call_b2");
    assert_eq!(output[1]["arguments"], "{\"tz\": \"Europe/Paris\"}");
    let done: Vec<&Value> = evs
        .iter()
        .filter(|(n, _)| n == "response.function_call_arguments.done")
        .map(|(_, d)| &d["arguments"])
        .collect();
    assert_eq!(done, [&output[0]["arguments"], &output[1]["arguments"]]);
    assert_eq!(r["status"], "completed");
    assert_eq!(
        r["usage"],
        json!({"input_tokens": 2100, "input_tokens_details": {"cached_tokens": 1920},
               "output_tokens": 52, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 2152})
    );
}

#[test]
fn chat_text_stream_to_responses_events() {
    let evs = events(&translate_all(Api::Chat, OA_STREAM));
    let r = check_sequence(&evs);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    let first_delta = names
        .iter()
        .position(|n| *n == "response.output_text.delta")
        .unwrap();
    assert_eq!(
        names[2..first_delta],
        ["response.output_item.added", "response.content_part.added"]
    );
    assert_eq!(
        names[names.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let text = deltas(&evs, "response.output_text.delta", 0);
    assert!(!text.is_empty());
    assert_eq!(r["output"][0]["content"][0]["text"], text);
    let done = evs
        .iter()
        .find(|(n, _)| n == "response.output_text.done")
        .unwrap();
    assert_eq!(done.1["text"], text);
    assert!(r["usage"]["output_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn anthropic_tool_stream_to_responses_events() {
    let evs = events(&translate_all(Api::Messages, AN_TOOLS));
    let r = check_sequence(&evs);
    let output = r["output"].as_array().unwrap();
    assert_eq!(output[0]["type"], "message");
    assert_eq!(
        output[0]["content"][0]["text"],
        "Okay, let's check the weather for San Francisco, CA:"
    );
    assert_eq!(output[1]["type"], "function_call");
    assert_eq!(output[1]["call_id"], "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
    assert_eq!(
        output[1]["arguments"],
        "{\"location\": \"San Francisco, CA\", \"unit\": \"fahrenheit\"}"
    );
    assert_eq!(r["usage"]["input_tokens"], 472);
    assert_eq!(r["usage"]["output_tokens"], 89);
}

#[test]
fn anthropic_thinking_becomes_a_reasoning_item() {
    let evs = events(&translate_all(Api::Messages, AN_THINKING));
    let r = check_sequence(&evs);
    assert_eq!(r["output"][0]["type"], "reasoning");
    let thought = deltas(&evs, "response.reasoning_text.delta", 0);
    assert!(thought.starts_with("I need to find the GCD"));
    assert_eq!(r["output"][0]["content"][0]["text"], thought);
    assert_eq!(r["output"][1]["type"], "message");
}

#[test]
fn chat_reasoning_becomes_a_reasoning_item() {
    let evs = events(&translate_all(Api::Chat, OA_REASONING));
    let r = check_sequence(&evs);
    assert_eq!(r["output"][0]["type"], "reasoning");
    assert_eq!(r["output"][1]["type"], "message");
}

#[test]
fn in_stream_errors_become_error_events() {
    for (api, s) in [(Api::Chat, OA_ERROR), (Api::Messages, AN_ERROR)] {
        let evs = events(&translate_all(api, s));
        let (name, data) = evs.last().unwrap();
        assert_eq!(name, "error");
        assert!(data["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(!evs.iter().any(|(n, _)| n == "response.completed"));
    }
}

#[test]
fn same_usage_as_an_untranslated_meter() {
    for (api, s) in [
        (Api::Chat, OA_STREAM),
        (Api::Chat, OA_TOOLS),
        (Api::Messages, AN_TOOLS),
        (Api::Messages, AN_THINKING),
    ] {
        let (_, translated) = translate_pieces(api, &[s.as_bytes()]);
        let mut plain = StreamMeter::new(api, "", false);
        assert!(plain.feed(s.as_bytes()).is_none());
        plain.flush();
        assert_eq!(translated.usage(None), plain.usage(None));
        assert_eq!(translated.done(), plain.done());
    }
}

#[test]
fn every_two_way_split_gives_the_same_output() {
    for (api, s) in [(Api::Chat, OA_TOOLS), (Api::Messages, AN_TOOLS)] {
        let whole = translate_all(api, s);
        let b = s.as_bytes();
        for cut in 0..=b.len() {
            let (out, _) = translate_pieces(api, &[&b[..cut], &b[cut..]]);
            assert_eq!(out, whole, "split at {cut}");
        }
    }
}

proptest! {
    #[test]
    fn any_split_gives_the_same_output(cuts in proptest::collection::vec(0usize..4000, 0..12), which in 0usize..4) {
        let (api, s) = [
            (Api::Chat, OA_REASONING),
            (Api::Chat, OA_STREAM),
            (Api::Messages, AN_THINKING),
            (Api::Messages, AN_STREAM),
        ][which];
        let whole = translate_all(api, s);
        let b = s.as_bytes();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (b.len() + 1)).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::new();
        let mut last = 0;
        for c in cuts {
            pieces.push(&b[last..c]);
            last = c;
        }
        pieces.push(&b[last..]);
        let (out, _) = translate_pieces(api, &pieces);
        prop_assert_eq!(out, whole);
    }
}
