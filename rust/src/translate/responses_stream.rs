//! Streams for a Responses client: chat completion chunks or Anthropic Messages events → the Responses
//! event sequence (`response.created`, `response.in_progress`, output items with their parts and deltas,
//! `response.completed`), each event with its `sequence_number`.
//!
//! [`ResponsesWriter`] holds the client's side (output items, their accumulated text for the `.done` events
//! and the final response object); the two adapters only read the upstream's events and call it.

use serde_json::{json, Map, Value};

use super::finish_reason_for;
use super::responses::{
    function_call_item, item_id, message_item, reasoning_item, response_object, responses_usage,
    responses_usage_from_anthropic, status_for,
};
use super::stream::chat_error;
use crate::sse::Event;

/// What the open output item is.
#[derive(Debug, Clone, PartialEq)]
enum ItemKind {
    Text,
    Refusal,
    Reasoning,
    /// A function call, keyed by the upstream's index for it (chat tool-call index, Anthropic block index).
    Call {
        key: u64,
        call_id: Value,
        name: Value,
    },
}

#[derive(Debug)]
struct OpenItem {
    kind: ItemKind,
    id: String,
    /// The item's text (or arguments) so far.
    buf: String,
}

/// The client's Responses stream, built from calls made while reading the upstream's events.
#[derive(Debug, Default)]
pub struct ResponsesWriter {
    created: u64,
    seq: u64,
    started: bool,
    ended: bool,
    /// The upstream's id and model.
    id: Value,
    model: Value,
    open: Option<OpenItem>,
    /// Completed output items, in output order.
    done: Vec<Value>,
    /// How many items of each id prefix were made (item ids must be unique in a response).
    messages: usize,
    reasonings: usize,
    /// Chat `finish_reason` once known.
    finish: Option<&'static str>,
    /// Responses-format usage once known.
    usage: Option<Value>,
}

impl ResponsesWriter {
    fn new(created: u64) -> Self {
        Self {
            created,
            ..Self::default()
        }
    }

    fn event(&mut self, out: &mut Vec<u8>, kind: &str, fields: Value) {
        let mut data = Map::new();
        data.insert("type".into(), kind.into());
        data.insert("sequence_number".into(), self.seq.into());
        self.seq += 1;
        if let Value::Object(fields) = fields {
            data.extend(fields);
        }
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        // Serialising a Value cannot fail; an empty object is the harmless fallback.
        let bytes = serde_json::to_vec(&Value::Object(data)).unwrap_or_else(|_| b"{}".to_vec());
        out.extend_from_slice(&bytes);
        out.extend_from_slice(b"\n\n");
    }

    fn response(&self, status: &str, incomplete: Option<&str>, output: Vec<Value>) -> Value {
        let usage = if status == "in_progress" {
            None
        } else {
            self.usage.clone()
        };
        response_object(
            &self.id,
            self.created,
            &self.model,
            status,
            incomplete,
            output,
            usage,
        )
    }

    /// `response.created` and `response.in_progress` (once).
    fn start(&mut self, id: Value, model: Value, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        self.id = id;
        self.model = model;
        let response = self.response("in_progress", None, Vec::new());
        self.event(out, "response.created", json!({"response": response}));
        let response = self.response("in_progress", None, Vec::new());
        self.event(out, "response.in_progress", json!({"response": response}));
    }

    fn output_index(&self) -> usize {
        self.done.len()
    }

