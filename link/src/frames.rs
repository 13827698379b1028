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

impl BulkOut {
    fn is_empty(&self) -> bool {
        match self {
            BulkOut::Bytes(bytes) => bytes.is_empty(),
            BulkOut::Piped(piped) => piped.is_empty(),
        }
    }
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

/// Encodes and writes messages from `outgoing` until every sender is gone, batching whatever is
/// queued into one write so small frames do not each cost a syscall. A message's bulk is
/// written right after the batch that ends with its frame: from its own buffer, or spliced
/// from the pipe that holds it.
pub async fn write_loop<M: Outbound>(
    mut io: WriteHalf,
    mut outgoing: mpsc::Receiver<M>,
) -> Result<(), LinkError> {
    let mut buf = Vec::with_capacity(WRITE_BATCH);
    while let Some(message) = outgoing.recv().await {
        buf.clear();
        let mut bulk = message.encode_into(&mut buf)?;
        while bulk.is_empty() && buf.len() < WRITE_BATCH {
            match outgoing.try_recv() {
                Ok(message) => bulk = message.encode_into(&mut buf)?,
                Err(_) => break,
            }
        }
        match bulk {
            BulkOut::Bytes(bytes) => write_both(&mut io, &buf, &bytes).await?,
            BulkOut::Piped(piped) => {
                io.write_all(&buf).await?;
                io.splice_from(piped.pipe(), piped.len()).await?;
            }
        }
    }
    io.shutdown().await?;
    Ok(())
}

/// Writes `head` then `tail`, in one vectored write when the writer takes it.
async fn write_both<W: AsyncWrite + Unpin>(
    io: &mut W,
    mut head: &[u8],
    mut tail: &[u8],
) -> std::io::Result<()> {
    while !head.is_empty() {
        let n = io
            .write_vectored(&[IoSlice::new(head), IoSlice::new(tail)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        tail = &tail[n - from_head..];
    }
    io.write_all(tail).await
}
