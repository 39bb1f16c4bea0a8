//! Translation between OpenAI chat completions and Anthropic Messages: requests, complete responses, error
//! bodies and streams (event by event, on the boundaries the SSE parser finds).
//!
//! Requests are translated field by field; a field with no equivalent is a [`TranslateError::Unsupported`]
//! naming it (the relay answers 400), unless the route drops unsupported fields. A field at its default value
//! (`n: 1`, `presence_penalty: 0`, `logprobs: false`, `null`) is not "unsupported": it changes nothing.
//! Choices made where the formats differ:
//! - chat → messages: `max_tokens` is required by Anthropic: [`DEFAULT_MAX_TOKENS`] when the client gave none;
//!   `temperature` is clamped to Anthropic's 0..=1; `system`/`developer` messages anywhere become the
//!   `system` prompt; `tool` messages become `tool_result` blocks of a user turn; consecutive turns of one
//!   role are merged; prior reasoning on assistant turns is dropped (it cannot carry a signature).
//! - messages → chat: `system` becomes the first message; `tool_result` blocks become `tool` messages placed
//!   before the rest of their user turn; thinking blocks of prior turns are dropped; `cache_control` hints
//!   are dropped; streaming asks the upstream for `stream_options.include_usage`.
//!
//! Responses: Anthropic's `input_tokens` excludes cache reads and writes, OpenAI's `prompt_tokens` includes
//! them; both directions convert. Stop reasons: `end_turn`/`stop_sequence` ↔ `stop`, `max_tokens` ↔
//! `length`, `tool_use` ↔ `tool_calls`, `refusal` ↔ `content_filter`.

mod request;
mod response;
mod responses;
mod responses_stream;
mod stream;

pub use request::{translate_request, DEFAULT_MAX_TOKENS};
pub use response::{translate_error, translate_response};
pub use stream::StreamTranslator;

use thiserror::Error;

use crate::api::Api;

/// The wire format of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// OpenAI-compatible (`/chat/completions`).
    OpenAi,
    /// Anthropic (`/messages`).
    Anthropic,
}

impl Kind {
    /// Parses `"openai"` / `"anthropic"`.
    pub fn from_name(name: &str) -> Option<Kind> {
        match name {
            "openai" => Some(Kind::OpenAi),
            "anthropic" => Some(Kind::Anthropic),
            _ => None,
        }
    }

    /// The API a deployment of this kind is sent a request of `client` API in (the same one when it speaks it).
    pub fn upstream_api(self, client: Api) -> Api {
        match (self, client) {
            (Kind::Anthropic, _) => Api::Messages,
            (Kind::OpenAi, Api::Messages) => Api::Chat,
            (Kind::OpenAi, api) => api,
        }
    }
}

/// Why a request or body could not be translated.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TranslateError {
    /// A parameter with no equivalent in the upstream's format.
    #[error("parameter `{param}` is not supported when translating to {target}: {reason}")]
    Unsupported {
        /// The parameter's path in the client's request, e.g. `messages[2].content[0].type`.
        param: String,
        /// The format translated to.
        target: &'static str,
        /// Why.
        reason: String,
    },
    /// A body that is not what its API expects.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No translation exists between these APIs.
    #[error("cannot translate {from} requests to {to}")]
    NoTranslation {
        /// The client's API.
        from: &'static str,
        /// The deployment's format.
        to: &'static str,
    },
}

impl TranslateError {
    /// The parameter the error is about, if any.
    pub fn param(&self) -> Option<&str> {
        match self {
            TranslateError::Unsupported { param, .. } => Some(param),
            _ => None,
        }
    }
}

/// Seconds since the Unix epoch (the `created` field of OpenAI objects).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Anthropic `stop_reason` → OpenAI `finish_reason`.
pub(crate) fn finish_reason_for(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop", // end_turn, stop_sequence, pause_turn
    }
}

/// OpenAI `finish_reason` → Anthropic `stop_reason`.
pub(crate) fn stop_reason_for(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod responses_tests;
#[cfg(test)]
mod tests;
