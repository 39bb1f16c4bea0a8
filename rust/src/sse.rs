//! Incremental server-sent-events parser (WHATWG "event stream interpretation").
//!
//! Feed it raw chunks as they arrive from the socket; it calls back once per dispatched event with the event's
//! fields and its absolute byte range in the stream, so a caller can forward, drop or rewrite whole events.
//! Events that lie wholly inside one chunk are handed out as slices of that chunk (no copy); only the
//! partial tail of a chunk (an unfinished line or event) is copied into the parser.

use memchr::memchr2;
use thiserror::Error;

/// Default limit on the bytes of one pending (not yet dispatched) event: 16 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// What can go wrong while parsing. The parser stays usable after an error.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SseError {
    /// One pending line or event grew over the limit; its bytes were discarded up to the next line end.
    #[error("SSE event exceeds {limit} bytes; discarded")]
    EventTooLong {
        /// The configured limit in bytes.
        limit: usize,
    },
}

/// One dispatched event. The slices borrow the current chunk or the parser's own buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    /// The `event:` field, or `b"message"` when none was given.
    pub event: &'a [u8],
    /// The `data:` lines joined with `\n`.
    pub data: &'a [u8],
    /// The last event id seen in the stream (`id:` persists across events, as in the spec).
    pub id: Option<&'a [u8]>,
    /// Absolute stream offset where this event's bytes start (just after the previous blank line).
    pub start: u64,
    /// Absolute stream offset just past the blank line that dispatched this event.
    pub end: u64,
}

/// A field value of the event being built: nothing yet, a range of the current chunk, or owned bytes.
#[derive(Debug, Default)]
enum Field {
    #[default]
    Empty,
    Chunk(usize, usize),
    Owned,
}

/// The incremental parser. One per stream.
#[derive(Debug)]
pub struct SseParser {
    max_event_bytes: usize,
    /// Partial line carried over from previous chunks (no line terminator in it).
    line: Vec<u8>,
    /// The previous chunk ended with CR: an LF at the start of the next one belongs to it.
    pending_cr: bool,
    /// Bytes of the BOM matched so far at stream start; `None` once decided.
    bom: Option<u8>,
    /// Discarding the rest of an over-long line.
    skipping: bool,
    /// A blank line ended with the CR that ended the previous chunk: dispatch once we know whether an LF
    /// follows, so the event's byte range is the same however the stream was split.
    pending_dispatch: bool,
    data: Field,
    data_buf: Vec<u8>,
    event: Field,
    event_buf: Vec<u8>,
    last_id: Option<Vec<u8>>,
    retry: Option<u64>,
    /// Absolute offset of the start of the current chunk.
    offset: u64,
    /// Absolute offset just past the last blank line (an event boundary), dispatched or not.
    boundary: u64,
    ended: bool,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseParser {
    /// A parser that reports [`SseError::EventTooLong`] for a pending event over `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Self {
        SseParser {
            max_event_bytes: max_event_bytes.max(1),
            line: Vec::new(),
            pending_cr: false,
            bom: Some(0),
            skipping: false,
            pending_dispatch: false,
            data: Field::Empty,
            data_buf: Vec::new(),
            event: Field::Empty,
            event_buf: Vec::new(),
            last_id: None,
            retry: None,
            offset: 0,
            boundary: 0,
            ended: false,
        }
    }

    /// Total bytes fed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Absolute offset just past the last blank line seen: everything before it is whole events.
    pub fn boundary(&self) -> u64 {
        self.boundary
    }

    /// The last `retry:` value (reconnection time in ms), if any.
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// Bytes held for the event in progress (partial line plus copied fields).
    pub fn pending_bytes(&self) -> usize {
        self.line.len() + self.data_buf.len() + self.event_buf.len()
    }

