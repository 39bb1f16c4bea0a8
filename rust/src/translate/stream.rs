//! Streams, event by event: OpenAI chat completion chunks ↔ Anthropic Messages events, and either → Responses
//! events (`responses_stream.rs`).
//!
//! Each translator is a small state machine fed the upstream's events in order (as the SSE parser finds
//! them, so any split of the raw stream gives the same output) and appending the client's events to `out`.

use serde_json::{json, Value};

use super::response::{anthropic_usage, chat_usage};
use super::responses_stream::{ChatToResponses, MessagesToResponses};
use super::{finish_reason_for, stop_reason_for};
use crate::api::Api;
use crate::sse::Event;

/// Translates one stream from the upstream's format to the client's.
#[derive(Debug)]
pub enum StreamTranslator {
    /// Upstream chat chunks → client Messages events.
    ChatToMessages(ChatToMessages),
    /// Upstream Messages events → client chat chunks.
    MessagesToChat(MessagesToChat),
    /// Upstream chat chunks → client Responses events.
    ChatToResponses(ChatToResponses),
    /// Upstream Messages events → client Responses events.
    MessagesToResponses(MessagesToResponses),
}

impl StreamTranslator {
    /// A translator from `upstream` to `client`, or `None` when there is no such translation.
    /// `include_usage`: the client asked for a usage chunk (chat clients only).
    pub fn new(upstream: Api, client: Api, include_usage: bool, created: u64) -> Option<Self> {
        match (upstream, client) {
            (Api::Chat, Api::Messages) => Some(Self::ChatToMessages(ChatToMessages::default())),
            (Api::Messages, Api::Chat) => Some(Self::MessagesToChat(MessagesToChat {
                include_usage,
                created,
                tool_index: None,
                ..MessagesToChat::default()
            })),
            (Api::Chat, Api::Responses) => {
                Some(Self::ChatToResponses(ChatToResponses::new(created)))
            }
            (Api::Messages, Api::Responses) => {
                Some(Self::MessagesToResponses(MessagesToResponses::new(created)))
            }
            _ => None,
        }
    }

    /// Translates one upstream event, appending the client's bytes to `out`.
    pub fn on_event(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        match self {
            Self::ChatToMessages(t) => t.on_event(ev, out),
            Self::MessagesToChat(t) => t.on_event(ev, out),
            Self::ChatToResponses(t) => t.on_event(ev, out),
            Self::MessagesToResponses(t) => t.on_event(ev, out),
        }
    }

    /// End of the upstream stream: closes what a cleanly finished upstream left open.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        match self {
            Self::ChatToMessages(t) if t.stop.is_some() => t.end_message(out),
            Self::ChatToResponses(t) => t.finish(out),
            _ => {}
        }
    }
}

/// The in-stream error object of a chat chunk, if it carries one, and its message.
pub(super) fn chat_error(chunk: &Value) -> Option<(&Value, &str)> {
    let err = chunk.get("error").filter(|e| !e.is_null())?;
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("upstream error");
    Some((err, message))
}

fn anthropic_event(out: &mut Vec<u8>, kind: &str, data: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Serialising a Value cannot fail; an empty object is the harmless fallback.
    out.extend_from_slice(&serde_json::to_vec(data).unwrap_or_else(|_| b"{}".to_vec()));
    out.extend_from_slice(b"\n\n");
}

fn data_event(out: &mut Vec<u8>, data: &Value) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&serde_json::to_vec(data).unwrap_or_else(|_| b"{}".to_vec()));
    out.extend_from_slice(b"\n\n");
}

/// The Anthropic content block open in the client's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    Thinking,
    /// A tool call, by its index in the chat stream.
    Tool(u64),
}

/// Chat completion chunks → Messages events.
#[derive(Debug, Default)]
pub struct ChatToMessages {
    started: bool,
    ended: bool,
    block: Option<Block>,
    /// Index of the next Anthropic content block.
    next_index: u64,
    stop: Option<&'static str>,
    usage: Option<Value>,
}

