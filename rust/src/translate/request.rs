//! Request bodies: OpenAI chat completions ↔ Anthropic Messages; Responses → either (see `responses.rs`).

use serde_json::{json, Map, Value};

use super::responses::responses_to_chat;
use super::{Kind, TranslateError};
use crate::api::Api;

/// `max_tokens` sent to Anthropic when a chat completions request gives none (Anthropic requires it).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Fields passed through verbatim in both directions: the built-in mock provider's per-request behaviour.
pub(super) const PASSTHROUGH: &[&str] = &["mock"];

/// Translates a request body of the `client` API for a deployment of `kind`, with `model` as its model.
/// `drop_unsupported`: leave out parameters with no equivalent instead of failing.
pub fn translate_request(
    client: Api,
    kind: Kind,
    body: &[u8],
    model: &str,
    drop_unsupported: bool,
) -> Result<Vec<u8>, TranslateError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| TranslateError::Invalid(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(TranslateError::Invalid(
            "the body must be a JSON object".into(),
        ));
    };
    let mut cx = Cx {
        drop: drop_unsupported,
        target: "",
    };
    let out = match (client, kind) {
        (Api::Chat, Kind::Anthropic) => {
            cx.target = "Anthropic Messages";
            chat_to_messages(&cx, &map, model)?
        }
        (Api::Messages, Kind::OpenAi) => {
            cx.target = "OpenAI chat completions";
            messages_to_chat(&cx, &map, model)?
        }
        // Only sent when the deployment has no /responses (`api = "chat"`): native otherwise.
        (Api::Responses, Kind::OpenAi) => {
            cx.target = "OpenAI chat completions";
            responses_to_chat(&cx, &map, model, false)?
        }
        (Api::Responses, Kind::Anthropic) => {
            cx.target = "Anthropic Messages";
            let chat = responses_to_chat(&cx, &map, model, true)?;
            chat_to_messages(&cx, &chat, model)?
        }
        (from, to) => {
            return Err(TranslateError::NoTranslation {
                from: from.name(),
                to: match to {
                    Kind::OpenAi => "an openai-kind deployment",
                    Kind::Anthropic => "an anthropic-kind deployment",
                },
            })
        }
    };
    serde_json::to_vec(&Value::Object(out)).map_err(|e| TranslateError::Invalid(e.to_string()))
}

pub(super) struct Cx {
    pub(super) drop: bool,
    pub(super) target: &'static str,
}

impl Cx {
    /// Ok (the caller skips the parameter) when dropping, else the error naming it.
    pub(super) fn unsupported(
        &self,
        param: impl Into<String>,
        reason: &str,
    ) -> Result<(), TranslateError> {
        if self.drop {
            return Ok(());
        }
        Err(TranslateError::Unsupported {
            param: param.into(),
            target: self.target,
            reason: reason.to_owned(),
        })
    }
}

pub(super) fn invalid(msg: String) -> TranslateError {
    TranslateError::Invalid(msg)
}

/// A value that changes nothing: `null`, or the parameter's default.
pub(super) fn is_default(key: &str, v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => match key {
            "logprobs" => !b,
            "parallel_tool_calls" => *b,
            _ => false,
        },
        Value::Number(n) => match key {
            "n" => n.as_f64() == Some(1.0),
            "presence_penalty" | "frequency_penalty" => n.as_f64() == Some(0.0),
            _ => false,
        },
        _ => false,
    }
}

// ------------------------------------------------------------------------------------ chat → messages

