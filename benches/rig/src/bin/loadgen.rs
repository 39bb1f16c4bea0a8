//! The benchmarks' load generator, compiled: the same client, command line and JSON summary as `benches/loadgen.py`,
//! run as its own process, at about half its CPU per event.
//!
//! `loadgen.py` (raw uvloop) costs ~10–13 µs of CPU per event at 1024 paced streams; with the mock on the same core the
//! rig needs more than that core, so the *direct* baseline lags and the rig is what gets measured (this one: ~7 µs,
//! most of it the kernel's loopback TCP path). This is the same client on tokio's current-thread runtime (one thread:
//! `taskset` keeps it on its core). It opens N keep-alive connections to one address (in batches of 200, 10 s connect
//! timeout) before the clock starts, sends the same POST on each (first requests staggered over `--ramp-ms`), and
//! parses the answers itself: the status line and headers, chunked or Content-Length framing, and server-sent events
//! found by their blank-line boundaries; one read per wake-up and a memchr scan per read, no HTTP library in the
//! measured path. A server's `connection: close` makes it reconnect, as a client pool would.
//!
//! Per stream it records the time to the first content event (an event whose `content` or `text` field is a non-empty
//! string), every gap between events after it (each event timed at the read that completed it), the number of events
//! and any error. It writes one JSON summary (percentiles, totals, optional RSS samples of other processes) to `--out`
//! or stdout, with the keys and meanings of `loadgen.py`'s (NaN written as `null`).
//!
//! Modes: `stream` (one or more SSE answers per connection), `json` (back-to-back small requests per connection for
//! `--duration-s`), `idle` (N streams held open; samples the RSS of `--sample-pids` while they are all open).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use memchr::{memchr_iter, memmem};
use serde_json::{json, Map, Value};
use tokenrelay_bench_rig::{opt, raise_nofile, required, Args, Kind, Opt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Spare room offered to each read (an event is ~300 bytes; unpaced reads take what has piled up).
const READ_ROOM: usize = 32 * 1024;

/// One answer's record.
#[derive(Default)]
struct Res {
    status: u16,
    /// When the request was sent (for `--trace`).
    sent: Option<Instant>,
    ttft: f64,
    latency: f64,
    events: u64,
    gaps: Vec<f64>,
    error: String,
}

impl Res {
    fn new() -> Res {
        Res {
            ttft: -1.0,
            latency: -1.0,
            ..Res::default()
        }
    }
}

/// `CONTENT_RE = rb'"(?:content|text)": ?"[^"]'` searched in one event.
fn has_content(ev: &[u8]) -> bool {
    for pat in [&b"\"content\":"[..], &b"\"text\":"[..]] {
        for i in memmem::find_iter(ev, pat) {
            let mut j = i + pat.len();
            if ev.get(j) == Some(&b' ') {
                j += 1;
            }
            if ev.get(j) == Some(&b'"') && ev.get(j + 1).is_some_and(|&c| c != b'"') {
                return true;
            }
        }
    }
    false
}

/// The first `a b` pair of bytes in `hay` (`\r\n`, `\n\n`): a memchr for `a`, then a look at the next byte.
fn find2(hay: &[u8], a: u8, b: u8) -> Option<usize> {
    memchr_iter(a, hay).find(|&i| hay.get(i + 1) == Some(&b))
}

/// The parse state of one answer (everything of a connection but its socket and read buffer).
struct Answer {
    sse: bool,
    in_head: bool,
    chunked: bool,
    remaining: i64,
    server_closes: bool,
    got_content: bool,
    t_start: Instant,
    t_last: Instant,
    events_buf: Vec<u8>,
    result: Res,
    done: bool,
}

impl Answer {
    fn finish(&mut self, t: Instant) {
        let r = &mut self.result;
        r.latency = (t - self.t_start).as_secs_f64();
        if r.status != 200 {
            r.error = format!("status {}", r.status);
        } else if self.sse && !self.got_content {
            r.error = "no content event".into();
        }
        self.done = true;
    }

    fn fail(&mut self, message: String) {
        self.result.error = message;
        self.done = true;
    }

    /// Counts the complete events in `data` (from `eb` if a previous payload left part of one).
    fn payload(&mut self, p: &[u8], t: Instant) {
        if !self.sse {
            return;
        }
        if self.events_buf.is_empty() {
            let used = self.scan(p, t);
            self.events_buf.extend_from_slice(&p[used..]);
        } else {
            let mut eb = std::mem::take(&mut self.events_buf);
            eb.extend_from_slice(p);
            let used = self.scan(&eb, t);
            eb.drain(..used);
            self.events_buf = eb;
        }
    }

    /// The events in `data` up to its last blank line; returns how many bytes they took.
    fn scan(&mut self, data: &[u8], t: Instant) -> usize {
        let mut start = 0;
        while let Some(k) = find2(&data[start..], b'\n', b'\n') {
            let r = &mut self.result;
            r.events += 1;
            if self.got_content {
                r.gaps.push((t - self.t_last).as_secs_f64());
                self.t_last = t;
            } else if has_content(&data[start..start + k]) {
                self.got_content = true;
                r.ttft = (t - self.t_start).as_secs_f64();
                self.t_last = t;
            }
            start += k + 2;
        }
        start
    }
}

/// One keep-alive connection.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    closed: bool,
    a: Answer,
}

