//! Decoding usage and output text from provider events into one normalised usage record per request.
//!
//! # Normalised meaning
//!
//! Every API's figures are mapped to the same five numbers:
//! - `input`: ALL input tokens the model processed, including cache reads and cache writes (OpenAI
//!   `prompt_tokens`/`input_tokens` semantics; for Anthropic
//!   `input_tokens + cache_read_input_tokens + cache_creation_input_tokens`).
//! - `cached_input`: the part of `input` read from a cache (OpenAI `cached_tokens`, Anthropic
//!   `cache_read_input_tokens`).
//! - `cache_write`: the part of `input` written to a cache (Anthropic `cache_creation_input_tokens`; 0 for
//!   OpenAI, which does not bill writes).
//! - `output`: all output tokens, reasoning included.
//! - `reasoning`: the reasoning part of `output` (OpenAI `reasoning_tokens`; estimated from thinking text for
//!   Anthropic, which does not report it separately).
//!
//! Each number has a [`Source`]: `Reported` by the provider, or `Estimated` locally. Estimates: `output` is
//! counted from the streamed text (content, tool-call names and arguments, refusals, reasoning); `reasoning`
//! from the reasoning text alone (capped at a reported `output`); `input` from the request body. A detail
//! the provider leaves out of a usage it did report (e.g. no `cached_tokens`) is taken as 0 with its
//! parent's source, except `reasoning` when reasoning text was streamed: then it is estimated from it.
//! Anthropic's `message_start` `output_tokens` is a placeholder and never taken as reported: only a
//! `message_delta` (or a final body) reports output.

mod framed;
mod stream;
mod wire;

pub use framed::Framed;
pub use stream::{StreamError, StreamMeter};

use crate::api::Api;
use crate::tokens;
use wire::{AnBody, AnUsage, ChatChunk, OaUsage, RespBody, RespUsage, Text};

/// Where a usage figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Given by the provider.
    Reported,
    /// Counted locally.
    Estimated,
}

impl Source {
    /// `"reported"` or `"estimated"`.
    pub fn name(self) -> &'static str {
        match self {
            Source::Reported => "reported",
            Source::Estimated => "estimated",
        }
    }
}

/// The normalised usage of one request (see the module doc for the meaning of each field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// All input tokens, cache reads and writes included.
    pub input: u64,
    /// Output tokens, reasoning included.
    pub output: u64,
    /// Input tokens read from cache.
    pub cached_input: u64,
    /// Input tokens written to cache.
    pub cache_write: u64,
    /// Reasoning part of output.
    pub reasoning: u64,
    /// Source of `input`.
    pub input_source: Source,
    /// Source of `output`.
    pub output_source: Source,
    /// Source of `cached_input`.
    pub cached_input_source: Source,
    /// Source of `cache_write`.
    pub cache_write_source: Source,
    /// Source of `reasoning`.
    pub reasoning_source: Source,
}

/// What the events of one request told us so far: reported figures and the text to count if they are missing.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Reported input; for Anthropic it excludes the cache fields (added at the end).
    input: Option<u64>,
    cached: Option<u64>,
    cache_write: Option<u64>,
    output: Option<u64>,
    reasoning: Option<u64>,
    /// Output text other than reasoning (content, tool names and arguments, refusals).
    text: String,
    /// Reasoning text.
    reasoning_text: String,
    /// The model named by the stream (used for the encoding when the caller gave none).
    model: String,
}

fn set(slot: &mut Option<u64>, v: Option<u64>) {
    if v.is_some() {
        *slot = v;
    }
}

impl Tally {
    /// Appends output text; true if it was non-empty.
    fn add_text(&mut self, t: &Text<'_>) -> bool {
        let s = t.as_str();
        self.text.push_str(s);
        !s.is_empty()
    }

    /// Appends reasoning text; true if it was non-empty.
    fn add_reasoning(&mut self, t: &Text<'_>) -> bool {
        let s = t.as_str();
        self.reasoning_text.push_str(s);
        !s.is_empty()
    }

    fn see_model(&mut self, t: &Text<'_>) {
        if self.model.is_empty() {
            self.model.push_str(t.as_str());
        }
    }

    fn oa_usage(&mut self, u: &OaUsage) {
        set(&mut self.input, u.prompt_tokens.0);
        set(&mut self.output, u.completion_tokens.0);
        if let Some(d) = &u.prompt_tokens_details {
            set(&mut self.cached, d.cached_tokens.0);
        }
        if let Some(d) = &u.completion_tokens_details {
            set(&mut self.reasoning, d.reasoning_tokens.0);
        }
    }

    fn resp_usage(&mut self, u: &RespUsage) {
        set(&mut self.input, u.input_tokens.0);
        set(&mut self.output, u.output_tokens.0);
        if let Some(d) = &u.input_tokens_details {
            set(&mut self.cached, d.cached_tokens.0);
        }
        if let Some(d) = &u.output_tokens_details {
            set(&mut self.reasoning, d.reasoning_tokens.0);
        }
    }

    /// Anthropic usage; `with_output` is false for `message_start`, whose output count is a placeholder.
    fn an_usage(&mut self, u: &AnUsage, with_output: bool) {
        set(&mut self.input, u.input_tokens.0);
        set(&mut self.cached, u.cache_read_input_tokens.0);
        set(&mut self.cache_write, u.cache_creation_input_tokens.0);
        if with_output {
            set(&mut self.output, u.output_tokens.0);
        }
    }

