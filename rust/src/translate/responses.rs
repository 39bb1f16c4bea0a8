//! The OpenAI Responses API on deployments without it: requests become chat completions requests (and,
//! through them, Anthropic Messages requests); complete answers become Responses objects.
//!
//! Responses is stateful where the others are not: `previous_response_id`, `conversation`, stored `prompt`s
//! and `item_reference` inputs need the provider's store and are unsupported. `store` and `include` only ask
//! for extra server-side work and are ignored (nothing is stored: a later `previous_response_id` fails
//! clearly). Prior `reasoning` items in `input` are dropped, like prior thinking blocks.

use serde_json::{json, Map, Value};

use super::request::{invalid, is_default, Cx, PASSTHROUGH};
use super::response::chat_usage;
use super::TranslateError;

/// A Responses request → a chat completions request. `for_anthropic`: the chat request is an intermediate
/// form that will become a Messages request, so chat-only parameters are unsupported here, under their
/// Responses names.
pub(super) fn responses_to_chat(
    cx: &Cx,
    body: &Map<String, Value>,
    model: &str,
    for_anthropic: bool,
) -> Result<Map<String, Value>, TranslateError> {
    let mut out = Map::new();
    out.insert("model".into(), model.into());
    let mut messages = Vec::new();
    let mut instructions = None;
    let mut stream = false;
    for (key, v) in body {
        if v.is_null() {
            continue;
        }
        match key.as_str() {
            "model"
            | "store"
            | "include"
            | "metadata"
            | "service_tier"
            | "stream_options"
            | "prompt_cache_key"
            | "prompt_cache_retention"
            | "safety_identifier" => {}
            "instructions" => match v {
                Value::String(s) => instructions = Some(s.clone()),
                _ => return Err(invalid("`instructions` must be a string".into())),
            },
            "input" => input_messages(cx, v, for_anthropic, &mut messages)?,
            "max_output_tokens" => {
                out.insert("max_tokens".into(), v.clone());
            }
            "temperature" | "top_p" | "user" | "parallel_tool_calls" => {
                out.insert(key.clone(), v.clone());
            }
            "stream" => {
                stream = v.as_bool() == Some(true);
                out.insert("stream".into(), v.clone());
            }
            "tools" => {
                let tools = function_tools(cx, v)?;
                if !tools.is_empty() {
                    out.insert("tools".into(), Value::Array(tools));
                }
            }
            "tool_choice" => {
                if let Some(choice) = tool_choice(cx, v)? {
                    out.insert("tool_choice".into(), choice);
                }
            }
            "text" => text_format(cx, v, for_anthropic, &mut out)?,
            "reasoning" => {
                let effort = v.get("effort").filter(|e| !e.is_null());
                match effort {
                    None => {}
                    Some(e) if !for_anthropic => {
                        out.insert("reasoning_effort".into(), e.clone());
                    }
                    Some(_) => cx.unsupported(
                        "reasoning.effort",
                        "reasoning effort has no Anthropic Messages equivalent",
                    )?,
                }
            }
            "truncation" if v.as_str() == Some("disabled") => {}
            "background" | "top_logprobs" if matches!(v, Value::Bool(false)) || v == &json!(0) => {}
            "previous_response_id" | "conversation" | "prompt" => cx.unsupported(
                key.as_str(),
                "it refers to state stored by OpenAI; send the whole conversation in `input`",
            )?,
            k if PASSTHROUGH.contains(&k) => {
                out.insert(key.clone(), v.clone());
            }
            k if is_default(k, v) => {}
            k => cx.unsupported(k, "the Responses parameter has no equivalent")?,
        }
    }
    if let Some(s) = instructions.filter(|s| !s.is_empty()) {
        messages.insert(0, json!({"role": "system", "content": s}));
    }
    if messages.is_empty() {
        return Err(invalid("`input` is required".into()));
    }
    out.insert("messages".into(), Value::Array(messages));
    if stream && !for_anthropic {
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(out)
}

/// `input` (a string, or a list of items) → chat messages appended to `out`.
fn input_messages(
    cx: &Cx,
    v: &Value,
    for_anthropic: bool,
    out: &mut Vec<Value>,
) -> Result<(), TranslateError> {
    let items = match v {
        Value::String(s) => {
            out.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Value::Array(items) => items,
        _ => return Err(invalid("`input` must be a string or a list".into())),
    };
    // Function calls join the assistant message just before them (one chat turn, several tool calls).
    let mut assistant_open = false;
    for (i, item) in items.iter().enumerate() {
        let path = format!("input[{i}]");
        let kind = item.get("type").and_then(Value::as_str);
        let role = item.get("role").and_then(Value::as_str);
        match (kind, role) {
            (None | Some("message"), Some(role)) => {
                let content = item.get("content").unwrap_or(&Value::Null);
                let msg = match role {
                    "user" | "system" | "developer" => {
                        let images = role == "user";
                        let content = input_content(cx, content, &path, images)?;
                        json!({"role": role, "content": content})
                    }
                    "assistant" => {
                        let text = output_text(cx, content, &path)?;
                        json!({"role": "assistant", "content": text})
                    }
                    other => {
                        return Err(invalid(format!(
                            "{path}.role {other:?} is not a Responses role"
                        )))
                    }
                };
                assistant_open = role == "assistant";
                out.push(msg);
            }
            (Some("function_call"), _) => {
                let args = item.get("arguments").and_then(Value::as_str).unwrap_or("");
                if for_anthropic
                    && !args.trim().is_empty()
                    && serde_json::from_str::<Value>(args).is_err()
                {
                    return Err(invalid(format!("{path}.arguments is not valid JSON")));
                }
                let call = json!({
                    "id": item.get("call_id").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {
                        "name": item.get("name").cloned().unwrap_or(Value::Null),
                        "arguments": args,
                    },
                });
                let last = out.last_mut().filter(|_| assistant_open);
                match last.and_then(Value::as_object_mut) {
                    Some(m) => {
                        if m.get("content").and_then(Value::as_str) == Some("") {
                            m.insert("content".into(), Value::Null);
                        }
                        let calls = m.entry("tool_calls").or_insert_with(|| json!([]));
                        if let Value::Array(calls) = calls {
                            calls.push(call);
                        }
                    }
                    None => {
                        out.push(
                            json!({"role": "assistant", "content": null, "tool_calls": [call]}),
                        );
                        assistant_open = true;
                    }
                }
            }
            (Some("function_call_output"), _) => {
                let content = match item.get("output").unwrap_or(&Value::Null) {
                    Value::String(s) => Value::String(s.clone()),
                    other => input_content(cx, other, &format!("{path}.output"), for_anthropic)?,
                };
                out.push(json!({
                    "role": "tool",
                    "tool_call_id": item.get("call_id").cloned().unwrap_or(Value::Null),
                    "content": content,
                }));
                assistant_open = false;
            }
            // Prior reasoning: the upstream cannot take it back; the answer does not depend on it.
            (Some("reasoning"), _) => {}
            (Some(kind), _) => {
                cx.unsupported(
                    format!("{path}.type"),
                    &format!("input items of type {kind:?}"),
                )?;
            }
            (None, None) => return Err(invalid(format!("{path} has neither a type nor a role"))),
        }
    }
    Ok(())
}

/// A message's input content (a string or `input_*` parts) → chat content: a string when it is one text.
fn input_content(
    cx: &Cx,
    content: &Value,
    path: &str,
    images: bool,
) -> Result<Value, TranslateError> {
    let parts = match content {
        Value::String(s) => return Ok(Value::String(s.clone())),
        Value::Null => return Ok(Value::String(String::new())),
        Value::Array(parts) => parts,
        _ => {
            return Err(invalid(format!(
                "{path}.content must be a string or a list"
            )))
        }
    };
    let mut out = Vec::new();
    for (j, part) in parts.iter().enumerate() {
        let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "input_text" | "output_text" | "text" => {
                let text = part.get("text").and_then(Value::as_str).unwrap_or("");
                out.push(json!({"type": "text", "text": text}));
            }
            "input_image" if images => match part.get("image_url").and_then(Value::as_str) {
                Some(url) => {
                    let mut image = Map::new();
                    image.insert("url".into(), url.into());
                    if let Some(d) = part.get("detail").filter(|d| d.as_str() != Some("auto")) {
                        if !d.is_null() {
                            image.insert("detail".into(), d.clone());
                        }
                    }
                    out.push(json!({"type": "image_url", "image_url": image}));
                }
                None => cx.unsupported(
                    format!("{path}.content[{j}].file_id"),
                    "images by file id live in OpenAI's file store; send an image_url",
                )?,
            },
            _ => cx.unsupported(
                format!("{path}.content[{j}].type"),
                &format!("content parts of type {kind:?}"),
            )?,
        }
    }
    if let [only] = out.as_slice() {
        if let Some(text) = only.get("text").and_then(Value::as_str) {
            return Ok(Value::String(text.to_owned()));
        }
    }
    Ok(Value::Array(out))
}

/// An assistant message's content (a string or `output_text`/`refusal` parts) → its text.
fn output_text(cx: &Cx, content: &Value, path: &str) -> Result<String, TranslateError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str).unwrap_or("") {
                    "output_text" | "input_text" | "text" => {
                        text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""));
                    }
                    "refusal" => {
                        text.push_str(part.get("refusal").and_then(Value::as_str).unwrap_or(""));
                    }
                    kind => cx.unsupported(
                        format!("{path}.content[{j}].type"),
                        &format!("assistant content of type {kind:?}"),
                    )?,
                }
            }
            Ok(text)
        }
        _ => Err(invalid(format!(
            "{path}.content must be a string or a list"
        ))),
    }
}