impl Conn {
    fn new(s: TcpStream, sse: bool) -> Conn {
        let t = Instant::now();
        Conn {
            s,
            buf: Vec::with_capacity(READ_ROOM),
            closed: false,
            a: Answer {
                sse,
                in_head: true,
                chunked: false,
                remaining: -1,
                server_closes: false,
                got_content: false,
                t_start: t,
                t_last: t,
                events_buf: Vec::new(),
                result: Res::new(),
                done: false,
            },
        }
    }

    /// `request()` up to the write: resets the answer state; `false` (with the error set) if already closed.
    fn begin(&mut self, started: &Cell<bool>) -> bool {
        let a = &mut self.a;
        a.result = Res::new();
        a.done = false;
        self.buf.clear();
        a.events_buf.clear();
        a.in_head = true;
        started.set(false);
        a.chunked = false;
        a.remaining = -1;
        a.got_content = false;
        if self.closed {
            a.fail("connection closed".into());
            return false;
        }
        a.t_start = Instant::now();
        a.result.sent = Some(a.t_start);
        true
    }

    /// Sends the request and reads until the answer ends (or fails).
    async fn exchange(&mut self, request: &[u8], started: &Cell<bool>) {
        if let Err(e) = self.s.write_all(request).await {
            return self.lost(Some(e));
        }
        while !self.a.done {
            if self.buf.capacity() - self.buf.len() < READ_ROOM / 2 {
                self.buf.reserve(READ_ROOM);
            }
            match self.s.read_buf(&mut self.buf).await {
                Ok(0) => return self.lost(None),
                Ok(_) => self.feed(Instant::now(), started),
                Err(e) => return self.lost(Some(e)),
            }
        }
    }

    /// `connection_lost`: a close-delimited body ends here; anything else is an error.
    fn lost(&mut self, err: Option<io::Error>) {
        self.closed = true;
        let a = &mut self.a;
        if a.done {
            return;
        }
        if !a.in_head && !a.chunked && a.remaining < 0 {
            a.finish(Instant::now());
        } else {
            let why = err
                .map(|e| e.to_string())
                .unwrap_or_else(|| "closed by peer".into());
            a.fail(format!("connection lost: {why}"));
        }
    }

