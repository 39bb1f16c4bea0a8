//! The data plane over real loopback sockets: what reaches the client, how a relay ends, and backpressure.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use super::*;
use crate::api::Api;
use crate::h1::Framing;

/// A connected pair of loopback TCP sockets: (ours, the peer).
fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (peer, _) = listener.accept().unwrap();
    ours.set_nonblocking(true).unwrap();
    (ours, peer)
}

fn chat_meter(framing: Framing, client_chunked: bool) -> SharedMeter {
    let mut m = Metered::new(StreamMeter::new(Api::Chat, "gpt-4o", false));
    let mut wire = Framed::new(framing);
    wire.set_client_chunked(client_chunked);
    m.wire = Some(wire);
    Arc::new(Mutex::new(m))
}

fn delta(i: usize) -> String {
    format!("data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}}}}]}}\n\n")
}

fn chunk(payload: &str) -> String {
    format!("{:x}\r\n{payload}\r\n", payload.len())
}

/// Waits for the next finished relay (of a test that has one at a time).
fn next_done(plane: &Plane) -> Done {
    let mut done = wait_done(plane);
    assert_eq!(done.len(), 1);
    done.remove(0)
}

/// Waits for relays to finish: those that did.
fn wait_done(plane: &Plane) -> Vec<Done> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let done = plane.completed();
        if !done.is_empty() {
            return done;
        }
        assert!(Instant::now() < deadline, "no relay finished within 10 s");
        let mut fds = libc::pollfd {
            fd: plane.notify_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut fds, 1, 100) };
    }
}

/// Reads from `peer` until `want` bytes came (or 10 s passed).
fn read_n(peer: &mut TcpStream, want: usize) -> Vec<u8> {
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = vec![0; want];
    let mut at = 0;
    while at < want {
        match peer.read(&mut got[at..]) {
            Ok(0) => panic!("closed after {at} of {want} bytes"),
            Ok(n) => at += n,
            Err(e) => panic!(
                "{e} after {at} of {want} bytes: {:?}",
                String::from_utf8_lossy(&got[at.saturating_sub(120)..at])
            ),
        }
    }
    got
}

/// The payload of chunked framing (whole chunks; the terminating chunk is the owner's to write, not the relay's).
fn unchunk(mut wire: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while !wire.is_empty() {
        let line = wire.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&wire[..line]).ok()?, 16).ok()?;
        let start = line + 2;
        if wire.len() < start + size + 2 {
            return None;
        }
        out.extend_from_slice(&wire[start..start + size]);
        wire = &wire[start + size + 2..];
    }
    Some(out)
}

/// Reads chunked framing from `peer` until its payload is `want` (10 s at most).
fn read_payload(peer: &mut TcpStream, want: &str) -> String {
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut wire = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(payload) = unchunk(&wire) {
            if payload.len() >= want.len() {
                return String::from_utf8(payload).unwrap();
            }
        }
        match peer.read(&mut buf) {
            Ok(0) => panic!("closed after {} bytes", wire.len()),
            Ok(n) => wire.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{e} after {} bytes", wire.len()),
        }
    }
}

fn set_buffer(s: &TcpStream, opt: libc::c_int, size: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket and an int option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
}

/// A relay of `meter` between two new loopback connections: (its ticket, the owner's two sockets, the
/// upstream's peer, the client's peer).
fn start(
    plane: &Plane,
    meter: SharedMeter,
    high: usize,
) -> (Arc<Ticket>, Owners, TcpStream, TcpStream) {
    let (up, upstream) = pair();
    let (client, peer) = pair();
    let ticket = plane
        .relay(meter, owned(&up), owned(&client), high)
        .unwrap();
    (ticket, (up, client), upstream, peer)
}

fn owned(s: &TcpStream) -> OwnedFd {
    s.try_clone().unwrap().into()
}

