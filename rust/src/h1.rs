//! HTTP/1.1 response framing for the upstream client: the response head (parsed by `httparse`) and the body
//! (chunked, `Content-Length`, or read to the close), decoded incrementally from any split of the wire bytes.
//!
//! The body decoder hands out the payload as ranges of the input (no copy), and tells whether an input was
//! *clean* chunked framing: whole chunks of `HEX CRLF data CRLF`, nothing else. Such bytes are already valid
//! chunked framing for a client too, so the relay can forward an upstream read as it came (see
//! `StreamMeter.feed_wire`).

use std::ops::Range;

use thiserror::Error;

/// Limit on a response head (status line + headers).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Limit on the number of header fields of a response.
pub const MAX_HEADERS: usize = 128;
/// Limit on a chunk-size line's extensions and on the trailer section.
const MAX_LINE_BYTES: usize = 8 * 1024;

/// A response that is not valid HTTP/1.x.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum H1Error {
    /// The status line or a header field is malformed.
    #[error("malformed response head: {0}")]
    Head(String),
    /// The head is larger than [`MAX_HEAD_BYTES`] or has more than [`MAX_HEADERS`] fields.
    #[error("response head too large")]
    HeadTooLarge,
    /// Content-Length values that are not one non-negative number.
    #[error("invalid Content-Length")]
    ContentLength,
    /// Bytes that are not chunked framing where a chunk was expected.
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
    /// The connection closed before the body was complete.
    #[error("the connection closed before the body was complete")]
    Incomplete,
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// `Content-Length: n`.
    Length(u64),
    /// Read until the server closes the connection.
    Close,
}

impl Framing {
    /// The name used across the Python boundary.
    pub fn name(self) -> &'static str {
        match self {
            Framing::Empty => "empty",
            Framing::Chunked => "chunked",
            Framing::Length(_) => "length",
            Framing::Close => "close",
        }
    }

    /// The inverse of [`Framing::name`] (`length` is the Content-Length for `"length"`).
    pub fn from_name(name: &str, length: u64) -> Option<Self> {
        Some(match name {
            "empty" => Framing::Empty,
            "chunked" => Framing::Chunked,
            "length" => Framing::Length(length),
            "close" => Framing::Close,
            _ => return None,
        })
    }
}

/// A parsed final response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The status code.
    pub status: u16,
    /// The reason phrase (lossily decoded).
    pub reason: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields in order, names as sent; values lossily decoded as UTF-8.
    pub headers: Vec<(String, String)>,
    /// Bytes of the input the head took (interim 1xx heads before it included).
    pub len: usize,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the connection may carry another request after this response.
    pub keep_alive: bool,
}

/// Parses the head at the start of `buf`. `Ok(None)`: incomplete, read more. Interim 1xx responses (other than
/// 101) are skipped. `head_request`: the request was a HEAD (its response has no body).
pub fn parse_head(buf: &[u8], head_request: bool) -> Result<Option<Head>, H1Error> {
    let mut offset = 0;
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut fields);
        let rest = &buf[offset..];
        let Some(n) = head_length(resp.parse(rest), rest.len())? else {
            return Ok(None);
        };
        let status = resp.code.unwrap_or(0);
        let minor_version = resp.version.unwrap_or(1);
        if (100..200).contains(&status) && status != 101 {
            offset += n;
            continue;
        }
        let headers: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).trim().to_owned(),
                )
            })
            .collect();
        let framing = framing(status, head_request, &headers)?;
        let keep_alive = framing != Framing::Close && keeps_alive(minor_version, &headers);
        return Ok(Some(Head {
            status,
            reason: resp.reason.unwrap_or("").to_owned(),
            minor_version,
            headers,
            len: offset + n,
            framing,
            keep_alive,
        }));
    }
}

