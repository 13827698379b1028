//! Length-prefixed framing: each frame is an 8-byte header (the big-endian lengths of the
//! message and of its bulk), one bincode-encoded message, then the bulk: the bytes of the
//! message's one large byte field (a file read, a stream chunk), sent apart so that neither side
//! copies them into or out of the encoded message; the field itself is encoded empty. The
//! decoder checks every untrusted length before buffering or allocating for it and never panics
//! on hostile bytes; it never reads or writes a socket.

use bincode::config::{Configuration, Limit, Varint};

use crate::bulk::{BULK_MIN, Bulk, MAX_FRAME_LEN};
use crate::error::ProtocolError;

const HEADER_LEN: usize = 8;

/// The limit makes bincode refuse any length inside a frame that claims more than a frame could
/// hold, so a hostile `Vec` length cannot make the decoder allocate gigabytes.
fn config() -> Configuration<bincode::config::LittleEndian, Varint, Limit<MAX_FRAME_LEN>> {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Appends one frame (header and message, no bulk) to `out`. On error `out` is left as it was.
pub fn encode<M: bincode::Encode>(msg: &M, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    encode_frame(msg, 0, out)
}

/// Appends one frame to `out` and returns its bulk: the message's large byte field, taken out
/// of it, which the caller must write right after `out` (empty when the message has none). On
/// error `out` and the message are left as they were.
pub fn encode_with_bulk<M: bincode::Encode + Bulk>(
    msg: &mut M,
    out: &mut Vec<u8>,
) -> Result<Vec<u8>, ProtocolError> {
    let bulk = match msg.bulk_mut() {
        Some(field) if field.len() >= BULK_MIN => std::mem::take(field),
        _ => return encode_frame(msg, 0, out).map(|()| Vec::new()),
    };
    match encode_frame(msg, bulk.len(), out) {
        Ok(()) => Ok(bulk),
        Err(error) => {
            if let Some(field) = msg.bulk_mut() {
                *field = bulk;
            }
            Err(error)
        }
    }
}

/// Appends one frame whose bulk, `bulk_len` bytes, the caller writes after `out` from
/// elsewhere (a pipe). The message's bulk field must be there and empty: the receiver puts
/// the bulk into it. On error `out` is left as it was.
pub fn encode_with_bulk_len<M: bincode::Encode + Bulk>(
    msg: &mut M,
    bulk_len: usize,
    out: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    match msg.bulk_mut() {
        Some(field) if field.is_empty() => encode_frame(msg, bulk_len, out),
        _ => Err(ProtocolError::UnexpectedBulk),
    }
}

fn encode_frame<M: bincode::Encode>(
    msg: &M,
    bulk_len: usize,
    out: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let written = match bincode::encode_into_std_write(msg, out, config()) {
        Ok(written) => written,
        Err(e) => {
            out.truncate(start);
            return Err(ProtocolError::Encode(e.to_string()));
        }
    };
    let total = written + bulk_len;
    if total > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(ProtocolError::FrameTooLarge {
            len: total,
            max: MAX_FRAME_LEN,
        });
    }
    // Both fit in u32: each is at most MAX_FRAME_LEN.
    out[start..start + 4].copy_from_slice(&(written as u32).to_be_bytes());
    out[start + 4..start + HEADER_LEN].copy_from_slice(&(bulk_len as u32).to_be_bytes());
    Ok(())
}

/// A frame whose message is in but whose bulk is still arriving: the reader appends the rest
/// of the bulk straight to [`PartialFrame::bulk`].
#[derive(Debug)]
pub struct PartialFrame {
    message: Vec<u8>,
    pub bulk: Vec<u8>,
    bulk_len: usize,
}

impl PartialFrame {
    /// Bulk bytes still to come.
    pub fn missing(&self) -> usize {
        self.bulk_len.saturating_sub(self.bulk.len())
    }

    /// The message, with its bulk in place; only once nothing is missing.
    pub fn finish<M: bincode::Decode<()> + Bulk>(self) -> Result<M, ProtocolError> {
        if self.bulk.len() != self.bulk_len {
            return Err(ProtocolError::Decode("a frame's bulk is incomplete".into()));
        }
        decode_message(&self.message, self.bulk)
    }
}

