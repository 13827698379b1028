//! Frames in and out of a byte stream: the async shell around the protocol's sans-I/O framing.
//! It never decides what a message means; it only reads whole messages and writes them in
//! batches, with their bulk from memory or spliced from a pipe.

use std::io::IoSlice;

use bincode::Decode;
use mirrord_protocol::bulk::Bulk;
use mirrord_protocol::frame::{self, FrameDecoder, PartialFrame};
use mirrord_protocol::{AgentMessage, ClientMessage, ProtocolError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::endpoint::WriteHalf;
use crate::piped::PipedBytes;

/// How many bytes of queued messages one write to the socket may carry.
const WRITE_BATCH: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer stopped answering pings")]
    PeerDead,
}

/// What follows a frame's message on the wire: its bulk, from memory or from a pipe.
pub enum BulkOut {
    Bytes(Vec<u8>),
    Piped(PipedBytes),
}

/// Something the writer sends as one frame.
pub trait Outbound: Send + 'static {
    /// Appends the frame to `out` and returns the bulk to write right after it.
    fn encode_into(self, out: &mut Vec<u8>) -> Result<BulkOut, ProtocolError>;
}

impl Outbound for AgentMessage {
    fn encode_into(mut self, out: &mut Vec<u8>) -> Result<BulkOut, ProtocolError> {
        frame::encode_with_bulk(&mut self, out).map(BulkOut::Bytes)
    }
}

impl Outbound for ClientMessage {
    fn encode_into(mut self, out: &mut Vec<u8>) -> Result<BulkOut, ProtocolError> {
        frame::encode_with_bulk(&mut self, out).map(BulkOut::Bytes)
    }
}

/// Reads whole messages from one half of a connection.
pub struct FrameReader<R> {
    io: R,
    decoder: FrameDecoder,
    /// A frame whose bulk is being received into a buffer of its own.
    partial: Option<PartialFrame>,
}

/// Bytes asked of the socket at least, when no frame says how many are coming.
const READ_CHUNK: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R) -> Self {
        Self {
            io,
            decoder: FrameDecoder::new(),
            partial: None,
        }
    }

    /// The next message; `LinkError::Closed` at a clean end of stream. Cancel-safe: every byte
    /// read is kept in the reader until its message is complete.
    pub async fn next<M: Decode<()> + Bulk>(&mut self) -> Result<M, LinkError> {
        loop {
            if let Some(partial) = &mut self.partial
                && partial.missing() > 0
            {
                // A bulk (a file read, say) lands in its own buffer, read once, never moved.
                let n = (&mut self.io)
                    .take(partial.missing() as u64)
                    .read_buf(&mut partial.bulk)
                    .await?;
                if n == 0 {
                    return Err(LinkError::Closed);
                }
                continue;
            }
            if let Some(partial) = self.partial.take() {
                return Ok(partial.finish()?);
            }
            if let Some(message) = self.decoder.next()? {
                return Ok(message);
            }
            if let Some(partial) = self.decoder.split_off_bulk()? {
                self.partial = Some(partial);
                continue;
            }
            // Straight into the decoder's buffer, with no copy from a buffer of our own.
            let n = self.io.read_buf(self.decoder.spare(READ_CHUNK)).await?;
            if n == 0 {
                return Err(LinkError::Closed);
            }
        }
    }
}

/// Most frames one write carries (two slices each; `IOV_MAX` is 1024).
const WRITE_FRAMES: usize = 128;