#[test]
fn a_chunked_stream_reaches_the_client_unchanged_and_metered() {
    let plane = Plane::start().unwrap();
    let (up, mut upstream) = pair();
    let (client, mut peer) = pair();
    let meter = chat_meter(Framing::Chunked, true);
    let ticket = plane
        .relay(meter.clone(), owned(&up), owned(&client), 64 * 1024)
        .unwrap();
    let mut sent = String::new();
    for i in 0..20 {
        upstream.write_all(chunk(&delta(i)).as_bytes()).unwrap();
        sent.push_str(&delta(i));
        if i % 5 == 0 {
            std::thread::sleep(Duration::from_millis(2)); // several reads, not one
        }
    }
    upstream
        .write_all((chunk("data: [DONE]\n\n") + "0\r\n\r\n").as_bytes())
        .unwrap();
    sent.push_str("data: [DONE]\n\n");
    assert_eq!(read_payload(&mut peer, &sent), sent);
    let done = next_done(&plane);
    assert_eq!(done.id, ticket.id);
    assert_eq!(done.end, End::Body { reusable: true });
    assert!(done.rest.is_empty());
    let m = lock(&meter);
    assert!(m.core.done());
    assert_eq!(m.core.events(), 21);
    assert!(m.first_token_ns.is_some());
    // The thread's duplicates are closed; ours still work (the connection can be reused).
    drop(m);
    upstream.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    up.set_nonblocking(false).unwrap();
    (&up).read_exact(&mut one).unwrap();
    assert_eq!(&one, b"x");
}

#[test]
fn an_unchunked_client_gets_the_bare_payload() {
    let plane = Plane::start().unwrap();
    let (up, mut upstream) = pair();
    let (client, mut peer) = pair();
    let _ticket = plane
        .relay(
            chat_meter(Framing::Chunked, false),
            owned(&up),
            owned(&client),
            1024,
        )
        .unwrap();
    let body = delta(1) + "data: [DONE]\n\n";
    upstream
        .write_all((chunk(&delta(1)) + &chunk("data: [DONE]\n\n") + "0\r\n\r\n").as_bytes())
        .unwrap();
    assert_eq!(read_n(&mut peer, body.len()), body.as_bytes());
    assert_eq!(next_done(&plane).end, End::Body { reusable: true });
}

#[test]
fn a_slow_client_holds_the_upstream_back_and_loses_nothing() {
    let plane = Plane::start().unwrap();
    let (up, mut upstream) = pair();
    let (client, mut peer) = pair();
    let events: Vec<String> = (0..40_000).map(delta).collect();
    let body: String = events.concat() + "data: [DONE]\n\n";
    let meter = chat_meter(Framing::Length(body.len() as u64), false);
    let high = 16 * 1024;
    // Small kernel buffers on the client's side, so what the relay holds shows within a few MB.
    client.set_nodelay(true).unwrap();
    set_buffer(&client, libc::SO_SNDBUF, 16 * 1024);
    set_buffer(&peer, libc::SO_RCVBUF, 64 * 1024);
    let ticket = plane
        .relay(meter, owned(&up), owned(&client), high)
        .unwrap();
    let writer = {
        let body = body.clone();
        std::thread::spawn(move || upstream.write_all(body.as_bytes()).map(|()| upstream))
    };
    // The client reads nothing for a while: the relay keeps at most `high` plus one read for it.
    std::thread::sleep(Duration::from_millis(300));
    let held = ticket.buffered();
    assert!(held > 0, "nothing waits for a client that reads nothing");
    assert!(held <= high + READ_BUF, "{held} bytes held for the client");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        ticket.buffered(),
        held,
        "the upstream was read on while the client was full"
    );
    let reader = {
        let want = body.len();
        std::thread::spawn(move || read_n(&mut peer, want))
    };
    let done = next_done(&plane);
    assert_eq!(done.end, End::Body { reusable: true });
    // What the relay had not written when the body ended is the owner's to write, in order.
    let mut client = client;
    client.set_nonblocking(false).unwrap();
    client.write_all(&done.rest).unwrap();
    assert!(
        reader.join().unwrap() == body.as_bytes(),
        "the client's bytes differ from the upstream's"
    );
    drop(writer.join().unwrap().unwrap());
}

