use proptest::prelude::*;
use serde_json::{json, Value};

use super::fixtures::*;
use super::*;
use crate::events::StreamMeter;
use crate::sse::SseParser;

fn req(client: Api, kind: Kind, body: Value, drop: bool) -> Result<Value, TranslateError> {
    let out = translate_request(client, kind, body.to_string().as_bytes(), "up-model", drop)?;
    Ok(serde_json::from_slice(&out).unwrap())
}

/// Translates a whole stream fed in the given pieces; the concatenated output and the meter.
fn translate_pieces(
    upstream: Api,
    client: Api,
    pieces: &[&[u8]],
    usage: bool,
) -> (Vec<u8>, StreamMeter) {
    let mut m = StreamMeter::translating(upstream, client, "", usage, 1_700_000_000).unwrap();
    let mut out = Vec::new();
    for p in pieces {
        out.extend(m.feed(p).expect("a translating meter always returns bytes"));
    }
    out.extend(m.flush());
    (out, m)
}

fn translate_all(upstream: Api, client: Api, stream: &str, usage: bool) -> Vec<u8> {
    translate_pieces(upstream, client, &[stream.as_bytes()], usage).0
}

/// The (event name, data JSON) pairs of an SSE byte stream.
fn events(bytes: &[u8]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut p = SseParser::default();
    p.feed(bytes, |ev| {
        let data = if ev.data == b"[DONE]" {
            json!("[DONE]")
        } else {
            serde_json::from_slice(ev.data).unwrap()
        };
        out.push((String::from_utf8_lossy(ev.event).into_owned(), data));
    })
    .unwrap();
    out
}

// ------------------------------------------------------------------------------------------- requests

#[test]
fn chat_request_to_messages() {
    let body = json!({
        "model": "gpt-ish",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}},
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
                {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": ""}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "one"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "two"}]},
            {"role": "user", "content": "and?"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
                  {"type": "function", "function": {"name": "g", "description": "G"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "parallel_tool_calls": false,
        "max_completion_tokens": 77,
        "stop": ["X", "Y"],
        "temperature": 0.3,
        "top_p": 0.9,
        "stream": true,
        "stream_options": {"include_usage": true},
        "user": "u1",
        "n": 1,
        "mock": {"tokens": 3},
    });
    let out = req(Api::Chat, Kind::Anthropic, body, false).unwrap();
    assert_eq!(
        out,
        json!({
            "model": "up-model",
            "system": [{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Use tools."}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Look:"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}},
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/cat.png"}},
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
                    {"type": "tool_use", "id": "call_2", "name": "g", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "one"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "two"}]},
                    {"type": "text", "text": "and?"},
                ]},
            ],
            "tools": [
                {"name": "f", "input_schema": {"type": "object"}},
                {"name": "g", "description": "G", "input_schema": {"type": "object", "properties": {}}},
            ],
            "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": true},
            "max_tokens": 77,
            "stop_sequences": ["X", "Y"],
            "temperature": 0.3,
            "top_p": 0.9,
            "stream": true,
            "metadata": {"user_id": "u1"},
            "mock": {"tokens": 3},
        })
    );
}

#[test]
fn chat_request_defaults_and_unsupported() {
    let base =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1.7});
    let out = req(Api::Chat, Kind::Anthropic, base.clone(), false).unwrap();
    assert_eq!(out["max_tokens"], json!(DEFAULT_MAX_TOKENS));
    assert_eq!(out["temperature"], json!(1.0));
    let mut with_seed = base.clone();
    with_seed["seed"] = json!(3);
    let err = req(Api::Chat, Kind::Anthropic, with_seed.clone(), false).unwrap_err();
    assert_eq!(err.param(), Some("seed"));
    assert!(err.to_string().contains("`seed`"));
    assert!(req(Api::Chat, Kind::Anthropic, with_seed, true)
        .unwrap()
        .get("seed")
        .is_none());
    let mut audio = base;
    audio["messages"][0]["content"] = json!([{"type": "input_audio", "input_audio": {}}]);
    let err = req(Api::Chat, Kind::Anthropic, audio, false).unwrap_err();
    assert_eq!(err.param(), Some("messages[0].content[0].type"));
    assert!(matches!(
        translate_request(Api::Completions, Kind::Anthropic, b"{}", "m", true),
        Err(TranslateError::NoTranslation { .. })
    ));
}