/// Encodes and writes messages from `outgoing` until every sender is gone, batching whatever is
/// queued — frames and the bulk each carries — into one vectored write, so that the frames of
/// many busy streams do not each cost a syscall (and a wake-up of the reader at the other end).
/// A bulk held in a pipe ends a batch: it is spliced right after the write that ends with its
/// frame.
pub async fn write_loop<M: Outbound>(
    mut io: WriteHalf,
    mut outgoing: mpsc::Receiver<M>,
) -> Result<(), LinkError> {
    let mut heads = Vec::with_capacity(WRITE_BATCH);
    // Each frame of the batch: where its head ends in `heads`, and its bulk.
    let mut frames: Vec<(usize, Vec<u8>)> = Vec::with_capacity(WRITE_FRAMES);
    while let Some(message) = outgoing.recv().await {
        // Once behind the tasks that are ready to run: the streams that have bytes in the same
        // round (the requests of many connections that one wake-up brought) queue their frames
        // meanwhile, and all leave in this one write rather than one write each.
        tokio::task::yield_now().await;
        heads.clear();
        frames.clear();
        let mut bulk_bytes = 0;
        let mut piped = None;
        let mut next = Some(message);
        while let Some(message) = next.take() {
            match message.encode_into(&mut heads)? {
                BulkOut::Bytes(bytes) => {
                    bulk_bytes += bytes.len();
                    frames.push((heads.len(), bytes));
                }
                BulkOut::Piped(pipe) => {
                    frames.push((heads.len(), Vec::new()));
                    piped = Some(pipe);
                    break;
                }
            }
            if heads.len() + bulk_bytes < WRITE_BATCH && frames.len() < WRITE_FRAMES {
                next = outgoing.try_recv().ok();
            }
        }
        write_frames(&mut io, &heads, &frames).await?;
        if let Some(piped) = piped {
            io.splice_from(piped.pipe(), piped.len()).await?;
        }
    }
    io.shutdown().await?;
    Ok(())
}

/// Writes each frame's head (`heads` up to its end) followed by its bulk, in as few vectored
/// writes as the writer takes.
async fn write_frames<W: AsyncWrite + Unpin>(
    io: &mut W,
    heads: &[u8],
    frames: &[(usize, Vec<u8>)],
) -> std::io::Result<()> {
    let mut slices = Vec::with_capacity(frames.len() * 2);
    let mut start = 0;
    for (end, bulk) in frames {
        slices.push(IoSlice::new(&heads[start..*end]));
        if !bulk.is_empty() {
            slices.push(IoSlice::new(bulk));
        }
        start = *end;
    }
    write_all_slices(io, &mut slices).await
}

/// Writes every slice, in order, in as few vectored writes as the writer takes. No slice may be
/// empty: a writer that takes nothing of a non-empty write has failed (`WriteZero`).
pub(crate) async fn write_all_slices<W: AsyncWrite + Unpin>(
    io: &mut W,
    slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    let mut slices = slices;
    while !slices.is_empty() {
        let n = io.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use mirrord_protocol::{ClientMessage, StreamFrame, StreamId};
    use tokio::net::UnixStream;

    use super::*;
    use crate::endpoint::split_stream;

    /// Frames queued by many streams at once leave in few writes, each frame whole and in
    /// order, whatever their bulks.
    #[tokio::test]
    async fn queued_frames_and_their_bulks_arrive_whole_and_in_order() {
        let (near, far) = UnixStream::pair().unwrap();
        let (_, write) = split_stream(near);
        let (read, _) = split_stream(far);
        let (out_tx, out_rx) = mpsc::channel(1024);
        let sent: Vec<ClientMessage> = (0..600u32)
            .map(|i| match i % 3 {
                0 => ClientMessage::Ping { nonce: i.into() },
                _ => ClientMessage::Stream(StreamFrame::Data {
                    id: StreamId(i),
                    // Up to 4 KiB: 600 frames make several batches of WRITE_BATCH bytes.
                    bytes: vec![i as u8; (i as usize * 7) % 4096],
                }),
            })
            .collect();
        for message in sent.clone() {
            out_tx.send(message).await.unwrap();
        }
        drop(out_tx);
        let writer = tokio::spawn(write_loop(write, out_rx));
        let mut reader = FrameReader::new(read);
        for expected in sent {
            let got: ClientMessage = reader.next().await.unwrap();
            assert_eq!(got, expected);
        }
        writer.await.unwrap().unwrap();
        assert!(matches!(
            reader.next::<ClientMessage>().await,
            Err(LinkError::Closed)
        ));
    }
}
