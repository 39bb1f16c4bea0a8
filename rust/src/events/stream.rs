//! `StreamMeter`: the SSE parser and the per-API event decoders behind one `feed(chunk)` call per read.

use serde_json::value::RawValue;

use super::wire::{AnEvent, ChatChunk, ChatMessage, ErrorObj, RespEvent, Text};
use super::{Tally, Usage};
use crate::api::Api;
use crate::sse::{Event, SseParser, DEFAULT_MAX_EVENT_BYTES};
use crate::translate::StreamTranslator;

/// An in-stream error event, normalised to a type and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    /// The provider's error type or code (`"overloaded_error"`, `"server_error"`, ...).
    pub kind: String,
    /// The provider's message.
    pub message: String,
}

/// What the decoders learnt from the events so far.
#[derive(Debug, Default)]
struct State {
    tally: Tally,
    events: u64,
    malformed: u64,
    oversized: u64,
    done: bool,
    content_started: bool,
    finish_reason: Option<String>,
    error: Option<StreamError>,
}

/// Meters one streamed response: splits SSE events, decodes usage and text, optionally strips the usage-only
/// chunk the proxy asked for. One per request, fed every raw upstream read in order.
#[derive(Debug)]
pub struct StreamMeter {
    api: Api,
    model: String,
    strip_usage: bool,
    max_event_bytes: usize,
    parser: SseParser,
    state: State,
    /// Bytes held back (strip mode only): the incomplete tail after the last event boundary.
    held: Vec<u8>,
    /// Absolute stream offset of `held[0]`.
    held_start: u64,
    /// Scratch: absolute ranges of events to drop in the current feed.
    drops: Vec<(u64, u64)>,
    finished: bool,
    /// Rewrites every event into the client's format (a route whose deployment speaks another API). Boxed:
    /// most streams are not translated, and a meter lives as long as its stream.
    translator: Option<Box<StreamTranslator>>,
}

impl StreamMeter {
    /// A meter for `api`. `strip_usage` (chat/completions only) removes usage-only chunks from the output.
    pub fn new(api: Api, model: &str, strip_usage: bool) -> Self {
        Self::with_limit(api, model, strip_usage, DEFAULT_MAX_EVENT_BYTES)
    }

    /// As [`StreamMeter::new`], with a limit on the size of one event.
    pub fn with_limit(api: Api, model: &str, strip_usage: bool, max_event_bytes: usize) -> Self {
        StreamMeter {
            api,
            model: model.to_owned(),
            strip_usage: strip_usage && matches!(api, Api::Chat | Api::Completions),
            max_event_bytes,
            parser: SseParser::new(max_event_bytes),
            state: State::default(),
            held: Vec::new(),
            held_start: 0,
            drops: Vec::new(),
            finished: false,
            translator: None,
        }
    }

    /// A meter for an `upstream` stream whose events are translated to the `client` API (usage is still
    /// decoded from the upstream's events). `include_usage`: a chat client asked for the usage chunk.
    /// `None` when there is no translation between the two.
    pub fn translating(
        upstream: Api,
        client: Api,
        model: &str,
        include_usage: bool,
        created: u64,
    ) -> Option<Self> {
        let translator = StreamTranslator::new(upstream, client, include_usage, created)?;
        let mut meter = Self::new(upstream, model, false);
        meter.translator = Some(Box::new(translator));
        Some(meter)
    }

