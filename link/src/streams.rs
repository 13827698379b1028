//! Byte and datagram pipes between a local socket and one stream of the multiplexed
//! connection, under the protocol's per-stream credit flow control. Used by both ends; a stream
//! never sends beyond the credit its peer granted, and never blocks another stream.

use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use mirrord_protocol::bulk::MAX_DATA_CHUNK;
use mirrord_protocol::mux::{DATAGRAM_WINDOW, DataVerdict, Kind, Mux, Side};
use mirrord_protocol::{
    ClientMessage, ProtocolError, RemoteError, StreamFrame, StreamId, StreamTarget,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::frames::{Outbound, write_all_slices};

/// Why a stream we asked for did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{}", .0.message)]
    Remote(RemoteError),
    #[error("the connection ended before the stream opened")]
    Lost,
}

/// A message type that can carry a stream frame: each direction wraps frames in its own enum.
pub trait Outgoing: Outbound {
    fn stream(frame: StreamFrame) -> Self;
}

impl Outgoing for ClientMessage {
    fn stream(frame: StreamFrame) -> Self {
        ClientMessage::Stream(frame)
    }
}

/// A datagram socket a stream can carry: each direction one datagram per `Data` frame.
pub trait Datagrams: Send {
    /// The next datagram; `None` when the socket is done. Must be cancel-safe: it is raced
    /// against datagrams from the peer.
    fn recv(&mut self) -> impl std::future::Future<Output = Option<Vec<u8>>> + Send;
    fn send(
        &mut self,
        datagram: &[u8],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

impl Datagrams for tokio::net::UdpSocket {
    async fn recv(&mut self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        match tokio::net::UdpSocket::recv(self, &mut buf).await {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            // A connected UDP socket reports an ICMP error from the peer here; the flow ends.
            Err(error) => {
                tracing::debug!(%error, "UDP receive failed");
                None
            }
        }
    }

    async fn send(&mut self, datagram: &[u8]) -> std::io::Result<()> {
        tokio::net::UdpSocket::send(self, datagram).await.map(drop)
    }
}

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65535;

/// How much one read from a stream's socket asks for: little for a connection that carries
/// small messages or waits (a thousand idle connections cost a thousand of these), the
/// largest frame for one that fills every read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadSize(usize);

impl ReadSize {
    const MIN: usize = 4 * 1024;

    fn get(self) -> usize {
        self.0
    }

    /// Doubles after a read that filled the whole size, halves after one that used less than a
    /// quarter of it; a read the peer's credit cut short says nothing.
    fn after(&mut self, read: usize, asked: usize) {
        if asked < self.0 {
            return;
        }
        if read == asked {
            self.0 = (self.0 * 2).min(MAX_DATA_CHUNK);
        } else if read < self.0 / 4 {
            self.0 = (self.0 / 2).max(Self::MIN);
        }
    }
}

impl Default for ReadSize {
    fn default() -> Self {
        Self(Self::MIN)
    }
}

/// What a pipe holds to read into while its socket has nothing for it: a thousand connections
/// waiting must not each hold a frame's worth.
const WAITING_READ: usize = ReadSize::MIN;

/// Reads at most `allowed` bytes (more than 0) into a buffer of their own, which becomes the
/// `Data` frame as it is; empty at the end of the stream. Bytes already there are read straight
/// into a buffer of `allowed`; otherwise the wait is on a small buffer, and once that fills,
/// what else has arrived by then is read after it. A buffer much larger than what it got is
/// shrunk, since it may wait in the writer's queue.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    allowed: usize,
) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(allowed);
    if let Some(read) = read_if_ready(reader, &mut buf, allowed).await {
        read?;
        return Ok(fit(buf));
    }
    drop(buf);
    let mut buf = Vec::with_capacity(allowed.min(WAITING_READ));
    let limit = buf.capacity().min(allowed);
    (&mut *reader).take(limit as u64).read_buf(&mut buf).await?;
    if buf.len() < limit || limit == allowed {
        return Ok(buf);
    }
    buf.reserve_exact(allowed - buf.len());
    // An error after bytes were read shows up on the next read; these bytes go first.
    let _ = read_if_ready(reader, &mut buf, allowed).await;
    Ok(fit(buf))
}