#[test]
fn messages_request_to_chat() {
    let body = json!({
        "model": "claude-ish",
        "system": [{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "B"}],
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, 2]}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "r"}]},
                {"type": "text", "text": "so?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QQ=="}},
            ]},
        ],
        "tools": [{"name": "f", "description": "F", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "max_tokens": 50,
        "stop_sequences": ["Z"],
        "stream": true,
        "metadata": {"user_id": "u9"},
        "thinking": {"type": "disabled"},
    });
    let out = req(Api::Messages, Kind::OpenAi, body, false).unwrap();
    assert_eq!(
        out,
        json!({
            "model": "up-model",
            "messages": [
                {"role": "system", "content": "A\nB"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":[1,2]}"}},
                ]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "r"},
                {"role": "user", "content": [
                    {"type": "text", "text": "so?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,QQ=="}},
                ]},
            ],
            "tools": [{"type": "function", "function": {"name": "f", "description": "F", "parameters": {"type": "object"}}}],
            "tool_choice": "required",
            "parallel_tool_calls": false,
            "max_tokens": 50,
            "stop": ["Z"],
            "stream": true,
            "stream_options": {"include_usage": true},
            "user": "u9",
        })
    );
    let thinking = json!({"model": "m", "max_tokens": 5, "messages": [], "thinking": {"type": "enabled", "budget_tokens": 1024}});
    let err = req(Api::Messages, Kind::OpenAi, thinking.clone(), false).unwrap_err();
    assert_eq!(err.param(), Some("thinking"));
    assert!(req(Api::Messages, Kind::OpenAi, thinking, true).is_ok());
}

// ------------------------------------------------------------------------------------------- bodies

