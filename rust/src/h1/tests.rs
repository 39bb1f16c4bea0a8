use proptest::prelude::*;

use super::*;

fn head(raw: &[u8]) -> Head {
    parse_head(raw, false).unwrap().unwrap()
}

/// Decodes `wire` split at `cuts`; the payload, the bytes taken, and whether the body completed.
fn decode_split(
    framing: Framing,
    wire: &[u8],
    cuts: &[usize],
) -> Result<(Vec<u8>, usize, bool), H1Error> {
    let mut dec = BodyDecoder::new(framing);
    let mut out = Vec::new();
    let mut taken = 0;
    let mut start = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    bounds.sort_unstable();
    bounds.push(wire.len());
    for end in bounds {
        if end < start || dec.done() {
            continue;
        }
        let part = &wire[start..end];
        let n = dec.decode(part, |r| out.extend_from_slice(&part[r]))?;
        taken += n;
        start = end;
    }
    Ok((out, taken, dec.done()))
}

fn chunked(pieces: &[Vec<u8>]) -> Vec<u8> {
    let mut wire = Vec::new();
    for p in pieces {
        write_chunk(&mut wire, p.len(), |o| o.extend_from_slice(p));
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    wire
}

#[test]
fn chunked_head_and_keep_alive() {
    let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nrest";
    let h = head(raw);
    assert_eq!(h.status, 200);
    assert_eq!(h.reason, "OK");
    assert_eq!(h.framing, Framing::Chunked);
    assert!(h.keep_alive);
    assert_eq!(&raw[h.len..], b"rest");
    assert_eq!(
        h.headers[0],
        ("Content-Type".to_owned(), "text/event-stream".to_owned())
    );
}

#[test]
fn framing_rules() {
    assert_eq!(
        head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n").framing,
        Framing::Length(12)
    );
    assert_eq!(
        head(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n").framing,
        Framing::Length(3)
    );
    // Transfer-Encoding wins over Content-Length; a final coding other than chunked reads to the close.
    let h =
        head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
    assert_eq!(h.framing, Framing::Chunked);
    let h = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
    assert_eq!(h.framing, Framing::Close);
    assert!(!h.keep_alive);
    assert_eq!(
        head(b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n").framing,
        Framing::Empty
    );
    assert_eq!(
        parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true)
            .unwrap()
            .unwrap()
            .framing,
        Framing::Empty
    );
    // No length at all: the body ends with the connection.
    let h = head(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n");
    assert_eq!(
        (h.framing, h.keep_alive, h.minor_version),
        (Framing::Close, false, 0)
    );
}

#[test]
fn connection_header() {
    assert!(!head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").keep_alive);
    assert!(
        head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n").keep_alive
    );
    assert!(!head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive);
}

#[test]
fn interim_responses_are_skipped() {
    let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok";
    let h = head(raw);
    assert_eq!(h.status, 201);
    assert_eq!(&raw[h.len..], b"ok");
}

#[test]
fn partial_and_bad_heads() {
    assert_eq!(
        parse_head(b"HTTP/1.1 200 OK\r\nContent-Le", false),
        Ok(None)
    );
    assert_eq!(parse_head(b"", false), Ok(None));
    assert!(matches!(
        parse_head(b"\x16\x03\x01 SSH-2.0 garbage\r\n\r\n", false),
        Err(H1Error::Head(_))
    ));
    assert_eq!(
        parse_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            false
        ),
        Err(H1Error::ContentLength)
    );
    assert_eq!(
        parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false),
        Err(H1Error::ContentLength)
    );
    let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'x', MAX_HEAD_BYTES + 1));
    assert_eq!(parse_head(&big, false), Err(H1Error::HeadTooLarge));
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(parse_head(&many, false), Err(H1Error::HeadTooLarge));
}

#[test]
fn chunked_body_with_extensions_and_trailer() {
    let wire = b"5;name=value\r\nhello\r\n6 \r\n world\r\n0\r\nX-Trailer: yes\r\n\r\nNEXT";
    let (out, taken, done) = decode_split(Framing::Chunked, wire, &[]).unwrap();
    assert_eq!(out, b"hello world");
    assert!(done);
    assert_eq!(&wire[taken..], b"NEXT");
}

#[test]
fn lenient_bare_lf_but_not_clean() {
    let mut dec = BodyDecoder::new(Framing::Chunked);
    let mut out = Vec::new();
    let wire = b"3\nabc\n";
    dec.decode(wire, |r| out.extend_from_slice(&wire[r]))
        .unwrap();
    assert_eq!(out, b"abc");
    assert!(!dec.clean());
}

#[test]
fn clean_only_from_boundary_to_boundary() {
    let mut dec = BodyDecoder::new(Framing::Chunked);
    let mut sink = |_r: Range<usize>| {};
    dec.decode(b"3\r\nabc\r\n4\r\ndefg\r\n", &mut sink).unwrap();
    assert!(dec.clean() && dec.at_boundary());
    dec.decode(b"A\r\n01234", &mut sink).unwrap(); // ends inside a chunk
    assert!(!dec.clean() && !dec.at_boundary());
    dec.decode(b"56789\r\n", &mut sink).unwrap(); // starts inside one
    assert!(!dec.clean() && dec.at_boundary());
    dec.decode(b"1\r\nz\r\n", &mut sink).unwrap();
    assert!(dec.clean());
    dec.decode(b"0\r\n\r\n", &mut sink).unwrap(); // the last chunk is the client's framing to write, not ours
    assert!(!dec.clean() && dec.done());
}