    /// Feeds `chunk` to the parser, the decoders and the translator; the translated bytes.
    fn feed_translated(&mut self, chunk: &[u8], finish: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let api = self.api;
        let state = &mut self.state;
        let Some(tr) = self.translator.as_mut() else {
            return out;
        };
        let mut on_event = |ev: &Event<'_>| {
            state.on_event(api, ev);
            tr.on_event(ev, &mut out);
        };
        if finish {
            self.parser.finish(on_event);
            tr.finish(&mut out);
        } else if self.parser.feed(chunk, &mut on_event).is_err() {
            self.state.oversized += 1;
            self.state.malformed += 1;
        }
        out
    }

    /// Parses one raw read. `None`: forward `chunk` unchanged. `Some(bytes)`: forward these instead.
    pub fn feed(&mut self, chunk: &[u8]) -> Option<Vec<u8>> {
        if self.translator.is_some() {
            return Some(self.feed_translated(chunk, false));
        }
        let chunk_start = self.parser.offset();
        let api = self.api;
        let strip = self.strip_usage;
        let state = &mut self.state;
        let drops = &mut self.drops;
        let res = self.parser.feed(chunk, |ev| {
            if state.on_event(api, ev) && strip {
                drops.push((ev.start, ev.end));
            }
        });
        if res.is_err() {
            self.state.oversized += 1;
            self.state.malformed += 1;
        }
        if !self.strip_usage {
            return None;
        }
        let chunk_end = chunk_start + chunk.len() as u64;
        let boundary = self.parser.boundary();
        if self.held.is_empty() && self.drops.is_empty() && boundary == chunk_end {
            self.held_start = chunk_end;
            return None;
        }
        // Never hold more than one event's limit: past it, forward as is.
        let keep_from = if self.held.len() + chunk.len() > self.max_event_bytes {
            chunk_end
        } else {
            boundary.max(self.held_start)
        };
        Some(self.emit(chunk, chunk_start, keep_from))
    }

    /// End of stream: the held-back bytes to forward (empty normally). Also meters an unterminated last event.
    pub fn flush(&mut self) -> Vec<u8> {
        if self.finished {
            return Vec::new();
        }
        self.finished = true;
        if self.translator.is_some() {
            return self.feed_translated(&[], true);
        }
        let api = self.api;
        let strip = self.strip_usage;
        let state = &mut self.state;
        let drops = &mut self.drops;
        self.parser.finish(|ev| {
            if state.on_event(api, ev) && strip {
                drops.push((ev.start, ev.end));
            }
        });
        if !self.strip_usage {
            return Vec::new();
        }
        let end = self.parser.offset();
        self.emit(&[], end, end)
    }

    /// Builds the output from `held ++ chunk` up to `keep_from`, minus dropped events; holds the rest.
    fn emit(&mut self, chunk: &[u8], chunk_start: u64, keep_from: u64) -> Vec<u8> {
        let held_start = self.held_start;
        let held_len = self.held.len() as u64;
        let slice = |held: &[u8], a: u64, b: u64| -> Vec<u8> {
            // Absolute [a, b) of held ++ chunk (held ends exactly where chunk starts).
            let mut v = Vec::new();
            if a < chunk_start {
                let ha = (a - held_start) as usize;
                let hb = (b.min(chunk_start) - held_start) as usize;
                v.extend_from_slice(&held[ha..hb]);
            }
            if b > chunk_start {
                let ca = (a.max(chunk_start) - chunk_start) as usize;
                let cb = (b - chunk_start) as usize;
                v.extend_from_slice(&chunk[ca..cb]);
            }
            v
        };
        debug_assert_eq!(held_start + held_len, chunk_start);
        let mut out = Vec::with_capacity((keep_from - held_start) as usize);
        let mut cursor = held_start;
        for &(s, e) in &self.drops {
            // An event partly forwarded already (over-long hold) cannot be dropped any more.
            if s < cursor || e > keep_from {
                continue;
            }
            out.extend_from_slice(&slice(&self.held, cursor, s));
            cursor = e;
        }
        self.drops.clear();
        out.extend_from_slice(&slice(&self.held, cursor, keep_from));
        let end = chunk_start + chunk.len() as u64;
        let rest = slice(&self.held, keep_from, end);
        self.held = rest;
        self.held_start = keep_from;
        out
    }

    /// The usage for the whole request, estimating missing figures. May tokenize: call without the GIL.
    pub fn usage(&self, request_body: Option<&[u8]>) -> Usage {
        self.state.tally.usage(self.api, &self.model, request_body)
    }

    /// The API this meter decodes.
    pub fn api(&self) -> Api {
        self.api
    }
    /// Events dispatched so far.
    pub fn events(&self) -> u64 {
        self.state.events
    }
    /// Events that could not be decoded (bad JSON, unknown type, over-long).
    pub fn malformed(&self) -> u64 {
        self.state.malformed
    }
    /// Events dropped for going over the size limit.
    pub fn oversized(&self) -> u64 {
        self.state.oversized
    }
    /// The stream's terminal event was seen.
    pub fn done(&self) -> bool {
        self.state.done
    }
    /// The first output token (text, tool call, refusal or reasoning) was seen.
    pub fn content_started(&self) -> bool {
        self.state.content_started
    }
    /// finish_reason / stop_reason / response status.
    pub fn finish_reason(&self) -> Option<&str> {
        self.state.finish_reason.as_deref()
    }
    /// An in-stream error event.
    pub fn error(&self) -> Option<&StreamError> {
        self.state.error.as_ref()
    }
    /// Bytes of text `usage()` would tokenize.
    pub fn estimate_bytes(&self) -> usize {
        self.state.tally.estimate_bytes()
    }
    /// Bytes [`StreamMeter::usage`] would tokenize given a request body of `request_len` bytes.
    pub fn work_bytes(&self, request_len: usize) -> usize {
        self.state.tally.work_bytes(request_len)
    }
}