#[test]
fn message_body_to_chat_maps_content_and_usage() {
    let out: Value = serde_json::from_slice(
        &translate_response(Api::Messages, Api::Chat, AN_BODY.as_bytes()).unwrap(),
    )
    .unwrap();
    let src: Value = serde_json::from_str(AN_BODY).unwrap();
    let u = &src["usage"];
    let n = |k: &str| u[k].as_u64().unwrap_or(0);
    let input = n("input_tokens") + n("cache_read_input_tokens") + n("cache_creation_input_tokens");
    assert_eq!(out["object"], "chat.completion");
    assert_eq!(out["usage"]["prompt_tokens"], json!(input));
    assert_eq!(out["usage"]["completion_tokens"], u["output_tokens"]);
    assert_eq!(
        out["usage"]["prompt_tokens_details"]["cached_tokens"],
        json!(n("cache_read_input_tokens"))
    );
    let message = &out["choices"][0]["message"];
    let blocks = src["content"].as_array().unwrap();
    let text: String = blocks
        .iter()
        .filter(|b| b["type"] == "text")
        .map(|b| b["text"].as_str().unwrap())
        .collect();
    assert_eq!(message["content"], json!(text));
    let tool = blocks.iter().find(|b| b["type"] == "tool_use").unwrap();
    let call = &message["tool_calls"][0];
    assert_eq!(call["id"], tool["id"]);
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, tool["input"]);
    assert!(message["reasoning_content"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(
        out["choices"][0]["finish_reason"],
        json!(finish_reason_for(src["stop_reason"].as_str().unwrap()))
    );
}

#[test]
fn chat_body_to_message_maps_content_and_usage() {
    let out: Value = serde_json::from_slice(
        &translate_response(Api::Chat, Api::Messages, OA_BODY.as_bytes()).unwrap(),
    )
    .unwrap();
    let src: Value = serde_json::from_str(OA_BODY).unwrap();
    assert_eq!(out["type"], "message");
    assert_eq!(
        out["content"][0],
        json!({"type": "text", "text": src["choices"][0]["message"]["content"]})
    );
    let prompt = src["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = src["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(out["usage"]["input_tokens"], json!(prompt - cached));
    assert_eq!(out["usage"]["cache_read_input_tokens"], json!(cached));
    assert_eq!(
        out["usage"]["output_tokens"],
        src["usage"]["completion_tokens"]
    );
    assert_eq!(out["stop_reason"], "end_turn");
    assert!(translate_response(Api::Chat, Api::Messages, b"not json").is_err());
}

#[test]
fn errors_change_shape() {
    let an = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let out: Value =
        serde_json::from_slice(&translate_error(Api::Messages, Api::Chat, 529, an)).unwrap();
    assert_eq!(
        out,
        json!({"error": {"message": "Overloaded", "type": "overloaded_error", "param": null, "code": "overloaded_error"}})
    );
    let oa = br#"{"error":{"message":"Rate limited","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
    let out: Value =
        serde_json::from_slice(&translate_error(Api::Chat, Api::Messages, 429, oa)).unwrap();
    assert_eq!(
        out,
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limited"}})
    );
    let out: Value = serde_json::from_slice(&translate_error(
        Api::Chat,
        Api::Messages,
        502,
        b"Bad Gateway",
    ))
    .unwrap();
    assert_eq!(out["error"]["message"], "Bad Gateway");
    assert_eq!(translate_error(Api::Chat, Api::Chat, 500, b"x"), b"x");
}

// ------------------------------------------------------------------------------------------- streams

#[test]
fn anthropic_tool_stream_to_chat_chunks() {
    let out = translate_all(Api::Messages, Api::Chat, AN_TOOLS, true);
    let evs = events(&out);
    assert_eq!(evs.last().unwrap().1, json!("[DONE]"));
    let chunks: Vec<&Value> = evs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d.is_object())
        .collect();
    assert!(chunks.iter().all(
        |c| c["object"] == "chat.completion.chunk" && c["id"] == "msg_01XFDUDYJgAACzvnptvVoYEL"
    ));
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Okay, let's check the weather for San Francisco, CA:");
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(calls[0]["id"], "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert!(calls.iter().all(|c| c["index"] == 0));
    let args: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"location": "San Francisco, CA", "unit": "fahrenheit"})
    );
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("tool_calls")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"], 472);
    assert_eq!(usage["completion_tokens"], 89);
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    // Without include_usage: no usage chunk.
    let out = translate_all(Api::Messages, Api::Chat, AN_TOOLS, false);
    assert!(events(&out).iter().all(|(_, d)| d.get("usage").is_none()));
}