#[test]
fn chunked_errors() {
    for wire in [
        &b"zz\r\n"[..],
        b"3\r\nabcX",
        b"3\r\nabc\rX",
        b"\r\n",
        b"FFFFFFFFFFFFFFFFFF\r\n",
    ] {
        assert!(
            decode_split(Framing::Chunked, wire, &[]).is_err(),
            "{wire:?}"
        );
    }
}

#[test]
fn length_and_close_bodies() {
    let (out, taken, done) = decode_split(Framing::Length(5), b"hello, extra", &[2]).unwrap();
    assert_eq!((out.as_slice(), taken, done), (&b"hello"[..], 5, true));
    let mut dec = BodyDecoder::new(Framing::Length(0));
    assert!(dec.done());
    assert_eq!(dec.decode(b"x", |_| {}), Ok(0));
    let mut dec = BodyDecoder::new(Framing::Close);
    let mut out = Vec::new();
    dec.decode(b"all of it", |r| out.extend_from_slice(&b"all of it"[r]))
        .unwrap();
    assert!(!dec.done());
    assert_eq!(dec.finish_on_close(), Ok(()));
    assert!(dec.done() && out == b"all of it");
}

#[test]
fn incomplete_body_on_close() {
    let mut dec = BodyDecoder::new(Framing::Chunked);
    dec.decode(b"5\r\nhel", |_| {}).unwrap();
    assert_eq!(dec.finish_on_close(), Err(H1Error::Incomplete));
    let mut dec = BodyDecoder::new(Framing::Length(10));
    dec.decode(b"short", |_| {}).unwrap();
    assert_eq!(dec.finish_on_close(), Err(H1Error::Incomplete));
}

#[test]
fn write_chunk_framing() {
    let mut out = Vec::new();
    write_chunk(&mut out, 0, |_| {});
    assert!(out.is_empty());
    write_chunk(&mut out, 300, |o| o.extend(std::iter::repeat_n(b'a', 300)));
    assert!(out.starts_with(b"12c\r\naaa") && out.ends_with(b"a\r\n"));
}

#[test]
fn a_request_head_in_any_split() {
    let wire = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nAuthorization: Bearer k \r\n\r\n{\"model\":12}";
    for cut in 0..wire.len() - 12 {
        assert_eq!(
            parse_request_head(&wire[..cut]).unwrap(),
            None,
            "cut at {cut}"
        );
    }
    let h = parse_request_head(wire).unwrap().unwrap();
    assert_eq!(
        (h.method.as_str(), h.target.as_str(), h.minor_version),
        ("POST", "/v1/chat/completions", 1)
    );
    assert_eq!(h.len, wire.len() - 12);
    assert_eq!(h.content_length, Some(12));
    assert_eq!(
        h.headers[2],
        ("Authorization".to_owned(), "Bearer k".to_owned())
    );
    assert!(h.keep_alive && !h.unusual);
}

#[test]
fn request_heads_the_front_end_leaves_to_aiohttp() {
    let head = |s: &str| parse_request_head(s.as_bytes());
    let chunked = head("POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(chunked.unusual && chunked.content_length.is_none());
    assert!(
        head("POST /v1/x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
            .unwrap()
            .unwrap()
            .unusual
    );
    assert!(!head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().keep_alive);
    assert!(
        !head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap()
            .keep_alive
    );
    // Smuggling shapes and garbage are errors (the front end hands them to aiohttp, which answers 400).
    assert_eq!(
        head("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
        Err(H1Error::ContentLength)
    );
    assert_eq!(
        head("POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n"),
        Err(H1Error::ContentLength)
    );
    assert!(matches!(
        head("\x16\x03\x01 tls hello\r\n\r\n"),
        Err(H1Error::Head(_))
    ));
    let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
    assert_eq!(head(&big), Err(H1Error::HeadTooLarge));
}

proptest! {
    /// Any chunking of any payload, read in any split, decodes to the payload and stops at the body's end.
    #[test]
    fn any_split_decodes_the_payload(
        pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..12),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
        tail in proptest::collection::vec(any::<u8>(), 0..20),
    ) {
        let mut wire = chunked(&pieces);
        let end = wire.len();
        wire.extend_from_slice(&tail);
        let (out, taken, done) = decode_split(Framing::Chunked, &wire, &cuts).unwrap();
        prop_assert_eq!(out, pieces.concat());
        prop_assert!(done);
        prop_assert_eq!(taken, end);
    }

    /// Arbitrary bytes never panic the decoder.
    #[test]
    fn arbitrary_bytes_are_an_error_or_a_payload(wire in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_split(Framing::Chunked, &wire, &[7, 31]);
        let _ = parse_head(&wire, false);
        let _ = parse_request_head(&wire);
    }
}
