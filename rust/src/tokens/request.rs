//! Input-token estimates for request bodies, used only when the upstream reports no usage.
//!
//! The body is parsed once with borrowed `RawValue`s: each level reads just the fields it counts, and a part
//! it can't read is counted as its raw JSON text instead of failing the whole request. The figures follow
//! OpenAI's cookbook (`num_tokens_from_messages`): every message costs [`PER_MESSAGE`] tokens plus its role and
//! content, a `name` costs one more, and [`REPLY_PRIMING`] tokens prime the reply. The same overhead is used
//! for Responses items and Anthropic messages, which publish no formula. Approximations, documented here:
//! - tool definitions: the function's name, description and compact parameter-schema JSON are counted as
//!   text (providers render them into the prompt in their own, unpublished, format);
//! - images: a fixed [`IMAGE_TOKENS`] (OpenAI's figure for a 1024×1024 image at high detail; `detail: "low"`
//!   costs [`IMAGE_TOKENS_LOW`]), and [`ANTHROPIC_IMAGE_TOKENS`] for Anthropic (≈ a 1.15 MP image / 750);
//! - files, audio and other non-text parts: not counted.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{count, encoding_for_model, Encoding};
use crate::api::Api;

/// Tokens every chat message costs on top of its content (OpenAI cookbook, gpt-3.5-turbo-0613 and later).
pub const PER_MESSAGE: usize = 3;
/// Extra token for a message that carries a `name`.
pub const PER_NAME: usize = 1;
/// Tokens that prime the assistant's reply (`<|start|>assistant<|message|>`).
pub const REPLY_PRIMING: usize = 3;
/// An OpenAI image part at high/auto detail (85 base + 4 tiles × 170: a 1024×1024 image).
pub const IMAGE_TOKENS: usize = 765;
/// An OpenAI image part with `detail: "low"`.
pub const IMAGE_TOKENS_LOW: usize = 85;
/// An Anthropic image block (≈ width × height / 750 for a 1.15 MP image, Anthropic's recommended maximum).
pub const ANTHROPIC_IMAGE_TOKENS: usize = 1600;

/// Estimated input tokens of a request body of the given API (used when the upstream reports none).
///
/// Never fails: a body that is not JSON is counted as text.
pub fn estimate_input(api: Api, body: &[u8], model: &str) -> usize {
    let (encoding, _) = encoding_for_model(model);
    let mut tally = Tally {
        encoding,
        tokens: 0,
    };
    let parsed = match api {
        Api::Chat => tally.chat(body),
        Api::Completions => tally.completions(body),
        Api::Responses => tally.responses(body),
        Api::Messages => tally.messages(body),
        Api::Embeddings => tally.embeddings(body),
    };
    if parsed.is_none() {
        return count(encoding, &String::from_utf8_lossy(body));
    }
    tally.tokens
}

/// A field we read only if present; `RawValue` keeps it unparsed until we know what it holds.
type Field<'a> = Option<&'a RawValue>;

#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow, default)]
    messages: Field<'a>,
    #[serde(borrow, default)]
    tools: Field<'a>,
    #[serde(borrow, default)]
    functions: Field<'a>,
}

#[derive(Deserialize)]
struct ChatMessage<'a> {
    #[serde(borrow, default)]
    role: Field<'a>,
    #[serde(borrow, default)]
    content: Field<'a>,
    #[serde(borrow, default)]
    name: Field<'a>,
    #[serde(borrow, default)]
    tool_calls: Field<'a>,
    #[serde(borrow, default)]
    function_call: Field<'a>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(borrow, default)]
    function: Field<'a>,
}

#[derive(Deserialize)]
struct FunctionCall<'a> {
    #[serde(borrow, default)]
    name: Field<'a>,
    #[serde(borrow, default)]
    arguments: Field<'a>,
}

#[derive(Deserialize)]
struct CompletionsRequest<'a> {
    #[serde(borrow, default)]
    prompt: Field<'a>,
}

#[derive(Deserialize)]
struct EmbeddingsRequest<'a> {
    #[serde(borrow, default)]
    input: Field<'a>,
}