#[test]
fn anthropic_thinking_becomes_reasoning_content() {
    let out = translate_all(Api::Messages, Api::Chat, AN_THINKING, false);
    let evs = events(&out);
    let reasoning: String = evs
        .iter()
        .filter_map(|(_, d)| d["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    let src: String = events(AN_THINKING.as_bytes())
        .iter()
        .filter_map(|(_, d)| d["delta"]["thinking"].as_str().map(str::to_owned))
        .collect();
    assert!(!reasoning.is_empty());
    assert_eq!(reasoning, src);
}

#[test]
fn chat_tool_stream_to_anthropic_events() {
    let (out, meter) = translate_pieces(Api::Chat, Api::Messages, &[OA_TOOLS.as_bytes()], false);
    let evs = events(&out);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
    for (name, data) in &evs {
        assert_eq!(data["type"], json!(name));
    }
    // Every started block is stopped, with increasing indices; the deltas belong to the open block.
    let mut open: Option<u64> = None;
    let mut next = 0;
    let mut tools = Vec::new();
    for (name, d) in &evs {
        match name.as_str() {
            "content_block_start" => {
                assert!(open.is_none());
                assert_eq!(d["index"], json!(next));
                open = Some(next);
                tools.push((
                    d["content_block"]["name"].as_str().unwrap().to_owned(),
                    String::new(),
                ));
            }
            "content_block_delta" => {
                assert_eq!(d["index"], json!(open.unwrap()));
                tools
                    .last_mut()
                    .unwrap()
                    .1
                    .push_str(d["delta"]["partial_json"].as_str().unwrap());
            }
            "content_block_stop" => {
                assert_eq!(d["index"], json!(open.take().unwrap()));
                next += 1;
            }
            _ => {}
        }
    }
    let src = events(OA_TOOLS.as_bytes());
    let mut expected: Vec<(String, String)> = Vec::new();
    for (_, d) in &src {
        for c in d["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = c["index"].as_u64().unwrap() as usize;
            if expected.len() <= i {
                expected.push((
                    c["function"]["name"].as_str().unwrap().to_owned(),
                    String::new(),
                ));
            }
            expected[i]
                .1
                .push_str(c["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(tools, expected);
    assert!(tools.len() >= 2);
    let delta = &evs[evs.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(
        delta["usage"],
        json!({"input_tokens": 2100 - 1920, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1920, "output_tokens": 52})
    );
    // Usage is metered from the upstream's own events.
    let u = meter.usage(None);
    assert_eq!((u.input, u.output, u.cached_input), (2100, 52, 1920));
}

#[test]
fn chat_reasoning_becomes_a_thinking_block() {
    let out = translate_all(Api::Chat, Api::Messages, OA_REASONING, false);
    let evs = events(&out);
    let starts: Vec<&Value> = evs
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| &d["content_block"]["type"])
        .collect();
    assert_eq!(starts, [&json!("thinking"), &json!("text")]);
    let thinking: String = evs
        .iter()
        .filter_map(|(_, d)| d["delta"]["thinking"].as_str())
        .collect();
    let src: String = events(OA_REASONING.as_bytes())
        .iter()
        .filter_map(|(_, d)| {
            d["choices"][0]["delta"]["reasoning_content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(thinking, src);
    assert_eq!(evs.last().unwrap().0, "message_stop");
}

#[test]
fn in_stream_errors_are_translated() {
    let out = translate_all(Api::Chat, Api::Messages, OA_ERROR, false);
    let (name, data) = events(&out).pop().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["type"], "error");
    assert!(data["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    let out = translate_all(Api::Messages, Api::Chat, AN_ERROR, true);
    let (_, data) = events(&out).pop().unwrap();
    assert_eq!(data["error"]["type"], "overloaded_error");
}

#[test]
fn same_usage_as_an_untranslated_meter() {
    for (api, client, s) in [
        (Api::Chat, Api::Messages, OA_STREAM),
        (Api::Chat, Api::Messages, OA_TOOLS),
        (Api::Messages, Api::Chat, AN_STREAM),
        (Api::Messages, Api::Chat, AN_THINKING),
    ] {
        let (_, translated) = translate_pieces(api, client, &[s.as_bytes()], true);
        let mut plain = StreamMeter::new(api, "", false);
        assert!(plain.feed(s.as_bytes()).is_none());
        plain.flush();
        assert_eq!(translated.usage(None), plain.usage(None));
        assert_eq!(translated.done(), plain.done());
        assert_eq!(translated.content_started(), plain.content_started());
    }
}

#[test]
fn every_two_way_split_gives_the_same_output() {
    for (api, client, s) in [
        (Api::Chat, Api::Messages, OA_TOOLS),
        (Api::Messages, Api::Chat, AN_TOOLS),
    ] {
        let whole = translate_all(api, client, s, true);
        let b = s.as_bytes();
        for cut in 0..=b.len() {
            let (out, _) = translate_pieces(api, client, &[&b[..cut], &b[cut..]], true);
            assert_eq!(out, whole, "split at {cut}");
        }
    }
}

proptest! {
    #[test]
    fn any_split_gives_the_same_output(cuts in proptest::collection::vec(0usize..4000, 0..12), which in 0usize..4) {
        let (api, client, s) = [
            (Api::Chat, Api::Messages, OA_REASONING),
            (Api::Chat, Api::Messages, OA_STREAM),
            (Api::Messages, Api::Chat, AN_THINKING),
            (Api::Messages, Api::Chat, AN_STREAM),
        ][which];
        let whole = translate_all(api, client, s, true);
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
        let (out, _) = translate_pieces(api, client, &pieces, true);
        prop_assert_eq!(out, whole);
    }
}
