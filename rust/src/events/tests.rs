use super::*;
use crate::tokens::{count, encoding_for_model};

fn meter(api: Api, stream: &str) -> StreamMeter {
    let mut m = StreamMeter::new(api, "gpt-4o", false);
    assert!(m.feed(stream.as_bytes()).is_none());
    assert!(m.flush().is_empty());
    m
}

fn est(s: &str) -> u64 {
    count(encoding_for_model("gpt-4o").0, s) as u64
}

#[test]
fn chat_usage_reported_on_final_chunk() {
    let s = concat!(
        "data: {\"id\":\"c1\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":9,\"total_tokens\":29,",
        "\"prompt_tokens_details\":{\"cached_tokens\":4,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":3}}}\n\n",
        "data: [DONE]\n\n"
    );
    let m = meter(Api::Chat, s);
    assert!(m.done() && m.content_started());
    assert_eq!(m.finish_reason(), Some("stop"));
    assert_eq!(m.events(), 5);
    assert_eq!(m.malformed(), 0);
    assert_eq!(m.estimate_bytes(), 0);
    let u = m.usage(None);
    assert_eq!(
        (
            u.input,
            u.output,
            u.cached_input,
            u.reasoning,
            u.cache_write
        ),
        (20, 9, 4, 3, 0)
    );
    assert_eq!(u.input_source, Source::Reported);
    assert_eq!(u.reasoning_source, Source::Reported);
}

#[test]
fn chat_without_usage_is_estimated() {
    let s = concat!(
        "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"think hard\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi \\\"there\\\"\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]}}]}\n\n",
        "data: [DONE]\n\n"
    );
    let m = meter(Api::Chat, s);
    assert_eq!(
        m.estimate_bytes(),
        "think hard".len() + "Hi \"there\"".len() + 3
    );
    let u = m.usage(Some(b"{\"messages\":[]}"));
    assert_eq!(u.output, est("Hi \"there\"f{}") + est("think hard"));
    assert_eq!(u.reasoning, est("think hard"));
    assert_eq!(u.output_source, Source::Estimated);
    assert_eq!(u.input_source, Source::Estimated);
    assert_eq!(
        u.input,
        crate::tokens::estimate_input(Api::Chat, b"{\"messages\":[]}", "gpt-4o") as u64
    );
}

#[test]
fn chat_error_midstream_and_malformed() {
    let s = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        "data: {not json\n\n",
        "data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\",\"code\":null}}\n\n",
    );
    let m = meter(Api::Chat, s);
    assert_eq!(m.malformed(), 1);
    let e = m.error().unwrap();
    assert_eq!(
        (e.kind.as_str(), e.message.as_str()),
        ("server_error", "boom")
    );
    assert!(!m.done());
}

#[test]
fn strip_usage_removes_only_usage_chunk() {
    let head = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n";
    let usage =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n";
    let done = "data: [DONE]\n\n";
    let whole = format!("{head}{usage}{done}");
    for split in 0..=whole.len() {
        let mut m = StreamMeter::new(Api::Chat, "", true);
        let mut out = Vec::new();
        for part in [&whole[..split], &whole[split..]] {
            match m.feed(part.as_bytes()) {
                None => out.extend_from_slice(part.as_bytes()),
                Some(b) => out.extend_from_slice(&b),
            }
        }
        out.extend_from_slice(&m.flush());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{head}{done}"),
            "split {split}"
        );
        assert_eq!(m.usage(None).output, 2);
    }
    // Fast path: whole events per read, nothing stripped.
    let mut m = StreamMeter::new(Api::Chat, "", true);
    assert!(m.feed(head.as_bytes()).is_none());
    assert_eq!(m.feed(usage.as_bytes()), Some(Vec::new()));
}