/// Reads into `buf`'s spare capacity, up to `limit` bytes in all, if the reader has something
/// (data, the end, or an error) right now; `None` if it would wait. Reads into the spare
/// capacity, so nothing is zeroed first.
async fn read_if_ready<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> Option<std::io::Result<usize>> {
    let room = limit.saturating_sub(buf.len()) as u64;
    let mut taken = (&mut *reader).take(room);
    let mut read = std::pin::pin!(taken.read_buf(buf));
    // Polled once with the task's own waker; an AsyncRead that returns Pending has taken
    // nothing, so dropping the read then loses no bytes.
    match std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await {
        std::task::Poll::Ready(read) => Some(read),
        std::task::Poll::Pending => None,
    }
}

/// A frame's buffer with no more than twice the capacity its bytes need.
fn fit(mut buf: Vec<u8>) -> Vec<u8> {
    if buf.len() < buf.capacity() / 2 {
        buf.shrink_to_fit();
    }
    buf
}

/// Most data frames one write to a stream's socket carries: a bound on the slices of one
/// `writev`, far below `IOV_MAX`, that still takes a whole window of full frames.
const PEER_WRITE_FRAMES: usize = 16;

/// Writes every buffer of `bufs`, in order, in as few vectored writes as the writer takes.
/// Empty ones (a peer may send empty frames) are left out, so a batch of nothing writes nothing.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bufs: &[Vec<u8>],
) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = bufs
        .iter()
        .filter(|buf| !buf.is_empty())
        .map(|buf| IoSlice::new(buf))
        .collect();
    write_all_slices(writer, &mut slices).await
}

/// What the connection hands to one stream's pipe.
#[derive(Debug)]
enum Inbound {
    Data(Vec<u8>),
    Shutdown,
    Reset,
}

struct StreamEnd {
    /// connection --inbound data--> stream pipe. Unbounded because the sender may only send
    /// what we granted: memory is bounded by the mux window, not by the channel.
    inbound_tx: mpsc::UnboundedSender<Inbound>,
    /// Woken when the peer grants credit, so the pipe can send again.
    credit: Arc<Notify>,
}

/// The streams of one connection.
pub struct Streams<M> {
    mux: Mutex<Mux>,
    ends: Mutex<HashMap<StreamId, StreamEnd>>,
    /// Streams we opened that the peer has not answered yet.
    opening: Mutex<HashMap<StreamId, oneshot::Sender<Result<(), RemoteError>>>>,
    /// streams --frames--> connection writer.
    out_tx: mpsc::Sender<M>,
    /// Set by [`Streams::reset_all`]: the connection is gone, and no stream opens any more.
    ended: AtomicBool,
}

/// The receiving half of a stream, handed to [`Streams::pipe`].
pub struct StreamRx {
    id: StreamId,
    inbound_rx: mpsc::UnboundedReceiver<Inbound>,
    credit: Arc<Notify>,
}

impl StreamRx {
    pub fn id(&self) -> StreamId {
        self.id
    }
}

/// How a pipe ended early.
enum Abort {
    /// The peer reset the stream; nothing to tell it.
    ByPeer,
    /// Our side failed; the peer gets a Reset.
    Local,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain maps behind, still consistent enough to
    // tear streams down, so poisoning is not worth propagating.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<M: Outgoing> Streams<M> {
    pub fn new(side: Side, out_tx: mpsc::Sender<M>) -> Arc<Self> {
        Arc::new(Self {
            mux: Mutex::new(Mux::new(side)),
            ends: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            out_tx,
            ended: AtomicBool::new(false),
        })
    }