    /// Parses one chunk, calling `on_event` for each event it completes.
    ///
    /// Returns an error if a pending event went over the limit; the rest of the chunk is still parsed.
    pub fn feed<F>(&mut self, chunk: &[u8], mut on_event: F) -> Result<(), SseError>
    where
        F: FnMut(&Event<'_>),
    {
        let mut error = None;
        let mut pos = 0usize;
        if self.bom.is_some() {
            pos = self.skip_bom(chunk);
        }
        if self.pending_cr && pos < chunk.len() {
            self.pending_cr = false;
            if chunk[pos] == b'\n' {
                pos += 1;
            }
        }
        if self.pending_dispatch && (pos < chunk.len() || !self.pending_cr) {
            self.pending_dispatch = false;
            self.dispatch(chunk, self.offset + pos as u64, &mut on_event);
        }
        while pos < chunk.len() {
            let Some(rel) = memchr2(b'\n', b'\r', &chunk[pos..]) else {
                // Unfinished line: copy the tail (and any borrowed field of the pending event).
                if !self.skipping {
                    self.line.extend_from_slice(&chunk[pos..]);
                }
                break;
            };
            let eol = pos + rel;
            let mut next = eol + 1;
            if chunk[eol] == b'\r' {
                if next == chunk.len() {
                    self.pending_cr = true;
                } else if chunk[next] == b'\n' {
                    next += 1;
                }
            }
            if self.skipping {
                self.skipping = false;
                self.line.clear();
            } else if self.line.is_empty() {
                if eol == pos {
                    if self.pending_cr {
                        self.pending_dispatch = true;
                    } else {
                        let end = self.offset + next as u64;
                        self.dispatch(chunk, end, &mut on_event);
                    }
                } else {
                    self.process_line(chunk, pos, eol);
                }
            } else {
                self.line.extend_from_slice(&chunk[pos..eol]);
                let line = std::mem::take(&mut self.line);
                self.process_owned_line(&line);
                self.line = line;
                self.line.clear();
            }
            pos = next;
        }
        self.own_borrowed_fields(chunk);
        if !self.skipping && self.pending_bytes() > self.max_event_bytes {
            self.discard_pending();
            error = Some(SseError::EventTooLong {
                limit: self.max_event_bytes,
            });
        }
        self.offset += chunk.len() as u64;
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// End of stream. The spec discards an unterminated event; for metering we are lenient and dispatch
    /// it if it has data (a server that omits the final blank line still gets its last event counted).
    pub fn finish<F>(&mut self, mut on_event: F)
    where
        F: FnMut(&Event<'_>),
    {
        if self.ended {
            return;
        }
        self.ended = true;
        if self.pending_dispatch {
            self.pending_dispatch = false;
            self.dispatch(&[], self.offset, &mut on_event);
        }
        if !self.line.is_empty() && !self.skipping {
            let line = std::mem::take(&mut self.line);
            self.process_owned_line(&line);
        }
        self.dispatch(&[], self.offset, &mut on_event);
    }

    fn skip_bom(&mut self, chunk: &[u8]) -> usize {
        let Some(mut matched) = self.bom else {
            return 0;
        };
        let mut pos = 0;
        while (matched as usize) < BOM.len() && pos < chunk.len() {
            if chunk[pos] != BOM[matched as usize] {
                // Not a BOM: the bytes matched so far are ordinary line bytes.
                self.line.extend_from_slice(&BOM[..matched as usize]);
                self.bom = None;
                return pos;
            }
            matched += 1;
            pos += 1;
        }
        self.bom = if (matched as usize) == BOM.len() {
            None
        } else {
            Some(matched)
        };
        pos
    }

    fn discard_pending(&mut self) {
        self.skipping = !self.line.is_empty() || self.skipping;
        self.line = Vec::new();
        self.data = Field::Empty;
        self.data_buf = Vec::new();
        self.event = Field::Empty;
        self.event_buf = Vec::new();
    }

    /// Copies fields that still point into `chunk` before the chunk goes away.
    fn own_borrowed_fields(&mut self, chunk: &[u8]) {
        if let Field::Chunk(s, e) = self.data {
            self.data_buf.clear();
            self.data_buf.extend_from_slice(&chunk[s..e]);
            self.data = Field::Owned;
        }
        if let Field::Chunk(s, e) = self.event {
            self.event_buf.clear();
            self.event_buf.extend_from_slice(&chunk[s..e]);
            self.event = Field::Owned;
        }
    }

    /// A line lying wholly in `chunk[start..end]`.
    fn process_line(&mut self, chunk: &[u8], start: usize, end: usize) {
        let line = &chunk[start..end];
        let Some((name, value_start)) = split_field(line) else {
            return;
        };
        let vs = start + value_start;
        match name {
            b"data" => match self.data {
                Field::Empty => self.data = Field::Chunk(vs, end),
                Field::Chunk(s, e) => {
                    self.data_buf.clear();
                    self.data_buf.extend_from_slice(&chunk[s..e]);
                    self.data_buf.push(b'\n');
                    self.data_buf.extend_from_slice(&chunk[vs..end]);
                    self.data = Field::Owned;
                }
                Field::Owned => {
                    self.data_buf.push(b'\n');
                    self.data_buf.extend_from_slice(&chunk[vs..end]);
                }
            },
            b"event" => self.event = Field::Chunk(vs, end),
            _ => self.other_field(name, &chunk[vs..end]),
        }
    }

    /// A line assembled in the parser's own buffer (it crossed a chunk boundary).
    fn process_owned_line(&mut self, line: &[u8]) {
        let Some((name, value_start)) = split_field(line) else {
            return;
        };
        let value = &line[value_start..];
        match name {
            b"data" => {
                // Fields still pointing into the chunk are copied first, keeping their order.
                match self.data {
                    Field::Empty => self.data_buf.clear(),
                    Field::Chunk(..) => {} // impossible: an owned line comes before any chunk line
                    Field::Owned => self.data_buf.push(b'\n'),
                }
                self.data_buf.extend_from_slice(value);
                self.data = Field::Owned;
            }
            b"event" => {
                self.event_buf.clear();
                self.event_buf.extend_from_slice(value);
                self.event = Field::Owned;
            }
            _ => self.other_field(name, value),
        }
    }

    fn other_field(&mut self, name: &[u8], value: &[u8]) {
        match name {
            b"id" if !value.contains(&0) => self.last_id = Some(value.to_vec()),
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                self.retry = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
            }
            _ => {}
        }
    }

    fn dispatch<F>(&mut self, chunk: &[u8], end: u64, on_event: &mut F)
    where
        F: FnMut(&Event<'_>),
    {
        let start = self.boundary;
        self.boundary = end;
        let data: &[u8] = match self.data {
            Field::Empty => {
                self.event = Field::Empty;
                return;
            }
            Field::Chunk(s, e) => &chunk[s..e],
            Field::Owned => &self.data_buf,
        };
        let event: &[u8] = match self.event {
            Field::Empty => b"message",
            Field::Chunk(s, e) if s < e => &chunk[s..e],
            Field::Owned if !self.event_buf.is_empty() => &self.event_buf,
            _ => b"message",
        };
        on_event(&Event {
            event,
            data,
            id: self.last_id.as_deref(),
            start,
            end,
        });
        self.data = Field::Empty;
        self.data_buf.clear();
        self.event = Field::Empty;
        self.event_buf.clear();
    }
}

/// Splits `name: value` (one optional space after the colon). `None` for a comment line.
fn split_field(line: &[u8]) -> Option<(&[u8], usize)> {
    match memchr::memchr(b':', line) {
        Some(0) => None,
        Some(i) => {
            let vs = if line.get(i + 1) == Some(&b' ') {
                i + 2
            } else {
                i + 1
            };
            Some((&line[..i], vs))
        }
        None => Some((line, line.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Owned {
        event: Vec<u8>,
        data: Vec<u8>,
        id: Option<Vec<u8>>,
        start: u64,
        end: u64,
    }

    fn parse_chunks(chunks: &[&[u8]]) -> Vec<Owned> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        let mut push = |e: &Event<'_>| {
            out.push(Owned {
                event: e.event.to_vec(),
                data: e.data.to_vec(),
                id: e.id.map(<[u8]>::to_vec),
                start: e.start,
                end: e.end,
            })
        };
        for c in chunks {
            p.feed(c, &mut push).unwrap();
        }
        p.finish(&mut push);
        out
    }

    fn parse(s: &str) -> Vec<Owned> {
        parse_chunks(&[s.as_bytes()])
    }

    fn datas(evs: &[Owned]) -> Vec<String> {
        evs.iter()
            .map(|e| String::from_utf8(e.data.clone()).unwrap())
            .collect()
    }

    #[test]
    fn lf_line_ends() {
        assert_eq!(datas(&parse("data: a\n\ndata: b\n\n")), ["a", "b"]);
    }

    #[test]
    fn cr_line_ends() {
        assert_eq!(datas(&parse("data: a\r\rdata: b\r\r")), ["a", "b"]);
    }

    #[test]
    fn crlf_line_ends() {
        let evs = parse("data: a\r\n\r\ndata: b\r\n\r\n");
        assert_eq!(datas(&evs), ["a", "b"]);
        assert_eq!(evs[0].end, 11);
        assert_eq!(evs[1].start, 11);
        assert_eq!(evs[1].end, 22);
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        // CR | LF split: the LF must not count as a second (blank) line.
        let evs = parse_chunks(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(datas(&evs), ["a\nb"]);
    }

    #[test]
    fn data_with_and_without_space() {
        assert_eq!(
            datas(&parse("data:a\n\ndata: b\n\ndata:  c\n\n")),
            ["a", "b", " c"]
        );
    }

    #[test]
    fn multiline_data_joined_with_lf() {
        assert_eq!(datas(&parse("data: a\ndata:\ndata: c\n\n")), ["a\n\nc"]);
    }

    #[test]
    fn comments_ignored() {
        let evs = parse(": ping\n\n:another\ndata: x\n: mid\n\n");
        assert_eq!(datas(&evs), ["x"]);
        // The comment-only block is a boundary, so the event starts after it.
        assert_eq!(evs[0].start, 8);
    }

    #[test]
    fn event_id_retry_fields() {
        let mut p = SseParser::default();
        let mut got = Vec::new();
        p.feed(
            b"event: message_start\nid: 7\nretry: 1500\ndata: {}\n\ndata: y\n\n",
            |e| got.push((e.event.to_vec(), e.id.map(<[u8]>::to_vec))),
        )
        .unwrap();
        assert_eq!(got[0], (b"message_start".to_vec(), Some(b"7".to_vec())));
        // The event type resets; the id persists.
        assert_eq!(got[1], (b"message".to_vec(), Some(b"7".to_vec())));
        assert_eq!(p.retry(), Some(1500));
    }

    #[test]
    fn bad_retry_and_nul_id_ignored() {
        let mut p = SseParser::default();
        let mut ids = Vec::new();
        p.feed(b"retry: 12a\nid: a\0b\ndata: x\n\n", |e| {
            ids.push(e.id.map(<[u8]>::to_vec))
        })
        .unwrap();
        assert_eq!(p.retry(), None);
        assert_eq!(ids, [None]);
    }

    #[test]
    fn field_without_colon_and_unknown_fields() {
        // "data" alone is a data line with an empty value; unknown fields are ignored.
        assert_eq!(datas(&parse("foo: bar\ndata\ndata: z\n\n")), ["\nz"]);
    }

    #[test]
    fn leading_bom_stripped_even_when_split() {
        assert_eq!(datas(&parse("\u{FEFF}data: a\n\n")), ["a"]);
        let evs = parse_chunks(&[b"\xEF", b"\xBB", b"\xBFdata: a\n\n"]);
        assert_eq!(datas(&evs), ["a"]);
        // Only at the start of the stream.
        let evs = parse("data: a\n\n\u{FEFF}data: b\n\n");
        assert_eq!(evs.len(), 1);
    }

    #[test]
    fn partial_bom_is_line_bytes() {
        let evs = parse_chunks(&[b"\xEF", b"\xBBx: 1\ndata: a\n\n"]);
        assert_eq!(datas(&evs), ["a"]);
    }

    #[test]
    fn blank_line_dispatches_and_empty_data_does_not() {
        let evs = parse("event: x\n\ndata: a\n");
        // "event: x" alone has no data: not dispatched. The final unterminated event is dispatched by finish().
        assert_eq!(datas(&evs), ["a"]);
        assert_eq!(evs[0].event, b"message");
    }

    #[test]
    fn event_split_in_every_place() {
        let s = b"event: e1\ndata: one\ndata: two\n\ndata: three\r\n\r\n";
        let whole = parse_chunks(&[s]);
        for i in 0..=s.len() {
            assert_eq!(parse_chunks(&[&s[..i], &s[i..]]), whole, "split at {i}");
        }
    }

    #[test]
    fn borrowed_when_inside_one_chunk() {
        let chunk = b"data: hello\n\n";
        let mut p = SseParser::default();
        let mut ptr = None;
        p.feed(chunk, |e| ptr = Some(e.data.as_ptr())).unwrap();
        assert_eq!(ptr, Some(chunk[6..].as_ptr()));
    }

    #[test]
    fn over_long_event_is_an_error_not_a_crash() {
        let mut p = SseParser::new(64);
        let mut n = 0;
        let big = vec![b'a'; 100];
        let mut chunk = b"data: ".to_vec();
        chunk.extend_from_slice(&big);
        assert_eq!(
            p.feed(&chunk, |_| n += 1),
            Err(SseError::EventTooLong { limit: 64 })
        );
        assert!(p.pending_bytes() == 0);
        // More of the same long line is skipped without growing memory; the stream recovers after it.
        p.feed(&big, |_| n += 1).unwrap();
        assert_eq!(p.pending_bytes(), 0);
        p.feed(b"\n\ndata: ok\n\n", |_| n += 1).unwrap();
        assert_eq!(n, 1);
        // Many short data lines adding up over the limit are caught too.
        let mut p = SseParser::new(64);
        let r = p.feed(&b"data: 0123456789\n".repeat(10), |_| {});
        assert!(r.is_err());
    }

    const SAMPLE: &str = concat!(
        "\u{FEFF}: hello\r\n",
        "event: message_start\r\n",
        "data: {\"a\": 1}\r\n\r\n",
        "id: 3\ndata: x\ndata:y\n\n",
        "data: [DONE]\r\r",
        "retry: 10\n",
        "event: e\ndata: \u{00e9}\u{4e2d}\n\n",
    );

    proptest! {
        #[test]
        fn any_split_gives_same_events(cuts in proptest::collection::vec(0usize..=SAMPLE.len(), 0..12)) {
            let s = SAMPLE.as_bytes();
            let whole = parse_chunks(&[s]);
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for c in cuts {
                chunks.push(&s[prev..c]);
                prev = c;
            }
            chunks.push(&s[prev..]);
            prop_assert_eq!(parse_chunks(&chunks), whole);
        }

        #[test]
        fn every_byte_split(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let whole = parse_chunks(&[&bytes]);
            let singles: Vec<&[u8]> = bytes.chunks(1).collect();
            prop_assert_eq!(parse_chunks(&singles), whole);
        }
    }
}