/// Appends a chat message/delta's text to the tally; true if any was non-empty.
pub(super) fn chat_message(t: &mut Tally, m: &ChatMessage<'_>) -> bool {
    let mut any = t.add_text(&m.content);
    any |= t.add_text(&m.refusal);
    // Some servers send the same text as both `reasoning_content` and `reasoning`: count it once.
    any |= if m.reasoning_content.as_str().is_empty() {
        t.add_reasoning(&m.reasoning)
    } else {
        t.add_reasoning(&m.reasoning_content)
    };
    for f in m
        .tool_calls
        .iter()
        .flatten()
        .filter_map(|c| c.function.as_ref())
    {
        any |= t.add_text(&f.name);
        any |= t.add_text(&f.arguments);
    }
    if let Some(f) = &m.function_call {
        any |= t.add_text(&f.name);
        any |= t.add_text(&f.arguments);
    }
    any
}

/// Normalises any of the error shapes (flat, nested `error`, or a bare string) to a [`StreamError`].
fn parse_error(raw: &[u8]) -> StreamError {
    let fallback = || StreamError {
        kind: "error".to_owned(),
        message: String::from_utf8_lossy(raw).into_owned(),
    };
    let Ok(obj) = serde_json::from_slice::<ErrorObj<'_>>(raw) else {
        return match serde_json::from_slice::<String>(raw) {
            Ok(s) => StreamError {
                kind: "error".to_owned(),
                message: s,
            },
            Err(_) => fallback(),
        };
    };
    if let Some(inner) = obj.error {
        return parse_error(inner.get().as_bytes());
    }
    let kind = [&obj.kind, &obj.code]
        .into_iter()
        .map(Text::as_str)
        .find(|s| !s.is_empty() && *s != "error")
        .unwrap_or("error");
    StreamError {
        kind: kind.to_owned(),
        message: obj.message.as_str().to_owned(),
    }
}

fn raw_error(raw: &RawValue) -> StreamError {
    parse_error(raw.get().as_bytes())
}

impl State {
    /// Decodes one event; true if it is a usage-only chat/completions chunk (the one strip mode removes).
    fn on_event(&mut self, api: Api, ev: &Event<'_>) -> bool {
        self.events += 1;
        if ev.data == b"[DONE]" {
            self.done = true;
            return false;
        }
        match api {
            Api::Chat | Api::Completions | Api::Embeddings => self.chat_event(ev),
            Api::Responses => {
                self.responses_event(ev);
                false
            }
            Api::Messages => {
                self.messages_event(ev);
                false
            }
        }
    }

    fn set_error(&mut self, e: StreamError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    fn started(&mut self, any: bool) {
        self.content_started |= any;
    }

    fn chat_event(&mut self, ev: &Event<'_>) -> bool {
        let Ok(c) = serde_json::from_slice::<ChatChunk<'_>>(ev.data) else {
            if ev.event == b"error" {
                self.set_error(parse_error(ev.data));
            } else {
                self.malformed += 1;
            }
            return false;
        };
        let t = &mut self.tally;
        t.see_model(&c.model);
        if let Some(u) = &c.usage {
            t.oa_usage(u);
        }
        let mut any = false;
        for choice in c.choices.iter().flatten() {
            any |= t.add_text(&choice.text);
            if let Some(d) = &choice.delta {
                any |= chat_message(t, d);
            }
            if let Some(m) = &choice.message {
                any |= chat_message(t, m);
            }
            if let Some(r) = &choice.finish_reason.0 {
                self.finish_reason = Some(r.clone().into_owned());
            }
        }
        self.started(any);
        if let Some(e) = c.error {
            self.set_error(raw_error(e));
        } else if ev.event == b"error" {
            self.set_error(parse_error(ev.data));
        }
        matches!(&c.choices, Some(v) if v.is_empty()) && c.usage.is_some()
    }