/// Responses function tools (flat) → chat tools (nested under `function`).
fn function_tools(cx: &Cx, v: &Value) -> Result<Vec<Value>, TranslateError> {
    let list = v
        .as_array()
        .ok_or_else(|| invalid("`tools` must be a list".into()))?;
    let mut out = Vec::new();
    for (i, tool) in list.iter().enumerate() {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "function" {
            cx.unsupported(
                format!("tools[{i}].type"),
                &format!("only function tools translate, not {kind:?}"),
            )?;
            continue;
        }
        let mut f = Map::new();
        for key in ["name", "description", "parameters", "strict"] {
            if let Some(x) = tool.get(key).filter(|x| !x.is_null()) {
                f.insert(key.into(), x.clone());
            }
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(out)
}

fn tool_choice(cx: &Cx, v: &Value) -> Result<Option<Value>, TranslateError> {
    if let Some(s) = v.as_str() {
        return match s {
            "auto" | "none" | "required" => Ok(Some(v.clone())),
            other => Err(invalid(format!("unknown tool_choice {other:?}"))),
        };
    }
    match (
        v.get("type").and_then(Value::as_str),
        v.get("name").and_then(Value::as_str),
    ) {
        (Some("function"), Some(name)) => Ok(Some(
            json!({"type": "function", "function": {"name": name}}),
        )),
        _ => {
            cx.unsupported("tool_choice", "only function tools can be forced")?;
            Ok(None)
        }
    }
}

/// `text`: the output format (`text` is the default; JSON formats become chat's `response_format`).
fn text_format(
    cx: &Cx,
    v: &Value,
    for_anthropic: bool,
    out: &mut Map<String, Value>,
) -> Result<(), TranslateError> {
    if v.get("verbosity")
        .is_some_and(|x| !x.is_null() && x.as_str() != Some("medium"))
    {
        cx.unsupported("text.verbosity", "no chat or Messages equivalent")?;
    }
    let Some(format) = v.get("format").filter(|f| !f.is_null()) else {
        return Ok(());
    };
    let format = match format.get("type").and_then(Value::as_str) {
        Some("text") => return Ok(()),
        Some("json_object") => json!({"type": "json_object"}),
        Some("json_schema") => {
            let mut schema = Map::new();
            for key in ["name", "description", "schema", "strict"] {
                if let Some(x) = format.get(key).filter(|x| !x.is_null()) {
                    schema.insert(key.into(), x.clone());
                }
            }
            json!({"type": "json_schema", "json_schema": schema})
        }
        _ => return Err(invalid("unknown text.format type".into())),
    };
    if for_anthropic {
        return cx.unsupported(
            "text.format",
            "structured outputs have no Messages equivalent",
        );
    }
    out.insert("response_format".into(), format);
    Ok(())
}

// ---------------------------------------------------------------------------------- complete answers

/// Responses `usage` from OpenAI chat `usage` (same meaning: input includes cache reads).
pub(super) fn responses_usage(u: &Value) -> Value {
    let n = |p: &str| u.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let (input, output) = (n("/prompt_tokens"), n("/completion_tokens"));
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": n("/prompt_tokens_details/cached_tokens")},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": n("/completion_tokens_details/reasoning_tokens")},
        "total_tokens": input + output,
    })
}