#[derive(Deserialize)]
struct ResponsesRequest<'a> {
    #[serde(borrow, default)]
    instructions: Field<'a>,
    #[serde(borrow, default)]
    input: Field<'a>,
    #[serde(borrow, default)]
    tools: Field<'a>,
}

/// A Responses input item, an Anthropic content block or a content part: one struct for all the shapes,
/// since each has a `type` and a few of these fields.
#[derive(Deserialize)]
struct Item<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    role: Field<'a>,
    #[serde(borrow, default)]
    content: Field<'a>,
    #[serde(borrow, default)]
    text: Field<'a>,
    #[serde(borrow, default)]
    name: Field<'a>,
    #[serde(borrow, default)]
    arguments: Field<'a>,
    #[serde(borrow, default)]
    input: Field<'a>,
    #[serde(borrow, default)]
    output: Field<'a>,
    #[serde(borrow, default)]
    thinking: Field<'a>,
    #[serde(borrow, default)]
    detail: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    image_url: Field<'a>,
}

#[derive(Deserialize)]
struct MessagesRequest<'a> {
    #[serde(borrow, default)]
    system: Field<'a>,
    #[serde(borrow, default)]
    messages: Field<'a>,
    #[serde(borrow, default)]
    tools: Field<'a>,
}

/// A tool definition in any of the three layouts: Chat (`{"function": {...}}`), Responses (flat) and
/// Anthropic (`input_schema`).
#[derive(Deserialize)]
struct Tool<'a> {
    #[serde(borrow, default)]
    function: Field<'a>,
    #[serde(borrow, default)]
    name: Field<'a>,
    #[serde(borrow, default)]
    description: Field<'a>,
    #[serde(borrow, default)]
    parameters: Field<'a>,
    #[serde(borrow, default)]
    input_schema: Field<'a>,
}

/// Which provider's image estimate applies.
#[derive(Clone, Copy)]
enum Vendor {
    OpenAi,
    Anthropic,
}

/// The first byte of a JSON value: tells a string from an array, object, number or null.
fn kind(raw: &RawValue) -> u8 {
    raw.get()
        .trim_start()
        .as_bytes()
        .first()
        .copied()
        .unwrap_or(b'n')
}

fn parse<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Option<T> {
    serde_json::from_str(raw.get()).ok()
}

/// A JSON string's value, borrowed unless it holds escapes.
fn string(raw: &RawValue) -> Option<Cow<'_, str>> {
    if kind(raw) != b'"' {
        return None;
    }
    match serde_json::from_str::<&str>(raw.get()) {
        Ok(s) => Some(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(raw.get())
            .ok()
            .map(Cow::Owned),
    }
}

/// The elements of a JSON array (None if it is not one).
fn array(raw: &RawValue) -> Option<Vec<&RawValue>> {
    if kind(raw) != b'[' {
        return None;
    }
    parse(raw)
}

/// JSON text without insignificant whitespace (strings kept byte for byte, escapes included).
fn compact_json(json: &str) -> Cow<'_, str> {
    if !json
        .bytes()
        .any(|b| matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
    {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if !matches!(c, ' ' | '\n' | '\r' | '\t') {
            in_string = c == '"';
            out.push(c);
        }
    }
    Cow::Owned(out)
}

struct Tally {
    encoding: Encoding,
    tokens: usize,
}

impl Tally {
    fn text(&mut self, text: &str) {
        self.tokens += count(self.encoding, text);
    }

    /// A string's text, or any other JSON value as its compact text.
    fn value(&mut self, raw: Option<&RawValue>) {
        let Some(raw) = raw else { return };
        match kind(raw) {
            b'"' => match string(raw) {
                Some(s) => self.text(&s),
                None => self.text(raw.get()),
            },
            b'n' => {} // null
            _ => self.text(&compact_json(raw.get())),
        }
    }

    /// A function-call's arguments: a JSON-encoded string in OpenAI's APIs, an object in Anthropic's.
    fn arguments(&mut self, raw: Option<&RawValue>) {
        self.value(raw);
    }

