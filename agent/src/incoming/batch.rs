//! Writes to redirected connections (to clients and to the original app) held until the
//! agent's runtime has run every task that was ready, then sent together. It must never lose,
//! reorder or indefinitely delay a byte a writer was told was taken.
//!
//! Why: the agent relays many small messages between processes that share few CPUs. Sent one at
//! a time, each send wakes its reader, which preempts the agent to read that one message and
//! sleeps again: two context switches per message for the agent, the client and the app alike.
//! Sent in a burst at the end of a round, each reader wakes once for all its messages, as with
//! an event-loop proxy like HAProxy (which sends after processing each round of events).
//!
//! How: a write is copied into the stream's buffer and the stream queued on its [`Batcher`];
//! the first write of a round spawns a task that yields to the runtime (so it runs after every
//! task already ready, or at the latest at the runtime's next periodic I/O check) and then sends
//! every queued buffer. `poll_flush` succeeds once the bytes are queued: they leave before the
//! runtime waits for anything, so a writer that waits for an answer after flushing gets it.
//! What the socket cannot take at once is sent by a task of its own as the socket drains; until
//! then writes, flushes and a shutdown wait (that is the backpressure). A send's error is the
//! writer's next result. Large writes to an empty buffer go out at once, and a buffer stops
//! taking bytes at [`BUFFER_LIMIT`].

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

/// Most bytes a stream holds; a write beyond waits until the socket took them.
const BUFFER_LIMIT: usize = 256 * 1024;
/// A write at least this large, to a stream holding nothing, is sent at once: it is no small
/// message to batch, and copying it would only cost.
const DIRECT_WRITE: usize = 16 * 1024;
/// How long bytes still held when their stream is dropped may wait for the peer to take them,
/// as the kernel's own send buffer would keep them after a close.
const LINGER: Duration = Duration::from_secs(30);

/// The streams of one runtime with bytes waiting for the end of the round. A send is spawned
/// whenever the first stream joins an empty queue: the send takes the whole queue at once.
#[derive(Default)]
pub struct Batcher {
    queued: Mutex<Vec<Arc<Shared>>>,
}

impl Batcher {
    pub fn new() -> Arc<Batcher> {
        Arc::default()
    }

    /// Wraps a connected stream; its reads are the stream's own.
    pub fn stream(self: &Arc<Self>, stream: TcpStream) -> BatchedStream {
        let (read, write) = stream.into_split();
        BatchedStream {
            read,
            shared: Arc::new(Shared {
                write: Some(write),
                out: Mutex::new(Out::default()),
                dropped: Notify::new(),
            }),
            batcher: self.clone(),
        }
    }

    fn queue(self: &Arc<Self>, shared: Arc<Shared>) {
        let first = {
            let mut queued = lock(&self.queued);
            queued.push(shared);
            queued.len() == 1
        };
        if first {
            let batcher = self.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                batcher.send_queued();
            });
        }
    }

    /// The end of the round: every queued stream sends what it holds.
    fn send_queued(&self) {
        let queued = std::mem::take(&mut *lock(&self.queued));
        for shared in queued {
            let mut out = lock(&shared.out);
            out.queued = false;
            shared.send_or_stall(&mut out);
        }
    }
}

/// What a stream's writer and the tasks that send for it share.
struct Shared {
    /// `Some` until dropped: dropping it would shut the stream down, so it is forgotten instead
    /// and the stream closes with its read half.
    write: Option<OwnedWriteHalf>,
    out: Mutex<Out>,
    /// Tells a stalled stream's sender that its writer is gone, so its wait gets a deadline.
    dropped: Notify,
}

#[derive(Default)]
struct Out {
    buf: BytesMut,
    /// In the batcher's queue for the end of this round.
    queued: bool,
    /// The socket would not take all of `buf`: a [`send_stalled`] task sends the rest.
    stalled: bool,
    /// The [`BatchedStream`] is gone; what it held is sent all the same.
    dropped: bool,
    /// A send failed; the writer's next write or flush returns it.
    error: Option<io::Error>,
    /// The writer's task while it waits for a stalled send.
    writer: Option<Waker>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain buffers: a panic while holding one leaves nothing half-updated worth refusing over.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn tcp(&self) -> &TcpStream {
        // `write` is only taken in `drop`.
        self.write
            .as_ref()
            .map(AsRef::as_ref)
            .expect("taken only in drop")
    }