/// Responses `usage` from Anthropic `usage`.
pub(super) fn responses_usage_from_anthropic(u: &Value) -> Value {
    responses_usage(&chat_usage(u))
}

/// (status, incomplete reason) of a response that ended with a chat `finish_reason`.
pub(super) fn status_for(finish_reason: &str) -> (&'static str, Option<&'static str>) {
    match finish_reason {
        "length" => ("incomplete", Some("max_output_tokens")),
        "content_filter" => ("incomplete", Some("content_filter")),
        _ => ("completed", None),
    }
}

/// A Responses object; `id` is the upstream's id (prefixed so it reads as a response id).
pub(super) fn response_object(
    id: &Value,
    created: u64,
    model: &Value,
    status: &str,
    incomplete: Option<&str>,
    output: Vec<Value>,
    usage: Option<Value>,
) -> Value {
    json!({
        "id": response_id(id),
        "object": "response",
        "created_at": created,
        "status": status,
        "model": model,
        "output": output,
        "parallel_tool_calls": true,
        "tool_choice": "auto",
        "tools": [],
        "temperature": null,
        "top_p": null,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "instructions": null,
        "metadata": {},
        "error": null,
        "incomplete_details": incomplete.map(|r| json!({"reason": r})),
        "usage": usage,
    })
}