pub(super) fn chat_to_messages(
    cx: &Cx,
    body: &Map<String, Value>,
    model: &str,
) -> Result<Map<String, Value>, TranslateError> {
    let mut out = Map::new();
    out.insert("model".into(), model.into());
    let mut max_tokens = None;
    let mut tool_choice: Option<Value> = None;
    let mut parallel = true;
    let mut has_tools = false;
    for (key, v) in body {
        if v.is_null() {
            continue;
        }
        match key.as_str() {
            "model" | "stream_options" | "store" | "metadata" | "service_tier" => {}
            "messages" => {
                let (system, messages) = chat_messages(cx, v)?;
                if !system.is_empty() {
                    out.insert("system".into(), Value::Array(system));
                }
                out.insert("messages".into(), Value::Array(messages));
            }
            "max_tokens" => {
                max_tokens = max_tokens.or_else(|| v.as_u64());
            }
            "max_completion_tokens" => max_tokens = v.as_u64(),
            "stop" => {
                let list = match v {
                    Value::String(s) => vec![Value::String(s.clone())],
                    Value::Array(a) => a.clone(),
                    _ => return Err(invalid("`stop` must be a string or a list".into())),
                };
                if !list.is_empty() {
                    out.insert("stop_sequences".into(), Value::Array(list));
                }
            }
            "temperature" => {
                let t = v
                    .as_f64()
                    .ok_or_else(|| invalid("`temperature` must be a number".into()))?;
                out.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
            }
            "top_p" | "top_k" | "stream" => {
                out.insert(key.clone(), v.clone());
            }
            "user" => {
                out.insert("metadata".into(), json!({ "user_id": v }));
            }
            "tools" => {
                let tools = chat_tools(cx, v)?;
                has_tools = !tools.is_empty();
                if has_tools {
                    out.insert("tools".into(), Value::Array(tools));
                }
            }
            "tool_choice" => {
                tool_choice = Some(match v.as_str() {
                    Some("auto") => json!({"type": "auto"}),
                    Some("none") => json!({"type": "none"}),
                    Some("required") => json!({"type": "any"}),
                    Some(other) => return Err(invalid(format!("unknown tool_choice {other:?}"))),
                    None => {
                        let name = v.pointer("/function/name").and_then(Value::as_str);
                        match name {
                            Some(name) => json!({"type": "tool", "name": name}),
                            None => {
                                cx.unsupported("tool_choice", "only function tools can be forced")?;
                                continue;
                            }
                        }
                    }
                });
            }
            "parallel_tool_calls" => parallel = v.as_bool() != Some(false),
            k if PASSTHROUGH.contains(&k) => {
                out.insert(key.clone(), v.clone());
            }
            k if is_default(k, v) => {}
            k => cx.unsupported(k, "Anthropic Messages has no equivalent")?,
        }
    }
    if !out.contains_key("messages") {
        return Err(invalid("`messages` is required".into()));
    }
    out.insert(
        "max_tokens".into(),
        max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).into(),
    );
    if !parallel && has_tools {
        let mut choice = tool_choice
            .take()
            .unwrap_or_else(|| json!({"type": "auto"}));
        if let Value::Object(m) = &mut choice {
            if m.get("type").and_then(Value::as_str) != Some("none") {
                m.insert("disable_parallel_tool_use".into(), true.into());
            }
        }
        tool_choice = Some(choice);
    }
    if let Some(choice) = tool_choice {
        if has_tools {
            out.insert("tool_choice".into(), choice);
        }
    }
    Ok(out)
}

/// Chat `messages` → (Anthropic system blocks, Anthropic messages).
fn chat_messages(cx: &Cx, v: &Value) -> Result<(Vec<Value>, Vec<Value>), TranslateError> {
    let list = v
        .as_array()
        .ok_or_else(|| invalid("`messages` must be a list".into()))?;
    let mut system = Vec::new();
    let mut turns: Vec<(String, Vec<Value>)> = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").unwrap_or(&Value::Null);
        let path = format!("messages[{i}]");
        let (turn_role, blocks) = match role {
            "system" | "developer" => {
                system.extend(text_blocks(cx, content, &path, false)?);
                continue;
            }
            "user" => ("user", text_blocks(cx, content, &path, true)?),
            "assistant" => {
                let mut blocks = text_blocks(cx, content, &path, false)?;
                if let Some(r) = m.get("refusal").and_then(Value::as_str) {
                    if !r.is_empty() {
                        blocks.push(json!({"type": "text", "text": r}));
                    }
                }
                for (j, call) in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let f = call.get("function").unwrap_or(&Value::Null);
                    let args = f.get("arguments").and_then(Value::as_str).unwrap_or("");
                    let input: Value = if args.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(args).map_err(|_| {
                            invalid(format!(
                                "{path}.tool_calls[{j}].function.arguments is not valid JSON"
                            ))
                        })?
                    };
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call.get("id").cloned().unwrap_or_else(|| format!("call_{i}_{j}").into()),
                        "name": f.get("name").cloned().unwrap_or(Value::Null),
                        "input": input,
                    }));
                }
                ("assistant", blocks)
            }
            "tool" => {
                let id = m.get("tool_call_id").cloned().unwrap_or(Value::Null);
                let inner = match content {
                    Value::String(s) => Value::String(s.clone()),
                    other => Value::Array(text_blocks(cx, other, &path, true)?),
                };
                (
                    "user",
                    vec![json!({"type": "tool_result", "tool_use_id": id, "content": inner})],
                )
            }
            "function" => {
                cx.unsupported(format!("{path}.role"), "legacy function messages")?;
                continue;
            }
            other => return Err(invalid(format!("{path}.role {other:?} is not a chat role"))),
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((r, prev)) if r == turn_role => prev.extend(blocks),
            _ => turns.push((turn_role.to_owned(), blocks)),
        }
    }
    let messages = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    Ok((system, messages))
}