    /// `data_received`: everything read so far, at the time of the read `t`.
    fn feed(&mut self, t: Instant, started: &Cell<bool>) {
        let a = &mut self.a;
        let buf = &self.buf;
        let mut pos = 0;
        if a.in_head {
            let Some(i) = memmem::find(buf, b"\r\n\r\n") else {
                return;
            };
            let head = buf[..i].to_ascii_lowercase();
            pos = i + 4;
            a.in_head = false;
            started.set(true);
            match head
                .get(9..12)
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(tokenrelay_bench_rig::parse_int)
            {
                Some(status) => a.result.status = status as u16,
                None => {
                    a.fail("bad status line".into());
                    self.buf.drain(..pos);
                    return;
                }
            }
            a.chunked = memmem::find(&head, b"transfer-encoding: chunked").is_some();
            a.server_closes = memmem::find(&head, b"connection: close").is_some();
            a.remaining = -1;
            if let Some(j) = memmem::find(&head, b"content-length:") {
                let rest = &head[j + 15..];
                let end = find2(rest, b'\r', b'\n').unwrap_or(rest.len());
                match std::str::from_utf8(&rest[..end])
                    .ok()
                    .and_then(tokenrelay_bench_rig::parse_int)
                {
                    Some(n) => a.remaining = n,
                    None => {
                        // (the Python raises in data_received; uvloop closes the connection)
                        self.closed = true;
                        a.fail("connection lost: bad content-length".into());
                        return;
                    }
                }
            }
        }
        if a.chunked {
            loop {
                let data = &buf[pos..];
                let Some(j) = find2(data, b'\r', b'\n') else {
                    break;
                };
                let line = &data[..j];
                let hex = line.split(|&c| c == b';').next().unwrap_or(b"");
                let size = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| usize::from_str_radix(h.trim(), 16).ok());
                let Some(size) = size else {
                    self.closed = true;
                    a.fail("connection lost: bad chunk size".into());
                    return;
                };
                if data.len() < j + 4 + size {
                    break;
                }
                pos += j + 4 + size;
                if size == 0 {
                    a.finish(t);
                    break;
                }
                a.payload(&data[j + 2..j + 2 + size], t);
            }
        } else if a.remaining >= 0 {
            let take = (buf.len() - pos).min(a.remaining as usize);
            a.payload(&buf[pos..pos + take], t);
            pos += take;
            a.remaining -= take as i64;
            if a.remaining == 0 {
                a.finish(t);
            }
        } else {
            a.payload(&buf[pos..], t);
            pos = buf.len();
        }
        if pos == self.buf.len() {
            self.buf.clear();
        } else {
            self.buf.drain(..pos);
        }
    }

    /// Whether the server has closed the connection by now (what `connection_lost` would have told the Python
    /// client already): a read only if the socket is known readable.
    fn probe_closed(&mut self) {
        let mut scratch = [0u8; 512];
        match self.s.try_read(&mut scratch) {
            Ok(0) => self.closed = true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.closed = true,
        }
    }

    /// `transport.abort()`: a reset, not a graceful close.
    fn abort(self) {
        let _ = self.s.set_zero_linger();
    }
}

struct Config {
    addr: SocketAddr,
    request: Vec<u8>,
    sse: bool,
    mode: String,
    requests: i64,
    duration_s: f64,
    ramp_ms: f64,
    cut: bool,
}

/// What the tasks share (one thread: plain cells).
struct Shared {
    cfg: Config,
    results: RefCell<Vec<Res>>,
    connect_errors: RefCell<Vec<String>>,
    started: Vec<Cell<bool>>,
    sent: Cell<usize>,
    reconnects: Cell<u64>,
    all_sent: Notify,
    all_sent_flag: Cell<bool>,
}

impl Shared {
    fn count_sent(&self, n: usize) {
        self.sent.set(self.sent.get() + 1);
        if self.sent.get() == n {
            self.all_sent_flag.set(true);
            self.all_sent.notify_one();
        }
    }
}

async fn connect(sh: &Shared) -> Option<Conn> {
    match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(sh.cfg.addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(Conn::new(s, sh.cfg.sse))
        }
        Ok(Err(e)) => {
            sh.connect_errors.borrow_mut().push(format!("connect: {e}"));
            None
        }
        Err(_) => {
            sh.connect_errors
                .borrow_mut()
                .push("connect: TimeoutError()".into());
            None
        }
    }
}

/// `n` connections, opened `batch` at a time.
async fn open_conns(sh: &Rc<Shared>, n: usize, batch: usize) -> Vec<Option<Conn>> {
    let mut conns = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let handles: Vec<_> = (0..batch.min(n - i))
            .map(|_| {
                let sh = sh.clone();
                tokio::task::spawn_local(async move { connect(&sh).await })
            })
            .collect();
        for h in handles {
            conns.push(h.await.unwrap_or(None));
        }
        i += batch;
    }
    conns
}