    /// Bytes [`Tally::usage`] would tokenize given a request body of `request_len` bytes (0 when the provider
    /// reported everything): how long the call may take.
    pub fn work_bytes(&self, request_len: usize) -> usize {
        self.estimate_bytes() + if self.input.is_none() { request_len } else { 0 }
    }

    /// Bytes of text [`Tally::usage`] would have to tokenize (0 when output and reasoning are reported).
    pub fn estimate_bytes(&self) -> usize {
        match (self.output, self.reasoning) {
            (None, _) => self.text.len() + self.reasoning_text.len(),
            (Some(_), None) => self.reasoning_text.len(),
            (Some(_), Some(_)) => 0,
        }
    }

    /// The model the stream named, if any.
    pub fn stream_model(&self) -> &str {
        &self.model
    }

    /// The normalised usage, estimating what was not reported. May tokenize: call without the GIL.
    pub fn usage(&self, api: Api, model: &str, request_body: Option<&[u8]>) -> Usage {
        let model = if model.is_empty() {
            self.model.as_str()
        } else {
            model
        };
        let (encoding, _) = tokens::encoding_for_model(model);
        let count = |s: &str| {
            if s.is_empty() {
                0
            } else {
                tokens::count(encoding, s) as u64
            }
        };
        let mut reasoning_est = None;
        let (output, output_source) = match self.output {
            Some(o) => (o, Source::Reported),
            None => {
                let r = count(&self.reasoning_text);
                reasoning_est = Some(r);
                (count(&self.text) + r, Source::Estimated)
            }
        };
        let (reasoning, reasoning_source) = match self.reasoning {
            Some(r) => (r, Source::Reported),
            None if !self.reasoning_text.is_empty() => {
                let r = reasoning_est.unwrap_or_else(|| count(&self.reasoning_text));
                (r.min(output), Source::Estimated)
            }
            None => (0, output_source),
        };
        let (input, input_source) = match self.input {
            Some(i) if api == Api::Messages => (
                i + self.cached.unwrap_or(0) + self.cache_write.unwrap_or(0),
                Source::Reported,
            ),
            Some(i) => (i, Source::Reported),
            None => (
                request_body.map_or(0, |b| tokens::estimate_input(api, b, model) as u64),
                Source::Estimated,
            ),
        };
        let detail = |v: Option<u64>| match v {
            Some(v) => (v, Source::Reported),
            None => (0, input_source),
        };
        let (cached_input, cached_input_source) = detail(self.cached);
        let (cache_write, cache_write_source) = detail(self.cache_write);
        Usage {
            input,
            output,
            cached_input,
            cache_write,
            reasoning,
            input_source,
            output_source,
            cached_input_source,
            cache_write_source,
            reasoning_source,
        }
    }
}

/// Reads a non-streaming JSON response body of `api` into a [`Tally`]. Malformed bodies give an empty tally
/// (everything estimated), never an error.
pub fn tally_body(api: Api, body: &[u8]) -> Tally {
    let mut t = Tally::default();
    match api {
        Api::Chat | Api::Completions | Api::Embeddings => {
            if let Ok(c) = serde_json::from_slice::<ChatChunk<'_>>(body) {
                t.see_model(&c.model);
                if let Some(u) = &c.usage {
                    t.oa_usage(u);
                    if api == Api::Embeddings && t.output.is_none() {
                        t.output = Some(0);
                        t.reasoning = Some(0);
                    }
                }
                for choice in c.choices.iter().flatten() {
                    t.add_text(&choice.text);
                    if let Some(m) = &choice.message {
                        stream::chat_message(&mut t, m);
                    }
                }
            }
        }
        Api::Responses => {
            if let Ok(r) = serde_json::from_slice::<RespBody<'_>>(body) {
                t.see_model(&r.model);
                if let Some(u) = &r.usage {
                    t.resp_usage(u);
                }
                for item in r.output.iter().flatten() {
                    match item.kind.as_str() {
                        "reasoning" => {
                            for p in item.summary.iter().chain(item.content.iter()).flatten() {
                                t.add_reasoning(&p.text);
                            }
                        }
                        _ => {
                            t.add_text(&item.name);
                            t.add_text(&item.arguments);
                            t.add_text(&item.input);
                            for p in item.content.iter().flatten() {
                                t.add_text(&p.text);
                                t.add_text(&p.refusal);
                            }
                        }
                    }
                }
            }
        }
        Api::Messages => {
            if let Ok(m) = serde_json::from_slice::<AnBody<'_>>(body) {
                t.see_model(&m.model);
                if let Some(u) = &m.usage {
                    t.an_usage(u, true);
                }
                for b in m.content.iter().flatten() {
                    t.add_text(&b.text);
                    t.add_text(&b.name);
                    t.add_reasoning(&b.thinking);
                    if let Some(raw) = b.input {
                        t.text.push_str(raw.get());
                    }
                }
            }
        }
    }
    t
}

/// The usage of a non-streaming response body (also embeddings). May tokenize: call without the GIL.
pub fn decode_body(api: Api, body: &[u8], model: &str, request_body: Option<&[u8]>) -> Usage {
    tally_body(api, body).usage(api, model, request_body)
}

#[cfg(test)]
mod tests;