    fn responses_event(&mut self, ev: &Event<'_>) {
        let Ok(r) = serde_json::from_slice::<RespEvent<'_>>(ev.data) else {
            self.malformed += 1;
            return;
        };
        let kind = match r.kind.as_str() {
            "" => std::str::from_utf8(ev.event).unwrap_or(""),
            k => k,
        };
        let t = &mut self.tally;
        match kind {
            "response.output_text.delta"
            | "response.refusal.delta"
            | "response.function_call_arguments.delta"
            | "response.custom_tool_call_input.delta" => {
                let any = t.add_text(&r.delta);
                self.started(any);
            }
            k if k.starts_with("response.reasoning") && k.ends_with(".delta") => {
                let any = t.add_reasoning(&r.delta);
                self.started(any);
            }
            "response.output_item.added" => {
                if let Some(item) = &r.item {
                    if matches!(item.kind.as_str(), "function_call" | "custom_tool_call") {
                        let any = t.add_text(&item.name);
                        self.started(any);
                    }
                }
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                self.done = true;
                if let Some(resp) = &r.response {
                    t.see_model(&resp.model);
                    if let Some(u) = &resp.usage {
                        t.resp_usage(u);
                    }
                    let status = match resp.status.as_str() {
                        "" => kind.trim_start_matches("response."),
                        s => s,
                    };
                    self.finish_reason = Some(status.to_owned());
                    if let Some(e) = resp.error {
                        if e.get() != "null" {
                            self.set_error(raw_error(e));
                        }
                    }
                }
                if kind == "response.failed" && self.error.is_none() {
                    self.set_error(StreamError {
                        kind: "response.failed".to_owned(),
                        message: String::new(),
                    });
                }
            }
            "error" => {
                let e = match r.error {
                    Some(inner) => raw_error(inner),
                    None => parse_error(ev.data),
                };
                self.set_error(e);
            }
            k if k.starts_with("response.") => {
                if let Some(resp) = &r.response {
                    t.see_model(&resp.model);
                }
            }
            _ => self.malformed += 1,
        }
    }

    fn messages_event(&mut self, ev: &Event<'_>) {
        let Ok(a) = serde_json::from_slice::<AnEvent<'_>>(ev.data) else {
            if ev.event == b"error" {
                self.set_error(parse_error(ev.data));
            } else {
                self.malformed += 1;
            }
            return;
        };
        let kind = match a.kind.as_str() {
            "" => std::str::from_utf8(ev.event).unwrap_or(""),
            k => k,
        };
        let t = &mut self.tally;
        match kind {
            "message_start" => {
                if let Some(m) = &a.message {
                    t.see_model(&m.model);
                    if let Some(u) = &m.usage {
                        t.an_usage(u, false);
                    }
                }
            }
            "content_block_start" => {
                if let Some(b) = &a.content_block {
                    let any = match b.kind.as_str() {
                        "thinking" => t.add_reasoning(&b.thinking),
                        "tool_use" | "server_tool_use" => t.add_text(&b.name),
                        _ => t.add_text(&b.text),
                    };
                    self.started(any);
                }
            }
            "content_block_delta" => {
                if let Some(d) = &a.delta {
                    let any = match d.kind.as_str() {
                        "text_delta" => t.add_text(&d.text),
                        "input_json_delta" => t.add_text(&d.partial_json),
                        "thinking_delta" => t.add_reasoning(&d.thinking),
                        // signature_delta, citations_delta: not output text.
                        _ => false,
                    };
                    self.started(any);
                }
            }
            "message_delta" => {
                if let Some(u) = &a.usage {
                    t.an_usage(u, true);
                }
                if let Some(r) = a.delta.as_ref().and_then(|d| d.stop_reason.0.as_ref()) {
                    self.finish_reason = Some(r.clone().into_owned());
                }
            }
            "message_stop" => self.done = true,
            "ping" | "content_block_stop" => {}
            "error" => {
                let e = match a.error {
                    Some(inner) => raw_error(inner),
                    None => parse_error(ev.data),
                };
                self.set_error(e);
            }
            _ => self.malformed += 1,
        }
    }
}
