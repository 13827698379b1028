//! Copies of a client's inbound bytes for mirroring sessions. A copy is best effort by
//! design: the real connection never waits for it — a copy whose session cannot keep up is
//! dropped (its stream ends early) instead of holding the client back.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use mirrord_protocol::StreamTarget;
use mirrord_protocol::incoming::IncomingConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc::{self, error::TrySendError};
use tracing::debug;

use super::SessionStreams;
use super::batch::BatchedStream;

/// Chunks of the client's bytes a copy may hold while its session is slow (or its stream is
/// still opening); one more and the copy is dropped.
const COPY_BACKLOG: usize = 64;

/// tee --client bytes--> a mirroring session's stream.
pub type CopyTx = mpsc::Sender<Vec<u8>>;

/// Opens an incoming stream for `connection` on a mirroring session and feeds it what the
/// returned sender gets; whatever the session answers is discarded.
pub fn mirror(streams: Arc<SessionStreams>, connection: IncomingConnection) -> CopyTx {
    let (copy_tx, copy_rx) = mpsc::channel(COPY_BACKLOG);
    tokio::spawn(async move {
        let peer = connection.peer;
        match streams.open(StreamTarget::Incoming(connection)).await {
            Ok(rx) => {
                let copy = CopyIo {
                    copy_rx,
                    pending: Vec::new(),
                };
                streams.pipe(copy, rx).await;
            }
            // Dropping the receiver stops the tee's copying to it.
            Err(error) => debug!(%peer, "the session did not take a mirrored connection: {error}"),
        }
    });
    copy_tx
}

/// The client's connection, copying what it reads to each mirror.
pub struct Tee {
    client: BatchedStream,
    copies: Vec<CopyTx>,
}

impl Tee {
    pub fn new(client: BatchedStream, copies: Vec<CopyTx>) -> Tee {
        Tee { client, copies }
    }
}

impl AsyncRead for Tee {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.client).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = &buf.filled()[before..];
            if read.is_empty() {
                // The client is done sending: so are the copies.
                this.copies.clear();
            } else {
                this.copies
                    .retain(|copy| match copy.try_send(read.to_vec()) {
                        Ok(()) => true,
                        Err(TrySendError::Full(_)) => {
                            debug!("a mirroring session fell behind; its copy is dropped");
                            false
                        }
                        Err(TrySendError::Closed(_)) => false,
                    });
            }
        }
        polled
    }
}

impl AsyncWrite for Tee {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().client).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().client).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().client).poll_shutdown(cx)
    }
}

/// A mirroring session's side of a copy: reads the copied bytes, swallows the answers.
struct CopyIo {
    copy_rx: mpsc::Receiver<Vec<u8>>,
    /// The rest of a chunk the last read did not take.
    pending: Vec<u8>,
}

impl AsyncRead for CopyIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            match this.copy_rx.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => this.pending = chunk,
                // The tee dropped this copy or the client finished: end of stream.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for CopyIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A copy that is not read never holds the real connection back: past its backlog it is
    /// dropped, and the bytes it did take arrive whole and in order.
    #[tokio::test]
    async fn a_stalled_copy_is_dropped_not_waited_for() {
        let (mut client, server) = crate::incoming::tcp_pair().await;
        let (copy_tx, copy_rx) = mpsc::channel(COPY_BACKLOG);
        let server = crate::incoming::batch::Batcher::new().stream(server);
        let mut tee = Tee::new(server, vec![copy_tx]);
        let chunk = [7u8; 1000];
        let mut received = 0;
        for _ in 0..COPY_BACKLOG * 4 {
            client.write_all(&chunk).await.unwrap();
            let mut buf = [0u8; 1000];
            tee.read_exact(&mut buf).await.unwrap();
            received += buf.len();
        }
        assert_eq!(received, COPY_BACKLOG * 4 * 1000);
        assert!(tee.copies.is_empty(), "the stalled copy was dropped");
        let mut copy = CopyIo {
            copy_rx,
            pending: Vec::new(),
        };
        let mut copied = Vec::new();
        copy.read_to_end(&mut copied).await.unwrap();
        assert!(!copied.is_empty() && copied.len() <= COPY_BACKLOG * 1000);
        assert!(copied.iter().all(|b| *b == 7));
        // What the session answers goes nowhere.
        assert_eq!(copy.write(b"ignored").await.unwrap(), 7);
    }
}