/// One connection's requests; returns the connection to close when the whole run ends (as the Python does).
async fn drive(
    sh: Rc<Shared>,
    i: usize,
    n: usize,
    conn: Option<Conn>,
    t0: Instant,
    deadline: Instant,
) -> Option<Conn> {
    let cfg = &sh.cfg;
    if cfg.ramp_ms != 0.0 && n > 1 {
        let delay = cfg.ramp_ms / 1000.0 * i as f64 / n as f64;
        tokio::time::sleep(Duration::from_secs_f64(delay.max(0.0))).await;
    }
    let Some(mut conn) = conn else {
        sh.count_sent(n);
        return None;
    };
    let started = &sh.started[i];
    let mut count = 0;
    loop {
        let open = conn.begin(started);
        if count == 0 {
            sh.count_sent(n);
        }
        if open {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10));
            if tokio::time::timeout(left, conn.exchange(&cfg.request, started))
                .await
                .is_err()
            {
                let mut res = std::mem::replace(&mut conn.a.result, Res::new());
                if res.error.is_empty() {
                    res.error = if cfg.cut { "cut" } else { "timeout" }.into();
                }
                sh.results.borrow_mut().push(res);
                conn.abort();
                return None;
            }
        }
        let res = std::mem::replace(&mut conn.a.result, Res::new());
        let failed = !res.error.is_empty();
        sh.results.borrow_mut().push(res);
        count += 1;
        if failed {
            return Some(conn);
        }
        if !conn.a.server_closes && !conn.closed {
            conn.probe_closed();
        }
        if conn.closed || conn.a.server_closes {
            // the server ends keep-alive (e.g. after N requests): reconnect, as a client pool would
            drop(conn);
            conn = connect(&sh).await?;
            started.set(false);
            sh.reconnects.set(sh.reconnects.get() + 1);
        }
        if cfg.mode == "json" {
            if (Instant::now() - t0).as_secs_f64() >= cfg.duration_s {
                return Some(conn);
            }
        } else if count >= cfg.requests {
            return Some(conn);
        }
    }
}

fn tree_pids(roots: &[i64]) -> Vec<i64> {
    let mut children: HashMap<i64, Vec<i64>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|s| s.bytes().all(|c| c.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(close) = memchr::memrchr(b')', &stat) else {
                continue;
            };
            let rest = String::from_utf8_lossy(stat.get(close + 2..).unwrap_or(b""));
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out: Vec<i64> = Vec::new();
    let mut todo: Vec<i64> = roots.to_vec();
    while let Some(pid) = todo.pop() {
        if out.contains(&pid) {
            continue;
        }
        out.push(pid);
        todo.extend(children.get(&pid).into_iter().flatten());
    }
    out
}

/// VmRSS in KiB of each process in the trees under `roots`.
fn rss_kb(roots: &[i64]) -> Map<String, Value> {
    let mut out = Map::new();
    for pid in tree_pids(roots) {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<i64>().ok())
        {
            out.insert(pid.to_string(), json!(kb));
        }
    }
    out
}

/// `urllib.request.urlopen(url, timeout=2)` + `orjson.loads`, for the mock's `/_control`.
async fn get_json(url: &str) -> Value {
    match tokio::time::timeout(Duration::from_secs(2), fetch(url)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => json!({"error": e.to_string()}),
        Err(_) => json!({"error": "timed out"}),
    }
}

async fn fetch(url: &str) -> io::Result<Value> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("<urlopen error unknown url type>"))?;
    let (hostport, path) = match rest.find('/') {
        Some(k) => (&rest[..k], &rest[k..]),
        None => (rest, "/"),
    };
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let mut s = TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    // read until the answer is complete (a keep-alive server need not close: the mock does not)
    let mut raw = Vec::new();
    let (status, body) = loop {
        if let Some(done) = http_answer(&raw, false)? {
            break done;
        }
        raw.reserve(4096);
        if s.read_buf(&mut raw).await? == 0 {
            break http_answer(&raw, true)?.ok_or_else(|| bad("incomplete response"))?;
        }
    };
    if !(200..300).contains(&status) {
        return Err(io::Error::other(format!("HTTP Error {status}")));
    }
    serde_json::from_slice(&body).map_err(|e| bad(&e.to_string()))
}