    /// Message content: a string, or a list of parts/blocks.
    fn content(&mut self, raw: Option<&RawValue>, vendor: Vendor) {
        let Some(raw) = raw else { return };
        match array(raw) {
            Some(parts) => {
                for part in parts {
                    self.part(part, vendor);
                }
            }
            None => self.value(Some(raw)),
        }
    }

    /// One content part (OpenAI) or content block (Anthropic).
    fn part(&mut self, raw: &RawValue, vendor: Vendor) {
        if kind(raw) == b'"' {
            return self.value(Some(raw));
        }
        let Some(part) = parse::<Item>(raw) else {
            return self.value(Some(raw));
        };
        match part.kind.as_deref().unwrap_or("text") {
            "text" | "input_text" | "output_text" | "refusal" => self.value(part.text),
            "image_url" | "input_image" | "image" => {
                // Chat nests detail in image_url; Responses puts it on the part.
                let nested = part
                    .image_url
                    .and_then(parse::<Item>)
                    .and_then(|i| i.detail);
                let low = part.detail.or(nested).is_some_and(|d| d == "low");
                self.tokens += match (vendor, low) {
                    (Vendor::Anthropic, _) => ANTHROPIC_IMAGE_TOKENS,
                    (Vendor::OpenAi, true) => IMAGE_TOKENS_LOW,
                    (Vendor::OpenAi, false) => IMAGE_TOKENS,
                };
            }
            "tool_use" | "server_tool_use" => {
                self.value(part.name);
                self.arguments(part.input);
            }
            "tool_result" | "web_search_tool_result" => self.content(part.content, vendor),
            "thinking" => self.value(part.thinking),
            _ => {} // files, audio, redacted thinking: no text to count
        }
    }

    fn tools(&mut self, raw: Option<&RawValue>) {
        let Some(tools) = raw.and_then(array) else {
            return;
        };
        for raw in tools {
            let Some(mut tool) = parse::<Tool>(raw) else {
                continue;
            };
            if let Some(function) = tool.function.and_then(parse::<Tool>) {
                tool = function;
            }
            if tool.name.is_none() {
                // A built-in tool (web_search, code_interpreter, ...): its definition is all we have.
                self.value(Some(raw));
                continue;
            }
            self.value(tool.name);
            self.value(tool.description);
            self.value(tool.parameters.or(tool.input_schema));
        }
    }

    fn chat(&mut self, body: &[u8]) -> Option<()> {
        let request: ChatRequest = serde_json::from_slice(body).ok()?;
        for raw in request.messages.and_then(array).unwrap_or_default() {
            self.tokens += PER_MESSAGE;
            let Some(message) = parse::<ChatMessage>(raw) else {
                self.value(Some(raw));
                continue;
            };
            self.value(message.role);
            self.content(message.content, Vendor::OpenAi);
            if message.name.is_some() {
                self.value(message.name);
                self.tokens += PER_NAME;
            }
            for call in message.tool_calls.and_then(array).unwrap_or_default() {
                if let Some(function) = parse::<ToolCall>(call)
                    .and_then(|c| c.function)
                    .and_then(parse::<FunctionCall>)
                {
                    self.value(function.name);
                    self.arguments(function.arguments);
                }
            }
            if let Some(function) = message.function_call.and_then(parse::<FunctionCall>) {
                self.value(function.name);
                self.arguments(function.arguments);
            }
        }
        self.tokens += REPLY_PRIMING;
        self.tools(request.tools);
        self.tools(request.functions);
        Some(())
    }

    /// A prompt or embeddings input: a string, a list of strings, token ids, or lists of token ids.
    fn prompt(&mut self, raw: Option<&RawValue>) {
        let Some(raw) = raw else { return };
        match kind(raw) {
            b'[' => {
                for item in array(raw).unwrap_or_default() {
                    match kind(item) {
                        b'[' => self.tokens += array(item).map_or(0, |ids| ids.len()),
                        b'"' => self.value(Some(item)),
                        b'n' => {}
                        _ => self.tokens += 1, // one token id
                    }
                }
            }
            _ => self.value(Some(raw)),
        }
    }

    fn completions(&mut self, body: &[u8]) -> Option<()> {
        let request: CompletionsRequest = serde_json::from_slice(body).ok()?;
        self.prompt(request.prompt);
        Some(())
    }

