//! The wire formats tokenrelay understands, named once for every module.

/// Which API a request or stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// OpenAI `/v1/chat/completions` (and every OpenAI-compatible server).
    Chat,
    /// OpenAI legacy `/v1/completions`.
    Completions,
    /// OpenAI `/v1/responses`.
    Responses,
    /// Anthropic `/v1/messages`.
    Messages,
    /// OpenAI `/v1/embeddings` (never streamed).
    Embeddings,
}

impl Api {
    /// Parses the short name used across the Python boundary (`"chat"`, `"completions"`, ...).
    pub fn from_name(name: &str) -> Option<Api> {
        Some(match name {
            "chat" => Api::Chat,
            "completions" => Api::Completions,
            "responses" => Api::Responses,
            "messages" => Api::Messages,
            "embeddings" => Api::Embeddings,
            _ => return None,
        })
    }

    /// The short name used across the Python boundary.
    pub fn name(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Completions => "completions",
            Api::Responses => "responses",
            Api::Messages => "messages",
            Api::Embeddings => "embeddings",
        }
    }
}