    /// Makes an item of `kind` the open one (closing another first); true if it was opened now.
    fn open(&mut self, kind: ItemKind, out: &mut Vec<u8>) -> bool {
        if self.open.as_ref().is_some_and(|o| o.kind == kind) {
            return false;
        }
        self.close(out);
        if !self.started {
            self.start(Value::Null, Value::Null, out);
        }
        let idx = self.output_index();
        let (id, item) = match &kind {
            ItemKind::Text | ItemKind::Refusal => {
                let id = item_id("msg", &self.id, self.messages);
                self.messages += 1;
                let item = json!({
                    "id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": [],
                });
                (id, item)
            }
            ItemKind::Reasoning => {
                let id = item_id("rs", &self.id, self.reasonings);
                self.reasonings += 1;
                (
                    id.clone(),
                    json!({"id": id, "type": "reasoning", "summary": []}),
                )
            }
            ItemKind::Call { call_id, name, .. } => {
                let item = function_call_item(call_id, name, "", "in_progress");
                let id = item
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                (id, item)
            }
        };
        self.event(
            out,
            "response.output_item.added",
            json!({"output_index": idx, "item": item}),
        );
        let part = match kind {
            ItemKind::Text => Some(json!({"type": "output_text", "text": "", "annotations": []})),
            ItemKind::Refusal => Some(json!({"type": "refusal", "refusal": ""})),
            _ => None,
        };
        if let Some(part) = part {
            let data =
                json!({"item_id": id, "output_index": idx, "content_index": 0, "part": part});
            self.event(out, "response.content_part.added", data);
        }
        self.open = Some(OpenItem {
            kind,
            id,
            buf: String::new(),
        });
        true
    }

    /// Appends `delta` to the open item (of `kind`, opened if needed).
    fn delta(&mut self, kind: ItemKind, delta: &str, out: &mut Vec<u8>) {
        self.open(kind, out);
        let idx = self.output_index();
        let Some(open) = self.open.as_mut() else {
            return;
        };
        open.buf.push_str(delta);
        let id = open.id.clone();
        let (name, data) = match open.kind {
            ItemKind::Text => (
                "response.output_text.delta",
                json!({"item_id": id, "output_index": idx, "content_index": 0, "delta": delta, "logprobs": []}),
            ),
            ItemKind::Refusal => (
                "response.refusal.delta",
                json!({"item_id": id, "output_index": idx, "content_index": 0, "delta": delta}),
            ),
            ItemKind::Reasoning => (
                "response.reasoning_text.delta",
                json!({"item_id": id, "output_index": idx, "content_index": 0, "delta": delta}),
            ),
            ItemKind::Call { .. } => (
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": idx, "delta": delta}),
            ),
        };
        self.event(out, name, data);
    }

    fn text(&mut self, delta: &str, out: &mut Vec<u8>) {
        self.delta(ItemKind::Text, delta, out);
    }

    fn refusal(&mut self, delta: &str, out: &mut Vec<u8>) {
        self.delta(ItemKind::Refusal, delta, out);
    }

    fn reasoning(&mut self, delta: &str, out: &mut Vec<u8>) {
        self.delta(ItemKind::Reasoning, delta, out);
    }

    /// Opens a function call item (unless the one with this `key` is open).
    fn call_start(&mut self, key: u64, call_id: Value, name: Value, out: &mut Vec<u8>) {
        if self.open_call() == Some(key) {
            return;
        }
        self.open(ItemKind::Call { key, call_id, name }, out);
    }

    /// Arguments for the call with this `key`, if it is the open item.
    fn call_args(&mut self, key: u64, delta: &str, out: &mut Vec<u8>) {
        if let Some(ItemKind::Call { key: k, .. }) = self.open.as_ref().map(|o| &o.kind) {
            if *k == key {
                let kind = self.open.as_ref().map(|o| o.kind.clone());
                if let Some(kind) = kind {
                    self.delta(kind, delta, out);
                }
            }
        }
    }

    fn open_call(&self) -> Option<u64> {
        match self.open.as_ref().map(|o| &o.kind) {
            Some(ItemKind::Call { key, .. }) => Some(*key),
            _ => None,
        }
    }