/// Chat message content (a string or parts) → Anthropic content blocks; `images` allows image parts.
fn text_blocks(
    cx: &Cx,
    content: &Value,
    path: &str,
    images: bool,
) -> Result<Vec<Value>, TranslateError> {
    let mut out = Vec::new();
    match content {
        Value::Null => {}
        Value::String(s) => {
            if !s.is_empty() {
                out.push(json!({"type": "text", "text": s}));
            }
        }
        Value::Array(parts) => {
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                match kind {
                    "text" => {
                        let text = part.get("text").and_then(Value::as_str).unwrap_or("");
                        if !text.is_empty() {
                            out.push(json!({"type": "text", "text": text}));
                        }
                    }
                    "image_url" if images => {
                        let url = part
                            .get("image_url")
                            .and_then(|u| u.get("url").or(Some(u)))
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        out.push(image_block(url));
                    }
                    _ => cx.unsupported(
                        format!("{path}.content[{j}].type"),
                        &format!("content parts of type {kind:?}"),
                    )?,
                }
            }
        }
        _ => {
            return Err(invalid(format!(
                "{path}.content must be a string or a list"
            )))
        }
    }
    Ok(out)
}

/// An image URL (a `data:` URL or a web address) → an Anthropic image block.
fn image_block(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:") {
        if let Some((meta, data)) = rest.split_once(',') {
            let media_type = meta.trim_end_matches(";base64");
            return json!({
                "type": "image",
                "source": {"type": "base64", "media_type": media_type, "data": data},
            });
        }
    }
    json!({"type": "image", "source": {"type": "url", "url": url}})
}

