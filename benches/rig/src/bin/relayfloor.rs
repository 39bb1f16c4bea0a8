//! A measurement tool, not a product: the floor of a metered relay when its loop is Rust. A minimal streaming
//! HTTP/1.1 reverse proxy that passes every upstream body read through tokenrelay's own stream meter
//! (`tokenrelay_core::events::{Framed, StreamMeter}`, the code `Pump` runs for the Python relay), so that the CPU one
//! paced SSE event costs with no Python in the loop can be measured on this machine, beside nginx's (a relay that
//! meters nothing) and tokenrelay's (the same meter under an asyncio loop).
//!
//! It is made for the benchmark's request shape and nothing more: one thread (tokio's current-thread runtime: `taskset`
//! keeps it on its core); per client connection one upstream connection, opened on the first request and kept for
//! the client connection's life; per request the head (up to the blank line) and a Content-Length body forwarded
//! unchanged in one write (no chunked request bodies); the upstream's response head parsed by
//! `tokenrelay_core::h1::parse_head` and forwarded unchanged, then each body read fed to `Framed::feed` and written
//! to the client (the read itself, or the bytes `feed` returns instead) until the body ends. The client is sent the
//! upstream's own head, so its body keeps the upstream's framing: chunked output for a chunked upstream, the bare
//! payload otherwise; `Framed` leaves the terminating chunk to the writer (as aiohttp's writes it for the Python
//! relay), so it is added here once a chunked body has ended. Any error, or a response that does not keep the
//! connection alive, closes both connections of that client.

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;

use memchr::memmem;
use tokenrelay_bench_rig::{listen_and_serve, opt, raise_nofile, required, Args, Opt};
use tokenrelay_core::api::Api;
use tokenrelay_core::events::{Framed, StreamMeter};
use tokenrelay_core::h1::{parse_head, Framing, MAX_HEAD_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Spare room offered to each read (a paced event is ~300 bytes; unpaced reads take what has piled up).
const READ_ROOM: usize = 32 * 1024;

/// The last chunk of a chunked body (no trailer).
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

fn invalid(msg: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// The request at the start of `buf`, once complete: `(bytes it takes, whether it is a HEAD)`. Only a
/// Content-Length body is understood; a chunked request body is an error.
fn request_len(buf: &[u8]) -> io::Result<Option<(usize, bool)>> {
    let Some(end) = memmem::find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD_BYTES {
            Err(invalid("request head too large"))
        } else {
            Ok(None)
        };
    };
    let mut lines = buf[..end].split(|&c| c == b'\n');
    let is_head = lines.next().is_some_and(|l| l.starts_with(b"HEAD "));
    let mut length = 0usize;
    for line in lines {
        let Some(colon) = line.iter().position(|&c| c == b':') else {
            return Err(invalid("malformed request header"));
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            length = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| invalid("bad request Content-Length"))?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(invalid("chunked request bodies are not relayed"));
        }
    }
    let total = end + 4 + length;
    Ok((buf.len() >= total).then_some((total, is_head)))
}

/// What the client is to be sent for one upstream body read: the read itself, or what `Framed` made of it, and
/// the last chunk once a chunked body has ended.
fn relay_bytes<'a>(
    framed: &mut Framed,
    meter: &mut StreamMeter,
    data: &'a [u8],
) -> io::Result<Cow<'a, [u8]>> {
    let mut out = match framed.feed(meter, data).map_err(invalid)? {
        None => Cow::Borrowed(data),
        Some(bytes) => Cow::Owned(bytes),
    };
    if framed.done() {
        if framed.excess() {
            return Err(invalid("the upstream sent bytes past the body's end"));
        }
        // Without strip mode nothing is held back; this meters an unterminated last event, if any.
        let held = meter.flush();
        out.to_mut().extend_from_slice(&held);
        if framed.client_chunked() {
            out.to_mut().extend_from_slice(LAST_CHUNK);
        }
    }
    Ok(out)
}

/// The upstream connection, once [`Relay::connect`] opened it.
fn opened(upstream: &mut Option<TcpStream>) -> io::Result<&mut TcpStream> {
    upstream
        .as_mut()
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
}

/// One client connection and its upstream connection.
struct Relay {
    client: TcpStream,
    upstream: Option<TcpStream>,
    upstream_addr: SocketAddr,
    /// Client bytes read and not forwarded yet (the start of the next request, if pipelined).
    cbuf: Vec<u8>,
    /// The current upstream read.
    ubuf: Vec<u8>,
}

