//! A lean mock provider for the benchmarks, compiled: the same wire format as `benches/fastmock.py` (and so as
//! `tokenrelay.mock`), at about half its CPU per event.
//!
//! `fastmock.py` (a raw uvloop protocol) costs ~12–16 µs of CPU per paced event; at 1024 paced streams (~51k events/s)
//! it and the Python load generator need more than the core they share, so the *direct* baseline itself lags and the
//! rig, not the proxy, is what gets measured (this one: ~9 µs, most of it the kernel's loopback TCP path, and a fresh
//! connection is answered in milliseconds under that load, not seconds). This binary does the same on tokio's
//! current-thread runtime (one thread: `taskset` keeps it on its core). It reads the request (Content-Length body),
//! precomputes the answer's SSE events with chunked framing when the request arrives, and writes them one event per
//! write (one `write` syscall) at the configured pace, from a timer per stream. It serves OpenAI `/v1/chat/completions`
//! (streamed or not; `stream_options.include_usage` honoured) and Anthropic `/v1/messages`, `/models`, with keep-alive
//! and pipelined requests. Behaviour: command line, or `POST /_control` with a JSON object of `tokens`, `delay_ms`,
//! `first_token_ms`, `usage` (as `tokenrelay.mock`'s control endpoint); `GET /_control` also reports `open_streams`,
//! the streamed answers started and not yet finished.
//!
//! With `--delay-ms 0` (unpaced) it writes 16 events per turn of the loop, each its own write, and waits for the socket
//! while its buffer is full. `benches/run.py --rig python` uses `fastmock.py` instead; `--mock aiohttp` uses
//! `tokenrelay.mock`.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io::{self, Write as _};
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use memchr::memmem;
use serde_json::{json, Map, Value};
use tokenrelay_bench_rig::{listen_and_serve, opt, raise_nofile, Args, Opt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEXT: &str = "the quick brown fox jumps over a lazy dog while agents stream tokens through a relay that meters \
                    every one of them and balances load across many deployments without dropping a byte";

const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n";

/// How the mock answers; changed at run time through `POST /_control`.
#[derive(Clone)]
struct Behaviour {
    tokens: i64,
    delay_ms: f64,
    first_token_ms: f64,
    usage: bool,
}

/// What every connection shares (one thread: plain cells).
struct State {
    behaviour: RefCell<Behaviour>,
    open_streams: Cell<i64>,
    ids: Cell<u64>,
    words: Vec<&'static str>,
    /// each word as a JSON string, with its trailing space (`[0]`) and without, as the last delta (`[1]`)
    words_json: Vec<[Vec<u8>; 2]>,
}

impl State {
    fn new(b: Behaviour) -> State {
        let words: Vec<&'static str> = TEXT.split_whitespace().collect();
        let json = |s: &str| serde_json::to_vec(s).expect("serialising a str");
        let words_json = words
            .iter()
            .map(|w| [json(&format!("{w} ")), json(w)])
            .collect();
        State {
            behaviour: RefCell::new(b),
            open_streams: Cell::new(0),
            ids: Cell::new(1),
            words,
            words_json,
        }
    }

    fn next_id(&self) -> u64 {
        let id = self.ids.get();
        self.ids.set(id + 1);
        id
    }

    /// The `i`-th of `n` deltas' text (a word, and a space unless it is the last).
    fn word(&self, i: i64, n: i64) -> String {
        let w = self.words[(i as usize) % self.words.len()];
        if i == n - 1 {
            w.to_string()
        } else {
            format!("{w} ")
        }
    }

    /// The same as a JSON string.
    fn word_json(&self, i: usize, n: usize) -> &[u8] {
        &self.words_json[i % self.words.len()][usize::from(i == n - 1)]
    }
}

/// A streamed answer, framed: the head chunk, each delta's chunk (one write each) and the tail with the
/// terminating chunk.
struct Stream {
    head: Vec<u8>,
    deltas: Vec<u8>,
    ends: Vec<usize>,
    last: Vec<u8>,
}

impl Stream {
    /// `head` and `tail`: whole events; the deltas: `template`'s event around each delta's text.
    fn new(head: &[Vec<u8>], template: &Template, n: i64, st: &State, tail: &[Vec<u8>]) -> Stream {
        let count = n.max(0) as usize;
        let mut deltas =
            Vec::with_capacity(count * (template.before.len() + template.after.len() + 24));
        let mut ends = Vec::with_capacity(count);
        for i in 0..count {
            let text = st.word_json(i, count);
            let len = template.before.len() + text.len() + template.after.len();
            let _ = write!(deltas, "{len:x}\r\n");
            deltas.extend_from_slice(&template.before);
            deltas.extend_from_slice(text);
            deltas.extend_from_slice(&template.after);
            deltas.extend_from_slice(b"\r\n");
            ends.push(deltas.len());
        }
        let mut h = SSE_HEAD.to_vec();
        chunk(&mut h, &head.concat());
        let mut last = Vec::new();
        chunk(&mut last, &tail.concat());
        last.extend_from_slice(b"0\r\n\r\n");
        Stream {
            head: h,
            deltas,
            ends,
            last,
        }
    }

    fn delta(&self, k: usize) -> &[u8] {
        let start = if k == 0 { 0 } else { self.ends[k - 1] };
        &self.deltas[start..self.ends[k]]
    }
}

/// A delta event serialised once per answer, split where its text goes: each delta is then `before`, the text
/// as a JSON string, `after` (the same bytes as serialising each event whole, without doing so 64 times).
struct Template {
    before: Vec<u8>,
    after: Vec<u8>,
}

impl Template {
    const MARK: &'static str = "\u{1}mock-text\u{1}";

    /// `build(text)` returns the whole event with `text` as the delta's text.
    fn new(build: impl Fn(&str) -> Vec<u8>) -> Template {
        let whole = build(Self::MARK);
        let mark = serde_json::to_vec(Self::MARK).expect("serialising a str");
        let at = memmem::find(&whole, &mark).expect("the mark is in the event");
        Template {
            before: whole[..at].to_vec(),
            after: whole[at + mark.len()..].to_vec(),
        }
    }
}

/// Appends `data` as one chunk of a chunked body.
fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

fn sse_data(v: &Value) -> Vec<u8> {
    let mut out = b"data: ".to_vec();
    serde_json::to_writer(&mut out, v).expect("serialising a Value");
    out.extend_from_slice(b"\n\n");
    out
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Python's truthiness of a JSON value.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// `str(body.get("model", "mock"))`.
fn model(body: &Map<String, Value>) -> String {
    match body.get("model") {
        None => "mock".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) => "None".into(),
        Some(Value::Bool(b)) => if *b { "True" } else { "False" }.into(),
        Some(v) => v.to_string(),
    }
}

/// The OpenAI chat chunk events, or `None` where the Python mock raises (a `stream_options` that is no object).
fn openai_events(st: &State, body: &Map<String, Value>, b: &Behaviour) -> Option<Stream> {
    let mut base = Map::new();
    base.insert("id".into(), json!(format!("chatcmpl-mock{}", st.next_id())));
    base.insert("object".into(), json!("chat.completion.chunk"));
    base.insert("created".into(), json!(now_s()));
    base.insert("model".into(), json!(model(body)));
    base.insert("system_fingerprint".into(), json!("fp_mock"));
    let include_usage = b.usage && {
        match body.get("stream_options") {
            Some(Value::Object(o)) => truthy(o.get("include_usage")),
            v if !truthy(v) => false,
            _ => return None, // `("x" or {}).get(...)`: AttributeError in the Python
        }
    };
    let ev = |delta: Value, finish: Option<&str>| -> Vec<u8> {
        let mut data = base.clone();
        data.insert(
            "choices".into(),
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]),
        );
        if include_usage {
            data.insert("usage".into(), Value::Null);
        }
        sse_data(&Value::Object(data))
    };
    let n = b.tokens;
    let head = [ev(
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    )];
    let delta = Template::new(|text| ev(json!({ "content": text }), None));
    let mut tail = vec![ev(json!({}), Some("stop"))];
    if include_usage {
        let mut data = base.clone();
        data.insert("choices".into(), json!([]));
        data.insert(
            "usage".into(),
            json!({"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}),
        );
        tail.push(sse_data(&Value::Object(data)));
    }
    tail.push(b"data: [DONE]\n\n".to_vec());
    Some(Stream::new(&head, &delta, n, st, &tail))
}

fn anthropic_events(st: &State, body: &Map<String, Value>, b: &Behaviour) -> Stream {
    let ev = |kind: &str, data: Value| -> Vec<u8> {
        let mut obj = Map::new();
        obj.insert("type".into(), json!(kind));
        if let Value::Object(d) = data {
            obj.extend(d);
        }
        let mut out = format!("event: {kind}\ndata: ").into_bytes();
        serde_json::to_writer(&mut out, &Value::Object(obj)).expect("serialising a Value");
        out.extend_from_slice(b"\n\n");
        out
    };
    let n = b.tokens;
    let usage = json!({"input_tokens": 8, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1});
    let start = json!({
        "id": format!("msg_mock{}", st.next_id()),
        "type": "message",
        "role": "assistant",
        "model": model(body),
        "content": [],
        "stop_reason": null,
        "stop_sequence": null,
        "usage": usage,
    });
    let head = [
        ev("message_start", json!({ "message": start })),
        ev(
            "content_block_start",
            json!({"index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ev("ping", json!({})),
    ];
    let delta = Template::new(|text| {
        ev(
            "content_block_delta",
            json!({"index": 0, "delta": {"type": "text_delta", "text": text}}),
        )
    });
    let tail = [
        ev("content_block_stop", json!({"index": 0})),
        ev(
            "message_delta",
            json!({"delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": n}}),
        ),
        ev("message_stop", json!({})),
    ];
    Stream::new(&head, &delta, n, st, &tail)
}

fn json_answer(st: &State, body: &Map<String, Value>, b: &Behaviour, anthropic: bool) -> Vec<u8> {
    let text: String = (0..b.tokens.max(0)).map(|i| st.word(i, b.tokens)).collect();
    let answer = if anthropic {
        json!({
            "id": format!("msg_mock{}", st.next_id()),
            "type": "message",
            "role": "assistant",
            "model": model(body),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": 8, "output_tokens": b.tokens},
        })
    } else {
        json!({
            "id": format!("chatcmpl-mock{}", st.next_id()),
            "object": "chat.completion",
            "created": now_s(),
            "model": model(body),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": 8, "completion_tokens": b.tokens, "total_tokens": 8 + b.tokens},
        })
    };
    serde_json::to_vec(&answer).expect("serialising a Value")
}

fn json_response(status: u16, payload: &[u8]) -> Vec<u8> {
    let reason = if status == 200 { "OK" } else { "Error" };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n",
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// `type(getattr(b, key))(value)` for `int`, `float`: `None` where Python raises.
fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Bool(b) => Some(*b as i64),
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|x| x.is_finite())
                .map(|x| x.trunc() as i64)
        }),
        Value::String(s) => tokenrelay_bench_rig::parse_int(s),
        _ => None,
    }
}

