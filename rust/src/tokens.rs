//! Token counting with embedded BPE vocabularies. PLACEHOLDER: the signatures are fixed, the bodies are not.

use crate::api::Api;

/// A BPE encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// GPT-4o, GPT-4.1, GPT-5, o-series (and the fallback for unknown models).
    O200kBase,
    /// GPT-4, GPT-3.5.
    Cl100kBase,
}

/// The encoding for a model name, and whether the model is known to use it (false: a guess).
pub fn encoding_for_model(_model: &str) -> (Encoding, bool) {
    (Encoding::O200kBase, false)
}

/// Number of tokens in `text`.
pub fn count(_encoding: Encoding, text: &str) -> usize {
    text.len().div_ceil(4)
}

/// Estimated input tokens of a request body of the given API (used when the upstream reports none).
pub fn estimate_input(_api: Api, body: &[u8], _model: &str) -> usize {
    body.len().div_ceil(4)
}