    /// Registers a stream the peer opened to `target`; its pipe is started with
    /// [`Streams::pipe`] (or [`Streams::pipe_datagrams`] for UDP).
    pub fn accept(&self, id: StreamId, target: &StreamTarget) -> Result<StreamRx, ProtocolError> {
        lock(&self.mux).on_open(id, Kind::of(target))?;
        Ok(self.register(id))
    }

    /// Opens a stream to `target` on the peer's side and waits until it is connected; its pipe
    /// is then started with [`Streams::pipe`].
    pub async fn open(&self, target: StreamTarget) -> Result<StreamRx, OpenError> {
        let id = lock(&self.mux).open(Kind::of(&target));
        // Registered before asking, so data that follows `Opened` at once has a place to go.
        let rx = self.register(id);
        let (opened_tx, opened_rx) = oneshot::channel();
        lock(&self.opening).insert(id, opened_tx);
        // `reset_all` marks the end before it drops the openers: an open registered after
        // that is refused here, one registered before is dropped there. None waits on a
        // connection that is gone but still takes writes.
        let opened = if self.ended.load(Ordering::SeqCst) {
            Err(OpenError::Lost)
        } else if self.send(StreamFrame::Open { id, target }).await {
            match opened_rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(OpenError::Remote(error)),
                Err(_) => Err(OpenError::Lost),
            }
        } else {
            Err(OpenError::Lost)
        };
        if opened.is_err() {
            lock(&self.opening).remove(&id);
            self.discard(id);
        }
        opened.map(|()| rx)
    }

    fn register(&self, id: StreamId) -> StreamRx {
        let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Notify::new());
        lock(&self.ends).insert(
            id,
            StreamEnd {
                inbound_tx,
                credit: credit.clone(),
            },
        );
        StreamRx {
            id,
            inbound_rx,
            credit,
        }
    }

    /// Resets an opened stream that will never get a pipe.
    pub async fn abandon(&self, rx: StreamRx) {
        self.send(StreamFrame::Reset { id: rx.id }).await;
        self.discard(rx.id);
    }

    /// Forgets a stream that never got a pipe (e.g. its connect failed).
    pub fn discard(&self, id: StreamId) {
        lock(&self.ends).remove(&id);
        lock(&self.mux).close(id);
    }

    /// Sends one frame to the peer; false when the connection is gone.
    pub async fn send(&self, frame: StreamFrame) -> bool {
        self.out_tx.send(M::stream(frame)).await.is_ok()
    }

    /// Queues one frame for the peer without waiting; false when the writer's queue is full or
    /// the connection is gone.
    pub fn try_send(&self, frame: StreamFrame) -> bool {
        self.out_tx.try_send(M::stream(frame)).is_ok()
    }

    /// Routes an incoming frame to its stream. `Open` is the caller's to handle (only it knows
    /// how to reach a target) and is rejected here.
    pub fn on_frame(&self, frame: StreamFrame) -> Result<(), ProtocolError> {
        match frame {
            StreamFrame::Data { id, bytes } => {
                if lock(&self.mux).on_data(id, bytes.len())? == DataVerdict::Deliver {
                    self.deliver(id, Inbound::Data(bytes));
                }
            }
            StreamFrame::Credit { id, bytes } => {
                let mut mux = lock(&self.mux);
                if mux.contains(id) {
                    mux.on_credit(id, bytes)?;
                    drop(mux);
                    if let Some(end) = lock(&self.ends).get(&id) {
                        end.credit.notify_one();
                    }
                }
            }
            StreamFrame::Shutdown { id } => self.deliver(id, Inbound::Shutdown),
            StreamFrame::Reset { id } => self.deliver(id, Inbound::Reset),
            StreamFrame::Opened { id } => self.answer_open(id, Ok(()))?,
            StreamFrame::OpenFailed { id, error } => self.answer_open(id, Err(error))?,
            StreamFrame::Open { .. } => {
                return Err(ProtocolError::UnexpectedMessage("stream open frame"));
            }
        }
        Ok(())
    }

    fn answer_open(
        &self,
        id: StreamId,
        answer: Result<(), RemoteError>,
    ) -> Result<(), ProtocolError> {
        let opener = lock(&self.opening)
            .remove(&id)
            .ok_or(ProtocolError::UnknownStream(id))?;
        // The opener may have given up meanwhile; its `open` cleans up after itself.
        let _ = opener.send(answer);
        Ok(())
    }

    fn deliver(&self, id: StreamId, item: Inbound) {
        if let Some(end) = lock(&self.ends).get(&id) {
            // The pipe may have just ended; late frames for it are dropped, as after a reset.
            let _ = end.inbound_tx.send(item);
        }
    }

    /// Resets every stream, for when the connection ends: their pipes stop and drop their sockets.
    pub fn reset_all(&self) {
        self.ended.store(true, Ordering::SeqCst);
        // Dropping the senders fails every pending `open` with `Lost`.
        lock(&self.opening).clear();
        for end in lock(&self.ends).values() {
            let _ = end.inbound_tx.send(Inbound::Reset);
        }
    }

    /// Carries datagrams both ways between `socket` and the stream, one per `Data` frame, until
    /// either side ends. A datagram waits for credit for all of it, so flow control never has to
    /// split one: the peer's window is never below the largest datagram, and it tops the credit
    /// up to the whole window whenever it has drained what it was sent ([`Kind::Datagrams`]).
    pub async fn pipe_datagrams<D: Datagrams>(self: Arc<Self>, mut socket: D, rx: StreamRx) {
        let StreamRx {
            id,
            mut inbound_rx,
            credit,
        } = rx;
        // A datagram read from the socket that waits for credit.
        let mut waiting: Option<Vec<u8>> = None;
        let peer_reset = loop {
            if let Some(datagram) = waiting
                .take_if(|datagram| lock(&self.mux).send_credit(id) as usize >= datagram.len())
            {
                lock(&self.mux).take_send_credit(id, datagram.len());
                if !self
                    .send(StreamFrame::Data {
                        id,
                        bytes: datagram,
                    })
                    .await
                {
                    break false;
                }
            }
            tokio::select! {
                datagram = socket.recv(), if waiting.is_none() => {
                    let Some(datagram) = datagram else { break false };
                    if datagram.len() > DATAGRAM_WINDOW as usize {
                        tracing::debug!(?id, len = datagram.len(), "datagram too large for one frame; dropped");
                        continue;
                    }
                    waiting = Some(datagram);
                }
                () = credit.notified(), if waiting.is_some() => {}
                item = inbound_rx.recv() => match item {
                    Some(Inbound::Data(datagram)) => {
                        // A lost datagram is UDP's normal weather; a send error ends nothing.
                        if let Err(error) = socket.send(&datagram).await {
                            tracing::debug!(?id, %error, "UDP send failed");
                        }
                        let grant = lock(&self.mux).on_consumed(id, datagram.len());
                        if let Some(grant) = grant
                            && !self.send(grant).await
                        {
                            break false;
                        }
                    }
                    Some(Inbound::Shutdown) | Some(Inbound::Reset) | None => break true,
                },
            }
        };
        if !peer_reset {
            self.send(StreamFrame::Reset { id }).await;
        }
        self.discard(id);
    }

    /// Pipes bytes both ways between `io` and the stream until both directions are shut down or
    /// either side resets. Sends only against credit; grants credit back as `io` drains.
    pub async fn pipe<S: AsyncRead + AsyncWrite>(self: Arc<Self>, io: S, rx: StreamRx) {
        let StreamRx {
            id,
            mut inbound_rx,
            credit,
        } = rx;
        let (mut reader, mut writer) = tokio::io::split(io);

        let to_peer = async {
            let mut size = ReadSize::default();
            loop {
                let allowed = loop {
                    let available = lock(&self.mux).send_credit(id) as usize;
                    if available > 0 {
                        break available.min(size.get());
                    }
                    credit.notified().await;
                };
                match read_frame(&mut reader, allowed).await {
                    Ok(buf) if buf.is_empty() => {
                        return if self.send(StreamFrame::Shutdown { id }).await {
                            Ok(())
                        } else {
                            Err(Abort::Local)
                        };
                    }
                    Ok(buf) => {
                        let n = buf.len();
                        // Only this task sends on the stream, so the credit seen above is still there.
                        lock(&self.mux).take_send_credit(id, n);
                        size.after(n, allowed);
                        if !self.send(StreamFrame::Data { id, bytes: buf }).await {
                            return Err(Abort::Local);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(?id, %error, "stream read failed");
                        return Err(Abort::Local);
                    }
                }
            }
        };

        let from_peer = async {
            // The data frames of one write, and what came after them in the queue.
            let mut batch = Vec::new();
            let mut after = None;
            loop {
                let item = match after.take() {
                    Some(item) => item,
                    None => match inbound_rx.recv().await {
                        Some(item) => item,
                        None => return Err(Abort::ByPeer),
                    },
                };
                match item {
                    Inbound::Data(bytes) => {
                        // The frames already queued behind this one go in the same write: the
                        // socket's peer is woken once for them, not once per frame.
                        let mut len = bytes.len();
                        batch.push(bytes);
                        while batch.len() < PEER_WRITE_FRAMES {
                            match inbound_rx.try_recv() {
                                Ok(Inbound::Data(bytes)) => {
                                    len += bytes.len();
                                    batch.push(bytes);
                                }
                                Ok(other) => {
                                    after = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        if let Err(error) = write_all_vectored(&mut writer, &batch).await {
                            tracing::debug!(?id, %error, "stream write failed");
                            return Err(Abort::Local);
                        }
                        batch.clear();
                        let grant = lock(&self.mux).on_consumed(id, len);
                        if let Some(grant) = grant
                            && !self.send(grant).await
                        {
                            return Err(Abort::Local);
                        }
                    }
                    Inbound::Shutdown => {
                        let _ = writer.shutdown().await;
                        return Ok(());
                    }
                    Inbound::Reset => return Err(Abort::ByPeer),
                }
            }
        };

        if let Err(Abort::Local) = tokio::try_join!(to_peer, from_peer) {
            self.send(StreamFrame::Reset { id }).await;
        }
        self.discard(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grow_while_they_fill_and_shrink_when_they_do_not() {
        let mut size = ReadSize::default();
        for want in [8, 16, 32, 64, 128, 256, 256] {
            let asked = size.get();
            size.after(asked, asked);
            assert_eq!(size.get(), want * 1024);
        }
        // A read cut short by the peer's credit says nothing about the connection.
        size.after(1000, 1000);
        assert_eq!(size.get(), MAX_DATA_CHUNK);
        size.after(MAX_DATA_CHUNK / 3, MAX_DATA_CHUNK);
        assert_eq!(size.get(), MAX_DATA_CHUNK, "a third full");
        for want in [128, 64, 32, 16, 8, 4, 4] {
            size.after(100, size.get());
            assert_eq!(size.get(), want * 1024);
        }
    }

    #[tokio::test]
    async fn nothing_opens_once_the_connection_is_gone() {
        // The writer still takes frames, as a port-forward does after its pod is gone.
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let streams = Streams::<ClientMessage>::new(Side::Client, out_tx);
        streams.reset_all();
        let opened = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            streams.open(StreamTarget::Tcp(([127, 0, 0, 1], 80).into())),
        )
        .await
        .expect("an open on a gone connection must not wait");
        assert!(matches!(opened, Err(OpenError::Lost)));
        assert!(out_rx.try_recv().is_err(), "nothing is sent for it");
    }
}