impl Relay {
    /// Reads the next request into `cbuf`: `None` when the client closed the connection between requests.
    async fn read_request(&mut self) -> io::Result<Option<(usize, bool)>> {
        loop {
            if let Some(req) = request_len(&self.cbuf)? {
                return Ok(Some(req));
            }
            self.cbuf.reserve(4096);
            if self.client.read_buf(&mut self.cbuf).await? == 0 {
                return if self.cbuf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    /// Opens the upstream connection if there is none yet (on the first request).
    async fn connect(&mut self) -> io::Result<()> {
        if self.upstream.is_none() {
            let s = TcpStream::connect(self.upstream_addr).await?;
            s.set_nodelay(true)?;
            self.upstream = Some(s);
        }
        Ok(())
    }

    /// Forwards one request and relays its response: `false` when the connection is not to be reused (the
    /// client closed it, or the response does not keep it alive).
    async fn exchange(&mut self) -> io::Result<bool> {
        let Some((len, is_head)) = self.read_request().await? else {
            return Ok(false);
        };
        self.connect().await?;
        opened(&mut self.upstream)?
            .write_all(&self.cbuf[..len])
            .await?;
        self.cbuf.drain(..len);
        self.relay_response(is_head).await
    }

    /// Reads the response head off the upstream, writes it (and whatever body bytes came with it, metered) to the
    /// client, then relays the body read by read until it ends. `Ok(keep_alive)`.
    async fn relay_response(&mut self, is_head: bool) -> io::Result<bool> {
        let Relay {
            client,
            upstream,
            ubuf,
            ..
        } = self;
        let up = opened(upstream)?;
        ubuf.clear();
        let head = loop {
            if let Some(head) = parse_head(ubuf, is_head).map_err(invalid)? {
                break head;
            }
            ubuf.reserve(READ_ROOM);
            if up.read_buf(ubuf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        let mut meter = StreamMeter::new(Api::Chat, "gpt-4o", false);
        let mut framed = Framed::new(head.framing);
        // The client gets the upstream's head, so the upstream's framing: chunked output only for a chunked body.
        framed.set_client_chunked(head.framing == Framing::Chunked);
        // The head and the body bytes of the same read go out in one write.
        match relay_bytes(&mut framed, &mut meter, &ubuf[head.len..])? {
            Cow::Borrowed(_) => client.write_all(ubuf).await?,
            Cow::Owned(body) => {
                let mut out = Vec::with_capacity(head.len + body.len());
                out.extend_from_slice(&ubuf[..head.len]);
                out.extend_from_slice(&body);
                client.write_all(&out).await?;
            }
        }
        while !framed.done() {
            ubuf.clear();
            ubuf.reserve(READ_ROOM);
            if up.read_buf(ubuf).await? == 0 {
                // the end of a body read to the close (an error for any other framing); not reusable either way
                framed.close().map_err(invalid)?;
                let held = meter.flush();
                client.write_all(&held).await?;
                return Ok(false);
            }
            let out = relay_bytes(&mut framed, &mut meter, ubuf)?;
            if !out.is_empty() {
                client.write_all(&out).await?;
            }
        }
        Ok(head.keep_alive)
    }
}

/// Serves one client connection until it closes or fails; both connections close when this returns.
async fn serve(client: TcpStream, upstream_addr: SocketAddr) {
    let mut relay = Relay {
        client,
        upstream: None,
        upstream_addr,
        cbuf: Vec::new(),
        ubuf: Vec::with_capacity(READ_ROOM),
    };
    while let Ok(true) = relay.exchange().await {}
}

const OPTS: &[Opt] = &[
    opt("host", "127.0.0.1", ""),
    required("port"),
    opt("upstream-host", "127.0.0.1", ""),
    required("upstream-port"),
];

fn main() -> io::Result<()> {
    let args = Args::parse(
        "A minimal streaming HTTP/1.1 reverse proxy that meters every upstream read with tokenrelay's StreamMeter \
         (a measurement tool: the CPU per event of a relay loop in Rust).",
        OPTS,
    );
    raise_nofile();
    let addr = args.socket_addr()?;
    let upstream = args.socket_addr_of("upstream-host", "upstream-port")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let note = format!(", upstream {upstream}");
    local.block_on(
        &rt,
        listen_and_serve(addr, 4096, "relayfloor", &note, |s| serve(s, upstream)),
    )
}