    fn embeddings(&mut self, body: &[u8]) -> Option<()> {
        let request: EmbeddingsRequest = serde_json::from_slice(body).ok()?;
        self.prompt(request.input);
        Some(())
    }

    fn responses(&mut self, body: &[u8]) -> Option<()> {
        let request: ResponsesRequest = serde_json::from_slice(body).ok()?;
        if request.instructions.is_some_and(|i| kind(i) == b'"') {
            self.tokens += PER_MESSAGE;
            self.value(request.instructions);
        }
        if let Some(input) = request.input {
            match array(input) {
                Some(items) => {
                    for item in items {
                        self.tokens += PER_MESSAGE;
                        self.response_item(item);
                    }
                }
                None => {
                    self.tokens += PER_MESSAGE + 1; // role "user"
                    self.value(Some(input));
                }
            }
        }
        self.tokens += REPLY_PRIMING;
        self.tools(request.tools);
        Some(())
    }

    fn response_item(&mut self, raw: &RawValue) {
        let Some(item) = parse::<Item>(raw) else {
            return self.value(Some(raw));
        };
        match item.kind.as_deref().unwrap_or("message") {
            "message" => {
                self.value(item.role);
                self.content(item.content, Vendor::OpenAi);
            }
            "function_call" | "custom_tool_call" => {
                self.value(item.name);
                self.arguments(item.arguments.or(item.input));
            }
            "function_call_output" | "custom_tool_call_output" => {
                self.content(item.output, Vendor::OpenAi)
            }
            "reasoning" => {} // encrypted or summarised; the provider counts it
            _ => {}
        }
    }