    /// Closes the open item: its `.done` events, then `response.output_item.done`.
    fn close(&mut self, out: &mut Vec<u8>) {
        let Some(open) = self.open.take() else {
            return;
        };
        let idx = self.output_index();
        let (id, text) = (open.id, open.buf);
        let item = match open.kind {
            ItemKind::Text => {
                let data = json!({"item_id": id, "output_index": idx, "content_index": 0, "text": text, "logprobs": []});
                self.event(out, "response.output_text.done", data);
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                let data =
                    json!({"item_id": id, "output_index": idx, "content_index": 0, "part": part});
                self.event(out, "response.content_part.done", data);
                message_item(&id, &text, false, "completed")
            }
            ItemKind::Refusal => {
                let data = json!({"item_id": id, "output_index": idx, "content_index": 0, "refusal": text});
                self.event(out, "response.refusal.done", data);
                let part = json!({"type": "refusal", "refusal": text});
                let data =
                    json!({"item_id": id, "output_index": idx, "content_index": 0, "part": part});
                self.event(out, "response.content_part.done", data);
                message_item(&id, &text, true, "completed")
            }
            ItemKind::Reasoning => {
                let data =
                    json!({"item_id": id, "output_index": idx, "content_index": 0, "text": text});
                self.event(out, "response.reasoning_text.done", data);
                reasoning_item(&id, &text)
            }
            ItemKind::Call { call_id, name, .. } => {
                let data =
                    json!({"item_id": id, "output_index": idx, "name": name, "arguments": text});
                self.event(out, "response.function_call_arguments.done", data);
                function_call_item(&call_id, &name, &text, "completed")
            }
        };
        self.event(
            out,
            "response.output_item.done",
            json!({"output_index": idx, "item": item}),
        );
        self.done.push(item);
    }

    /// The end: `response.completed` (or `response.incomplete`) with every output item and the usage.
    fn complete(&mut self, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        if !self.started {
            self.start(Value::Null, Value::Null, out);
        }
        self.close(out);
        self.ended = true;
        let (status, incomplete) = status_for(self.finish.unwrap_or("stop"));
        let response = self.response(status, incomplete, self.done.clone());
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.event(out, kind, json!({"response": response}));
    }

    /// An upstream error: the stream ends with an `error` event.
    fn fail(&mut self, code: &str, message: &str, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        self.ended = true;
        let data = json!({"code": code, "message": message, "param": null});
        self.event(out, "error", data);
    }
}

/// Chat completion chunks → Responses events.
#[derive(Debug)]
pub struct ChatToResponses {
    w: ResponsesWriter,
}

impl ChatToResponses {
    pub(super) fn new(created: u64) -> Self {
        Self {
            w: ResponsesWriter::new(created),
        }
    }

