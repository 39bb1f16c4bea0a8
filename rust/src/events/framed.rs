//! The upstream's wire bytes through a [`StreamMeter`]: the body framing decoded, the payload metered, and what
//! the client is to be sent — the read itself when it can go out as it came.

use std::ops::Range;

use super::StreamMeter;
use crate::h1::{write_chunk, BodyDecoder, Framing, H1Error};

/// One streamed response's framing, between the upstream's reads and the client's writes.
#[derive(Debug)]
pub struct Framed {
    dec: BodyDecoder,
    /// The output is chunked framing for the client (else the bare payload).
    client_chunked: bool,
    excess: bool,
    /// Scratch: the payload ranges of the current read.
    ranges: Vec<Range<usize>>,
}

impl Framed {
    /// The framing of a body delimited by `framing`; output unframed until [`Framed::set_client_chunked`].
    pub fn new(framing: Framing) -> Self {
        Framed {
            dec: BodyDecoder::new(framing),
            client_chunked: false,
            excess: false,
            ranges: Vec::new(),
        }
    }

    /// Whether the output is chunked framing for the client.
    pub fn client_chunked(&self) -> bool {
        self.client_chunked
    }

    /// Sets whether the output is chunked framing for the client.
    pub fn set_client_chunked(&mut self, chunked: bool) {
        self.client_chunked = chunked;
    }

    /// Feeds one upstream read. `None`: send `data` to the client as it is — a run of whole plain chunks
    /// (chunked client) or a bare payload (unframed client), unedited by the meter. Else the bytes to send
    /// instead, framed for the client: the last chunk, a read that ends inside a chunk, an edit, a re-framing.
    pub fn feed(
        &mut self,
        meter: &mut StreamMeter,
        data: &[u8],
    ) -> Result<Option<Vec<u8>>, H1Error> {
        let ranges = &mut self.ranges;
        ranges.clear();
        let taken = self.dec.decode(data, |r| ranges.push(r))?;
        let whole = taken == data.len();
        self.excess |= !whole;
        let as_is = whole
            && if self.client_chunked {
                self.dec.clean()
            } else {
                self.dec.framing() != Framing::Chunked
            };
        // The payload goes through the meter; the output is collected only once it differs from the input.
        let mut edited: Option<Vec<u8>> = None;
        for (k, r) in self.ranges.iter().enumerate() {
            let piece = &data[r.clone()];
            match (meter.feed(piece), edited.as_mut()) {
                (None, None) => {}
                (None, Some(out)) => out.extend_from_slice(piece),
                (Some(new), out) => {
                    let out = match out {
                        Some(out) => out,
                        None => {
                            let mut out = Vec::with_capacity(new.len() + piece.len());
                            for prev in &self.ranges[..k] {
                                out.extend_from_slice(&data[prev.clone()]);
                            }
                            edited.insert(out)
                        }
                    };
                    out.extend_from_slice(&new);
                }
            }
        }
        if edited.is_none() && as_is {
            return Ok(None);
        }
        let payload_len = match &edited {
            Some(out) => out.len(),
            None => self.ranges.iter().map(|r| r.len()).sum(),
        };
        let ranges = &self.ranges;
        let write_payload = |out: &mut Vec<u8>| match &edited {
            Some(e) => out.extend_from_slice(e),
            None => {
                for r in ranges {
                    out.extend_from_slice(&data[r.clone()]);
                }
            }
        };
        let mut out = Vec::new();
        if self.client_chunked {
            write_chunk(&mut out, payload_len, write_payload);
        } else {
            write_payload(&mut out);
        }
        Ok(Some(out))
    }

    /// The upstream connection closed: completes a body read to the close; an error if the body is incomplete.
    pub fn close(&mut self) -> Result<(), H1Error> {
        self.dec.finish_on_close()
    }

    /// The body has been read to its end.
    pub fn done(&self) -> bool {
        self.dec.done()
    }

    /// Bytes came after the body's end (the connection cannot be reused).
    pub fn excess(&self) -> bool {
        self.excess
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::api::Api;

    fn chunk(p: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_chunk(&mut out, p.len(), |o| o.extend_from_slice(p));
        out
    }

    fn events(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i} \"}}}}]}}\n\n").into_bytes())
            .chain([b"data: [DONE]\n\n".to_vec()])
            .collect()
    }

    fn unchunk(wire: &[u8]) -> Vec<u8> {
        let mut dec = BodyDecoder::new(Framing::Chunked);
        let mut out = Vec::new();
        let mut all = wire.to_vec();
        all.extend_from_slice(b"0\r\n\r\n");
        dec.decode(&all, |r| out.extend_from_slice(&all[r]))
            .unwrap();
        assert!(dec.done());
        out
    }

    #[test]
    fn whole_chunks_go_out_as_they_came() {
        let mut meter = StreamMeter::new(Api::Chat, "", false);
        let mut f = Framed::new(Framing::Chunked);
        f.set_client_chunked(true);
        let evs = events(3);
        for e in &evs[..3] {
            assert_eq!(f.feed(&mut meter, &chunk(e)).unwrap(), None);
        }
        let mut last = chunk(&evs[3]);
        last.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(f.feed(&mut meter, &last).unwrap(), Some(chunk(&evs[3])));
        assert!(f.done() && meter.done() && meter.content_started());
    }

    #[test]
    fn an_unframed_body_goes_out_as_it_came_to_an_unframed_client() {
        let mut meter = StreamMeter::new(Api::Chat, "", false);
        let mut f = Framed::new(Framing::Close);
        let body = events(2).concat();
        assert_eq!(f.feed(&mut meter, &body).unwrap(), None);
        f.set_client_chunked(true);
        let mut meter = StreamMeter::new(Api::Chat, "", false);
        let mut f2 = Framed::new(Framing::Length(body.len() as u64 - 3));
        f2.set_client_chunked(true);
        let out = f2.feed(&mut meter, &body).unwrap().unwrap();
        assert_eq!(unchunk(&out), body[..body.len() - 3]);
        assert!(f2.done() && f2.excess());
    }

    proptest! {
        /// Any chunking, any split of the reads, strip mode or not, chunked client or not: what the client gets
        /// decodes to the payload (less the stripped usage chunk).
        #[test]
        fn any_split_reaches_the_client_intact(
            n in 1usize..10,
            size in 1usize..300,
            cuts in proptest::collection::vec(0usize..4000, 0..10),
            chunked_client in any::<bool>(),
        ) {
            let body = events(n).concat();
            let mut wire: Vec<u8> = body.chunks(size).flat_map(chunk).collect();
            wire.extend_from_slice(b"0\r\n\r\n");
            let mut meter = StreamMeter::new(Api::Chat, "", false);
            let mut f = Framed::new(Framing::Chunked);
            f.set_client_chunked(chunked_client);
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            bounds.push(wire.len());
            bounds.sort_unstable();
            let (mut got, mut start) = (Vec::new(), 0);
            for end in bounds {
                if end <= start {
                    continue;
                }
                let read = &wire[start..end];
                match f.feed(&mut meter, read).unwrap() {
                    None => got.extend_from_slice(read),
                    Some(out) => got.extend_from_slice(&out),
                }
                start = end;
            }
            let payload = if chunked_client { unchunk(&got) } else { got };
            prop_assert_eq!(payload, body);
            prop_assert!(f.done() && meter.done());
        }
    }
}
