//! The thin tokio shell around the sans-I/O core: one task moves packets and runs smoltcp when
//! a packet arrives, a stream or flow did something, or smoltcp's own next deadline passes (no
//! fixed-interval timer); it never decides where a flow goes.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use smoltcp::iface::SocketHandle;
use smoltcp::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc};

use crate::core::{Core, CoreEvent, Decision};
use crate::packet::FlowKey;
use crate::{Config, Error};

/// Packets read from the app per wake-up before smoltcp runs, so egress is not starved.
const READ_BATCH: usize = 32;

/// Where the stack reads the app's packets and writes packets for it: the TUN device. The
/// stack's one task does both, between its runs of smoltcp, so a packet crosses no channel
/// and no other task on its way in or out.
pub trait PacketDevice: Send + 'static {
    /// Waits for at least one packet, then reads what is queued, up to `bufs.len()` packets
    /// without waiting again, one per buffer; returns how many. Each buffer comes empty with
    /// room for the largest packet (it may also be replaced by another holding the packet).
    /// `Ok(0)` or an error stops the stack. Must be cancel-safe: it is raced against the
    /// stack's other work, and a dropped call must not have taken a packet.
    fn recv(&mut self, bufs: &mut [Vec<u8>]) -> impl Future<Output = io::Result<usize>> + Send;

    /// Writes one packet; an error stops the stack.
    fn send(
        &mut self,
        packet: &[u8],
        checksum: TxChecksum,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// True once the device can take no more packets, so the stack stops even while idle.
    fn is_closed(&self) -> bool {
        false
    }
}

/// Where a packet's transport checksum stands when it is written to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxChecksum {
    /// Every checksum in the packet is complete.
    Complete,
    /// With [`crate::Config::tcp_checksum_offload`]: the checksum at `start + offset` holds only
    /// the pseudo-header sum, to be completed over the packet from `start` on (what a TUN with
    /// offload tells the kernel with `VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    Partial { start: u16, offset: u16 },
}

struct Shared {
    core: Mutex<Core>,
    /// streams and flows --"something changed"--> poll task
    wake: Notify,
    start: tokio::time::Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves the core usable enough to close down cleanly.
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// smoltcp time from tokio's clock, so tests can pause and advance it.
    fn now(&self) -> Instant {
        let micros = self.start.elapsed().as_micros();
        Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }
}

/// Where the app's packets go into a stack started with [`NetStack::spawn`].
#[derive(Clone)]
pub struct PacketSink {
    /// app --packets--> netstack
    from_app_tx: mpsc::UnboundedSender<Vec<u8>>,
}

impl PacketSink {
    /// Hands one raw IPv4/IPv6 packet to the stack; fails once the stack has stopped.
    pub fn send(&self, packet: Vec<u8>) -> Result<(), Error> {
        self.from_app_tx.send(packet).map_err(|_| Error::Closed)
    }
}

/// Where packets for the app come out of a stack started with [`NetStack::spawn`].
pub struct PacketSource {
    /// netstack --packets--> app
    to_app_rx: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl PacketSource {
    /// The next packet for the app; `None` once the stack has stopped.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.to_app_rx.recv().await
    }

    /// Appends up to `limit` packets to `out` (waiting for at least one); 0 once stopped.
    pub async fn recv_many(&mut self, out: &mut Vec<Vec<u8>>, limit: usize) -> usize {
        self.to_app_rx.recv_many(out, limit).await
    }

    /// A packet if one is ready now.
    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        self.to_app_rx.try_recv().ok()
    }
}

/// The device behind [`PacketSink`] and [`PacketSource`]: a pair of channels.
struct ChannelDevice {
    from_app_rx: mpsc::UnboundedReceiver<Vec<u8>>,
    to_app_tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Packets taken from the channel and not yet handed over.
    taken: Vec<Vec<u8>>,
}