fn as_float(v: &Value) -> Option<f64> {
    match v {
        Value::Bool(b) => Some(*b as i64 as f64),
        Value::Number(n) => n.as_f64(),
        Value::String(s) => tokenrelay_bench_rig::parse_float(s),
        _ => None,
    }
}

/// What to do with one request.
enum Answer {
    Json(Vec<u8>),
    Stream(Stream, Behaviour),
    /// where the Python mock raises in `data_received` (and uvloop closes the connection)
    Close,
}

fn handle(st: &State, method: &[u8], path: &[u8], raw: &[u8]) -> Answer {
    if path == b"/_control" {
        if method == b"POST" && !raw.is_empty() {
            let Ok(Value::Object(changes)) = serde_json::from_slice::<Value>(raw) else {
                return Answer::Close;
            };
            let mut b = st.behaviour.borrow_mut();
            // one key after the other, as the Python's setattr loop (a bad value stops it there)
            for key in ["tokens", "delay_ms", "first_token_ms", "usage"] {
                let Some(v) = changes.get(key) else { continue };
                let ok = match key {
                    "tokens" => as_int(v).map(|x| b.tokens = x).is_some(),
                    "delay_ms" => as_float(v).map(|x| b.delay_ms = x).is_some(),
                    "first_token_ms" => as_float(v).map(|x| b.first_token_ms = x).is_some(),
                    _ => {
                        b.usage = truthy(Some(v));
                        true
                    }
                };
                if !ok {
                    return Answer::Close;
                }
            }
        }
        let b = st.behaviour.borrow();
        let state = json!({
            "tokens": b.tokens,
            "delay_ms": b.delay_ms,
            "first_token_ms": b.first_token_ms,
            "usage": b.usage,
            "open_streams": st.open_streams.get(),
        });
        return Answer::Json(json_response(
            200,
            &serde_json::to_vec(&state).expect("serialising a Value"),
        ));
    }
    if path.ends_with(b"/models") {
        return Answer::Json(json_response(
            200,
            br#"{"object":"list","data":[{"id":"mock-gpt","object":"model","owned_by":"mock"}]}"#,
        ));
    }
    let anthropic = path.ends_with(b"/messages");
    if !(anthropic || path.ends_with(b"/chat/completions")) {
        return Answer::Json(json_response(404, br#"{"error":{"message":"not found"}}"#));
    }
    let body = match serde_json::from_slice::<Value>(raw) {
        Err(_) => return Answer::Json(json_response(400, br#"{"error":{"message":"bad json"}}"#)),
        Ok(Value::Object(body)) => body,
        Ok(_) => return Answer::Close, // `body.get`: AttributeError in the Python
    };
    let b = st.behaviour.borrow().clone();
    if !truthy(body.get("stream")) {
        return Answer::Json(json_response(200, &json_answer(st, &body, &b, anthropic)));
    }
    let stream = if anthropic {
        anthropic_events(st, &body, &b)
    } else {
        match openai_events(st, &body, &b) {
            Some(s) => s,
            None => return Answer::Close,
        }
    };
    Answer::Stream(stream, b)
}

/// One request parsed off the front of the buffer: `(method, path without the query, body, bytes it took)`.
enum Parsed {
    Incomplete,
    Bad,
    Request(Vec<u8>, Vec<u8>, Vec<u8>, usize),
}

fn parse(buf: &[u8]) -> Parsed {
    let Some(i) = memmem::find(buf, b"\r\n\r\n") else {
        return Parsed::Incomplete;
    };
    let head = &buf[..i];
    let lower = head.to_ascii_lowercase();
    let length = match memmem::find(&lower, b"content-length:") {
        None => 0,
        Some(j) => {
            let rest = &lower[j + 15..];
            let end = memmem::find(rest, b"\r\n").unwrap_or(rest.len());
            match std::str::from_utf8(&rest[..end])
                .ok()
                .and_then(tokenrelay_bench_rig::parse_int)
            {
                Some(n) if n >= 0 => n as usize,
                _ => return Parsed::Bad,
            }
        }
    };
    if buf.len() < i + 4 + length {
        return Parsed::Incomplete;
    }
    let mut parts = head.splitn(3, |&c| c == b' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Parsed::Bad;
    };
    let path = target.split(|&c| c == b'?').next().unwrap_or(b"");
    Parsed::Request(
        method.to_vec(),
        path.to_vec(),
        buf[i + 4..i + 4 + length].to_vec(),
        i + 4 + length,
    )
}

/// Counts a streamed answer in `open_streams` for as long as it lives (whichever way it ends).
struct Open<'a>(&'a State);

impl<'a> Open<'a> {
    fn new(st: &'a State) -> Self {
        st.open_streams.set(st.open_streams.get() + 1);
        Open(st)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open_streams.set(self.0.open_streams.get() - 1);
    }
}

/// Waits until `due` while watching the socket: what the client sends meanwhile (a pipelined request) is kept in
/// `buf`; `false` when the client has closed the connection (the stream then ends, as the Python's
/// `connection_lost` cancels its timer).
async fn pause(s: &TcpStream, buf: &mut Vec<u8>, due: Instant) -> bool {
    let mut sleep = pin!(tokio::time::sleep_until(due));
    loop {
        let readable = poll_fn(|cx| {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            s.poll_read_ready(cx).map(|_| true)
        })
        .await;
        if !readable {
            return true;
        }
        buf.reserve(4096);
        match s.try_read_buf(buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
    }
}

/// A non-negative duration of `x` seconds (`call_later` takes a negative delay as zero).
fn seconds(x: f64) -> Duration {
    Duration::try_from_secs_f64(x).unwrap_or(Duration::ZERO)
}

/// Writes a streamed answer: the head (and the role event) at once, then the deltas one write each at the pace
/// (or 16 per loop turn unpaced), then the tail. `Err` when the connection is gone.
async fn stream(
    st: &State,
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    a: &Stream,
    b: &Behaviour,
) -> io::Result<()> {
    s.write_all(&a.head).await?;
    let _open = Open::new(st);
    let gone = || io::Error::from(io::ErrorKind::ConnectionAborted);
    if b.first_token_ms != 0.0
        && !pause(s, buf, Instant::now() + seconds(b.first_token_ms / 1000.0)).await
    {
        return Err(gone());
    }
    let n = a.ends.len();
    let delay = b.delay_ms / 1000.0;
    if delay != 0.0 {
        // Each write `delay` after the previous one was due: tokio's timer fires up to ~1 ms after a deadline
        // (millisecond ticks), and timing each from the late firing would stretch the pace by that much. A
        // write more than a pace late (a stalled loop) starts the schedule again from itself, as in the Python.
        let step = seconds(delay);
        let mut due = Instant::now();
        for k in 0..n {
            s.write_all(a.delta(k)).await?;
            due += step;
            let now = Instant::now();
            if due < now {
                due = now + step;
            }
            if !pause(s, buf, due).await {
                return Err(gone());
            }
        }
    } else {
        // Unpaced: one write per event (as a real server flushes each token), 16 per loop turn so concurrent
        // streams interleave; a full socket buffer makes the write wait.
        let mut k = 0;
        while k < n {
            for _ in 0..16.min(n - k) {
                s.write_all(a.delta(k)).await?;
                k += 1;
            }
            tokio::task::yield_now().await;
        }
    }
    s.write_all(&a.last).await
}

async fn serve(st: Rc<State>, mut s: TcpStream) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match parse(&buf) {
            Parsed::Bad => return,
            Parsed::Incomplete => {
                buf.reserve(4096);
                match s.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
            Parsed::Request(method, path, raw, used) => {
                buf.drain(..used);
                match handle(&st, &method, &path, &raw) {
                    Answer::Close => return,
                    Answer::Json(out) => {
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                    Answer::Stream(a, b) => {
                        if stream(&st, &mut s, &mut buf, &a, &b).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

const OPTS: &[Opt] = &[
    opt("host", "127.0.0.1", ""),
    opt("port", "0", ""),
    opt("tokens", "64", ""),
    opt("delay-ms", "20.0", ""),
    opt("first-token-ms", "0.0", ""),
    opt("usage", "true", ""),
];

fn main() -> io::Result<()> {
    let args = Args::parse("A lean mock provider for the benchmarks (compiled).", OPTS);
    raise_nofile();
    let state = Rc::new(State::new(Behaviour {
        tokens: args.i64("tokens"),
        delay_ms: args.f64("delay-ms"),
        first_token_ms: args.f64("first-token-ms"),
        usage: args.str("usage").to_lowercase() == "true",
    }));
    let addr = args.socket_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(
        &rt,
        listen_and_serve(addr, 8192, "mock", "", |s| serve(state.clone(), s)),
    )
}