fn response_id(upstream_id: &Value) -> String {
    format!("resp_{}", upstream_id.as_str().unwrap_or("tokenrelay"))
}

/// The id of an output item: a prefix and the upstream's response id (unique within one response).
pub(super) fn item_id(prefix: &str, upstream_id: &Value, n: usize) -> String {
    let base = upstream_id.as_str().unwrap_or("tokenrelay");
    if n == 0 {
        format!("{prefix}_{base}")
    } else {
        format!("{prefix}_{base}_{n}")
    }
}

pub(super) fn message_item(id: &str, text: &str, refusal: bool, status: &str) -> Value {
    let part = if refusal {
        json!({"type": "refusal", "refusal": text})
    } else {
        json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    };
    json!({"id": id, "type": "message", "status": status, "role": "assistant", "content": [part]})
}

pub(super) fn reasoning_item(id: &str, text: &str) -> Value {
    json!({
        "id": id,
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    })
}

pub(super) fn function_call_item(call_id: &Value, name: &Value, args: &str, status: &str) -> Value {
    json!({
        "id": format!("fc_{}", call_id.as_str().unwrap_or("")),
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": args,
    })
}

/// A complete chat completion → a Responses object.
pub(super) fn chat_to_response(c: &Value, created: u64) -> Value {
    let id = c.get("id").cloned().unwrap_or(Value::Null);
    let choice = c.pointer("/choices/0").unwrap_or(&Value::Null);
    let msg = choice.get("message").unwrap_or(&Value::Null);
    let text = |k: &str| msg.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    let mut output = Vec::new();
    if let Some(r) = text("reasoning_content").or_else(|| text("reasoning")) {
        output.push(reasoning_item(&item_id("rs", &id, 0), r));
    }
    if let Some(t) = text("content") {
        output.push(message_item(&item_id("msg", &id, 0), t, false, "completed"));
    }
    if let Some(t) = text("refusal") {
        output.push(message_item(&item_id("msg", &id, 1), t, true, "completed"));
    }
    for call in msg
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let f = call.get("function").unwrap_or(&Value::Null);
        let args = f.get("arguments").and_then(Value::as_str).unwrap_or("");
        let call_id = call.get("id").cloned().unwrap_or(Value::Null);
        let name = f.get("name").cloned().unwrap_or(Value::Null);
        output.push(function_call_item(&call_id, &name, args, "completed"));
    }
    let finish = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .unwrap_or("stop");
    let (status, incomplete) = status_for(finish);
    let usage = c
        .get("usage")
        .filter(|u| u.is_object())
        .map(responses_usage);
    let model = c.get("model").cloned().unwrap_or(Value::Null);
    response_object(&id, created, &model, status, incomplete, output, usage)
}