fn framing(
    status: u16,
    head_request: bool,
    headers: &[(String, String)],
) -> Result<Framing, H1Error> {
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(Framing::Empty);
    }
    let mut transfer_encoding: Option<&str> = None;
    let mut length: Option<u64> = None;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = Some(value); // the last field holds the final coding
        } else if name.eq_ignore_ascii_case("content-length") {
            add_content_length(&mut length, value)?;
        }
    }
    // Transfer-Encoding overrides Content-Length; a final coding other than chunked reads to the close.
    if let Some(te) = transfer_encoding {
        let last = te.rsplit(',').next().unwrap_or("").trim();
        return Ok(if last.eq_ignore_ascii_case("chunked") {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

/// The length of a complete head from httparse's result (`None`: incomplete), within the limits.
fn head_length(
    parsed: Result<httparse::Status<usize>, httparse::Error>,
    available: usize,
) -> Result<Option<usize>, H1Error> {
    match parsed {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD_BYTES => Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) if available > MAX_HEAD_BYTES => Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(H1Error::HeadTooLarge),
        Err(e) => Err(H1Error::Head(e.to_string())),
    }
}

/// Folds one `Content-Length` field (possibly a list) into `length`: every value must be the same number.
fn add_content_length(length: &mut Option<u64>, value: &str) -> Result<(), H1Error> {
    for part in value.split(',') {
        let part = part.trim();
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(H1Error::ContentLength);
        }
        let n: u64 = part.parse().map_err(|_| H1Error::ContentLength)?;
        if length.is_some_and(|l| l != n) {
            return Err(H1Error::ContentLength);
        }
        *length = Some(n);
    }
    Ok(())
}

fn keeps_alive(minor_version: u8, headers: &[(String, String)]) -> bool {
    let mut close = false;
    let mut keep = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',') {
                let token = token.trim();
                close |= token.eq_ignore_ascii_case("close");
                keep |= token.eq_ignore_ascii_case("keep-alive");
            }
        }
    }
    !close && (minor_version >= 1 || keep)
}

/// A parsed request head, for the daemon's own front end (`tokenrelay.server`): only what it needs to tell a
/// relayed API call with a `Content-Length` body from everything it leaves to aiohttp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method, as sent.
    pub method: String,
    /// The request target (origin form: path and query).
    pub target: String,
    /// 0 or 1 (HTTP/1.0 or HTTP/1.1).
    pub minor_version: u8,
    /// The header fields in order (values lossily decoded, trimmed).
    pub headers: Vec<(String, String)>,
    /// The length of the head in bytes, its blank line included.
    pub len: usize,
    /// The body's `Content-Length`; `None` with no such field.
    pub content_length: Option<u64>,
    /// A `Transfer-Encoding`, `Expect` or `Upgrade` field is present: a request the front end does not frame.
    pub unusual: bool,
    /// Whether the connection may carry another request after this one.
    pub keep_alive: bool,
}

