//! The wire shapes we read, as borrowed serde structs naming only the fields we need.
//!
//! Unknown fields are skipped by serde without building values. Leaf fields use the lenient [`Text`] and
//! [`Num`] types, so a provider that sends `null`, a number where a string was expected or an array of
//! parts does not make the whole event malformed.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// A string field, borrowed from the event when it has no escapes; anything else reads as `None`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Text<'a>(pub Option<Cow<'a, str>>);

impl Text<'_> {
    /// The string, or `""`.
    pub fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor(PhantomData))
    }
}

struct TextVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
    type Value = Text<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Text(Some(Cow::Borrowed(v))))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Text(Some(Cow::Owned(v.to_owned()))))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Text(Some(Cow::Owned(v))))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Text(None))
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Text(None))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Text::deserialize(d)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Text(None))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Text(None))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Text(None))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Text(None))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Text(None))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Text(None))
    }
}

/// A token count: a non-negative integer (or float); `null` and anything else read as `None`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Num(pub Option<u64>);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NumVisitor)
    }
}

struct NumVisitor;

impl<'de> Visitor<'de> for NumVisitor {
    type Value = Num;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a token count")
    }
    fn visit_u64<E>(self, v: u64) -> Result<Num, E> {
        Ok(Num(Some(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Num, E> {
        Ok(Num(u64::try_from(v).ok()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Num, E> {
        Ok(Num((v.is_finite() && v >= 0.0).then_some(v as u64)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Num, E> {
        Ok(Num(v.trim().parse().ok()))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Num, E> {
        Ok(Num(None))
    }
    fn visit_unit<E>(self) -> Result<Num, E> {
        Ok(Num(None))
    }
    fn visit_none<E>(self) -> Result<Num, E> {
        Ok(Num(None))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Num, D::Error> {
        Num::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Num, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Num(None))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Num, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Num(None))
    }
}

// ---------------------------------------------------------------- OpenAI chat / completions / embeddings

/// `usage` of chat completions, completions and embeddings.
#[derive(Debug, Default, Deserialize)]
pub struct OaUsage {
    #[serde(default)]
    pub prompt_tokens: Num,
    #[serde(default)]
    pub completion_tokens: Num,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    pub completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Default, Deserialize)]
pub struct PromptDetails {
    #[serde(default)]
    pub cached_tokens: Num,
}

#[derive(Debug, Default, Deserialize)]
pub struct CompletionDetails {
    #[serde(default)]
    pub reasoning_tokens: Num,
}

/// A chat completion chunk, a completions chunk, or (with `message`) a non-streaming chat body.
#[derive(Debug, Deserialize)]
pub struct ChatChunk<'a> {
    #[serde(borrow, default)]
    pub choices: Option<Vec<ChatChoice<'a>>>,
    #[serde(default)]
    pub usage: Option<OaUsage>,
    #[serde(borrow, default)]
    pub error: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub model: Text<'a>,
}

#[derive(Debug, Deserialize)]
pub struct ChatChoice<'a> {
    #[serde(borrow, default)]
    pub delta: Option<ChatMessage<'a>>,
    #[serde(borrow, default)]
    pub message: Option<ChatMessage<'a>>,
    /// Legacy completions.
    #[serde(borrow, default)]
    pub text: Text<'a>,
    #[serde(borrow, default)]
    pub finish_reason: Text<'a>,
}

/// `choices[].delta` (streaming) or `choices[].message` (non-streaming).
#[derive(Debug, Deserialize)]
pub struct ChatMessage<'a> {
    #[serde(borrow, default)]
    pub content: Text<'a>,
    #[serde(borrow, default)]
    pub refusal: Text<'a>,
    #[serde(borrow, default)]
    pub reasoning_content: Text<'a>,
    #[serde(borrow, default)]
    pub reasoning: Text<'a>,
    #[serde(borrow, default)]
    pub tool_calls: Option<Vec<ToolCall<'a>>>,
    #[serde(borrow, default)]
    pub function_call: Option<Function<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct ToolCall<'a> {
    #[serde(borrow, default)]
    pub function: Option<Function<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct Function<'a> {
    #[serde(borrow, default)]
    pub name: Text<'a>,
    #[serde(borrow, default)]
    pub arguments: Text<'a>,
}

/// An error object: `{"type", "code", "message"}` (OpenAI, Anthropic and Responses all fit).
#[derive(Debug, Default, Deserialize)]
pub struct ErrorObj<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Text<'a>,
    #[serde(borrow, default)]
    pub code: Text<'a>,
    #[serde(borrow, default)]
    pub message: Text<'a>,
    /// Anthropic's `{"type": "error", "error": {...}}` and Responses' newer nested shape.
    #[serde(borrow, default)]
    pub error: Option<&'a RawValue>,
}

// ---------------------------------------------------------------- OpenAI Responses

#[derive(Debug, Default, Deserialize)]
pub struct RespUsage {
    #[serde(default)]
    pub input_tokens: Num,
    #[serde(default)]
    pub output_tokens: Num,
    #[serde(default)]
    pub input_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    pub output_tokens_details: Option<CompletionDetails>,
}

/// One Responses streaming event.
#[derive(Debug, Deserialize)]
pub struct RespEvent<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Text<'a>,
    #[serde(borrow, default)]
    pub delta: Text<'a>,
    /// The response object of `response.created`/`completed`/`incomplete`/`failed` (output skipped).
    #[serde(borrow, default)]
    pub response: Option<RespObj<'a>>,
    /// `response.output_item.added`.
    #[serde(borrow, default)]
    pub item: Option<OutputItem<'a>>,
    /// The `error` event's nested `error` object (the flat shape is read from the whole event).
    #[serde(borrow, default)]
    pub error: Option<&'a RawValue>,
}

/// A response object; `output` is read only for non-streaming bodies.
#[derive(Debug, Deserialize)]
pub struct RespObj<'a> {
    #[serde(borrow, default)]
    pub status: Text<'a>,
    #[serde(borrow, default)]
    pub model: Text<'a>,
    #[serde(default)]
    pub usage: Option<RespUsage>,
    #[serde(borrow, default)]
    pub error: Option<&'a RawValue>,
}

/// A non-streaming Responses body.
#[derive(Debug, Deserialize)]
pub struct RespBody<'a> {
    #[serde(borrow, default)]
    pub model: Text<'a>,
    #[serde(default)]
    pub usage: Option<RespUsage>,
    #[serde(borrow, default)]
    pub output: Option<Vec<OutputItem<'a>>>,
}

#[derive(Debug, Deserialize)]
pub struct OutputItem<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Text<'a>,
    #[serde(borrow, default)]
    pub name: Text<'a>,
    #[serde(borrow, default)]
    pub arguments: Text<'a>,
    #[serde(borrow, default)]
    pub input: Text<'a>,
    #[serde(borrow, default)]
    pub content: Option<Vec<ContentPart<'a>>>,
    #[serde(borrow, default)]
    pub summary: Option<Vec<ContentPart<'a>>>,
}