impl PacketDevice for ChannelDevice {
    async fn recv(&mut self, bufs: &mut [Vec<u8>]) -> io::Result<usize> {
        // recv_many is cancel-safe, and nothing is awaited after it.
        if self
            .from_app_rx
            .recv_many(&mut self.taken, bufs.len())
            .await
            == 0
        {
            return Ok(0);
        }
        let n = self.taken.len();
        // Copied into the stack's own buffers, as a device's read is, so that they go on being
        // reused rather than each replaced by a packet-sized one.
        for (buf, packet) in bufs.iter_mut().zip(self.taken.drain(..)) {
            buf.clear();
            buf.extend_from_slice(&packet);
        }
        Ok(n)
    }

    async fn send(&mut self, packet: &[u8], _: TxChecksum) -> io::Result<()> {
        self.to_app_tx
            .send(packet.to_vec())
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }

    fn is_closed(&self) -> bool {
        self.to_app_tx.is_closed()
    }
}

/// A new flow from the app.
pub enum Event {
    Tcp(NewTcp),
    Udp(UdpFlow),
}

/// New flows, in arrival order.
pub struct Events {
    /// netstack --new flows--> caller
    events_rx: mpsc::UnboundedReceiver<Event>,
}

impl Events {
    /// The next new flow; `None` once the stack has stopped.
    pub async fn next(&mut self) -> Option<Event> {
        self.events_rx.recv().await
    }
}

/// The userspace TCP/IP stack.
pub struct NetStack;

impl NetStack {
    /// Starts the stack's task on the current tokio runtime, reading and writing the app's
    /// packets on `device`. It runs until the device fails or ends; then every stream fails
    /// with `ConnectionReset` and every UDP flow ends.
    pub fn spawn_on<D: PacketDevice>(
        config: Config,
        device: D,
    ) -> Result<(Events, Originator), Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let start = tokio::time::Instant::now();
        let shared = Arc::new(Shared {
            core: Mutex::new(Core::new(config, Instant::from_micros(0))),
            wake: Notify::new(),
            start,
        });
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        runtime.spawn(run(shared.clone(), device, events_tx));
        Ok((Events { events_rx }, Originator { shared }))
    }

    /// [`NetStack::spawn_on`] a pair of channels: the app's packets go into the [`PacketSink`],
    /// packets for it come out of the [`PacketSource`]. The stack stops when the sink (all
    /// clones) or the source is dropped.
    pub fn spawn(config: Config) -> Result<(PacketSink, PacketSource, Events, Originator), Error> {
        let (from_app_tx, from_app_rx) = mpsc::unbounded_channel();
        let (to_app_tx, to_app_rx) = mpsc::unbounded_channel();
        let device = ChannelDevice {
            from_app_rx,
            to_app_tx,
            taken: Vec::new(),
        };
        let (events, originator) = Self::spawn_on(config, device)?;
        Ok((
            PacketSink { from_app_tx },
            PacketSource { to_app_rx },
            events,
            originator,
        ))
    }
}