/// Parses the request head at the start of `buf`. `Ok(None)`: incomplete, read more. An error for a head that
/// is not HTTP/1.x, too large, or with conflicting `Content-Length` values.
pub fn parse_request_head(buf: &[u8]) -> Result<Option<RequestHead>, H1Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let Some(n) = head_length(req.parse(buf), buf.len())? else {
        return Ok(None);
    };
    let mut content_length: Option<u64> = None;
    let mut unusual = false;
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value).trim().to_owned();
        if h.name.eq_ignore_ascii_case("content-length") {
            add_content_length(&mut content_length, &value)?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            || h.name.eq_ignore_ascii_case("expect")
            || h.name.eq_ignore_ascii_case("upgrade")
        {
            unusual = true;
        }
        headers.push((h.name.to_owned(), value));
    }
    let minor_version = req.version.unwrap_or(1);
    let keep_alive = keeps_alive(minor_version, &headers);
    Ok(Some(RequestHead {
        method: req.method.unwrap_or("").to_owned(),
        target: req.path.unwrap_or("").to_owned(),
        minor_version,
        headers,
        len: n,
        content_length,
        unusual,
        keep_alive,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// At the start of a chunk-size line: the chunk boundary.
    Size,
    /// In the size digits.
    Digits,
    /// Whitespace after the digits.
    SizeWs,
    /// In a chunk extension.
    Ext,
    /// After the CR of a size line.
    SizeLf,
    /// In chunk data.
    Data,
    /// After chunk data, expecting CR LF.
    DataCr,
    DataLf,
    /// At the start of a trailer line (after the last chunk).
    Trailer,
    /// Inside a trailer line.
    TrailerLine,
    /// After the CR of the empty line that ends the trailer.
    TrailerLf,
    Done,
}

/// Incremental body decoder. One per response.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    framing: Framing,
    state: Chunk,
    /// Chunk bytes still to come (chunked), or body bytes still to come (length).
    remaining: u64,
    /// Bytes of the current size line's extension, or of the trailer so far.
    line_bytes: usize,
    /// Whether the last `decode` call saw only whole `HEX CRLF data CRLF` chunks.
    clean: bool,
    done: bool,
}

impl BodyDecoder {
    /// A decoder for a body delimited by `framing`.
    pub fn new(framing: Framing) -> Self {
        let (remaining, done) = match framing {
            Framing::Length(n) => (n, n == 0),
            Framing::Empty => (0, true),
            _ => (0, false),
        };
        BodyDecoder {
            framing,
            state: Chunk::Size,
            remaining,
            line_bytes: 0,
            clean: true,
            done,
        }
    }

    /// How the body is delimited.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// The whole body has been read.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Chunked, and between two chunks (what has been read so far is a sequence of whole chunks).
    pub fn at_boundary(&self) -> bool {
        self.framing == Framing::Chunked && self.state == Chunk::Size
    }

    /// The last [`BodyDecoder::decode`] read nothing but whole-chunk framing of the plain form (no extension,
    /// no bare LF, no whitespace, not the last chunk, no trailer), from a boundary to a boundary.
    pub fn clean(&self) -> bool {
        self.clean
    }

    /// The connection closed: fine for a body read to the close (it is now complete); an error otherwise unless
    /// the body was already complete.
    pub fn finish_on_close(&mut self) -> Result<(), H1Error> {
        if self.framing == Framing::Close {
            self.done = true;
        }
        if self.done {
            Ok(())
        } else {
            Err(H1Error::Incomplete)
        }
    }

    /// Decodes `input`, calling `sink` with the range of `input` of each piece of payload, in order. Returns how
    /// many bytes of `input` the body took: less than `input.len()` only when the body ended inside it (the rest
    /// does not belong to this response).
    pub fn decode(
        &mut self,
        input: &[u8],
        mut sink: impl FnMut(Range<usize>),
    ) -> Result<usize, H1Error> {
        self.clean = self.at_boundary();
        if self.done {
            self.clean = false;
            return Ok(0);
        }
        match self.framing {
            Framing::Empty => {
                self.done = true;
                Ok(0)
            }
            Framing::Close => {
                if !input.is_empty() {
                    sink(0..input.len());
                }
                Ok(input.len())
            }
            Framing::Length(_) => {
                let take = (self.remaining.min(input.len() as u64)) as usize;
                if take > 0 {
                    sink(0..take);
                }
                self.remaining -= take as u64;
                self.done = self.remaining == 0;
                Ok(take)
            }
            Framing::Chunked => {
                let n = self.decode_chunked(input, &mut sink)?;
                self.clean &= self.state == Chunk::Size;
                Ok(n)
            }
        }
    }

    fn decode_chunked(
        &mut self,
        input: &[u8],
        sink: &mut impl FnMut(Range<usize>),
    ) -> Result<usize, H1Error> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                Chunk::Size | Chunk::Digits => match hex(b) {
                    Some(d) => {
                        if self.remaining > (u64::MAX >> 8) {
                            return Err(H1Error::Chunked("chunk size too large"));
                        }
                        self.remaining = self.remaining * 16 + u64::from(d);
                        self.state = Chunk::Digits;
                    }
                    None if self.state == Chunk::Size => {
                        return Err(H1Error::Chunked("expected a chunk size"));
                    }
                    None => match b {
                        b'\r' => self.state = Chunk::SizeLf,
                        b'\n' => {
                            self.clean = false;
                            self.end_size_line();
                        }
                        b' ' | b'\t' => {
                            self.clean = false;
                            self.state = Chunk::SizeWs;
                        }
                        b';' => {
                            self.clean = false;
                            self.state = Chunk::Ext;
                        }
                        _ => return Err(H1Error::Chunked("bad character in a chunk size")),
                    },
                },
                Chunk::SizeWs => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = Chunk::Ext,
                    b'\r' => self.state = Chunk::SizeLf,
                    b'\n' => self.end_size_line(),
                    _ => return Err(H1Error::Chunked("bad character after a chunk size")),
                },
                Chunk::Ext => match b {
                    b'\r' => self.state = Chunk::SizeLf,
                    b'\n' => self.end_size_line(),
                    _ => {
                        self.line_bytes += 1;
                        if self.line_bytes > MAX_LINE_BYTES {
                            return Err(H1Error::Chunked("chunk extension too long"));
                        }
                    }
                },
                Chunk::SizeLf => {
                    if b != b'\n' {
                        return Err(H1Error::Chunked("expected LF after a chunk size"));
                    }
                    self.end_size_line();
                }
                Chunk::Data => {
                    let take = (self.remaining.min((input.len() - i) as u64)) as usize;
                    sink(i..i + take);
                    self.remaining -= take as u64;
                    i += take;
                    if self.remaining == 0 {
                        self.state = Chunk::DataCr;
                    }
                    continue;
                }
                Chunk::DataCr => match b {
                    b'\r' => self.state = Chunk::DataLf,
                    b'\n' => {
                        self.clean = false;
                        self.state = Chunk::Size;
                    }
                    _ => return Err(H1Error::Chunked("expected CRLF after chunk data")),
                },
                Chunk::DataLf => {
                    if b != b'\n' {
                        return Err(H1Error::Chunked("expected CRLF after chunk data"));
                    }
                    self.state = Chunk::Size;
                }
                Chunk::Trailer => match b {
                    b'\r' => self.state = Chunk::TrailerLf,
                    b'\n' => self.finish_chunked(),
                    _ => {
                        self.state = Chunk::TrailerLine;
                        self.count_trailer()?;
                    }
                },
                Chunk::TrailerLine => {
                    if b == b'\n' {
                        self.state = Chunk::Trailer;
                    }
                    self.count_trailer()?;
                }
                Chunk::TrailerLf => {
                    if b != b'\n' {
                        return Err(H1Error::Chunked("expected LF ending the trailer"));
                    }
                    self.finish_chunked();
                }
                Chunk::Done => break,
            }
            i += 1;
            if self.state == Chunk::Done {
                break;
            }
        }
        Ok(i)
    }

    fn end_size_line(&mut self) {
        self.line_bytes = 0;
        if self.remaining == 0 {
            self.clean = false;
            self.state = Chunk::Trailer;
        } else {
            self.state = Chunk::Data;
        }
    }

    fn count_trailer(&mut self) -> Result<(), H1Error> {
        self.line_bytes += 1;
        if self.line_bytes > MAX_LINE_BYTES {
            return Err(H1Error::Chunked("trailer too long"));
        }
        Ok(())
    }

    fn finish_chunked(&mut self) {
        self.state = Chunk::Done;
        self.done = true;
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends `payload` to `out` as one chunk of chunked framing (nothing for an empty payload).
pub fn write_chunk(out: &mut Vec<u8>, payload_len: usize, payload: impl FnOnce(&mut Vec<u8>)) {
    if payload_len == 0 {
        return;
    }
    let mut digits = [0u8; 16];
    let mut n = payload_len;
    let mut i = digits.len();
    while n > 0 {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
    }
    out.reserve(digits.len() - i + payload_len + 4);
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
    payload(out);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests;
