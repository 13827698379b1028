//! The link's frame decoder and message decoding, both directions, the way the link's reader
//! drives it: bytes arrive in pieces (the first input byte sets their size), land in the
//! decoder's own buffer, and a frame whose bulk is still coming is split off to receive the
//! rest apart. Every message decoded must encode back to a frame that decodes to itself.
//! The greeting that precedes the frames is parsed from the same bytes.

use mirrord_protocol::bulk::Bulk;
use mirrord_protocol::frame::{FrameDecoder, PartialFrame, encode_with_bulk};
use mirrord_protocol::greeting::{FIXED_LEN, Greeting};
use mirrord_protocol::{AgentMessage, ClientMessage};

pub fn run(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    greeting(bytes);
    let piece = usize::from(mode >> 1) + 1;
    if mode & 1 == 0 {
        decode_all::<ClientMessage>(bytes, piece);
    } else {
        decode_all::<AgentMessage>(bytes, piece);
    }
}

fn greeting(bytes: &[u8]) {
    let Some(fixed) = bytes.first_chunk::<FIXED_LEN>() else {
        return;
    };
    if let Ok((_, name_len)) = Greeting::parse_fixed(fixed) {
        let name = &bytes[FIXED_LEN..];
        let _ = Greeting::parse(fixed, &name[..name_len.min(name.len())]);
    }
}

/// Feeds `bytes` `piece` at a time, as `FrameReader` does, until they run out or a frame is
/// refused (after which a reader drops the connection).
fn decode_all<M>(bytes: &[u8], piece: usize)
where
    M: bincode::Decode<()> + bincode::Encode + Bulk + Clone + PartialEq + std::fmt::Debug,
{
    let mut decoder = FrameDecoder::new();
    let mut partial: Option<PartialFrame> = None;
    for chunk in bytes.chunks(piece) {
        let mut chunk = chunk;
        if let Some(frame) = &mut partial {
            let take = frame.missing().min(chunk.len());
            frame.bulk.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if frame.missing() > 0 {
                continue;
            }
            let Some(frame) = partial.take() else {
                continue;
            };
            match frame.finish::<M>() {
                Ok(message) => round_trip(message),
                Err(_) => return,
            }
        }
        decoder.spare(chunk.len()).extend_from_slice(chunk);
        loop {
            match decoder.next::<M>() {
                Ok(Some(message)) => round_trip(message),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        match decoder.split_off_bulk() {
            Ok(split) => partial = split,
            Err(_) => return,
        }
    }
}

/// A decoded message is encoded back (its large field as bulk, as the writer does) and must
/// decode to itself.
fn round_trip<M>(message: M)
where
    M: bincode::Decode<()> + bincode::Encode + Bulk + Clone + PartialEq + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut sent = message.clone();
    // Re-encoding may legitimately not fit: a bulk sent apart costs no length prefix, one
    // moved inline does. Such a message was still decoded without harm.
    let Ok(bulk) = encode_with_bulk(&mut sent, &mut out) else {
        return;
    };
    out.extend_from_slice(&bulk);
    let mut decoder = FrameDecoder::new();
    decoder.push(&out);
    match decoder.next::<M>() {
        Ok(Some(back)) => assert_eq!(back, message, "a frame did not decode to what it encoded"),
        other => panic!("a frame this side encoded did not decode: {other:?}"),
    }
}
