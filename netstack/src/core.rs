//! The sans-I/O heart of the stack: raw IP packets and the current time go in, raw IP packets,
//! new-flow events and socket data come out; it never touches a clock, a channel or a task.
//!
//! smoltcp runs in any-IP mode. A connection-opening SYN is held here until the caller decides
//! (accept / refuse / unreachable), so the app only sees a SYN-ACK once the remote side exists.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::task::{Context, Poll, Waker};

use smoltcp::iface::{Config as IfaceConfig, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpListenEndpoint};

use crate::Config;
use crate::buffers::{Pool, Region};
use crate::capacity::Capacity;
use crate::packet::{self, FlowKey, Inbound, PacketError, TcpSegment};

/// A connection whose buffers have been empty and untouched this long gives their memory back.
const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// How the caller answered a held SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Accept,
    Refuse,
    Unreachable,
}

/// Something the caller must hear about.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CoreEvent {
    /// A SYN to a new 4-tuple is held until `decide` is called for `key`.
    NewTcp(FlowKey),
    /// The first datagram of a new UDP flow arrived (it is already queued on the flow).
    NewUdp { key: FlowKey, id: u64 },
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CoreError {
    #[error("no SYN is waiting for a decision on this flow")]
    NotPending,
    #[error("UDP flow is closed")]
    FlowClosed,
    #[error(transparent)]
    Packet(#[from] PacketError),
    #[error("cannot listen on the destination: {0}")]
    Listen(#[from] tcp::ListenError),
    #[error("a connection between these addresses is already open")]
    InUse,
    #[error("cannot connect to the app: {0}")]
    Connect(#[from] tcp::ConnectError),
    #[error("the stack has stopped")]
    Stopped,
}

/// In-memory packet queues standing in for the TUN; unbounded because smoltcp has no SACK
/// and every dropped segment costs a full retransmission timeout.
struct QueueDevice {
    /// app --packets--> smoltcp, each with the connection it belongs to when one is known
    /// (smoltcp asks that socket first: see `Core::ingress`).
    rx: VecDeque<(Vec<u8>, Option<SocketHandle>)>,
    /// smoltcp --packets--> app
    tx: VecDeque<Vec<u8>>,
    /// Read buffers whose packets smoltcp has taken, for the device to read into again.
    free_rx: Vec<Vec<u8>>,
    /// Buffers of packets written to the app, for smoltcp to build packets in again.
    free_tx: Vec<Vec<u8>>,
    caps: DeviceCapabilities,
}

/// Buffers kept for reuse in each direction: a batch's worth, so a busy stack neither
/// allocates per packet nor holds much memory when quiet.
const FREE_BUFFERS: usize = 64;

/// A read buffer's capacity: the largest IP packet.
pub(crate) const READ_BUFFER: usize = 65535;

struct RxToken<'a> {
    packet: Vec<u8>,
    free: &'a mut Vec<Vec<u8>>,
}

struct TxToken<'a> {
    tx: &'a mut VecDeque<Vec<u8>>,
    free: &'a mut Vec<Vec<u8>>,
}

/// Keeps a read buffer whose packet is done with for the next read, if it is one (packets
/// handed in by tests are exactly their size) and the free list has room.
fn keep_read_buffer(free: &mut Vec<Vec<u8>>, mut buf: Vec<u8>) {
    if buf.capacity() >= READ_BUFFER && free.len() < FREE_BUFFERS {
        buf.clear();
        free.push(buf);
    }
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.packet);
        keep_read_buffer(self.free, self.packet);
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // A reused buffer is only zeroed where it grows.
        let mut buf = self.free.pop().unwrap_or_default();
        buf.resize(len, 0);
        let r = f(&mut buf);
        self.tx.push_back(buf);
        r
    }
}

impl phy::Device for QueueDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let (packet, _) = self.rx.pop_front()?;
        Some((
            RxToken {
                packet,
                free: &mut self.free_rx,
            },
            TxToken {
                tx: &mut self.tx,
                free: &mut self.free_tx,
            },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            tx: &mut self.tx,
            free: &mut self.free_tx,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.caps.clone()
    }
}

/// Bookkeeping for an accepted connection.
struct Conn {
    key: FlowKey,
    /// The memory behind the socket's receive and send buffers.
    rx: Region,
    tx: Region,
    memory: Memory,
    /// The caller still holds the `TcpStream`.
    stream_alive: bool,
    /// The caller shut down its write half.
    write_closed: bool,
    /// The caller's FIN waits for every byte before it to be acknowledged; see `tcp_shutdown`.
    fin_deferred: bool,
    /// The app's FIN was seen, so a later Closed state is a normal end.
    fin_seen: bool,
    /// The app reset the connection (or the stack shut down).
    reset: bool,
    /// In `Core::active`.
    active: bool,
    /// Its entry in `Core::timers`.
    timer: Option<Instant>,
    /// When its idle buffers may give their memory back, if they still hold some.
    release_at: Option<Instant>,
}

impl Conn {
    /// Puts this connection (`handle`) in `active` unless it is there already.
    fn activate(&mut self, handle: SocketHandle, active: &mut Vec<SocketHandle>) {
        if !std::mem::replace(&mut self.active, true) {
            active.push(handle);
        }
    }

    fn new(key: FlowKey, rx: Region, tx: Region, memory: Memory) -> Self {
        Conn {
            key,
            rx,
            tx,
            memory,
            stream_alive: true,
            write_closed: false,
            fin_deferred: false,
            fin_seen: false,
            reset: false,
            active: false,
            timer: None,
            release_at: None,
        }
    }
}

/// What decides when a connection's buffers may give their memory back.
struct Memory {
    /// Data moved since the last `maintain`.
    busy: bool,
    /// Bytes the caller read from the receive buffer and wrote into the send buffer.
    read: u64,
    written: u64,
    /// `read` when the receive buffer was last seen full, and the bytes the app had
    /// acknowledged when the send buffer was: a buffer full again after more went through is
    /// worth growing, one that stays full is not.
    read_when_full: u64,
    acked_when_full: u64,
    last_active: Instant,
    /// The buffer's pages are given back and nothing has been written since.
    rx_released: bool,
    tx_released: bool,
    /// The app's sequence number of the next byte the caller will read: its initial sequence
    /// number plus one plus what was read. Unknown until the app's SYN(-ACK) is seen.
    rx_next: Option<u32>,
    /// The app's sequence number after the furthest byte it has sent.
    app_end: u32,
}

impl Memory {
    fn new(now: Instant, app_isn: Option<u32>) -> Self {
        let rx_next = app_isn.map(|isn| isn.wrapping_add(1));
        Self {
            busy: false,
            read: 0,
            written: 0,
            read_when_full: 0,
            acked_when_full: 0,
            last_active: now,
            rx_released: true,
            tx_released: true,
            rx_next,
            app_end: rx_next.unwrap_or(0),
        }
    }

    fn on_segment(&mut self, segment: &TcpSegment) {
        if segment.syn && self.rx_next.is_none() {
            self.rx_next = Some(segment.seq);
            self.app_end = segment.seq;
        }
        let end = segment.seq.wrapping_add(segment.len);
        if segment.len > 0 && (end.wrapping_sub(self.app_end) as i32) > 0 {
            self.app_end = end;
        }
        self.busy = true;
    }

    fn on_read(&mut self, n: usize) {
        if let Some(next) = &mut self.rx_next {
            // The stream's sequence space wraps at 2^32 like the wire's.
            *next = next.wrapping_add(n as u32);
        }
        self.busy = true;
        self.read += n as u64;
    }

    /// Whether the receive and the send buffer are full again after more went through them
    /// since they were last seen full.
    fn full_and_draining(&mut self, socket: &tcp::Socket) -> (bool, bool) {
        let rx = socket.recv_queue() == socket.recv_capacity()
            && self.read > std::mem::replace(&mut self.read_when_full, self.read);
        let acked = self.written - socket.send_queue() as u64;
        let tx = socket.send_queue() == socket.send_capacity()
            && acked > std::mem::replace(&mut self.acked_when_full, acked);
        (rx, tx)
    }

    /// Everything the app sent has been read: smoltcp holds no out-of-order bytes (beyond a
    /// gap, where its ring shows nothing queued) that releasing the pages would zero.
    fn all_read(&self) -> bool {
        self.rx_next == Some(self.app_end)
    }
}