    pub(super) fn on_event(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        let w = &mut self.w;
        if w.ended {
            return;
        }
        if ev.data == b"[DONE]" {
            w.complete(out);
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(ev.data) else {
            return;
        };
        if let Some((err, message)) = chat_error(&chunk) {
            let code = ["code", "type"]
                .iter()
                .find_map(|k| err.get(*k).and_then(Value::as_str))
                .unwrap_or("server_error");
            w.fail(code, message, out);
            return;
        }
        if !w.started {
            let field = |k: &str| chunk.get(k).cloned().unwrap_or(Value::Null);
            w.start(field("id"), field("model"), out);
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            w.usage = Some(responses_usage(u));
        }
        let Some(choice) = chunk.pointer("/choices/0") else {
            return;
        };
        if let Some(delta) = choice.get("delta") {
            let text = |k: &str| {
                delta
                    .get(k)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
            };
            if let Some(r) = text("reasoning_content").or_else(|| text("reasoning")) {
                w.reasoning(r, out);
            }
            if let Some(t) = text("content") {
                w.text(t, out);
            }
            if let Some(t) = text("refusal") {
                w.refusal(t, out);
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let idx = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                let f = call.get("function").unwrap_or(&Value::Null);
                if w.open_call() != Some(idx) {
                    let call_id = call
                        .get("id")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .map_or_else(|| format!("call_{idx}"), str::to_owned);
                    let name = f.get("name").cloned().unwrap_or_else(|| "".into());
                    w.call_start(idx, call_id.into(), name, out);
                }
                if let Some(args) = f
                    .get("arguments")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                {
                    w.call_args(idx, args, out);
                }
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            w.close(out);
            w.finish = Some(match reason {
                "length" => "length",
                "content_filter" => "content_filter",
                _ => "stop",
            });
        }
    }

    /// End of the upstream stream: a finished answer whose `[DONE]` never came still completes.
    pub(super) fn finish(&mut self, out: &mut Vec<u8>) {
        if self.w.finish.is_some() {
            self.w.complete(out);
        }
    }
}

/// Anthropic Messages events → Responses events.
#[derive(Debug)]
pub struct MessagesToResponses {
    w: ResponsesWriter,
    /// The Anthropic usage so far (`message_start`'s, updated by `message_delta`).
    usage: Value,
}

impl MessagesToResponses {
    pub(super) fn new(created: u64) -> Self {
        Self {
            w: ResponsesWriter::new(created),
            usage: Value::Null,
        }
    }

    pub(super) fn on_event(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        if self.w.ended {
            return;
        }
        let Ok(event) = serde_json::from_slice::<Value>(ev.data) else {
            return;
        };
        let kind = match event.get("type").and_then(Value::as_str) {
            Some(k) => k,
            None => std::str::from_utf8(ev.event).unwrap_or(""),
        };
        let w = &mut self.w;
        match kind {
            "message_start" => {
                let m = event.get("message").unwrap_or(&Value::Null);
                if let Some(u) = m.get("usage").filter(|u| u.is_object()) {
                    self.usage = u.clone();
                }
                let field = |k: &str| m.get(k).cloned().unwrap_or(Value::Null);
                w.start(field("id"), field("model"), out);
            }
            "content_block_start" => {
                let b = event.get("content_block").unwrap_or(&Value::Null);
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
                let field = |k: &str| b.get(k).cloned().unwrap_or(Value::Null);
                match b.get("type").and_then(Value::as_str) {
                    Some("tool_use") => w.call_start(index, field("id"), field("name"), out),
                    Some("text") => {
                        if let Some(t) = b
                            .get("text")
                            .and_then(Value::as_str)
                            .filter(|s| !s.is_empty())
                        {
                            w.text(t, out);
                        }
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let d = event.get("delta").unwrap_or(&Value::Null);
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
                let field = |k: &str| d.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        if let Some(t) = field("text") {
                            w.text(t, out);
                        }
                    }
                    Some("thinking_delta") => {
                        if let Some(t) = field("thinking") {
                            w.reasoning(t, out);
                        }
                    }
                    Some("input_json_delta") => {
                        if let Some(p) = field("partial_json") {
                            w.call_args(index, p, out);
                        }
                    }
                    _ => {}
                }
            }
            "content_block_stop" => w.close(out),
            "message_delta" => {
                if let Some(u) = event.get("usage").and_then(Value::as_object) {
                    if !self.usage.is_object() {
                        self.usage = json!({});
                    }
                    if let Value::Object(total) = &mut self.usage {
                        for (k, v) in u {
                            if !v.is_null() {
                                total.insert(k.clone(), v.clone());
                            }
                        }
                    }
                }
                w.usage = Some(responses_usage_from_anthropic(&self.usage));
                let stop = event
                    .pointer("/delta/stop_reason")
                    .and_then(Value::as_str)
                    .unwrap_or("end_turn");
                w.finish = Some(finish_reason_for(stop));
            }
            "message_stop" => w.complete(out),
            "error" => {
                let e = event.get("error").unwrap_or(&Value::Null);
                let code = e.get("type").and_then(Value::as_str).unwrap_or("api_error");
                let message = e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("upstream error");
                w.fail(code, message, out);
            }
            _ => {} // ping
        }
    }
}