/// Decodes one whole message and puts `bulk` (if any) in its field, which must be there and
/// have come empty.
fn decode_message<M: bincode::Decode<()> + Bulk>(
    payload: &[u8],
    bulk: Vec<u8>,
) -> Result<M, ProtocolError> {
    let (mut msg, used) = bincode::decode_from_slice::<M, _>(payload, config())
        .map_err(|e| ProtocolError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(ProtocolError::TrailingBytes {
            extra: payload.len() - used,
        });
    }
    if !bulk.is_empty() {
        match msg.bulk_mut() {
            Some(field) if field.is_empty() => *field = bulk,
            _ => return Err(ProtocolError::UnexpectedBulk),
        }
    }
    Ok(msg)
}

/// Reassembles frames from arbitrarily split bytes.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` before this index belong to frames already returned; compacting lazily
    /// keeps many small frames in one push linear rather than quadratic.
    start: usize,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// The buffer to append received bytes to (a reader fills its spare capacity, so bytes
    /// land here without a second copy), with room for the rest of the message being received,
    /// or for `min` bytes. The room is bounded by [`MAX_FRAME_LEN`]: an oversized header is
    /// refused by [`FrameDecoder::next`] before anyone asks for room. No room is made for a
    /// bulk: [`FrameDecoder::split_off_bulk`] gives it a buffer of its own.
    pub fn spare(&mut self, min: usize) -> &mut Vec<u8> {
        self.compact();
        let missing = match self.header() {
            Ok(Some((len, _))) => (HEADER_LEN + len).saturating_sub(self.buffered()),
            _ => 0,
        };
        self.buf.reserve(missing.max(min));
        &mut self.buf
    }

    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// The next frame's (message, bulk) lengths once its header is in, checked.
    fn header(&self) -> Result<Option<(usize, usize)>, ProtocolError> {
        let Some(&[a, b, c, d, e, f, g, h]) = self.buf[self.start..].first_chunk::<HEADER_LEN>()
        else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        let bulk = u32::from_be_bytes([e, f, g, h]) as usize;
        if len.saturating_add(bulk) > MAX_FRAME_LEN {
            return Err(ProtocolError::FrameTooLarge {
                len: len.saturating_add(bulk),
                max: MAX_FRAME_LEN,
            });
        }
        Ok(Some((len, bulk)))
    }

    /// Next complete message, `Ok(None)` when more bytes are needed. An oversized length is
    /// rejected as soon as its header is seen, before its payload is waited for. A frame that
    /// fails to decode is consumed, but callers should treat any error as fatal for the
    /// connection.
    // Not an `Iterator`: the item type is chosen per call and errors are part of the result.
    #[allow(clippy::should_implement_trait)]
    pub fn next<M: bincode::Decode<()> + Bulk>(&mut self) -> Result<Option<M>, ProtocolError> {
        let Some((len, bulk_len)) = self.header()? else {
            return Ok(None);
        };
        let Some(frame) = self.buf[self.start + HEADER_LEN..].get(..len + bulk_len) else {
            return Ok(None);
        };
        let (payload, bulk) = frame.split_at(len);
        let decoded = decode_message(payload, bulk.to_vec());
        self.start += HEADER_LEN + len + bulk_len;
        decoded.map(Some)
    }

    /// When the next frame's message is in but not all of its bulk: the frame, taken out with
    /// the part of the bulk that has come, for the reader to receive the rest into it directly.
    pub fn split_off_bulk(&mut self) -> Result<Option<PartialFrame>, ProtocolError> {
        let Some((len, bulk_len)) = self.header()? else {
            return Ok(None);
        };
        let pending = &self.buf[self.start + HEADER_LEN..];
        if bulk_len == 0 || pending.len() < len || pending.len() >= len + bulk_len {
            return Ok(None);
        }
        let message = pending[..len].to_vec();
        let mut bulk = Vec::with_capacity(bulk_len);
        bulk.extend_from_slice(&pending[len..]);
        self.start = self.buf.len();
        Ok(Some(PartialFrame {
            message,
            bulk,
            bulk_len,
        }))
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::bulk::{MAX_DATA_CHUNK, MAX_FILE_READ};
    use crate::messages::*;

    fn every_client_message() -> Vec<ClientMessage> {
        let addr: SocketAddr = ([10, 0, 0, 7], 8080).into();
        let addr6: SocketAddr = "[fd00::1]:443".parse().unwrap_or(addr);
        let mut msgs = vec![
            ClientMessage::Hello(Hello { token: vec![7; 32] }),
            ClientMessage::Ping { nonce: u64::MAX },
            ClientMessage::Pong { nonce: 0 },
            ClientMessage::Request {
                id: 1,
                request: Request::TargetInfo,
            },
            ClientMessage::Request {
                id: 2,
                request: Request::Fs(crate::fs::FsRequest::Read {
                    path: "/etc/hostname".into(),
                    offset: 1 << 40,
                    len: MAX_FILE_READ,
                }),
            },
            ClientMessage::Stream(StreamFrame::Open {
                id: StreamId(3),
                target: StreamTarget::Tcp(addr6),
            }),
            ClientMessage::Request {
                id: 3,
                request: Request::Subscribe(crate::incoming::Subscription {
                    port: 8080,
                    mode: crate::incoming::IncomingMode::Steal,
                    filter: Some(crate::incoming::HttpFilter::AllOf(vec![
                        crate::incoming::HttpFilter::Header("^x-user: me$".into()),
                        crate::incoming::HttpFilter::AnyOf(vec![
                            crate::incoming::HttpFilter::Path("^/api".into()),
                            crate::incoming::HttpFilter::Method("POST".into()),
                        ]),
                    ])),
                    override_steal: false,
                }),
            },
            ClientMessage::Request {
                id: 4,
                request: Request::Unsubscribe { port: 8080 },
            },
        ];
        msgs.extend(every_stream_frame().into_iter().map(ClientMessage::Stream));
        msgs
    }

    fn every_stream_frame() -> Vec<StreamFrame> {
        vec![
            StreamFrame::Open {
                id: StreamId(1),
                target: StreamTarget::Udp(([127, 0, 0, 1], 53).into()),
            },
            StreamFrame::Open {
                id: StreamId(2),
                target: StreamTarget::Incoming(crate::incoming::IncomingConnection {
                    port: 80,
                    peer: ([10, 0, 0, 7], 51234).into(),
                    destination: ([10, 0, 0, 2], 80).into(),
                    mode: crate::incoming::IncomingMode::Mirror,
                }),
            },
            StreamFrame::Opened { id: StreamId(1) },
            StreamFrame::OpenFailed {
                id: StreamId(5),
                error: RemoteError {
                    errno: 111,
                    message: "connection refused".into(),
                },
            },
            StreamFrame::Data {
                id: StreamId(1),
                bytes: vec![0xab; MAX_DATA_CHUNK],
            },
            StreamFrame::Data {
                id: StreamId(1),
                bytes: vec![],
            },
            StreamFrame::Credit {
                id: StreamId(2),
                bytes: u32::MAX,
            },
            StreamFrame::Shutdown { id: StreamId(2) },
            StreamFrame::Reset {
                id: StreamId(u32::MAX),
            },
        ]
    }

    fn every_agent_message() -> Vec<AgentMessage> {
        let mut msgs = vec![
            AgentMessage::Welcome,
            AgentMessage::Rejected(RejectReason::BadToken),
            AgentMessage::Rejected(RejectReason::HelloExpected),
            AgentMessage::Ping { nonce: 42 },
            AgentMessage::Pong { nonce: 43 },
            AgentMessage::Response {
                id: 1,
                response: Ok(Response::TargetInfo(TargetInfo {
                    env: vec![("PATH".into(), "/bin".into()), ("Ü".into(), "".into())],
                    hostname: "pod-7".into(),
                    pid: Some(4242),
                    addresses: vec![([10, 1, 2, 3].into(), 24), ("fd00::3".parse().unwrap(), 64)],
                })),
            },
            AgentMessage::Response {
                id: 2,
                response: Ok(Response::TargetInfo(TargetInfo {
                    env: vec![],
                    hostname: String::new(),
                    pid: None,
                    addresses: vec![],
                })),
            },
            AgentMessage::Response {
                id: 3,
                response: Ok(Response::Fs(crate::fs::FsResponse::Data(
                    b"hello\n".to_vec(),
                ))),
            },
            AgentMessage::Response {
                id: 4,
                response: Err(RemoteError {
                    errno: 2,
                    message: "no such file".into(),
                }),
            },
        ];
        msgs.extend(every_stream_frame().into_iter().map(AgentMessage::Stream));
        msgs
    }

    fn encode_all<M: bincode::Encode>(msgs: &[M]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            encode(m, &mut out).expect("test messages are small");
        }
        out
    }

    fn decode_all<M: bincode::Decode<()> + Bulk>(dec: &mut FrameDecoder) -> Vec<M> {
        let mut got = Vec::new();
        while let Some(m) = dec.next::<M>().expect("valid frames decode") {
            got.push(m);
        }
        got
    }

    #[test]
    fn every_message_kind_round_trips() {
        let client = every_client_message();
        let mut dec = FrameDecoder::new();
        dec.push(&encode_all(&client));
        assert_eq!(decode_all::<ClientMessage>(&mut dec), client);
        assert_eq!(dec.buffered(), 0);

        let agent = every_agent_message();
        dec.push(&encode_all(&agent));
        assert_eq!(decode_all::<AgentMessage>(&mut dec), agent);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn frame_split_at_every_byte_boundary() {
        let msgs = [
            ClientMessage::Request {
                id: 9,
                request: Request::Fs(crate::fs::FsRequest::Read {
                    path: "/proc/self/environ".into(),
                    offset: 3,
                    len: 100,
                }),
            },
            ClientMessage::Ping { nonce: 5 },
        ];
        let bytes = encode_all(&msgs);
        for cut in 0..=bytes.len() {
            let mut dec = FrameDecoder::new();
            dec.push(&bytes[..cut]);
            let mut got = decode_all::<ClientMessage>(&mut dec);
            dec.push(&bytes[cut..]);
            got.extend(decode_all::<ClientMessage>(&mut dec));
            assert_eq!(got, msgs, "cut at {cut}");
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn spare_room_holds_the_rest_of_the_frame_being_received() {
        let msgs = every_agent_message();
        let bytes = encode_all(&msgs);
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        // A reader appending odd-sized pieces into the decoder's own buffer.
        for piece in bytes.chunks(7) {
            let buf = dec.spare(1);
            assert!(buf.capacity() - buf.len() >= 1);
            buf.extend_from_slice(piece);
            got.extend(decode_all::<AgentMessage>(&mut dec));
        }
        assert_eq!(got, msgs);
        assert_eq!(dec.buffered(), 0);
        // Once a big frame's header is in, there is room for all of it at once.
        let mut big = Vec::new();
        let data = AgentMessage::Stream(StreamFrame::Data {
            id: StreamId(1),
            bytes: vec![7; MAX_DATA_CHUNK],
        });
        encode(&data, &mut big).unwrap();
        let buf = dec.spare(1);
        buf.extend_from_slice(&big[..10]);
        let buf = dec.spare(1);
        assert!(buf.capacity() - buf.len() >= big.len() - 10);
        buf.extend_from_slice(&big[10..]);
        assert_eq!(dec.next::<AgentMessage>().unwrap(), Some(data));
    }

    #[test]
    fn byte_at_a_time() {
        let msgs = every_agent_message();
        let bytes = encode_all(&msgs);
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            dec.push(std::slice::from_ref(b));
            got.extend(decode_all::<AgentMessage>(&mut dec));
        }
        assert_eq!(got, msgs);
    }

    #[test]
    fn several_frames_in_one_push_then_partial_tail() {
        let msgs: Vec<_> = (0..100).map(|n| AgentMessage::Pong { nonce: n }).collect();
        let mut bytes = encode_all(&msgs);
        let tail = encode_all(&[AgentMessage::Ping { nonce: 1 }]);
        bytes.extend_from_slice(&tail[..3]);
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        assert_eq!(decode_all::<AgentMessage>(&mut dec), msgs);
        assert_eq!(dec.buffered(), 3);
        dec.push(&tail[3..]);
        assert_eq!(
            decode_all::<AgentMessage>(&mut dec),
            [AgentMessage::Ping { nonce: 1 }]
        );
    }

    /// A frame header claiming `len` message bytes and `bulk` bulk bytes.
    fn header(len: u32, bulk: u32) -> Vec<u8> {
        [len.to_be_bytes(), bulk.to_be_bytes()].concat()
    }

    #[test]
    fn oversized_length_rejected_from_the_header_alone() {
        let mut dec = FrameDecoder::new();
        let oversized = header((MAX_FRAME_LEN + 1) as u32, 0);
        dec.push(&oversized[..7]);
        assert_eq!(dec.next::<ClientMessage>(), Ok(None));
        dec.push(&oversized[7..]);
        assert_eq!(
            dec.next::<ClientMessage>(),
            Err(ProtocolError::FrameTooLarge {
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            })
        );
        // Nothing beyond the header was needed to decide.
        assert_eq!(dec.buffered(), HEADER_LEN);

        for (len, bulk) in [
            (u32::MAX, 0),
            (0, u32::MAX),
            (u32::MAX, u32::MAX),
            (1, MAX_FRAME_LEN as u32),
        ] {
            let mut dec = FrameDecoder::new();
            dec.push(&header(len, bulk));
            assert!(matches!(
                dec.next::<AgentMessage>(),
                Err(ProtocolError::FrameTooLarge { .. })
            ));
            assert!(dec.split_off_bulk().is_err());
        }
    }

    #[test]
    fn a_bulk_arriving_apart_is_received_into_its_own_buffer() {
        let read = AgentMessage::Response {
            id: 9,
            response: Ok(Response::Fs(crate::fs::FsResponse::Data(
                (0..MAX_FILE_READ).map(|i| i as u8).collect(),
            ))),
        };
        let mut out = Vec::new();
        let bulk = encode_with_bulk(&mut read.clone(), &mut out).unwrap();
        assert_eq!(bulk.len(), MAX_FILE_READ as usize);
        assert!(out.len() < 64, "the message is encoded without its bytes");
        out.extend_from_slice(&bulk);
        let mut dec = FrameDecoder::new();
        // The message and the first bytes of the bulk, then the rest as a reader would add it.
        dec.push(&out[..out.len() - bulk.len() + 1000]);
        assert_eq!(dec.next::<AgentMessage>(), Ok(None));
        let mut partial = dec.split_off_bulk().unwrap().expect("message is in");
        assert_eq!(
            (partial.bulk.len(), partial.missing()),
            (1000, bulk.len() - 1000)
        );
        assert_eq!(dec.buffered(), 0);
        partial.bulk.extend_from_slice(&bulk[1000..]);
        assert_eq!(partial.finish::<AgentMessage>(), Ok(read));
        // Small fields stay inside their message.
        let mut out = Vec::new();
        let mut ping = ClientMessage::Stream(StreamFrame::Data {
            id: StreamId(1),
            bytes: vec![1; 100],
        });
        assert_eq!(encode_with_bulk(&mut ping, &mut out), Ok(vec![]));
        assert_eq!(&out[4..8], &[0, 0, 0, 0]);
    }

    #[test]
    fn a_bulk_for_a_message_without_a_place_for_it_is_refused() {
        let mut out = Vec::new();
        encode(&AgentMessage::Ping { nonce: 1 }, &mut out).unwrap();
        out[4..8].copy_from_slice(&3u32.to_be_bytes());
        out.extend_from_slice(&[1, 2, 3]);
        let mut dec = FrameDecoder::new();
        dec.push(&out);
        assert_eq!(
            dec.next::<AgentMessage>(),
            Err(ProtocolError::UnexpectedBulk)
        );
    }

    #[test]
    fn a_bulk_written_from_elsewhere_lands_in_the_messages_field() {
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut msg = AgentMessage::Response {
            id: 9,
            response: Ok(Response::Fs(crate::fs::FsResponse::Data(Vec::new()))),
        };
        let mut out = Vec::new();
        encode_with_bulk_len(&mut msg, data.len(), &mut out).unwrap();
        out.extend_from_slice(&data);
        let mut dec = FrameDecoder::new();
        dec.push(&out);
        let expected = AgentMessage::Response {
            id: 9,
            response: Ok(Response::Fs(crate::fs::FsResponse::Data(data))),
        };
        assert_eq!(dec.next::<AgentMessage>(), Ok(Some(expected)));

        // Only into an empty field of a message that has one.
        let mut ping = AgentMessage::Ping { nonce: 1 };
        let mut full = AgentMessage::Response {
            id: 1,
            response: Ok(Response::Fs(crate::fs::FsResponse::Data(vec![1]))),
        };
        let mut out = Vec::new();
        for msg in [&mut ping, &mut full] {
            assert_eq!(
                encode_with_bulk_len(msg, 10, &mut out),
                Err(ProtocolError::UnexpectedBulk)
            );
        }
        assert!(out.is_empty());
    }

    #[test]
    fn largest_file_read_fits_in_a_frame() {
        let msg = AgentMessage::Response {
            id: u64::MAX,
            response: Ok(Response::Fs(crate::fs::FsResponse::Data(vec![
                0xff;
                MAX_FILE_READ
                    as usize
            ]))),
        };
        let mut out = Vec::new();
        assert_eq!(encode(&msg, &mut out), Ok(()));
        let mut dec = FrameDecoder::new();
        dec.push(&out);
        assert_eq!(dec.next::<AgentMessage>(), Ok(Some(msg)));
    }

    #[test]
    fn oversized_message_refused_and_output_untouched() {
        let mut out = encode_all(&[ClientMessage::Ping { nonce: 1 }]);
        let before = out.clone();
        let msg = ClientMessage::Stream(StreamFrame::Data {
            id: StreamId(1),
            bytes: vec![0; MAX_FRAME_LEN],
        });
        match encode(&msg, &mut out) {
            Err(ProtocolError::FrameTooLarge { len, max }) => {
                assert!(len > MAX_FRAME_LEN);
                assert_eq!(max, MAX_FRAME_LEN);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert_eq!(out, before);
    }

    #[test]
    fn hostile_length_inside_a_frame_is_a_decode_error() {
        // A Data frame whose byte vector claims u32::MAX bytes but the frame holds only a few:
        // the decoder must refuse, not allocate.
        let mut payload = vec![
            4,   // ClientMessage::Stream
            3,   // StreamFrame::Data
            1,   // id
            252, // varint: a u32 follows
        ];
        payload.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut frame = header(payload.len() as u32, 0);
        frame.extend_from_slice(&payload);
        let mut dec = FrameDecoder::new();
        dec.push(&frame);
        assert!(matches!(
            dec.next::<ClientMessage>(),
            Err(ProtocolError::Decode(_))
        ));
    }

    #[test]
    fn garbage_payload_is_a_decode_error() {
        let mut dec = FrameDecoder::new();
        dec.push(&header(3, 0));
        dec.push(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            dec.next::<ClientMessage>(),
            Err(ProtocolError::Decode(_))
        ));
        // An empty frame holds no message.
        dec.push(&header(0, 0));
        assert!(matches!(
            dec.next::<AgentMessage>(),
            Err(ProtocolError::Decode(_))
        ));
    }

    #[test]
    fn pseudo_random_garbage_never_panics() {
        // xorshift64: deterministic, so a failure reproduces.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = encode_all(&every_agent_message());
        for round in 0..2000 {
            let mut bytes = if round % 2 == 0 {
                // Random payloads under a plausible header.
                let len = (rand() % 64) as usize;
                let mut b = (len as u32).to_be_bytes().to_vec();
                b.extend((0..len).map(|_| rand() as u8));
                b
            } else {
                // Valid frames with a few bytes flipped: harder to tell from real traffic.
                let mut b = valid.clone();
                for _ in 0..1 + rand() % 4 {
                    let i = (rand() as usize) % b.len();
                    b[i] ^= (rand() as u8) | 1;
                }
                b
            };
            bytes.truncate(bytes.len() - (rand() as usize % 3).min(bytes.len()));
            let mut dec = FrameDecoder::new();
            dec.push(&bytes);
            for _ in 0..64 {
                match dec.next::<AgentMessage>() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            let mut dec = FrameDecoder::new();
            dec.push(&bytes);
            for _ in 0..64 {
                match dec.next::<ClientMessage>() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_in_a_frame_are_rejected() {
        let mut out = Vec::new();
        encode(&ClientMessage::Ping { nonce: 7 }, &mut out).expect("small message");
        let len = u32::from_be_bytes([out[0], out[1], out[2], out[3]]);
        out[..4].copy_from_slice(&(len + 2).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        let mut dec = FrameDecoder::new();
        dec.push(&out);
        assert_eq!(
            dec.next::<ClientMessage>(),
            Err(ProtocolError::TrailingBytes { extra: 2 })
        );
    }
}