#[test]
fn an_upstream_that_closes_early_breaks_the_relay() {
    let plane = Plane::start().unwrap();
    let (_ticket, _owners, mut upstream, mut peer) =
        start(&plane, chat_meter(Framing::Chunked, true), 1024);
    upstream.write_all(chunk(&delta(0)).as_bytes()).unwrap();
    assert_eq!(read_payload(&mut peer, &delta(0)), delta(0));
    drop(upstream);
    let done = next_done(&plane);
    assert!(
        matches!(&done.end, End::Broken(m) if m.contains("closed before the body")),
        "{:?}",
        done.end
    );
}

#[test]
fn a_body_read_to_the_close_ends_at_the_close() {
    let plane = Plane::start().unwrap();
    let (_ticket, _owners, mut upstream, mut peer) =
        start(&plane, chat_meter(Framing::Close, false), 1024);
    let body = delta(0) + "data: [DONE]\n\n";
    upstream.write_all(body.as_bytes()).unwrap();
    drop(upstream);
    assert_eq!(read_n(&mut peer, body.len()), body.as_bytes());
    assert_eq!(next_done(&plane).end, End::Body { reusable: false });
}

#[test]
fn malformed_framing_ends_the_relay() {
    let plane = Plane::start().unwrap();
    let (_ticket, _owners, mut upstream, _peer) =
        start(&plane, chat_meter(Framing::Chunked, true), 1024);
    upstream.write_all(b"zz\r\nnot chunked\r\n").unwrap();
    assert!(matches!(next_done(&plane).end, End::Malformed(_)));
}