    /// Sends what the buffer holds without waiting; what the socket does not take is left to a
    /// [`send_stalled`] task. An error ends the sending and waits for the writer.
    fn send_or_stall(self: &Arc<Self>, out: &mut Out) {
        match self.try_send(out) {
            Ok(true) => {}
            Ok(false) => {
                out.stalled = true;
                tokio::spawn(send_stalled(self.clone()));
            }
            Err(error) => {
                out.buf.clear();
                out.error = Some(error);
            }
        }
    }

    /// Sends what the buffer holds, without waiting: `Ok(true)` once it is empty.
    fn try_send(&self, out: &mut Out) -> io::Result<bool> {
        while !out.buf.is_empty() {
            match self.tcp().try_write(&out.buf) {
                Ok(sent) => out.buf.advance(sent),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(error) => return Err(error),
            }
        }
        Ok(true)
    }

    /// Whether the writer may go on: `Pending` while a stalled send is under way, the error of
    /// a send that failed.
    fn poll_sent(&self, cx: &mut Context<'_>, out: &mut Out) -> Poll<io::Result<()>> {
        if let Some(error) = out.error.take() {
            return Poll::Ready(Err(error));
        }
        if out.stalled {
            out.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(write) = self.write.take() {
            write.forget();
        }
    }
}

/// Sends a stalled stream's bytes as the socket takes them, then wakes its writer. Once the
/// writer is gone, the peer gets [`LINGER`] to take the rest.
async fn send_stalled(shared: Arc<Shared>) {
    let mut deadline = None;
    let ended = loop {
        {
            let mut out = lock(&shared.out);
            match shared.try_send(&mut out) {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(error) => break Err(error),
            }
            if out.dropped && deadline.is_none() {
                deadline = Some(Instant::now() + LINGER);
            }
        }
        let writable = shared.tcp().writable();
        let waited = match deadline {
            None => tokio::select! {
                writable = writable => writable,
                () = shared.dropped.notified() => Ok(()),
            },
            Some(deadline) => tokio::time::timeout_at(deadline, writable)
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
        };
        if let Err(error) = waited {
            break Err(error);
        }
    };
    let mut out = lock(&shared.out);
    out.stalled = false;
    if let Err(error) = ended {
        if out.dropped {
            debug!("bytes of a closed connection not sent: {error}");
        }
        out.buf.clear();
        out.error = Some(error);
    }
    if let Some(writer) = out.writer.take() {
        writer.wake();
    }
}

/// A TCP stream whose writes go out at the end of the runtime's round (see the module docs).
pub struct BatchedStream {
    read: OwnedReadHalf,
    shared: Arc<Shared>,
    batcher: Arc<Batcher>,
}

impl AsyncRead for BatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for BatchedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let shared = &self.shared;
        let mut out = lock(&shared.out);
        ready!(shared.poll_sent(cx, &mut out))?;
        if out.buf.is_empty() && data.len() >= DIRECT_WRITE {
            drop(out);
            return poll_write_direct(shared.tcp(), cx, data);
        }
        if out.buf.len() + data.len() > BUFFER_LIMIT {
            shared.send_or_stall(&mut out);
            ready!(shared.poll_sent(cx, &mut out))?;
        }
        out.buf.extend_from_slice(data);
        if !out.queued {
            out.queued = true;
            drop(out);
            self.batcher.queue(shared.clone());
        }
        Poll::Ready(Ok(data.len()))
    }

    /// Done once the bytes are queued for the end of the round (see the module docs).
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &self.shared;
        shared.poll_sent(cx, &mut lock(&shared.out))
    }

    /// Sends everything held first, as a shutdown comes after the bytes written before it.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &self.shared;
        let mut out = lock(&shared.out);
        ready!(shared.poll_sent(cx, &mut out))?;
        shared.send_or_stall(&mut out);
        ready!(shared.poll_sent(cx, &mut out))?;
        match nix::sys::socket::shutdown(
            shared.tcp().as_raw_fd(),
            nix::sys::socket::Shutdown::Write,
        ) {
            // The peer is gone already: nothing is left to shut.
            Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Poll::Ready(Ok(())),
            Err(errno) => Poll::Ready(Err(errno.into())),
        }
    }
}

