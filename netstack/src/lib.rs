//! mirrord-netstack terminates every TCP connection and UDP flow the launched process opens,
//! to any destination, and hands them to the caller with their original source and
//! destination; it speaks raw IP packets on one side and never knows about TUN devices,
//! routing policy or the agent.
//!
//! The stack's task reads the app's packets from a [`PacketDevice`] (the TUN) and writes
//! packets for it there, with no other task in between; [`NetStack::spawn`] gives a pair of
//! channels instead ([`PacketSink`], [`PacketSource`]) for tests. New flows arrive on
//! [`Events`]. A TCP connection is only answered once
//! the caller has decided ([`NewTcp::accept`] / [`NewTcp::refuse`] /
//! [`NewTcp::unreachable`]), so connecting the remote side first keeps the app's view true.
//!
//! The other way round, an [`Originator`] opens a TCP connection *to* the app from any address
//! (an incoming client's real one), so the app's `accept` and `getpeername` see that client and
//! its replies come back through the same packets.
//!
//! Limits: IPv4 fragments are dropped (the TUN MTU is large, so the kernel rarely sends
//! them); ICMP echo requests are not answered (ping to a remote address times out);
//! UDP replies larger than one IP datagram are refused with [`Error::TooLarge`].

mod buffers;
mod capacity;
mod core;
mod packet;
mod replay;
mod stack;

use std::time::Duration;

pub use replay::{Replayed, replay};
pub use stack::{
    Event, Events, NetStack, NewTcp, Originator, PacketDevice, PacketSink, PacketSource, TcpStream,
    TxChecksum, UdpFlow,
};

/// Tuning knobs; [`Config::default`] suits a TUN device.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest IP packet in either direction (the TUN's MTU). smoltcp accepts up to 65535.
    pub mtu: usize,
    /// Most a TCP connection's receive buffer grows to; it also sets the largest advertised
    /// window (and its scale).
    pub tcp_rx_buffer: usize,
    /// Most a TCP connection's send buffer grows to.
    pub tcp_tx_buffer: usize,
    /// Each buffer's size when its connection starts or goes idle.
    pub tcp_first_buffer: usize,
    /// How much the buffers of all connections together may grow beyond `tcp_first_buffer`.
    pub tcp_buffer_budget: usize,
    /// Nagle's algorithm on connections to the app (off: requests and replies go out at once).
    pub nagle: bool,
    /// How long the acknowledgement of the app's data may wait for data of ours to ride on
    /// (an answer coming back through the link), as a TCP receiver does; `None` acknowledges
    /// every segment at once. More than one full segment, and a FIN, are acknowledged at once
    /// either way, so a bulk sender never waits it out. Short, because an app with Nagle's
    /// algorithm on holds a second small write until its first is acknowledged.
    pub tcp_ack_delay: Option<Duration>,
    /// A UDP flow with no datagram either way for this long is closed.
    pub udp_idle: Duration,
    /// Datagrams queued per UDP flow before new ones are dropped.
    pub udp_queue: usize,
    /// UDP flows open at once: a datagram of a new flow beyond this closes the flow idle the
    /// longest. An app that sends each request from a new socket (a new source port) would
    /// otherwise hold one flow, and on the far side one socket, per request for `udp_idle`.
    pub udp_flows: usize,
    /// Verify checksums of packets from the app. A TUN fed by the local kernel is trustworthy,
    /// so the tunnel can turn this off; checksums on packets to the app are always written.
    pub verify_rx_checksums: bool,
    /// TCP packets to the app leave their checksum for the device to complete: smoltcp skips
    /// the pass over each payload, the checksum field holds the pseudo-header sum, and the
    /// device gets [`TxChecksum::Partial`] (a TUN with offload passes that on to the kernel,
    /// which delivers such a packet locally without a checksum pass of its own either).
    pub tcp_checksum_offload: bool,
    /// How long a cleanly closed, released connection may wait for the app's FIN.
    pub orphan_timeout: Duration,
    /// Seed for initial sequence numbers and ports.
    pub random_seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mtu: 65535,
            tcp_rx_buffer: 1 << 20,
            tcp_tx_buffer: 1 << 20,
            tcp_first_buffer: 16 * 1024,
            tcp_buffer_budget: 16 << 20,
            nagle: false,
            tcp_ack_delay: Some(Duration::from_millis(1)),
            udp_idle: Duration::from_secs(60),
            udp_queue: 1024,
            udp_flows: 1024,
            verify_rx_checksums: true,
            tcp_checksum_offload: false,
            orphan_timeout: Duration::from_secs(60),
            random_seed: 0x6d69_7272_6f72_6421,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the netstack must be spawned from inside a tokio runtime")]
    NoRuntime,
    #[error("the netstack has stopped")]
    Closed,
    #[error("the UDP flow has expired or was closed")]
    FlowClosed,
    #[error("the datagram does not fit in one IP packet")]
    TooLarge,
    #[error("the SYN could not be accepted: {0}")]
    Accept(String),
    #[error("cannot open a connection to the app: {0}")]
    Originate(String),
}

impl From<core::CoreError> for Error {
    fn from(e: core::CoreError) -> Self {
        match e {
            core::CoreError::NotPending | core::CoreError::Stopped => Error::Closed,
            e @ (core::CoreError::InUse | core::CoreError::Connect(_)) => {
                Error::Originate(e.to_string())
            }
            core::CoreError::FlowClosed => Error::FlowClosed,
            core::CoreError::Packet(packet::PacketError::TooLarge) => Error::TooLarge,
            other => Error::Accept(other.to_string()),
        }
    }
}