#[test]
fn responses_stream() {
    let s = concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"status\":\"in_progress\",\"model\":\"gpt-4.1\",\"usage\":null}}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
        "event: response.reasoning_summary_text.delta\ndata: {\"type\":\"response.reasoning_summary_text.delta\",\"delta\":\"hm\"}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\",\"output\":[],",
        "\"usage\":{\"input_tokens\":10,\"input_tokens_details\":{\"cached_tokens\":2},\"output_tokens\":5,\"output_tokens_details\":{\"reasoning_tokens\":1},\"total_tokens\":15}}}\n\n",
    );
    let m = meter(Api::Responses, s);
    assert!(m.done() && m.content_started());
    assert_eq!(m.finish_reason(), Some("completed"));
    let u = m.usage(None);
    assert_eq!(
        (u.input, u.output, u.cached_input, u.reasoning),
        (10, 5, 2, 1)
    );
}

#[test]
fn responses_failed_sets_error() {
    let s = "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"nope\"},\"usage\":null}}\n\n";
    let m = meter(Api::Responses, s);
    assert_eq!(m.finish_reason(), Some("failed"));
    assert_eq!(m.error().unwrap().kind, "server_error");
    assert_eq!(m.error().unwrap().message, "nope");
}

#[test]
fn anthropic_stream_with_cache() {
    let s = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":12,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":2000,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"let me see\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"EqQBCgIYAhIM\"}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":42}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    let m = meter(Api::Messages, s);
    assert!(m.done());
    assert_eq!(m.finish_reason(), Some("end_turn"));
    let u = m.usage(None);
    assert_eq!(
        (u.input, u.cached_input, u.cache_write, u.output),
        (2112, 2000, 100, 42)
    );
    assert_eq!(u.output_source, Source::Reported);
    assert_eq!(u.reasoning, est("let me see"));
    assert_eq!(u.reasoning_source, Source::Estimated);
    assert_eq!(m.estimate_bytes(), "let me see".len());
}

#[test]
fn anthropic_cut_after_message_start_estimates_output() {
    let s = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello world\"}}\n\n",
    );
    let m = meter(Api::Messages, s);
    let u = m.usage(None);
    assert_eq!(u.input, 12);
    assert_eq!(u.output, est("Hello world"));
    assert_eq!(u.output_source, Source::Estimated);
}

#[test]
fn anthropic_error_event() {
    let s = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    let m = meter(Api::Messages, s);
    let e = m.error().unwrap();
    assert_eq!(
        (e.kind.as_str(), e.message.as_str()),
        ("overloaded_error", "Overloaded")
    );
}

#[test]
fn unknown_event_types_counted() {
    let m = meter(
        Api::Messages,
        "event: surprise\ndata: {\"type\":\"surprise\"}\n\n",
    );
    assert_eq!(m.malformed(), 1);
    let m = meter(
        Api::Responses,
        "data: {\"type\":\"nonsense\"}\n\ndata: {\"type\":\"response.queued\"}\n\n",
    );
    assert_eq!(m.malformed(), 1);
}

#[test]
fn bodies() {
    let chat = br#"{"choices":[{"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#;
    let u = decode_body(Api::Chat, chat, "", None);
    assert_eq!((u.input, u.output), (5, 1));
    let an = br#"{"content":[{"type":"tool_use","name":"f","input":{"a":1}}],"usage":{"input_tokens":3,"cache_read_input_tokens":7,"output_tokens":9}}"#;
    let u = decode_body(Api::Messages, an, "", None);
    assert_eq!((u.input, u.cached_input, u.output), (10, 7, 9));
    let t = tally_body(Api::Messages, an);
    assert_eq!(t.text, "f{\"a\":1}");
    let emb = br#"{"data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
    let u = decode_body(Api::Embeddings, emb, "", None);
    assert_eq!(
        (u.input, u.output, u.output_source),
        (8, 0, Source::Reported)
    );
    let u = decode_body(Api::Responses, b"not json", "", Some(b"abcdefgh"));
    assert_eq!(u.input_source, Source::Estimated);
    assert_eq!(u.output, 0);
}