impl ChatToMessages {
    fn on_event(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        if ev.data == b"[DONE]" {
            self.end_message(out);
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(ev.data) else {
            return;
        };
        if let Some((err, message)) = chat_error(&chunk) {
            let kind = match err.get("type").and_then(Value::as_str) {
                Some("rate_limit_error") => "rate_limit_error",
                Some("invalid_request_error") => "invalid_request_error",
                _ => "api_error",
            };
            let data = json!({"type": "error", "error": {"type": kind, "message": message}});
            anthropic_event(out, "error", &data);
            self.ended = true;
            return;
        }
        if !self.started {
            self.start(&chunk, out);
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let Some(choice) = chunk.pointer("/choices/0") else {
            return;
        };
        if let Some(delta) = choice.get("delta") {
            self.delta(delta, out);
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.close_block(out);
            self.stop = Some(stop_reason_for(reason));
        }
    }

    fn start(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        self.started = true;
        let mut usage = json!({"input_tokens": 0, "output_tokens": 0});
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            usage = anthropic_usage(u);
        }
        let message = json!({
            "id": chunk.get("id").cloned().unwrap_or(Value::Null),
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model").cloned().unwrap_or(Value::Null),
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": usage,
        });
        anthropic_event(
            out,
            "message_start",
            &json!({"type": "message_start", "message": message}),
        );
    }

    fn delta(&mut self, delta: &Value, out: &mut Vec<u8>) {
        let text = |k: &str| {
            delta
                .get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        if let Some(r) = text("reasoning_content").or_else(|| text("reasoning")) {
            self.open(
                Block::Thinking,
                json!({"type": "thinking", "thinking": "", "signature": ""}),
                out,
            );
            self.block_delta(json!({"type": "thinking_delta", "thinking": r}), out);
        }
        if let Some(t) = text("content").or_else(|| text("refusal")) {
            self.open(Block::Text, json!({"type": "text", "text": ""}), out);
            self.block_delta(json!({"type": "text_delta", "text": t}), out);
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let idx = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let f = call.get("function").unwrap_or(&Value::Null);
            let id = call
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            if self.block != Some(Block::Tool(idx)) {
                let id = id.map_or_else(|| format!("call_{idx}"), str::to_owned);
                let name = f.get("name").and_then(Value::as_str).unwrap_or("");
                let block = json!({"type": "tool_use", "id": id, "name": name, "input": {}});
                self.open(Block::Tool(idx), block, out);
            }
            if let Some(args) = f
                .get("arguments")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                self.block_delta(
                    json!({"type": "input_json_delta", "partial_json": args}),
                    out,
                );
            }
        }
    }

    /// Makes `kind` the open block, closing another one first.
    fn open(&mut self, kind: Block, block: Value, out: &mut Vec<u8>) {
        if self.block == Some(kind) {
            return;
        }
        self.close_block(out);
        self.block = Some(kind);
        let data = json!({"type": "content_block_start", "index": self.next_index, "content_block": block});
        anthropic_event(out, "content_block_start", &data);
    }

    fn block_delta(&mut self, delta: Value, out: &mut Vec<u8>) {
        let data = json!({"type": "content_block_delta", "index": self.next_index, "delta": delta});
        anthropic_event(out, "content_block_delta", &data);
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if self.block.take().is_some() {
            let data = json!({"type": "content_block_stop", "index": self.next_index});
            anthropic_event(out, "content_block_stop", &data);
            self.next_index += 1;
        }
    }

    fn end_message(&mut self, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        self.ended = true;
        if !self.started {
            self.start(&Value::Null, out);
        }
        self.close_block(out);
        let usage = match &self.usage {
            Some(u) => anthropic_usage(u),
            None => json!({"output_tokens": 0}),
        };
        let data = json!({
            "type": "message_delta",
            "delta": {"stop_reason": self.stop.unwrap_or("end_turn"), "stop_sequence": null},
            "usage": usage,
        });
        anthropic_event(out, "message_delta", &data);
        anthropic_event(out, "message_stop", &json!({"type": "message_stop"}));
    }
}

/// Messages events → chat completion chunks.
#[derive(Debug, Default)]
pub struct MessagesToChat {
    include_usage: bool,
    created: u64,
    id: Value,
    model: Value,
    /// The chat tool-call index of the open tool_use block.
    tool_index: Option<u64>,
    tools: u64,
    usage: Value,
    ended: bool,
}

impl MessagesToChat {
    fn chunk(&self, delta: Value, finish: Option<&str>, out: &mut Vec<u8>) {
        let data = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        data_event(out, &data);
    }