/// The status and body of a complete HTTP/1.1 answer in `raw` (Content-Length, chunked, or up to the close
/// when `eof`), `None` while incomplete.
fn http_answer(raw: &[u8], eof: bool) -> io::Result<Option<(u16, Vec<u8>)>> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let Some(i) = memmem::find(raw, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = raw[..i].to_ascii_lowercase();
    let status: u16 = std::str::from_utf8(head.get(9..12).unwrap_or(b""))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let body = &raw[i + 4..];
    if memmem::find(&head, b"transfer-encoding: chunked").is_some() {
        let mut out = Vec::new();
        let mut p = 0;
        while let Some(j) = find2(&body[p..], b'\r', b'\n') {
            let line = String::from_utf8_lossy(&body[p..p + j]);
            let hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(hex, 16).map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                return Ok(Some((status, out)));
            }
            if body.len() < p + j + 4 + size {
                break;
            }
            out.extend_from_slice(&body[p + j + 2..p + j + 2 + size]);
            p += j + 4 + size;
        }
        return Ok(eof.then_some((status, out)));
    }
    if let Some(j) = memmem::find(&head, b"content-length:") {
        let rest = &head[j + 15..];
        let end = find2(rest, b'\r', b'\n').unwrap_or(rest.len());
        let n: usize = std::str::from_utf8(&rest[..end])
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| bad("bad content-length"))?;
        return Ok((body.len() >= n).then(|| (status, body[..n].to_vec())));
    }
    Ok(eof.then(|| (status, body.to_vec())))
}

async fn sampler(
    sh: Rc<Shared>,
    pids: Vec<i64>,
    after: Vec<f64>,
    url: String,
    samples: Rc<RefCell<Vec<Value>>>,
) {
    if !sh.all_sent_flag.get() {
        sh.all_sent.notified().await;
    }
    let t_sent = Instant::now();
    for delay in after {
        let due = t_sent + Duration::from_secs_f64(delay.max(0.0));
        tokio::time::sleep_until(due.into()).await;
        let open_heads = sh.started.iter().filter(|c| c.get()).count();
        let mut sample = Map::new();
        sample.insert("after_s".into(), json!(delay));
        sample.insert("rss_kb".into(), Value::Object(rss_kb(&pids)));
        sample.insert("answers_started".into(), json!(open_heads));
        if !url.is_empty() {
            sample.insert("upstream".into(), get_json(&url).await);
        }
        samples.borrow_mut().push(Value::Object(sample));
    }
}

/// `pct` of loadgen.py: nearest rank, the rank rounded as Python's `round` (half to even).
fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let last = sorted.len() - 1;
    let k = (q / 100.0 * last as f64).round_ties_even().max(0.0) as usize;
    sorted[k.min(last)]
}

fn ms_stats(values: impl Iterator<Item = f64>) -> Value {
    let mut v: Vec<f64> = values.map(|x| x * 1000.0).collect();
    v.sort_by(f64::total_cmp);
    let mean = if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    };
    json!({
        "n": v.len(),
        "p50": pct(&v, 50.0),
        "p90": pct(&v, 90.0),
        "p99": pct(&v, 99.0),
        "p999": pct(&v, 99.9),
        "max": v.last().copied().unwrap_or(f64::NAN),
        "mean": mean,
    })
}

/// This process's user + system CPU seconds.
fn cpu_s() -> f64 {
    // SAFETY: getrusage only writes the struct passed.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn build_request(host: &str, port: i64, path: &str, body: &[u8], headers: &[String]) -> Vec<u8> {
    let mut lines = vec![
        format!("POST {path} HTTP/1.1"),
        format!("Host: {host}:{port}"),
        "Content-Type: application/json".to_string(),
        format!("Content-Length: {}", body.len()),
        "Connection: keep-alive".to_string(),
    ];
    lines.extend(headers.iter().cloned());
    let mut out = (lines.join("\r\n") + "\r\n\r\n").into_bytes();
    out.extend_from_slice(body);
    out
}

/// `--trace`: the answers in the order they were sent, one line each, for a timeline of a run.
fn write_trace(path: &str, t0: Instant, results: &[Res]) -> io::Result<()> {
    let mut rows: Vec<&Res> = results.iter().collect();
    rows.sort_by_key(|r| r.sent);
    let mut out = String::from("sent_s ttft_ms max_gap_ms error\n");
    for r in rows {
        let sent = r
            .sent
            .map_or(f64::NAN, |t| t.saturating_duration_since(t0).as_secs_f64());
        let gap = r.gaps.iter().copied().fold(0.0, f64::max);
        let err = if r.error.is_empty() { "-" } else { &r.error };
        out += &format!("{sent:.4} {:.3} {:.3} {err}\n", r.ttft * 1e3, gap * 1e3);
    }
    std::fs::write(path, out)
}