#[derive(Debug, Deserialize)]
pub struct ContentPart<'a> {
    #[serde(borrow, default)]
    pub text: Text<'a>,
    #[serde(borrow, default)]
    pub refusal: Text<'a>,
}

// ---------------------------------------------------------------- Anthropic Messages

#[derive(Debug, Default, Deserialize)]
pub struct AnUsage {
    #[serde(default)]
    pub input_tokens: Num,
    #[serde(default)]
    pub output_tokens: Num,
    #[serde(default)]
    pub cache_creation_input_tokens: Num,
    #[serde(default)]
    pub cache_read_input_tokens: Num,
}

/// One Messages streaming event.
#[derive(Debug, Deserialize)]
pub struct AnEvent<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Text<'a>,
    #[serde(borrow, default)]
    pub message: Option<AnMessageStart<'a>>,
    #[serde(borrow, default)]
    pub content_block: Option<AnBlock<'a>>,
    #[serde(borrow, default)]
    pub delta: Option<AnDelta<'a>>,
    #[serde(default)]
    pub usage: Option<AnUsage>,
    #[serde(borrow, default)]
    pub error: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
pub struct AnMessageStart<'a> {
    #[serde(borrow, default)]
    pub model: Text<'a>,
    #[serde(default)]
    pub usage: Option<AnUsage>,
}

/// A content block (`content_block_start`, or an element of a non-streaming body's `content`).
#[derive(Debug, Deserialize)]
pub struct AnBlock<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Text<'a>,
    #[serde(borrow, default)]
    pub text: Text<'a>,
    #[serde(borrow, default)]
    pub name: Text<'a>,
    #[serde(borrow, default)]
    pub thinking: Text<'a>,
    /// tool_use input: raw JSON, counted as text in non-streaming bodies (`{}` at a stream's block start).
    #[serde(borrow, default)]
    pub input: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
pub struct AnDelta<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Text<'a>,
    #[serde(borrow, default)]
    pub text: Text<'a>,
    #[serde(borrow, default)]
    pub partial_json: Text<'a>,
    #[serde(borrow, default)]
    pub thinking: Text<'a>,
    #[serde(borrow, default)]
    pub stop_reason: Text<'a>,
}

/// A non-streaming Messages body.
#[derive(Debug, Deserialize)]
pub struct AnBody<'a> {
    #[serde(borrow, default)]
    pub model: Text<'a>,
    #[serde(default)]
    pub usage: Option<AnUsage>,
    #[serde(borrow, default)]
    pub content: Option<Vec<AnBlock<'a>>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_lenient_and_borrows() {
        #[derive(Deserialize)]
        struct T<'a> {
            #[serde(borrow)]
            a: Text<'a>,
            #[serde(borrow)]
            b: Text<'a>,
            #[serde(borrow)]
            c: Text<'a>,
            #[serde(borrow)]
            d: Text<'a>,
        }
        let t: T<'_> =
            serde_json::from_str(r#"{"a":"x","b":null,"c":[1,{"q":2}],"d":"\n"}"#).unwrap();
        assert!(matches!(t.a.0, Some(Cow::Borrowed("x"))));
        assert_eq!(t.b.0, None);
        assert_eq!(t.c.0, None);
        assert_eq!(t.d.as_str(), "\n");
    }

    #[test]
    fn num_is_lenient() {
        let v: Vec<Num> = serde_json::from_str(r#"[1, null, -2, 3.0, "4", {}, true]"#).unwrap();
        let v: Vec<Option<u64>> = v.into_iter().map(|n| n.0).collect();
        assert_eq!(v, [Some(1), None, None, Some(3), Some(4), None, None]);
    }
}