impl Drop for BatchedStream {
    /// What the stream still holds is sent all the same: by the round's send if queued, by the
    /// stalled send if there is one (now with a deadline).
    fn drop(&mut self) {
        let mut out = lock(&self.shared.out);
        out.dropped = true;
        out.writer = None;
        if out.stalled {
            self.shared.dropped.notify_one();
        }
    }
}

/// A write straight to the socket, for what is not worth batching.
fn poll_write_direct(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    data: &[u8],
) -> Poll<io::Result<usize>> {
    loop {
        match tcp.try_write(data) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                ready!(tcp.poll_write_ready(cx))?
            }
            sent => return Poll::Ready(sent),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A batched stream and its peer.
    async fn pair() -> (BatchedStream, TcpStream) {
        let (near, far) = crate::incoming::tcp_pair().await;
        (Batcher::new().stream(near), far)
    }

    /// Bytes that tell where they were in the stream, so a lost or moved byte shows.
    fn numbered(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn small_writes_leave_together_at_the_end_of_the_round() {
        let (mut near, mut far) = pair().await;
        for word in [&b"one "[..], b"two ", b"three"] {
            near.write_all(word).await.unwrap();
        }
        near.flush().await.unwrap();
        // This task has not yielded yet: the round is not over.
        let mut buf = [0u8; 64];
        let early = far.try_read(&mut buf).unwrap_err();
        assert_eq!(early.kind(), io::ErrorKind::WouldBlock);
        let mut got = [0u8; 13];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one two three");
    }

    /// A reader slower than the writer holds it back (the socket's and the buffer's limits),
    /// and gets every byte in order: small writes through the buffer, large ones direct.
    #[tokio::test]
    async fn a_slow_reader_gets_every_byte_in_order() {
        let (mut near, mut far) = pair().await;
        let data = numbered(8 * 1024 * 1024);
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            let mut rest = &data[..];
            for size in [1000, 20_000].into_iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, after) = rest.split_at(size.min(rest.len()));
                near.write_all(chunk).await?;
                rest = after;
            }
            near.shutdown().await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes lost or reordered");
    }

    /// Dropping a stream loses nothing it took: what it still held when the peer stopped
    /// reading follows once the peer reads again, then the end.
    #[tokio::test]
    async fn a_dropped_stream_still_sends_what_it_took() {
        let (mut near, mut far) = pair().await;
        let data = numbered(64 * 1024 * 1024);
        let mut taken = 0;
        // Until the socket and the buffer are full: the last write waits for the peer.
        while let Ok(written) = tokio::time::timeout(
            Duration::from_millis(50),
            near.write(&data[taken..taken + 1000]),
        )
        .await
        {
            taken += written.unwrap();
        }
        drop(near);
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), taken);
        assert!(got == data[..taken], "bytes lost or reordered");
    }

    /// A writer that waits for the answer after its last write, as an HTTP client does, gets
    /// it even when the socket would not take that write at once: nobody else writes to the
    /// stream, so the bytes must go out on their own.
    #[tokio::test]
    async fn a_stalled_send_goes_out_while_the_writer_waits_to_read() {
        let (mut near, mut far) = pair().await;
        let request = numbered(16 * 1024 * 1024);
        let expected = request.len();
        let peer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut got = vec![0u8; expected];
            far.read_exact(&mut got).await?;
            far.write_all(b"answer").await?;
            io::Result::Ok(got)
        });
        for chunk in request.chunks(1000) {
            near.write_all(chunk).await.unwrap();
        }
        near.flush().await.unwrap();
        let mut answer = [0u8; 6];
        near.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"answer");
        assert!(
            peer.await.unwrap().unwrap() == request,
            "bytes lost or reordered"
        );
    }

    /// A peer that reset the connection is the writer's error, on a later write or flush.
    #[tokio::test]
    async fn a_failed_send_is_the_writers_next_error() {
        let (mut near, far) = pair().await;
        nix::sys::socket::setsockopt(
            &far,
            nix::sys::socket::sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .unwrap();
        drop(far);
        let mut failed = None;
        for _ in 0..100 {
            let written = async {
                near.write_all(b"hello").await?;
                near.flush().await
            };
            if let Err(error) = written.await {
                failed = Some(error);
                break;
            }
            tokio::task::yield_now().await;
        }
        let kind = failed.expect("the reset was never reported").kind();
        assert!(
            matches!(
                kind,
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{kind:?}"
        );
    }
}