fn chat_tools(cx: &Cx, v: &Value) -> Result<Vec<Value>, TranslateError> {
    let list = v
        .as_array()
        .ok_or_else(|| invalid("`tools` must be a list".into()))?;
    let mut out = Vec::new();
    for (i, tool) in list.iter().enumerate() {
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            cx.unsupported(format!("tools[{i}].type"), "only function tools translate")?;
            continue;
        }
        let f = tool.get("function").unwrap_or(&Value::Null);
        let mut t = Map::new();
        t.insert("name".into(), f.get("name").cloned().unwrap_or(Value::Null));
        if let Some(d) = f.get("description").filter(|d| !d.is_null()) {
            t.insert("description".into(), d.clone());
        }
        let schema = f
            .get("parameters")
            .filter(|p| !p.is_null())
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        t.insert("input_schema".into(), schema);
        out.push(Value::Object(t));
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------ messages → chat

fn messages_to_chat(
    cx: &Cx,
    body: &Map<String, Value>,
    model: &str,
) -> Result<Map<String, Value>, TranslateError> {
    let mut out = Map::new();
    out.insert("model".into(), model.into());
    let mut system = None;
    let mut messages = Vec::new();
    let mut parallel = true;
    let mut stream = false;
    for (key, v) in body {
        if v.is_null() {
            continue;
        }
        match key.as_str() {
            "model" | "service_tier" => {}
            "system" => system = Some(system_text(cx, v)?),
            "messages" => messages = anthropic_messages(cx, v)?,
            "max_tokens" | "temperature" | "top_p" => {
                out.insert(key.clone(), v.clone());
            }
            "stop_sequences" => {
                if v.as_array().is_some_and(|a| !a.is_empty()) {
                    out.insert("stop".into(), v.clone());
                }
            }
            "stream" => {
                stream = v.as_bool() == Some(true);
                out.insert("stream".into(), v.clone());
            }
            "metadata" => {
                if let Some(user) = v.get("user_id").filter(|u| !u.is_null()) {
                    out.insert("user".into(), user.clone());
                }
            }
            "thinking" => {
                if v.get("type").and_then(Value::as_str) != Some("disabled") {
                    cx.unsupported(
                        "thinking",
                        "extended thinking has no chat completions equivalent",
                    )?;
                }
            }
            "tools" => {
                let tools = anthropic_tools(cx, v)?;
                if !tools.is_empty() {
                    out.insert("tools".into(), Value::Array(tools));
                }
            }
            "tool_choice" => {
                if v.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
                    parallel = false;
                }
                let choice = match v.get("type").and_then(Value::as_str) {
                    Some("auto") => json!("auto"),
                    Some("any") => json!("required"),
                    Some("none") => json!("none"),
                    Some("tool") => json!({
                        "type": "function",
                        "function": {"name": v.get("name").cloned().unwrap_or(Value::Null)},
                    }),
                    other => return Err(invalid(format!("unknown tool_choice type {other:?}"))),
                };
                out.insert("tool_choice".into(), choice);
            }
            k if PASSTHROUGH.contains(&k) => {
                out.insert(key.clone(), v.clone());
            }
            k => cx.unsupported(k, "OpenAI chat completions has no equivalent")?,
        }
    }
    if let Some(s) = system.filter(|s| !s.is_empty()) {
        messages.insert(0, json!({"role": "system", "content": s}));
    }
    out.insert("messages".into(), Value::Array(messages));
    if !parallel && out.contains_key("tools") {
        out.insert("parallel_tool_calls".into(), false.into());
    }
    if stream {
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(out)
}

fn system_text(cx: &Cx, v: &Value) -> Result<String, TranslateError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut texts = Vec::new();
            for (i, b) in blocks.iter().enumerate() {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        texts.push(b.get("text").and_then(Value::as_str).unwrap_or(""));
                    }
                    _ => cx.unsupported(format!("system[{i}].type"), "only text system blocks")?,
                }
            }
            Ok(texts.join("\n"))
        }
        _ => Err(invalid(
            "`system` must be a string or a list of blocks".into(),
        )),
    }
}

fn anthropic_messages(cx: &Cx, v: &Value) -> Result<Vec<Value>, TranslateError> {
    let list = v
        .as_array()
        .ok_or_else(|| invalid("`messages` must be a list".into()))?;
    let mut out = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").unwrap_or(&Value::Null);
        let path = format!("messages[{i}]");
        match (role, content) {
            ("user" | "assistant", Value::String(s)) => {
                out.push(json!({"role": role, "content": s}));
            }
            ("user", Value::Array(blocks)) => user_blocks(cx, blocks, &path, &mut out)?,
            ("assistant", Value::Array(blocks)) => {
                out.push(assistant_blocks(cx, blocks, &path)?);
            }
            ("user" | "assistant", _) => {
                return Err(invalid(format!(
                    "{path}.content must be a string or a list"
                )))
            }
            (other, _) => {
                return Err(invalid(format!(
                    "{path}.role {other:?} is not a Messages role"
                )))
            }
        }
    }
    Ok(out)
}