const OPTS: &[Opt] = &[
    opt("host", "127.0.0.1", ""),
    required("port"),
    opt("path", "/v1/chat/completions", ""),
    opt("body", "", ""),
    opt("body-file", "", ""),
    Opt {
        name: "header",
        kind: Kind::Append,
        default: None,
        help: "an extra request header line, e.g. 'Authorization: Bearer x'",
    },
    opt("mode", "stream", "stream, json or idle"),
    opt("streams", "64", "concurrent connections"),
    opt(
        "requests",
        "1",
        "answers per connection (stream and idle modes)",
    ),
    opt(
        "duration-s",
        "5.0",
        "json mode: how long each connection loops",
    ),
    opt("ramp-ms", "0.0", "spread the first requests over this long"),
    opt("timeout-s", "60.0", "hard limit for the whole run"),
    opt(
        "pace-ms",
        "0.0",
        "the upstream's pace, to count late chunks",
    ),
    opt("first-token-ms", "0.0", ""),
    opt(
        "late-ms",
        "100.0",
        "a chunk is late this long beyond its pace",
    ),
    Opt {
        name: "sample-pids",
        kind: Kind::Many,
        default: Some(""),
        help: "",
    },
    Opt {
        name: "sample-after-s",
        kind: Kind::Many,
        default: Some("2.0"),
        help: "",
    },
    opt(
        "sample-url",
        "",
        "GET this (JSON) with each sample, e.g. the mock's /_control",
    ),
    opt(
        "cut-s",
        "0.0",
        "stop after this long; unfinished answers count as cut",
    ),
    opt("out", "", ""),
    opt(
        "trace",
        "",
        "write one line per answer here: sent at (s from the start), TTFT and longest gap (ms), error",
    ),
];