async fn run<D: PacketDevice>(
    shared: Arc<Shared>,
    mut device: D,
    events_tx: mpsc::UnboundedSender<Event>,
) {
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); READ_BATCH];
    let mut outgoing = VecDeque::new();
    let mut written = Vec::new();
    let mut events = Vec::new();
    let checksum_offload = shared.lock().tcp_checksum_offload();
    'serve: loop {
        let delay = {
            let mut core = shared.lock();
            for buf in written.drain(..) {
                core.recycle_written(buf);
            }
            for buf in bufs.iter_mut().filter(|buf| buf.capacity() == 0) {
                *buf = core.read_buffer();
            }
            let now = shared.now();
            core.poll(now);
            core.swap_transmit(&mut outgoing);
            while let Some(event) = core.pop_event() {
                events.push(event);
            }
            core.poll_delay(now)
        };
        for mut packet in outgoing.drain(..) {
            let checksum = match checksum_offload
                .then(|| crate::packet::leave_tcp_checksum(&mut packet))
                .flatten()
            {
                Some((start, offset)) => TxChecksum::Partial { start, offset },
                None => TxChecksum::Complete,
            };
            if let Err(error) = device.send(&packet, checksum).await {
                tracing::debug!(%error, "writing packets for the app ended");
                break 'serve;
            }
            written.push(packet);
        }
        // Outside the lock: an undeliverable NewTcp refuses itself on drop, which locks.
        for event in events.drain(..) {
            let event = match event {
                CoreEvent::NewTcp((src, dst)) => Event::Tcp(NewTcp {
                    src,
                    dst,
                    shared: shared.clone(),
                    decided: false,
                }),
                CoreEvent::NewUdp { key, id } => Event::Udp(UdpFlow {
                    src: key.0,
                    dst: key.1,
                    id,
                    shared: shared.clone(),
                }),
            };
            let _ = events_tx.send(event);
        }
        if device.is_closed() {
            break;
        }
        let sleep = async {
            match delay {
                Some(d) => tokio::time::sleep(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            read = device.recv(&mut bufs) => {
                let n = match read {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(error) => {
                        tracing::debug!(%error, "reading the app's packets ended");
                        break;
                    }
                };
                let mut core = shared.lock();
                let now = shared.now();
                for buf in &mut bufs[..n] {
                    core.ingest(now, std::mem::take(buf));
                }
            }
            _ = shared.wake.notified() => {
                // Woken by a stream, this task would run next (tokio's LIFO slot), before the
                // other streams woken in the same round (by one batch of frames from the link)
                // have written: yielding once lets them, so one poll serves them all.
                tokio::task::yield_now().await;
            }
            _ = sleep => {}
        }
    }
    shared.lock().close_all();
}

/// Opens TCP connections to the app. It does not keep the stack running: once the stack has
/// stopped, [`Originator::connect`] fails with [`Error::Closed`].
#[derive(Clone)]
pub struct Originator {
    shared: Arc<Shared>,
}

impl Originator {
    /// Connects to `app` (the app's own address and a port it listens on) as if from `peer`, and
    /// resolves once the app's kernel completed the handshake. Fails with `ConnectionRefused`
    /// when nothing listens there; dropping the future meanwhile resets the attempt. The
    /// stream's [`TcpStream::src`] is `app`, its [`TcpStream::dst`] is `peer`.
    pub async fn connect(&self, peer: SocketAddr, app: SocketAddr) -> io::Result<TcpStream> {
        let handle = {
            let mut core = self.shared.lock();
            core.originate(self.shared.now(), peer, app)
                .map_err(|e| io::Error::other(Error::from(e)))?
        };
        self.shared.wake.notify_one();
        // Owning the handle from here on: dropped before it is established, it aborts.
        let stream = TcpStream {
            src: app,
            dst: peer,
            handle,
            shared: self.shared.clone(),
            released: false,
        };
        std::future::poll_fn(|cx| stream.shared.lock().tcp_poll_connect(handle, cx)).await?;
        Ok(stream)
    }
}

/// A TCP connection attempt from the app, held until the caller decides. Dropping it undecided
/// refuses the connection.
pub struct NewTcp {
    /// The app's own address.
    pub src: SocketAddr,
    /// Where the app wants to go.
    pub dst: SocketAddr,
    shared: Arc<Shared>,
    decided: bool,
}

impl NewTcp {
    fn decide(&mut self, decision: Decision) -> Result<Option<SocketHandle>, Error> {
        self.decided = true;
        let result = {
            let mut core = self.shared.lock();
            core.decide(self.shared.now(), (self.src, self.dst), decision)
        };
        self.shared.wake.notify_one();
        Ok(result?)
    }

    /// Completes the app's handshake; the returned stream carries the connection's bytes.
    pub fn accept(mut self) -> Result<TcpStream, Error> {
        let handle = self.decide(Decision::Accept)?.ok_or(Error::Closed)?;
        Ok(TcpStream {
            src: self.src,
            dst: self.dst,
            handle,
            shared: self.shared.clone(),
            released: false,
        })
    }