    fn on_event(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        let Ok(event) = serde_json::from_slice::<Value>(ev.data) else {
            return;
        };
        let kind = match event.get("type").and_then(Value::as_str) {
            Some(k) => k,
            None => std::str::from_utf8(ev.event).unwrap_or(""),
        };
        match kind {
            "message_start" => {
                let m = event.get("message").unwrap_or(&Value::Null);
                self.id = m.get("id").cloned().unwrap_or(Value::Null);
                self.model = m.get("model").cloned().unwrap_or(Value::Null);
                if let Some(u) = m.get("usage").filter(|u| u.is_object()) {
                    self.usage = u.clone();
                }
                self.chunk(json!({"role": "assistant", "content": ""}), None, out);
            }
            "content_block_start" => {
                let b = event.get("content_block").unwrap_or(&Value::Null);
                self.tool_index = None;
                match b.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let idx = self.tools;
                        self.tools += 1;
                        self.tool_index = Some(idx);
                        let call = json!({
                            "index": idx,
                            "id": b.get("id").cloned().unwrap_or(Value::Null),
                            "type": "function",
                            "function": {"name": b.get("name").cloned().unwrap_or(Value::Null), "arguments": ""},
                        });
                        self.chunk(json!({"tool_calls": [call]}), None, out);
                    }
                    Some("text") => {
                        if let Some(t) = b
                            .get("text")
                            .and_then(Value::as_str)
                            .filter(|s| !s.is_empty())
                        {
                            self.chunk(json!({"content": t}), None, out);
                        }
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let d = event.get("delta").unwrap_or(&Value::Null);
                let field = |k: &str| d.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        if let Some(t) = field("text") {
                            self.chunk(json!({"content": t}), None, out);
                        }
                    }
                    Some("thinking_delta") => {
                        if let Some(t) = field("thinking") {
                            self.chunk(json!({"reasoning_content": t}), None, out);
                        }
                    }
                    Some("input_json_delta") => {
                        if let (Some(p), Some(idx)) = (field("partial_json"), self.tool_index) {
                            let call = json!({"index": idx, "function": {"arguments": p}});
                            self.chunk(json!({"tool_calls": [call]}), None, out);
                        }
                    }
                    _ => {}
                }
            }
            "content_block_stop" => self.tool_index = None,
            "message_delta" => {
                if let (Some(u), Value::Object(total)) = (
                    event.get("usage").and_then(Value::as_object),
                    &mut self.usage,
                ) {
                    for (k, v) in u {
                        if !v.is_null() {
                            total.insert(k.clone(), v.clone());
                        }
                    }
                } else if let Some(u) = event.get("usage").filter(|u| u.is_object()) {
                    self.usage = u.clone();
                }
                let stop = event
                    .pointer("/delta/stop_reason")
                    .and_then(Value::as_str)
                    .unwrap_or("end_turn");
                self.chunk(json!({}), Some(finish_reason_for(stop)), out);
            }
            "message_stop" => {
                self.ended = true;
                if self.include_usage {
                    let data = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": chat_usage(&self.usage),
                    });
                    data_event(out, &data);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            "error" => {
                self.ended = true;
                let e = event.get("error").unwrap_or(&Value::Null);
                let data = json!({"error": {
                    "message": e.get("message").cloned().unwrap_or(Value::Null),
                    "type": e.get("type").cloned().unwrap_or_else(|| "api_error".into()),
                    "param": null,
                    "code": null,
                }});
                data_event(out, &data);
            }
            _ => {} // ping
        }
    }
}
