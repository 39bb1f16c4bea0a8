//! The recorded streams and bodies both translator test modules run against (tests/fixtures/).

pub(super) const AN_TOOLS: &str = include_str!("../../../tests/fixtures/anthropic_tool_use.sse");
pub(super) const AN_THINKING: &str = include_str!("../../../tests/fixtures/anthropic_thinking.sse");
pub(super) const AN_STREAM: &str = include_str!("../../../tests/fixtures/anthropic_stream.sse");
pub(super) const AN_ERROR: &str = include_str!("../../../tests/fixtures/anthropic_error.sse");
pub(super) const OA_TOOLS: &str = include_str!("../../../tests/fixtures/openai_chat_tools.sse");
pub(super) const OA_REASONING: &str =
    include_str!("../../../tests/fixtures/openai_chat_reasoning_deepseek.sse");
pub(super) const OA_STREAM: &str = include_str!("../../../tests/fixtures/openai_chat_stream.sse");
pub(super) const OA_ERROR: &str =
    include_str!("../../../tests/fixtures/openai_chat_error_midstream.sse");
pub(super) const AN_BODY: &str = include_str!("../../../tests/fixtures/anthropic_message.json");
pub(super) const OA_BODY: &str = include_str!("../../../tests/fixtures/openai_chat.json");