    /// Answers with an RST: the app's connect fails with ECONNREFUSED.
    pub fn refuse(mut self) {
        if let Err(e) = self.decide(Decision::Refuse) {
            tracing::debug!(error = %e, "could not refuse a TCP connection");
        }
    }

    /// Answers with an ICMP(v6) destination unreachable: the app's connect fails with
    /// EHOSTUNREACH.
    pub fn unreachable(mut self) {
        if let Err(e) = self.decide(Decision::Unreachable) {
            tracing::debug!(error = %e, "could not answer a TCP connection as unreachable");
        }
    }
}

impl Drop for NewTcp {
    fn drop(&mut self) {
        if !self.decided {
            let _ = self.decide(Decision::Refuse);
        }
    }
}

/// One TCP connection with the app, accepted from it or opened to it by an [`Originator`].
/// Reading returns what the app sent (EOF after its
/// FIN, `ConnectionReset` after its RST); `shutdown` sends a FIN. Dropping it after `shutdown`
/// with nothing left unread closes cleanly; any other drop, or [`TcpStream::abort`], resets
/// the app's connection.
pub struct TcpStream {
    src: SocketAddr,
    dst: SocketAddr,
    handle: SocketHandle,
    shared: Arc<Shared>,
    released: bool,
}

impl TcpStream {
    /// The app's own address.
    pub fn src(&self) -> SocketAddr {
        self.src
    }

    /// The other end: the destination the app connected to, or the peer an originated
    /// connection comes from.
    pub fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// Resets the app's connection now (it sees ECONNRESET).
    pub fn abort(mut self) {
        self.release(true);
    }

    fn release(&mut self, abort: bool) {
        if !self.released {
            self.released = true;
            self.shared.lock().tcp_release(self.handle, abort);
            self.shared.wake.notify_one();
        }
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        self.release(false);
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Filled in place: `buf` is not zeroed first.
        let result = this.shared.lock().tcp_poll_read_into(this.handle, cx, buf);
        match result {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    // Freed receive space may need a window update.
                    this.shared.wake.notify_one();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = this.shared.lock().tcp_poll_write(this.handle, cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.shared.wake.notify_one();
        }
        result
    }

    /// As many of the slices as smoltcp's buffer takes, under one lock and with one wake-up of
    /// the stack's task.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut core = this.shared.lock();
        let mut written = 0;
        for buf in bufs.iter().filter(|buf| !buf.is_empty()) {
            match core.tcp_poll_write(this.handle, cx, buf) {
                Poll::Ready(Ok(n)) => {
                    written += n;
                    if n < buf.len() {
                        break;
                    }
                }
                // What was written counts; the error or the wait shows on the next write.
                other if written == 0 => return other,
                _ => break,
            }
        }
        drop(core);
        if written > 0 {
            this.shared.wake.notify_one();
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are already in smoltcp's buffer and the poll task has been woken.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shared.lock().tcp_shutdown(this.handle);
        this.shared.wake.notify_one();
        Poll::Ready(Ok(()))
    }
}

/// Datagrams between one app socket and one destination. Dropping it forgets the flow (a later
/// datagram starts a new one).
pub struct UdpFlow {
    /// The app's own address.
    pub src: SocketAddr,
    /// Where the app sent its datagrams.
    pub dst: SocketAddr,
    id: u64,
    shared: Arc<Shared>,
}

impl UdpFlow {
    fn key(&self) -> FlowKey {
        (self.src, self.dst)
    }

    /// The next datagram payload from the app; `None` once the flow expired or the stack
    /// stopped.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        std::future::poll_fn(|cx| self.shared.lock().udp_poll_recv(self.key(), self.id, cx)).await
    }

    /// Sends `payload` to the app, from the flow's original destination.
    pub fn send(&self, payload: &[u8]) -> Result<(), Error> {
        self.shared
            .lock()
            .udp_send(self.shared.now(), self.key(), self.id, payload)?;
        self.shared.wake.notify_one();
        Ok(())
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.shared.lock().udp_release(self.key(), self.id);
    }
}