fn main() -> io::Result<()> {
    let args = Args::parse(
        "The benchmarks' load generator (compiled): a raw HTTP/1.1 client on tokio's current-thread runtime.",
        OPTS,
    );
    let mode = args.str("mode").to_string();
    if !["stream", "json", "idle"].contains(&mode.as_str()) {
        args.error(&format!(
            "argument --mode: invalid choice: '{mode}' (choose from 'stream', 'json', 'idle')"
        ));
    }
    let (body_arg, body_file) = (args.str("body"), args.str("body-file"));
    if body_arg.is_empty() && body_file.is_empty() {
        args.error("--body or --body-file is needed");
    }
    let streams = args.i64("streams");
    let requests = args.i64("requests");
    let duration_s = args.f64("duration-s");
    let ramp_ms = args.f64("ramp-ms");
    let timeout_s = args.f64("timeout-s");
    let pace_ms = args.f64("pace-ms");
    let first_token_ms = args.f64("first-token-ms");
    let late_ms = args.f64("late-ms");
    let sample_pids = args.i64s("sample-pids");
    let sample_after_s = args.f64s("sample-after-s");
    let sample_url = args.str("sample-url").to_string();
    let cut_s = args.f64("cut-s");
    let host = args.str("host").to_string();
    let port = args.i64("port");
    raise_nofile();

    let body = if body_arg.is_empty() {
        std::fs::read(body_file)?
    } else {
        body_arg.as_bytes().to_vec()
    };
    let request = build_request(&host, port, args.str("path"), &body, args.list("header"));
    let addr = args.socket_addr()?;
    let n = streams.max(0) as usize;
    let sh = Rc::new(Shared {
        cfg: Config {
            addr,
            request,
            sse: mode != "json",
            mode: mode.clone(),
            requests,
            duration_s,
            ramp_ms,
            cut: cut_s != 0.0,
        },
        results: RefCell::new(Vec::with_capacity(n)),
        connect_errors: RefCell::new(Vec::new()),
        started: (0..n).map(|_| Cell::new(false)).collect(),
        sent: Cell::new(0),
        reconnects: Cell::new(0),
        all_sent: Notify::new(),
        all_sent_flag: Cell::new(false),
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let summary = local.block_on(&rt, async {
        let t_connect = Instant::now();
        let conns = open_conns(&sh, n, 200).await;
        let connect_s = t_connect.elapsed().as_secs_f64();
        let connected = conns.iter().filter(|c| c.is_some()).count();
        let t0 = Instant::now();
        let limit = if cut_s != 0.0 {
            cut_s.min(timeout_s)
        } else {
            timeout_s
        };
        let deadline = t0 + Duration::from_secs_f64(limit.max(0.0));
        let samples = Rc::new(RefCell::new(Vec::new()));
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, c)| tokio::task::spawn_local(drive(sh.clone(), i, n, c, t0, deadline)))
            .collect();
        let sample_task = (!sample_pids.is_empty()).then(|| {
            tokio::task::spawn_local(sampler(
                sh.clone(),
                sample_pids.clone(),
                sample_after_s.clone(),
                sample_url.clone(),
                samples.clone(),
            ))
        });
        let mut keep = Vec::with_capacity(n);
        for h in handles {
            keep.push(h.await.ok().flatten());
        }
        let t_end = Instant::now();
        if let Some(task) = sample_task {
            task.abort();
            let _ = task.await;
        }
        drop(keep); // every connection closes now, once all are done
        let trace = args.str("trace");
        if !trace.is_empty() {
            if let Err(e) = write_trace(trace, t0, &sh.results.borrow()) {
                eprintln!("loadgen: --trace {trace}: {e}");
                std::process::exit(1);
            }
        }

        let wall = (t_end - t0).as_secs_f64();
        let results = sh.results.borrow();
        let ok: Vec<&Res> = results.iter().filter(|r| r.error.is_empty()).collect();
        let cut = results.iter().filter(|r| r.error == "cut").count();
        let mut errors: Vec<String> = results
            .iter()
            .filter(|r| !r.error.is_empty() && r.error != "cut")
            .map(|r| r.error.clone())
            .collect();
        errors.extend(sh.connect_errors.borrow().iter().cloned());
        let mut error_samples: Vec<String> = errors.clone();
        error_samples.sort();
        error_samples.dedup();
        error_samples.truncate(5);
        let events: u64 = results.iter().map(|r| r.events).sum(); // cut answers' events count too
        let late_limit = (pace_ms != 0.0).then(|| (pace_ms + late_ms) / 1000.0);
        let late_streams = ok
            .iter()
            .filter(|r| {
                late_limit
                    .is_some_and(|l| r.gaps.iter().copied().fold(f64::NEG_INFINITY, f64::max) > l)
            })
            .count();
        let late_first = ok
            .iter()
            .filter(|r| late_limit.is_some() && r.ttft > (first_token_ms + late_ms) / 1000.0 + 0.0)
            .count();
        let rate = |x: f64| if wall > 0.0 { x / wall } else { 0.0 };
        json!({
            "mode": mode,
            "streams": streams,
            "requests_per_conn": requests,
            "connected": connected,
            "connect_s": connect_s,
            "wall_s": wall,
            "answers": results.len(),
            "ok": ok.len(),
            "errors": errors.len(),
            "cut": cut,
            "error_samples": error_samples,
            "events": events,
            "events_per_s": rate(events as f64),
            "requests_per_s": rate(ok.len() as f64),
            "ttft_ms": ms_stats(ok.iter().filter(|r| r.ttft >= 0.0).map(|r| r.ttft)),
            "gap_ms": ms_stats(ok.iter().flat_map(|r| r.gaps.iter().copied())),
            "latency_ms": ms_stats(ok.iter().map(|r| r.latency)),
            "reconnects": sh.reconnects.get(),
            "late_streams": late_streams,
            "late_first": late_first,
            "samples": samples.take(),
            "client_cpu_s": cpu_s(),
        })
    });
    let data = serde_json::to_vec_pretty(&summary).map_err(io::Error::other)?;
    let out = args.str("out");
    if out.is_empty() {
        let mut stdout = io::stdout().lock();
        stdout.write_all(&data)?;
        stdout.write_all(b"\n")?;
    } else {
        std::fs::write(out, data)?;
    }
    Ok(())
}