struct UdpState {
    id: u64,
    last_active: Instant,
    /// app --datagrams--> caller, bounded: UDP may drop, memory may not grow without end.
    queue: VecDeque<Vec<u8>>,
    waker: Option<Waker>,
}

pub(crate) struct Core {
    iface: Interface,
    /// Declared before `conns` so that it drops first: the sockets' buffers are the memory of
    /// the `Region`s the conns own.
    sockets: SocketSet<'static>,
    rx_pool: Pool,
    tx_pool: Pool,
    /// How much of those buffers each connection uses.
    capacity: Capacity,
    device: QueueDevice,
    /// Checksums verified on packets from the app (none when the caller trusts the device).
    rx_caps: ChecksumCapabilities,
    /// Checksums written on packets to the app (always: the kernel verifies them).
    tx_caps: ChecksumCapabilities,
    config: Config,
    conns: HashMap<SocketHandle, Conn>,
    by_key: HashMap<FlowKey, SocketHandle>,
    /// Held SYNs waiting for a decision, by flow, with the app's initial sequence number.
    pending: HashMap<FlowKey, (Vec<u8>, u32)>,
    /// Connections that may have something to do on the next poll, each once: a packet came
    /// for them, the caller read, wrote or closed, or their timer came. A poll visits these
    /// only, so its work follows the busy connections, not how many are open: 1,000 idle ones
    /// held in a pool cost nothing per packet.
    active: Vec<SocketHandle>,
    /// When each connection must be polled next even if nothing happens to it (smoltcp's own
    /// timers: delayed ACK, retransmission, keep-alive, timeouts; and the idle release of its
    /// buffers), in time order.
    timers: BTreeSet<(Instant, SocketHandle)>,
    /// A packet went to smoltcp with no connection known for it (not TCP of a flow of ours):
    /// the next poll looks at every socket, as smoltcp's own `poll` does.
    poll_all: bool,
    /// How many connections the last poll looked at.
    #[cfg(test)]
    polled: usize,
    udp: HashMap<FlowKey, UdpState>,
    /// No UDP flow expires before this: the earliest expiry when the flows were last looked
    /// at (a flow active since then expires later, a new one later still).
    udp_next_expiry: Option<Instant>,
    next_udp_id: u64,
    events: VecDeque<CoreEvent>,
    closed: bool,
}

fn checksum_caps(mode: Checksum) -> ChecksumCapabilities {
    let mut caps = ChecksumCapabilities::default();
    caps.ipv4 = mode;
    caps.tcp = mode;
    caps.udp = mode;
    caps.icmpv4 = mode;
    caps.icmpv6 = mode;
    caps
}