/// A user turn: its tool results as `tool` messages first (they answer the previous assistant turn), then
/// the rest as one user message (a plain string when it is only text).
fn user_blocks(
    cx: &Cx,
    blocks: &[Value],
    path: &str,
    out: &mut Vec<Value>,
) -> Result<(), TranslateError> {
    let mut parts = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let bpath = format!("{path}.content[{j}]");
        match b.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => parts
                .push(json!({"type": "text", "text": b.get("text").cloned().unwrap_or_default()})),
            "image" => match image_url(b) {
                Some(url) => parts.push(json!({"type": "image_url", "image_url": {"url": url}})),
                None => cx.unsupported(
                    format!("{bpath}.source"),
                    "image sources other than base64 and url",
                )?,
            },
            "tool_result" => {
                let text = match b.get("content").unwrap_or(&Value::Null) {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    Value::Array(inner) => {
                        let mut texts = Vec::new();
                        for (k, c) in inner.iter().enumerate() {
                            match c.get("type").and_then(Value::as_str) {
                                Some("text") => {
                                    texts.push(c.get("text").and_then(Value::as_str).unwrap_or(""))
                                }
                                _ => cx.unsupported(
                                    format!("{bpath}.content[{k}].type"),
                                    "tool results other than text",
                                )?,
                            }
                        }
                        texts.join("\n")
                    }
                    _ => {
                        return Err(invalid(format!(
                            "{bpath}.content must be a string or a list"
                        )))
                    }
                };
                out.push(json!({
                    "role": "tool",
                    "tool_call_id": b.get("tool_use_id").cloned().unwrap_or(Value::Null),
                    "content": text,
                }));
            }
            kind => cx.unsupported(
                format!("{bpath}.type"),
                &format!("content blocks of type {kind:?}"),
            )?,
        }
    }
    if parts.is_empty() {
        return Ok(());
    }
    if parts
        .iter()
        .all(|p| p.get("type").and_then(Value::as_str) == Some("text"))
    {
        let text: Vec<&str> = parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect();
        out.push(json!({"role": "user", "content": text.join("\n")}));
    } else {
        out.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn image_url(block: &Value) -> Option<String> {
    let source = block.get("source")?;
    match source.get("type").and_then(Value::as_str)? {
        "base64" => Some(format!(
            "data:{};base64,{}",
            source.get("media_type").and_then(Value::as_str)?,
            source.get("data").and_then(Value::as_str)?
        )),
        "url" => source.get("url").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn assistant_blocks(cx: &Cx, blocks: &[Value], path: &str) -> Result<Value, TranslateError> {
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        match b.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            "tool_use" => {
                let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                calls.push(json!({
                    "id": b.get("id").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {
                        "name": b.get("name").cloned().unwrap_or(Value::Null),
                        "arguments": input.to_string(),
                    },
                }));
            }
            // Prior reasoning: the upstream cannot take it back; the answer does not depend on it.
            "thinking" | "redacted_thinking" => {}
            kind => cx.unsupported(
                format!("{path}.content[{j}].type"),
                &format!("content blocks of type {kind:?}"),
            )?,
        }
    }
    let mut m = Map::new();
    m.insert("role".into(), "assistant".into());
    m.insert(
        "content".into(),
        if text.is_empty() && !calls.is_empty() {
            Value::Null
        } else {
            text.into()
        },
    );
    if !calls.is_empty() {
        m.insert("tool_calls".into(), Value::Array(calls));
    }
    Ok(Value::Object(m))
}

fn anthropic_tools(cx: &Cx, v: &Value) -> Result<Vec<Value>, TranslateError> {
    let list = v
        .as_array()
        .ok_or_else(|| invalid("`tools` must be a list".into()))?;
    let mut out = Vec::new();
    for (i, tool) in list.iter().enumerate() {
        match tool.get("type").and_then(Value::as_str) {
            None | Some("custom") => {}
            Some(kind) => {
                cx.unsupported(
                    format!("tools[{i}].type"),
                    &format!("server tools ({kind})"),
                )?;
                continue;
            }
        }
        let mut f = Map::new();
        f.insert(
            "name".into(),
            tool.get("name").cloned().unwrap_or(Value::Null),
        );
        if let Some(d) = tool.get("description").filter(|d| !d.is_null()) {
            f.insert("description".into(), d.clone());
        }
        f.insert(
            "parameters".into(),
            tool.get("input_schema")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
        );
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(out)
}