    fn messages(&mut self, body: &[u8]) -> Option<()> {
        let request: MessagesRequest = serde_json::from_slice(body).ok()?;
        if request.system.is_some() {
            self.tokens += PER_MESSAGE;
            self.content(request.system, Vendor::Anthropic);
        }
        for raw in request.messages.and_then(array).unwrap_or_default() {
            self.tokens += PER_MESSAGE;
            let Some(message) = parse::<ChatMessage>(raw) else {
                self.value(Some(raw));
                continue;
            };
            self.value(message.role);
            self.content(message.content, Vendor::Anthropic);
        }
        self.tokens += REPLY_PRIMING;
        self.tools(request.tools);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o200k(text: &str) -> usize {
        count(Encoding::O200kBase, text)
    }

    #[test]
    fn chat_follows_the_cookbook() {
        let body = br#"{"model":"gpt-4o","messages":[
            {"role":"system","content":"You are terse."},
            {"role":"user","name":"ann","content":[{"type":"text","text":"Hi there"},
                {"type":"image_url","image_url":{"url":"data:...","detail":"low"}}]}]}"#;
        let want = 3
            + o200k("system")
            + o200k("You are terse.")
            + 3
            + o200k("user")
            + o200k("ann")
            + 1
            + o200k("Hi there")
            + IMAGE_TOKENS_LOW
            + 3;
        assert_eq!(estimate_input(Api::Chat, body, "gpt-4o"), want);
    }

    #[test]
    fn chat_tool_calls_and_tools() {
        let body = br#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function",
            "function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}}]},
            {"role":"tool","tool_call_id":"c1","content":"18C"}],
            "tools":[{"type":"function","function":{"name":"get_weather","description":"Weather now",
            "parameters":{"type": "object", "properties": {"city": {"type": "string"}}}}}]}"#;
        let want = 3
            + o200k("assistant")
            + o200k("get_weather")
            + o200k("{\"city\": \"Paris\"}")
            + 3
            + o200k("tool")
            + o200k("18C")
            + 3
            + o200k("get_weather")
            + o200k("Weather now")
            + o200k(r#"{"type":"object","properties":{"city":{"type":"string"}}}"#);
        assert_eq!(estimate_input(Api::Chat, body, "gpt-4o"), want);
    }

    #[test]
    fn uses_the_model_encoding() {
        let body = br#"{"messages":[{"role":"user","content":"Tokenization differs by encoding, naturally."}]}"#;
        let cl = 3
            + count(Encoding::Cl100kBase, "user")
            + count(
                Encoding::Cl100kBase,
                "Tokenization differs by encoding, naturally.",
            )
            + 3;
        assert_eq!(estimate_input(Api::Chat, body, "gpt-4"), cl);
    }

    #[test]
    fn completions_and_embeddings() {
        assert_eq!(
            estimate_input(Api::Completions, br#"{"prompt":"Say hi"}"#, ""),
            o200k("Say hi")
        );
        assert_eq!(
            estimate_input(Api::Completions, br#"{"prompt":["a b","c"]}"#, ""),
            o200k("a b") + o200k("c")
        );
        assert_eq!(
            estimate_input(Api::Embeddings, br#"{"input":[1,2,3]}"#, ""),
            3
        );
        assert_eq!(
            estimate_input(Api::Embeddings, br#"{"input":[[1,2],[3]]}"#, ""),
            3
        );
        assert_eq!(
            estimate_input(Api::Embeddings, br#"{"input":"caf\u00e9"}"#, ""),
            o200k("café")
        );
    }

    #[test]
    fn responses_items() {
        let body = br#"{"instructions":"Be brief.","input":[
            {"role":"user","content":[{"type":"input_text","text":"Weather?"}]},
            {"type":"function_call","call_id":"c","name":"w","arguments":"{}"},
            {"type":"function_call_output","call_id":"c","output":"sunny"}]}"#;
        let want = 3
            + o200k("Be brief.")
            + 3
            + o200k("user")
            + o200k("Weather?")
            + 3
            + o200k("w")
            + o200k("{}")
            + 3
            + o200k("sunny")
            + 3;
        assert_eq!(estimate_input(Api::Responses, body, "gpt-5"), want);
        let want = 4 + o200k("hello") + 3;
        assert_eq!(
            estimate_input(Api::Responses, br#"{"input":"hello"}"#, "gpt-5"),
            want
        );
    }

    #[test]
    fn anthropic_messages() {
        let body = br#"{"system":[{"type":"text","text":"Sys"}],"messages":[
            {"role":"user","content":"Q"},
            {"role":"assistant","content":[{"type":"tool_use","id":"t","name":"calc","input":{"x": 1}}]},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"2"}]},
              {"type":"image","source":{"type":"base64","data":"..."}}]}],
            "tools":[{"name":"calc","description":"Adds","input_schema":{"type":"object"}}]}"#;
        let want = 3
            + o200k("Sys")
            + 3
            + o200k("user")
            + o200k("Q")
            + 3
            + o200k("assistant")
            + o200k("calc")
            + o200k(r#"{"x":1}"#)
            + 3
            + o200k("user")
            + o200k("2")
            + ANTHROPIC_IMAGE_TOKENS
            + 3
            + o200k("calc")
            + o200k("Adds")
            + o200k(r#"{"type":"object"}"#);
        assert_eq!(
            estimate_input(Api::Messages, body, "claude-sonnet-4-5"),
            want
        );
    }

    #[test]
    fn malformed_bodies_fall_back_to_text() {
        let body = b"not json at all";
        for api in [
            Api::Chat,
            Api::Completions,
            Api::Responses,
            Api::Messages,
            Api::Embeddings,
        ] {
            assert_eq!(estimate_input(api, body, ""), o200k("not json at all"));
        }
        // Wrong shapes inside valid JSON never panic.
        for body in [
            &br#"{"messages":7}"#[..],
            br#"{"messages":[1,"x",null,{"content":{}}]}"#,
            b"[]",
            b"\xff\xfe",
        ] {
            for api in [
                Api::Chat,
                Api::Completions,
                Api::Responses,
                Api::Messages,
                Api::Embeddings,
            ] {
                let _ = estimate_input(api, body, "");
            }
        }
    }

    #[test]
    fn compaction_keeps_strings() {
        assert_eq!(
            compact_json("{ \"a b\" : [1, 2],\n \"c\": \"x\\\" y\" }"),
            "{\"a b\":[1,2],\"c\":\"x\\\" y\"}"
        );
    }
}