fn smol_duration(d: std::time::Duration) -> Duration {
    Duration::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn reset_error() -> io::Error {
    io::Error::from(io::ErrorKind::ConnectionReset)
}

/// Gives the pages of a connection's empty buffers back, and their capacity beyond the first,
/// once it has been idle for `IDLE_RELEASE`; returns when to look again, if there is still
/// something to give back.
fn release_idle(
    conn: &mut Conn,
    socket: &mut tcp::Socket,
    capacity: &mut Capacity,
    now: Instant,
) -> Option<Instant> {
    let memory = &mut conn.memory;
    if std::mem::take(&mut memory.busy) {
        memory.last_active = now;
        memory.rx_released = false;
        memory.tx_released = false;
    }
    if memory.rx_released && memory.tx_released {
        return None;
    }
    let at = memory.last_active + IDLE_RELEASE;
    if now < at {
        return Some(at);
    }
    if !memory.rx_released && socket.recv_queue() == 0 && memory.all_read() {
        conn.rx.release();
        capacity.shrink_recv(socket);
        memory.rx_released = true;
    }
    if !memory.tx_released && socket.send_queue() == 0 {
        conn.tx.release();
        capacity.shrink_send(socket);
        memory.tx_released = true;
    }
    // A buffer still holding data is looked at again once more time has passed.
    (!(memory.rx_released && memory.tx_released)).then_some(now + IDLE_RELEASE)
}

impl Core {
    pub(crate) fn new(config: Config, now: Instant) -> Self {
        let rx_caps = if config.verify_rx_checksums {
            checksum_caps(Checksum::Both)
        } else {
            checksum_caps(Checksum::Tx)
        };
        let tx_caps = checksum_caps(Checksum::Tx);
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = config.mtu;
        caps.checksum = rx_caps.clone();
        if config.tcp_checksum_offload {
            // The stack's task puts the pseudo-header sum in (packet::leave_tcp_checksum).
            caps.checksum.tcp = if config.verify_rx_checksums {
                Checksum::Rx
            } else {
                Checksum::None
            };
        }
        let mut device = QueueDevice {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            free_rx: Vec::new(),
            free_tx: Vec::new(),
            caps,
        };
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ip);
        iface_config.random_seed = config.random_seed;
        let mut iface = Interface::new(iface_config, &mut device, now);
        // In smoltcp 0.14 any-IP makes every destination "ours" (InterfaceInner::has_ip_addr
        // short-circuits), so no interface address or route is needed: replies carry the
        // listening socket's own address, i.e. the app's original destination.
        iface.set_any_ip(true);
        Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            rx_pool: Pool::new(config.tcp_rx_buffer, config.tcp_first_buffer),
            tx_pool: Pool::new(config.tcp_tx_buffer, config.tcp_first_buffer),
            capacity: Capacity::new(config.tcp_first_buffer, config.tcp_buffer_budget),
            device,
            rx_caps,
            tx_caps,
            config,
            conns: HashMap::new(),
            by_key: HashMap::new(),
            pending: HashMap::new(),
            active: Vec::new(),
            timers: BTreeSet::new(),
            poll_all: false,
            #[cfg(test)]
            polled: 0,
            udp: HashMap::new(),
            udp_next_expiry: None,
            next_udp_id: 0,
            events: VecDeque::new(),
            closed: false,
        }
    }

    /// Takes one packet the app sent.
    pub(crate) fn ingest(&mut self, now: Instant, packet: Vec<u8>) {
        if self.closed {
            return;
        }
        let inbound = match packet::classify(&packet, &self.rx_caps) {
            Ok(inbound) => inbound,
            Err(e) => {
                tracing::trace!(error = %e, len = packet.len(), "dropping packet from the app");
                return;
            }
        };
        match inbound {
            Inbound::TcpSyn { key, seq } => {
                // A SYN may be held for a while (until the caller decides): in a buffer of its
                // own size, not in a read buffer, which goes back to be read into again.
                let syn = packet.to_vec();
                self.recycle_read(packet);
                self.ingest_syn(key, seq, syn);
            }
            Inbound::Tcp(segment) => {
                let handle = self.by_key.get(&segment.key).copied();
                if let Some(conn) = handle.and_then(|handle| self.conns.get_mut(&handle)) {
                    conn.memory.on_segment(&segment);
                }
                match packet::split_fin(&packet) {
                    Some((data, fin)) => {
                        self.recycle_read(packet);
                        self.queue_inbound(data, handle);
                        self.queue_inbound(fin, handle);
                    }
                    None => self.queue_inbound(packet, handle),
                }
            }
            Inbound::Other => self.queue_inbound(packet, None),
            Inbound::Udp { key, payload } => {
                let Some(data) = packet.get(payload).map(<[u8]>::to_vec) else {
                    return;
                };
                self.recycle_read(packet);
                self.ingest_udp(now, key, data);
            }
        }
    }

    fn ingest_syn(&mut self, key: FlowKey, isn: u32, packet: Vec<u8>) {
        if let Some(&handle) = self.by_key.get(&key) {
            let state = self.sockets.get::<tcp::Socket>(handle).state();
            if !matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                // A retransmitted SYN for a connection smoltcp already owns.
                self.queue_inbound(packet, Some(handle));
                return;
            }
            // The app reuses the 4-tuple of a finished connection: the old socket must stop
            // matching it before the new one exists.
            self.by_key.remove(&key);
            self.sockets.get_mut::<tcp::Socket>(handle).abort();
            if let Some(conn) = self.conns.get_mut(&handle) {
                conn.fin_seen = true;
            }
            self.activate(handle);
        }
        if self.pending.contains_key(&key) {
            // Retransmission while the caller is still deciding: the first SYN stays held.
            return;
        }
        self.pending.insert(key, (packet, isn));
        self.events.push_back(CoreEvent::NewTcp(key));
    }

    fn ingest_udp(&mut self, now: Instant, key: FlowKey, data: Vec<u8>) {
        if let Some(flow) = self.udp.get_mut(&key) {
            flow.last_active = now;
            if flow.queue.len() < self.config.udp_queue {
                flow.queue.push_back(data);
            }
            if let Some(w) = flow.waker.take() {
                w.wake();
            }
            return;
        }
        if self.udp.len() >= self.config.udp_flows
            && let Some(idlest) = self
                .udp
                .iter()
                .min_by_key(|(_, flow)| flow.last_active)
                .map(|(&key, _)| key)
            && let Some(mut flow) = self.udp.remove(&idlest)
            && let Some(w) = flow.waker.take()
        {
            w.wake();
        }
        let idle = smol_duration(self.config.udp_idle);
        self.udp_next_expiry.get_or_insert(now + idle);
        let id = self.next_udp_id;
        self.next_udp_id += 1;
        self.udp.insert(
            key,
            UdpState {
                id,
                last_active: now,
                queue: VecDeque::from([data]),
                waker: None,
            },
        );
        self.events.push_back(CoreEvent::NewUdp { key, id });
    }

    /// Answers a held SYN. `Accept` returns the connection's handle.
    pub(crate) fn decide(
        &mut self,
        now: Instant,
        key: FlowKey,
        decision: Decision,
    ) -> Result<Option<SocketHandle>, CoreError> {
        let (syn, isn) = self.pending.remove(&key).ok_or(CoreError::NotPending)?;
        match decision {
            Decision::Refuse => {
                self.device
                    .tx
                    .push_back(packet::refuse_syn(&syn, &self.tx_caps)?);
                Ok(None)
            }
            Decision::Unreachable => {
                self.device
                    .tx
                    .push_back(packet::unreachable(&syn, &self.tx_caps)?);
                Ok(None)
            }
            Decision::Accept => {
                let (mut socket, rx, tx) = self.new_socket();
                let (_, dst) = key;
                if let Err(e) = socket.listen(IpListenEndpoint {
                    addr: Some(dst.ip().into()),
                    port: dst.port(),
                }) {
                    drop(socket);
                    self.rx_pool.put(rx);
                    self.tx_pool.put(tx);
                    self.device
                        .tx
                        .push_back(packet::refuse_syn(&syn, &self.tx_caps)?);
                    return Err(e.into());
                }
                let handle = self.sockets.add(socket);
                self.conns
                    .insert(handle, Conn::new(key, rx, tx, Memory::new(now, Some(isn))));
                self.by_key.insert(key, handle);
                self.activate(handle);
                // Process exactly this SYN now: were another accepted SYN to the same
                // destination processed first, it could land on this listening socket.
                self.device.rx.push_front((syn, Some(handle)));
                self.iface.set_tcp_socket_hint(Some(handle));
                self.iface
                    .poll_ingress_single(now, &mut self.device, &mut self.sockets);
                self.iface.set_tcp_socket_hint(None);
                Ok(Some(handle))
            }
        }
    }

    /// Hands a packet from the app to smoltcp, with the connection it belongs to if known.
    fn queue_inbound(&mut self, packet: Vec<u8>, handle: Option<SocketHandle>) {
        match handle {
            Some(handle) => self.activate(handle),
            None => self.poll_all = true,
        }
        self.device.rx.push_back((packet, handle));
    }

    /// Puts a connection among those the next poll looks at.
    fn activate(&mut self, handle: SocketHandle) {
        if let Some(conn) = self.conns.get_mut(&handle) {
            conn.activate(handle, &mut self.active);
        }
    }

    /// Runs smoltcp and the stack's own timers, for the active connections (or, after a
    /// packet no connection was known for, every socket).
    pub(crate) fn poll(&mut self, now: Instant) {
        while let Some(&(at, handle)) = self.timers.first()
            && at <= now
        {
            self.timers.pop_first();
            if let Some(conn) = self.conns.get_mut(&handle) {
                conn.timer = None;
            }
            self.activate(handle);
        }
        self.ingress(now);
        self.egress(now);
        if self.maintain(now) {
            // A deferred FIN was just queued, or a window grew: send it now rather than on the
            // next wake-up.
            self.egress(now);
        }
        self.schedule(now);
        self.expire_udp(now);
    }

    /// Closes the UDP flows idle for `udp_idle`, looking at them only once the earliest may
    /// have expired.
    fn expire_udp(&mut self, now: Instant) {
        if self.udp_next_expiry.is_none_or(|at| now < at) {
            return;
        }
        let idle = smol_duration(self.config.udp_idle);
        self.udp.retain(|_, flow| {
            let keep = now < flow.last_active + idle;
            if !keep && let Some(w) = flow.waker.take() {
                w.wake();
            }
            keep
        });
        self.udp_next_expiry = self.udp.values().map(|f| f.last_active + idle).min();
    }

    /// smoltcp takes the app's packets; each is offered first to the socket of its flow.
    fn ingress(&mut self, now: Instant) {
        while let Some(&(_, hint)) = self.device.rx.front() {
            self.iface.set_tcp_socket_hint(hint);
            self.iface
                .poll_ingress_single(now, &mut self.device, &mut self.sockets);
        }
        self.iface.set_tcp_socket_hint(None);
    }

    /// smoltcp sends what the active sockets have to send (every socket's after a packet of
    /// no known flow, and then every connection is active).
    fn egress(&mut self, now: Instant) {
        if std::mem::take(&mut self.poll_all) {
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            for (&handle, conn) in &mut self.conns {
                conn.activate(handle, &mut self.active);
            }
            return;
        }
        for &handle in &self.active {
            while self
                .iface
                .poll_egress_socket(now, &mut self.device, &mut self.sockets, handle)
                == PollResult::SocketStateChanged
            {}
        }
    }

    /// Sets each active connection's timer from smoltcp's next deadline for its socket and
    /// its own idle release, and leaves the active list empty.
    fn schedule(&mut self, now: Instant) {
        #[cfg(test)]
        {
            self.polled = self.active.len();
        }
        for handle in self.active.drain(..) {
            let Some(conn) = self.conns.get_mut(&handle) else {
                continue;
            };
            conn.active = false;
            let at = self
                .iface
                .socket_poll_at(now, &self.sockets, handle)
                .into_iter()
                .chain(conn.release_at)
                .min();
            if conn.timer != at {
                if let Some(old) = conn.timer {
                    self.timers.remove(&(old, handle));
                }
                if let Some(at) = at {
                    self.timers.insert((at, handle));
                }
                conn.timer = at;
            }
        }
    }

    /// Follows socket state changes smoltcp does not report (resets and finished sockets),
    /// sends deferred FINs, grows full buffers and gives idle connections' memory back; true if
    /// a FIN was queued or a receive window changed.
    fn maintain(&mut self, now: Instant) -> bool {
        let mut finished = Vec::new();
        let mut to_send = false;
        for &handle in &self.active {
            let Some(conn) = self.conns.get_mut(&handle) else {
                continue;
            };
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            let (rx, tx) = conn.memory.full_and_draining(socket);
            to_send |= self.capacity.grow(socket, rx, tx);
            conn.rx.may_use(socket.recv_capacity());
            conn.tx.may_use(socket.send_capacity());
            let window = socket.recv_capacity();
            conn.release_at = release_idle(conn, socket, &mut self.capacity, now);
            // A window that shrank is announced at once, before the app sends into it.
            to_send |= socket.recv_capacity() < window;
            if conn.fin_deferred && socket.send_queue() == 0 {
                conn.fin_deferred = false;
                socket.close();
                to_send = true;
            }
            match socket.state() {
                // Both FINs are exchanged and acknowledged. TIME-WAIT protects a later
                // connection on the same ports from this one's stray segments; the app's kernel
                // keeps its own, and lingering ones (10 s each) would hold their buffers and
                // lengthen smoltcp's walk of every socket for a packet of no known flow.
                tcp::State::TimeWait if !conn.stream_alive => {
                    conn.fin_seen = true;
                    finished.push(handle);
                }
                tcp::State::CloseWait
                | tcp::State::LastAck
                | tcp::State::Closing
                | tcp::State::TimeWait => conn.fin_seen = true,
                // An RST in SYN-RECEIVED sends smoltcp back to LISTEN; this socket was for one
                // app connection only, and listening on it could steal another flow's SYN.
                tcp::State::Listen => {
                    socket.abort();
                    conn.reset = true;
                }
                tcp::State::Closed => {
                    if !conn.fin_seen && !conn.reset {
                        conn.reset = true;
                    }
                    if !conn.stream_alive {
                        finished.push(handle);
                    }
                }
                _ => {}
            }
        }
        for handle in finished {
            if let Some(conn) = self.conns.remove(&handle) {
                if self.by_key.get(&conn.key) == Some(&handle) {
                    self.by_key.remove(&conn.key);
                }
                if let Some(at) = conn.timer {
                    self.timers.remove(&(at, handle));
                }
                self.capacity
                    .forget(self.sockets.get::<tcp::Socket>(handle));
                // The socket, and with it its slices of the regions, goes first.
                self.sockets.remove(handle);
                self.rx_pool.put(conn.rx);
                self.tx_pool.put(conn.tx);
            }
        }
        to_send
    }

    /// When `poll` must run next at the latest, if anything is waiting on time.
    pub(crate) fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let until = |deadline: Instant| {
            if deadline > now {
                deadline - now
            } else {
                Duration::ZERO
            }
        };
        [
            (self.poll_all || !self.active.is_empty()).then_some(Duration::ZERO),
            self.timers.first().map(|&(at, _)| until(at)),
            self.udp_next_expiry.map(until),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Packets for the app, in order.
    pub(crate) fn drain_transmit(&mut self) -> std::collections::vec_deque::Drain<'_, Vec<u8>> {
        self.device.tx.drain(..)
    }

    /// Moves the packets for the app into `out` (empty), which takes their place, so the
    /// caller can write them without holding the core.
    pub(crate) fn swap_transmit(&mut self, out: &mut VecDeque<Vec<u8>>) {
        std::mem::swap(&mut self.device.tx, out);
    }

    /// An empty buffer of [`READ_BUFFER`] bytes' capacity to read the app's next packet into.
    pub(crate) fn read_buffer(&mut self) -> Vec<u8> {
        self.device
            .free_rx
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(READ_BUFFER))
    }

    /// Takes back a read buffer whose packet was consumed outside smoltcp.
    fn recycle_read(&mut self, buf: Vec<u8>) {
        keep_read_buffer(&mut self.device.free_rx, buf);
    }

    /// Takes back the buffer of a packet written to the app.
    pub(crate) fn recycle_written(&mut self, buf: Vec<u8>) {
        if self.device.free_tx.len() < FREE_BUFFERS {
            self.device.free_tx.push(buf);
        }
    }

    /// Whether TCP packets to the app leave their checksum to the device.
    pub(crate) fn tcp_checksum_offload(&self) -> bool {
        self.config.tcp_checksum_offload
    }

    pub(crate) fn pop_event(&mut self) -> Option<CoreEvent> {
        self.events.pop_front()
    }

    /// Starts a connection *to* the app: smoltcp sends a SYN from `peer` (any address: any-IP
    /// lets the stack speak for it) to `app`, the app's own address and listening port. The
    /// flow is keyed like every other, (app's address, other end), so the app's replies reach
    /// this socket and a SYN the app might send on the same 4-tuple is not taken for a new flow.
    pub(crate) fn originate(
        &mut self,
        now: Instant,
        peer: std::net::SocketAddr,
        app: std::net::SocketAddr,
    ) -> Result<SocketHandle, CoreError> {
        if self.closed {
            return Err(CoreError::Stopped);
        }
        let key = (app, peer);
        if self.pending.contains_key(&key) {
            return Err(CoreError::InUse);
        }
        if let Some(&handle) = self.by_key.get(&key) {
            let state = self.sockets.get::<tcp::Socket>(handle).state();
            if !matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                return Err(CoreError::InUse);
            }
            self.by_key.remove(&key);
            self.sockets.get_mut::<tcp::Socket>(handle).abort();
            if let Some(conn) = self.conns.get_mut(&handle) {
                conn.fin_seen = true;
            }
            self.activate(handle);
        }
        let (mut socket, rx, tx) = self.new_socket();
        if let Err(e) = socket.connect(
            self.iface.context(),
            (app.ip(), app.port()),
            IpListenEndpoint {
                addr: Some(peer.ip().into()),
                port: peer.port(),
            },
        ) {
            drop(socket);
            self.rx_pool.put(rx);
            self.tx_pool.put(tx);
            return Err(e.into());
        }
        let handle = self.sockets.add(socket);
        // The app's initial sequence number comes with its SYN-ACK.
        self.conns
            .insert(handle, Conn::new(key, rx, tx, Memory::new(now, None)));
        self.by_key.insert(key, handle);
        self.activate(handle);
        // The SYN leaves now rather than on the next wake-up.
        self.egress(now);
        Ok(handle)
    }

    /// Ready once an originated connection is established (`Ok`) or refused by the app
    /// (`ConnectionRefused`: its kernel answered the SYN with an RST, nothing listens).
    pub(crate) fn tcp_poll_connect(
        &mut self,
        handle: SocketHandle,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let closed = self.closed;
        let Some((_, socket)) = self.conn_socket(handle) else {
            return Poll::Ready(Err(reset_error()));
        };
        if closed {
            return Poll::Ready(Err(reset_error()));
        }
        match socket.state() {
            tcp::State::SynSent | tcp::State::SynReceived => {
                // smoltcp wakes both wakers on every state change.
                socket.register_send_waker(cx.waker());
                Poll::Pending
            }
            tcp::State::Closed | tcp::State::Listen => {
                Poll::Ready(Err(io::ErrorKind::ConnectionRefused.into()))
            }
            _ => Poll::Ready(Ok(())),
        }
    }

    /// A TCP socket on buffers from the pools, and the regions behind them.
    fn new_socket(&mut self) -> (tcp::Socket<'static>, Region, Region) {
        let (mut rx, mut tx) = (self.rx_pool.take(), self.tx_pool.take());
        // SAFETY: each region goes to this one socket only, and comes back to a pool only
        // after the socket is dropped (see `maintain` and the failure paths of the callers).
        let (rx_storage, tx_storage) = unsafe { (rx.storage(), tx.storage()) };
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(rx_storage),
            tcp::SocketBuffer::new(tx_storage),
        );
        self.capacity.start(&mut socket);
        rx.may_use(socket.recv_capacity());
        tx.may_use(socket.send_capacity());
        socket.set_ack_delay(self.config.tcp_ack_delay.map(Duration::from));
        socket.set_nagle_enabled(self.config.nagle);
        (socket, rx, tx)
    }

    // --- TCP connections, by handle (a live stream's handle is never reused) ---

    fn conn_socket(
        &mut self,
        handle: SocketHandle,
    ) -> Option<(&mut Conn, &mut tcp::Socket<'static>)> {
        let conn = self.conns.get_mut(&handle)?;
        // Whatever the caller does may give smoltcp something to send.
        conn.activate(handle, &mut self.active);
        // Cannot panic: a handle stays in `conns` exactly as long as its socket is in the set.
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        Some((conn, socket))
    }

    pub(crate) fn tcp_poll_read(
        &mut self,
        handle: SocketHandle,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.tcp_poll_read_into(handle, cx, &mut tokio::io::ReadBuf::new(buf))
    }

    /// Reads what the app sent into `buf`'s unfilled part, straight from the socket's ring
    /// (which may wrap: two slices), without initializing `buf` first.
    pub(crate) fn tcp_poll_read_into(
        &mut self,
        handle: SocketHandle,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<usize>> {
        let closed = self.closed;
        let Some((conn, socket)) = self.conn_socket(handle) else {
            return Poll::Ready(Err(reset_error()));
        };
        if conn.reset || closed {
            return Poll::Ready(Err(reset_error()));
        }
        let mut read = 0;
        let result = loop {
            let room = buf.remaining();
            let got = socket.recv(|data| {
                let n = data.len().min(room);
                buf.put_slice(&data[..n]);
                (n, n)
            });
            match got {
                Ok(n) if n > 0 && buf.remaining() > 0 => read += n,
                Ok(n) => break Ok(read + n),
                Err(e) if read == 0 => break Err(e),
                // The data read goes first; the end or the failure shows on the next read.
                Err(_) => break Ok(read),
            }
        };
        match result {
            Ok(0) if buf.remaining() > 0 => {
                socket.register_recv_waker(cx.waker());
                Poll::Pending
            }
            Ok(n) => {
                conn.memory.on_read(n);
                Poll::Ready(Ok(n))
            }
            Err(tcp::RecvError::Finished) => Poll::Ready(Ok(0)),
            Err(tcp::RecvError::InvalidState) => match socket.state() {
                tcp::State::SynReceived | tcp::State::SynSent => {
                    socket.register_recv_waker(cx.waker());
                    Poll::Pending
                }
                _ => Poll::Ready(Err(reset_error())),
            },
        }
    }

    pub(crate) fn tcp_poll_write(
        &mut self,
        handle: SocketHandle,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let closed = self.closed;
        let Some((conn, socket)) = self.conn_socket(handle) else {
            return Poll::Ready(Err(reset_error()));
        };
        if conn.reset || closed {
            return Poll::Ready(Err(reset_error()));
        }
        if conn.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        match socket.send_slice(data) {
            Ok(0) if !data.is_empty() => {
                socket.register_send_waker(cx.waker());
                Poll::Pending
            }
            Ok(n) => {
                conn.memory.busy = true;
                conn.memory.written += n as u64;
                Poll::Ready(Ok(n))
            }
            Err(tcp::SendError::InvalidState) => match socket.state() {
                tcp::State::SynReceived | tcp::State::SynSent => {
                    socket.register_send_waker(cx.waker());
                    Poll::Pending
                }
                tcp::State::Closed => Poll::Ready(Err(reset_error())),
                _ => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            },
        }
    }

    /// Sends a FIN after the data already written — at once while the app's side is open, and
    /// only once all of it is acknowledged after the app's FIN.
    ///
    /// Waiting always would cost a request/response exchange the app's delayed ACK (up to 40 ms
    /// on Linux) for every connection the far side closes. Closing early is unsafe only after
    /// the app's FIN: in LAST-ACK, smoltcp 0.14 drops an ACK that
    /// acknowledges nothing new before reading its window, so if the app's window was zero, its
    /// window updates (and its answers to our zero-window probes) are all lost and the rest of
    /// the data never leaves; only `orphan_timeout` ended such connections, with a reset.
    pub(crate) fn tcp_shutdown(&mut self, handle: SocketHandle) {
        if let Some((conn, socket)) = self.conn_socket(handle) {
            if conn.write_closed {
                return;
            }
            conn.write_closed = true;
            if socket.send_queue() == 0 || socket.state() != tcp::State::CloseWait {
                socket.close();
            } else {
                conn.fin_deferred = true;
            }
        }
    }

    /// The caller let go of the stream: a clean close (FIN sent, nothing unread) lingers to
    /// finish the handshake, anything else is reset like the kernel's close() with unread data.
    pub(crate) fn tcp_release(&mut self, handle: SocketHandle, abort: bool) {
        let finish = smol_duration(self.config.orphan_timeout);
        if let Some((conn, socket)) = self.conn_socket(handle) {
            conn.stream_alive = false;
            if abort || !conn.write_closed || socket.recv_queue() > 0 {
                socket.abort();
            } else {
                // Nobody reads any more: do not wait forever for the app's FIN.
                socket.set_timeout(Some(finish));
            }
        }
    }

    // --- UDP flows, by key and id (a new flow with the same key gets a new id) ---

    pub(crate) fn udp_poll_recv(
        &mut self,
        key: FlowKey,
        id: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Vec<u8>>> {
        match self.udp.get_mut(&key) {
            Some(flow) if flow.id == id => match flow.queue.pop_front() {
                Some(d) => Poll::Ready(Some(d)),
                None => {
                    flow.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            },
            _ => Poll::Ready(None),
        }
    }

    /// Sends `payload` to the app as if from the flow's original destination.
    pub(crate) fn udp_send(
        &mut self,
        now: Instant,
        key: FlowKey,
        id: u64,
        payload: &[u8],
    ) -> Result<(), CoreError> {
        match self.udp.get_mut(&key) {
            Some(flow) if flow.id == id => {
                flow.last_active = now;
                let (app, dst) = key;
                let packet = packet::build_udp(dst, app, payload, &self.tx_caps)?;
                self.device.tx.push_back(packet);
                Ok(())
            }
            _ => Err(CoreError::FlowClosed),
        }
    }

    pub(crate) fn udp_release(&mut self, key: FlowKey, id: u64) {
        if self.udp.get(&key).is_some_and(|f| f.id == id) {
            self.udp.remove(&key);
        }
    }

    /// The packet side is gone: every stream and flow ends now instead of hanging.
    pub(crate) fn close_all(&mut self) {
        self.closed = true;
        self.pending.clear();
        self.poll_all = true;
        for (&handle, conn) in &mut self.conns {
            conn.reset = true;
            // abort() wakes the socket's wakers.
            self.sockets.get_mut::<tcp::Socket>(handle).abort();
        }
        for (_, mut flow) in self.udp.drain() {
            if let Some(w) = flow.waker.take() {
                w.wake();
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn tcp_state(&self, handle: SocketHandle) -> tcp::State {
        self.sockets.get::<tcp::Socket>(handle).state()
    }

    /// Whether the connection's receive and send buffers have given their memory back.
    #[cfg(test)]
    fn released(&self, handle: SocketHandle) -> (bool, bool) {
        let memory = &self.conns[&handle].memory;
        (memory.rx_released, memory.tx_released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tests::syn;
    use smoltcp::wire::{
        Icmpv4Message, Icmpv4Packet, IpAddress, Ipv4Packet, TcpControl, TcpPacket, TcpRepr,
        TcpSeqNumber,
    };
    use std::net::SocketAddr;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn tcp_of(p: &[u8]) -> TcpRepr<'_> {
        let ip = Ipv4Packet::new_checked(p).unwrap();
        let (s, d) = (
            IpAddress::from(ip.src_addr()),
            IpAddress::from(ip.dst_addr()),
        );
        let payload = &p[usize::from(ip.header_len())..];
        let tcp = TcpPacket::new_checked(payload).unwrap();
        TcpRepr::parse(&tcp, &s, &d, &ChecksumCapabilities::default()).unwrap()
    }

    fn t(ms: i64) -> Instant {
        Instant::from_millis(ms)
    }

    #[test]
    fn syn_is_held_and_duplicates_do_not_create_a_second_flow() {
        let mut core = Core::new(Config::default(), t(0));
        let key = (addr("10.0.0.2:40000"), addr("10.1.2.3:80"));
        core.ingest(t(0), syn(key.0, key.1, 7));
        core.poll(t(0));
        assert_eq!(core.pop_event(), Some(CoreEvent::NewTcp(key)));
        assert_eq!(
            core.drain_transmit().count(),
            0,
            "nothing is answered before a decision"
        );
        core.ingest(t(1000), syn(key.0, key.1, 7));
        core.ingest(t(3000), syn(key.0, key.1, 7));
        core.poll(t(3000));
        assert_eq!(core.pop_event(), None);
        assert_eq!(core.drain_transmit().count(), 0);
        // Accepting answers the held SYN with a SYN-ACK from the original destination.
        let handle = core
            .decide(t(3500), key, Decision::Accept)
            .unwrap()
            .unwrap();
        core.poll(t(3500));
        let out: Vec<_> = core.drain_transmit().collect();
        assert_eq!(out.len(), 1);
        let synack = tcp_of(&out[0]);
        assert_eq!(synack.control, TcpControl::Syn);
        assert_eq!(synack.src_port, 80);
        assert_eq!(synack.ack_number, Some(smoltcp::wire::TcpSeqNumber(8)));
        assert_eq!(
            Ipv4Packet::new_checked(&out[0][..])
                .unwrap()
                .src_addr()
                .to_string(),
            "10.1.2.3"
        );
        assert_eq!(core.tcp_state(handle), tcp::State::SynReceived);
        // A late retransmission goes to the socket, not to a new decision.
        core.ingest(t(4000), syn(key.0, key.1, 7));
        core.poll(t(4000));
        assert_eq!(core.pop_event(), None);
        assert!(matches!(
            core.decide(t(4000), key, Decision::Accept),
            Err(CoreError::NotPending)
        ));
    }

    #[test]
    fn refused_syn_gets_rst_and_unreachable_gets_icmp() {
        let mut core = Core::new(Config::default(), t(0));
        let refused = (addr("10.0.0.2:40001"), addr("10.1.2.3:81"));
        let unreach = (addr("10.0.0.2:40002"), addr("10.9.9.9:80"));
        core.ingest(t(0), syn(refused.0, refused.1, 100));
        core.ingest(t(0), syn(unreach.0, unreach.1, 200));
        assert_eq!(core.pop_event(), Some(CoreEvent::NewTcp(refused)));
        assert_eq!(core.pop_event(), Some(CoreEvent::NewTcp(unreach)));

        core.decide(t(1), refused, Decision::Refuse).unwrap();
        let out: Vec<_> = core.drain_transmit().collect();
        let rst = tcp_of(&out[0]);
        assert_eq!(rst.control, TcpControl::Rst);
        assert_eq!((rst.src_port, rst.dst_port), (81, 40001));

        core.decide(t(1), unreach, Decision::Unreachable).unwrap();
        let out: Vec<_> = core.drain_transmit().collect();
        let ip = Ipv4Packet::new_checked(&out[0][..]).unwrap();
        assert_eq!(ip.src_addr().to_string(), "10.9.9.9");
        assert_eq!(ip.dst_addr().to_string(), "10.0.0.2");
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
    }

    #[test]
    fn a_new_udp_flow_beyond_the_limit_closes_the_one_idle_the_longest() {
        let config = Config {
            udp_flows: 3,
            ..Config::default()
        };
        let mut core = Core::new(config, t(0));
        let caps = ChecksumCapabilities::default();
        let key = |port: u16| (addr(&format!("10.0.0.2:{port}")), addr("10.1.2.3:9"));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        for (port, ms) in [(5001, 0), (5002, 1), (5003, 2)] {
            core.ingest(
                t(ms),
                packet::build_udp(key(port).0, key(port).1, b"q", &caps).unwrap(),
            );
        }
        // The first flow answers later than the second: the second is idle the longest.
        core.udp_send(t(3), key(5001), 0, b"a").unwrap();
        for id in 0..3 {
            assert!(matches!(core.pop_event(), Some(CoreEvent::NewUdp { id: i, .. }) if i == id));
        }
        core.ingest(
            t(4),
            packet::build_udp(key(5004).0, key(5004).1, b"q", &caps).unwrap(),
        );
        assert_eq!(
            core.pop_event(),
            Some(CoreEvent::NewUdp {
                key: key(5004),
                id: 3
            })
        );
        assert_eq!(core.udp_poll_recv(key(5002), 1, &mut cx), Poll::Ready(None));
        assert!(core.udp_send(t(4), key(5002), 1, b"late").is_err());
        for (port, id) in [(5001, 0), (5003, 2), (5004, 3)] {
            assert_eq!(
                core.udp_poll_recv(key(port), id, &mut cx),
                Poll::Ready(Some(b"q".to_vec())),
                "flow {port} is kept"
            );
        }
    }

    #[test]
    fn udp_flows_are_keyed_replies_swap_addresses_and_idle_flows_expire() {
        let config = Config {
            udp_idle: std::time::Duration::from_secs(60),
            ..Config::default()
        };
        let mut core = Core::new(config, t(0));
        let caps = ChecksumCapabilities::default();
        let key = (addr("[fd00::2]:5353"), addr("[fd00::5]:53"));
        core.ingest(t(0), packet::build_udp(key.0, key.1, b"q1", &caps).unwrap());
        core.ingest(
            t(10),
            packet::build_udp(key.0, key.1, b"q2", &caps).unwrap(),
        );
        assert_eq!(core.pop_event(), Some(CoreEvent::NewUdp { key, id: 0 }));
        assert_eq!(core.pop_event(), None, "one flow per (src, dst)");
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert_eq!(
            core.udp_poll_recv(key, 0, &mut cx),
            Poll::Ready(Some(b"q1".to_vec()))
        );
        assert_eq!(
            core.udp_poll_recv(key, 0, &mut cx),
            Poll::Ready(Some(b"q2".to_vec()))
        );
        assert_eq!(core.udp_poll_recv(key, 0, &mut cx), Poll::Pending);

        core.udp_send(t(20), key, 0, b"answer").unwrap();
        let reply: Vec<_> = core.drain_transmit().collect();
        match packet::classify(&reply[0], &caps).unwrap() {
            Inbound::Udp { key: k, payload } => {
                assert_eq!(k, (key.1, key.0));
                assert_eq!(&reply[0][payload], b"answer");
            }
            other => panic!("unexpected {other:?}"),
        }

        // The stack wakes by the flow's expiry at the latest; earlier, it looks again.
        assert!(core.poll_delay(t(20)) <= Some(Duration::from_secs(60)));
        core.poll(t(59_000));
        assert_eq!(core.udp_poll_recv(key, 0, &mut cx), Poll::Pending);
        core.poll(t(60_010));
        assert_eq!(core.udp_poll_recv(key, 0, &mut cx), Poll::Pending);
        assert_eq!(core.poll_delay(t(60_010)), Some(Duration::from_millis(10)));
        core.poll(t(60_020));
        assert_eq!(core.udp_poll_recv(key, 0, &mut cx), Poll::Ready(None));
        assert!(core.udp_send(t(60_020), key, 0, b"late").is_err());
        // A datagram after expiry starts a fresh flow.
        core.ingest(
            t(61_000),
            packet::build_udp(key.0, key.1, b"q3", &caps).unwrap(),
        );
        assert_eq!(core.pop_event(), Some(CoreEvent::NewUdp { key, id: 1 }));
    }

    /// The app's answer to an originated SYN: a SYN-ACK, or an RST-ACK when nothing listens.
    fn answer_syn(syn: &[u8], control: TcpControl, seq: i32) -> Vec<u8> {
        let repr = tcp_of(syn);
        let ip = Ipv4Packet::new_checked(syn).unwrap();
        let (from, to) = (
            SocketAddr::new(ip.dst_addr().into(), repr.dst_port),
            SocketAddr::new(ip.src_addr().into(), repr.src_port),
        );
        let answer = TcpRepr {
            src_port: repr.dst_port,
            dst_port: repr.src_port,
            control,
            seq_number: smoltcp::wire::TcpSeqNumber(seq),
            ack_number: Some(repr.seq_number + 1),
            window_len: 64240,
            window_scale: if control == TcpControl::Syn {
                Some(7)
            } else {
                None
            },
            max_seg_size: if control == TcpControl::Syn {
                Some(1460)
            } else {
                None
            },
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        packet::build_tcp(from, to, &answer, &ChecksumCapabilities::default()).unwrap()
    }

    fn poll_connect(core: &mut Core, handle: SocketHandle) -> Poll<io::Result<()>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        core.tcp_poll_connect(handle, &mut cx)
    }

    #[test]
    fn an_originated_connection_comes_from_the_peer_and_completes_with_the_apps_syn_ack() {
        let mut core = Core::new(Config::default(), t(0));
        // A client outside any cluster range, to the app's own (pod) address.
        let (peer, app) = (addr("203.0.113.7:51234"), addr("10.0.0.2:8080"));
        let handle = core.originate(t(0), peer, app).unwrap();
        let out: Vec<_> = core.drain_transmit().collect();
        assert_eq!(out.len(), 1, "exactly one SYN");
        let ip = Ipv4Packet::new_checked(&out[0][..]).unwrap();
        assert_eq!(
            (ip.src_addr().to_string(), ip.dst_addr().to_string()),
            ("203.0.113.7".to_owned(), "10.0.0.2".to_owned())
        );
        let syn = tcp_of(&out[0]);
        assert_eq!(syn.control, TcpControl::Syn);
        assert_eq!(syn.ack_number, None);
        assert_eq!((syn.src_port, syn.dst_port), (51234, 8080));
        assert!(poll_connect(&mut core, handle).is_pending());
        assert!(
            matches!(core.originate(t(1), peer, app), Err(CoreError::InUse)),
            "one connection per 4-tuple"
        );

        // The app's SYN-ACK is not a new flow: it completes ours, and smoltcp ACKs it.
        core.ingest(t(5), answer_syn(&out[0], TcpControl::Syn, 9000));
        core.poll(t(5));
        assert_eq!(core.pop_event(), None);
        assert_eq!(core.tcp_state(handle), tcp::State::Established);
        assert!(matches!(
            poll_connect(&mut core, handle),
            Poll::Ready(Ok(()))
        ));
        let ack = core.drain_transmit().next().expect("the handshake's ACK");
        let ack = tcp_of(&ack);
        assert_eq!(ack.control, TcpControl::None);
        assert_eq!(ack.ack_number, Some(smoltcp::wire::TcpSeqNumber(9001)));
    }

    #[test]
    fn an_originated_connection_nobody_listens_for_is_refused() {
        let mut core = Core::new(Config::default(), t(0));
        let (peer, app) = (addr("[2001:db8::7]:40000"), addr("10.0.0.2:9999"));
        assert!(
            matches!(core.originate(t(0), peer, app), Err(CoreError::Connect(_))),
            "an IPv6 peer cannot reach an IPv4 address"
        );
        let peer = addr("10.9.8.7:40000");
        let handle = core.originate(t(0), peer, app).unwrap();
        let syn = core.drain_transmit().next().unwrap();
        core.ingest(t(1), answer_syn(&syn, TcpControl::Rst, 0));
        core.poll(t(1));
        let refused = poll_connect(&mut core, handle);
        assert!(
            matches!(&refused, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused),
            "{refused:?}"
        );
        // The 4-tuple is free again once the refused socket is released.
        core.tcp_release(handle, true);
        core.poll(t(2));
        core.originate(t(3), peer, app).unwrap();
    }

    /// A data segment from the app on an accepted connection.
    fn app_data(key: FlowKey, seq: u32, ack: TcpSeqNumber, payload: &[u8]) -> Vec<u8> {
        let repr = TcpRepr {
            src_port: key.0.port(),
            dst_port: key.1.port(),
            control: TcpControl::None,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: Some(ack),
            window_len: 64240,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        packet::build_tcp(key.0, key.1, &repr, &ChecksumCapabilities::default()).unwrap()
    }

    fn read(core: &mut Core, handle: SocketHandle, len: usize) -> Vec<u8> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut buf = vec![0u8; len];
        match core.tcp_poll_read(handle, &mut cx, &mut buf) {
            Poll::Ready(Ok(n)) => buf.truncate(n),
            other => panic!("read: {other:?}"),
        }
        buf
    }

    #[test]
    fn idle_buffers_give_memory_back_but_never_bytes_beyond_a_gap() {
        let mut core = Core::new(Config::default(), t(0));
        let key = (addr("10.0.0.2:40000"), addr("10.1.2.3:80"));
        // The app's initial sequence number is near the end of the sequence space.
        let isn = u32::MAX - 150;
        core.ingest(t(0), syn(key.0, key.1, isn as i32));
        core.poll(t(0));
        assert_eq!(core.pop_event(), Some(CoreEvent::NewTcp(key)));
        let handle = core.decide(t(0), key, Decision::Accept).unwrap().unwrap();
        core.poll(t(0));
        let synack = tcp_of(&core.drain_transmit().next().unwrap()).seq_number;
        let ack = synack + 1;
        let (first, second) = (isn.wrapping_add(1), isn.wrapping_add(101));
        let third = isn.wrapping_add(201);
        core.ingest(t(1), app_data(key, first, ack, &[b'a'; 100]));
        core.poll(t(1));
        assert_eq!(read(&mut core, handle, 1000), [b'a'; 100]);
        // The third hundred bytes arrive before the second (the kernel lost a segment).
        core.ingest(t(2), app_data(key, third, ack, &[b'c'; 100]));
        core.poll(t(2));
        core.drain_transmit().for_each(drop);
        core.poll(t(5000));
        assert_eq!(
            core.released(handle),
            (false, true),
            "bytes beyond a gap keep the receive buffer"
        );
        core.ingest(t(6000), app_data(key, second, ack, &[b'b'; 100]));
        core.poll(t(6000));
        let got = read(&mut core, handle, 1000);
        let mut want = vec![b'b'; 100];
        want.extend([b'c'; 100]);
        assert_eq!(got, want, "the gap filled, every byte as sent");
        assert_eq!(core.released(handle), (false, false), "just used");
        // The read is seen as activity on the next poll; a second later the memory goes back.
        core.poll(t(6001));
        assert_eq!(core.poll_delay(t(6001)), Some(Duration::from_millis(1000)));
        core.poll(t(7001));
        assert_eq!(core.released(handle), (true, true), "idle and all read");
        assert!(
            core.poll_delay(t(7001))
                .is_none_or(|d| d > Duration::from_secs(60)),
            "nothing left to give back"
        );
    }

    fn write(core: &mut Core, handle: SocketHandle, data: &[u8]) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match core.tcp_poll_write(handle, &mut cx, data) {
            Poll::Ready(Ok(n)) => assert_eq!(n, data.len()),
            other => panic!("write: {other:?}"),
        }
    }

    #[test]
    fn acknowledgements_ride_on_answers_within_the_delay_and_never_wait_past_it() {
        let config = Config {
            tcp_ack_delay: Some(std::time::Duration::from_millis(1)),
            ..Config::default()
        };
        let mut core = Core::new(config, t(0));
        let key = (addr("10.0.0.2:40000"), addr("10.1.2.3:80"));
        // The app's SYN announces a 1460-byte MSS.
        let (handle, ack) = syn_acked(&mut core, key, 1000, t(0));

        core.ingest(t(10), app_data(key, 1001, ack, b"request"));
        core.poll(t(10));
        assert_eq!(core.drain_transmit().count(), 0, "no bare ACK at once");
        assert_eq!(read(&mut core, handle, 100), b"request");
        write(&mut core, handle, b"answer");
        core.poll(t(10));
        let out: Vec<_> = core.drain_transmit().collect();
        assert_eq!(out.len(), 1, "the answer carries the acknowledgement");
        let answer = tcp_of(&out[0]);
        assert_eq!(answer.payload, b"answer");
        assert_eq!(answer.ack_number, Some(TcpSeqNumber(1008)));

        // Nothing to answer with: a bare ACK once the delay is over, not before.
        core.ingest(t(20), app_data(key, 1008, ack + 6, b"ping"));
        core.poll(t(20));
        assert_eq!(core.drain_transmit().count(), 0);
        assert!(core.poll_delay(t(20)) <= Some(Duration::from_millis(1)));
        core.poll(t(21));
        let out: Vec<_> = core.drain_transmit().collect();
        assert_eq!(out.len(), 1);
        let bare = tcp_of(&out[0]);
        assert!(bare.payload.is_empty());
        assert_eq!(bare.ack_number, Some(TcpSeqNumber(1012)));

        // More than a full segment (a sender's offloaded burst) is acknowledged at once.
        core.ingest(t(30), app_data(key, 1012, ack + 6, &[b'x'; 3000]));
        core.poll(t(30));
        let out: Vec<_> = core.drain_transmit().collect();
        assert_eq!(out.len(), 1);
        assert_eq!(tcp_of(&out[0]).ack_number, Some(TcpSeqNumber(4012)));
    }

    #[test]
    fn a_poll_looks_only_at_the_connections_with_something_to_do() {
        let mut core = Core::new(Config::default(), t(0));
        let keys: Vec<FlowKey> = (0..200)
            .map(|i| {
                (
                    addr(&format!("10.0.0.2:{}", 40000 + i)),
                    addr("10.1.2.3:80"),
                )
            })
            .collect();
        let mut handles = Vec::new();
        for &key in &keys {
            let (handle, ack) = syn_acked(&mut core, key, 1000, t(0));
            core.ingest(t(0), app_data(key, 1001, ack, b""));
            core.poll(t(0));
            assert_eq!(core.tcp_state(handle), tcp::State::Established);
            handles.push((handle, ack));
        }
        assert_eq!(core.drain_transmit().count(), 0);
        core.poll(t(5));
        assert_eq!(core.polled, 0, "idle connections cost a poll nothing");

        // A request on one connection: that connection only, and its delayed ACK still
        // leaves on time among all the idle ones.
        let (handle, ack) = handles[7];
        core.ingest(t(10), app_data(keys[7], 1001, ack, b"request"));
        core.poll(t(10));
        assert_eq!(core.polled, 1);
        assert_eq!(core.drain_transmit().count(), 0);
        assert!(core.poll_delay(t(10)) <= Some(Duration::from_millis(1)));
        core.poll(t(12));
        assert_eq!(core.polled, 1);
        let out: Vec<_> = core.drain_transmit().collect();
        assert_eq!(out.len(), 1);
        let bare = tcp_of(&out[0]);
        assert_eq!(bare.dst_port, keys[7].0.port());
        assert_eq!(bare.ack_number, Some(TcpSeqNumber(1008)));
        // The caller's read and answer: that connection again.
        assert_eq!(read(&mut core, handle, 100), b"request");
        write(&mut core, handle, b"answer");
        core.poll(t(13));
        assert_eq!(core.polled, 1);
        let answer = core.drain_transmit().next().unwrap();
        let answer = tcp_of(&answer);
        assert_eq!(answer.payload, b"answer");
        core.ingest(t(14), app_data(keys[7], 1008, answer.seq_number + 6, b""));
        core.poll(t(14));
        assert_eq!(core.polled, 1);

        // Once each has given its idle buffers back, none is looked at again.
        core.poll(t(2500));
        assert_eq!(core.polled, 200);
        assert!(
            handles
                .iter()
                .all(|&(handle, _)| core.released(handle) == (true, true))
        );
        core.poll(t(5000));
        assert_eq!(core.polled, 0);
        assert_eq!(core.poll_delay(t(5000)), None);
    }

    #[test]
    fn the_apps_fin_is_acknowledged_at_once_even_as_its_socket_is_released() {
        let mut core = Core::new(Config::default(), t(0));
        assert!(core.config.tcp_ack_delay.is_some());
        let key = (addr("10.0.0.2:40000"), addr("10.1.2.3:80"));
        let (handle, ack) = syn_acked(&mut core, key, 1000, t(0));
        core.ingest(t(1), app_data(key, 1001, ack, b"request"));
        core.poll(t(1));
        assert_eq!(read(&mut core, handle, 100), b"request");
        // The far side answered and closed: our FIN goes out with the answer.
        write(&mut core, handle, b"answer");
        core.tcp_shutdown(handle);
        core.tcp_release(handle, false);
        core.poll(t(1));
        let out: Vec<_> = core.drain_transmit().collect();
        let our_fin = out
            .iter()
            .map(|p| tcp_of(p))
            .find(|tcp| tcp.control == TcpControl::Fin);
        let our_fin = our_fin.expect("our FIN");
        let past_our_fin = our_fin.seq_number + our_fin.payload.len() + 1;
        // The app acknowledges it and closes too; the socket is done and released, and its
        // last act is the ACK of the app's FIN.
        let ack_of_ours = app_data(key, 1008, past_our_fin, b"");
        let mut fin = tcp_of(&ack_of_ours);
        fin.control = TcpControl::Fin;
        let fin = packet::build_tcp(key.0, key.1, &fin, &ChecksumCapabilities::default()).unwrap();
        core.ingest(t(2), fin);
        core.poll(t(2));
        let out: Vec<_> = core.drain_transmit().collect();
        assert!(
            out.iter()
                .any(|p| tcp_of(p).ack_number == Some(TcpSeqNumber(1009))),
            "the app's FIN is acknowledged before the socket goes"
        );
    }

    /// Accepts the app's connection `key` opened with initial sequence number `isn`; returns
    /// its handle.
    fn accepted(core: &mut Core, key: FlowKey, isn: u32, now: Instant) -> SocketHandle {
        core.ingest(now, syn(key.0, key.1, isn as i32));
        core.poll(now);
        assert_eq!(core.pop_event(), Some(CoreEvent::NewTcp(key)));
        core.decide(now, key, Decision::Accept).unwrap().unwrap()
    }

    /// [`accepted`], and the acknowledgement number of the app's next segment, from the
    /// SYN-ACK the stack sends it (the only packet out; taken).
    fn syn_acked(
        core: &mut Core,
        key: FlowKey,
        isn: u32,
        now: Instant,
    ) -> (SocketHandle, TcpSeqNumber) {
        let handle = accepted(core, key, isn, now);
        core.poll(now);
        let syn_ack = tcp_of(&core.drain_transmit().next().unwrap()).seq_number;
        (handle, syn_ack + 1)
    }

    /// The last acknowledgement and window (in bytes; our window scale is 5, for 1 MiB
    /// buffers) sent to the app on `key`, among `out`.
    fn last_window(out: &[Vec<u8>], key: FlowKey) -> Option<(TcpSeqNumber, usize)> {
        out.iter().rev().map(|p| tcp_of(p)).find_map(|tcp| {
            (tcp.dst_port == key.0.port() && tcp.control != TcpControl::Syn)
                .then(|| (tcp.ack_number.unwrap(), usize::from(tcp.window_len) << 5))
        })
    }

    /// The app sends as much as the window allows, from `seq` up to `edge`.
    fn fill_window(core: &mut Core, key: FlowKey, seq: u32, edge: u32, ack: TcpSeqNumber) {
        let mut at = seq;
        while at != edge {
            let len = (edge.wrapping_sub(at) as usize).min(60_000);
            core.ingest(t(1), app_data(key, at, ack, &vec![b'x'; len]));
            at = at.wrapping_add(len as u32);
        }
    }

    #[test]
    fn a_draining_connection_grows_its_window_within_the_budget_and_gives_it_back_when_idle() {
        let config = Config {
            tcp_buffer_budget: 256 * 1024,
            ..Config::default()
        };
        let mut core = Core::new(config, t(0));
        let draining = (addr("10.0.0.2:40000"), addr("10.1.2.3:80"));
        let stalled = (addr("10.0.0.2:40001"), addr("10.1.2.3:80"));
        let mut handles = Vec::new();
        let mut acks = Vec::new();
        for key in [draining, stalled] {
            let handle = accepted(&mut core, key, 1000, t(0));
            core.poll(t(0));
            let out: Vec<_> = core.drain_transmit().collect();
            let synack = tcp_of(out.last().unwrap());
            assert_eq!(
                synack.window_len,
                16 * 1024,
                "a connection starts with 16 KiB"
            );
            let ack = synack.seq_number + 1;
            core.ingest(t(0), app_data(key, 1001, ack, &[]));
            handles.push(handle);
            acks.push(ack);
        }
        core.poll(t(0));
        core.drain_transmit().for_each(drop);

        // The stalled connection's window fills and nobody reads it.
        fill_window(&mut core, stalled, 1001, 1001 + 16 * 1024, acks[1]);
        // The draining one fills its window again and again, and every byte is read.
        let mut windows = Vec::new();
        let (mut seq, mut edge) = (1001u32, 1001 + 16 * 1024);
        for _ in 0..8 {
            fill_window(&mut core, draining, seq, edge, acks[0]);
            core.poll(t(1));
            let mut got = 0;
            let mut buf = vec![0u8; 1 << 20];
            let mut cx = Context::from_waker(std::task::Waker::noop());
            while let Poll::Ready(n) = core.tcp_poll_read(handles[0], &mut cx, &mut buf) {
                let n = n.unwrap();
                assert!(buf[..n].iter().all(|&b| b == b'x'));
                got += n;
            }
            assert_eq!(got, edge.wrapping_sub(seq) as usize, "every byte comes out");
            seq = edge;
            core.poll(t(1));
            let out: Vec<_> = core.drain_transmit().collect();
            let (ack, window) = last_window(&out, draining).unwrap();
            assert_eq!(ack, TcpSeqNumber(seq as i32));
            edge = seq + window as u32;
            windows.push(window / 1024);
        }
        assert_eq!(
            windows,
            [16, 32, 64, 128, 256, 256, 256, 256],
            "the window doubles each time it fills again after draining, up to the budget"
        );
        assert_eq!(core.capacity.grown(), (256 - 16) * 1024);
        assert_eq!(
            core.sockets.get::<tcp::Socket>(handles[1]).recv_capacity(),
            16 * 1024,
            "a full buffer that nobody reads does not grow"
        );

        // Idle for a second, the draining connection drops back to 16 KiB and says so.
        core.poll(t(1001));
        let out: Vec<_> = core.drain_transmit().collect();
        assert_eq!(last_window(&out, draining).unwrap().1, 16 * 1024);
        assert_eq!(core.capacity.grown(), 0);
    }
}