#[test]
fn after_cancel_nothing_more_is_metered_or_written() {
    let plane = Plane::start().unwrap();
    let (up, mut upstream) = pair();
    let (client, mut peer) = pair();
    let meter = chat_meter(Framing::Chunked, true);
    let ticket = plane
        .relay(meter.clone(), owned(&up), owned(&client), 1024)
        .unwrap();
    upstream.write_all(chunk(&delta(0)).as_bytes()).unwrap();
    assert_eq!(read_payload(&mut peer, &delta(0)), delta(0));
    assert!(plane.cancel(&ticket).is_empty()); // the client had taken everything
    let events = lock(&meter).core.events();
    upstream.write_all(chunk(&delta(1)).as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        plane.completed().is_empty(),
        "a cancelled relay reported an end"
    );
    assert_eq!(lock(&meter).core.events(), events);
    peer.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(matches!(peer.read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
}

#[test]
fn a_client_that_went_away_ends_the_relay() {
    let plane = Plane::start().unwrap();
    let (_ticket, (_up, client), mut upstream, peer) =
        start(&plane, chat_meter(Framing::Chunked, true), 1024);
    drop(peer);
    drop(client); // (the owner's own descriptor closes too, as the event loop's would)
    let mut ended = None;
    for i in 0..200 {
        if upstream.write_all(chunk(&delta(i)).as_bytes()).is_err() {
            break;
        }
        if let Some(done) = plane.completed().pop() {
            ended = Some(done);
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let done = ended.unwrap_or_else(|| next_done(&plane));
    assert!(matches!(done.end, End::ClientGone(_)), "{:?}", done.end);
    assert!(done.rest.is_empty());
}

#[test]
fn many_streams_at_once_each_arrive_whole() {
    let plane = Plane::start().unwrap();
    let mut streams = Vec::new();
    for _ in 0..32 {
        let (up, upstream) = pair();
        let (client, peer) = pair();
        let t = plane
            .relay(
                chat_meter(Framing::Chunked, true),
                owned(&up),
                owned(&client),
                4096,
            )
            .unwrap();
        streams.push((t, up, client, upstream, peer));
    }
    let expect: String = (0..10).map(delta).collect();
    for round in 0..10 {
        for s in &mut streams {
            s.3.write_all(chunk(&delta(round)).as_bytes()).unwrap();
        }
    }
    for s in &mut streams {
        s.3.write_all(b"0\r\n\r\n").unwrap();
    }
    for s in &mut streams {
        assert_eq!(read_payload(&mut s.4, &expect), expect);
    }
    let mut ids: Vec<u64> = Vec::new();
    while ids.len() < streams.len() {
        for done in wait_done(&plane) {
            assert_eq!(done.end, End::Body { reusable: true });
            ids.push(done.id);
        }
    }
    ids.sort_unstable();
    let mut want: Vec<u64> = streams.iter().map(|s| s.0.id).collect();
    want.sort_unstable();
    assert_eq!(ids, want);
}

/// The owner's two sockets (kept open, as the event loop's transports are).
type Owners = (TcpStream, TcpStream);

/// A relay whose client has stopped reading, holding bytes for it: (plane, ticket, upstream's peer, client's
/// peer, the body the upstream sends, the owner's sockets).
fn stalled_relay() -> (Plane, Arc<Ticket>, TcpStream, TcpStream, String, Owners) {
    let plane = Plane::start().unwrap();
    let (up, upstream) = pair();
    let (client, peer) = pair();
    client.set_nodelay(true).unwrap();
    set_buffer(&client, libc::SO_SNDBUF, 16 * 1024);
    set_buffer(&peer, libc::SO_RCVBUF, 16 * 1024);
    let body: String = (0..20_000).map(delta).collect();
    let meter = chat_meter(Framing::Length(body.len() as u64 + 100), false);
    let ticket = plane
        .relay(meter, owned(&up), owned(&client), 16 * 1024)
        .unwrap();
    (plane, ticket, upstream, peer, body, (up, client))
}

#[test]
fn cancel_hands_back_the_held_bytes_and_nothing_is_written_after_it() {
    let (plane, ticket, mut upstream, mut peer, body, _owners) = stalled_relay();
    let writer = {
        let body = body.clone();
        std::thread::spawn(move || {
            let _ = upstream.write_all(body.as_bytes()); // (blocks once the relay stops reading)
            upstream
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while ticket.buffered() == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing was held for the stalled client"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(50));
    let rest = plane.cancel(&ticket);
    assert!(!rest.is_empty());
    // The client now reads all it can: what it got before the cancel, then the held bytes, is a prefix of the
    // body, in order, with nothing after it.
    peer.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = peer.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got.extend_from_slice(&rest);
    assert!(got.len() < body.len());
    assert!(
        body.as_bytes().starts_with(&got),
        "the client's bytes and the held ones are not the body's prefix"
    );
    assert!(plane.completed().is_empty());
    drop(peer); // (lets the writer's blocked write fail)
    drop(writer);
}

#[test]
fn an_upstream_reset_while_the_client_is_full_costs_no_cpu_and_ends_the_relay() {
    let (plane, ticket, upstream, mut peer, body, _owners) = stalled_relay();
    let mut upstream = upstream;
    upstream.set_nonblocking(true).unwrap();
    let _ = upstream.write(body.as_bytes()); // as much as the sockets take: the relay stops reading
    let deadline = Instant::now() + Duration::from_secs(10);
    while ticket.buffered() <= 16 * 1024 {
        assert!(Instant::now() < deadline, "the relay did not fill up");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A reset (linger 0): the upstream socket has an error pending while the relay does not read it.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger value.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            upstream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(upstream);
    let cpu = plane.thread_cpu_ns();
    std::thread::sleep(Duration::from_millis(300));
    let spent = plane.thread_cpu_ns() - cpu;
    assert!(
        spent < 50_000_000,
        "the plane thread spent {} ms of CPU while waiting",
        spent / 1_000_000
    );
    // The client reads again: the relay reads the upstream again and finds the reset.
    peer.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    let done = loop {
        let _ = peer.read(&mut buf);
        if let Some(done) = plane.completed().pop() {
            break done;
        }
        assert!(Instant::now() < deadline, "the reset never ended the relay");
    };
    assert!(matches!(&done.end, End::Broken(_)), "{:?}", done.end);
}

#[test]
fn stopping_the_plane_ends_every_relay_and_refuses_new_ones() {
    let plane = Plane::start().unwrap();
    let (up, _upstream) = pair();
    let (client, _peer) = pair();
    let ticket = plane
        .relay(
            chat_meter(Framing::Chunked, true),
            owned(&up),
            owned(&client),
            1024,
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    plane.stop();
    let done = plane.completed();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].id, ticket.id);
    assert!(matches!(&done[0].end, End::Broken(m) if m.contains("stopped")));
    let again = plane.relay(
        chat_meter(Framing::Chunked, true),
        owned(&up),
        owned(&client),
        1024,
    );
    assert!(again.is_err());
}
