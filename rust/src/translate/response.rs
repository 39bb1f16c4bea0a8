//! Complete (non-streaming) response bodies and error bodies: OpenAI chat completions ↔ Anthropic Messages,
//! and either → Responses.

use serde_json::{json, Map, Value};

use super::responses::chat_to_response;
use super::{finish_reason_for, stop_reason_for, unix_now, TranslateError};
use crate::api::Api;

/// Translates a complete response body from the `upstream` API to the `client` API.
pub fn translate_response(
    upstream: Api,
    client: Api,
    body: &[u8],
) -> Result<Vec<u8>, TranslateError> {
    if upstream == client {
        return Ok(body.to_vec());
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        TranslateError::Invalid(format!("the upstream's answer is not valid JSON: {e}"))
    })?;
    let out = match (upstream, client) {
        (Api::Messages, Api::Chat) => message_to_chat(&value, unix_now()),
        (Api::Chat, Api::Messages) => chat_to_message(&value),
        (Api::Chat, Api::Responses) => chat_to_response(&value, unix_now()),
        (Api::Messages, Api::Responses) => {
            let now = unix_now();
            chat_to_response(&message_to_chat(&value, now), now)
        }
        (from, to) => {
            return Err(TranslateError::NoTranslation {
                from: from.name(),
                to: to.name(),
            })
        }
    };
    serde_json::to_vec(&out).map_err(|e| TranslateError::Invalid(e.to_string()))
}

/// OpenAI `usage` from Anthropic's (whose `input_tokens` excludes the cache fields).
pub(crate) fn chat_usage(u: &Value) -> Value {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let input = n("input_tokens") + n("cache_read_input_tokens") + n("cache_creation_input_tokens");
    let output = n("output_tokens");
    json!({
        "prompt_tokens": input,
        "completion_tokens": output,
        "total_tokens": input + output,
        "prompt_tokens_details": {"cached_tokens": n("cache_read_input_tokens")},
    })
}

/// Anthropic `usage` from OpenAI's (whose `prompt_tokens` includes cache reads).
pub(crate) fn anthropic_usage(u: &Value) -> Value {
    let prompt = u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    let cached = u
        .pointer("/prompt_tokens_details/cached_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(prompt);
    json!({
        "input_tokens": prompt - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": u.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0),
    })
}

fn message_to_chat(m: &Value, created: u64) -> Value {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    for b in m
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match b.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            "thinking" => {
                reasoning.push_str(b.get("thinking").and_then(Value::as_str).unwrap_or(""))
            }
            "tool_use" => calls.push(json!({
                "id": b.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {
                    "name": b.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": b.get("input").map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            })),
            _ => {}
        }
    }
    let mut message = Map::new();
    message.insert("role".into(), "assistant".into());
    message.insert(
        "content".into(),
        if text.is_empty() && !calls.is_empty() {
            Value::Null
        } else {
            text.into()
        },
    );
    message.insert("refusal".into(), Value::Null);
    if !reasoning.is_empty() {
        message.insert("reasoning_content".into(), reasoning.into());
    }
    if !calls.is_empty() {
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    let stop = m
        .get("stop_reason")
        .and_then(Value::as_str)
        .unwrap_or("end_turn");
    let mut out = json!({
        "id": m.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": created,
        "model": m.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason_for(stop),
        }],
    });
    if let (Some(u), Value::Object(o)) = (m.get("usage").filter(|u| u.is_object()), &mut out) {
        o.insert("usage".into(), chat_usage(u));
    }
    out
}

fn chat_to_message(c: &Value) -> Value {
    let choice = c.pointer("/choices/0").unwrap_or(&Value::Null);
    let msg = choice.get("message").unwrap_or(&Value::Null);
    let mut content = Vec::new();
    let reasoning = ["reasoning_content", "reasoning"].iter().find_map(|k| {
        msg.get(*k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    });
    if let Some(r) = reasoning {
        content.push(json!({"type": "thinking", "thinking": r, "signature": ""}));
    }
    for key in ["content", "refusal"] {
        if let Some(t) = msg
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            content.push(json!({"type": "text", "text": t}));
        }
    }
    for call in msg
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let f = call.get("function").unwrap_or(&Value::Null);
        let args = f.get("arguments").and_then(Value::as_str).unwrap_or("");
        let input = serde_json::from_str::<Value>(args)
            .ok()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        content.push(json!({
            "type": "tool_use",
            "id": call.get("id").cloned().unwrap_or(Value::Null),
            "name": f.get("name").cloned().unwrap_or(Value::Null),
            "input": input,
        }));
    }
    let finish = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .unwrap_or("stop");
    json!({
        "id": c.get("id").cloned().unwrap_or(Value::Null),
        "type": "message",
        "role": "assistant",
        "model": c.get("model").cloned().unwrap_or(Value::Null),
        "content": content,
        "stop_reason": stop_reason_for(finish),
        "stop_sequence": null,
        "usage": anthropic_usage(c.get("usage").unwrap_or(&Value::Null)),
    })
}

/// HTTP status → (OpenAI error type, Anthropic error type), as `tokenrelay.errors` maps them.
fn error_types(status: u16) -> (&'static str, &'static str) {
    match status {
        400 => ("invalid_request_error", "invalid_request_error"),
        401 => ("authentication_error", "authentication_error"),
        403 => ("permission_error", "permission_error"),
        404 => ("not_found_error", "not_found_error"),
        408 | 504 => ("timeout_error", "timeout_error"),
        413 => ("invalid_request_error", "request_too_large"),
        429 => ("rate_limit_error", "rate_limit_error"),
        503 | 529 => ("service_unavailable", "overloaded_error"),
        s if s >= 500 => ("server_error", "api_error"),
        _ => ("invalid_request_error", "invalid_request_error"),
    }
}

/// Translates an upstream error body (of `status`) from the `upstream` API's shape to the `client`'s. A body
/// that is not JSON becomes the message.
pub fn translate_error(upstream: Api, client: Api, status: u16, body: &[u8]) -> Vec<u8> {
    let to_anthropic = client == Api::Messages;
    if (upstream == Api::Messages) == to_anthropic {
        return body.to_vec();
    }
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let inner = value.get("error").unwrap_or(&value);
    let message = match inner.get("message").and_then(Value::as_str) {
        Some(m) => m.to_owned(),
        None => match inner {
            Value::String(s) => s.clone(),
            _ => String::from_utf8_lossy(body).into_owned(),
        },
    };
    let upstream_type = inner
        .get("type")
        .and_then(Value::as_str)
        .filter(|t| *t != "error");
    let (openai_type, anthropic_type) = error_types(status);
    let out = if to_anthropic {
        json!({"type": "error", "error": {"type": anthropic_type, "message": message}})
    } else {
        json!({"error": {
            "message": message,
            "type": upstream_type.unwrap_or(openai_type),
            "param": null,
            "code": upstream_type,
        }})
    };
    serde_json::to_vec(&out).unwrap_or_else(|_| body.to_vec())
}
